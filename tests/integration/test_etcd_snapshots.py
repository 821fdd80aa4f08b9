"""What only the etcd store's snapshots and loads have, against real etcd members: every page of
a snapshot read at one revision while a second replica writes, a snapshot whose revision etcd
compacts away, and loads that stop half way (the items fail, etcd refuses a write, an answer is
lost, another writer gets in first), each of which must leave the prefix empty and keys of other
writers alone.

What both backends must do (one point in time, all or nothing, a loaded store behaving as the
original) is in tests/unit/coordinator/test_store_snapshots.py, which runs on etcd too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from support.etcd import LocalEtcd, compact, fresh_prefix
from support.stores import EtcdBackend

from domain_coordinator import _etcd_load, _etcd_snapshot
from domain_coordinator.etcd_store import EtcdStore
from domain_coordinator.snapshots import SnapshotItem, SnapshotKey, SnapshotState
from domain_coordinator.store import AuditHeadRecord, ProposalState
from domain_core.errors import ConflictError, FailedPreconditionError, LimitExceededError
from domain_edge.etcd import (
    EtcdUnavailableError,
    Operation,
    Put,
    Range,
    RangeResult,
    TxnResult,
)

pytestmark = [pytest.mark.integration, pytest.mark.etcd]

HASH = b"\xaa" * 32


def pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


def kid(index: int) -> str:
    return f"00000000-0000-4000-8000-{index:012d}"


@pytest.fixture
def backend(etcd_cluster: LocalEtcd) -> Iterator[EtcdBackend]:
    made = EtcdBackend(etcd_cluster.endpoints, fresh_prefix())
    try:
        yield made
    finally:
        made.close_all()


def fill(store: EtcdStore, *, keys: int = 12) -> None:
    """States, proposals with approvals and votes, live and deleted keys, HSAs, audit heads."""
    for version in range(1, 6):
        store.append_state(version, b"state %d" % version)
    for index in range(1, 7):
        store.put_proposal(
            pid(index),
            b"proposal %d" % index,
            100,
            10_000,
            [("op-a", b"approval a %d" % index)],
            proposer="op-a",
            base_version=5,
            base_state_hash=HASH,
        )
        store.add_approval(pid(index), "op-b", b"approval b %d" % index)
    store.add_cancel_vote(pid(2), "op-c", b"vote c")
    store.set_proposal_state(pid(2), ProposalState.CANCELLED, "votes", closed_at=500)
    for index in range(1, keys + 1):
        store.put_key(kid(2 * index), b"record %d" % index, 0, creator="app")
    for index in range(1, keys + 1, 3):
        store.delete_key(kid(2 * index), 1, 1_000 + index)
    for index in range(1, 6):
        store.register_hsa(f"hsa-{index}", f"127.0.0.1:{7000 + index}", 50, 5, HASH)
        head = AuditHeadRecord(f"hsa-{index}", "audit.log", index, b"checkpoint", 60)
        store.put_audit_head(head, None)


def items_of(store: EtcdStore) -> list[SnapshotItem]:
    with store.snapshot() as snapshot:
        return list(snapshot.items())


def test_every_page_is_read_at_the_snapshots_revision_while_a_replica_writes(
    backend: EtcdBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small pages, so that each part takes several reads; between any two items another
    replica writes into every part (also into pages not yet read). The snapshot must hold
    exactly what was there when it began, and every read after the first must be at its
    revision, a bounded page or one proposal's keys."""
    for name, size in [("STATE_PAGE", 2), ("KEY_PAGE", 3), ("PROPOSAL_PAGE", 2), ("SMALL_PAGE", 2)]:
        monkeypatch.setattr(_etcd_snapshot, name, size)
    source = backend.open()
    assert isinstance(source, EtcdStore)
    fill(source)
    before = items_of(source)
    replica = backend.open()
    writes: Iterator[Callable[[], object]] = itertools.chain(
        *(
            (
                lambda n=n: replica.append_state(6 + n, b"later state"),
                lambda n=n: replica.put_key(kid(2 * n + 3), b"between", 0, creator="app"),
                lambda n=n: replica.add_approval(pid(6 - n % 6), f"op-late-{n}", b"late"),
                lambda n=n: replica.register_hsa(f"hsa-{n}x", "127.0.0.1:9", 1),
                lambda n=n: replica.put_audit_head(
                    AuditHeadRecord(f"hsa-{n + 1}", "z.log", 1, b"later", 1), None
                ),
                lambda n=n: replica.put_proposal(pid(100 + n), b"later", 1, 9_000),
            )
            for n in range(200)
        )
    )
    reads: list[tuple[Sequence[Range], int]] = []
    original = source.client.snapshot

    def spied(requests: Sequence[Range], revision: int = 0) -> tuple[RangeResult, ...]:
        reads.append((requests, revision))
        return original(requests, revision)

    monkeypatch.setattr(source.client, "snapshot", spied)
    taken = []
    with source.snapshot() as snapshot:
        for item in snapshot.items():
            taken.append(item)
            next(writes)()
        at = snapshot.revision
    first, *pages = reads
    assert taken == before
    assert items_of(source) != before  # the replica's writes are there now
    assert first[1] == 0  # the counts and the newest state fix the revision
    assert all(revision == at for _, revision in pages)
    layout = source.layout
    paged = [r for requests, _ in pages for r in requests if r.limit]
    assert {r.limit for r in paged} <= {2, 3}
    assert sum(r.key.startswith(layout.live) for r in paged) == 3  # 8 live keys, 3 a page
    assert sum(r.key.startswith(layout.states) for r in paged) == 3  # 5 states, 2 a page
    unbounded = [r for requests, _ in pages for r in requests if not r.limit]
    assert all(r.key.startswith(layout.proposals) for r in unbounded)  # one proposal's keys


