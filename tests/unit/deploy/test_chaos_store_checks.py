"""The invariants a chaos run on a domain with replicas checks against its store, each against
a history and a store that break it the way a broken coordinator or HSA would.

A healthy run (every invariant holds) is changed one fault at a time: a change the store lost,
a proposal the store keeps at another version, or not as applied; a key record lost, rolled
back or deleted; a proposal applied twice; a CreateKey idempotency key that made two keys;
a change submitted while the leader was down that never completed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from deploy.chaos.checker import ChainEntry, FinalObservations, check_all
from deploy.chaos.history import History
from deploy.chaos.store_checks import (
    StoredKey,
    StoredProposal,
    StoreObservations,
    check_applied_once,
    check_changes_durable,
    check_key_records_durable,
    check_leader_kill_changes,
    check_store,
    leader_kill_windows,
)
from deploy.chaos.workload import idempotency_marker

pytestmark = pytest.mark.unit

H = {v: f"{v:02d}" * 32 for v in range(1, 10)}
P1, P2, P3 = "aa" * 32, "bb" * 32, "cc" * 32
IDEM = "seed-1-abc123-client-0-1"
DESCRIPTION = f"chaos run seed-1-abc123 idempotency-key {IDEM}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now


@dataclass
class Run:
    history: History
    store: StoreObservations
    ops: dict[str, int] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        return self.history.events()


def healthy() -> Run:
    """Two applied changes, a key created (a first attempt lost, the retry acknowledged) and
    rotated, a leader kill with a change under way and one submitted during it."""
    history = History(clock=Clock())
    ops: dict[str, int] = {}
    lost = history.invoke("client-0", "create_key", idempotency_key=IDEM, attempt=1)
    history.unknown(lost, error="UnavailableError")
    create = history.invoke("client-0", "create_key", idempotency_key=IDEM, attempt=2)
    history.ok(create, key_id="key-a", metadata_version=1, backing_version=1)
    ops["create"] = create
    rotate_key = history.invoke("client-1", "rotate_key", key_id="key-a")
    history.ok(rotate_key, key_id="key-a", metadata_version=2, backing_version=2)
    ops["rotate_key"] = rotate_key

    under_way = history.invoke("control", "rotate-domain-key", proposal_id=P1)
    history.info("nemesis", "kill-replica", target="coordinator-2", leader=True, aimed=True)
    history.ok(under_way, version=2, proposal_id=P1, state_hash=H[2], resent=1)
    ops["under_way"] = under_way
    during = history.invoke("control", "add-operator", proposal_id=P2)
    history.ok(during, version=3, proposal_id=P2, state_hash=H[3], resent=0)
    ops["during"] = during
    history.info("nemesis", "restart-replica", target="coordinator-2", seconds=1.0)
    after = history.invoke("control", "rotate-domain-key", proposal_id=P3)
    history.fail(after, error="stale")  # after the window: not held against the leader kill
    ops["after"] = after

    store = StoreObservations(
        chain=[
            ChainEntry(1, H[1], ""),
            ChainEntry(2, H[2], P1),
            ChainEntry(3, H[3], P2),
        ],
        proposals={
            P1: StoredProposal("applied", 2),
            P2: StoredProposal("applied", 3),
            P3: StoredProposal("stale"),
        },
        keys={
            "key-a": StoredKey(DESCRIPTION, 2, 2, idempotency_key=IDEM),
            "key-b": StoredKey("made by another program", 1, 1),
        },
    )
    return Run(history, store, ops)


def test_a_healthy_run_keeps_every_store_invariant() -> None:
    run = healthy()
    results = check_store(run.events(), run.store)
    assert [r.name for r in results] == [
        "changes-durable",
        "key-records-durable",
        "applied-once",
        "leader-kill-changes-complete",
    ]
    assert all(r.held for r in results), results
    assert [r.checked for r in results] == [2, 2, 3, 2]
    # check_all adds them when the run read a store, and only then.
    final = FinalObservations(nodes=[], store=run.store)
    names = [
        r.name
        for r in check_all(
            run.events(),
            {},
            final,
            convergence_bound=1,
            min_availability=0,
            expect_data_plane=False,
        )
    ]
    assert names[-4:] == [r.name for r in results]
    without = [
        r.name
        for r in check_all(
            run.events(),
            {},
            FinalObservations(nodes=[]),
            convergence_bound=1,
            min_availability=0,
            expect_data_plane=False,
        )
    ]
    assert "changes-durable" not in without


def test_an_unreadable_store_breaks_every_store_invariant() -> None:
    run = healthy()
    store = StoreObservations(error="StoreToolError: etcd did not answer")
    for check in (check_changes_durable, check_key_records_durable, check_applied_once):
        result = check(run.events(), store)
        assert not result.held
        assert "the store was not read: StoreToolError" in result.counterexample


def test_a_change_the_store_lost_breaks_changes_durable() -> None:
    run = healthy()
    store = dataclasses.replace(run.store, chain=run.store.chain[:2])  # version 3 lost
    result = check_changes_durable(run.events(), store)
    assert not result.held
    assert f"op {run.ops['during']}" in result.counterexample
    assert "applied as version 3, but the store's chain ends at version 2" in result.counterexample


def test_another_proposal_at_the_version_breaks_changes_durable() -> None:
    run = healthy()
    chain = [*run.store.chain[:2], ChainEntry(3, H[3], "dd" * 32)]
    result = check_changes_durable(run.events(), dataclasses.replace(run.store, chain=chain))
    assert not result.held
    assert "but the store has proposal dddddddd" in result.counterexample


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (None, "the store no longer holds proposal"),
        (StoredProposal("pending"), "as pending (version 0)"),
        (
            StoredProposal("applied", 4),
            "as applied (version 4), acknowledged as applied at version 3",
        ),
    ],
)
def test_a_proposal_not_stored_as_applied_breaks_changes_durable(
    stored: StoredProposal | None, expected: str
) -> None:
    run = healthy()
    proposals = dict(run.store.proposals)
    if stored is None:
        del proposals[P2]
    else:
        proposals[P2] = stored
    result = check_changes_durable(
        run.events(), dataclasses.replace(run.store, proposals=proposals)
    )
    assert not result.held
    assert expected in result.counterexample


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (None, "key key-a is not in the store"),
        (StoredKey(DESCRIPTION, 2, 2, deleted=True, idempotency_key=IDEM), "is deleted"),
        (StoredKey(DESCRIPTION, 1, 2, idempotency_key=IDEM), "metadata_version 2, the store has 1"),
        (StoredKey(DESCRIPTION, 2, 1, idempotency_key=IDEM), "backing_version 2, the store has 1"),
        (StoredKey("chaos run x", 2, 2), f"for idempotency key {IDEM!r}"),
    ],
)
def test_a_lost_or_rolled_back_key_record_breaks_key_records_durable(
    record: StoredKey | None, expected: str
) -> None:
    run = healthy()
    keys = dict(run.store.keys)
    if record is None:
        del keys["key-a"]
    else:
        keys["key-a"] = record
    result = check_key_records_durable(run.events(), dataclasses.replace(run.store, keys=keys))
    assert not result.held
    assert expected in result.counterexample


def test_a_proposal_in_two_states_breaks_applied_once() -> None:
    run = healthy()
    chain = [*run.store.chain, ChainEntry(4, H[4], P1)]
    result = check_applied_once(run.events(), dataclasses.replace(run.store, chain=chain))
    assert not result.held
    assert "proposal aaaaaaaaaaaaaaaa... is in the states 2, 4" in result.counterexample


def test_an_idempotency_key_that_made_two_keys_breaks_applied_once() -> None:
    run = healthy()
    # The retry of a lost CreateKey made a second key (an HSA that ignored the key).
    keys = {**run.store.keys, "key-z": StoredKey(DESCRIPTION, 1, 1, idempotency_key=IDEM)}
    result = check_applied_once(run.events(), dataclasses.replace(run.store, keys=keys))
    assert not result.held
    assert f"the store holds 2 keys made under idempotency key {IDEM!r}" in result.counterexample
    # ... and two acknowledgements naming different keys, even if the store kept one.
    history = run.history
    again = history.invoke("client-0", "create_key", idempotency_key=IDEM, attempt=3)
    history.ok(again, key_id="key-z", metadata_version=1, backing_version=1)
    result = check_applied_once(run.events(), run.store)
    assert not result.held
    assert "was acknowledged with keys key-a, key-z" in result.counterexample


def test_a_change_during_a_leader_kill_that_did_not_complete_breaks_the_invariant() -> None:
    run = healthy()
    history = run.history
    history.info("nemesis", "kill-replica", target="coordinator-1", leader=True, aimed=False)
    unknown = history.invoke("control", "remove-operator", proposal_id="ee" * 32)
    history.unknown(unknown, error="UnavailableError", detail="no replica answered", resent=5)
    never = history.invoke("control", "rotate-domain-key", proposal_id="ff" * 32)
    result = check_leader_kill_changes(run.events())
    assert not result.held
    assert result.checked == 4
    assert result.violations == 2
    assert f"op {unknown}" in result.counterexample
    assert "during the kill of the leader coordinator-1" in result.counterexample
    assert "unknown after 5 resends: UnavailableError: no replica answered" in (
        result.counterexample
    )
    assert leader_kill_windows(run.events())[-1][0] == "coordinator-1"
    assert never > unknown


def test_a_kill_of_a_replica_that_did_not_lead_opens_no_window() -> None:
    history = History(clock=Clock())
    history.info("nemesis", "kill-replica", target="coordinator-3", leader=False, aimed=False)
    change = history.invoke("control", "rotate-domain-key", proposal_id=P1)
    history.unknown(change, error="UnavailableError")
    history.info("nemesis", "restart-replica", target="coordinator-3")
    assert leader_kill_windows(history.events()) == []
    result = check_leader_kill_changes(history.events())
    assert result.held
    assert result.checked == 0


def test_the_idempotency_marker_reads_what_the_workload_writes() -> None:
    assert idempotency_marker(DESCRIPTION) == IDEM
    assert idempotency_marker("chaos run seed-1") == ""
    assert idempotency_marker(f"someone else's key idempotency-key {IDEM}") == ""
