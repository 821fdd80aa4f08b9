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
from domain_coordinator.store import CoordinatorStore, ProposalState
from domain_coordinator.store_spec import open_store
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
    assert store.list_proposals(include_closed=True, limit=10) == []
    assert store.count_proposals(include_closed=True) == 0
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
    assert [r.cancel_votes for r in store.list_proposals(limit=10)] == [
        (b"vote-c",),
        (b"vote-b", b"vote-a"),
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
    assert store.list_proposals(limit=10) == []
    assert [r.proposal_id for r in store.list_proposals(include_closed=True, limit=10)] == [PID]
    with pytest.raises(NotFoundError):
        store.set_proposal_state(OTHER, ProposalState.STALE)


def test_list_proposals_newest_first(store: SqliteStore) -> None:
    ids = [bytes([i]) * 32 for i in (5, 3, 9)]
    for i in ids:
        store.put_proposal(i, b"p", 1, 2)
    store.set_proposal_state(ids[1], ProposalState.STALE)
    assert [r.proposal_id for r in store.list_proposals(limit=10)] == [ids[2], ids[0]]
    assert [r.proposal_id for r in store.list_proposals(True, limit=10)] == ids[::-1]


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
    # Upgraded: an older coordinator (which would serve tombstones, and store proposals
    # without their proposer and base columns) refuses it.
    assert schema == "3"


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


# --- proposals: counted, paged, found and purged in the store (issue 21, item 6) ----------


def _pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


BASE = b"\xb0" * 32


def _put(
    store: SqliteStore,
    index: int,
    *,
    proposer: str = "op-a",
    expires_at: int = 10_000,
    base_version: int = 1,
    base_state_hash: bytes = BASE,
    approvals: int = 1,
    **caps: int,
) -> bool:
    return store.put_proposal(
        _pid(index),
        b"proposal %d" % index,
        1,
        expires_at,
        [(f"op-{n}", b"approval") for n in range(approvals)],
        proposer=proposer,
        base_version=base_version,
        base_state_hash=base_state_hash,
        **caps,
    )


def test_proposals_are_counted_in_the_store(store: SqliteStore) -> None:
    for index in range(5):
        _put(store, index, proposer="op-a" if index < 3 else "op-b")
    store.set_proposal_state(_pid(0), ProposalState.CANCELLED, closed_at=50)
    assert store.count_proposals() == 4
    assert store.count_proposals(include_closed=True) == 5
    assert store.count_proposals(proposer="op-a") == 2
    assert store.count_proposals(include_closed=True, proposer="op-a") == 3
    assert store.count_proposals(proposer="op-c") == 0


def test_one_proposer_cannot_fill_the_pending_cap(store: SqliteStore) -> None:
    """One operator submits until refused: their cap stops them, not everybody's."""
    caps = {"max_pending": 6, "max_pending_per_proposer": 3}
    for index in range(3):
        assert _put(store, index, proposer="mallory", **caps)
    with pytest.raises(ResourceExhaustedError, match="you have 3 pending proposals already"):
        _put(store, 3, proposer="mallory", **caps)
    assert store.get_proposal(_pid(3)) is None  # refused: nothing stored
    # The others still propose, up to the global cap ...
    for index in range(10, 13):
        assert _put(store, index, proposer=f"honest-{index}", **caps)
    with pytest.raises(ResourceExhaustedError, match="6 proposals are pending already"):
        _put(store, 20, proposer="honest-20", **caps)
    # ... and a closed proposal no longer counts against its proposer.
    store.set_proposal_state(_pid(0), ProposalState.CANCELLED)
    assert _put(store, 3, proposer="mallory", **caps)
    # A duplicate is reported as such before any cap.
    assert not _put(store, 3, proposer="mallory", **caps)


def test_proposals_are_listed_a_page_at_a_time_newest_first(store: SqliteStore) -> None:
    for index in range(7):
        _put(store, index)
    store.set_proposal_state(_pid(5), ProposalState.EXPIRED)
    pages: list[list[bytes]] = []
    before = 0
    while True:
        page = store.list_proposals(limit=2, before=before)
        if not page:
            break
        pages.append([r.proposal_id for r in page])
        before = page[-1].seq
        if len(pages) == 1:
            _put(store, 100)  # a proposal arriving meanwhile shifts nothing
    assert pages == [[_pid(6), _pid(4)], [_pid(3), _pid(2)], [_pid(1), _pid(0)]]
    everything = store.list_proposals(include_closed=True, limit=3)
    assert [r.proposal_id for r in everything] == [_pid(100), _pid(6), _pid(5)]
    record = everything[1]
    assert (record.proposer, record.base_version, record.base_state_hash) == ("op-a", 1, BASE)
    assert (everything[0].closed_at, record.closed_at) == (0, 0)
    assert everything[2].closed_at > 0
    assert store.list_proposals(limit=0) == []


def test_due_and_quorate_proposals_are_found_from_columns(store: SqliteStore) -> None:
    _put(store, 1)  # for the head, not expired, one approval
    _put(store, 2, expires_at=500)  # expired at 500
    _put(store, 3, base_version=0)  # an older version
    _put(store, 4, base_version=2)  # a version the head has not reached
    _put(store, 5, base_state_hash=b"\xcc" * 32)  # the head's version, another history
    _put(store, 6, expires_at=500, approvals=2)
    _put(store, 7, approvals=3)
    _put(store, 8, approvals=2)
    store.set_proposal_state(_pid(8), ProposalState.CANCELLED)  # closed: never due
    store.set_proposal_state(_pid(2), ProposalState.PENDING, "waiting")  # still pending
    due = store.due_proposals(600, 1, BASE, limit=10)
    assert [d.proposal_id for d in due] == [_pid(i) for i in (2, 3, 4, 5, 6)]
    assert (due[0].expires_at, due[1].base_version, due[3].base_state_hash) == (
        500,
        0,
        b"\xcc" * 32,
    )
    assert [d.proposal_id for d in store.due_proposals(600, 1, BASE, limit=2)] == [
        _pid(2),
        _pid(3),
    ]
    assert [d.proposal_id for d in store.due_proposals(400, 1, BASE, limit=10)] == [
        _pid(i) for i in (3, 4, 5)
    ]
    assert store.pending_with_approvals(2, limit=10) == [_pid(6), _pid(7)]
    assert store.pending_with_approvals(3, limit=10) == [_pid(7)]
    assert len(store.pending_with_approvals(1, limit=10)) == 7
    assert store.pending_with_approvals(1, limit=3) == [_pid(1), _pid(2), _pid(3)]


def test_close_proposals_closes_only_pending_ones_in_one_go(store: SqliteStore) -> None:
    for index in range(3):
        _put(store, index)
    store.set_proposal_state(_pid(1), ProposalState.CANCELLED, "by op-a", closed_at=5)
    closed = store.close_proposals(
        [
            (_pid(0), ProposalState.EXPIRED, "expired at x"),
            (_pid(1), ProposalState.STALE, "moved on"),
            (_pid(2), ProposalState.STALE, "moved on"),
            (_pid(9), ProposalState.STALE, "unknown"),
        ],
        closed_at=70,
    )
    assert closed == [_pid(0), _pid(2)]
    records = {r.proposal_id: r for r in store.list_proposals(True, limit=10)}
    assert (records[_pid(0)].state, records[_pid(0)].closed_at) == (ProposalState.EXPIRED, 70)
    assert (records[_pid(1)].state, records[_pid(1)].detail) == (ProposalState.CANCELLED, "by op-a")
    assert records[_pid(1)].closed_at == 5
    with pytest.raises(ValueError, match="final states"):
        store.close_proposals([(_pid(3), ProposalState.PENDING, "")], closed_at=70)


def test_closed_proposals_are_purged_after_the_retention_once_expired(
    store: SqliteStore, db_path: Path
) -> None:
    store.append_state(1, b"genesis")
    _put(store, 1, expires_at=1_000, approvals=2)  # closed at 100, expires at 1,000
    _put(store, 2, expires_at=150)  # closed at 100, expired at 150
    _put(store, 3, expires_at=150)  # pending (expired, not closed yet): never purged
    _put(store, 4, expires_at=150)  # closed later, at 400
    store.add_cancel_vote(_pid(2), "op-b", b"vote")
    store.set_proposal_state(_pid(1), ProposalState.CANCELLED, closed_at=100)
    store.set_proposal_state(_pid(2), ProposalState.STALE, closed_at=100)
    store.append_state_and_close_proposal(2, b"two", _pid(4), closed_at=400)
    # Nothing closed before 100.
    assert store.purge_closed_proposals(closed_before=100, expired_before=2_000) == 0
    # Closed before 200, expired before 200: only 2 (1 has not expired; a purged proposal
    # that had not expired could be submitted again as new).
    assert store.purge_closed_proposals(closed_before=200, expired_before=200) == 1
    assert store.get_proposal(_pid(2)) is None
    assert store.get_proposal(_pid(1)) is not None
    assert store.purge_closed_proposals(closed_before=200, expired_before=1_001) == 1
    assert store.get_proposal(_pid(1)) is None
    assert store.purge_closed_proposals(closed_before=10**9, expired_before=10**9) == 1  # 4
    assert [r.proposal_id for r in store.list_proposals(True, limit=10)] == [_pid(3)]
    with sqlite3.connect(db_path) as check:
        approvals = check.execute("SELECT COUNT(*) FROM approvals").fetchone()[0]
        votes = check.execute("SELECT COUNT(*) FROM cancel_votes").fetchone()[0]
    check.close()
    assert (approvals, votes) == (1, 0)  # only the pending proposal's approval is left
    assert store.states_after(0, 10) == [b"genesis", b"two"]  # states are never purged


def test_proposals_of_an_older_store_file_get_their_columns(db_path: Path) -> None:
    from domain_proto import domain_pb2

    def proposal(proposer: str, version: int) -> bytes:
        return domain_pb2.Proposal(
            domain_id="local",
            base_version=version,
            base_state_hash=BASE,
            proposer_id=proposer,
            created_at=1,
            expires_at=900,
        ).SerializeToString()

    first = SqliteStore(db_path)
    first.close()
    # Rows as a schema-2 coordinator wrote them: no proposer, base or closing time.
    with sqlite3.connect(db_path) as old:
        old.execute("UPDATE meta SET value = '2' WHERE name = 'schema'")
        old.executemany(
            "INSERT INTO proposals (proposal_id, proposal, state, created_at, expires_at) "
            "VALUES (?, ?, ?, 1, 900)",
            [
                (_pid(1), proposal("a" * 64, 4), "pending"),
                (_pid(2), proposal("b" * 64, 3), "applied"),
                (_pid(3), b"\xff\xff not a proposal", "pending"),
            ],
        )
    old.close()
    store = SqliteStore(db_path)
    try:
        records = {r.proposal_id: r for r in store.list_proposals(True, limit=10)}
        assert (records[_pid(1)].proposer, records[_pid(1)].base_version) == ("a" * 64, 4)
        assert (records[_pid(1)].base_state_hash, records[_pid(1)].closed_at) == (BASE, 0)
        assert (records[_pid(2)].proposer, records[_pid(2)].closed_at) == ("b" * 64, 900)
        assert records[_pid(3)].base_state_hash == b""  # unparseable: stale at the next sweep
        assert store.count_proposals(proposer="a" * 64) == 1
        assert [d.proposal_id for d in store.due_proposals(100, 4, BASE, 10)] == [_pid(3)]
    finally:
        store.close()


def test_submitting_and_cancelling_in_a_loop_cannot_grow_the_store(
    store: SqliteStore, db_path: Path
) -> None:
    """An operator who cancels each proposal and submits another keeps at most the stored cap:
    their own oldest closed, expired proposals make room; unexpired ones never go (their bytes
    could be submitted again)."""
    caps = {"max_pending_per_proposer": 2, "max_stored_per_proposer": 4}
    _put(store, 100, proposer="honest", **caps, now=10)
    for index in range(4):
        assert _put(store, index, proposer="mallory", expires_at=50, **caps, now=10)
        store.set_proposal_state(_pid(index), ProposalState.CANCELLED, closed_at=20 + index)
    store.add_cancel_vote(_pid(0), "op-b", b"vote")
    # Nothing of hers has expired at 40: she must wait.
    with pytest.raises(ResourceExhaustedError, match="you have 4 proposals at this coordinator"):
        _put(store, 4, proposer="mallory", **caps, now=40)
    assert store.get_proposal(_pid(4)) is None
    # At 60 they have: each new one purges her oldest closed one, never anyone else's.
    for index in range(4, 10):
        assert _put(store, index, proposer="mallory", expires_at=50, **caps, now=60)
        store.set_proposal_state(_pid(index), ProposalState.CANCELLED, closed_at=60 + index)
        assert store.count_proposals(include_closed=True, proposer="mallory") == 4
    kept = [r.proposal_id for r in store.list_proposals(True, limit=20) if r.proposer == "mallory"]
    assert kept == [_pid(i) for i in (9, 8, 7, 6)]
    assert store.get_proposal(_pid(100)) is not None
    with sqlite3.connect(db_path) as check:
        votes = check.execute("SELECT COUNT(*) FROM cancel_votes").fetchone()[0]
        approvals = check.execute("SELECT COUNT(*) FROM approvals").fetchone()[0]
    check.close()
    assert (votes, approvals) == (0, 5)  # the purged ones' approvals and votes went with them
    # Pending ones are never purged to make room.
    assert _put(store, 20, proposer="pending-only", expires_at=50, **caps, now=60)
    assert _put(store, 21, proposer="pending-only", expires_at=50, **caps, now=60)
    with pytest.raises(ResourceExhaustedError, match="you have 2 pending proposals already"):
        _put(store, 22, proposer="pending-only", expires_at=50, **caps, now=60)