def test_a_snapshot_whose_revision_etcd_compacts_fails_and_says_take_it_again(
    etcd_factory: Callable[[int], LocalEtcd], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_etcd_snapshot, "KEY_PAGE", 2)
    cluster = etcd_factory(1)  # compaction reaches every prefix: a cluster of its own
    store = EtcdStore.open(cluster.endpoints, fresh_prefix())
    try:
        fill(store, keys=6)
        with store.snapshot() as snapshot:
            keys = snapshot.keys()
            next(keys)  # the first page is read
            store.put_key(kid(99), b"later", 0)
            compact(cluster.endpoints, store.client.range(Range(b"x")).revision)
            with pytest.raises(ConflictError) as failed:
                list(keys)
        assert f"past revision {snapshot.revision}" in failed.value.message
        assert "take the backup (or the migration) again" in failed.value.message
        with store.snapshot() as again:  # a new snapshot reads at a revision etcd keeps
            assert len(list(again.keys())) == 7
    finally:
        store.close()


# --- loads that stop half way -------------------------------------------------------------------


def many_items(keys: int) -> list[SnapshotItem]:
    """Three states and `keys` live key records: several transactions' worth."""
    items: list[SnapshotItem] = [SnapshotState(v, b"state %d" % v) for v in (1, 2, 3)]
    items += [SnapshotKey(kid(i), b"record %d" % i, 1, "app") for i in range(keys)]
    return items


