"""The store contract, for every backend: CAS on versions and revisions, tombstones, the
creator limit, the HSA registry, audit heads, durability across a reopen, thread safety.

Each test runs once per backend (`conftest.backend`): SQLite as a unit test, etcd against a
real cluster. Proposals are in `test_store_contract_proposals.py`, fences and change notices in
`test_store_contract_fences.py`, replicas racing in `test_store_replicas.py`.
"""

from __future__ import annotations

import threading

import pytest
from support.stores import StoreBackend

from domain_coordinator.store import AuditHeadRecord, CoordinatorStore, ProposalState
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    ResourceExhaustedError,
)

PID = b"\x01" * 32
OTHER = b"\x02" * 32


def test_is_a_coordinator_store(store: CoordinatorStore) -> None:
    assert isinstance(store, CoordinatorStore)


def test_empty_store(store: CoordinatorStore) -> None:
    assert store.latest_version() == 0
    assert store.latest_state() is None
    assert store.get_state(1) is None
    assert store.states_after(0, 10) == []
    assert store.list_proposals(include_closed=True, limit=10) == []
    assert store.count_proposals(include_closed=True) == 0
    assert store.list_hsas() == []
    assert store.list_keys(10) == []
    assert store.list_audit_heads() == []


def test_append_is_compare_and_swap(store: CoordinatorStore) -> None:
    with pytest.raises(ConflictError, match="store is at version 0"):
        store.append_state(2, b"two")
    store.append_state(1, b"one")
    with pytest.raises(ConflictError, match="cannot store state version 1"):
        store.append_state(1, b"other one")
    store.append_state(2, b"two")
    with pytest.raises(ConflictError, match="store is at version 2"):
        store.append_state(4, b"four")
    assert store.latest_version() == 2
    assert store.latest_state() == b"two"
    assert store.get_state(1) == b"one"
    assert store.states_after(0, 10) == [b"one", b"two"]
    assert store.states_after(1, 10) == [b"two"]
    assert store.states_after(0, 1) == [b"one"]
    assert store.states_after(2, 10) == []
    assert store.states_after(0, 0) == []


