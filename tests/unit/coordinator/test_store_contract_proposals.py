"""The store contract for proposals, for every backend: one approval and one vote per operator,
final states, counts and caps in the insert's transaction, pages newest first, the sweeper's
questions answered from indexes, purges that leave nothing behind."""

from __future__ import annotations

import pytest
from support.stores import StoreBackend

from domain_coordinator.store import CoordinatorStore, ProposalState
from domain_core.errors import NotFoundError, ResourceExhaustedError

PID = b"\x01" * 32
OTHER = b"\x02" * 32
BASE = b"\xb0" * 32


def _pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


def _put(
    store: CoordinatorStore,
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


def test_approvals_one_per_operator(store: CoordinatorStore) -> None:
    assert store.put_proposal(PID, b"proposal", 10, 20, [("op-a", b"approval-a")])
    assert not store.put_proposal(PID, b"proposal", 10, 20)
    assert store.add_approval(PID, "op-b", b"approval-b")
    assert not store.add_approval(PID, "op-b", b"another-b")
    assert not store.add_approval(PID, "op-a", b"another-a")
    assert store.add_approval(PID, "op/c", b"approval-c")
    record = store.get_proposal(PID)
    assert record is not None
    assert record.approvals == (b"approval-a", b"approval-b", b"approval-c")
    assert record.state is ProposalState.PENDING
    assert (record.created_at, record.expires_at, record.proposal) == (10, 20, b"proposal")
    with pytest.raises(NotFoundError):
        store.add_approval(OTHER, "op-a", b"x")
    assert store.get_proposal(OTHER) is None
    with pytest.raises(ValueError, match="two initial approvals"):
        store.put_proposal(OTHER, b"p", 1, 2, [("op-a", b"1"), ("op-a", b"2")])


def test_initial_approvals_keep_their_order(store: CoordinatorStore) -> None:
    approvals = [(f"op-{n}", b"approval %d" % n) for n in (5, 1, 9, 3)]
    store.put_proposal(PID, b"proposal", 10, 20, approvals)
    store.add_approval(PID, "op-0", b"later")
    record = store.get_proposal(PID)
    assert record is not None
    assert record.approvals == (*(a for _, a in approvals), b"later")


def test_cancel_votes_one_per_operator_beside_the_approvals(backend: StoreBackend) -> None:
    store = backend.open()
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
    # Durable: another store on the same backing reads them.
    store.close()
    reread = backend.open().get_proposal(PID)
    assert reread is not None
    assert reread.cancel_votes == (b"vote-b", b"vote-a")


def test_closed_states_are_final(store: CoordinatorStore) -> None:
    store.put_proposal(PID, b"p", 1, 2)
    assert store.set_proposal_state(PID, ProposalState.PENDING, "waiting for an HSA")
    record = store.get_proposal(PID)
    assert record is not None
    assert (record.detail, record.closed_at) == ("waiting for an HSA", 0)
    assert store.set_proposal_state(PID, ProposalState.CANCELLED, "by op-a", closed_at=9)
    assert not store.set_proposal_state(PID, ProposalState.EXPIRED)
    assert not store.set_proposal_state(PID, ProposalState.PENDING, "again")
    record = store.get_proposal(PID)
    assert record is not None
    assert (record.state, record.detail, record.closed_at) == (
        ProposalState.CANCELLED,
        "by op-a",
        9,
    )
    assert store.list_proposals(limit=10) == []
    assert [r.proposal_id for r in store.list_proposals(include_closed=True, limit=10)] == [PID]
    with pytest.raises(NotFoundError):
        store.set_proposal_state(OTHER, ProposalState.STALE)


def test_list_proposals_newest_first(store: CoordinatorStore) -> None:
    ids = [bytes([i]) * 32 for i in (5, 3, 9)]
    for i in ids:
        store.put_proposal(i, b"p", 1, 2)
    store.set_proposal_state(ids[1], ProposalState.STALE)
    assert [r.proposal_id for r in store.list_proposals(limit=10)] == [ids[2], ids[0]]
    assert [r.proposal_id for r in store.list_proposals(True, limit=10)] == ids[::-1]


def test_proposals_are_counted_in_the_store(store: CoordinatorStore) -> None:
    for index in range(5):
        _put(store, index, proposer="op-a" if index < 3 else "op-b")
    store.set_proposal_state(_pid(0), ProposalState.CANCELLED, closed_at=50)
    assert store.count_proposals() == 4
    assert store.count_proposals(include_closed=True) == 5
    assert store.count_proposals(proposer="op-a") == 2
    assert store.count_proposals(include_closed=True, proposer="op-a") == 3
    assert store.count_proposals(proposer="op-c") == 0


def test_one_proposer_cannot_fill_the_pending_cap(store: CoordinatorStore) -> None:
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


def test_proposals_are_listed_a_page_at_a_time_newest_first(store: CoordinatorStore) -> None:
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
    assert everything[0].seq > everything[1].seq > everything[2].seq > 0
    record = everything[1]
    assert (record.proposer, record.base_version, record.base_state_hash) == ("op-a", 1, BASE)
    assert (everything[0].closed_at, record.closed_at) == (0, 0)
    assert everything[2].closed_at > 0
    assert store.list_proposals(limit=0) == []


def test_due_and_quorate_proposals_are_found_from_indexes(store: CoordinatorStore) -> None:
    _put(store, 1)  # for the head, not expired, one approval
    _put(store, 2, expires_at=500)  # expired at 500
    _put(store, 3, base_version=0)  # an older version
    _put(store, 4, base_version=2)  # a version the head has not reached
    _put(store, 5, base_state_hash=b"\xcc" * 32)  # the head's version, another history
    _put(store, 6, expires_at=500, approvals=2)
    _put(store, 7, approvals=3)
    _put(store, 8, approvals=2)
    _put(store, 9, base_state_hash=b"\x01" * 32)  # another history, a hash below the head's
    store.set_proposal_state(_pid(8), ProposalState.CANCELLED)  # closed: never due
    store.set_proposal_state(_pid(2), ProposalState.PENDING, "waiting")  # still pending
    due = store.due_proposals(600, 1, BASE, limit=10)
    assert [d.proposal_id for d in due] == [_pid(i) for i in (2, 3, 4, 5, 6, 9)]
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
        _pid(i) for i in (3, 4, 5, 9)
    ]
    assert store.due_proposals(400, 1, BASE, limit=0) == []
    assert store.pending_with_approvals(2, limit=10) == [_pid(6), _pid(7)]
    assert store.pending_with_approvals(3, limit=10) == [_pid(7)]
    assert len(store.pending_with_approvals(1, limit=10)) == 8
    assert store.pending_with_approvals(1, limit=3) == [_pid(1), _pid(2), _pid(3)]
    assert store.pending_with_approvals(0, limit=0) == []
    # An approval moves a proposal up; closing it takes it out.
    store.add_approval(_pid(1), "op-7", b"approval")
    assert store.pending_with_approvals(2, limit=10) == [_pid(1), _pid(6), _pid(7)]
    store.set_proposal_state(_pid(7), ProposalState.REJECTED, "no")
    assert store.pending_with_approvals(2, limit=10) == [_pid(1), _pid(6)]


