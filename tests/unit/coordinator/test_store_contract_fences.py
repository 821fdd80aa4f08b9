"""The store contract for fences and change notices, for every backend.

The attack: replica A reads the fences and checks a key write against them; replica B sets a
fence (a host being removed); A's write must not land after B's fence. With `fences_revision`
the write and the check are one transaction, so it is refused (FencesChangedError) and nothing
changes.
"""

from __future__ import annotations

import queue
import time

import pytest
from support.stores import StoreBackend

from domain_coordinator.store import (
    ChangeKind,
    CoordinatorStore,
    FenceRecord,
    FencesChangedError,
)
from domain_core.errors import ConflictError, NotFoundError


def test_fences_change_only_with_a_compare_and_swap(backend: StoreBackend) -> None:
    store = backend.open()
    assert store.get_fences() == FenceRecord(b"", 0)
    with pytest.raises(ConflictError, match="revision 0, not 1"):
        store.set_fences(b"one", 1)
    assert store.set_fences(b"one", 0) == 1
    with pytest.raises(ConflictError):
        store.set_fences(b"another one", 0)
    assert store.set_fences(b"two", 1) == 2
    assert store.set_fences(b"", 2) == 3  # emptied, still a revision of its own
    assert store.get_fences() == FenceRecord(b"", 3)
    other = backend.open()  # another replica, or a restart
    assert other.get_fences() == FenceRecord(b"", 3)
    assert other.set_fences(b"\x00\xff binary", 3) == 4
    with pytest.raises(ConflictError):
        store.set_fences(b"stale", 3)
    assert store.get_fences() == FenceRecord(b"\x00\xff binary", 4)


@pytest.mark.parametrize(("value", "revision"), [("text", 0), (b"x", -1), (b"x", True)])
def test_fences_arguments_are_checked(
    store: CoordinatorStore, value: object, revision: object
) -> None:
    with pytest.raises((TypeError, ValueError)):
        store.set_fences(value, revision)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        store.put_key("k", b"r", 0, fences_revision=-1)


def test_a_key_write_never_slips_past_a_fence_another_replica_set(backend: StoreBackend) -> None:
    replica_a, replica_b = backend.open(), backend.open()
    replica_b.set_fences(b"no fence", 0)
    seen = replica_a.get_fences().revision  # A checks its write against these ...
    assert replica_a.put_key("k1", b"v1", 0, fences_revision=seen) == 1
    replica_b.set_fences(b"hsa-2 is being removed", seen)  # ... B sets a fence meanwhile
    with pytest.raises(FencesChangedError, match=f"not {seen}"):
        replica_a.put_key("k2", b"v1", 0, fences_revision=seen)
    with pytest.raises(FencesChangedError):
        replica_a.put_key("k1", b"v2", 1, fences_revision=seen)
    with pytest.raises(FencesChangedError):
        replica_a.delete_key("k1", 1, 100, fences_revision=seen)
    # Nothing changed: no new key, no new revision, no tombstone.
    assert replica_b.get_key("k2") is None
    entry = replica_b.get_key("k1")
    assert entry is not None
    assert (entry.record, entry.revision) == (b"v1", 1)
    assert replica_b.deleted_key("k1") is None
    assert replica_b.count_keys("") == 1
    # Checked against the new fences, the writes go through.
    now = replica_a.get_fences().revision
    assert replica_a.put_key("k1", b"v2", 1, fences_revision=now) == 2
    replica_a.delete_key("k1", 2, 100, fences_revision=now)
    assert replica_b.deleted_key("k1") is not None


def test_the_fences_are_checked_before_the_key(store: CoordinatorStore) -> None:
    """A stale fence check wins over every other refusal: the caller re-checks the fences
    first, whatever else is wrong with its write."""
    store.set_fences(b"f", 0)
    store.put_key("k", b"v", 0)
    with pytest.raises(FencesChangedError):
        store.put_key("k", b"again", 0, fences_revision=0)  # exists, too
    with pytest.raises(FencesChangedError):
        store.put_key("k", b"v2", 9, fences_revision=0)  # wrong revision, too
    with pytest.raises(FencesChangedError):
        store.delete_key("missing", 1, 5, fences_revision=7)  # unknown, too
    with pytest.raises(NotFoundError):
        store.delete_key("missing", 1, 5, fences_revision=1)
    # Writes that do not ask for the check ignore the fences.
    assert store.put_key("k", b"v2", 1) == 2
    assert store.put_key("unfenced", b"v", 0) == 1


