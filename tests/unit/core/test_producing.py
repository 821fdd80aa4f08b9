"""domain_core.producing: the successor a host seals over its head verifies, says what it
strands, and is never produced by a host it removes."""

from __future__ import annotations

import pytest
from support.simulator import SimulatedDomain

from domain_core import producing, sealing
from domain_core.errors import FailedPreconditionError, QuorumNotMetError, RotationNotDueError
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit


def _produce(
    sim: SimulatedDomain, producer: str, changes: list[domain_pb2.Change]
) -> producing.Successor:
    proposal = sim.propose(changes)
    return producing.for_proposal(
        sim.head, proposal, sim.approve_quorum(proposal), producer_host_id=producer, now=sim.now
    )


def _seal(sim: SimulatedDomain, successor: producing.Successor, producer: str) -> None:
    """Seal as `producer` with the keys it holds, and append to the simulated chain."""
    state = producing.seal(
        successor,
        sim.keys_at(sim.head, producer),
        producer_host_id=producer,
        producer=sim.hosts[producer].signer,
    )
    sim.states.append(state)


def test_a_sealed_successor_verifies_as_the_next_state_and_carries_what_made_it() -> None:
    sim = SimulatedDomain.create()
    sim.advance(10)
    head = sim.head
    successor = _produce(sim, "hsa-1", [sim.add_operator_change("dave")])
    assert successor.version == head.version + 1
    assert successor.describe() == "2 of 2 approvals"
    assert successor.removed_hosts == frozenset()
    assert successor.retired_generations == frozenset()
    _seal(sim, successor, "hsa-1")
    state = sim.head
    assert sim.chain().head.hash == state.hash  # the verifier accepts it
    assert state.message.producer_host_id == "hsa-1"
    assert successor.proposal is not None
    assert state.message.proposal == successor.proposal.raw
    assert list(state.message.approvals) == list(successor.approvals)
    assert sim.keys_at(state, "hsa-2") == sim.keys_at(head, "hsa-2"), "no rotation, same keys"


def test_a_host_never_produces_a_state_that_removes_it() -> None:
    sim = SimulatedDomain.create()
    sim.advance(10)
    with pytest.raises(FailedPreconditionError, match="removes hsa-3, which therefore cannot"):
        _produce(sim, "hsa-3", [sim.remove_host_change("hsa-3")])
    successor = _produce(sim, "hsa-1", [sim.remove_host_change("hsa-3")])
    assert successor.removed_hosts == frozenset({"hsa-3"})
    _seal(sim, successor, "hsa-1")
    assert sim.chain().version == successor.version
    # removing a host rotates the domain key: hsa-3 gets no wrap of the new one
    assert "hsa-3" not in {w.host_id for w in sim.head.secrets.wraps}


def test_the_transition_rules_hold_a_proposal_without_quorum_is_refused() -> None:
    sim = SimulatedDomain.create()
    sim.advance(10)
    proposal = sim.propose([sim.add_operator_change("dave")])
    with pytest.raises(QuorumNotMetError):
        producing.for_proposal(
            sim.head,
            proposal,
            sim.approve(proposal, [0]),
            producer_host_id="hsa-1",
            now=sim.now,
        )


def test_a_scheduled_rotation_waits_until_due_then_keeps_the_old_keys_and_adds_one() -> None:
    sim = SimulatedDomain.create()
    due = sim.rotation_due_at()
    with pytest.raises(RotationNotDueError):
        producing.for_scheduled_rotation(sim.head, now=due - 1)
    sim.now = due
    successor = producing.for_scheduled_rotation(sim.head, now=due)
    assert successor.proposal is None
    assert successor.describe() == "scheduled rotation"
    before = sim.keys_at(sim.head, "hsa-1")
    _seal(sim, successor, "hsa-1")
    after = sim.keys_at(sim.head, "hsa-2")
    assert sim.chain().version == successor.version
    assert sorted(after) == [g.generation for g in successor.manifest.key_generations]
    assert all(after[g] == key for g, key in before.items() if g in after)
    assert len(set(after) - set(before)) == 1


def test_rotations_past_the_retention_retire_the_oldest_generation() -> None:
    sim = SimulatedDomain.create()
    retained = sim.head.manifest.message.settings.key_generations_retained
    for _ in range(retained):
        sim.now = sim.rotation_due_at()
        sim.rotate()
    sim.now = sim.rotation_due_at()
    successor = producing.for_scheduled_rotation(sim.head, now=sim.now)
    oldest = sim.head.manifest.message.key_generations[0].generation
    assert successor.retired_generations == frozenset({oldest})
    state = producing.seal(
        successor,
        sim.keys_at(sim.head, "hsa-1"),
        producer_host_id="hsa-1",
        producer=sim.hosts["hsa-1"].signer,
    )
    assert oldest not in sealing.unseal_state(
        state, "hsa-1", sim.hosts["hsa-1"].agreement_private_key
    )
