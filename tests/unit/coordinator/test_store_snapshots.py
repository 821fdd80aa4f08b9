"""The store's backup and restore primitives (`snapshot`, `load_snapshot`, `contents`) on every
backend (`conftest.backend`: SQLite, and a prefix of the real 3-member etcd cluster): one point
in time, streamed, never blocking writers (another store on the same backing, as a replica,
writes meanwhile); loaded only into an empty store, all or nothing, with revisions, states,
closing times and tombstones exactly as they were, and a loaded store answers every question
(counts, caps, arrival order, the sweeper's) and takes every write as the original does.

The store does not verify what it holds (the backup verifier and the coordinator do), so
opaque bytes stand for states, proposals and records here. What only etcd has (revisions,
pages, compaction, the load's batches) is in tests/integration/test_etcd_snapshots.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from support.stores import StoreBackend

from domain_coordinator.snapshots import (
    SnapshotKey,
    SnapshotState,
    StoreCounts,
    checked_items,
)
from domain_coordinator.store import AuditHeadRecord, CoordinatorStore, HsaRecord, ProposalState
from domain_core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    ResourceExhaustedError,
)

HASH = b"\xaa" * 32


def pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


def kid(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012d}"


@pytest.fixture
def source(backend: StoreBackend) -> CoordinatorStore:
    """A store with some of everything: states, proposals in every shape, live keys at
    revisions above 1, a tombstone, registrations and an audit head."""
    store = backend.open()
    for version in (1, 2, 3):
        store.append_state(version, b"state %d" % version)
    for index in (1, 2, 3):
        store.put_proposal(
            pid(index),
            b"proposal %d" % index,
            100 + index,
            10_000 + index,
            [("op-a", b"approval a %d" % index)],
            proposer="op-a",
            base_version=3,
            base_state_hash=HASH,
        )
    store.add_approval(pid(1), "op-b", b"approval b")
    store.add_cancel_vote(pid(2), "op-c", b"vote c")
    store.set_proposal_state(pid(2), ProposalState.CANCELLED, "cancelled by votes", closed_at=777)
    store.append_state_and_close_proposal(4, b"state 4", pid(3), closed_at=888)
    for index in (1, 2, 3):
        store.put_key(kid(index), b"record %d" % index, 0, creator="app")
    store.put_key(kid(1), b"record 1 v2", 1)
    store.put_key(kid(1), b"record 1 v3", 2)
    store.delete_key(kid(2), 1, 5_000)
    store.register_hsa("hsa-1", "127.0.0.1:7001", 50, 4, HASH)
    store.register_hsa("hsa-2", "127.0.0.1:7002", 60)
    store.put_audit_head(AuditHeadRecord("hsa-1", "audit.log", 9, b"checkpoint", 70), None)
    return store


@pytest.fixture
def target(backend: StoreBackend) -> CoordinatorStore:
    """An empty store of the same kind (another file, another prefix)."""
    return backend.sibling("target").open()


def all_items(store: CoordinatorStore) -> list[object]:
    with store.snapshot() as snapshot:
        return list(snapshot.items())


def test_contents_counts_every_kind(source: CoordinatorStore, target: CoordinatorStore) -> None:
    assert source.contents() == StoreCounts(
        states=4,
        proposals=3,
        approvals=4,
        cancel_votes=1,
        keys=2,
        tombstones=1,
        hsas=2,
        audit_heads=1,
    )
    assert target.contents().empty
    assert source.contents().describe().startswith("4 states, 3 proposals, 4 approvals")


def test_a_snapshot_is_one_point_in_time_and_does_not_block_writers(
    source: CoordinatorStore, backend: StoreBackend
) -> None:
    before = all_items(source)
    writer = backend.open()  # another coordinator (a replica), or a reopen
    with source.snapshot() as snapshot:
        counts = snapshot.counts
        states = snapshot.states()
        first = next(states)  # the read is under way
        # Writers go on meanwhile (they would time out if the snapshot held the lock).
        writer.append_state(5, b"state 5")
        writer.put_key(kid(9), b"record 9", 0)
        writer.put_key(kid(1), b"record 1 v4", 3)
        writer.delete_key(kid(3), 1, 6_000)
        writer.add_approval(pid(1), "op-c", b"approval c")
        writer.put_proposal(pid(7), b"proposal 7", 1, 20_000, proposer="op-b")
        writer.register_hsa("hsa-3", "127.0.0.1:7003", 80)
        rest = [first, *states, *snapshot.proposals(), *snapshot.keys()]
        rest += [*snapshot.hsas(), *snapshot.audit_heads()]
        assert snapshot.counts == counts
        assert snapshot.newest_state == b"state 4"
    assert rest == before
    assert source.contents() != counts
    assert source.latest_version() == 5


def test_a_round_trip_restores_everything_exactly(
    source: CoordinatorStore, target: CoordinatorStore
) -> None:
    with source.snapshot() as snapshot:
        loaded = target.load_snapshot(snapshot.items())
    assert loaded == source.contents()
    assert all_items(target) == all_items(source)
    # What the coordinator relies on behaves as in the source.
    assert target.get_key(kid(1)).revision == 3  # type: ignore[union-attr]
    tomb = target.deleted_key(kid(2))
    assert tomb is not None
    assert (tomb.entry.revision, tomb.deleted_at) == (2, 5_000)
    with pytest.raises(AlreadyExistsError, match="never used again"):
        target.put_key(kid(2), b"again", 0)
    assert target.count_keys("app") == 2
    applied = target.get_proposal(pid(3))
    assert applied is not None
    assert (applied.state, applied.applied_version, applied.closed_at) == ("applied", 4, 888)
    cancelled = target.get_proposal(pid(2))
    assert cancelled is not None
    assert (cancelled.closed_at, cancelled.cancel_votes) == (777, (b"vote c",))
    assert target.add_approval(pid(1), "op-b", b"again") is False  # one per operator still
    # New proposals come after the restored ones in arrival order.
    target.put_proposal(pid(9), b"proposal 9", 1, 20_000, proposer="op-z")
    newest = target.list_proposals(include_closed=True, limit=10)
    assert [p.proposal_id for p in newest] == [pid(9), pid(3), pid(2), pid(1)]
    assert target.list_hsas() == source.list_hsas()
    assert target.list_audit_heads() == source.list_audit_heads()


def test_a_store_that_holds_anything_is_refused_and_left_alone(
    source: CoordinatorStore, target: CoordinatorStore
) -> None:
    target.register_hsa("hsa-7", "127.0.0.1:7007", 1)
    with pytest.raises(FailedPreconditionError) as refused, source.snapshot() as snapshot:
        target.load_snapshot(snapshot.items())
    assert "holds 1 registered HSA" in refused.value.message
    assert "target" in refused.value.message  # the file, or the prefix
    assert target.contents() == StoreCounts(hsas=1)


def test_a_load_that_fails_half_way_leaves_the_store_empty(
    source: CoordinatorStore, target: CoordinatorStore
) -> None:
    def failing() -> Iterator[object]:
        with source.snapshot() as snapshot:
            for index, item in enumerate(snapshot.items()):
                if index == 9:  # after the states and proposals, within the keys
                    raise OSError("the backup file went away")
                yield item

    with pytest.raises(OSError, match="went away"):
        target.load_snapshot(failing())
    assert target.contents().empty
    assert target.latest_version() == 0
    with source.snapshot() as snapshot:  # and it still loads afterwards
        target.load_snapshot(snapshot.items())
    assert target.contents() == source.contents()


@pytest.mark.parametrize(
    ("items", "why"),
    [
        ([SnapshotState(2, b"s")], "state 2 where 1 was due"),
        ([SnapshotState(1, b"s"), SnapshotState(1, b"s")], "state 1 where 2 was due"),
        (
            [SnapshotKey(kid(2), b"r", 1, ""), SnapshotKey(kid(1), b"r", 1, "")],
            "out of snapshot order",
        ),
        (
            [HsaRecord("hsa-1", "a", 1), SnapshotKey(kid(1), b"r", 1, "")],
            "out of snapshot order",
        ),
        ([SnapshotKey(kid(1), b"r", 0, "")], "no record or revision"),
        ([SnapshotKey(kid(1), b"r", -1, "")], "not a stored integer"),
        (["a string"], "not a snapshot item"),
    ],
)
def test_items_out_of_order_or_malformed_are_refused(
    target: CoordinatorStore, items: list[object], why: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=why):
        target.load_snapshot(items)
    assert target.contents().empty


def test_checked_items_passes_a_snapshot_through_unchanged(source: CoordinatorStore) -> None:
    items = all_items(source)
    assert list(checked_items(items)) == items
    twice = dataclasses.replace(items[5])  # a proposal, again
    with pytest.raises(ValueError, match="out of snapshot order"):
        list(checked_items([*items[:6], twice]))


# --- a loaded store behaves as the original --------------------------------------------------

NOW = 1_000
OLD_HASH = b"\xbb" * 32


def busy(store: CoordinatorStore) -> None:
    """States, and proposals of every kind the sweeper and the caps look at: pending ones that
    are current, expired or stale (older base, other history), with 0 to 3 approvals; closed
    ones, expired or not; keys of two creators, one deleted long ago, one lately. The sweeper
    takes the oldest due ones first: by arrival, not by expiry."""
    for version in (1, 2, 3):
        store.append_state(version, b"state %d" % version)
    shapes = [
        # (proposer, expires_at, base version, base hash, approvers, closing)
        ("op-a", 10_000, 3, HASH, ["op-a"], None),
        ("op-b", 500, 3, HASH, ["op-b", "op-c"], None),  # expired by NOW
        ("op-a", 10_000, 2, HASH, ["op-a"], None),  # an older base: stale
        ("op-c", 10_000, 3, OLD_HASH, [], None),  # another history: stale
        ("op-a", 400, 3, HASH, ["op-a"], (ProposalState.CANCELLED, 450)),  # closed, expired
        ("op-b", 10_000, 3, HASH, ["op-b", "op-a", "op-c"], None),
        ("op-a", 300, 3, HASH, [], (ProposalState.EXPIRED, 350)),  # closed, expired
        ("op-c", 20_000, 3, HASH, ["op-c"], (ProposalState.REJECTED, 900)),  # closed, live
        ("", 10_000, 3, HASH, ["op-b"], None),  # no proposer (a rotation)
        ("op-c", 450, 3, HASH, ["op-c"], None),  # expired before the older one (seq order)
    ]
    for index, (proposer, expires, version, state_hash, approvers, closing) in enumerate(shapes):
        first, later = approvers[:1], approvers[1:]
        store.put_proposal(
            pid(index + 1),
            b"proposal %d" % (index + 1),
            100 + index,
            expires,
            [(op, b"approval %s %d" % (op.encode(), index + 1)) for op in first],
            proposer=proposer,
            base_version=version,
            base_state_hash=state_hash,
        )
        for op in later:
            store.add_approval(pid(index + 1), op, b"approval %s %d" % (op.encode(), index + 1))
        if closing is not None:
            store.set_proposal_state(pid(index + 1), closing[0], "closed", closed_at=closing[1])
    for index in range(1, 6):
        store.put_key(kid(index), b"record %d" % index, 0, creator="app")
    store.put_key(kid(6), b"record 6", 0, creator="other")
    store.delete_key(kid(2), 1, 200)  # long ago
    store.delete_key(kid(4), 1, 800)  # lately


def answers(store: CoordinatorStore) -> dict[str, object]:
    """Every question the coordinator asks of its store, answered."""
    found: dict[str, object] = {}
    for proposer in ("", "op-a", "op-b", "op-c"):
        for closed in (False, True):
            found[f"count {proposer} {closed}"] = store.count_proposals(closed, proposer)
    for closed in (False, True):
        found[f"list {closed}"] = store.list_proposals(closed, limit=20)
        found[f"page {closed}"] = store.list_proposals(closed, limit=2, before=6)
    for limit in (1, 2, 10):
        found[f"due {limit}"] = store.due_proposals(NOW, 3, HASH, limit)
    for at_least in (0, 1, 2, 3, 4):
        found[f"quorate {at_least}"] = store.pending_with_approvals(at_least, 10)
    found["quorate limit"] = store.pending_with_approvals(1, 2)
    for creator in ("app", "other", "nobody"):
        found[f"keys of {creator}"] = store.count_keys(creator)
    found["keys"] = store.list_keys(10)
    found["keys after"] = store.list_keys(2, kid(1))
    found["deleted"] = [store.deleted_key(kid(i)) for i in (2, 4)]
    found["states"] = (store.latest_version(), store.states_after(1, 5))
    return found


def use(store: CoordinatorStore) -> list[object]:
    """The writes whose rules rest on the derived bookkeeping, and what each said."""
    said: list[object] = []

    def attempt(what: str, call: object) -> None:
        try:
            said.append((what, call() if callable(call) else call))
        except (AlreadyExistsError, ResourceExhaustedError) as error:
            said.append((what, type(error).__name__))

    # The creator limit counts live keys only: "app" has 3, "other" 1.
    attempt("app 4th", lambda: store.put_key(kid(20), b"r", 0, creator="app", creator_limit=4))
    attempt("app 5th", lambda: store.put_key(kid(21), b"r", 0, creator="app", creator_limit=4))
    attempt("other 2nd", lambda: store.put_key(kid(22), b"r", 0, creator="other", creator_limit=2))
    attempt("tombstone id", lambda: store.put_key(kid(4), b"r", 0, creator="x"))
    # The pending caps: 7 are pending, 2 of op-a's.
    for name, caps in [
        ("all full", {"max_pending": 7}),
        ("op-a full", {"max_pending_per_proposer": 2}),
        ("room", {"max_pending": 8, "max_pending_per_proposer": 3}),
    ]:
        attempt(
            name,
            lambda caps=caps, name=name: store.put_proposal(
                pid(50 + len(said)), name.encode(), 2_000, 30_000, proposer="op-a", **caps
            ),
        )
    # op-a now stores 5; a cap of 5 purges its oldest closed, expired proposal to make room.
    attempt(
        "stored cap",
        lambda: store.put_proposal(
            pid(60), b"p60", 2_000, 30_000, proposer="op-a", max_stored_per_proposer=5, now=NOW
        ),
    )
    attempt("purged", lambda: store.get_proposal(pid(7)) is None)
    attempt("newest first", lambda: [p.proposal_id for p in store.list_proposals(limit=3)])
    attempt("approve", lambda: store.add_approval(pid(1), "op-b", b"approval b 1"))
    attempt("quorate", lambda: store.pending_with_approvals(2, 10))
    due = store.due_proposals(NOW, 3, HASH, 10)
    attempt(
        "close due",
        lambda: store.close_proposals(
            [(d.proposal_id, ProposalState.STALE, "swept") for d in due], NOW
        ),
    )
    attempt("due after", lambda: store.due_proposals(NOW, 3, HASH, 10))
    attempt("pending after", lambda: store.count_proposals())
    attempt("purge proposals", lambda: store.purge_closed_proposals(NOW + 1, NOW))
    attempt("purge keys", lambda: store.purge_deleted_keys(500))
    attempt("stored after", lambda: store.count_proposals(include_closed=True))
    attempt("counts", lambda: store.contents())
    return said


def test_a_loaded_store_answers_and_takes_writes_as_the_original(
    backend: StoreBackend,
) -> None:
    """Counts, caps, arrival order and the sweeper's questions rest on what each backend
    derives from the items (etcd: counters, a guard and indexes rebuilt by the load): the
    loaded store must answer every question, and take every write, exactly as the original."""
    original = backend.open()
    busy(original)
    loaded = backend.sibling("loaded").open()
    with original.snapshot() as snapshot:
        loaded.load_snapshot(snapshot.items())
    assert answers(loaded) == answers(original)
    assert use(loaded) == use(original)
    assert answers(loaded) == answers(original)
    assert all_items(loaded) == all_items(original)
