"""Durability under kill -9: a change lands on all nodes or on none, and no approval is lost.

A real domain (`LocalCluster`: a coordinator and three `hsa-node`s, quorum 2 of 3 unless
said otherwise) is killed at points of a proposal's life that timing alone cannot hit, with
the test-only hook of `domain_edge.faults` (`HSM_UNSAFE_FAULT_POINT`: the process SIGKILLs
itself there): after an approval is stored, once the quorum is reached but before an HSA
applies, after an HSA sealed the state but before the store has it, after the store but
before any push, and during the push (one HSA paused so that it cannot have the state). HSAs
are killed while they apply (after sealing) and while they install (after persisting). After
the restarts, every node and the coordinator agree on one head; the proposal is APPLIED
exactly when that head carries it; every approval acknowledged before a crash is still there.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.cluster import LocalCluster

from deploy.init import COORDINATOR_NAME
from domain_coordinator.sqlite_store import SqliteStore
from domain_core.errors import UnavailableError
from domain_core.model import SealedState
from domain_edge.client import ProposalView
from domain_proto import domain_pb2, services_pb2

pytestmark = pytest.mark.chaos

HOSTS = ("hsa-1", "hsa-2", "hsa-3")
ROTATE = [domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey())]
CONVERGE_SECONDS = 30.0
CLIENT_TIMEOUT = 20.0  # the machine may be busy: a slow answer is not what these tests are about

ClusterFactory = Callable[..., LocalCluster]


# --- helpers ---------------------------------------------------------------------------------


def propose(cluster: LocalCluster, proposer: str = "alice") -> ProposalView:
    with cluster.coordinator_client(timeout=CLIENT_TIMEOUT) as client:
        return client.propose(ROTATE, cluster.operator_signer(proposer), reason="chaos")


def approve(cluster: LocalCluster, proposal_id: bytes, operator: str) -> ProposalView:
    with cluster.coordinator_client(timeout=CLIENT_TIMEOUT) as client:
        return client.approve(proposal_id, cluster.operator_signer(operator))


def get_proposal(cluster: LocalCluster, proposal_id: bytes) -> ProposalView:
    with cluster.coordinator_client(timeout=CLIENT_TIMEOUT) as client:
        return client.get_proposal(proposal_id)


def coordinator_head(cluster: LocalCluster) -> SealedState:
    with cluster.coordinator_client(timeout=CLIENT_TIMEOUT) as client:
        return client.latest_state()


def wait_dead(cluster: LocalCluster, name: str, point: str) -> None:
    """`name` killed itself at fault point `point` (SIGKILL), as its log says."""
    cluster.wait_for(lambda: not cluster.is_running(name), timeout=15, what=f"{name} to die")
    assert cluster.processes[name].returncode == -signal.SIGKILL
    log = cluster.layout.log_file(name).read_text(errors="replace")
    assert f"killing this process (SIGKILL) at {point}" in log


def stored_versions(cluster: LocalCluster, host: str) -> list[int]:
    states = cluster.layout.node_dir(host) / "data" / "states"
    return sorted(int(p.name.split(".")[0]) for p in states.glob("*.state"))


def coordinator_store_version(cluster: LocalCluster) -> int:
    """The newest version in the coordinator's SQLite file (read while it is down)."""
    store = SqliteStore(cluster.layout.coordinator_config.parent / "coordinator.db")
    try:
        return store.latest_version()
    finally:
        store.close()


def all_or_none(
    cluster: LocalCluster,
    proposal_id: bytes,
    before: int,
    *,
    expect_applied: bool,
    acknowledged: tuple[str, ...] = (),
) -> ProposalView:
    """Every node and the coordinator on one head; the proposal APPLIED iff that head has it."""
    wanted = before + 1 if expect_applied else before
    statuses = cluster.wait_for(
        lambda: _converged_at(cluster, wanted), timeout=CONVERGE_SECONDS, what=f"v{wanted}"
    )
    head = coordinator_head(cluster)
    assert {(s.version, s.state_hash) for s in statuses.values()} == {(head.version, head.hash)}
    view = get_proposal(cluster, proposal_id)
    if expect_applied:
        assert view.state == "applied", view.detail
        assert view.applied_version == head.version
        assert head.proposal is not None
        assert head.proposal.id == proposal_id
    else:
        assert view.state == "pending", view.detail
    operator_ids = {cluster.operator_signer(name).public_key.key_id: name for name in acknowledged}
    missing = set(operator_ids) - set(view.approved_by)
    assert not missing, f"acknowledged approvals lost: {[operator_ids[m] for m in missing]}"
    return view


