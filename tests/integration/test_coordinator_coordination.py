"""Coordinator replicas on one etcd cluster: one writer of the chain at a time, one leader, a
new leader soon after the old one goes (domain_coordinator._coordination), against a real
3-member etcd cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.etcd import LocalEtcd, fresh_prefix

from domain_coordinator._coordination import (
    LEASE_TTL_SECONDS,
    ReplicaCoordination,
    SoleCoordination,
    WriteLock,
)
from domain_edge.etcd import EtcdClient

pytestmark = [pytest.mark.integration, pytest.mark.etcd]


@pytest.fixture
def replicas(etcd_cluster: LocalEtcd) -> Iterator[Callable[[str], ReplicaCoordination]]:
    """Factory of replicas on one fresh prefix, each with its own etcd client (as separate
    processes have); all closed at the end."""
    prefix = fresh_prefix()
    made: list[tuple[ReplicaCoordination, EtcdClient]] = []

    def make(name: str) -> ReplicaCoordination:
        client = EtcdClient(etcd_cluster.endpoints)
        replica = ReplicaCoordination(client, prefix, name)
        made.append((replica, client))
        return replica

    yield make
    for replica, client in made:
        replica.close()
        client.close()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def test_one_replica_leads_and_another_takes_over_when_it_goes(
    replicas: Callable[[str], ReplicaCoordination],
) -> None:
    group = {name: replicas(name) for name in ("coordinator-1", "coordinator-2", "coordinator-3")}
    for replica in group.values():
        replica.start()
    _wait(lambda: sum(r.is_leader for r in group.values()) == 1, 10, "one leader")
    time.sleep(0.5)  # and it stays one
    leaders = [name for name, r in group.items() if r.is_leader]
    assert len(leaders) == 1
    assert all(r.leader() == leaders[0] for r in group.values())
    # The leader resigns (a clean stop): another leads at once, not after the lease's TTL.
    group.pop(leaders[0]).close()
    took = _wait(lambda: sum(r.is_leader for r in group.values()) == 1, 5, "a new leader")
    assert took < LEASE_TTL_SECONDS
    [second] = [name for name, r in group.items() if r.is_leader]
    assert second != leaders[0]
    assert all(r.leader() == second for r in group.values())


def test_the_write_lock_admits_one_replica_at_a_time_and_is_reentrant(
    replicas: Callable[[str], ReplicaCoordination],
) -> None:
    first, second = replicas("coordinator-1"), replicas("coordinator-2")
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []
    guard = threading.Lock()

    def write(replica: ReplicaCoordination, name: str) -> None:
        for _ in range(5):
            with replica.writes, replica.writes:  # re-entrant within the thread
                with guard:
                    inside.append(name)
                    if len(inside) > 1:
                        overlaps.append(tuple(inside))
                time.sleep(0.02)
                with guard:
                    inside.remove(name)

    threads = [
        threading.Thread(target=write, args=(replica, name))
        for replica, name in ((first, "a"), (second, "b"), (first, "a2"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert overlaps == []


def test_a_replica_alone_on_its_store_always_leads_with_a_local_lock() -> None:
    sole = SoleCoordination("coordinator")
    sole.start()
    assert sole.is_leader
    assert sole.leader() == "coordinator"
    assert isinstance(sole.writes, WriteLock)
    with sole.writes, sole.writes:
        held_elsewhere = threading.Event()

        def try_lock() -> None:
            if sole.writes._local.acquire(timeout=0.1):
                held_elsewhere.set()
                sole.writes._local.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
        assert not held_elsewhere.is_set()
    sole.close()
