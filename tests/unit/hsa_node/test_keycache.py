"""hsa_node.keycache: what a cached key carries, and how the cache re-reads a busy key.

Every key-service call decides access from `CachedKey.grants`, computed once per entry from the
entry's verified policy; an entry made from other metadata (a refreshed record, a policy
change) never carries the decisions of the one before. Past half its TTL, one call re-reads a
key while the others go on using it; past the TTL every call waits for the coordinator, and a
re-read record is verified as any other. A record is accepted only if a host of the verified
head signed it: a removed host's record is refused, also one the cache holds already.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from domain_core import access, crypto, keytokens, policy
from domain_core.errors import FailedPreconditionError, PermissionDeniedError, UnavailableError
from domain_core.signers import InMemorySigner
from domain_proto import keys_pb2
from hsa_node.keycache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    PRINCIPAL_BYTES,
    CachedKey,
    KeyCache,
)
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.keyrecords import (
    CoordinatorNotReachedError,
    CoordinatorUnreachableError,
    KeyRecordClient,
)
from hsa_node.node import DomainKeys

pytestmark = pytest.mark.unit

KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
APP = "spiffe://local/client/app"
OPS = "spiffe://local/client/ops"
HOSTS = {
    name: InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))
    for seed, name in enumerate(("hsa-1", "hsa-2", "hsa-3"), 1)
}
SIGNER = keytokens.RecordSigner("local", "hsa-1", HOSTS["hsa-1"])


def domain_keys(
    generation: int = 1,
    keys: dict[int, bytes] | None = None,
    members: tuple[str, ...] = ("hsa-1", "hsa-2", "hsa-3"),
    former: tuple[str, ...] = (),
) -> DomainKeys:
    """What `DomainNode.domain_keys` returns: the domain keys, the head's hosts, the removed."""
    return DomainKeys(
        generation=generation,
        keys=keys if keys is not None else {1: crypto.new_aes_key()},
        host_keys={name: HOSTS[name].public_key for name in members},
        former_hosts=frozenset(former),
    )


def entry(key_policy: keys_pb2.KeyPolicy) -> CachedKey:
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY_ID, policy=key_policy, current_backing_version=1, metadata_version=1
    )
    return CachedKey(
        key_id=KEY_ID,
        metadata=metadata,
        backing_keys={1: bytes(32)},
        record=keys_pb2.KeyRecord(metadata=metadata.SerializeToString(), revision=1),
        checked_at=0.0,
    )


def test_the_access_rules_are_the_policy_decisions_of_the_entry() -> None:
    cached = entry(policy.default_policy(APP))
    for operation in policy.ALL_OPERATIONS:
        cached.access.require(APP, operation, KEY_ID, {})
        with pytest.raises(PermissionDeniedError):
            cached.access.require(OPS, operation, KEY_ID, {})
    assert "access" not in repr(cached)
    assert "backing" in repr(cached)


def test_an_entry_with_other_metadata_carries_its_own_grants() -> None:
    cached = entry(policy.default_policy(APP))
    narrowed = keys_pb2.KeyMetadata()
    narrowed.CopyFrom(cached.metadata)
    narrowed.policy.CopyFrom(policy.default_policy(OPS))
    changed = replace(cached, metadata=narrowed)
    with pytest.raises(PermissionDeniedError):
        changed.access.require(APP, keys_pb2.KEY_OPERATION_ENCRYPT, KEY_ID, {})
    changed.access.require(OPS, keys_pb2.KEY_OPERATION_ENCRYPT, KEY_ID, {})
    # A refresh of the same record (what the cache does every TTL) keeps the same decisions.
    refreshed = replace(cached, checked_at=5.0)
    assert dict(refreshed.access.outright) == dict(cached.access.outright)


# --- refresh ahead of the TTL -----------------------------------------------------------------


