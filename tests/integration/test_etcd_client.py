"""The synchronous etcd client (`domain_edge.etcd`) against real clusters: reads and
transactions, failover past a killed or paused member, writes sent again only when safe,
watches that survive a member, leases, the election and the lock, member status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.etcd import LocalEtcd, fresh_prefix

from deploy.etcd import wait_healthy
from domain_edge.etcd import (
    Compare,
    Election,
    EtcdClient,
    EtcdUnavailableError,
    Lock,
    Put,
    Range,
    SortBy,
    WatchBatch,
    WatchEvent,
    cluster_status,
    grant_lease,
    members,
    watch_prefix,
)
from domain_edge.etcd import _election as election

pytestmark = [pytest.mark.integration, pytest.mark.etcd]


@pytest.fixture
def client(etcd_cluster: LocalEtcd) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_cluster.endpoints) as made:
        yield made


@pytest.fixture
def prefix() -> bytes:
    return fresh_prefix().encode() + b"/"


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def test_reads_and_transactions(client: EtcdClient, prefix: bytes) -> None:
    for index in range(5):
        key = prefix + b"%d" % index
        assert client.txn([Compare.absent(key)], [Put(key, b"v%d" % index)]).succeeded
    one = prefix + b"1"
    lost = client.txn([Compare.absent(one)], [Put(one, b"x")], [Range(one)])
    assert not lost.succeeded
    assert lost.results[0].kvs[0].value == b"v1"  # type: ignore[union-attr]
    newest = client.range(Range.prefix(prefix, limit=2, descending=True))
    assert [kv.key[-1:] for kv in newest.kvs] == [b"4", b"3"]
    assert (newest.count, newest.more) == (5, True)
    assert client.range(Range.prefix(prefix, count_only=True)).count == 5
    by_creation = client.range(Range.prefix(prefix, sort_by=SortBy.CREATE, limit=1))
    assert by_creation.kvs[0].value == b"v0"
    before = client.range(Range(one)).revision  # the store's revision now
    client.put(prefix + b"0", b"changed")
    reads = [Range(prefix + b"0"), Range(one)]
    then, other = client.snapshot(reads, revision=before)
    assert (then.kvs[0].value, other.kvs[0].value) == (b"v0", b"v1")
    assert client.snapshot([Range(prefix + b"0")])[0].kvs[0].value == b"changed"
    assert client.delete(prefix + b"0") == 1
    assert client.get(prefix + b"0") is None


def test_a_killed_member_is_passed_over(etcd_factory: Callable[[int], LocalEtcd]) -> None:
    local = etcd_factory(3)
    with EtcdClient(local.endpoints, timeout=10) as client:
        client.put(b"k", b"before")
        local.kill(0)  # the member the client talked to (perhaps the leader)
        wait_healthy(local.processes[1:])  # a plain write during an election may be refused
        client.put(b"k", b"after")  # no connection to it: sent to the next one
        assert client.get(b"k").value == b"after"  # type: ignore[union-attr]
        local.kill(1)
        local.kill(2)
        began = time.monotonic()
        with pytest.raises(EtcdUnavailableError) as refused:
            client.txn([], [Put(b"k", b"lost")])
        assert time.monotonic() - began < 12  # bounded by the client's timeout
        assert not refused.value.maybe_applied  # nothing reached a member: nothing changed
        for endpoint in local.endpoints:
            assert endpoint in str(refused.value)


def test_a_silent_member_only_delays_what_is_safe_to_resend(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(3)
    with EtcdClient(local.endpoints, timeout=10, attempt_timeout=1.0) as client:
        client.put(b"k", b"1")
        local.pause(0)
        try:
            # A plain write may have reached the paused member: not sent again.
            with pytest.raises(EtcdUnavailableError) as unknown:
                client.put(b"k", b"2")
            assert unknown.value.maybe_applied
            assert "may or may not have been applied" in str(unknown.value)
            # A read, and a write whose comparison makes a second copy harmless, move on.
            assert client.get(b"k") is not None
            local_revision = client.get(b"k")
            assert local_revision is not None
            result = client.txn(
                [Compare.mod_revision(b"k", local_revision.mod_revision)],
                [Put(b"k", b"3")],
                retry_safe=True,
            )
            assert result.succeeded
        finally:
            local.resume(0)


def test_a_watch_resumes_on_another_member(etcd_factory: Callable[[int], LocalEtcd]) -> None:
    local = etcd_factory(3)
    seen: list[bytes] = []
    with EtcdClient(local.endpoints) as client:
        start = client.put(b"w/0", b"0") + 1

        def collect(batch: WatchBatch) -> None:
            seen.extend(e.key for e in batch.events if not e.deleted)

        watch = watch_prefix(client, b"w/", start, collect)
        try:
            client.put(b"w/1", b"1")
            _wait(lambda: b"w/1" in seen, 10, "the first event")
            local.kill(0)  # the member the watch streams from
            wait_healthy(local.processes[1:])
            client.put(b"w/2", b"2")
            client.put(b"w/3", b"3")
            _wait(lambda: {b"w/2", b"w/3"} <= set(seen), 15, "events after the kill")
        finally:
            watch.cancel()
        assert b"w/0" not in seen
        client.put(b"w/4", b"4")
        time.sleep(0.5)
        assert b"w/4" not in seen  # cancelled


def test_a_lease_lives_while_kept_and_its_keys_go_with_it(
    client: EtcdClient, prefix: bytes
) -> None:
    lease = grant_lease(client, 2)
    client.put(prefix + b"leased", b"v", lease=lease.id)
    time.sleep(3)  # longer than its TTL: the keep-alive holds it
    assert lease.alive
    assert client.get(prefix + b"leased") is not None
    lease.revoke()
    assert not lease.alive
    assert client.get(prefix + b"leased") is None
    lease.revoke()  # gone already: not an error


def test_a_lease_that_cannot_be_kept_is_lost_in_time(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(1)
    lost = threading.Event()
    with EtcdClient(local.endpoints, timeout=2, attempt_timeout=0.5) as client:
        lease = grant_lease(client, 2, on_lost=lost.set)
        granted = time.monotonic()
        local.kill(0)
        assert lost.wait(10)
        assert not lease.alive
        # Never later than the cluster could have let it go.
        assert time.monotonic() - granted >= 1.5


def test_one_leader_at_a_time_and_a_successor_when_it_resigns(
    client: EtcdClient, prefix: bytes
) -> None:
    first = Election(client, prefix + b"leader", b"replica-1", ttl=2)
    second = Election(client, prefix + b"leader", b"replica-2", ttl=2)
    observed: list[bytes | None] = []
    stop = second.observe(observed.append)
    try:
        assert first.campaign(timeout=5)
        assert first.is_leader
        assert not second.try_campaign()
        assert not second.is_leader
        assert second.leader() == b"replica-1"
        won: list[bool] = []
        waiting = threading.Thread(target=lambda: won.append(second.campaign(timeout=10)))
        waiting.start()
        time.sleep(0.3)
        first.resign()
        waiting.join()
        assert won == [True]
        assert second.is_leader
        assert not first.is_leader
        _wait(lambda: observed[-1:] == [b"replica-2"], 5, "the change observed")
        assert observed == [None, b"replica-1", None, b"replica-2"]
    finally:
        stop()
        second.resign()


def test_a_leader_whose_key_is_taken_stops_leading(client: EtcdClient, prefix: bytes) -> None:
    lost = threading.Event()
    leader = Election(client, prefix + b"leader", b"replica-1", ttl=5, on_lost=lost.set)
    assert leader.campaign(timeout=5)
    client.delete(prefix + b"leader")  # e.g. an operator, or an expired lease
    assert lost.wait(5)
    assert not leader.is_leader


def test_the_lock_admits_one_holder_at_a_time(client: EtcdClient, prefix: bytes) -> None:
    inside = 0
    most = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most
        lock = Lock(client, prefix + b"lock", ttl=5)
        for _ in range(3):
            with lock.hold(timeout=30):
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.02)
                with guard:
                    inside -= 1

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for each in workers:
        each.start()
    for each in workers:
        each.join(timeout=60)
    assert most == 1
    assert client.get(prefix + b"lock") is None


def _record_watches(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[WatchBatch], None]]:
    """Each callback the lock's holds give their key watches, in order (the watches still run),
    so that a test can report an event to a hold as its watch would, late or not."""
    callbacks: list[Callable[[WatchBatch], None]] = []
    real_watch_key = election.watch_key

    def recording(client: EtcdClient, key: bytes, start: int, on_batch: Any) -> Any:
        callbacks.append(on_batch)
        return real_watch_key(client, key, start, on_batch)

    monkeypatch.setattr(election, "watch_key", recording)
    return callbacks


def test_the_lock_keeps_one_lease_and_an_old_hold_cannot_drop_a_new_one(
    client: EtcdClient, prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock keeps its lease between holds (no grant, no revocation per hold); the watch of
    a hold that ended sees that hold's own deletion, which must not end the next hold; taking
    the key from a holder still ends its hold; `close` revokes the lease, and the key goes."""
    key = prefix + b"lock"
    callbacks = _record_watches(monkeypatch)
    lock = Lock(client, key, ttl=5)
    leases = set()
    for _ in range(20):  # release and acquire back to back: old watches still report
        assert lock.acquire(5)
        held = client.get(key)
        assert held is not None
        leases.add(held.lease)
        lock.release()
    assert len(leases) == 1
    assert lock.acquire(5)
    time.sleep(0.5)  # any event of an earlier hold has arrived by now
    assert lock.held
    # The deletion of an earlier hold, reported late by that hold's watch: nothing changes.
    late = WatchBatch((WatchEvent(key, b"", True, 1),))
    for report in callbacks[:-1]:
        report(late)
    assert lock.held
    client.delete(key)
    _wait(lambda: not lock.held, 5, "the hold ended by the deletion")
    assert lock.acquire(5)
    lease = client.get(key).lease  # type: ignore[union-attr]
    assert lease not in leases  # a hold that ended without a release took its lease along
    lock.close()
    assert client.get(key) is None
    assert not lock.held
    other = Lock(client, key, ttl=5)
    assert other.acquire(1)  # free at once
    other.close()


