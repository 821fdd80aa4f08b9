"""Token buckets that enforce the per-principal rate quotas of `domain_core.limits.Limits`.

Invariants: a bucket holds at most `burst` tokens and refills at `rate` per second of the
clock passed in; at most `max_names` buckets are kept (least recently used dropped first);
`acquire` is thread-safe and never blocks (it says how long to wait instead).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets by name (a principal): `rate` tokens per second, at most `burst` saved.

    Bounded: at most `max_names` buckets are kept; the least recently used are dropped first
    (a dropped name starts again with a full bucket, which can only favour a caller that went
    quiet). Thread-safe; the clock is passed in for tests.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_names: int = 100_000,
    ) -> None:
        if not rate > 0 or burst < 1 or max_names < 1:
            raise ValueError("rate must be above 0, burst and max_names at least 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._max_names = max_names
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    def acquire(self, name: str) -> float:
        """Take one token of `name`'s bucket: 0.0 if there was one, else the seconds until
        there is one (nothing is taken then)."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[name] = (tokens, now)
            while len(self._buckets) > self._max_names:
                self._buckets.popitem(last=False)
        return wait