class Clock:
    """A monotonic clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SlowCoordinator:
    """Key-record reads that can be held until the test lets them go."""

    def __init__(self, record: keys_pb2.KeyRecord) -> None:
        self.record = record
        self.reads = 0
        self.hold = threading.Event()
        self.hold.set()
        self.reading = threading.Event()

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        self.reads += 1
        self.reading.set()
        assert self.hold.wait(10.0)
        return self.record


@pytest.fixture
def sealed_record() -> tuple[keys_pb2.KeyRecord, DomainKeys]:
    keys = domain_keys()
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY_ID,
        state=keys_pb2.KEY_STATE_ENABLED,
        policy=policy.default_policy(APP),
        current_backing_version=1,
        metadata_version=1,
        domain_id="local",
    )
    record = keytokens.seal_record(
        metadata, {1: crypto.new_aes_key()}, keys.keys[1], 1, signer=SIGNER
    )
    record.revision = 1
    return record, keys


class Head:
    """The node's domain keys, which a test changes (a host removed, a generation added)."""

    def __init__(self, keys: DomainKeys) -> None:
        self.keys = keys

    def __call__(self) -> DomainKeys:
        return self.keys


def make_cache(
    tmp_path: Path, record: keys_pb2.KeyRecord, keys: DomainKeys | Head
) -> tuple[KeyCache, SlowCoordinator, Clock]:
    coordinator = SlowCoordinator(record)
    clock = Clock()
    head = keys if isinstance(keys, Head) else Head(keys)
    cache = KeyCache(
        domain_id="local",
        domain_keys=head,
        records=coordinator,  # type: ignore[arg-type]
        floor=MetadataVersionFloor(tmp_path / "floor.db"),
        signer=SIGNER,
        ttl=2.0,
        clock=clock,
    )
    return cache, coordinator, clock


