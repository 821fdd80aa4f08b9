"""Quotas of the coordinator: a token bucket per client address, and WatchStates slots per host.

Invariants:
- `AddressQuota.take` admits a call only while the bucket of its client address holds at
  least one token, and charges the call's cost (the bucket may go into debt by the cost of
  the last call, so one expensive call is admitted but pays before the next one); a refused
  call changes nothing and raises ResourceExhaustedError saying when to retry;
- buckets are keyed by the client's network address without its port (a client opening new
  connections gets no new bucket), and at most `max_addresses` are kept: the least recently
  used is forgotten first (a forgotten address starts again with a full bucket, which is no
  more than a new client gets);
- `WatchSlots` lets one host hold at most `per_host` streams: opening one more marks that
  host's oldest stream replaced, and nothing else.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from domain_core.errors import ResourceExhaustedError

__all__ = ["AddressQuota", "WatchSlot", "WatchSlots", "client_address"]

DEFAULT_MAX_ADDRESSES = 10_000


def client_address(peer: str) -> str:
    """The network address of a gRPC peer string, without the port.

    "ipv4:127.0.0.1:5000" -> "127.0.0.1", "ipv6:[::1]:5000" -> "::1"; anything else (a unix
    socket) is kept whole.
    """
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if scheme == "ipv4":
        return rest.rpartition(":")[0] or rest
    if scheme == "ipv6":
        host = rest.rpartition(":")[0] if rest.startswith("[") else rest
        return host.strip("[]") or rest
    return peer


@dataclass
class _Bucket:
    tokens: float
    updated: float


class AddressQuota:
    """A token bucket per client address: `rate` tokens a second, at most `burst`."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        what: str = "calls",
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = DEFAULT_MAX_ADDRESSES,
    ) -> None:
        if rate <= 0 or burst < 1 or max_addresses < 1:
            raise ValueError("a quota needs a positive rate, a burst of at least 1 and room")
        self._rate = rate
        self._burst = float(burst)
        self._what = what
        self._clock = clock
        self._max_addresses = max_addresses
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, address: str, cost: float = 1.0) -> None:
        """Charge `cost` tokens to `address`; ResourceExhaustedError if its bucket is empty."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(address)
            if bucket is None:
                bucket = _Bucket(self._burst, now)
                self._buckets[address] = bucket
                if len(self._buckets) > self._max_addresses:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(address)
                elapsed = max(now - bucket.updated, 0.0)
                bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
                bucket.updated = now
            if bucket.tokens < 1.0:
                wait = math.ceil((1.0 - bucket.tokens) / self._rate)
                raise ResourceExhaustedError(
                    f"too many {self._what} from {address}: at most {self._rate:g} a second "
                    f"(bursts of {self._burst:g}); retry in {max(wait, 1)} s"
                )
            bucket.tokens -= cost


@dataclass(eq=False)
class WatchSlot:
    """One open WatchStates stream of a host; `replaced` is set when a newer one took over."""

    host_id: str
    replaced: threading.Event = field(default_factory=threading.Event)


class WatchSlots:
    """At most `per_host` open streams per host; a new one replaces that host's oldest."""

    def __init__(self, per_host: int) -> None:
        if per_host < 1:
            raise ValueError("a host needs at least one stream slot")
        self._per_host = per_host
        self._slots: dict[str, list[WatchSlot]] = {}
        self._lock = threading.Lock()

    def open(self, host_id: str) -> tuple[WatchSlot, WatchSlot | None]:
        """A slot for a new stream of `host_id`, and the slot it replaced (if any)."""
        slot = WatchSlot(host_id)
        replaced: WatchSlot | None = None
        with self._lock:
            held = self._slots.setdefault(host_id, [])
            if len(held) >= self._per_host:
                replaced = held.pop(0)
                replaced.replaced.set()
            held.append(slot)
        return slot, replaced

    def close(self, slot: WatchSlot) -> None:
        """Give a slot back (a replaced one is gone already)."""
        with self._lock:
            held = self._slots.get(slot.host_id)
            if held is not None and slot in held:
                held.remove(slot)
                if not held:
                    del self._slots[slot.host_id]

    def count(self, host_id: str) -> int:
        """How many streams `host_id` holds open."""
        with self._lock:
            return len(self._slots.get(host_id, ()))
