"""A real domain of processes: the quorum flow, membership changes, outages and mutual TLS.

Every test starts its own coordinator and HSA processes on 127.0.0.1 with OS-chosen ports
(`support.cluster.LocalCluster`); they are killed at teardown whatever the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from support.cluster import LocalCluster

from deploy.enrollment import VerifiedEnrollment
from domain_core import pki
from domain_edge.ca_files import load_domain_ca
from domain_edge.transport import hsa_host, secure_channel
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster


def _remove_host(host_id: str) -> domain_pb2.Change:
    return domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id=host_id))


def _add_host(enrollment: VerifiedEnrollment) -> domain_pb2.Change:
    return domain_pb2.Change(add_host=domain_pb2.AddHost(enrollment=enrollment.raw))


def _rotate() -> domain_pb2.Change:
    return domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey())


def _statuses(cluster: LocalCluster, hosts: list[str]) -> dict[str, services_pb2.HsaStatus]:
    return {host: cluster.node_status(host) for host in hosts}


def _all_at(cluster: LocalCluster, hosts: list[str], version: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            statuses = _statuses(cluster, hosts)
        except Exception:
            return False
        hashes = {s.state_hash for s in statuses.values()}
        return (
            all(s.version == version and s.healthy for s in statuses.values()) and len(hashes) == 1
        )

    return check


def _apply(
    cluster: LocalCluster, changes: list[domain_pb2.Change], approvers: tuple[str, ...]
) -> int:
    """Propose as the first approver, approve with the rest; returns the applied version."""
    with cluster.coordinator_client() as client:
        view = client.propose(changes, cluster.operator_signer(approvers[0]), reason="test")
        for name in approvers[1:]:
            view = client.approve(view.proposal_id, cluster.operator_signer(name))
    assert view.applied, view.detail
    return view.applied_version


@pytest.fixture
def cluster(local_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster(nodes=3, operators=3, quorum=2)


GENESIS_NODES = ["hsa-1", "hsa-2", "hsa-3"]


def test_one_approval_does_not_change_the_domain_the_second_does(cluster: LocalCluster) -> None:
    before = _statuses(cluster, GENESIS_NODES)
    assert {s.version for s in before.values()} == {1}
    with cluster.coordinator_client() as client:
        view = client.propose([_rotate()], cluster.operator_signer("alice"), reason="rotate")
        assert view.state == "pending"
        assert view.threshold == 2
        assert len(view.approvals) == 1
        # Nothing moves on one approval: give a change the time it would need to spread.
        time.sleep(1.5)
        assert {s.version for s in _statuses(cluster, GENESIS_NODES).values()} == {1}
        assert client.latest_state().version == 1
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.state == "applied"
    assert view.applied_version == 2
    cluster.wait_for(_all_at(cluster, GENESIS_NODES, 2), timeout=10, what="all nodes on v2")
    after = _statuses(cluster, GENESIS_NODES)
    assert len({s.state_hash for s in after.values()}) == 1
    assert {s.domain_key_generation for s in after.values()} == {2}


def test_add_a_fourth_node_then_remove_one(cluster: LocalCluster) -> None:
    host = cluster.add_node("hsa-4", start=True)
    assert cluster.node_status("hsa-4").member is False or not cluster.node_status("hsa-4").healthy
    version = _apply(cluster, [_add_host(host)], ("alice", "carol"))
    everyone = [*GENESIS_NODES, "hsa-4"]
    cluster.wait_for(_all_at(cluster, everyone, version), timeout=15, what="hsa-4 joins")
    status = cluster.node_status("hsa-4")
    assert status.member
    assert status.healthy

    generation_before = cluster.node_status("hsa-1").domain_key_generation
    removed_at = _apply(cluster, [_remove_host("hsa-2")], ("bob", "carol"))
    remaining = ["hsa-1", "hsa-3", "hsa-4"]
    cluster.wait_for(_all_at(cluster, remaining, removed_at), timeout=15, what="removal applied")
    assert cluster.node_status("hsa-1").domain_key_generation == generation_before + 1

    def removed_node_stopped() -> bool:
        status = cluster.node_status("hsa-2")
        return not status.member and not status.healthy

    cluster.wait_for(removed_node_stopped, timeout=15, what="hsa-2 notices its removal")
    assert cluster.node_status("hsa-2").version == removed_at - 1

    # The domain goes on without it: a further change reaches the others, not hsa-2.
    later = _apply(cluster, [_rotate()], ("alice", "bob"))
    cluster.wait_for(_all_at(cluster, remaining, later), timeout=15, what="change after removal")
    assert cluster.node_status("hsa-2").version == removed_at - 1


def test_node_catches_up_from_a_peer_while_the_coordinator_is_down(cluster: LocalCluster) -> None:
    cluster.stop_node("hsa-3")
    version = _apply(cluster, [_rotate()], ("alice", "bob"))
    cluster.wait_for(_all_at(cluster, ["hsa-1", "hsa-2"], version), timeout=10, what="v2 on 1, 2")

    cluster.stop_coordinator()
    cluster.start_node("hsa-3", wait_for_health=False)
    cluster.wait_for(
        _all_at(cluster, GENESIS_NODES, version), timeout=20, what="hsa-3 catches up by gossip"
    )

    cluster.start_coordinator()
    with cluster.coordinator_client() as client:
        state = client.latest_state()
        assert state.version == version
        applied = client.list_proposals(include_closed=True)
    assert [v.state for v in applied] == ["applied"]
    assert state.hash == cluster.node_status("hsa-1").state_hash


def test_coordinator_restart_loses_nothing(cluster: LocalCluster) -> None:
    version = _apply(cluster, [_rotate()], ("alice", "carol"))
    with cluster.coordinator_client() as client:
        pending = client.propose([_rotate()], cluster.operator_signer("bob"), reason="pending")
    cluster.kill_coordinator()
    cluster.start_coordinator()
    with cluster.coordinator_client() as client:
        assert client.latest_state().version == version
        view = client.get_proposal(pending.proposal_id)
        assert view.state == "pending"
        assert view.approved_by == pending.approved_by
        view = client.approve(pending.proposal_id, cluster.operator_signer("alice"))
    assert view.applied_version == version + 1
    cluster.wait_for(_all_at(cluster, GENESIS_NODES, version + 1), timeout=10, what="after restart")


def _status_call(
    target: str, ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> Any:
    with secure_channel(
        target, ca_pem, hsa_host("hsa-1"), cert_pem=cert_pem, key_pem=key_pem
    ) as channel:
        stub = services_pb2_grpc.HsaPeerStub(channel)
        return stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=3)


def test_mutual_tls_refuses_strangers(cluster: LocalCluster) -> None:
    target = cluster.address("hsa-1")
    now = datetime.now(UTC)

    with pytest.raises(grpc.RpcError) as no_cert:
        _status_call(target, cluster.ca_pem())
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE

    other_ca = pki.DomainCA.create(cluster.layout.domain_id, now=now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = other_ca.issue(
        pki.SpiffeId(cluster.layout.domain_id, "hsa", "hsa-2"), key.public_key(), now=now
    )
    with pytest.raises(grpc.RpcError) as foreign:
        _status_call(target, cluster.ca_pem(), cert, _pem(key))
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE

    # A certificate from the right CA for a host that is not in the domain state.
    ca = load_domain_ca(cluster.layout.root / "ca")
    stranger = ca.issue(
        pki.SpiffeId(cluster.layout.domain_id, "hsa", "hsa-9"), key.public_key(), now=now
    )
    with pytest.raises(grpc.RpcError) as not_in_state:
        _status_call(target, cluster.ca_pem(), stranger, _pem(key))
    assert not_in_state.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # And the same name as a real host, but not its certificate: still refused.
    impostor = ca.issue(
        pki.SpiffeId(cluster.layout.domain_id, "hsa", "hsa-2"), key.public_key(), now=now
    )
    with pytest.raises(grpc.RpcError) as wrong_key:
        _status_call(target, cluster.ca_pem(), impostor, _pem(key))
    assert wrong_key.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