def test_past_half_the_ttl_one_call_rereads_while_the_others_use_the_entry(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    cache, coordinator, clock = make_cache(tmp_path, *sealed_record)
    first = cache.get(KEY_ID)
    assert coordinator.reads == 1
    clock.now += 0.9  # under half the TTL: served as it is
    assert cache.get(KEY_ID) is first
    assert coordinator.reads == 1
    clock.now += 0.2  # past half: the next call re-reads it...
    coordinator.hold.clear()
    coordinator.reading.clear()
    with ThreadPoolExecutor(max_workers=1) as pool:
        rereading = pool.submit(cache.get, KEY_ID)
        assert coordinator.reading.wait(10.0)
        # ...and while it waits for the coordinator, other calls are served at once.
        for _ in range(3):
            assert cache.get(KEY_ID) is first
        assert coordinator.reads == 2
        coordinator.hold.set()
        refreshed = rereading.result(timeout=10.0)
    assert refreshed.checked_at == clock.now
    assert cache.get(KEY_ID) is refreshed
    assert coordinator.reads == 2


def test_an_expired_entry_still_waits_for_the_coordinator(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    cache, coordinator, clock = make_cache(tmp_path, *sealed_record)
    cache.get(KEY_ID)
    clock.now += 2.1  # past the TTL: no call is answered before the coordinator was asked
    coordinator.hold.clear()
    coordinator.reading.clear()
    with ThreadPoolExecutor(max_workers=2) as pool:
        calls = [pool.submit(cache.get, KEY_ID) for _ in range(2)]
        assert coordinator.reading.wait(10.0)
        time.sleep(0.05)
        assert not any(call.done() for call in calls)
        coordinator.hold.set()
        assert all(call.result(timeout=10.0).checked_at == clock.now for call in calls)
    assert coordinator.reads == 2  # the fill, then one read for both calls


def test_a_record_that_no_longer_verifies_is_refused_on_the_early_reread(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    record, keys = sealed_record
    cache, coordinator, clock = make_cache(tmp_path, record, keys)
    cache.get(KEY_ID)
    forged = keys_pb2.KeyRecord()
    forged.CopyFrom(record)
    metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
    metadata.policy.CopyFrom(policy.default_policy(OPS))  # the coordinator edits the policy
    forged.metadata = metadata.SerializeToString()
    coordinator.record = forged
    clock.now += 1.5
    with pytest.raises(FailedPreconditionError, match="does not verify"):
        cache.get(KEY_ID)


# --- signatures ---------------------------------------------------------------------------


def _signed_by(
    record: keys_pb2.KeyRecord, keys: DomainKeys, host: str, **changes: object
) -> keys_pb2.KeyRecord:
    """The record's key with `changes` to its metadata, sealed and signed by `host` (which
    holds the domain keys: a member, or a removed host that kept them)."""
    metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
    for name, value in changes.items():
        if isinstance(value, keys_pb2.KeyPolicy):
            metadata.policy.CopyFrom(value)
        else:
            setattr(metadata, name, value)
    backing = keytokens.verify_key_record(record, keys.keys, KEY_ID)[1]
    forged = keytokens.seal_record(
        metadata,
        backing,
        keys.keys[keys.generation],
        keys.generation,
        signer=keytokens.RecordSigner("local", host, HOSTS[host]),
    )
    forged.revision = record.revision + 1
    return forged


def test_a_record_of_another_member_is_accepted(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    record, keys = sealed_record
    cache, _coordinator, _ = make_cache(tmp_path, _signed_by(record, keys, "hsa-2"), keys)
    assert cache.get(KEY_ID).record.signer_host_id == "hsa-2"


def test_a_record_signed_by_a_removed_host_is_refused(
    tmp_path: Path,
    sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys],
    caplog: pytest.LogCaptureFixture,
) -> None:
    record, keys = sealed_record
    # hsa-3 was removed; it still holds generation 1 and writes a newer version of the key
    # that grants OPS: its tokens open, its signature is valid, but it is not a host now.
    after = domain_keys(keys=keys.keys, members=("hsa-1", "hsa-2"), former=("hsa-3",))
    widened = policy.default_policy(APP)
    widened.grants.add(principals=[OPS], operations=list(policy.ALL_OPERATIONS))
    forged = _signed_by(record, keys, "hsa-3", metadata_version=2, policy=widened)
    cache, coordinator, _ = make_cache(tmp_path, forged, after)
    with pytest.raises(FailedPreconditionError, match="does not verify"):
        cache.get(KEY_ID)
    assert "signed by hsa-3, which the domain removed" in caplog.text
    # Nor does it raise the floor: the honest version 1 still verifies afterwards.
    coordinator.record = record
    assert cache.get(KEY_ID).metadata.metadata_version == 1


def test_an_unsigned_or_badly_signed_record_is_refused(
    tmp_path: Path,
    sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys],
    caplog: pytest.LogCaptureFixture,
) -> None:
    record, keys = sealed_record
    unsigned = keys_pb2.KeyRecord()
    unsigned.CopyFrom(record)
    unsigned.signer_host_id, unsigned.signature = "", b""
    cache, coordinator, _clock = make_cache(tmp_path, unsigned, keys)
    with pytest.raises(FailedPreconditionError, match="does not verify"):
        cache.get(KEY_ID)
    assert "it is not signed" in caplog.text
    # hsa-2's name on hsa-1's signature.
    relabelled = keys_pb2.KeyRecord()
    relabelled.CopyFrom(record)
    relabelled.signer_host_id = "hsa-2"
    coordinator.record = relabelled
    with pytest.raises(FailedPreconditionError, match="does not verify"):
        cache.get(KEY_ID)
    assert "signature by host hsa-2 does not verify" in caplog.text


def test_a_signer_this_hsa_has_not_seen_yet_is_catching_up(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    # hsa-3 was added in a state this HSA has not installed: UNAVAILABLE, not accepted.
    record, keys = sealed_record
    behind = domain_keys(keys=keys.keys, members=("hsa-1", "hsa-2"))
    cache, _, _ = make_cache(tmp_path, _signed_by(record, keys, "hsa-3"), behind)
    with pytest.raises(UnavailableError, match="catching up"):
        cache.get(KEY_ID)


def test_a_cached_record_of_a_host_removed_since_is_read_again_and_refused(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    record, keys = sealed_record
    by_third = _signed_by(record, keys, "hsa-3")
    head = Head(keys)
    cache, _coordinator, clock = make_cache(tmp_path, by_third, head)
    assert cache.get(KEY_ID).record.signer_host_id == "hsa-3"
    head.keys = domain_keys(keys=keys.keys, members=("hsa-1", "hsa-2"), former=("hsa-3",))
    clock.now += 2.1  # the unchanged record comes back: its signer is no longer a host
    with pytest.raises(FailedPreconditionError, match="does not verify"):
        cache.get(KEY_ID)


def test_the_cache_signs_what_it_writes(
    tmp_path: Path, sealed_record: tuple[keys_pb2.KeyRecord, DomainKeys]
) -> None:
    record, keys = sealed_record

    class Store(SlowCoordinator):
        def put(self, stored: keys_pb2.KeyRecord, expected_revision: int) -> int:
            self.record = stored
            return expected_revision + 1

    coordinator = Store(record)
    cache = KeyCache(
        domain_id="local",
        domain_keys=lambda: keys,
        records=coordinator,  # type: ignore[arg-type]
        floor=MetadataVersionFloor(tmp_path / "floor.db"),
        signer=SIGNER,
    )
    metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
    metadata.metadata_version = 2
    cache.store(metadata, {1: crypto.new_aes_key()}, 1)
    assert coordinator.record.signer_host_id == "hsa-1"
    assert (
        keytokens.verify_key_record_signature(coordinator.record, "local", keys.host_keys)
        == "hsa-1"
    )


# --- what a failed key-record call says about the coordinator ----------------------------------


class _Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _FailingStub:
    """A coordinator stub whose every call fails with one error."""

    def __init__(self, error: grpc.RpcError) -> None:
        self._error = error

    def __getattr__(self, method: str) -> object:
        def call(request: object, timeout: float) -> object:
            raise self._error

        return call


@pytest.mark.parametrize(
    ("code", "details", "reached"),
    [
        # gRPC's own words: no connection, or the handshake refused the server.
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; refused", False),
        (grpc.StatusCode.UNAVAILABLE, "DNS resolution failed for coordinator:1", False),
        # The request may have reached the coordinator: the outcome of a write is unknown.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
        (grpc.StatusCode.INTERNAL, "failed to connect to all addresses", True),
        (grpc.StatusCode.UNAVAILABLE, "the store said: failed to connect to all addresses", True),
    ],
)
def test_only_a_request_that_never_left_says_the_coordinator_changed_nothing(
    code: grpc.StatusCode, details: str, reached: bool
) -> None:
    records = KeyRecordClient(None, "127.0.0.1:1")
    records._stub = _FailingStub(_Refused(code, details))
    with pytest.raises(CoordinatorUnreachableError) as failed:
        records.put(keys_pb2.KeyRecord(), 0)
    assert isinstance(failed.value, CoordinatorNotReachedError) is not reached


def test_without_a_coordinator_nothing_is_sent() -> None:
    with pytest.raises(CoordinatorNotReachedError, match="no coordinator is configured"):
        KeyRecordClient(None, "").put(keys_pb2.KeyRecord(), 0)


# --- the cache is bounded by bytes (issue 21, item 7) -----------------------------------------


def _maximal_policy() -> keys_pb2.KeyPolicy:
    """64 grants of 64 principals with 60-character names: 333 KB, what the review stored
    before policies were capped (records written then still exist)."""
    key_policy = policy.default_policy(APP)
    number = 0
    for _ in range(63):
        grant = key_policy.grants.add(operations=[keys_pb2.KEY_OPERATION_DESCRIBE])
        for _ in range(64):
            number += 1
            grant.principals.append(f"spiffe://local/client/{'p' * 50}{number:010d}")
    return key_policy


class Records:
    """A coordinator holding sealed records by key id; counts the reads."""

    def __init__(self) -> None:
        self.records: dict[str, keys_pb2.KeyRecord] = {}
        self.reads: list[str] = []

    def add(self, keys: DomainKeys, key_policy: keys_pb2.KeyPolicy, description: str = "") -> str:
        key_id = str(uuid.uuid4())
        metadata = keys_pb2.KeyMetadata(
            key_id=key_id,
            state=keys_pb2.KEY_STATE_ENABLED,
            description=description,
            policy=key_policy,
            current_backing_version=1,
            metadata_version=1,
            domain_id="local",
        )
        record = keytokens.seal_record(
            metadata, {1: crypto.new_aes_key()}, keys.keys[1], 1, signer=SIGNER
        )
        record.revision = 1
        self.records[key_id] = record
        return key_id

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        self.reads.append(key_id)
        return self.records.get(key_id)


def _cache(tmp_path: Path, records: Records, keys: DomainKeys, max_bytes: int) -> KeyCache:
    return KeyCache(
        domain_id="local",
        domain_keys=Head(keys),
        records=records,  # type: ignore[arg-type]
        floor=MetadataVersionFloor(tmp_path / "floor.db"),
        signer=SIGNER,
        max_bytes=max_bytes,
    )


def test_an_entrys_size_follows_what_it_holds_in_memory(tmp_path: Path) -> None:
    keys = domain_keys()
    records = Records()
    small = records.add(keys, policy.default_policy(APP))
    large = records.add(keys, _maximal_policy(), description="d" * 8192)
    cache = _cache(tmp_path, records, keys, DEFAULT_MAX_BYTES)
    small_entry, large_entry = cache.get(small), cache.get(large)
    # Measured in an HSA: about 3.6 KB for the default policy, 1.54 MB for the maximal one.
    assert 3_000 < small_entry.size < 6_000
    assert 1_400_000 < large_entry.size < 2_000_000
    assert cache.cached_bytes == small_entry.size + large_entry.size
    # The Python side of the decisions (traced; protobuf's own memory is not) is within what
    # the estimate gives the principals beside the record's bytes.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decisions = access.access_rules(large_entry.metadata).outright
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(decisions) == 1 + 63 * 64
    assert used <= PRINCIPAL_BYTES * len(decisions) + sum(len(p) for p in decisions)
    # The default budget holds the default entry cap of small keys.
    assert DEFAULT_MAX_ENTRIES * small_entry.size < DEFAULT_MAX_BYTES


def test_the_cache_is_bounded_by_bytes_not_by_entries(tmp_path: Path) -> None:
    """Issue 21 item 7: 892 keys with a maximal policy took an HSA to 2.17 GB, far below the
    cap of 100,000 entries. Whoever can create (or, before the cap, created) such keys and use
    them cannot make the cache grow past its byte budget."""
    keys = domain_keys()
    records = Records()
    large = [records.add(keys, _maximal_policy(), description="d" * 8192) for _ in range(8)]
    small = [records.add(keys, policy.default_policy(APP)) for _ in range(40)]
    probe = _cache(tmp_path / "probe", records, keys, DEFAULT_MAX_BYTES)
    large_size = probe.get(large[0]).size
    small_size = probe.get(small[0]).size
    budget = 3 * large_size + 10 * small_size
    cache = _cache(tmp_path, records, keys, budget)

    for key_id in small:  # small keys fit: nothing is dropped
        cache.get(key_id)
    assert len(cache) == 40
    for key_id in large:  # large ones push out the least recently used, by bytes
        cache.get(key_id)
        assert cache.cached_bytes <= budget
    assert len(cache) < 3 + 10
    assert cache.cached(large[-1]) is not None
    assert cache.cached(large[0]) is None
    assert cache.cached(small[0]) is None
    # A dropped key is read (and verified) again at its next use; it pushes out the oldest.
    reads = len(records.reads)
    cache.get(large[0])
    assert records.reads[reads:] == [large[0]]
    assert cache.cached_bytes <= budget
    # Forgetting and clearing give the bytes back.
    held = cache.cached_bytes
    cache.forget(large[0])
    assert cache.cached_bytes == held - large_size
    cache.mark_stale(large[-1])
    assert cache.cached_bytes == held - large_size
    cache.clear()
    assert (len(cache), cache.cached_bytes) == (0, 0)


def test_an_entry_larger_than_the_budget_is_kept_alone(tmp_path: Path) -> None:
    keys = domain_keys()
    records = Records()
    small = [records.add(keys, policy.default_policy(APP)) for _ in range(3)]
    large = records.add(keys, _maximal_policy())
    cache = _cache(tmp_path, records, keys, 100_000)
    for key_id in small:
        cache.get(key_id)
    entry = cache.get(large)
    assert entry.size > 100_000
    assert len(cache) == 1
    assert cache.cached(large) is entry
    cache.get(small[0])  # the next one pushes it out
    assert cache.cached(large) is None
    assert cache.cached_bytes <= 100_000
