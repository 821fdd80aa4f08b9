"""Two coordinator replicas on one store, racing: exactly one winner for every compare-and-swap,
and no cap passed by a race, for every backend (two SqliteStores on one file; two EtcdStores
on one prefix of a real cluster).

The attack: two replicas (or a flood of callers spread over them) submit at once, so that each
replica's count sees room for one more; with a count read outside the write's transaction,
both would store. Each test starts its callers together (a barrier) and checks that exactly
the cap, or exactly one, got through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from support.stores import StoreBackend

from domain_coordinator.store import CoordinatorStore
from domain_core.errors import AlreadyExistsError, ConflictError, ResourceExhaustedError

CALLERS = 8
BASE = b"\xb0" * 32


def _race(
    stores: list[CoordinatorStore], attempt: Callable[[CoordinatorStore, int], object]
) -> tuple[list[int], dict[int, BaseException]]:
    """Run `attempt(store, i)` for CALLERS callers at once, spread over `stores`; (the callers
    that succeeded, what the others raised)."""
    barrier = threading.Barrier(CALLERS)
    won: list[int] = []
    refused: dict[int, BaseException] = {}
    lock = threading.Lock()

    def caller(index: int) -> None:
        barrier.wait()
        try:
            outcome = attempt(stores[index % len(stores)], index)
        except (AlreadyExistsError, ConflictError, ResourceExhaustedError) as error:
            with lock:
                refused[index] = error
            return
        if outcome is not False:
            with lock:
                won.append(index)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return won, refused


def _replicas(backend: StoreBackend) -> list[CoordinatorStore]:
    return [backend.open(), backend.open()]


def test_one_state_per_version_across_replicas(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    stores[0].append_state(1, b"genesis")
    for version in range(2, 5):
        won, refused = _race(stores, lambda s, i, v=version: s.append_state(v, b"%d-%d" % (v, i)))
        assert len(won) == 1, (version, won)
        assert all(isinstance(e, ConflictError) for e in refused.values())
        assert stores[1].get_state(version) == b"%d-%d" % (version, won[0])
    assert stores[0].latest_version() == 4


def test_one_creator_cannot_pass_the_pending_cap_by_racing(backend: StoreBackend) -> None:
    stores = _replicas(backend)

    def submit(store: CoordinatorStore, index: int) -> bool:
        return store.put_proposal(
            index.to_bytes(32, "big"),
            b"proposal %d" % index,
            1,
            10_000,
            [("op-a", b"approval")],
            proposer="mallory",
            base_version=1,
            base_state_hash=BASE,
            max_pending=100,
            max_pending_per_proposer=3,
        )

    won, refused = _race(stores, submit)
    assert len(won) == 3
    assert all(isinstance(e, ResourceExhaustedError) for e in refused.values())
    assert len(refused) == CALLERS - 3
    assert stores[0].count_proposals(proposer="mallory") == 3
    assert len(stores[1].list_proposals(limit=20)) == 3
    assert len(stores[1].pending_with_approvals(1, limit=20)) == 3


def test_everybody_cannot_pass_the_global_cap_by_racing(backend: StoreBackend) -> None:
    stores = _replicas(backend)

    def submit(store: CoordinatorStore, index: int) -> bool:
        return store.put_proposal(
            index.to_bytes(32, "big"), b"p%d" % index, 1, 10_000,
            proposer=f"op-{index}", base_version=1, base_state_hash=BASE, max_pending=5,
        )  # fmt: skip

    won, _ = _race(stores, submit)
    assert len(won) == 5
    assert stores[0].count_proposals() == 5


def test_one_proposal_is_stored_once(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    won, refused = _race(
        stores, lambda s, i: s.put_proposal(b"\x07" * 32, b"same", 1, 10_000, [("op-a", b"a")])
    )
    assert len(won) == 1
    assert refused == {}  # the others were told it exists (False)
    record = stores[0].get_proposal(b"\x07" * 32)
    assert record is not None
    assert record.approvals == (b"a",)
    assert stores[1].count_proposals(include_closed=True) == 1


def test_one_approval_per_operator_and_every_operators_counted(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    pid = b"\x08" * 32
    stores[0].put_proposal(pid, b"p", 1, 10_000, base_version=1, base_state_hash=BASE)
    won, _ = _race(stores, lambda s, i: s.add_approval(pid, "op-a", b"from %d" % i))
    assert len(won) == 1
    won, _ = _race(stores, lambda s, i: s.add_approval(pid, f"op-{i}", b"%d" % i))
    assert len(won) == CALLERS  # op-0 .. op-7: one each
    record = stores[1].get_proposal(pid)
    assert record is not None
    assert len(record.approvals) == CALLERS + 1  # and op-a's
    assert stores[1].pending_with_approvals(CALLERS + 1, limit=10) == [pid]
    assert stores[1].pending_with_approvals(CALLERS + 2, limit=10) == []


def test_one_creator_cannot_pass_the_key_limit_by_racing(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    won, refused = _race(
        stores, lambda s, i: s.put_key(f"k{i}", b"r", 0, creator="app", creator_limit=3)
    )
    assert len(won) == 3
    assert all(isinstance(e, ResourceExhaustedError) for e in refused.values())
    assert stores[0].count_keys("app") == 3
    assert len(stores[1].list_keys(20)) == 3


def test_one_key_id_is_created_once(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    won, refused = _race(stores, lambda s, i: s.put_key("k", b"%d" % i, 0, creator="app"))
    assert len(won) == 1
    assert all(isinstance(e, AlreadyExistsError) for e in refused.values())
    entry = stores[1].get_key("k")
    assert entry is not None
    assert (entry.record, entry.revision) == (b"%d" % won[0], 1)
    assert stores[0].count_keys("app") == 1
    won, refused = _race(stores, lambda s, i: s.put_key("k", b"v2-%d" % i, 1))
    assert len(won) == 1
    assert all(isinstance(e, ConflictError) for e in refused.values())


def test_one_fence_change_per_revision(backend: StoreBackend) -> None:
    stores = _replicas(backend)
    won, refused = _race(stores, lambda s, i: s.set_fences(b"fence %d" % i, 0))
    assert len(won) == 1
    assert all(isinstance(e, ConflictError) for e in refused.values())
    assert stores[1].get_fences().value == b"fence %d" % won[0]


def test_a_fence_and_a_fenced_write_race(backend: StoreBackend) -> None:
    """However a fence and fenced key writes interleave, a write checked against the old
    fences is either before the fence (stored) or refused: none lands after it."""
    stores = _replicas(backend)
    stores[0].set_fences(b"none", 0)

    def attempt(store: CoordinatorStore, index: int) -> object:
        if index == 0:
            return store.set_fences(b"hsa-2 fenced", 1)
        return store.put_key(f"k{index}", b"r", 0, fences_revision=1)

    won, refused = _race(stores, attempt)
    assert 0 in won
    stored = {e.key_id for e in stores[1].list_keys(20)}
    assert stored == {f"k{i}" for i in won if i}
    assert {f"k{i}" for i in refused} & stored == set()
