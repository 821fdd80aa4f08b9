"""The etcd store under faults: members killed while replicas write, writes acknowledged only
once committed, and the worst interleavings of two replicas forced exactly (another replica's
write lands between one replica's read and its transaction).

These are etcd-only: a SQLite store reads and writes in one transaction, so nothing can land
between them; the races both backends must survive are in
tests/unit/coordinator/test_store_replicas.py.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.etcd import LocalEtcd, fresh_prefix

from deploy.etcd import wait_healthy
from domain_coordinator.etcd_store import EtcdStore
from domain_coordinator.store import AuditHeadRecord, FencesChangedError, ProposalState
from domain_coordinator.store_spec import open_store
from domain_core.errors import ResourceExhaustedError
from domain_edge.etcd import EtcdClient, EtcdUnavailableError, Range, RangeResult, TxnResult

pytestmark = [pytest.mark.integration, pytest.mark.etcd]

BASE = b"\xb0" * 32


@pytest.fixture
def replicas(etcd_cluster: LocalEtcd) -> Iterator[tuple[EtcdStore, EtcdStore]]:
    prefix = fresh_prefix()
    first = EtcdStore.open(etcd_cluster.endpoints, prefix)
    second = EtcdStore.open(etcd_cluster.endpoints, prefix)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _after_first_read(store: EtcdStore, meanwhile: Callable[[], object]) -> None:
    """Make `meanwhile` happen right after `store`'s next read (a snapshot), before its write."""
    original = store.client.snapshot
    done = threading.Event()

    def snapshot(requests: list[Range], revision: int = 0) -> tuple[RangeResult, ...]:
        found = original(requests, revision)
        if not done.is_set():
            done.set()
            meanwhile()
        return found

    store.client.snapshot = snapshot  # type: ignore[method-assign]