def _converged_at(cluster: LocalCluster, version: int) -> dict[str, services_pb2.HsaStatus] | None:
    statuses = {host: cluster.node_status(host) for host in HOSTS}
    heads = {(s.version, s.state_hash) for s in statuses.values()}
    if len(heads) == 1 and all(s.healthy and s.version == version for s in statuses.values()):
        return dict(statuses)
    return None


# --- the coordinator dies --------------------------------------------------------------------


def test_acknowledged_approvals_survive_kill_9(crash_cluster: ClusterFactory) -> None:
    cluster = crash_cluster(quorum=3).start()
    proposed = propose(cluster)
    cluster.kill_coordinator()
    cluster.start_coordinator()
    assert get_proposal(cluster, proposed.proposal_id).approved_by == proposed.approved_by

    view = approve(cluster, proposed.proposal_id, "bob")
    assert view.state == "pending"
    cluster.kill_coordinator()
    cluster.start_coordinator()
    all_or_none(
        cluster, proposed.proposal_id, 1, expect_applied=False, acknowledged=("alice", "bob")
    )

    assert approve(cluster, proposed.proposal_id, "carol").applied
    all_or_none(
        cluster,
        proposed.proposal_id,
        1,
        expect_applied=True,
        acknowledged=("alice", "bob", "carol"),
    )


def test_crash_after_an_approval_is_stored(
    crash_cluster: ClusterFactory, fault_points: Callable[..., Any]
) -> None:
    cluster = crash_cluster(quorum=3)
    with fault_points("after_approval_stored"):
        cluster.start()
    proposed = propose(cluster)
    with pytest.raises(UnavailableError):
        approve(cluster, proposed.proposal_id, "bob")
    wait_dead(cluster, COORDINATOR_NAME, "after_approval_stored")

    cluster.start_coordinator()
    # Stored before the crash, so it counts although bob never got an answer.
    view = all_or_none(
        cluster, proposed.proposal_id, 1, expect_applied=False, acknowledged=("alice", "bob")
    )
    assert len(view.approvals) == 2
    assert approve(cluster, proposed.proposal_id, "carol").applied
    all_or_none(cluster, proposed.proposal_id, 1, expect_applied=True, acknowledged=("alice",))


@pytest.mark.parametrize(
    "point", ["after_quorum_before_apply", "after_apply_before_store", "after_store_before_push"]
)
def test_crash_between_the_quorum_and_the_push(
    crash_cluster: ClusterFactory, fault_points: Callable[..., Any], point: str
) -> None:
    cluster = crash_cluster(quorum=2)
    with fault_points(point):
        cluster.start()
    proposed = propose(cluster)
    with pytest.raises(UnavailableError):
        approve(cluster, proposed.proposal_id, "bob")
    wait_dead(cluster, COORDINATOR_NAME, point)

    # Nobody installed anything: the state, if any, is only in the coordinator's store.
    assert all(cluster.node_status(h).version == 1 for h in HOSTS)
    stored = coordinator_store_version(cluster)
    assert stored == (2 if point == "after_store_before_push" else 1)

    cluster.start_coordinator()
    all_or_none(cluster, proposed.proposal_id, 1, expect_applied=True, acknowledged=("alice",))


