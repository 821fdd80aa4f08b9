"""A logger of repeated warnings: the first one of a topic, then again only when the message
changes or after a while, so a failure that repeats every sweep or every call does not flood
the log (and an attacker who makes a refusal repeat cannot).

Invariant: a message is logged at WARNING the first time its topic is seen, and for a topic
seen before only if the message differs (unless `any_message`) or `interval` seconds passed.
"""

from __future__ import annotations

import logging
import threading
import time


class ThrottledLog:
    """Logs a repeated message once, and again only when it changes or after a while."""

    def __init__(self, log: logging.Logger, interval: float = 60.0) -> None:
        self._log = log
        self._last: dict[str, tuple[str, float]] = {}
        self._interval = interval
        self._lock = threading.Lock()

    def warning(self, topic: str, message: str, *, any_message: bool = False) -> None:
        """Log `message` unless the same one was logged under `topic` a while ago (with
        `any_message`, unless anything was)."""
        now = time.monotonic()
        with self._lock:
            previous = self._last.get(topic)
            if (
                previous is not None
                and (any_message or previous[0] == message)
                and now - previous[1] < self._interval
            ):
                return
            self._last[topic] = (message, now)
        self._log.warning("%s", message)