def test_a_fence_set_between_a_replicas_check_and_its_write_stops_the_write(
    replicas: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = replicas
    a.set_fences(b"no fence", 0)
    _after_first_read(a, lambda: b.set_fences(b"hsa-2 is being removed", 1))
    with pytest.raises(FencesChangedError, match="not 1"):
        a.put_key("k", b"record", 0, fences_revision=1)
    assert b.get_key("k") is None
    assert b.count_keys("") == 0


def test_a_proposal_stored_between_a_replicas_count_and_its_insert_is_counted(
    replicas: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = replicas

    def put(store: EtcdStore, index: int) -> bool:
        return store.put_proposal(
            bytes([index]) * 32, b"p%d" % index, 1, 10_000,
            proposer="mallory", base_version=1, base_state_hash=BASE, max_pending_per_proposer=1,
        )  # fmt: skip

    _after_first_read(a, lambda: put(b, 2))  # a counts 0 pending, then b stores one
    with pytest.raises(ResourceExhaustedError, match="you have 1 pending proposals already"):
        put(a, 1)
    assert b.count_proposals(proposer="mallory") == 1
    assert a.get_proposal(bytes([1]) * 32) is None


def test_a_key_created_between_a_replicas_count_and_its_create_is_counted(
    replicas: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = replicas
    _after_first_read(a, lambda: b.put_key("k2", b"r", 0, creator="app", creator_limit=1))
    with pytest.raises(ResourceExhaustedError, match="app has created 1 keys"):
        a.put_key("k1", b"r", 0, creator="app", creator_limit=1)
    assert (b.count_keys("app"), b.get_key("k1")) == (1, None)


def test_replicas_keep_writing_while_members_die(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(3)
    prefix = fresh_prefix()
    stores = [EtcdStore.open(local.endpoints, prefix, timeout=20) for _ in range(2)]
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer(index: int) -> None:
        store = stores[index]
        count = 0
        while not stop.is_set() and count < 400:
            key_id = f"r{index}-{count}"
            try:
                store.put_key(key_id, b"record %d" % count, 0, creator=f"app-{index}")
            except BaseException as error:
                failures.append(error)
                return
            acknowledged.append(key_id)
            count += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(acknowledged) >= 20)
        local.kill(0)  # the member both replicas talk to first
        _wait_for(lambda: len(acknowledged) >= 60)
        local.restart(0)
        local.kill(1)  # another one, perhaps the leader
        _wait_for(lambda: len(acknowledged) >= 100)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    # Every acknowledged write is there, once, through any member.
    reader = EtcdStore.open(local.endpoints, prefix)
    try:
        stored = {e.key_id for e in reader.list_keys(1000)}
        assert stored == set(acknowledged)
        assert reader.count_keys("app-0") + reader.count_keys("app-1") == len(acknowledged)
    finally:
        reader.close()
        for store in stores:
            store.close()


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.05):
                pytest.fail(f"not reached within {timeout} s")
    finally:
        deadline.cancel()


def test_a_write_is_acknowledged_only_once_a_majority_has_it(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(3)
    prefix = fresh_prefix()
    store = EtcdStore.open(local.endpoints, prefix, timeout=5, attempt_timeout=1)
    try:
        store.append_state(1, b"genesis")
        store.put_key("acknowledged", b"r", 0)
        # Every member dies at once (a power cut): what was acknowledged was on a majority's disk.
        for index in range(3):
            local.kill(index)
        local.restart(1, wait=False)  # alone: no majority, no leader
        with pytest.raises(EtcdUnavailableError) as refused:
            store.put_key("refused", b"r", 0)
        for index in (0, 2):
            local.restart(index, wait=False)
        wait_healthy(local.processes)
        assert store.get_key("acknowledged") is not None
        assert store.get_state(1) == b"genesis"
        if not refused.value.maybe_applied:
            assert store.get_key("refused") is None  # refused, and it never happened
        store.append_state(2, b"two")  # and the store works again
    finally:
        store.close()


def test_the_store_spec_opens_an_etcd_store(etcd_cluster: LocalEtcd, tmp_path: Path) -> None:
    prefix = fresh_prefix()
    store = open_store(etcd_cluster.store_spec(prefix), tmp_path)
    try:
        assert isinstance(store, EtcdStore)
        store.put_key("k", b"r", 0)
        with EtcdClient(etcd_cluster.endpoints) as client:
            found = client.range(Range.prefix(prefix.encode() + b"/keys/live/"))
        assert len(found.kvs) == 1
    finally:
        store.close()


def _answers_lost(store: EtcdStore) -> None:
    """Every transaction of `store` is applied, its answer lost, and sent again (as a client
    does after a timeout): the second copy sees the first one's effects."""
    original = store.client.txn

    def lossy(*args: Any, **options: Any) -> TxnResult:
        original(*args, **options)
        return dataclasses.replace(original(*args, **options), uncertain=True)

    store.client.txn = lossy  # type: ignore[method-assign]


WRITES: dict[str, Callable[[EtcdStore], object]] = {
    "append_state": lambda s: s.append_state(2, b"two"),
    "append_and_close": lambda s: s.append_state_and_close_proposal(2, b"two", b"\x01" * 32),
    "create_key": lambda s: s.put_key("new", b"r", 0, creator="app", creator_limit=5),
    "update_key": lambda s: s.put_key("k", b"r2", 1),
    "delete_key": lambda s: s.delete_key("k", 1, 100),
    "put_proposal": lambda s: s.put_proposal(b"\x02" * 32, b"p2", 1, 10_000, [("op-a", b"a")]),
    "add_approval": lambda s: s.add_approval(b"\x01" * 32, "op-b", b"b"),
    "add_cancel_vote": lambda s: s.add_cancel_vote(b"\x01" * 32, "op-b", b"v"),
    "set_state": lambda s: s.set_proposal_state(b"\x01" * 32, ProposalState.CANCELLED),
    "close": lambda s: s.close_proposals([(b"\x01" * 32, ProposalState.EXPIRED, "x")], 5),
    "set_fences": lambda s: s.set_fences(b"f", 0),
    "audit_head": lambda s: s.put_audit_head(AuditHeadRecord("h", "l", 1, b"c", 1), None),
    "hsa_version": lambda s: s.record_hsa_version("hsa-1", 2, b"h", 5),
}
EXPECTED: dict[str, object] = {
    "create_key": 1,
    "update_key": 2,
    "put_proposal": True,
    "add_approval": True,
    "add_cancel_vote": True,
    "set_state": True,
    "close": [b"\x01" * 32],
    "set_fences": 1,
    "audit_head": True,
    "hsa_version": True,
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_whose_answer_was_lost_is_neither_failed_nor_applied_twice(
    replicas: tuple[EtcdStore, EtcdStore], write: str
) -> None:
    store, other = replicas
    store.append_state(1, b"genesis")
    store.put_proposal(b"\x01" * 32, b"p", 1, 10_000, [("op-a", b"a")], proposer="op-a")
    store.put_key("k", b"r", 0, creator="app")
    store.register_hsa("hsa-1", "127.0.0.1:1", 1, 1, b"h")
    _answers_lost(store)
    assert WRITES[write](store) == EXPECTED.get(write)
    # Applied once: the counts and the indexes agree with one application.
    assert other.count_keys("app") == {"create_key": 2, "delete_key": 0}.get(write, 1)
    assert other.count_proposals(include_closed=True) == (2 if write == "put_proposal" else 1)
    pending = 0 if write in ("append_and_close", "set_state", "close") else 1
    assert other.count_proposals() == pending + (write == "put_proposal")
    record = other.get_proposal(b"\x01" * 32)
    assert record is not None
    assert len(record.approvals) == (2 if write == "add_approval" else 1)
    assert len(other.pending_with_approvals(2, limit=10)) == (write == "add_approval")
