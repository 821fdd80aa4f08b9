"""Logging that cannot flood: a message repeated within a window is written once.

Every process uses this one class for warnings that a peer, a caller or a loop can repeat.

Invariants:
- every distinct message (or key) is logged the first time it occurs, and again at most once
  per window (default one minute); with `again_if_changed`, also as soon as the message logged
  under its key changes;
- the memory used is bounded whatever the callers send: at most `max_keys` keys are
  remembered, and the one logged longest ago is forgotten first (it may then be logged again
  early, which is the only cost of the bound);
- it is safe to call from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

DEFAULT_WINDOW_SECONDS: Final = 60.0
DEFAULT_MAX_KEYS: Final = 1024


class ThrottledLog:
    """Writes each distinct message (or each key's messages) at most once per `window`."""

    def __init__(
        self,
        logger: logging.Logger,
        window: float = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if max_keys < 1:
            raise ValueError("a throttled log remembers at least one key")
        self._logger = logger
        self._window = window
        self._clock = clock
        self._max_keys = max_keys
        # key -> (the message last logged under it, when); oldest first.
        self._last: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many keys are remembered (never more than `max_keys`)."""
        with self._lock:
            return len(self._last)

    def log(
        self, level: int, message: str, key: str | None = None, *, again_if_changed: bool = False
    ) -> bool:
        """Log `message` at `level` unless it was logged within the window; True if written.

        With `key`, the messages that share it count as one (any of them logged within the
        window holds the others back), unless `again_if_changed`: then only the same message
        is held back, and a different one under the key is written at once.
        """
        now = self._clock()
        seen = message if key is None else f"\0{key}"
        with self._lock:
            previous = self._last.get(seen)
            if (
                previous is not None
                and now - previous[1] < self._window
                and (previous[0] == message or not again_if_changed)
            ):
                return False
            self._last[seen] = (message, now)
            self._last.move_to_end(seen)
            while len(self._last) > self._max_keys:
                self._last.popitem(last=False)
        self._logger.log(level, "%s", message)
        return True

    def warning(
        self, message: str, key: str | None = None, *, again_if_changed: bool = False
    ) -> bool:
        """`log` at WARNING."""
        return self.log(logging.WARNING, message, key, again_if_changed=again_if_changed)

    def info(self, message: str, key: str | None = None) -> bool:
        """`log` at INFO."""
        return self.log(logging.INFO, message, key)
