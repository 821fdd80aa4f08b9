"""The store's backup and restore primitives (`snapshot`, `load_snapshot`, `contents`) on
SQLite: one point in time, streamed, never blocking writers; loaded only into an empty store,
all or nothing, with revisions, states, closing times and tombstones exactly as they were.

The store does not verify what it holds (the backup verifier and the coordinator do), so
opaque bytes stand for states, proposals and records here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain_coordinator.snapshots import (
    SnapshotKey,
    SnapshotState,
    StoreCounts,
    checked_items,
)
from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import AuditHeadRecord, HsaRecord, ProposalState
from domain_core.errors import AlreadyExistsError, FailedPreconditionError

pytestmark = pytest.mark.unit

HASH = b"\xaa" * 32


def pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


def kid(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012d}"


@pytest.fixture
def source(tmp_path: Path) -> Iterator[SqliteStore]:
    """A store with some of everything: states, proposals in every shape, live keys at
    revisions above 1, a tombstone, registrations and an audit head."""
    store = SqliteStore(tmp_path / "source.db")
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
    yield store
    store.close()


@pytest.fixture
def target(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "target.db")
    yield store
    store.close()


def all_items(store: SqliteStore) -> list[object]:
    with store.snapshot() as snapshot:
        return list(snapshot.items())


def test_contents_counts_every_kind(source: SqliteStore, target: SqliteStore) -> None:
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
    source: SqliteStore,
) -> None:
    before = all_items(source)
    with source.snapshot() as snapshot:
        counts = snapshot.counts
        states = snapshot.states()
        first = next(states)  # the read is under way
        # Writers go on meanwhile (they would time out if the snapshot held the lock).
        source.append_state(5, b"state 5")
        source.put_key(kid(9), b"record 9", 0)
        source.put_key(kid(1), b"record 1 v4", 3)
        source.delete_key(kid(3), 1, 6_000)
        source.add_approval(pid(1), "op-c", b"approval c")
        rest = [first, *states, *snapshot.proposals(), *snapshot.keys()]
        rest += [*snapshot.hsas(), *snapshot.audit_heads()]
        assert snapshot.counts == counts
        assert snapshot.newest_state == b"state 4"
    assert rest == before
    assert source.contents() != counts
    assert source.latest_version() == 5


def test_a_round_trip_restores_everything_exactly(source: SqliteStore, target: SqliteStore) -> None:
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
    source: SqliteStore, target: SqliteStore
) -> None:
    target.register_hsa("hsa-7", "127.0.0.1:7007", 1)
    with pytest.raises(FailedPreconditionError) as refused, source.snapshot() as snapshot:
        target.load_snapshot(snapshot.items())
    assert "holds 1 registered HSA" in refused.value.message
    assert "target.db" in refused.value.message
    assert target.contents() == StoreCounts(hsas=1)


def test_a_load_that_fails_half_way_leaves_the_store_empty(
    source: SqliteStore, target: SqliteStore
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
    target: SqliteStore, items: list[object], why: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=why):
        target.load_snapshot(items)
    assert target.contents().empty


def test_checked_items_passes_a_snapshot_through_unchanged(source: SqliteStore) -> None:
    items = all_items(source)
    assert list(checked_items(items)) == items
    twice = dataclasses.replace(items[5])  # a proposal, again
    with pytest.raises(ValueError, match="out of snapshot order"):
        list(checked_items([*items[:6], twice]))
