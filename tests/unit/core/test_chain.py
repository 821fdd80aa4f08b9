"""domain_core.chain: TUF-style attacks on TrustedChain, each refused with the chain unchanged.

The simulated coordinator is malicious: it serves old, forked, skipped, re-signed, mixed and
forged states, and states whose evidence (proposal, approvals) was tampered with. Forged
states "signed by a trusted host" model a compromised or buggy HSA: only the chain's own
recomputation of the transition can catch them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.simulator import MaliciousCoordinator, SimulatedDomain, new_host, new_operator

from domain_core import chain as chain_module
from domain_core import quorum, sealing, transition
from domain_core.chain import TrustedChain, verify_chain
from domain_core.errors import (
    BadSignatureError,
    ChainError,
    ChainGapError,
    ForkError,
    FutureStateError,
    GenesisMismatchError,
    HsmDomainError,
    MalformedMessageError,
    ProposalExpiredError,
    QuorumNotMetError,
    RollbackError,
    RotationNotDueError,
    StaleProposalError,
    TransitionMismatchError,
    UnknownSignerError,
    WrongDomainError,
)
from domain_core.model import Proposal, SealedState
from domain_core.signers import SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

DAY = 24 * 3600


@dataclass
class World:
    """A domain with a short history, and the proposals that made it.

    v1 genesis (hsa-1..3, op0..op2, threshold 2)
    v2 add-operator op3 "dave"        (approved by op0, op1)
    v3 remove-host hsa-3 (rotates)    (approved by op0, op1)
    v4 remove-operator op2            (approved by op0, op1)
    v5 scheduled rotation, one day later
    """

    sim: SimulatedDomain
    evil: MaliciousCoordinator
    proposals: dict[int, Proposal]

    def chain_at(self, version: int) -> TrustedChain:
        return self.sim.chain(upto=version)

    def v(self, version: int) -> SealedState:
        return self.sim.state(version)


@pytest.fixture(scope="module")
def world() -> World:
    sim = SimulatedDomain.create()
    proposals: dict[int, Proposal] = {}
    for version, change in (
        (2, sim.add_operator_change("dave")),
        (3, sim.remove_host_change("hsa-3")),
        (4, sim.remove_operator_change(2)),
    ):
        sim.advance(60)
        proposals[version] = sim.propose([change])
        sim.apply(proposals[version], sim.approve(proposals[version], [0, 1]))
    sim.advance(DAY)
    sim.rotate()
    assert sim.version == 5
    return World(sim=sim, evil=MaliciousCoordinator(sim), proposals=proposals)


def _offer(chain: TrustedChain, offered: SealedState | bytes) -> bool:
    """What a node does with bytes or a state from the coordinator: parse, then update."""
    state = SealedState.from_bytes(offered) if isinstance(offered, bytes) else offered
    return chain.update(state)


def refused(
    chain: TrustedChain,
    offered: SealedState | bytes,
    *errors: type[BaseException],
) -> BaseException:
    """Offer `offered`; it must fail with one of `errors` and leave the chain as it was."""
    head, version = chain.head, chain.version
    known = {v: chain.known_hash(v) for v in range(1, version + 3)}
    with pytest.raises(errors or (HsmDomainError,)) as info:
        _offer(chain, offered)
    assert isinstance(info.value, HsmDomainError), f"not a domain error: {info.value!r}"
    assert chain.head is head
    assert chain.version == version
    assert {v: chain.known_hash(v) for v in range(1, version + 3)} == known
    return info.value


# --- the honest path ------------------------------------------------------------------------


def test_honest_chain_is_accepted(world: World) -> None:
    chain = world.chain_at(1)
    for state in world.sim.states[1:]:
        assert chain.update(state) is True
        assert chain.head is state
        assert chain.known_hash(state.version) == state.hash
    assert chain.version == 5


def test_reoffering_the_head_returns_false(world: World) -> None:
    chain = world.chain_at(3)
    assert chain.update(world.v(3)) is False
    # The same signed state with other (still valid) evidence has the same hash: not new.
    surplus = world.evil.replace_approvals(
        world.v(3), world.sim.approve(world.proposals[3], [0, 1, 2])
    )
    assert surplus.hash == world.v(3).hash
    assert chain.update(surplus) is False
    assert chain.head is world.v(3)


def test_extend_skips_known_states(world: World) -> None:
    chain = world.chain_at(1)
    assert chain.extend(world.sim.states) == 4
    assert chain.extend(world.sim.states) == 0
    assert chain.version == 5


# --- rollback, fork, gap -------------------------------------------------------------------


@pytest.mark.parametrize("older", [1, 2, 3])
def test_rollback(world: World, older: int) -> None:
    error = refused(world.chain_at(4), world.v(older), RollbackError)
    assert "refusing to go back" in str(error)


def test_fork_same_proposal_resealed_by_another_host(world: World) -> None:
    v3 = world.v(3)
    resealed = world.sim.apply(
        world.proposals[3],
        list(v3.approvals),
        producer="hsa-2",
        now=v3.manifest.created_at,
        base=world.v(2),
        append=False,
    )
    assert resealed.version == 3
    assert resealed.hash != v3.hash
    refused(world.chain_at(3), resealed, ForkError)
    refused(world.chain_at(5), resealed, ForkError)


def test_fork_different_proposal_same_version(world: World) -> None:
    other = world.sim.propose([world.sim.set_quorum_change(1)], base=world.v(2))
    forked = world.sim.apply(other, world.sim.approve(other, [0, 1]), base=world.v(2), append=False)
    refused(world.chain_at(3), forked, ForkError)
    # A node that saw the other branch first refuses this branch's successor.
    branch = world.chain_at(2)
    assert branch.update(forked)
    error = refused(branch, world.v(4), ForkError)
    assert "previous hash differs" in str(error)


def test_fork_from_a_parallel_genesis(world: World) -> None:
    parallel = SimulatedDomain.create()  # same domain id, another genesis
    parallel.transition([parallel.rotate_domain_key_change()])
    refused(world.chain_at(1), parallel.head, ForkError)


@pytest.mark.parametrize(("at", "offered"), [(1, 3), (1, 5), (2, 4), (3, 5)])
def test_gap(world: World, at: int, offered: int) -> None:
    chain = world.chain_at(at)
    refused(chain, world.v(offered), ChainGapError)
    for version in range(at + 1, offered + 1):  # fetching the missing states fixes it
        assert chain.update(world.v(version))


# --- who signed ---------------------------------------------------------------------------


def test_state_signed_by_unknown_host(world: World) -> None:
    refused(world.chain_at(2), world.evil.sign_with_unknown_host(world.v(3)), UnknownSignerError)
    # An unknown host that borrows a trusted host's name does not verify either.
    rogue = new_host("test", "hsa-1")
    forged = world.evil.resign(world.v(3), rogue.signer, "hsa-1")
    refused(world.chain_at(2), forged, BadSignatureError)


def test_state_signed_by_host_removed_in_previous_state(world: World) -> None:
    hsa3 = world.sim.hosts["hsa-3"]
    refused(
        world.chain_at(3), world.evil.resign(world.v(4), hsa3.signer, "hsa-3"), UnknownSignerError
    )


def test_host_added_by_the_state_cannot_produce_it(world: World) -> None:
    # Trust comes from the previous state: a new host cannot vouch for its own admission.
    sim = world.sim
    proposal = sim.propose([sim.add_host_change("hsa-4")], base=world.v(5))
    approvals = sim.approve(proposal, [0, 1])
    honest = sim.apply(proposal, approvals, producer="hsa-1", base=world.v(5), append=False)
    self_admitted = world.evil.resign(honest, sim.hosts["hsa-4"].signer, "hsa-4")
    refused(world.chain_at(5), self_admitted, UnknownSignerError)
    assert world.chain_at(5).update(honest)


def test_removed_host_cannot_produce_its_own_removal(world: World) -> None:
    """FINDING: the host a transition removes must not be the one that produces it.

    Otherwise a compromised host that the operators are removing (and a malicious coordinator
    that hands it the approved proposal) generates the "new" domain key itself, and so can
    read every key token sealed after its removal.
    """
    sim, v2 = world.sim, world.v(2)
    proposal, approvals = world.proposals[3], list(world.v(3).approvals)
    manifest, _ = transition.next_manifest(
        sim.state_head(v2), proposal, approvals, now=world.v(3).manifest.created_at
    )
    keys_known_to_hsa3 = sealing.next_domain_keys(sim.keys_at(v2, "hsa-3"), manifest)
    sealed = sealing.seal_state(
        manifest,
        keys_known_to_hsa3,
        producer_host_id="hsa-1",  # seal_state itself refuses a removed producer's id
        producer=sim.hosts["hsa-3"].signer,
        proposal=proposal,
        approvals=approvals,
    )
    own_removal = MaliciousCoordinator.rebuild(sealed, producer_host_id="hsa-3")
    # hsa-3 knows the key that the remaining hosts would use from now on.
    assert sim.keys_at(own_removal, "hsa-1")[2] == keys_known_to_hsa3[2]
    refused(world.chain_at(2), own_removal, UnknownSignerError)


def test_producer_id_and_signature_must_agree(world: World) -> None:
    v3 = world.v(3)
    claimed = world.evil.rebuild(v3, producer_host_id="hsa-2")  # signed by hsa-1
    refused(world.chain_at(2), claimed, BadSignatureError)
    wrong_key = world.evil.resign(v3, world.sim.hosts["hsa-2"].signer, "hsa-1")
    refused(world.chain_at(2), wrong_key, BadSignatureError)


def test_mix_and_match(world: World) -> None:
    v2, v3 = world.v(2), world.v(3)
    other = world.sim.propose([world.sim.rotate_domain_key_change()], base=v2)  # generation 2
    v3b = world.sim.apply(other, world.sim.approve(other, [0, 1]), base=v2, append=False)
    chain = world.chain_at(2)
    # manifest of v3, secrets and signature of v3b
    refused(chain, world.evil.mix(manifest_from=v3, secrets_from=v3b), BadSignatureError)
    # manifest and secrets of v3, signature of v3b (a trusted host's signature, other state)
    refused(chain, world.evil.mix(v3, v3, signature_from=v3b), BadSignatureError)
    # v3's manifest with v4's secrets (same key generation) and v3's signature
    refused(chain, world.evil.mix(v3, world.v(4), signature_from=v3), BadSignatureError)
    # v3's manifest with v2's secrets (another generation: not even well-formed)
    mixed = world.evil.rebuild_bytes(v3, secrets=v2.message.secrets)
    refused(chain, mixed, MalformedMessageError)
    # v4's signature on v3
    refused(chain, world.evil.mix(v3, v3, signature_from=world.v(4)), BadSignatureError)


@pytest.mark.parametrize("part", ["manifest", "secrets", "producer_signature"])
def test_flipped_bit_in_signed_parts(world: World, part: str) -> None:
    v3 = world.v(3)
    length = len(getattr(v3.message, part)) * 8
    for bit in (0, length // 3, length // 2, length - 1):
        refused(world.chain_at(2), world.evil.flip_part_bit(v3, part, bit))


# --- genesis and domain ------------------------------------------------------------------


def test_wrong_genesis_hash(world: World) -> None:
    with pytest.raises(GenesisMismatchError):
        TrustedChain.from_genesis("test", b"\x00" * 32, world.v(1))
    with pytest.raises(GenesisMismatchError):
        TrustedChain.from_genesis("test", world.sim.genesis_hash, SimulatedDomain.create().genesis)
    with pytest.raises(GenesisMismatchError):
        TrustedChain.from_genesis("test", world.v(2).hash, world.v(2))
    with pytest.raises(GenesisMismatchError):
        verify_chain("test", world.sim.genesis_hash, [])


def test_other_domain(world: World) -> None:
    with pytest.raises(WrongDomainError):
        TrustedChain.from_genesis("other", world.sim.genesis_hash, world.v(1))
    other = SimulatedDomain.create(domain_id="other")
    other.transition([other.rotate_domain_key_change()])
    refused(world.chain_at(1), other.head, WrongDomainError)
    refused(world.chain_at(1), other.genesis, WrongDomainError)


def test_resume(world: World) -> None:
    resumed = TrustedChain.resume("test", world.sim.genesis_hash, world.v(3))
    assert resumed.update(world.v(4))
    with pytest.raises(WrongDomainError):
        TrustedChain.resume("other", world.sim.genesis_hash, world.v(3))
    with pytest.raises(GenesisMismatchError):
        TrustedChain.resume("test", b"\x01" * 32, world.v(1))
    other = world.sim.propose([world.sim.set_quorum_change(1)], base=world.v(1))
    fork2 = world.sim.apply(other, world.sim.approve(other, [0, 1]), base=world.v(1), append=False)
    remembered = TrustedChain.resume(
        "test", world.sim.genesis_hash, world.v(3), known_hashes={2: world.v(2).hash}
    )
    refused(remembered, fork2, ForkError)


# --- evidence: proposal and approvals ---------------------------------------------------------


def _approvals_case(world: World, case: str) -> list[domain_pb2.Approval]:
    proposal, sim = world.proposals[2], world.sim
    a0, a1 = sim.approve(proposal, [0, 1])
    other = sim.propose([sim.set_quorum_change(3)], base=world.v(1))
    outsider = new_operator("mallory", SignatureAlgorithm.ED25519)
    cases = {
        "none": [],
        "one": [a0],
        "duplicate": [a0, a0],
        "forged signature": [a0, world.evil.forged_approval(a1, signature=bytes(64))],
        "signature moved": [a0, world.evil.forged_approval(a0, operator_id=a1.operator_id)],
        "other proposal": [a0, sim.approve(other, [1])[0]],
        "outsider": [a0, quorum.approve(proposal, outsider.signer)],
        # op3 is added by this very proposal: it is not an operator of the state it applies to.
        "operator approving its own addition": [a0, sim.approve(proposal, [3])[0]],
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "none",
        "one",
        "duplicate",
        "forged signature",
        "signature moved",
        "other proposal",
        "outsider",
        "operator approving its own addition",
    ],
)
def test_too_few_valid_approvals_inside_a_state(world: World, case: str) -> None:
    tampered = world.evil.replace_approvals(world.v(2), _approvals_case(world, case))
    assert tampered.hash == world.v(2).hash  # approvals are not under the hash ...
    refused(world.chain_at(1), tampered, QuorumNotMetError)  # ... but are verified


def test_expired_proposal_inside_a_state(world: World) -> None:
    sim = world.sim
    base = world.v(5)
    proposal = sim.propose([sim.set_quorum_change(1)], base=base, now=sim.now, expires_in=600)
    approvals = sim.approve(proposal, [0, 1])
    forged = world.evil.forge(proposal, approvals, base=base, now=proposal.expires_at)
    refused(world.chain_at(5), forged, ProposalExpiredError)
    on_time = world.evil.forge(proposal, approvals, base=base, now=proposal.expires_at - 1)
    assert world.chain_at(5).update(on_time)


@pytest.mark.parametrize("walk_around", ["lower remove-host", "add a puppet"])
def test_walk_around_of_a_higher_threshold_is_refused(walk_around: str) -> None:
    """Issue 13, item 3: a producing HSA that took two approvals for a change that lowers
    remove-host's threshold of 3, or adds an operator, is caught by every verifier."""
    sim = SimulatedDomain.create(
        change_thresholds=[
            domain_pb2.ChangeThreshold(change_type=domain_pb2.CHANGE_TYPE_REMOVE_HOST, threshold=3)
        ]
    )
    evil = MaliciousCoordinator(sim)
    change = (
        sim.set_quorum_change(2, domain_pb2.CHANGE_TYPE_REMOVE_HOST)
        if walk_around == "lower remove-host"
        else sim.add_operator_change("puppet")
    )
    proposal = sim.propose([change])
    forged = evil.forge(proposal, sim.approve(proposal, [0, 1]))
    error = refused(sim.chain(), forged, QuorumNotMetError)
    assert "2 of 3 approvals" in str(error)
    assert "because" in str(error)
    honest = evil.forge(proposal, sim.approve(proposal, [0, 1, 2]))
    assert sim.chain().update(honest)