def test_close_proposals_closes_only_pending_ones_in_one_go(store: CoordinatorStore) -> None:
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
    assert store.count_proposals() == 0
    assert store.close_proposals([], closed_at=70) == []
    with pytest.raises(ValueError, match="final states"):
        store.close_proposals([(_pid(3), ProposalState.PENDING, "")], closed_at=70)


def test_many_closings_at_once(store: CoordinatorStore) -> None:
    for index in range(40):
        _put(store, index, proposer=f"op-{index % 3}", approvals=2, expires_at=100)
    closings = [(_pid(i), ProposalState.EXPIRED, "expired") for i in range(40)]
    assert store.close_proposals(closings, closed_at=200) == [_pid(i) for i in range(40)]
    assert store.count_proposals() == 0
    assert store.count_proposals(proposer="op-1") == 0
    assert store.count_proposals(include_closed=True, proposer="op-1") == 13
    assert store.due_proposals(10**6, 1, BASE, limit=100) == []
    assert store.pending_with_approvals(0, limit=100) == []
    assert store.purge_closed_proposals(closed_before=201, expired_before=101) == 40
    assert store.count_proposals(include_closed=True) == 0


def test_closed_proposals_are_purged_after_the_retention_once_expired(
    backend: StoreBackend,
) -> None:
    store = backend.open()
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
    assert store.count_proposals(include_closed=True, proposer="op-a") == 1
    # Only the pending proposal's approval is left.
    assert backend.raw_signature_count() == (1, 0)
    assert store.states_after(0, 10) == [b"genesis", b"two"]  # states are never purged