class TxnSpy:
    """Counts the load's transactions on `store`, and can interfere with the `nth`."""

    def __init__(self, store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.original = store.client.txn
        self.applied = 0
        self.meddle: Callable[[int, Callable[[], TxnResult]], TxnResult] | None = None
        monkeypatch.setattr(store.client, "txn", self.txn)

    def txn(
        self,
        compare: Sequence[Any],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
        *,
        retry_safe: bool = False,
    ) -> TxnResult:
        def send() -> TxnResult:
            return self.original(compare, success, failure, retry_safe=retry_safe)

        loading = any(isinstance(op, Put) and op.key.endswith(b"/load") for op in success)
        if not loading:
            return send()
        self.applied += 1
        return self.meddle(self.applied, send) if self.meddle else send()


def test_a_load_whose_items_fail_after_several_transactions_leaves_the_prefix_empty(
    backend: EtcdBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = backend.open()
    assert isinstance(target, EtcdStore)
    spy = TxnSpy(target, monkeypatch)

    def failing() -> Iterator[SnapshotItem]:
        for index, item in enumerate(many_items(400)):
            if index == 300:
                raise OSError("the backup file went away")
            yield item

    with pytest.raises(OSError, match="went away"):
        target.load_snapshot(failing())
    assert spy.applied >= 2  # two transactions were committed before the failure
    assert backend.raw_keys() == []
    assert target.contents().empty
    loaded = target.load_snapshot(many_items(400))  # no marker left: it loads now
    assert (loaded.states, loaded.keys) == (3, 400)
    assert target.count_keys("app") == 400


def test_a_load_that_etcd_refuses_half_way_leaves_the_prefix_empty(
    backend: EtcdBackend,
) -> None:
    """A record larger than etcd's request limit (10 MiB on these members), after 250 that
    were written: etcd refuses the transaction that holds it."""
    target = backend.open()
    huge = SnapshotKey(kid(999_999), b"\0" * (11 * 1024 * 1024), 1, "app")
    with pytest.raises(LimitExceededError, match="too large"):
        target.load_snapshot([*many_items(250), huge])
    assert backend.raw_keys() == []


def test_a_transaction_whose_answer_was_lost_is_recognised(
    backend: EtcdBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second transaction is applied but its answer is lost: sent again, its comparison
    fails (the marker moved on); the load must see from the marker that it was its own."""
    target = backend.open()
    assert isinstance(target, EtcdStore)
    spy = TxnSpy(target, monkeypatch)

    def lost_answer(nth: int, send: Callable[[], TxnResult]) -> TxnResult:
        if nth != 2:
            return send()
        send()  # applied; then the client resends it after a lost answer
        again = send()
        assert not again.succeeded
        return TxnResult(again.succeeded, again.results, again.revision, uncertain=True)

    spy.meddle = lost_answer
    target.load_snapshot(many_items(300))
    assert items_of(target) == many_items(300)
    assert target.count_keys("app") == 300
    assert not [k for k in backend.raw_keys() if k.endswith(b"/load")]


def test_a_failed_transaction_that_was_applied_is_removed_too(
    backend: EtcdBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second transaction is applied, then etcd stops answering: the load fails without
    knowing that transaction's revision; the marker it moved must tell the cleanup."""
    target = backend.open()
    assert isinstance(target, EtcdStore)
    spy = TxnSpy(target, monkeypatch)

    def applied_then_unavailable(nth: int, send: Callable[[], TxnResult]) -> TxnResult:
        result = send()
        if nth == 2:
            raise EtcdUnavailableError("etcd did not answer (test)", maybe_applied=True)
        return result

    spy.meddle = applied_then_unavailable
    with pytest.raises(EtcdUnavailableError):
        target.load_snapshot(many_items(300))
    assert backend.raw_keys() == []


def test_a_writer_that_gets_in_after_the_check_stops_the_load_and_keeps_its_keys(
    backend: EtcdBackend,
) -> None:
    """The load checked that the prefix is empty; then a coordinator on the same prefix
    registers an HSA before the load's first write. The first transaction compares the
    whole prefix: nothing is loaded, and the other writer's key stays."""
    target = backend.open()
    replica = backend.open()

    def items() -> Iterator[SnapshotItem]:
        replica.register_hsa("hsa-9", "127.0.0.1:9009", 1)
        yield from many_items(5)

    with pytest.raises(FailedPreconditionError, match="after the load checked"):
        target.load_snapshot(items())
    assert [h.host_id for h in target.list_hsas()] == ["hsa-9"]
    assert target.contents().states == 0
    assert len(backend.raw_keys()) == 1


def test_a_prefix_with_bookkeeping_or_an_unfinished_load_is_refused(
    backend: EtcdBackend, etcd_cluster: LocalEtcd
) -> None:
    target = backend.open()
    assert isinstance(target, EtcdStore)
    target.set_fences(b"a fence", 0)  # no item, but not empty
    with pytest.raises(FailedPreconditionError, match="2 keys of the store's own bookkeeping"):
        target.load_snapshot(many_items(1))
    assert len(backend.raw_keys()) == 2
    other = EtcdStore.open(etcd_cluster.endpoints, fresh_prefix())
    try:
        other.client.put(other.layout.load_marker, b'{"batch":3,"load":"x"}\0')  # a crash's
        with pytest.raises(FailedPreconditionError, match="a load that did not finish"):
            other.load_snapshot(many_items(1))
    finally:
        other.close()


def test_load_batches_stay_within_etcds_default_limits(backend: EtcdBackend) -> None:
    """At most 128 operations per transaction (etcd's default --max-txn-ops), and one pending
    proposal's index entries per transaction (the sweeper reads them by creation revision)."""
    assert _etcd_load.TXN_OPS + 1 <= 128
    source = backend.open()
    for index in range(1, 4):
        source.put_proposal(pid(index), b"p", 1, 9_000, proposer="op-a")
    target = backend.sibling("target").open()
    assert isinstance(target, EtcdStore)
    with source.snapshot() as snapshot:
        target.load_snapshot(snapshot.items())
    found = target.client.range(Range.prefix(target.layout.proposals + b"pending/"))
    assert len({kv.create_revision for kv in found.kvs}) == 3