def test_approvals_of_operator_removed_earlier_do_not_count(world: World) -> None:
    sim = world.sim
    proposal = sim.propose([sim.set_quorum_change(3)], base=world.v(5))
    approvals = sim.approve(proposal, [0, 2])  # op2 was removed in v4
    forged = world.evil.forge(proposal, approvals, base=world.v(5))
    refused(world.chain_at(5), forged, QuorumNotMetError)


def test_replayed_proposal_is_stale(world: World) -> None:
    # An old, properly approved proposal attached to a new state that claims to apply it.
    sim, replayed = world.sim, world.proposals[2]

    def claim_replayed(manifest: domain_pb2.Manifest) -> None:
        manifest.proposal_id = replayed.id

    manifest = sim.manifest_after(None, base=world.v(5), mutate=claim_replayed)
    replay = sim.seal(
        manifest,
        base=world.v(5),
        producer="hsa-1",
        proposal=replayed,
        approvals=list(world.v(2).approvals),
    )
    error = refused(world.chain_at(5), replay, StaleProposalError)
    assert "domain is at version 5, this proposal is for 1" in str(error)


def _add_rogue_host(manifest: domain_pb2.Manifest) -> None:
    manifest.hosts.append(new_host("test", "rogue").record)


def _add_rogue_operator(manifest: domain_pb2.Manifest) -> None:
    manifest.operators.append(new_operator("rogue").record)


