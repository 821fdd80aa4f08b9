"""hsa_node.keycache: key metadata floors shared with peers, and a key never served on trust.

The library-level rules behind item 4 (a revoked grant or a disabled key never comes back on
any HSA): a floor taken from a peer only ever goes up; a key this HSA holds no floor for is
accepted only after its peers were asked, and not at all when none answered; what the peers
know refuses an older record the coordinator serves. And the bookkeeping peers rely on: a
change sequence, a table epoch, cursors, one file shared by an HSA's processes, a file made
before these columns existed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from domain_core import crypto, keytokens, policy
from domain_core.errors import FailedPreconditionError, UnavailableError
from domain_core.signers import InMemorySigner
from domain_proto import keys_pb2
from hsa_node.keycache import KeyCache
from hsa_node.keyfloors import FloorChange, KeyRollbackError, MetadataVersionFloor
from hsa_node.node import DomainKeys

pytestmark = pytest.mark.unit

KEY = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
OTHER = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
APP = "spiffe://local/client/app"
H1, H2, H3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
HOST_KEY = InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(b"\x07" * 32))
SIGNER = keytokens.RecordSigner("local", "hsa-1", HOST_KEY)


@pytest.fixture
def floor(tmp_path: Path) -> MetadataVersionFloor:
    return MetadataVersionFloor(tmp_path / "key_versions.db")


def test_a_peer_floor_only_ever_raises_and_a_conflict_keeps_ours(
    floor: MetadataVersionFloor,
) -> None:
    assert floor.raise_to(KEY, 3, H3, "hsa-2") is FloorChange.RAISED
    assert floor.highest(KEY) == (3, H3)
    # Lower: a peer that missed a change (or lies low) cannot pull a floor down.
    assert floor.raise_to(KEY, 1, H1, "hsa-3") is FloorChange.LOWER
    assert floor.highest(KEY) == (3, H3)
    assert floor.raise_to(KEY, 3, H3, "hsa-3") is FloorChange.SAME
    # Same version, other hash: one record is not genuine; ours stays.
    assert floor.raise_to(KEY, 3, H2, "hsa-3") is FloorChange.CONFLICT
    assert floor.highest(KEY) == (3, H3)
    # The coordinator's older record is a rollback now, on an HSA that never read the key.
    with pytest.raises(KeyRollbackError, match="older record of key"):
        floor.admit(KEY, 2, H2)
    with pytest.raises(FailedPreconditionError, match="same metadata version 3"):
        floor.admit(KEY, 3, H1)
    floor.admit(KEY, 4, H1)
    assert floor.highest(KEY) == (4, H1)


def test_changes_are_numbered_paged_and_told_apart_by_origin(floor: MetadataVersionFloor) -> None:
    assert floor.sequence() == 0
    floor.admit(KEY, 1, H1)  # this host's own
    assert floor.raise_to(OTHER, 5, H2, "hsa-2") is FloorChange.RAISED  # taken from a peer
    floor.admit(KEY, 2, H2)
    assert floor.sequence() == 3
    entries, more = floor.changes_after(0, 10)
    assert [(e.key_id, e.metadata_version, e.seq) for e in entries] == [(OTHER, 5, 2), (KEY, 2, 3)]
    assert not more
    first, more = floor.changes_after(0, 1)
    assert [e.seq for e in first] == [2]
    assert more
    rest, more = floor.changes_after(first[-1].seq, 1)
    assert [e.seq for e in rest] == [3]
    assert not more
    # Pushes carry only what this host's processes set: a peer's floor is not echoed back.
    local, _ = floor.changes_after(0, 10, local_only=True)
    assert [e.key_id for e in local] == [KEY]
    assert [e.key_id for e in floor.floors_of([OTHER, KEY, OTHER, "nothing-here"])] == [OTHER, KEY]
    # Unchanged floors make no change.
    floor.admit(KEY, 2, H2)
    assert floor.raise_to(OTHER, 5, H2, "hsa-3") is FloorChange.SAME
    assert floor.sequence() == 3


def test_epoch_cursors_and_meta_survive_a_reopen_and_a_new_file_has_a_new_epoch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "key_versions.db"
    first = MetadataVersionFloor(path)
    epoch = first.epoch
    assert len(epoch) == 16
    assert not first.complete
    first.mark_complete()
    assert first.cursor("hsa-2") == (b"", 0)
    first.set_cursor("hsa-2", b"e" * 16, 41)
    first.set_meta({"peering": b"{}"})
    first.close()
    again = MetadataVersionFloor(path)
    assert again.epoch == epoch
    assert again.complete
    assert again.cursor("hsa-2") == (b"e" * 16, 41)
    assert again.meta("peering") == b"{}"
    assert again.meta("other") is None
    again.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    wiped = MetadataVersionFloor(path)
    assert wiped.epoch != epoch  # peers that counted in the old file start again from 0
    assert not wiped.complete  # and it vouches for nothing until it took a complete table
    assert path.stat().st_mode & 0o777 == 0o600


def test_every_process_of_an_hsa_shares_one_table(tmp_path: Path) -> None:
    """The main process and a key service worker open the same file: a floor either raised
    holds for both, and change numbers stay unique."""
    main = MetadataVersionFloor(tmp_path / "key_versions.db")
    worker = MetadataVersionFloor(tmp_path / "key_versions.db")
    assert main.epoch == worker.epoch
    worker.admit(KEY, 2, H2)
    assert main.raise_to(OTHER, 1, H1, "hsa-2") is FloorChange.RAISED
    with pytest.raises(KeyRollbackError):
        main.admit(KEY, 1, H1)
    assert worker.highest(OTHER) == (1, H1)
    assert sorted(e.seq for e in main.changes_after(0, 10)[0]) == [1, 2]


def test_a_floor_file_made_before_sequences_existed_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "key_versions.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE floors (key_id TEXT PRIMARY KEY, metadata_version INTEGER NOT NULL, "
        "metadata_hash BLOB NOT NULL);"
    )
    db.execute("INSERT INTO floors VALUES (?, 4, ?)", (KEY, H1))
    db.execute("INSERT INTO floors VALUES (?, 2, ?)", (OTHER, H2))
    db.commit()
    db.close()
    floor = MetadataVersionFloor(path)
    assert floor.highest(KEY) == (4, H1)
    assert floor.complete  # this HSA's own history from before floors were shared
    entries, _ = floor.changes_after(0, 10)
    assert [(e.key_id, e.seq) for e in entries] == [(KEY, 1), (OTHER, 2)]
    assert [e.key_id for e in floor.changes_after(0, 10, local_only=True)[0]] == [KEY, OTHER]
    floor.admit(KEY, 5, H2)
    assert floor.changes_after(2, 10)[0][0].seq == 3


# --- the cache consults the peers -----------------------------------------------------------


class Coordinator:
    """Key-record reads that return the scripted records in turn (the last one repeats)."""

    def __init__(self, *records: keys_pb2.KeyRecord) -> None:
        self.records = list(records)
        self.reads = 0

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        record = self.records[min(self.reads, len(self.records) - 1)]
        self.reads += 1
        return record


class Peers:
    """A FloorSource: what the peers would answer (a floor, nothing, or no answer at all)."""

    def __init__(self, floor: MetadataVersionFloor, known: tuple[int, bytes] | None) -> None:
        self.floor = floor
        self.known = known
        self.answering = True
        self.asked: list[list[str]] = []
        self.announced: list[tuple[str, int]] = []

    def learn(self, key_ids: Sequence[str]) -> None:
        self.asked.append(list(key_ids))
        if not self.answering:
            raise UnavailableError("no other HSA answered")
        if self.known is not None:
            self.floor.raise_to(key_ids[0], *self.known, "hsa-2")

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        self.announced.append((key_id, version))


def record(version: int, granted: str, keys: DomainKeys, backing: bytes) -> keys_pb2.KeyRecord:
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY,
        state=keys_pb2.KEY_STATE_ENABLED,
        policy=policy.default_policy(granted),
        current_backing_version=1,
        metadata_version=version,
        domain_id="local",
    )
    sealed = keytokens.seal_record(metadata, {1: backing}, keys.keys[1], 1, signer=SIGNER)
    sealed.revision = version
    return sealed


@pytest.fixture
def keys() -> DomainKeys:
    return DomainKeys(
        generation=1,
        keys={1: crypto.new_aes_key()},
        host_keys={"hsa-1": HOST_KEY.public_key},
        former_hosts=frozenset(),
    )


def cache_of(
    floor: MetadataVersionFloor, coordinator: Coordinator, peers: Peers, keys: DomainKeys
) -> KeyCache:
    return KeyCache(
        domain_id="local",
        domain_keys=lambda: keys,
        records=coordinator,  # type: ignore[arg-type]
        floor=floor,
        signer=SIGNER,
        peer_floors=peers,
    )


def test_a_key_without_a_local_floor_is_checked_against_the_peers_first(
    floor: MetadataVersionFloor, keys: DomainKeys
) -> None:
    """A fresh HSA, and a coordinator serving the record from before a grant was revoked
    (version 1 grants APP; the peers took version 2, which does not)."""
    backing = crypto.new_aes_key()
    old = record(1, APP, keys, backing)
    revoked = record(2, "spiffe://local/client/ops", keys, backing)
    peers = Peers(floor, (2, crypto.sha256(revoked.metadata)))
    cache = cache_of(floor, Coordinator(old), peers, keys)
    with pytest.raises(KeyRollbackError, match="older record of key"):
        cache.get(KEY)
    assert peers.asked == [[KEY]]
    assert cache.cached(KEY) is None
    # The honest record then serves, and the peers are not asked again (the floor is local).
    cache = cache_of(floor, Coordinator(revoked), peers, keys)
    entry = cache.get(KEY)
    assert entry.metadata.metadata_version == 2
    assert peers.asked == [[KEY]]


def test_a_key_is_not_served_when_no_peer_answered_for_it(
    floor: MetadataVersionFloor, keys: DomainKeys
) -> None:
    peers = Peers(floor, None)
    peers.answering = False
    cache = cache_of(floor, Coordinator(record(1, APP, keys, crypto.new_aes_key())), peers, keys)
    with pytest.raises(UnavailableError, match="no other HSA answered"):
        cache.get(KEY)
    assert floor.highest(KEY) is None  # nothing accepted on the coordinator's word
    peers.answering = True  # they answer now, and know no newer version
    assert cache.get(KEY).metadata.metadata_version == 1
    assert floor.highest(KEY) is not None


def test_a_rollback_refusal_reads_once_more_before_it_stands(
    floor: MetadataVersionFloor, keys: DomainKeys
) -> None:
    """An honest race: the coordinator answered before the newer record was stored, and a
    peer's push raised the floor meanwhile. The second read brings the new record."""
    backing = crypto.new_aes_key()
    first, second = record(1, APP, keys, backing), record(2, APP, keys, backing)
    floor.raise_to(KEY, 2, crypto.sha256(second.metadata), "hsa-2")
    coordinator = Coordinator(first, second)
    cache = cache_of(floor, coordinator, Peers(floor, None), keys)
    assert cache.get(KEY).metadata.metadata_version == 2
    assert coordinator.reads == 2
    # A coordinator that keeps serving the old record is refused after that one re-read.
    liar = Coordinator(first)
    with pytest.raises(KeyRollbackError):
        cache_of(floor, liar, Peers(floor, None), keys).get(KEY)
    assert liar.reads == 2


class Store(Coordinator):
    """The coordinator's put, which takes every write."""

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        self.records = [record]
        return expected_revision + 1


def test_a_change_is_announced_to_the_peers_before_it_is_acknowledged(
    floor: MetadataVersionFloor, keys: DomainKeys
) -> None:
    peers = Peers(floor, None)
    cache = cache_of(floor, Store(), peers, keys)
    backing = crypto.new_aes_key()
    metadata = keys_pb2.KeyMetadata.FromString(record(1, APP, keys, backing).metadata)
    created = cache.store(metadata, {1: backing}, 0)
    assert peers.announced == []  # a new key: nothing older to roll back to
    metadata.state = keys_pb2.KEY_STATE_DISABLED
    metadata.metadata_version = 2
    cache.store(metadata, {1: backing}, created.revision)
    assert peers.announced == [(KEY, 2)]
    assert floor.highest(KEY) is not None