def test_a_hold_that_ends_without_a_release_takes_its_key_with_it(
    client: EtcdClient, prefix: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chaos found the write lock held for good: a hold ended without a release (its watch
    lost track), while the lease it kept between holds went on being refreshed, so its key
    stayed and every replica waited. A hold that ends so now revokes its lease."""
    key = prefix + b"lock"
    callbacks = _record_watches(monkeypatch)
    lock = Lock(client, key, ttl=5)
    assert lock.acquire(5)
    callbacks[-1](WatchBatch((), compacted=True))  # the watch lost track
    assert not lock.held
    other = Lock(client, key, ttl=5)
    assert other.acquire(3), "the key of the ended hold is still there"
    other.close()
    lock.close()


def test_a_leader_whose_lease_lapsed_unnoticed_campaigns_again(
    client: EtcdClient, prefix: bytes
) -> None:
    """Chaos found a replica's election thread dead: its lease had passed its local deadline
    (`is_leader` False) before the keep-alive noticed, and the next campaign refused with
    "held by this holder already". Now the attempt ends the lapsed hold first."""
    leader = Election(client, prefix + b"leader", b"replica-1", ttl=5)
    assert leader.campaign(timeout=5)
    lease = leader._key._lease
    assert lease is not None
    lease._expires = 0.0  # the local deadline passed (as while paused or cut off)
    assert not leader.is_leader
    assert leader.campaign(timeout=5)
    assert leader.is_leader
    current = client.get(prefix + b"leader")
    assert current is not None
    assert current.lease != lease.id
    leader.resign()


def test_members_and_their_status(etcd_factory: Callable[[int], LocalEtcd]) -> None:
    local = etcd_factory(3)
    with EtcdClient(local.endpoints, attempt_timeout=1.0) as client:
        assert sorted(m.name for m in members(client)) == ["etcd-1", "etcd-2", "etcd-3"]
        statuses = cluster_status(client)
        assert [s.healthy for s in statuses] == [True, True, True]
        assert sum(s.is_leader for s in statuses) == 1
        assert all(s.version.startswith("3.") for s in statuses)
        local.kill(2)
        local.pause(1)
        try:
            statuses = cluster_status(client)
        finally:
            local.resume(1)
        assert statuses[2].reachable is False
        # A member killed while a status call was open reports the closed stream instead.
        assert any(
            reason in statuses[2].detail for reason in ("connection refused", "Socket closed")
        ), statuses[2].detail
        assert statuses[1].healthy is False
        assert statuses[0].reachable