def test_crash_during_the_push(
    crash_cluster: ClusterFactory, fault_points: Callable[..., Any]
) -> None:
    cluster = crash_cluster(quorum=2)
    with fault_points("during_push"):
        cluster.start()
    paused = cluster.processes["hsa-3"].pid
    proposed = propose(cluster)
    os.kill(paused, signal.SIGSTOP)
    try:
        # The push may kill the coordinator before or after it answers.
        with contextlib.suppress(UnavailableError):
            approve(cluster, proposed.proposal_id, "bob")
        wait_dead(cluster, COORDINATOR_NAME, "during_push")
        # Some nodes have version 2 (one push succeeded), the paused one cannot have it.
        assert any(cluster.node_status(h, timeout=2).version == 2 for h in ("hsa-1", "hsa-2"))
        assert stored_versions(cluster, "hsa-3") == [1]
    finally:
        os.kill(paused, signal.SIGCONT)

    cluster.start_coordinator()
    all_or_none(cluster, proposed.proposal_id, 1, expect_applied=True, acknowledged=("alice",))


# --- HSAs die --------------------------------------------------------------------------------


def test_hsas_killed_while_they_apply(
    crash_cluster: ClusterFactory, fault_points: Callable[..., Any]
) -> None:
    cluster = crash_cluster(quorum=2)
    with fault_points("hsa_apply_after_seal"):
        cluster.start()
    proposed = propose(cluster)
    view = approve(cluster, proposed.proposal_id, "bob")
    # Each HSA the coordinator asked sealed version 2 and died before it answered.
    assert view.state == "pending"
    assert "no HSA could apply it yet" in view.detail
    for host in HOSTS:
        wait_dead(cluster, host, "hsa_apply_after_seal")
        assert stored_versions(cluster, host) == [1]
    assert coordinator_head(cluster).version == 1

    for host in HOSTS:
        cluster.start_node(host, wait_for_health=False)
    all_or_none(
        cluster, proposed.proposal_id, 1, expect_applied=True, acknowledged=("alice", "bob")
    )


def test_hsa_killed_after_persisting_a_state_before_installing_it(
    crash_cluster: ClusterFactory, fault_points: Callable[..., Any]
) -> None:
    cluster = crash_cluster(quorum=2).start()
    cluster.stop_node("hsa-3")
    with fault_points("hsa_install_after_persist"):
        cluster.start_node("hsa-3")
    proposed = propose(cluster)
    assert approve(cluster, proposed.proposal_id, "bob").applied
    wait_dead(cluster, "hsa-3", "hsa_install_after_persist")
    assert stored_versions(cluster, "hsa-3") == [1, 2]

    cluster.start_node("hsa-3")
    assert cluster.node_status("hsa-3").version == 2  # replayed from its own disk
    all_or_none(
        cluster, proposed.proposal_id, 1, expect_applied=True, acknowledged=("alice", "bob")
    )


# --- kill -9 at moments chosen by chance ---------------------------------------------------------


def _approve_into(
    cluster: LocalCluster, proposal_id: bytes, operator: str, answers: list[Any]
) -> None:
    try:
        answers.append(approve(cluster, proposal_id, operator))
    except Exception as error:
        answers.append(error)


def test_kill_9_at_random_moments_of_the_quorum_flow(crash_cluster: ClusterFactory) -> None:
    """No hook: the coordinator is killed a random few milliseconds into an approval."""
    cluster = crash_cluster(quorum=2).start()
    rng = random.Random(20260101)
    version = 1
    for _ in range(3):
        proposed = propose(cluster)
        answers: list[ProposalView | Exception] = []
        worker = threading.Thread(
            target=_approve_into, args=(cluster, proposed.proposal_id, "bob", answers)
        )
        worker.start()
        time.sleep(rng.uniform(0.0, 0.15))
        cluster.kill_coordinator()
        worker.join(30)
        assert answers, "the approval call did not return"
        acknowledged = ("alice", "bob") if isinstance(answers[0], ProposalView) else ("alice",)

        cluster.start_coordinator()
        view = get_proposal(cluster, proposed.proposal_id)
        missing = {cluster.operator_signer(n).public_key.key_id for n in acknowledged}
        assert missing <= set(view.approved_by), f"acknowledged approvals lost: {acknowledged}"
        if len(view.approved_by) < 2:
            approve(cluster, proposed.proposal_id, "bob")  # it never reached the store
        all_or_none(
            cluster, proposed.proposal_id, version, expect_applied=True, acknowledged=acknowledged
        )
        version += 1