def _lower_threshold(manifest: domain_pb2.Manifest) -> None:
    manifest.quorum.threshold = 1


def _skip_rotation(manifest: domain_pb2.Manifest) -> None:
    del manifest.key_generations[-1]


def _backdate_generation(manifest: domain_pb2.Manifest) -> None:
    manifest.key_generations[-1].created_at -= 1


def _longer_rotation_interval(manifest: domain_pb2.Manifest) -> None:
    manifest.settings.key_rotation_interval_seconds *= 2


def _name_other_proposal(manifest: domain_pb2.Manifest) -> None:
    manifest.proposal_id = b"\x01" * 32


def _smuggle_unknown_field(manifest: domain_pb2.Manifest) -> None:
    raw = manifest.SerializeToString(deterministic=True) + b"\xf8\x07\x01"  # field 127 = 1
    manifest.ParseFromString(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        _add_rogue_host,
        _add_rogue_operator,
        _lower_threshold,
        _skip_rotation,
        _backdate_generation,
        _longer_rotation_interval,
        _name_other_proposal,
        _smuggle_unknown_field,
    ],
)
def test_manifest_not_what_the_proposal_produces(
    world: World, mutate: Callable[[domain_pb2.Manifest], None]
) -> None:
    proposal = world.proposals[3]  # remove-host hsa-3, rotates
    forged = world.evil.forge(
        proposal,
        list(world.v(3).approvals),
        base=world.v(2),
        now=world.v(3).manifest.created_at,
        mutate=mutate,
    )
    refused(world.chain_at(2), forged, TransitionMismatchError)


