"""A leader election and a distributed lock, both a key held under a lease.

Invariants:
- the key is created only if absent, attached to a fresh lease, in one transaction: at most
  one holder at a time, whatever the number of candidates and however their calls interleave;
- a holder holds only while its lease is alive (`Lease.alive`, conservative) and its key is
  still its own (a watch on the key); when either ends without `release`, it stops holding at
  once and `on_lost` runs, once, in a thread;
- the key goes with the lease: a holder that dies is replaced once its lease expires (its TTL),
  a holder that releases at once;
- releasing deletes the key only if it is still this holder's (compared on its create
  revision), then revokes the lease; a failed candidate revokes the lease it took. A `Lock`
  keeps its lease between holds instead (`keep_lease`: no grant and no revocation per hold,
  two etcd writes fewer each time) and revokes it when a release fails, so a key that could
  not be deleted still goes with the lease, and on `close`;
- a watch belongs to one hold (its create revision): an event it reports after that hold
  ended (a release, then another acquire by the same holder) changes nothing; a release does
  not wait for its watch to end;
- a hold that ends other than by `release` (its lease lapsed, its key changed or a watch lost
  track) revokes its lease, kept or not, so no key of it outlives the hold: a lease that
  lapsed locally could otherwise be refreshed again later with nobody holding, and keep the
  key (and everyone else out) for good. A kept lease that lapsed is likewise revoked before a
  fresh one replaces it, and an attempt on a hold that lapsed unnoticed ends that hold first;
- not re-entrant: a second `acquire` by the holder is a programming error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final

from domain_core.errors import UnavailableError
from domain_edge.etcd._client import EtcdClient
from domain_edge.etcd._lease import Lease, grant_lease
from domain_edge.etcd._types import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Range,
    RangeResult,
    Result,
    Target,
)
from domain_edge.etcd._watch import Watch, WatchBatch, watch_key

log = logging.getLogger(__name__)

DEFAULT_TTL: Final = 5
# A candidate also tries again this often even without a deletion event (belt and braces).
_RETRY_SECONDS: Final = 1.0


class LeasedKey:
    """A key held under a lease by one holder at a time (see the module invariants)."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        value: bytes,
        ttl: int = DEFAULT_TTL,
        *,
        on_lost: Callable[[], None] | None = None,
        keep_lease: bool = False,
    ) -> None:
        self.client = client
        self.key = key
        self.value = value
        self.ttl = ttl
        self._on_lost = on_lost
        self._keep_lease = keep_lease
        self._lock = threading.Lock()
        self._lease: Lease | None = None  # the lease of the current hold
        self._spare: Lease | None = None  # kept between holds (keep_lease)
        self._created = 0
        self._watch: Watch | None = None
        self._lost_key = threading.Event()

    def _attempt_lease(self) -> Lease:
        """The lease for one attempt: the kept one while it lives, else a fresh one (a kept
        one that lapsed is revoked, so that it never comes back to life unused)."""
        spare = self._spare
        if spare is not None:
            if spare.alive:
                return spare
            self._spare = None
            _revoke_later(spare)
        granted: list[Lease] = []
        lease = grant_lease(
            self.client, self.ttl, on_lost=lambda: self._lease_lost(granted[0] if granted else None)
        )
        granted.append(lease)
        self._spare = lease if self._keep_lease else None
        return lease

    def _drop(self, lease: Lease) -> None:
        """Revoke `lease` (and forget it if kept); a failure to revoke leaves it to expire,
        since revoking stops its refreshes first."""
        if self._spare is lease:
            self._spare = None
        with contextlib.suppress(Exception):
            lease.revoke()

    @property
    def held(self) -> bool:
        """Whether this holder surely holds the key now."""
        lease = self._lease
        return lease is not None and lease.alive and not self._lost_key.is_set()

    def try_acquire(self) -> tuple[bool, int]:
        """One attempt: (won, the store revision it read or wrote)."""
        if self._lease is not None and not self.held:
            self._lose(self._created, "its lease lapsed")  # unnoticed until now
        with self._lock:
            if self._lease is not None:
                raise RuntimeError(f"{self.key!r} is held by this holder already")
            lease = self._attempt_lease()
            result = self.client.txn(
                [Compare.absent(self.key)],
                [Put(self.key, self.value, lease.id)],
                [Range(self.key)],
                retry_safe=True,
            )
            created = result.revision
            if not result.succeeded:
                current = _first(result.results[0])
                if not (result.uncertain and current is not None and current.lease == lease.id):
                    if not self._keep_lease:
                        lease.revoke()
                    return False, result.revision
                created = current.create_revision  # our first attempt won: its answer was lost
            self._lease, self._created = lease, created
            self._lost_key.clear()
            self._watch = watch_key(
                self.client, self.key, created + 1, lambda batch: self._key_changed(batch, created)
            )
            return True, created

    def acquire(self, timeout: float | None) -> bool:
        """Try until won or `timeout` seconds passed (None: forever); whether it was won."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            won, revision = self.try_acquire()
            if won:
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._wait_for_release(revision, remaining)

    def _wait_for_release(self, revision: int, remaining: float | None) -> None:
        released = threading.Event()

        def seen(batch: WatchBatch) -> None:
            if batch.compacted or any(e.deleted for e in batch.events):
                released.set()

        watch = watch_key(self.client, self.key, revision + 1, seen)
        try:
            wait = _RETRY_SECONDS if remaining is None else min(_RETRY_SECONDS, remaining)
            released.wait(max(0.0, wait))
        finally:
            watch.cancel()

    def holder(self) -> bytes | None:
        """The value of whoever holds the key now (None: nobody)."""
        current = self.client.get(self.key)
        return current.value if current is not None else None

    def release(self) -> None:
        """Delete the key if it is still ours, revoke the lease (unless kept); nothing if not
        held."""
        with self._lock:
            lease, watch, created = self._lease, self._watch, self._created
            self._lease, self._watch = None, None
        if watch is not None:
            threading.Thread(target=watch.cancel, daemon=True).start()
        if lease is None:
            return
        try:
            self.client.txn(
                [Compare(self.key, Target.CREATE, Result.EQUAL, created)],
                [Delete(self.key)],
                retry_safe=True,
            )
        except BaseException:
            self._drop(lease)  # the key, if still there, goes with the lease
            raise
        if not self._keep_lease:
            lease.revoke()

    def close(self) -> None:
        """Release, and revoke a kept lease."""
        try:
            self.release()
        finally:
            spare = self._spare
            if spare is not None:
                self._drop(spare)

    def _lease_lost(self, lease: Lease | None) -> None:
        """`lease` was lost: the hold on it ends (a lease of an earlier hold changes nothing)."""
        with self._lock:
            created = self._created if lease is not None and self._lease is lease else None
        if created is not None:
            self._lose(created, "its lease was lost")

    def _key_changed(self, batch: WatchBatch, created: int) -> None:
        if batch.compacted:
            self._lose(created, "the watch of its key lost track (compacted)")
        elif any(e.deleted or e.value != self.value for e in batch.events):
            self._lose(created, "its key was deleted or taken")

    def _lose(self, created: int | None, why: str) -> None:
        """Stop holding: the lease was lost (`created` None), or the hold made at revision
        `created` ended without a release (nothing if that hold has ended already). The
        hold's lease is revoked, so its key goes (see the module invariants)."""
        with self._lock:
            lease, watch = self._lease, self._watch
            if lease is None or (created is not None and created != self._created):
                return  # released meanwhile, lost already, or an event of an earlier hold
            self._lease, self._watch = None, None
            self._lost_key.set()
            if self._spare is lease:
                self._spare = None
        log.warning("no longer holding %r: %s", self.key, why)
        _revoke_later(lease)
        if watch is not None:
            threading.Thread(target=watch.cancel, daemon=True).start()
        if self._on_lost is not None:
            self._on_lost()


