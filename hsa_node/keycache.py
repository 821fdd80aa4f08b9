"""Verified customer keys on an HSA: read through from the coordinator, cached, and written.

This module is the only way the key service reads or writes key records: `KeyCache` reads them
from the coordinator (`hsa_node.keyrecords`), verifies each (`hsa_node.keyverify`, against the
version floor of `hsa_node.keyfloors`) before it holds it, keeps the verified keys in a bounded
LRU cache, and seals and signs what it writes.

Invariants:
- a backing key reaches the cache only from a record that verified end to end
  (`RecordVerifier.verify`: signed by a host of this node's verified head, the expected key
  of this domain, one opening token per backing version, not older than the key's floor);
- an entry whose record is unchanged at the coordinator is kept without verifying it again,
  but only while its signer is still a host of the head: once a host is removed, no record it
  signed is served from the cache either;
- every record this cache writes is signed by this host (`keytokens.RecordSigner`), and its
  floor is raised and announced to the peers (`FloorSource.announce`) before it is
  acknowledged; a refused rollback is read once more before it stands (a peer's push may
  overtake an honest read);
- bounded staleness: an entry is re-read from the coordinator when it is older than `ttl`
  seconds (default 2 s) at its next use. Before that, once it is older than half the TTL, one
  call at a time re-reads it while the others go on using it (still within the TTL), so the
  calls of a busy key do not all wait for the coordinator when the entry expires. While the
  coordinator cannot be reached, cached entries keep being served (the data plane survives a
  control-plane outage), so a change made through another HSA (a disabled key, a narrowed
  policy) reaches this HSA at most `ttl` seconds after the coordinator is reachable again,
  and not before. A key that is not cached cannot be served without the coordinator
  (UNAVAILABLE). A ciphertext that names a newer backing version than the cached one (a
  rotation through another HSA) makes the key be re-read at once (`get_newer`);
- writes (`store`) go to the coordinator with a compare-and-swap on the revision that was read,
  and reach the cache only once the coordinator acknowledged them (it stores durably first);
- the cache holds at most `max_entries` keys and at most `max_bytes` of them by estimate
  (`CachedKey.size`: what the record, the parsed metadata and the policy's decisions take in
  memory, about 4 KB for a key with the default policy, 1.6 MB for one with a 333 KB policy
  written before policies were capped); the least recently used are dropped first, and an
  entry larger than the whole budget is kept alone (it is in use) until the next one comes.
  It never logs or returns key material (`CachedKey.__repr__` leaves it out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from domain_core import access, keyspecs, keytokens
from domain_core.access import AccessRules
from domain_core.errors import NotFoundError, UnavailableError
from domain_edge.throttled_log import ThrottledLog
from domain_proto import keys_pb2
from hsa_node.keyfloors import (
    FloorSource,
    KeyRollbackError,
    MetadataVersionFloor,
    metadata_digest,
)
from hsa_node.keyrecords import CoordinatorUnreachableError, KeyRecordClient
from hsa_node.keyverify import RecordVerifier
from hsa_node.node import DomainKeys

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TTL_SECONDS",
    "CachedKey",
    "KeyCache",
]

log = logging.getLogger(__name__)

# A cached key is re-read with a shorter deadline: if the coordinator is slow, serve the cache.
REFRESH_DEADLINE_SECONDS: Final = 1.0
DEFAULT_TTL_SECONDS: Final = 2.0
# Past this fraction of the TTL, one call re-reads a key while the others go on using it.
REFRESH_AHEAD_FRACTION: Final = 0.5
DEFAULT_MAX_ENTRIES: Final = 100_000
# What the cache may hold, by `CachedKey.size`: 100,000 keys with the default policy fit
# (about 4 KB each), about 2,000 with the largest policy and description allowed.
DEFAULT_MAX_BYTES: Final = 512 * 1024 * 1024
# `CachedKey.size` = ENTRY_BYTES + RECORD_BYTES_FACTOR x the record's size + PRINCIPAL_BYTES per
# principal in the policy's decisions. Fitted to the resident memory of entries built in one
# process (CPython 3.11, upb protobuf): 3.6 KB with the default policy, 20 KB with an 8 KiB
# description, 164 KB with a 32 KiB policy of 400 principals, 1.54 MB with 64 grants of 64
# principals; the estimate is within 15 % of each.
ENTRY_BYTES: Final = 3 * 1024
RECORD_BYTES_FACTOR: Final = 2  # the record's bytes, and the metadata parsed from them
PRINCIPAL_BYTES: Final = 220  # a str key of the decisions, its slot, beside its name's bytes
# After the coordinator failed to answer, cached keys are served without asking it again for
# this long, so that a paused coordinator does not add its deadline to every call.
OUTAGE_HOLD_SECONDS: Final = 2.0
_FETCH_LOCKS: Final = 64


@dataclass(frozen=True)
class CachedKey:
    """A customer key whose record verified: metadata, backing keys by version, the record.

    Treat `metadata` and `record` as read-only (copy before changing them).
    """

    key_id: str
    metadata: keys_pb2.KeyMetadata
    backing_keys: Mapping[int, bytes]
    record: keys_pb2.KeyRecord
    checked_at: float
    """When (the cache's monotonic clock) the coordinator last confirmed this record."""
    access: AccessRules = field(init=False, repr=False, compare=False)
    """The decisions of the key's policy and grants (`access.access_rules`), made once per
    entry."""
    size: int = field(init=False, repr=False, compare=False)
    """What this entry takes in memory, estimated from the record and the decisions (bytes)."""
    loaded: dict[int, keyspecs.AsymmetricKey] = field(init=False, repr=False, compare=False)
    """An asymmetric key's parsed private key by backing version, filled on first use
    (`keyaccess`): parsing a DER key costs far more than using it."""

    def __post_init__(self) -> None:
        rules = access.access_rules(self.metadata)
        object.__setattr__(self, "access", rules)
        object.__setattr__(self, "loaded", {})
        object.__setattr__(
            self,
            "size",
            ENTRY_BYTES
            + RECORD_BYTES_FACTOR * self.record.ByteSize()
            + PRINCIPAL_BYTES * (len(rules.outright) + len(rules.conditional)),
        )

    @property
    def revision(self) -> int:
        """The coordinator's revision of the record, for compare-and-swap."""
        return int(self.record.revision)

    @property
    def current_version(self) -> int:
        """The backing-key version new ciphertexts use."""
        return int(self.metadata.current_backing_version)

    def __repr__(self) -> str:
        return (
            f"CachedKey({self.key_id}, metadata version {self.metadata.metadata_version}, "
            f"backing versions {sorted(self.backing_keys)}, revision {self.revision})"
        )


def _same_content(a: keys_pb2.KeyRecord, b: keys_pb2.KeyRecord) -> bool:
    """Whether two records carry the same metadata bytes, tokens, signer and signature
    (revisions aside)."""
    return (
        a.metadata == b.metadata
        and a.signer_host_id == b.signer_host_id
        and a.signature == b.signature
        and list(a.tokens) == list(b.tokens)
    )


class KeyCache:
    """Verified keys by id (LRU, bounded by entries and by bytes), read through from the
    coordinator; see the module invariants."""

    def __init__(
        self,
        *,
        domain_id: str,
        domain_keys: Callable[[], DomainKeys],
        records: KeyRecordClient,
        floor: MetadataVersionFloor,
        signer: keytokens.RecordSigner,
        peer_floors: FloorSource | None = None,
        ttl: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`peer_floors`: where to learn the floor of a key this HSA has none for before it is
        accepted (every HSA process has one; None only outside an HSA, as in benchmarks).
        `max_bytes`: the budget of the entries' estimated sizes (`CachedKey.size`)."""
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")
        if signer.domain_id != domain_id:
            raise ValueError("the record signer is for another domain")
        self._signer = signer
        self._domain_id = domain_id
        self._domain_keys = domain_keys
        self._records = records
        self._floor = floor
        self._peer_floors = peer_floors
        self._verifier = RecordVerifier(
            domain_id=domain_id, domain_keys=domain_keys, floor=floor, peer_floors=peer_floors
        )
        self._ttl = ttl
        self._hits = 0
        self._lookups = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, CachedKey] = OrderedDict()
        self._bytes = 0  # the sum of the entries' sizes
        self._lock = threading.Lock()
        self._fetch_locks = [threading.Lock() for _ in range(_FETCH_LOCKS)]
        self._outage_until = 0.0
        self._throttled = ThrottledLog(log)

    def lookups(self) -> tuple[int, int]:
        """(hits, lookups) of `get` since the start, for the metrics (approximate: unlocked)."""
        return self._hits, self._lookups

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def cached_bytes(self) -> int:
        """The estimated size of every entry held (at most `max_bytes`, unless one entry is
        larger than that on its own)."""
        with self._lock:
            return self._bytes

    @property
    def records(self) -> KeyRecordClient:
        """The coordinator's key-record calls this cache reads through."""
        return self._records

    @property
    def domain_id(self) -> str:
        """The domain whose keys this cache holds."""
        return self._domain_id

    @property
    def signer(self) -> keytokens.RecordSigner:
        """How this host signs the key records it writes (re-wrap signs with it too)."""
        return self._signer

    def domain_keys(self) -> DomainKeys:
        """The node's domain keys now (UnavailableError when it is not serving)."""
        return self._domain_keys()

    # --- the entries ---------------------------------------------------------------------

    def _peek(self, key_id: str) -> CachedKey | None:
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._entries.move_to_end(key_id)
            return entry

    def _insert(self, entry: CachedKey) -> CachedKey:
        with self._lock:
            self._put(entry)
            self._entries.move_to_end(entry.key_id)
            while len(self._entries) > 1 and (
                len(self._entries) > self._max_entries or self._bytes > self._max_bytes
            ):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size
        return entry

    def _put(self, entry: CachedKey) -> None:
        """Hold `entry` in its key's place, counting its size (the caller holds the lock)."""
        previous = self._entries.get(entry.key_id)
        if previous is not None:
            self._bytes -= previous.size
        self._entries[entry.key_id] = entry
        self._bytes += entry.size

    def is_fresh(self, key_id: str) -> bool:
        """Whether a use of `key_id` now would be served from the cache without asking the
        coordinator (cached, and younger than the refresh-ahead age). A hint for scheduling
        (`keysession`): the entry may age or go meanwhile; nothing is counted or moved."""
        entry = self._entries.get(key_id)  # one dict read: atomic, no lock needed
        if entry is None:
            return False
        return self._clock() - entry.checked_at < self._ttl * REFRESH_AHEAD_FRACTION

    def cached(self, key_id: str) -> CachedKey | None:
        """The cached entry of `key_id` as it is (however old), or None."""
        return self._peek(key_id)

    def forget(self, key_id: str) -> None:
        """Drop one key (deleted, or unknown to the coordinator)."""
        with self._lock:
            dropped = self._entries.pop(key_id, None)
            if dropped is not None:
                self._bytes -= dropped.size

    def mark_stale(self, key_id: str) -> None:
        """Make the next use of `key_id` re-read it (it changed at the coordinator), while
        keeping the entry to serve if the coordinator becomes unreachable meanwhile."""
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._put(replace(entry, checked_at=float("-inf")))

    def clear(self) -> None:
        """Drop every key (this host stopped serving)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # --- reading -------------------------------------------------------------------------

    def get(self, key_id: str, *, fresh: bool = False) -> CachedKey:
        """The verified key `key_id`: from the cache while fresh, else from the coordinator.

        With `fresh` the coordinator is always asked (writes need the current revision) and
        CoordinatorUnreachableError is raised if it does not answer. Without it, a cached key
        is served while the coordinator is unreachable. NotFoundError for a key the
        coordinator does not hold; FailedPreconditionError for a record that does not verify.
        """
        entry = self._peek(key_id)
        self._lookups += 1  # metrics only: counts may miss a few under contention
        if entry is not None and not fresh:
            age = self._clock() - entry.checked_at
            if age < self._ttl:
                self._hits += 1
                if age < self._ttl * REFRESH_AHEAD_FRACTION:
                    return entry
                return self._refresh_ahead(key_id, entry)
        with self._fetch_locks[hash(key_id) % _FETCH_LOCKS]:
            entry = self._peek(key_id)
            now = self._clock()
            if (
                entry is not None
                and not fresh
                and (now - entry.checked_at < self._ttl or now < self._outage_until)
            ):
                return entry
            return self._read(key_id, entry, fresh=fresh)

    def _refresh_ahead(self, key_id: str, entry: CachedKey) -> CachedKey:
        """Re-read a key past half its TTL, by one caller at a time, without making the others
        wait: they go on using the entry, which is still within its TTL. So the calls of a busy
        key do not all queue for the coordinator when the entry expires."""
        lock = self._fetch_locks[hash(key_id) % _FETCH_LOCKS]
        if self._clock() < self._outage_until or not lock.acquire(blocking=False):
            return entry
        try:
            current = self._peek(key_id)
            if current is not None and current is not entry:
                return current  # re-read (or changed) by another call meanwhile
            return self._read(key_id, current, fresh=False)
        finally:
            lock.release()

    def _read(self, key_id: str, entry: CachedKey | None, *, fresh: bool) -> CachedKey:
        """Read `key_id` from the coordinator (under its fetch lock) and cache it verified;
        `entry` is what the cache holds, served if the coordinator does not answer."""
        timeout = REFRESH_DEADLINE_SECONDS if entry is not None and not fresh else None
        try:
            record = self._records.get(key_id, timeout=timeout)
        except CoordinatorUnreachableError as error:
            self._outage_until = self._clock() + OUTAGE_HOLD_SECONDS
            if fresh:
                raise
            if entry is not None:
                self._throttled.warning(f"serving cached keys: {error}")
                return entry
            raise UnavailableError(
                f"key {key_id} is not cached on this HSA and the coordinator is "
                "unreachable: retry on another HSA or later"
            ) from None
        self._outage_until = 0.0
        if record is None:
            self.forget(key_id)
            raise NotFoundError(f"key {key_id} does not exist")
        if (
            entry is not None
            and _same_content(record, entry.record)
            and record.signer_host_id in self._domain_keys().host_keys
        ):
            return self._insert(replace(entry, record=record, checked_at=self._clock()))
        try:
            metadata, backing_keys = self.verify(record, key_id)
        except KeyRollbackError:
            # A peer may have raised the floor while this read was under way (an honest
            # coordinator answered before the newer record was stored): read once more.
            record = self._records.get(key_id)
            if record is None:
                self.forget(key_id)
                raise NotFoundError(f"key {key_id} does not exist") from None
            metadata, backing_keys = self.verify(record, key_id)
        return self._insert(
            CachedKey(
                key_id=key_id,
                metadata=metadata,
                backing_keys=backing_keys,
                record=record,
                checked_at=self._clock(),
            )
        )

    def get_newer(self, key_id: str, backing_version: int) -> CachedKey:
        """The key re-read from the coordinator, for a ciphertext that names a backing version
        newer than the cached one (the key was rotated through another HSA within the TTL).

        UnavailableError when the coordinator cannot be reached (the version may exist).
        """
        if self._clock() >= self._outage_until:
            try:
                return self.get(key_id, fresh=True)
            except CoordinatorUnreachableError:
                self._outage_until = self._clock() + OUTAGE_HOLD_SECONDS
        raise UnavailableError(
            f"the ciphertext names backing version {backing_version} of key {key_id}, newer "
            "than this HSA has cached, and the coordinator is unreachable: retry on another "
            "HSA or later"
        )

    def verify(
        self, record: keys_pb2.KeyRecord, key_id: str, *, remember: bool = True
    ) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
        """Verify a record of `key_id` end to end and against the version floor
        (`RecordVerifier.verify`; with `remember` the record becomes the key's floor when it is
        newer): its metadata and backing keys. FailedPreconditionError for a record that does
        not verify, UnavailableError when this node may only be behind."""
        return self._verifier.verify(record, key_id, remember=remember)

    # --- writing -------------------------------------------------------------------------

    def store(
        self,
        metadata: keys_pb2.KeyMetadata,
        backing_keys: Mapping[int, bytes],
        expected_revision: int,
    ) -> CachedKey:
        """Seal a record under the current domain key generation, sign it as this host, and put
        it at the coordinator with a compare-and-swap on `expected_revision` (0: create); cache
        it once stored.

        Raises ConflictError (the record changed meanwhile), AlreadyExistsError,
        NotFoundError (deleted meanwhile) or CoordinatorUnreachableError; nothing is cached
        then.
        """
        keys = self._domain_keys()
        record = keytokens.seal_record(
            metadata, backing_keys, keys.keys[keys.generation], keys.generation, signer=self._signer
        )
        record.revision = self._records.put(record, expected_revision)
        stored = keys_pb2.KeyMetadata.FromString(record.metadata)
        digest = metadata_digest(record)
        self._floor.admit(stored.key_id, int(stored.metadata_version), digest)
        if self._peer_floors is not None and expected_revision != 0:
            # A change (a grant revoked, a key disabled) must outlive this HSA: tell the peers
            # before acknowledging it (best effort, short deadline; gossip catches up later).
            self._peer_floors.announce(stored.key_id, int(stored.metadata_version), digest)
        return self._insert(
            CachedKey(
                key_id=stored.key_id,
                metadata=stored,
                backing_keys=dict(backing_keys),
                record=record,
                checked_at=self._clock(),
            )
        )
