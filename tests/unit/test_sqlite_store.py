"""SqliteStore keeps the store invariants: CAS on versions and revisions, one approval per
operator, final proposal states, atomic append+close, durability across reopen, thread safety."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore, ProposalState, open_store
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
)

pytestmark = pytest.mark.unit

PID = b"\x01" * 32
OTHER = b"\x02" * 32


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_is_a_coordinator_store(store: SqliteStore) -> None:
    assert isinstance(store, CoordinatorStore)


def test_file_mode_and_pragmas(store: SqliteStore, db_path: Path) -> None:
    store.append_state(1, b"genesis")
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_empty_store(store: SqliteStore) -> None:
    assert store.latest_version() == 0
    assert store.latest_state() is None
    assert store.get_state(1) is None
    assert store.states_after(0, 10) == []
    assert store.list_proposals(include_closed=True) == []
    assert store.list_hsas() == []
    assert store.list_keys(10) == []


def test_append_is_compare_and_swap(store: SqliteStore) -> None:
    with pytest.raises(ConflictError, match="store is at version 0"):
        store.append_state(2, b"two")
    store.append_state(1, b"one")
    with pytest.raises(ConflictError, match="cannot store state version 1"):
        store.append_state(1, b"other one")
    store.append_state(2, b"two")
    with pytest.raises(ConflictError):
        store.append_state(4, b"four")
    assert store.latest_version() == 2
    assert store.latest_state() == b"two"
    assert store.get_state(1) == b"one"
    assert store.states_after(0, 10) == [b"one", b"two"]
    assert store.states_after(1, 10) == [b"two"]
    assert store.states_after(0, 1) == [b"one"]
    assert store.states_after(2, 10) == []


@pytest.mark.parametrize("version", [0, -1, True])
def test_append_refuses_bad_versions(store: SqliteStore, version: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        store.append_state(version, b"x")


def test_approvals_one_per_operator(store: SqliteStore) -> None:
    assert store.put_proposal(PID, b"proposal", 10, 20, [("op-a", b"approval-a")])
    assert not store.put_proposal(PID, b"proposal", 10, 20)
    assert store.add_approval(PID, "op-b", b"approval-b")
    assert not store.add_approval(PID, "op-b", b"another-b")
    assert not store.add_approval(PID, "op-a", b"another-a")
    record = store.get_proposal(PID)
    assert record is not None
    assert record.approvals == (b"approval-a", b"approval-b")
    assert record.state is ProposalState.PENDING
    assert (record.created_at, record.expires_at, record.proposal) == (10, 20, b"proposal")
    with pytest.raises(NotFoundError):
        store.add_approval(OTHER, "op-a", b"x")
    assert store.get_proposal(OTHER) is None


def test_cancel_votes_one_per_operator_beside_the_approvals(store: SqliteStore) -> None:
    store.put_proposal(PID, b"proposal", 10, 20, [("op-a", b"approval-a")])
    store.put_proposal(OTHER, b"other", 10, 20)
    assert store.add_cancel_vote(PID, "op-b", b"vote-b")
    assert not store.add_cancel_vote(PID, "op-b", b"another-b")
    assert store.add_cancel_vote(PID, "op-a", b"vote-a")  # approved, and votes to cancel
    assert store.add_cancel_vote(OTHER, "op-c", b"vote-c")
    record = store.get_proposal(PID)
    assert record is not None
    assert record.cancel_votes == (b"vote-b", b"vote-a")
    assert record.approvals == (b"approval-a",)
    assert [r.cancel_votes for r in store.list_proposals()] == [
        (b"vote-b", b"vote-a"),
        (b"vote-c",),
    ]
    with pytest.raises(NotFoundError):
        store.add_cancel_vote(b"\x09" * 32, "op-a", b"x")
    # Durable: a second store on the same file reads them.
    store.close()
    again = SqliteStore(store.path)
    try:
        reread = again.get_proposal(PID)
        assert reread is not None
        assert reread.cancel_votes == (b"vote-b", b"vote-a")
    finally:
        again.close()


def test_closed_states_are_final(store: SqliteStore) -> None:
    store.put_proposal(PID, b"p", 1, 2)
    assert store.set_proposal_state(PID, ProposalState.PENDING, "waiting for an HSA")
    record = store.get_proposal(PID)
    assert record is not None
    assert record.detail == "waiting for an HSA"
    assert store.set_proposal_state(PID, ProposalState.CANCELLED, "by op-a")
    assert not store.set_proposal_state(PID, ProposalState.EXPIRED)
    record = store.get_proposal(PID)
    assert record is not None
    assert (record.state, record.detail) == (ProposalState.CANCELLED, "by op-a")
    assert store.list_proposals() == []
    assert [r.proposal_id for r in store.list_proposals(include_closed=True)] == [PID]
    with pytest.raises(NotFoundError):
        store.set_proposal_state(OTHER, ProposalState.STALE)


def test_list_proposals_oldest_first(store: SqliteStore) -> None:
    ids = [bytes([i]) * 32 for i in (5, 3, 9)]
    for i in ids:
        store.put_proposal(i, b"p", 1, 2)
    store.set_proposal_state(ids[1], ProposalState.STALE)
    assert [r.proposal_id for r in store.list_proposals()] == [ids[0], ids[2]]
    assert [r.proposal_id for r in store.list_proposals(True)] == ids


def test_append_and_close_is_atomic(store: SqliteStore) -> None:
    store.append_state(1, b"genesis")
    store.put_proposal(PID, b"p", 1, 2)
    # A lost CAS changes neither the chain nor the proposal.
    with pytest.raises(ConflictError):
        store.append_state_and_close_proposal(3, b"three", PID)
    record = store.get_proposal(PID)
    assert record is not None
    assert record.state is ProposalState.PENDING
    assert store.latest_version() == 1
    # An unknown proposal stores no state.
    with pytest.raises(NotFoundError):
        store.append_state_and_close_proposal(2, b"two", OTHER)
    assert store.latest_version() == 1
    store.append_state_and_close_proposal(2, b"two", PID)
    record = store.get_proposal(PID)
    assert record is not None
    assert (record.state, record.applied_version) == (ProposalState.APPLIED, 2)
    assert store.latest_state() == b"two"
    assert not store.set_proposal_state(PID, ProposalState.STALE)


def test_persists_across_reopen(db_path: Path) -> None:
    first = SqliteStore(db_path)
    first.append_state(1, b"genesis")
    first.put_proposal(PID, b"p", 1, 2, [("op-a", b"a")])
    first.add_approval(PID, "op-b", b"b")
    first.append_state_and_close_proposal(2, b"two", PID)
    first.register_hsa("hsa-1", "127.0.0.1:1000", 5)
    first.put_key("k1", b"record", 0)
    first.close()
    with pytest.raises(RuntimeError, match="closed"):
        first.latest_version()

    second = SqliteStore(db_path)
    try:
        assert second.states_after(0, 10) == [b"genesis", b"two"]
        record = second.get_proposal(PID)
        assert record is not None
        assert record.approvals == (b"a", b"b")
        assert (record.state, record.applied_version) == (ProposalState.APPLIED, 2)
        assert [(h.host_id, h.address) for h in second.list_hsas()] == [("hsa-1", "127.0.0.1:1000")]
        entry = second.get_key("k1")
        assert entry is not None
        assert (entry.record, entry.revision) == (b"record", 1)
    finally:
        second.close()


def test_registry_replaces_address(store: SqliteStore) -> None:
    store.register_hsa("hsa-2", "127.0.0.1:2", 1)
    store.register_hsa("hsa-1", "127.0.0.1:1", 1)
    store.register_hsa("hsa-2", "127.0.0.1:22", 3)
    assert [(h.host_id, h.address, h.registered_at) for h in store.list_hsas()] == [
        ("hsa-1", "127.0.0.1:1", 1),
        ("hsa-2", "127.0.0.1:22", 3),
    ]


def test_registry_keeps_the_version_each_hsa_reports(store: SqliteStore) -> None:
    h2, h3, h4 = b"\x22" * 32, b"\x33" * 32, b"\x44" * 32
    store.register_hsa("hsa-1", "127.0.0.1:1", 10, 2, h2)
    store.register_hsa("hsa-2", "127.0.0.1:2", 10)  # an HSA that reports no version
    [one, two] = store.list_hsas()
    assert (one.version, one.state_hash, one.reported_at) == (2, h2, 10)
    assert (two.version, two.state_hash, two.reported_at) == (0, b"", 0)

    # An InstallState answer raises the version, never lowers it (a late answer to an
    # older push), and only for a registered HSA.
    assert store.record_hsa_version("hsa-1", 4, h4, 20)
    assert not store.record_hsa_version("hsa-1", 3, h3, 21)
    assert not store.record_hsa_version("hsa-9", 4, h4, 21)
    [one, _] = store.list_hsas()
    assert (one.version, one.state_hash, one.reported_at, one.registered_at) == (4, h4, 20, 10)
    assert [h.host_id for h in store.list_hsas()] == ["hsa-1", "hsa-2"]

    # The HSA's own registration is its latest word: it replaces the report, even a lower
    # version (a host restored from an older disk says so).
    store.register_hsa("hsa-1", "127.0.0.1:1", 30, 3, h3)
    [one, _] = store.list_hsas()
    assert (one.version, one.state_hash, one.reported_at, one.registered_at) == (3, h3, 30, 30)

    with pytest.raises(ValueError, match="out of range"):
        store.record_hsa_version("hsa-1", 2**63, h4, 40)
    with pytest.raises(ValueError, match="out of range"):
        store.register_hsa("hsa-1", "127.0.0.1:1", 40, -1, h4)


def test_a_store_file_without_the_reported_version_columns_is_migrated(db_path: Path) -> None:
    # The hsas table as the first coordinator releases made it, with a registered HSA.
    with sqlite3.connect(db_path) as old:
        old.executescript(
            """
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta (name, value) VALUES ('schema', '1');
            CREATE TABLE states (version INTEGER PRIMARY KEY, state BLOB NOT NULL);
            INSERT INTO states (version, state) VALUES (1, x'0102');
            CREATE TABLE hsas (
                host_id TEXT PRIMARY KEY, address TEXT NOT NULL, registered_at INTEGER NOT NULL
            );
            INSERT INTO hsas (host_id, address, registered_at) VALUES ('hsa-1', '127.0.0.1:1', 7);
            """
        )
    old.close()

    store = SqliteStore(db_path)
    try:
        assert store.latest_state() == b"\x01\x02"
        [hsa] = store.list_hsas()
        assert (hsa.host_id, hsa.address, hsa.registered_at) == ("hsa-1", "127.0.0.1:1", 7)
        assert (hsa.version, hsa.state_hash, hsa.reported_at) == (0, b"", 0)
        assert store.record_hsa_version("hsa-1", 1, b"\x11" * 32, 8)
        store.register_hsa("hsa-2", "127.0.0.1:2", 9, 1, b"\x11" * 32)
    finally:
        store.close()
    again = SqliteStore(db_path)  # finds the columns there and keeps what was written
    try:
        assert [(h.host_id, h.version, h.reported_at) for h in again.list_hsas()] == [
            ("hsa-1", 1, 8),
            ("hsa-2", 1, 9),
        ]
    finally:
        again.close()
    with sqlite3.connect(db_path) as check:
        columns = [r[1] for r in check.execute("PRAGMA table_info(hsas)")]
        schema = check.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
    check.close()
    assert columns == [
        "host_id", "address", "registered_at", "version", "state_hash", "reported_at",
    ]  # fmt: skip
    assert schema == "2"  # upgraded: an older coordinator, which would serve tombstones, refuses it


def test_key_records_compare_and_swap(store: SqliteStore) -> None:
    assert store.put_key("k1", b"v1", 0) == 1
    with pytest.raises(AlreadyExistsError):
        store.put_key("k1", b"again", 0)
    with pytest.raises(ConflictError, match="revision 1, not 7"):
        store.put_key("k1", b"v2", 7)
    assert store.put_key("k1", b"v2", 1) == 2
    with pytest.raises(ConflictError):
        store.put_key("k1", b"v3", 1)
    with pytest.raises(NotFoundError):
        store.put_key("nope", b"v", 3)
    entry = store.get_key("k1")
    assert entry is not None
    assert (entry.record, entry.revision) == (b"v2", 2)
    assert store.get_key("nope") is None


def test_a_deleted_key_is_a_tombstone_until_purged(store: SqliteStore) -> None:
    store.put_key("k1", b"v1", 0)
    store.put_key("k2", b"other", 0)
    with pytest.raises(ConflictError):
        store.delete_key("k1", 7, 1000)
    store.delete_key("k1", 1, 1000)
    # Not served, not listed, not changed, not deleted twice, its id not created again.
    assert store.get_key("k1") is None
    assert [e.key_id for e in store.list_keys(10)] == ["k2"]
    with pytest.raises(NotFoundError):
        store.put_key("k1", b"v2", 2)
    with pytest.raises(NotFoundError):
        store.delete_key("k1", 2, 1001)
    with pytest.raises(AlreadyExistsError, match="was deleted on 1970-01-01T00:16:40Z"):
        store.put_key("k1", b"again", 0)
    # Kept (recoverable) until the waiting period is over.
    tombstone = store.deleted_key("k1")
    assert tombstone is not None
    assert (tombstone.entry.record, tombstone.deleted_at) == (b"v1", 1000)
    assert store.deleted_key("k2") is None
    assert store.purge_deleted_keys(1000) == 0  # deleted at 1000: not before 1000
    assert store.purge_deleted_keys(1001) == 1
    assert store.deleted_key("k1") is None
    assert store.get_key("k2") is not None


def test_creates_count_the_creators_live_keys(store: SqliteStore) -> None:
    for index in range(3):
        store.put_key(f"a{index}", b"r", 0, creator="app", creator_limit=3)
    store.put_key("b0", b"r", 0, creator="other", creator_limit=3)
    assert (store.count_keys("app"), store.count_keys("other")) == (3, 1)
    with pytest.raises(ResourceExhaustedError, match="app has created 3 keys"):
        store.put_key("a3", b"r", 0, creator="app", creator_limit=3)
    assert store.get_key("a3") is None
    store.put_key("a0", b"r2", 1, creator="app", creator_limit=3)  # updates are not creates
    store.delete_key("a1", 1, 50)  # a deleted key no longer counts
    assert store.count_keys("app") == 2
    store.put_key("a3", b"r", 0, creator="app", creator_limit=3)


def test_list_keys_pages_by_id(store: SqliteStore) -> None:
    for key_id in ("c", "a", "b", "d"):
        store.put_key(key_id, key_id.encode(), 0)
    page = store.list_keys(2)
    assert [e.key_id for e in page] == ["a", "b"]
    page = store.list_keys(2, after_key_id=page[-1].key_id)
    assert [e.key_id for e in page] == ["c", "d"]
    assert store.list_keys(2, after_key_id="d") == []


def test_concurrent_appenders_one_winner_per_version(store: SqliteStore) -> None:
    store.append_state(1, b"genesis")
    threads = 8
    versions = 20
    wins: dict[int, list[int]] = {v: [] for v in range(2, versions + 2)}
    barrier = threading.Barrier(threads)

    def writer(index: int) -> None:
        barrier.wait()
        for version in range(2, versions + 2):
            try:
                store.append_state(version, f"{version}-{index}".encode())
            except ConflictError:
                continue
            wins[version].append(index)

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert all(not w.is_alive() for w in workers)
    assert all(len(winners) == 1 for winners in wins.values()), wins
    stored = store.states_after(1, 100)
    assert len(stored) == versions
    for version, state in zip(range(2, versions + 2), stored, strict=True):
        assert state == f"{version}-{wins[version][0]}".encode()


def test_two_stores_on_one_file_share_the_cas(db_path: Path) -> None:
    first, second = SqliteStore(db_path), SqliteStore(db_path)
    try:
        first.append_state(1, b"genesis")
        with pytest.raises(ConflictError):
            second.append_state(1, b"other genesis")
        second.append_state(2, b"two")
        assert first.latest_state() == b"two"
    finally:
        first.close()
        second.close()


def test_open_store(tmp_path: Path) -> None:
    store = open_store("sqlite:sub/c.db", tmp_path)
    try:
        assert isinstance(store, SqliteStore)
        assert (tmp_path / "sub" / "c.db").exists()
    finally:
        store.close()
    with pytest.raises(InvalidInputError, match="unknown scheme 'mysql'"):
        open_store("mysql:x", tmp_path)
    with pytest.raises(InvalidInputError, match="etcd store is not available"):
        open_store("etcd:127.0.0.1:2379", tmp_path)
    with pytest.raises(InvalidInputError, match="SCHEME:VALUE"):
        open_store("coordinator.db", tmp_path)