@pytest.mark.parametrize("version", [0, -1, True])
def test_append_refuses_bad_versions(store: CoordinatorStore, version: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        store.append_state(version, b"x")


def test_append_and_close_is_atomic(store: CoordinatorStore) -> None:
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
    store.append_state_and_close_proposal(2, b"two", PID, closed_at=77)
    record = store.get_proposal(PID)
    assert record is not None
    assert (record.state, record.applied_version, record.closed_at) == (
        ProposalState.APPLIED,
        2,
        77,
    )
    assert store.latest_state() == b"two"
    assert not store.set_proposal_state(PID, ProposalState.STALE)
    assert store.count_proposals() == 0
    assert store.count_proposals(include_closed=True) == 1


def test_persists_across_reopen(backend: StoreBackend) -> None:
    first = backend.open()
    first.append_state(1, b"genesis")
    first.put_proposal(PID, b"p", 1, 2, [("op-a", b"a")])
    first.add_approval(PID, "op-b", b"b")
    first.add_cancel_vote(PID, "op-c", b"vote-c")
    first.append_state_and_close_proposal(2, b"two", PID)
    first.register_hsa("hsa-1", "127.0.0.1:1000", 5)
    first.put_key("k1", b"record", 0)
    first.close()
    first.close()  # closing twice is allowed
    with pytest.raises(RuntimeError, match="closed"):
        first.latest_version()

    second = backend.open()
    assert second.states_after(0, 10) == [b"genesis", b"two"]
    record = second.get_proposal(PID)
    assert record is not None
    assert record.approvals == (b"a", b"b")
    assert record.cancel_votes == (b"vote-c",)
    assert (record.state, record.applied_version) == (ProposalState.APPLIED, 2)
    assert [(h.host_id, h.address) for h in second.list_hsas()] == [("hsa-1", "127.0.0.1:1000")]
    entry = second.get_key("k1")
    assert entry is not None
    assert (entry.record, entry.revision) == (b"record", 1)


def test_two_stores_on_one_backing_share_the_cas(backend: StoreBackend) -> None:
    first, second = backend.open(), backend.open()
    first.append_state(1, b"genesis")
    with pytest.raises(ConflictError):
        second.append_state(1, b"other genesis")
    second.append_state(2, b"two")
    assert first.latest_state() == b"two"
    first.put_key("k", b"v1", 0)
    with pytest.raises(AlreadyExistsError):
        second.put_key("k", b"v1'", 0)
    assert second.put_key("k", b"v2", 1) == 2
    with pytest.raises(ConflictError):
        first.put_key("k", b"v2'", 1)


def test_concurrent_appenders_one_winner_per_version(store: CoordinatorStore) -> None:
    store.append_state(1, b"genesis")
    threads = 6
    versions = 12
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
        worker.join(timeout=60)
    assert all(not w.is_alive() for w in workers)
    assert all(len(winners) == 1 for winners in wins.values()), wins
    stored = store.states_after(1, 100)
    assert len(stored) == versions
    for version, state in zip(range(2, versions + 2), stored, strict=True):
        assert state == f"{version}-{wins[version][0]}".encode()


# --- the HSA registry ------------------------------------------------------------------------


def test_registry_replaces_address(store: CoordinatorStore) -> None:
    store.register_hsa("hsa-2", "127.0.0.1:2", 1)
    store.register_hsa("hsa-1", "127.0.0.1:1", 1)
    store.register_hsa("hsa-2", "127.0.0.1:22", 3)
    assert [(h.host_id, h.address, h.registered_at) for h in store.list_hsas()] == [
        ("hsa-1", "127.0.0.1:1", 1),
        ("hsa-2", "127.0.0.1:22", 3),
    ]


def test_registry_keeps_the_version_each_hsa_reports(store: CoordinatorStore) -> None:
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


def test_registry_orders_host_ids_as_text(store: CoordinatorStore) -> None:
    for host_id in ("hsa-b", "hsa-a/x", "hsa-a", "hsa-é", "HSA-Z"):
        store.register_hsa(host_id, "127.0.0.1:1", 1)
    assert [h.host_id for h in store.list_hsas()] == sorted(
        ["hsa-b", "hsa-a/x", "hsa-a", "hsa-é", "HSA-Z"], key=lambda s: s.encode()
    )


# --- audit heads -----------------------------------------------------------------------------


def _head(host: str, log: str, seq: int, checkpoint: bytes) -> AuditHeadRecord:
    return AuditHeadRecord(host, log, seq, checkpoint, 100 + seq)


def test_audit_heads_are_swapped_only_from_what_was_read(store: CoordinatorStore) -> None:
    first, second = _head("hsa-1", "audit.log", 3, b"three"), _head("hsa-1", "audit.log", 5, b"5")
    assert store.get_audit_head("hsa-1", "audit.log") is None
    assert store.put_audit_head(first, None)
    assert not store.put_audit_head(second, None)  # someone stored one meanwhile
    assert not store.put_audit_head(second, b"other")
    assert store.get_audit_head("hsa-1", "audit.log") == first
    assert store.put_audit_head(second, b"three")
    assert store.get_audit_head("hsa-1", "audit.log") == second
    store.put_audit_head(_head("hsa-1", "audit.log.1", 1, b"one"), None)
    store.put_audit_head(_head("hsa-0", "x", 1, b"zero"), None)
    store.put_audit_head(_head("hsa-10", "a", 1, b"ten"), None)
    assert [(h.host_id, h.log) for h in store.list_audit_heads()] == [
        ("hsa-0", "x"),
        ("hsa-1", "audit.log"),
        ("hsa-1", "audit.log.1"),
        ("hsa-10", "a"),
    ]
    assert [h.log for h in store.list_audit_heads("hsa-1")] == ["audit.log", "audit.log.1"]
    assert store.list_audit_heads("hsa-9") == []


# --- key records -----------------------------------------------------------------------------


def test_key_records_compare_and_swap(store: CoordinatorStore) -> None:
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


def test_a_deleted_key_is_a_tombstone_until_purged(store: CoordinatorStore) -> None:
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
    assert tombstone.entry.revision == 2  # the deletion is a revision of its own
    assert store.deleted_key("k2") is None
    assert store.purge_deleted_keys(1000) == 0  # deleted at 1000: not before 1000
    assert store.purge_deleted_keys(1001) == 1
    assert store.deleted_key("k1") is None
    assert store.get_key("k2") is not None


def test_creates_count_the_creators_live_keys(store: CoordinatorStore) -> None:
    for index in range(3):
        store.put_key(f"a{index}", b"r", 0, creator="app", creator_limit=3)
    store.put_key("b0", b"r", 0, creator="other", creator_limit=3)
    assert (store.count_keys("app"), store.count_keys("other")) == (3, 1)
    assert store.count_keys("nobody") == 0
    with pytest.raises(ResourceExhaustedError, match="app has created 3 keys"):
        store.put_key("a3", b"r", 0, creator="app", creator_limit=3)
    assert store.get_key("a3") is None
    store.put_key("a0", b"r2", 1, creator="app", creator_limit=3)  # updates are not creates
    store.delete_key("a1", 1, 50)  # a deleted key no longer counts
    assert store.count_keys("app") == 2
    store.put_key("a3", b"r", 0, creator="app", creator_limit=3)
    assert store.count_keys("app") == 3
    store.purge_deleted_keys(51)  # purging a tombstone changes no count
    assert store.count_keys("app") == 3


def test_list_keys_pages_by_id(store: CoordinatorStore) -> None:
    for key_id in ("c", "a", "b", "d", "a/b", "ab"):
        store.put_key(key_id, key_id.encode(), 0)
    store.delete_key("b", 1, 10)
    page = store.list_keys(2)
    assert [e.key_id for e in page] == ["a", "a/b"]
    page = store.list_keys(2, after_key_id=page[-1].key_id)
    assert [e.key_id for e in page] == ["ab", "c"]
    assert [(e.record, e.revision) for e in page] == [(b"ab", 1), (b"c", 1)]
    assert [e.key_id for e in store.list_keys(2, after_key_id="c")] == ["d"]
    assert store.list_keys(2, after_key_id="d") == []
    assert store.list_keys(0) == []