def test_state_carrying_another_proposal(world: World) -> None:
    # v3's signed manifest (made by proposal 3) with proposal 2 and its approvals attached.
    swapped = world.evil.rebuild(
        world.v(3),
        proposal=world.proposals[2].raw,
        approvals=list(world.v(2).approvals),
    )
    refused(world.chain_at(2), swapped, TransitionMismatchError)


# --- scheduled rotations ---------------------------------------------------------------------


def test_rotation_not_due(world: World) -> None:
    due = world.sim.rotation_due_at(world.v(4))
    early = world.evil.forge(None, base=world.v(4), now=due - 1)
    refused(world.chain_at(4), early, RotationNotDueError)
    on_time = world.evil.forge(None, base=world.v(4), now=due)
    assert world.chain_at(4).update(on_time)


def test_rotation_with_approvals_attached(world: World) -> None:
    with_approvals = world.evil.replace_approvals(world.v(5), list(world.v(4).approvals))
    error = refused(world.chain_at(4), with_approvals, TransitionMismatchError)
    assert "approvals but no proposal" in str(error)


def test_rotation_with_a_proposal_attached(world: World) -> None:
    dressed = world.evil.rebuild(world.v(5), proposal=world.proposals[4].raw)
    refused(world.chain_at(4), dressed)


