"""A coordinator store restored from an old copy: reported everywhere, then repaired.

The attack: stop the coordinator, replace `coordinator.db` with a copy taken at version 1
while the HSAs are at version 3, start it. What must hold: the coordinator logs "store behind
the HSAs" as soon as an HSA reports its version, `hsm-domain status` says so, the HSAs warn
too, nobody goes back, and the coordinator fetches the newer states from the HSAs, verifies
them against its own chain and appends them; then the warning clears, a change approved
meanwhile against the old head is STALE, and a new one applies as usual.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_edge.client import rotate_domain_key
from domain_edge.transport import ANY_HSA, COORDINATOR, TlsMaterial, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

HOSTS = ["hsa-1", "hsa-2", "hsa-3"]
STORE_FILES = ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm")


def copy_store(source: Path, target: Path) -> None:
    """Copy the coordinator's SQLite files (the database and, if present, its WAL)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in STORE_FILES:
        (target / name).unlink(missing_ok=True)
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def apply_rotation(cluster: LocalCluster) -> int:
    with cluster.coordinator_client() as client:
        view = client.propose([rotate_domain_key()], cluster.operator_signer("alice"))
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    return view.applied_version


def versions(cluster: LocalCluster, hosts: list[str]) -> dict[str, int]:
    return {h: cluster.node_status(h).version for h in hosts}


def head(cluster: LocalCluster) -> int:
    with cluster.coordinator_client() as client:
        return client.latest_state().version


def store_behind(cluster: LocalCluster) -> str:
    with cluster.coordinator_client() as client:
        return client.domain_status().store_behind


def hsm_domain_status(cluster: LocalCluster) -> str:
    script = Path(sys.executable).parent / "hsm-domain"
    result = subprocess.run(
        [str(script), "status", str(cluster.directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout


def logs(cluster: LocalCluster, name: str) -> str:
    return cluster.layout.log_file(name).read_text()


def test_a_store_restored_from_an_old_copy_is_reported_and_repaired(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=3)
    store = cluster.layout.root / "coordinator"
    backup = tmp_path / "backup-at-version-1"
    cluster.stop_coordinator()
    copy_store(store, backup)
    cluster.start_coordinator()
    assert apply_rotation(cluster) == 2
    assert apply_rotation(cluster) == 3
    cluster.wait_for(lambda: set(versions(cluster, HOSTS).values()) == {3}, what="all at 3")
    v3_hash = cluster.node_status("hsa-1").state_hash

    # The attack, with the HSAs running.
    cluster.stop_coordinator()
    copy_store(backup, store)
    cluster.start_coordinator()
    # The HSAs report version 3; the coordinator warns, fetches versions 2 and 3 from them,
    # verifies and stores them. No HSA went back meanwhile.
    cluster.wait_for(lambda: head(cluster) == 3, timeout=20, what="the store repaired")
    assert versions(cluster, HOSTS) == {h: 3 for h in HOSTS}
    with cluster.coordinator_client() as client:
        assert client.latest_state().hash == v3_hash
    coordinator_log = logs(cluster, "coordinator")
    assert "WARNING coordinator: store behind the HSAs: hsa-" in coordinator_log
    assert "reports version 3 (RegisterHsa), but this coordinator's store is at version 1" in (
        coordinator_log
    )
    assert "stored version 2 (" in coordinator_log
    assert "repaired the store from the HSAs: versions 2 to 3 verified and stored" in (
        coordinator_log
    )
    cluster.wait_for(lambda: store_behind(cluster) == "", what="the warning clears")

    # Again, this time with every HSA down when the coordinator comes back, so that the
    # state of a coordinator whose store is behind can be looked at.
    cluster.stop_coordinator()
    for host in HOSTS:
        cluster.stop_node(host)
    copy_store(backup, store)
    cluster.start_coordinator()
    assert head(cluster) == 1
    # hsa-1 reports what it holds, as its sync thread does, from an address where nothing
    # answers: the coordinator learns that it is behind but cannot repair yet.
    identity = cluster.layout.node_dir("hsa-1") / "identity"
    hsa_1 = TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )
    with mtls_channel(cluster.coordinator_address, hsa_1, COORDINATOR) as channel:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        answer = stub.RegisterHsa(
            services_pb2.RegisterHsaRequest(
                host_id="hsa-1", address="127.0.0.1:9", version=3, state_hash=v3_hash
            ),
            timeout=5,
        )
    assert answer.version == 1

    def repair_failed() -> str:
        said = store_behind(cluster)
        return said if "the repair stopped at version 1" in said else ""

    said = cluster.wait_for(repair_failed, what="the failed repair in the status")
    assert said.startswith(
        "store behind the HSAs: hsa-1 reports version 3; this coordinator's store is at "
        "version 1; the repair stopped at version 1: hsa-1: UNAVAILABLE"
    ), said
    assert "WARNING: store behind the HSAs: hsa-1 reports version 3" in hsm_domain_status(cluster)

    # A change approved by a quorum against version 1 waits: no HSA can apply it.
    with cluster.coordinator_client() as client:
        waiting = client.propose([rotate_domain_key()], cluster.operator_signer("alice"))
        waiting = client.approve(waiting.proposal_id, cluster.operator_signer("bob"))
    assert waiting.state == "pending"
    assert "no HSA could apply it yet" in waiting.detail

    # The HSAs come back at version 3 (from their own disks: never lower) and register. They
    # start together: a restarted HSA serves keys only once a peer gave it the key floors.
    for host in HOSTS:
        cluster.start_node(host, wait_for_health=False)
    cluster.wait_converged(hosts=HOSTS)
    assert versions(cluster, HOSTS) == {h: 3 for h in HOSTS}
    cluster.wait_for(lambda: head(cluster) == 3, timeout=20, what="the store repaired again")
    cluster.wait_for(lambda: store_behind(cluster) == "", what="the warning clears again")
    assert "store behind" not in hsm_domain_status(cluster)
    with cluster.coordinator_client() as client:
        stale = client.get_proposal(waiting.proposal_id)
    assert stale.state == "stale"
    assert stale.detail == "domain is at version 3, this proposal is for 1: propose again"
    # The HSAs said so too: the coordinator answered their registration with version 1.
    hsa_logs = "".join(logs(cluster, host) for host in HOSTS)
    assert (
        "store behind the HSAs: the coordinator is at version 1, this HSA has verified "
        "version 3" in hsa_logs
    )

    # The domain goes on as usual.
    assert apply_rotation(cluster) == 4
    cluster.wait_for(lambda: set(versions(cluster, HOSTS).values()) == {4}, what="all at 4")


def test_the_coordinator_fetches_states_only_with_its_own_identity(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """HsaAdmin.GetStatesAfter (the repair's source) answers the coordinator identity only."""
    cluster = local_cluster(nodes=1)
    with mtls_channel(cluster.address("hsa-1"), cluster.client_tls(), ANY_HSA) as channel:
        stub: Any = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetStatesAfter(services_pb2.StatesAfterRequest(after_version=0), timeout=5)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details().startswith("spiffe://local/client/demo-app may not call this")
    coordinator = cluster.layout.root / "coordinator"
    tls = TlsMaterial.from_files(
        cluster.layout.ca_cert, coordinator / "tls.crt", coordinator / "tls.key"
    )
    with mtls_channel(cluster.address("hsa-1"), tls, ANY_HSA) as channel:
        stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        states = stub.GetStatesAfter(services_pb2.StatesAfterRequest(after_version=0), timeout=5)
    assert [s.SerializeToString() for s in states.states] == [
        cluster.layout.genesis_state.read_bytes()
    ]
