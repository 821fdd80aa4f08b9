"""Who may call an HSA, against real `hsa-node` processes (issue 21, item 9).

The review reached `RotateDomainKey` and `InstallState` with a `coordinator/rogue` certificate
issued by the domain CA, and `Diagnostics.Echo` answered HSA and coordinator certificates.
Here the attacker holds the local domain's CA key (DIR/ca/ca.key) and issues itself what it
likes: another coordinator name, a second certificate for the coordinator's own name, an HSA's
name. Each service admits exactly the kinds docs/runtime.md names, and HsaAdmin only the
coordinator the node config pins (`coordinator_identity`, `coordinator_fingerprints`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.hsa_nodes import (
    DEADLINE,
    ROTATE,
    Domain,
    code_of,
    details_of,
    propose,
    rpc_error,
    stub,
)
from support.hsa_nodes import Processes as Nodes

from domain_core.model import SealedState
from domain_core.pki import SpiffeId, SpiffeKind, certificate_fingerprint
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes(domain: Domain) -> Iterator[Nodes]:
    running = Nodes(domain)
    try:
        yield running
    finally:
        running.kill_all()


def issued(domain: Domain, kind: SpiffeKind, name: str) -> transport.TlsMaterial:
    """A fresh certificate for `kind`/`name` from the domain's own CA key (DIR/ca/ca.key)."""
    ca = load_domain_ca(domain.layout.root / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        SpiffeId(domain.layout.domain_id, kind, name), key.public_key(), now=datetime.now(UTC)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return transport.TlsMaterial(domain.layout.ca_cert.read_bytes(), cert, key_pem)


def as_holder(nodes: Nodes, host: str, tls: transport.TlsMaterial) -> grpc.Channel:
    channel = transport.mtls_channel(nodes.addresses[host], tls, transport.hsa_host(host))
    nodes.channels.append(channel)
    return channel


def admin_calls(domain: Domain, admin: Any) -> dict[str, Callable[[], object]]:
    """Every HsaAdmin call that changes or produces a state, with valid content."""
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    return {
        "ApplyProposal": lambda: admin.ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
            timeout=DEADLINE,
        ),
        "RotateDomainKey": lambda: admin.RotateDomainKey(
            services_pb2.ScheduledRotationRequest(), timeout=DEADLINE
        ),
        "InstallState": lambda: admin.InstallState(
            services_pb2.InstallStateRequest(state=domain.genesis.message), timeout=DEADLINE
        ),
    }


def test_init_pins_the_coordinator_it_issued(domain: Domain) -> None:
    coordinator_cert = domain.tls("coordinator").cert_pem
    for path in domain.layout.node_configs.values():
        config = NodeConfig.load(path)
        assert config.coordinator_identity == "spiffe://local/coordinator/coordinator"
        assert config.coordinator_fingerprints == (certificate_fingerprint(coordinator_cert).hex(),)


@pytest.mark.parametrize(
    ("kind", "name"),
    [("coordinator", "rogue"), ("coordinator", "coordinator"), ("hsa", "hsa-2")],
    ids=["another-coordinator-name", "second-certificate-of-the-coordinator", "a-host"],
)
def test_hsa_admin_refuses_all_but_the_pinned_coordinator(
    domain: Domain, nodes: Nodes, kind: SpiffeKind, name: str
) -> None:
    nodes.start("hsa-1")
    impostor = as_holder(nodes, "hsa-1", issued(domain, kind, name))
    admin = stub(services_pb2_grpc.HsaAdminStub, impostor)
    for method, call in admin_calls(domain, admin).items():
        error = rpc_error(call)
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED, method
        assert f"spiffe://local/{kind}/{name}" in details_of(error), method
    # Nothing happened: the node is where it was, and the public status still answers.
    status = admin.GetStatus(services_pb2.HsaStatusRequest(), timeout=DEADLINE)
    assert (status.version, status.domain_key_generation) == (1, 1)
    # The pinned coordinator itself is served.
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    assert nodes.apply("hsa-1", proposal, approvals).version == 2


def test_a_second_coordinator_certificate_is_named_in_the_refusal(
    domain: Domain, nodes: Nodes
) -> None:
    nodes.start("hsa-1")
    twin = issued(domain, "coordinator", "coordinator")
    admin = stub(services_pb2_grpc.HsaAdminStub, as_holder(nodes, "hsa-1", twin))
    error = rpc_error(admin_calls(domain, admin)["RotateDomainKey"])
    assert "not the one this HSA pins" in details_of(error)
    assert certificate_fingerprint(twin.cert_pem).hex()[:16] in details_of(error)


def test_without_a_pinned_coordinator_no_one_administers_the_hsa(
    domain: Domain, nodes: Nodes
) -> None:
    """A node config from before the pin existed: refused, not open to any coordinator."""
    path = domain.layout.node_configs["hsa-1"]
    config = NodeConfig.load(path)
    dataclasses.replace(config, coordinator_identity="", coordinator_fingerprints=()).save(path)
    nodes.start("hsa-1")
    assert "no coordinator pinned" in nodes.log_text("hsa-1")
    admin = nodes.admin("hsa-1")  # the real coordinator's certificate
    for method, call in admin_calls(domain, admin).items():
        error = rpc_error(call)
        assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED, method
        assert "no coordinator pinned" in details_of(error), method
    assert nodes.status("hsa-1").version == 1


def test_a_pin_by_identity_only_still_refuses_other_names(domain: Domain, nodes: Nodes) -> None:
    path = domain.layout.node_configs["hsa-1"]
    dataclasses.replace(NodeConfig.load(path), coordinator_fingerprints=()).save(path)
    nodes.start("hsa-1")
    assert "pinned by id only" in nodes.log_text("hsa-1")
    rogue = stub(
        services_pb2_grpc.HsaAdminStub,
        as_holder(nodes, "hsa-1", issued(domain, "coordinator", "rogue")),
    )
    error = rpc_error(admin_calls(domain, rogue)["InstallState"])
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    state: SealedState = nodes.apply("hsa-1", proposal, approvals)
    assert state.version == 2


@pytest.mark.parametrize("who", ["coordinator", "hsa-2"])
def test_echo_is_for_applications_only(domain: Domain, nodes: Nodes, who: str) -> None:
    nodes.start("hsa-1")
    request = services_pb2.EchoMessage(payload=b"ping")
    refused = stub(services_pb2_grpc.DiagnosticsStub, nodes.channel("hsa-1", who))
    error = rpc_error(lambda: refused.Echo(request, timeout=DEADLINE))
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    assert "it is for client identities" in details_of(error)
    app = stub(services_pb2_grpc.DiagnosticsStub, nodes.channel("hsa-1", "demo-app"))
    assert app.Echo(request, timeout=DEADLINE).payload == b"ping"