def test_rotation_that_also_changes_hosts(world: World) -> None:
    forged = world.evil.forge(
        None, base=world.v(4), now=world.v(5).manifest.created_at, mutate=_add_rogue_host
    )
    refused(world.chain_at(4), forged, TransitionMismatchError)


def test_proposal_state_presented_as_rotation(world: World) -> None:
    stripped = world.evil.rebuild(world.v(3), proposal=b"")
    refused(world.chain_at(2), stripped, TransitionMismatchError)
    bare = world.evil.rebuild(world.v(3), proposal=b"", approvals=[])
    refused(world.chain_at(2), bare, TransitionMismatchError, RotationNotDueError)


# --- any single flipped bit -----------------------------------------------------------------


@dataclass
class FlipTarget:
    chain_head: SealedState
    raw: bytes
    evidence_start: int  # byte offset where the approvals begin


@pytest.fixture(scope="module")
def flip_target() -> FlipTarget:
    """v2 carrying exactly threshold (2 of 3) approvals: one Ed25519, one ECDSA P-256."""
    sim = SimulatedDomain.create()
    proposal = sim.propose([sim.add_operator_change("dave")])
    state = sim.apply(proposal, sim.approve(proposal, [0, 1]))
    raw = state.to_bytes()
    tail = MaliciousCoordinator.rebuild_bytes(state, manifest=b"", secrets=b"", proposal=b"")
    return FlipTarget(sim.genesis, raw, len(raw) - len(tail))