def test_a_fence_check_on_fences_never_set_is_revision_zero(store: CoordinatorStore) -> None:
    assert store.put_key("k", b"v", 0, fences_revision=0) == 1
    store.set_fences(b"f", 0)
    with pytest.raises(FencesChangedError):
        store.put_key("k2", b"v", 0, fences_revision=0)


def _drain(notices: queue.Queue[ChangeKind], settle: float) -> set[ChangeKind]:
    """The kinds noticed until none came for `settle` seconds."""
    kinds: set[ChangeKind] = set()
    while True:
        try:
            kinds.add(notices.get(timeout=settle))
        except queue.Empty:
            return kinds


def _wait_for(notices: queue.Queue[ChangeKind], kinds: set[ChangeKind], timeout: float) -> None:
    """Return once every kind in `kinds` was noticed; fail after `timeout` seconds."""
    seen: set[ChangeKind] = set()
    deadline = time.monotonic() + timeout
    while not kinds <= seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"noticed {sorted(seen)}, not {sorted(kinds)}, within {timeout} s")
        try:
            seen.add(notices.get(timeout=remaining))
        except queue.Empty:
            continue


def test_changes_by_another_writer_are_noticed(backend: StoreBackend) -> None:
    watcher, writer = backend.open(), backend.open()
    notices: queue.Queue[ChangeKind] = queue.Queue()
    unsubscribe = watcher.subscribe(notices.put)
    try:
        writer.append_state(1, b"genesis")
        writer.put_proposal(b"\x01" * 32, b"p", 1, 2)
        writer.put_key("k", b"v", 0)
        writer.set_fences(b"f", 0)
        writer.register_hsa("hsa-1", "127.0.0.1:1", 1)  # not a kind anyone re-reads
        if not backend.shared:
            # One coordinator per store file: nobody else writes, nothing is noticed.
            assert _drain(notices, 0.5) == set()
            return
        _wait_for(notices, set(ChangeKind), timeout=10)
        assert all(isinstance(kind, ChangeKind) for kind in _drain(notices, 0.5))
    finally:
        unsubscribe()
    # After unsubscribing, nothing more arrives.
    writer.put_key("k2", b"v", 0)
    assert _drain(notices, 1.0) == set()
    unsubscribe()  # a second call is harmless


def test_a_subscriber_hears_only_the_kinds_it_asked_for(backend: StoreBackend) -> None:
    """The replicas ask for states and fences only: key writes (every CreateKey) then cost
    them no event at all."""
    watcher, writer = backend.open(), backend.open()
    notices: queue.Queue[ChangeKind] = queue.Queue()
    unsubscribe = watcher.subscribe(notices.put, kinds=(ChangeKind.STATES, ChangeKind.FENCES))
    try:
        writer.put_key("k", b"v", 0)
        writer.put_proposal(b"\x02" * 32, b"p", 1, 2)
        writer.append_state(1, b"genesis")
        writer.set_fences(b"f", 0)
        if backend.shared:
            _wait_for(notices, {ChangeKind.STATES, ChangeKind.FENCES}, timeout=10)
        writer.put_key("k2", b"v", 0)
        assert _drain(notices, 1.0) <= {ChangeKind.STATES, ChangeKind.FENCES}
    finally:
        unsubscribe()


def test_a_subscriber_that_raises_keeps_its_subscription(backend: StoreBackend) -> None:
    watcher, writer = backend.open(), backend.open()
    notices: queue.Queue[ChangeKind] = queue.Queue()
    calls = 0

    def flaky(kind: ChangeKind) -> None:
        nonlocal calls
        calls += 1
        notices.put(kind)
        raise RuntimeError("a subscriber bug")

    unsubscribe = watcher.subscribe(flaky)
    try:
        writer.put_key("k", b"v", 0)
        writer.put_key("k", b"v2", 1)
        writer.append_state(1, b"genesis")
        if backend.shared:
            _wait_for(notices, {ChangeKind.KEYS, ChangeKind.STATES}, timeout=10)
        else:
            assert _drain(notices, 0.5) == set()
            assert calls == 0
    finally:
        unsubscribe()
