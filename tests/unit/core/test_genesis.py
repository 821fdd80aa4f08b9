"""domain_core.genesis: the ceremony, and the genesis hash as the one trust anchor."""

from __future__ import annotations

import pytest
from support.simulator import MaliciousCoordinator, SimulatedDomain, new_host

from domain_core import canonical, genesis, model, sealing
from domain_core.chain import TrustedChain, verify_genesis
from domain_core.errors import (
    GenesisMismatchError,
    QuorumNotMetError,
    TransitionMismatchError,
    UnknownSignerError,
)
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

REMOVE_HOST = domain_pb2.CHANGE_TYPE_REMOVE_HOST


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    return SimulatedDomain.create()


def test_genesis_proposal_shape(sim: SimulatedDomain) -> None:
    proposal = sim.genesis_proposal
    assert proposal is not None
    assert proposal.base_version == 0
    assert proposal.base_state_hash == canonical.ZERO_HASH
    assert proposal.expires_at - proposal.created_at == genesis.GENESIS_LIFETIME_SECONDS
    assert proposal.proposer_id == sim.operators[0].operator_id
    kinds = [model.change_type_name(model.change_type_of(c)) for c in proposal.changes]
    assert kinds == ["add-host"] * 3 + ["add-operator"] * 3 + ["set-quorum", "set-settings"]
    assert proposal.message.reason == "genesis"


def test_genesis_state(sim: SimulatedDomain) -> None:
    state = sim.genesis
    manifest = state.manifest.message
    assert state.version == 1
    assert manifest.previous_state_hash == canonical.ZERO_HASH
    assert manifest.proposal_id == sim.genesis_proposal.id  # type: ignore[union-attr]
    assert manifest.created_at == sim.now
    assert [(g.generation, g.created_at) for g in manifest.key_generations] == [(1, sim.now)]
    assert manifest.quorum.threshold == 2
    pinned = model.default_settings()
    assert sim.ca is not None
    pinned.domain_ca_certificate = sim.ca.certificate_der
    assert manifest.settings == pinned
    assert len(state.approvals) == 3
    for host_id in ("hsa-1", "hsa-2", "hsa-3"):
        assert sorted(sim.keys_at(state, host_id)) == [1]


def test_genesis_hash_pin(sim: SimulatedDomain) -> None:
    chain = TrustedChain.from_genesis("test", sim.genesis_hash, sim.genesis)
    assert chain.version == 1
    assert chain.head is sim.genesis
    result = verify_genesis(sim.genesis, "test", sim.genesis_hash)
    assert result.met
    assert len(result.approved_by) == 3


def test_resealed_genesis_has_another_hash_and_is_refused(sim: SimulatedDomain) -> None:
    # Same ceremony (proposal, approvals, producer, time), but a fresh random domain key.
    resealed = genesis.seal_genesis(
        sim.genesis_proposal,
        sim.genesis_approvals,
        producer_host_id="hsa-1",
        producer=sim.hosts["hsa-1"].signer,
        now=sim.now,
    )
    assert resealed.manifest.raw == sim.genesis.manifest.raw
    assert resealed.hash != sim.genesis_hash
    assert sim.keys_at(resealed, "hsa-1") != sim.keys_at(sim.genesis, "hsa-1")
    with pytest.raises(GenesisMismatchError, match="pinned genesis hash"):
        TrustedChain.from_genesis("test", sim.genesis_hash, resealed)
    # It is a perfectly good genesis for whoever pins it.
    assert TrustedChain.from_genesis("test", resealed.hash, resealed).version == 1


def test_genesis_needs_every_operator(sim: SimulatedDomain) -> None:
    proposal = sim.genesis_proposal
    assert proposal is not None
    for missing in range(3):
        approvals = [a for i, a in enumerate(sim.genesis_approvals) if i != missing]
        with pytest.raises(QuorumNotMetError, match="2 of 3"):
            genesis.seal_genesis(
                proposal,
                approvals,
                producer_host_id="hsa-1",
                producer=sim.hosts["hsa-1"].signer,
                now=sim.now,
            )


def test_genesis_producer_must_be_a_genesis_host(sim: SimulatedDomain) -> None:
    outsider = new_host("test", "hsa-9")
    with pytest.raises(ValueError, match="producing host"):
        genesis.seal_genesis(
            sim.genesis_proposal,
            sim.genesis_approvals,
            producer_host_id="hsa-9",
            producer=outsider.signer,
            now=sim.now,
        )
    signed_by_outsider = MaliciousCoordinator.resign(sim.genesis, outsider.signer, "hsa-9")
    with pytest.raises(UnknownSignerError):
        TrustedChain.from_genesis("test", signed_by_outsider.hash, signed_by_outsider)


def test_genesis_evidence_is_verified_even_under_the_pin(sim: SimulatedDomain) -> None:
    # Approvals and proposal are not under the hash: the pin alone does not vouch for them.
    evil = MaliciousCoordinator(sim)
    two_of_three = evil.replace_approvals(sim.genesis, sim.genesis_approvals[:2])
    assert two_of_three.hash == sim.genesis_hash
    with pytest.raises(QuorumNotMetError):
        TrustedChain.from_genesis("test", sim.genesis_hash, two_of_three)
    no_proposal = evil.rebuild(sim.genesis, proposal=b"", approvals=[])
    with pytest.raises(GenesisMismatchError, match="no genesis proposal"):
        TrustedChain.from_genesis("test", sim.genesis_hash, no_proposal)


def test_forged_genesis_manifest_is_refused_even_if_pinned(sim: SimulatedDomain) -> None:
    proposal = sim.genesis_proposal
    assert proposal is not None
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(sim.genesis.manifest.message)
    manifest.hosts.append(new_host("test", "rogue").record)
    forged = sealing.seal_state(
        manifest,
        {1: bytes(32)},
        producer_host_id="hsa-1",
        producer=sim.hosts["hsa-1"].signer,
        proposal=proposal,
        approvals=sim.genesis_approvals,
    )
    with pytest.raises(TransitionMismatchError):
        TrustedChain.from_genesis("test", forged.hash, forged)


def test_genesis_settings_and_typed_thresholds() -> None:
    settings = domain_pb2.DomainSettings(
        key_rotation_interval_seconds=3600,
        key_generations_retained=2,
        max_proposal_lifetime_seconds=600,
    )
    sim = SimulatedDomain.create(
        operators=4,
        threshold=2,
        settings=settings,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=4)],
    )
    manifest = sim.genesis.manifest.message
    assert sim.ca is not None
    settings.domain_ca_certificate = sim.ca.certificate_der
    assert manifest.settings == settings
    assert list(manifest.quorum.change_thresholds) == [
        domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=4)
    ]
    assert sim.chain().version == 1


def test_two_ceremonies_give_two_domains() -> None:
    a, b = SimulatedDomain.create(), SimulatedDomain.create()
    assert a.genesis_hash != b.genesis_hash
    with pytest.raises(GenesisMismatchError):
        TrustedChain.from_genesis("test", a.genesis_hash, b.genesis)
