"""Real `hsa-node` processes of a domain made by `init_domain`, called over mutual TLS.

Each test builds a fresh domain on disk, starts nodes as real processes (killed in the
fixture finalizer whatever happens) and calls them as the coordinator, the demo application
or another HSA: the quorum flow (apply without installing, install everywhere, persistence),
refusals (rollback, tampering, gaps, too few approvals), gossip while no coordinator runs,
mutual-TLS and identity checks, and removal of a host.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support.hsa_nodes import (
    DEADLINE,
    HOSTS,
    REPO,
    ROTATE,
    Domain,
    advance,
    code_of,
    details_of,
    health_status,
    propose,
    remove_host,
    rpc_error,
    stub,
    wait_for,
)
from support.hsa_nodes import Processes as Nodes

from deploy.init import add_node, load_layout
from domain_core.chain import TrustedChain
from domain_core.model import SealedState
from domain_core.pki import DomainCA, SpiffeId
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes(domain: Domain) -> Iterator[Nodes]:
    running = Nodes(domain)
    try:
        yield running
    finally:
        running.kill_all()


# --- the quorum flow -----------------------------------------------------------------------


def test_apply_seals_the_next_state_without_installing_it(domain: Domain, nodes: Nodes) -> None:
    nodes.start("hsa-1")
    genesis = domain.genesis
    before = nodes.status("hsa-1")
    assert (before.version, before.state_hash) == (1, genesis.hash)
    assert (before.member, before.healthy, before.domain_key_generation) == (True, True, 1)

    proposal, approvals = propose(domain, genesis, ROTATE)
    state = nodes.apply("hsa-1", proposal, approvals)
    assert state.version == 2
    assert state.message.producer_host_id == "hsa-1"
    assert state.manifest.current_generation == 2
    chain = TrustedChain.from_genesis(domain.layout.domain_id, genesis.hash, genesis)
    assert chain.update(state)  # a valid successor, verifiable by anyone

    after = nodes.status("hsa-1")
    assert (after.version, after.state_hash) == (1, genesis.hash)

    error = rpc_error(lambda: nodes.apply("hsa-1", proposal, approvals[:1]))
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "1 of 2" in details_of(error)

    error = rpc_error(
        lambda: nodes.admin("hsa-1").RotateDomainKey(
            services_pb2.ScheduledRotationRequest(), timeout=DEADLINE
        )
    )
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "due in" in details_of(error)


def test_install_on_every_node_persists_across_restart(domain: Domain, nodes: Nodes) -> None:
    nodes.start(*HOSTS)
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    state = nodes.apply("hsa-1", proposal, approvals)
    for host in HOSTS:
        response = nodes.install(host, state)
        assert (response.version, response.state_hash) == (2, state.hash)
        assert nodes.install(host, state).version == 2  # installing again is a no-op
    statuses = [nodes.status(host) for host in HOSTS]
    assert {(s.version, s.state_hash, s.domain_key_generation) for s in statuses} == {
        (2, state.hash, 2)
    }
    assert all(s.healthy and s.member for s in statuses)

    stored = domain.data_dir("hsa-2") / "states" / f"{2:012d}.state"
    assert stored.read_bytes() == state.to_bytes()
    assert stored.stat().st_mode & 0o777 == 0o600
    assert domain.data_dir("hsa-2").stat().st_mode & 0o777 == 0o700

    address = nodes.addresses["hsa-2"]
    assert nodes.stop("hsa-2") == 0
    nodes.start("hsa-2")
    assert nodes.addresses["hsa-2"] == address  # the remembered address is bound again
    restarted = nodes.status("hsa-2")
    assert (restarted.version, restarted.state_hash) == (2, state.hash)
    assert restarted.healthy
    assert "hsa-2" in nodes.log_text("hsa-2").splitlines()[-1]


def test_refuses_rollback_tampering_and_gaps(domain: Domain, nodes: Nodes) -> None:
    nodes.start(*HOSTS)
    v2 = advance(nodes, domain.genesis, ["hsa-1", "hsa-2"])
    before = nodes.status("hsa-1")

    error = rpc_error(lambda: nodes.install("hsa-1", domain.genesis))
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "older" in details_of(error)

    proposal, approvals = propose(domain, v2, ROTATE)
    v3 = nodes.apply("hsa-1", proposal, approvals)
    tampered = domain_pb2.SealedState()
    tampered.CopyFrom(v3.message)
    manifest = bytearray(tampered.manifest)
    manifest[-1] ^= 0x01  # inside proposal_id: still parses, no longer what was signed
    tampered.manifest = bytes(manifest)
    error = rpc_error(
        lambda: nodes.admin("hsa-1").InstallState(
            services_pb2.InstallStateRequest(state=tampered), timeout=DEADLINE
        )
    )
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    assert "signature" in details_of(error)

    # hsa-3 is still at version 1: version 3 skips 2 and no coordinator can fill the gap.
    error = rpc_error(lambda: nodes.install("hsa-3", v3))
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "skips versions" in details_of(error)
    assert nodes.status("hsa-3").version == 1

    after = nodes.status("hsa-1")
    assert (after.version, after.state_hash) == (before.version, before.state_hash)
    assert "refused state version 3" in nodes.log_text("hsa-1")
    assert "refused state version 1" in nodes.log_text("hsa-1")


def test_restarted_node_catches_up_by_gossip_without_coordinator(
    domain: Domain, nodes: Nodes
) -> None:
    nodes.start(*HOSTS)
    v2 = advance(nodes, domain.genesis, HOSTS)
    v3 = advance(nodes, v2, ["hsa-1", "hsa-2"])
    assert nodes.stop("hsa-3") == 0
    states = domain.data_dir("hsa-3") / "states"
    for path in states.iterdir():
        if path.name != f"{1:012d}.state":
            path.unlink()
    peers = {"peers": [{"host_id": h, "address": nodes.addresses[h]} for h in HOSTS]}
    (domain.data_dir("hsa-3") / "peers.json").write_text(json.dumps(peers))

    nodes.start("hsa-3")
    wait_for(lambda: nodes.status("hsa-3").version == 3, what="hsa-3 to reach version 3")
    status = nodes.status("hsa-3")
    assert status.state_hash == v3.hash
    assert (status.healthy, status.domain_key_generation) == (True, 3)
    assert (states / f"{3:012d}.state").read_bytes() == v3.to_bytes()
    assert "from peer hsa-" in nodes.log_text("hsa-3")


# --- who may call what ---------------------------------------------------------------------


def _foreign_tls(domain: Domain, ca: DomainCA, kind: str, name: str) -> TlsMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        SpiffeId(domain.layout.domain_id, kind, name),  # type: ignore[arg-type]
        key.public_key(),
        now=datetime.now(UTC),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return TlsMaterial(ca_pem=domain.layout.ca_cert.read_bytes(), cert_pem=cert, key_pem=key_pem)


def test_mutual_tls_and_caller_identities(domain: Domain, nodes: Nodes) -> None:
    nodes.start("hsa-1")
    address = nodes.addresses["hsa-1"]
    ca_pem = domain.layout.ca_cert.read_bytes()
    status_request = services_pb2.HsaStatusRequest()

    def channel_for(tls: TlsMaterial | None = None) -> grpc.Channel:
        channel = transport.secure_channel(
            address,
            ca_pem,
            transport.hsa_host("hsa-1"),
            cert_pem=tls.cert_pem if tls else None,
            key_pem=tls.key_pem if tls else None,
        )
        nodes.channels.append(channel)
        return channel

    bare = channel_for()
    no_cert = stub(services_pb2_grpc.HsaAdminStub, bare)
    error = rpc_error(lambda: no_cert.GetStatus(status_request, timeout=DEADLINE))
    assert code_of(error) == grpc.StatusCode.UNAVAILABLE

    other_ca = DomainCA.create(domain.layout.domain_id, now=datetime.now(UTC))
    stranger = _foreign_tls(domain, other_ca, "coordinator", "coordinator")
    stranger_stub = stub(
        services_pb2_grpc.HsaAdminStub,
        channel_for(stranger),
    )
    error = rpc_error(lambda: stranger_stub.GetStatus(status_request, timeout=DEADLINE))
    assert code_of(error) == grpc.StatusCode.UNAVAILABLE

    app = nodes.admin("hsa-1", "demo-app")
    assert app.GetStatus(status_request, timeout=DEADLINE).version == 1  # public
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    error = rpc_error(
        lambda: app.ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
            timeout=DEADLINE,
        )
    )
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    assert "client/demo-app" in details_of(error)
    echo = stub(services_pb2_grpc.DiagnosticsStub, nodes.channel("hsa-1", "demo-app"))
    assert echo.Echo(services_pb2.EchoMessage(payload=b"ping"), timeout=DEADLINE).payload == (
        b"ping"
    )
    app_as_peer = stub(services_pb2_grpc.HsaPeerStub, nodes.channel("hsa-1", "demo-app"))
    error = rpc_error(
        lambda: app_as_peer.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
    )
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED

    # A host certificate from the right CA, but not in the domain state.
    ca = load_domain_ca(domain.layout.root / "ca")
    intruder = transport.mtls_channel(
        address, _foreign_tls(domain, ca, "hsa", "hsa-9"), transport.hsa_host("hsa-1")
    )
    nodes.channels.append(intruder)
    error = rpc_error(
        lambda: stub(services_pb2_grpc.HsaPeerStub, intruder).GetStatesAfter(
            services_pb2.StatesAfterRequest(after_version=0), timeout=DEADLINE
        )
    )
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED
    assert "hsa/hsa-9" in details_of(error)

    # A host of the domain gets the verified states.
    peer = stub(services_pb2_grpc.HsaPeerStub, nodes.channel("hsa-1", "hsa-2"))
    response = peer.GetStatesAfter(
        services_pb2.StatesAfterRequest(after_version=0), timeout=DEADLINE
    )
    assert [SealedState.from_message(s).hash for s in response.states] == [domain.genesis.hash]
    latest = peer.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
    assert SealedState.from_message(latest).hash == domain.genesis.hash
    assert health_status(nodes.channel("hsa-1")) == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(nodes.channel("hsa-1")).get_services())
    assert {
        "hsmdomain.v1.HsaAdmin",
        "hsmdomain.v1.HsaPeer",
        "hsmdomain.v1.Diagnostics",
        "hsmdomain.v1.KeyService",
    } <= services


# --- removal -------------------------------------------------------------------------------


def test_removed_host_stops_following(domain: Domain, nodes: Nodes) -> None:
    nodes.start(*HOSTS)
    proposal, approvals = propose(domain, domain.genesis, remove_host("hsa-1"))
    error = rpc_error(lambda: nodes.apply("hsa-1", proposal, approvals))
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "removes hsa-1" in details_of(error)

    proposal, approvals = propose(domain, domain.genesis, remove_host("hsa-3"))
    state = nodes.apply("hsa-1", proposal, approvals)
    for host in ("hsa-1", "hsa-2"):
        assert nodes.install(host, state).version == 2
        status = nodes.status(host)
        assert (status.domain_key_generation, status.healthy, status.member) == (2, True, True)

    error = rpc_error(lambda: nodes.install("hsa-3", state))
    assert code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert "removed from the domain at version 2" in details_of(error)
    removed = nodes.status("hsa-3")
    assert (removed.version, removed.member, removed.healthy) == (1, False, False)
    assert "removed" in removed.detail
    assert health_status(nodes.channel("hsa-3")) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "removed from the domain at version 2; stopping to follow" in nodes.log_text("hsa-3")

    # hsa-3's certificate is no longer trusted by the remaining hosts.
    error = rpc_error(
        lambda: stub(services_pb2_grpc.HsaPeerStub, nodes.channel("hsa-1", "hsa-3")).GetLatestState(
            services_pb2.LatestStateRequest(), timeout=DEADLINE
        )
    )
    assert code_of(error) == grpc.StatusCode.PERMISSION_DENIED

    # The removal is remembered across a restart.
    assert nodes.stop("hsa-3") == 0
    nodes.start("hsa-3")
    again = nodes.status("hsa-3")
    assert (again.version, again.member, again.healthy) == (1, False, False)


# --- refusing to start ---------------------------------------------------------------------


def _run_to_exit(domain: Domain, host: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsa_node", "--config", str(domain.layout.node_configs[host])],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )


def test_refuses_to_start_on_wrong_genesis_or_tampered_disk(domain: Domain) -> None:
    config_path = domain.layout.node_configs["hsa-1"]
    config = NodeConfig.load(config_path)
    dataclasses.replace(config, genesis_hash="00" * 32).save(config_path)
    result = _run_to_exit(domain, "hsa-1")
    assert result.returncode == 1
    assert "genesis" in result.stderr.splitlines()[-1]

    config.save(config_path)
    states = domain.data_dir("hsa-1") / "states"
    states.mkdir(parents=True, exist_ok=True)
    forged = domain_pb2.SealedState()
    forged.CopyFrom(domain.genesis.message)
    (states / f"{2:012d}.state").write_bytes(forged.SerializeToString())
    result = _run_to_exit(domain, "hsa-1")
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert f"{2:012d}.state" in last


# --- a host added after genesis ------------------------------------------------------------


def test_new_host_follows_the_chain_and_serves_once_added(domain: Domain, nodes: Nodes) -> None:
    enrollment_path = add_node(domain.layout.root)
    host_id = enrollment_path.parent.name
    config_path = enrollment_path.parent / "config.json"
    config = NodeConfig.load(config_path)
    dataclasses.replace(config, gossip_interval_seconds=0.2).save(config_path)
    domain.layout = load_layout(domain.layout.root)
    nodes.start("hsa-1", host_id)

    waiting = nodes.status(host_id)
    assert (waiting.version, waiting.member, waiting.healthy) == (1, False, False)
    assert "not a host" in waiting.detail
    new_host_channel = nodes.channel(host_id)
    assert health_status(new_host_channel) == health_pb2.HealthCheckResponse.NOT_SERVING

    change = domain_pb2.Change(add_host=domain_pb2.AddHost(enrollment=enrollment_path.read_bytes()))
    proposal, approvals = propose(domain, domain.genesis, [change])
    state = nodes.apply("hsa-1", proposal, approvals)
    for host in ("hsa-1", host_id):
        assert nodes.install(host, state).version == 2
    joined = nodes.status(host_id)
    assert (joined.version, joined.member, joined.healthy) == (2, True, True)
    assert health_status(new_host_channel) == health_pb2.HealthCheckResponse.SERVING

    # The new host is now a peer that hsa-1 serves.
    peer = stub(services_pb2_grpc.HsaPeerStub, nodes.channel("hsa-1", host_id))
    latest = peer.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
    assert SealedState.from_message(latest).hash == state.hash