def test_submitting_and_cancelling_in_a_loop_cannot_grow_the_store(
    backend: StoreBackend,
) -> None:
    """An operator who cancels each proposal and submits another keeps at most the stored cap:
    their own oldest closed, expired proposals make room; unexpired ones never go (their bytes
    could be submitted again)."""
    store = backend.open()
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
    assert store.count_proposals(include_closed=True) == 5
    # The purged ones' approvals and votes went with them.
    assert backend.raw_signature_count() == (5, 0)
    # Pending ones are never purged to make room.
    assert _put(store, 20, proposer="pending-only", expires_at=50, **caps, now=60)
    assert _put(store, 21, proposer="pending-only", expires_at=50, **caps, now=60)
    with pytest.raises(ResourceExhaustedError, match="you have 2 pending proposals already"):
        _put(store, 22, proposer="pending-only", expires_at=50, **caps, now=60)


def test_a_closed_proposal_applied_later_is_purged_by_its_new_closing_time(
    backend: StoreBackend,
) -> None:
    """A state that carries a proposal closed meanwhile (a repair from the HSAs) marks it
    APPLIED at the state's closing time: purges then go by that time, and leave nothing."""
    store = backend.open()
    store.append_state(1, b"genesis")
    _put(store, 1, expires_at=150, approvals=2)
    store.add_cancel_vote(_pid(1), "op-9", b"vote")
    store.set_proposal_state(_pid(1), ProposalState.STALE, "moved on", closed_at=100)
    store.append_state_and_close_proposal(2, b"two", _pid(1), closed_at=500)
    record = store.get_proposal(_pid(1))
    assert record is not None
    assert (record.state, record.closed_at, record.applied_version) == (
        ProposalState.APPLIED,
        500,
        2,
    )
    assert store.purge_closed_proposals(closed_before=200, expired_before=10**6) == 0
    assert store.purge_closed_proposals(closed_before=501, expired_before=10**6) == 1
    assert store.count_proposals(include_closed=True) == 0
    assert store.count_proposals(include_closed=True, proposer="op-a") == 0
    assert backend.raw_proposal_rows() == 0


def test_purges_leave_no_row_behind(backend: StoreBackend) -> None:
    store = backend.open()
    for index in range(25):
        _put(store, index, proposer=f"op-{index % 4}", approvals=3, expires_at=100)
        store.add_cancel_vote(_pid(index), "op-x", b"vote")
    store.close_proposals([(_pid(i), ProposalState.EXPIRED, "") for i in range(25)], 150)
    assert store.purge_closed_proposals(closed_before=151, expired_before=101) == 25
    assert backend.raw_proposal_rows() == 0
    assert backend.raw_signature_count() == (0, 0)
    assert all(
        store.count_proposals(include_closed=True, proposer=f"op-{i}") == 0 for i in range(4)
    )