def _assert_flip_refused(target: FlipTarget, bit: int) -> None:
    chain = TrustedChain("test", target.chain_head.hash, target.chain_head)
    raw = bytearray(target.raw)
    raw[bit // 8] ^= 0x80 >> (bit % 8)
    refused(chain, bytes(raw))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_bit_of_the_state_is_refused(
    flip_target: FlipTarget, data: st.DataObject
) -> None:
    bit = data.draw(st.integers(min_value=0, max_value=len(flip_target.raw) * 8 - 1))
    _assert_flip_refused(flip_target, bit)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_bit_of_the_evidence_is_refused(
    flip_target: FlipTarget, data: st.DataObject
) -> None:
    # Approvals, producer id and signature: the part of the bytes not under the state hash.
    bit = data.draw(
        st.integers(
            min_value=flip_target.evidence_start * 8, max_value=len(flip_target.raw) * 8 - 1
        )
    )
    _assert_flip_refused(flip_target, bit)


# --- whole chains -----------------------------------------------------------------------------

STEPS = [
    "op", "host", "rotate-key", "quorum3", "scheduled", "remove-host", "op", "scheduled",
    "quorum2", "host", "remove-op", "scheduled", "rotate-key", "host", "scheduled",
    "settings", "remove-host", "op", "scheduled",
]  # fmt: skip


@pytest.fixture(scope="module")
def long_chain() -> SimulatedDomain:
    """20 states: genesis and 19 transitions mixing proposals and scheduled rotations."""
    sim = SimulatedDomain.create()
    for step in STEPS:
        sim.advance(DAY if step == "scheduled" else 60)
        if step == "scheduled":
            sim.rotate()
            continue
        change = {
            "op": lambda: sim.add_operator_change(),
            "host": lambda: sim.add_host_change(),
            "rotate-key": sim.rotate_domain_key_change,
            "quorum3": lambda: sim.set_quorum_change(3),
            "quorum2": lambda: sim.set_quorum_change(2),
            "remove-host": lambda: sim.remove_host_change(sim.current_host_ids()[-1]),
            "remove-op": lambda: sim.remove_operator_change(sim.current_operator_indexes()[0]),
            "settings": lambda: sim.set_settings_change(key_generations_retained=3),
        }[step]()
        sim.transition([change])
    assert sim.version == 20
    return sim


def test_verify_chain_of_20_states(long_chain: SimulatedDomain) -> None:
    chain = verify_chain("test", long_chain.genesis_hash, long_chain.states)
    assert chain.version == 20
    assert chain.head is long_chain.head
    kinds = ["rotation" if s.proposal is None else "proposal" for s in long_chain.states[1:]]
    assert kinds.count("rotation") == STEPS.count("scheduled")


@pytest.mark.parametrize("index", range(1, 20))
def test_verify_chain_refuses_each_state_out_of_place(
    long_chain: SimulatedDomain, index: int
) -> None:
    states = list(long_chain.states)
    target = index + 1 if index < 19 else 1
    moved = states[:]
    moved.insert(target, moved.pop(index))
    with pytest.raises(ChainError):
        verify_chain("test", long_chain.genesis_hash, moved)
    if index < 19:  # dropping the last state leaves a valid, shorter chain
        with pytest.raises(ChainGapError):
            verify_chain("test", long_chain.genesis_hash, states[:index] + states[index + 1 :])
    with pytest.raises(ForkError, match="appears twice"):
        verify_chain("test", long_chain.genesis_hash, [*states[: index + 1], states[index]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=st.permutations(list(range(20))))
def test_verify_chain_refuses_any_shuffle(long_chain: SimulatedDomain, order: list[int]) -> None:
    if order == sorted(order):
        return
    shuffled = MaliciousCoordinator.reorder(long_chain.states, order)
    with pytest.raises(HsmDomainError):
        verify_chain("test", long_chain.genesis_hash, shuffled)


def test_verify_chain_reversed(long_chain: SimulatedDomain) -> None:
    with pytest.raises(GenesisMismatchError):
        verify_chain("test", long_chain.genesis_hash, list(reversed(long_chain.states)))


def test_verify_successor_checks_the_domain_itself(world: World) -> None:
    # verify_successor is public: it must not rely on TrustedChain.classify for this.
    other = SimulatedDomain.create(domain_id="other")
    other.transition([other.rotate_domain_key_change()])
    with pytest.raises(WrongDomainError):
        chain_module.verify_successor(world.v(1), other.head)
    assert chain_module.verify_successor(world.v(1), world.v(2)) is not None
    assert chain_module.verify_successor(world.v(4), world.v(5)) is None  # a rotation


def test_post_dated_state_is_refused_against_the_verifiers_clock() -> None:
    sim = SimulatedDomain.create()
    start = sim.now
    trusted = sim.chain()
    # A state sealed half an hour ahead of the verifier's clock: a producer with a wrong (or lying)
    # clock could make a rotation due early or stall honest producers.
    future = sim.transition([sim.rotate_domain_key_change()], now=start + 1800, append=False)
    with pytest.raises(FutureStateError, match="in the future"):
        trusted.update(future, now=start)
    assert trusted.version == 1
    # Within the allowed skew, and with no clock given (replaying verified states), it is fine.
    assert trusted.update(future, now=start + 1800 - 200)


def test_a_state_whose_proposal_its_proposer_never_signed_is_refused() -> None:
    """Issue 21, item 4: bob and carol approve a set-quorum 1 that names alice as proposer;
    a trusted host that seals it anyway (a compromised host with a lying coordinator) is
    caught by every verifier, whatever the threshold."""
    sim = SimulatedDomain.create()  # 3 operators, threshold 2
    evil = MaliciousCoordinator(sim)
    proposal = sim.propose([sim.set_quorum_change(1)], proposer=0)
    forged = evil.forge(proposal, sim.approve(proposal, [1, 2]))
    error = refused(sim.chain(), forged, QuorumNotMetError)
    assert "not signed by the proposer it names" in str(error)
    with pytest.raises(QuorumNotMetError):
        verify_chain(sim.domain_id, sim.genesis_hash, [sim.genesis, forged])
    honest = evil.forge(proposal, sim.approve(proposal, [0, 1]))
    assert sim.chain().update(honest)
