"""HSA nodes loaded in this process from real files: paths that need a controlled clock, a
fake coordinator, or a misbehaving producer host, which are awkward to reach across processes.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import grpc
import pytest
from support.hsa_nodes import ROTATE, Domain, propose

from deploy.init import add_node, load_layout
from domain_core import crypto, sealing
from domain_core.changes import add_host
from domain_core.enrollment import make_enrollment
from domain_core.errors import (
    ChainGapError,
    FailedPreconditionError,
    ForkError,
    InvalidKeyTokenError,
    PermissionDeniedError,
    RollbackError,
    UnavailableError,
)
from domain_core.identity import HostIdentity
from domain_core.model import SealedState
from domain_core.transition import rotation_due_at
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.identity_files import load_host_identity
from domain_edge.transport import CertificatePeerContext
from domain_proto import domain_pb2, services_pb2
from hsa_node.server import LoadedNode, load_node
from hsa_node.servicers import HsaAdminServicer, HsaPeerServicer
from hsa_node.sync import pull_states

pytestmark = pytest.mark.integration


def load(domain: Domain, host: str) -> LoadedNode:
    return load_node(NodeConfig.load(domain.layout.node_configs[host]))


def as_caller(domain: Domain, who: str) -> grpc.ServicerContext:
    context: grpc.ServicerContext = CertificatePeerContext(domain.tls(who).cert_pem)  # type: ignore[assignment]
    return context


def unavailable() -> int:
    raise UnavailableError("no coordinator in this test")


def test_install_state_fetches_the_missing_states_on_a_gap(domain: Domain) -> None:
    first, second = load(domain, "hsa-1").node, load(domain, "hsa-2").node
    admin1 = HsaAdminServicer(first, unavailable, coordinator=domain.coordinator_pin())
    coordinator = as_caller(domain, "coordinator")
    head = domain.genesis
    for _ in range(2):
        proposal, approvals = propose(domain, head, ROTATE)
        request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
        head = SealedState.from_message(admin1.ApplyProposal(request, coordinator))
        assert first.offer(head)
    assert first.version == 3

    without_coordinator = HsaAdminServicer(
        second, unavailable, coordinator=domain.coordinator_pin()
    )
    install = services_pb2.InstallStateRequest(state=head.message)
    with pytest.raises(ChainGapError):
        without_coordinator.InstallState(install, coordinator)
    assert second.version == 1

    calls: list[int] = []

    def fetch(after: int) -> list[domain_pb2.SealedState]:
        calls.append(after)
        return [s.message for s in first.states_after(after, 100)]

    def catch_up() -> int:
        return pull_states(second, fetch, "test coordinator")

    response = HsaAdminServicer(
        second, catch_up, coordinator=domain.coordinator_pin()
    ).InstallState(install, coordinator)
    assert (response.version, response.state_hash) == (3, head.hash)
    assert calls == [1, 3]  # the second batch is empty: caught up
    assert second.status().healthy

    # Offering an already-installed older state is a rollback, and changes nothing.
    with pytest.raises(RollbackError):
        second.offer(first.states_after(1, 1)[0])
    assert second.version == 3


def test_scheduled_rotation_is_sealed_only_when_due(domain: Domain) -> None:
    node = load(domain, "hsa-1").node
    due = rotation_due_at(domain.genesis.manifest)
    coordinator = as_caller(domain, "coordinator")
    early = HsaAdminServicer(
        node, unavailable, clock=lambda: float(due - 10), coordinator=domain.coordinator_pin()
    )
    with pytest.raises(Exception, match="due in 10s"):
        early.RotateDomainKey(services_pb2.ScheduledRotationRequest(), coordinator)

    on_time = HsaAdminServicer(
        node, unavailable, clock=lambda: float(due + 1), coordinator=domain.coordinator_pin()
    )
    message = on_time.RotateDomainKey(services_pb2.ScheduledRotationRequest(), coordinator)
    state = SealedState.from_message(message)
    assert state.proposal is None
    assert state.manifest.current_generation == 2
    assert node.version == 1  # sealed, not installed
    node.clock = lambda: float(due + 1)  # this node's clock agrees that the rotation is due
    assert node.offer(state)
    assert node.status().domain_key_generation == 2


def test_a_state_whose_key_wrap_this_host_cannot_open_is_refused(
    domain: Domain, caplog: pytest.LogCaptureFixture
) -> None:
    """A trusted but misbehaving producer wraps garbage to hsa-2: hsa-2 keeps its last state."""
    producer = load_host_identity(domain.node_dir("hsa-1") / "identity")
    second, third = load(domain, "hsa-2").node, load(domain, "hsa-3").node
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    honest = SealedState.from_message(
        HsaAdminServicer(
            load(domain, "hsa-1").node, unavailable, coordinator=domain.coordinator_pin()
        ).ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
            as_caller(domain, "coordinator"),
        )
    )
    secrets = domain_pb2.SealedSecrets.FromString(honest.message.secrets)
    _, stranger = crypto.x25519_generate()
    for wrap in secrets.wraps:
        if wrap.host_id == "hsa-2":
            wrap.wrapped_key = crypto.seal_to_host(stranger, crypto.new_aes_key())
    forged = domain_pb2.SealedState()
    forged.CopyFrom(honest.message)
    forged.secrets = secrets.SerializeToString(deterministic=True)
    digest = SealedState.from_message(forged).hash
    forged.producer_signature = producer.signer.sign(sealing.state_signing_message(digest))
    state = SealedState.from_message(forged)

    with caplog.at_level(logging.WARNING), pytest.raises(InvalidKeyTokenError):
        second.offer(state, source="test")
    assert second.version == 1
    assert second.status().healthy
    assert "refused state version 2 from test: InvalidKeyTokenError" in caplog.text
    assert not (domain.data_dir("hsa-2") / "states" / f"{2:012d}.state").exists()
    assert third.offer(state)  # the chain itself is valid; only hsa-2's wrap is bad


def test_peer_service_serves_only_hosts_of_the_verified_state(domain: Domain) -> None:
    node = load(domain, "hsa-1").node
    peer = HsaPeerServicer(node)
    response = peer.GetStatesAfter(
        services_pb2.StatesAfterRequest(after_version=0, limit=5), as_caller(domain, "hsa-2")
    )
    assert [SealedState.from_message(s).version for s in response.states] == [1]
    assert (
        peer.GetStatesAfter(
            services_pb2.StatesAfterRequest(after_version=1), as_caller(domain, "hsa-2")
        ).states
        == []
    )
    for outsider in ("coordinator", "demo-app"):
        with pytest.raises(PermissionDeniedError):
            peer.GetLatestState(services_pb2.LatestStateRequest(), as_caller(domain, outsider))


def test_loading_twice_replays_the_stored_chain(domain: Domain) -> None:
    loaded = load(domain, "hsa-1")
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    state = SealedState.from_message(
        HsaAdminServicer(
            loaded.node, unavailable, coordinator=domain.coordinator_pin()
        ).ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
            as_caller(domain, "coordinator"),
        )
    )
    assert loaded.node.offer(state)
    started = time.monotonic()
    again = load(domain, "hsa-1").node
    assert time.monotonic() - started < 5
    assert (again.version, again.head.hash) == (2, state.hash)
    assert again.serving


def test_a_fork_with_a_peer_is_recorded_and_the_node_keeps_serving(
    domain: Domain, caplog: pytest.LogCaptureFixture
) -> None:
    """Two valid versions 2 (say an equivocating coordinator gave one to each host): pulling
    from the peer that holds the other one records the fork on the node, which stays on its
    own verified chain, healthy, and says so in its status."""
    nodes = {host: load(domain, host).node for host in ("hsa-1", "hsa-2", "hsa-3")}
    coordinator = as_caller(domain, "coordinator")
    heads = {}
    for host, node in nodes.items():
        proposal, approvals = propose(domain, domain.genesis, ROTATE)
        request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
        state = SealedState.from_message(
            HsaAdminServicer(node, unavailable, coordinator=domain.coordinator_pin()).ApplyProposal(
                request, coordinator
            )
        )
        assert node.offer(state)
        heads[host] = state
    assert len({s.hash for s in heads.values()}) == 3
    first = nodes["hsa-1"]
    assert first.status().detail == ""

    def gossip_with(peer: str) -> None:
        """What `Syncer.gossip_once` does with one peer."""

        def fetch(after: int) -> list[domain_pb2.SealedState]:
            return [s.message for s in nodes[peer].states_after(max(after - 1, 0), 100)]

        with pytest.raises(ForkError, match="two different states claim version 2"):
            pull_states(first, fetch, f"peer {peer}", lambda s: first.record_fork(s.version, peer))

    with caplog.at_level(logging.ERROR, logger="hsa_node.node"):
        for _ in range(3):
            gossip_with("hsa-2")
        status = first.status()
        assert (status.version, status.state_hash) == (2, heads["hsa-1"].hash)
        assert (status.healthy, status.member, first.serving) == (True, True, True)
        assert status.detail == "fork detected at version 2 with peer hsa-2: investigate"
        gossip_with("hsa-3")
        assert first.status().detail == (
            "fork detected at version 2 with peer hsa-2 (and 1 more): investigate"
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors  # once per fork, however often gossip meets it
    assert errors[0].startswith("fork detected at version 2 with peer hsa-2:")
    assert heads["hsa-1"].hash.hex()[:16] in errors[0]
    assert errors[1].startswith("fork detected at version 2 with peer hsa-3:")
    assert first.domain_keys().generation == 2  # the data plane keeps its keys


def test_a_state_that_lists_this_host_with_other_keys_is_refused_loudly(
    domain: Domain, caplog: pytest.LogCaptureFixture
) -> None:
    """The domain enrolled someone else as hsa-4 (another machine's keys under this host's
    name): the real hsa-4 refuses the state, logs it at ERROR, and its status says so first,
    unhealthy, instead of only logging a key token error."""
    add_node(domain.layout.root, "hsa-4")
    domain.layout = load_layout(domain.layout.root)
    real = load(domain, "hsa-4").node
    assert not real.member

    other = HostIdentity.generate("hsa-4")  # another machine, also holding a CA certificate
    ca = load_domain_ca(domain.layout.root / "ca")
    now = datetime.now(UTC)
    certificate = ca.issue(other.spiffe_id("local"), other.tls_public_key, now=now)
    change = add_host(make_enrollment(other, "local", certificate))
    proposal, approvals = propose(domain, domain.genesis, [change])
    state = SealedState.from_message(
        HsaAdminServicer(
            load(domain, "hsa-1").node, unavailable, coordinator=domain.coordinator_pin()
        ).ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
            as_caller(domain, "coordinator"),
        )
    )
    with (
        caplog.at_level(logging.ERROR, logger="hsa_node.node"),
        pytest.raises(FailedPreconditionError, match="IDENTITY CONFLICT"),
    ):
        real.offer(state)
    assert real.version == 1
    status = real.status()
    assert not status.healthy
    assert status.detail.startswith(
        "IDENTITY CONFLICT: the verified state version 2 lists host hsa-4 with another "
        "signing key, agreement key, TLS certificate than this host's"
    )
    assert "propose remove-host hsa-4" in status.detail
    assert any("IDENTITY CONFLICT" in r.getMessage() for r in caplog.records)