def _revoke_later(lease: Lease) -> None:
    """Revoke `lease` in a thread of its own: its refreshes stop at once, and the call itself
    may wait for an unreachable cluster (the lease then lapses by itself)."""

    def revoke() -> None:
        with contextlib.suppress(Exception):
            lease.revoke()

    threading.Thread(target=revoke, name="etcd-lease-revoke", daemon=True).start()


def _first(result: object) -> KeyValue | None:
    return result.first() if isinstance(result, RangeResult) else None


class Election:
    """A leader election on one key: candidates campaign, one leads until it resigns, dies or
    loses its lease; anyone may ask who leads and observe changes."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        identity: bytes,
        ttl: int = DEFAULT_TTL,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        if not identity:
            raise ValueError("a candidate needs an identity")
        self.identity = identity
        self._key = LeasedKey(client, key, identity, ttl, on_lost=on_lost)

    @property
    def is_leader(self) -> bool:
        return self._key.held

    def campaign(self, timeout: float | None = None) -> bool:
        """Become the leader, waiting at most `timeout` seconds (None: until it happens)."""
        return self._key.acquire(timeout)

    def try_campaign(self) -> bool:
        """One attempt to become the leader, without waiting."""
        return self._key.try_acquire()[0]

    def leader(self) -> bytes | None:
        """The identity of the current leader, or None."""
        return self._key.holder()

    def observe(self, on_change: Callable[[bytes | None], None]) -> Callable[[], None]:
        """Call `on_change(identity or None)` now and whenever the leader changes (in a thread);
        returns the function that stops observing."""
        client, key = self._key.client, self._key.key
        current = client.range(Range(key))
        on_change(current.kvs[0].value if current.kvs else None)

        def changed(batch: WatchBatch) -> None:
            if batch.compacted:
                now = client.get(key)
                on_change(now.value if now is not None else None)
                return
            last = batch.events[-1]
            on_change(None if last.deleted else last.value)

        return watch_key(client, key, current.revision + 1, changed).cancel

    def resign(self) -> None:
        """Stop leading (at once: the next candidate need not wait for the lease to expire)."""
        self._key.release()


class Lock:
    """A distributed lock: one holder at a time, released by `release`, or by the holder's
    death once its lease expires. Not re-entrant."""

    def __init__(self, client: EtcdClient, key: bytes, ttl: int = DEFAULT_TTL) -> None:
        self._key = LeasedKey(client, key, uuid.uuid4().hex.encode(), ttl, keep_lease=True)

    @property
    def held(self) -> bool:
        return self._key.held

    def acquire(self, timeout: float | None = None) -> bool:
        return self._key.acquire(timeout)

    def release(self) -> None:
        self._key.release()

    def close(self) -> None:
        """Release if held, and revoke the lease kept between holds."""
        self._key.close()

    def hold(self, timeout: float) -> Lock:
        """Acquire within `timeout` seconds (UnavailableError otherwise), for a `with` block."""
        if not self.acquire(timeout):
            raise UnavailableError(
                f"the lock {self._key.key!r} is held by another process for more than "
                f"{timeout:.0f} s; retry later"
            )
        return self

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def replica_leader_key(prefix: str) -> bytes:
    """The key the coordinator replicas of a store under `prefix` campaign on (the leader's
    name is its value); the one spelling for the replicas and for `hsm-domain status`."""
    return f"{prefix}/coordination/leader".encode()


def replica_lock_key(prefix: str) -> bytes:
    """The key of the lock the coordinator replicas of a store under `prefix` hold while they
    write the chain."""
    return f"{prefix}/coordination/writes".encode()
