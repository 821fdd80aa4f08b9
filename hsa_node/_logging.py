"""Logging that cannot flood: a message repeated within a window is written once.

Invariant: every distinct message is logged the first time it occurs, and again at most once
per window (default one minute); the memory used is bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

_MAX_REMEMBERED: Final = 1024


class ThrottledLog:
    """Writes each distinct message at most once per `window` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._window = window
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def log(self, level: int, message: str, key: str | None = None) -> bool:
        """Log `message` at `level` unless it (or another message with the same `key`, when
        given) was logged within the window; True if written."""
        now = self._clock()
        seen = message if key is None else f"\0{key}"
        with self._lock:
            last = self._last.get(seen)
            if last is not None and now - last < self._window:
                return False
            if len(self._last) >= _MAX_REMEMBERED:
                cutoff = now - self._window
                self._last = {m: t for m, t in self._last.items() if t >= cutoff}
                if len(self._last) >= _MAX_REMEMBERED:
                    self._last.clear()
            self._last[seen] = now
        self._logger.log(level, "%s", message)
        return True

    def warning(self, message: str, key: str | None = None) -> bool:
        """`log` at WARNING."""
        return self.log(logging.WARNING, message, key)

    def info(self, message: str) -> bool:
        """`log` at INFO."""
        return self.log(logging.INFO, message)
