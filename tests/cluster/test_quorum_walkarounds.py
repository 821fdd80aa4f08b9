"""Issue 13, item 3, against real processes: a higher threshold cannot be walked around.

A local domain (coordinator + 3 HSAs) with 3 operators, default threshold 2 and remove-host
3. Two operators (alice and bob) collude against carol:
- they lower remove-host's threshold to 2 (then they could remove a host alone);
- they add a puppet operator (whose approval would then make the third).
Each proposal stays pending with their two approvals, and an HSA asked directly to apply it
with those approvals (as a lying coordinator would) refuses; with carol's approval too it
applies (the puppet first, then the lowering, which the three then agree to).
`hsm-operator proposals show` says which threshold applies and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from support.cluster import LocalCluster

from domain_core.model import make_operator
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.client import CoordinatorClient, ProposalView, add_operator, set_quorum
from domain_edge.transport import ANY_HSA, TlsMaterial, mtls_channel
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

HSM_OPERATOR = Path(sys.executable).parent / "hsm-operator"
REMOVE_HOST = domain_pb2.CHANGE_TYPE_REMOVE_HOST
GOVERNANCE = "who may approve or how many approvals are needed"


def _ask_hsa_to_apply(cluster: LocalCluster, view: ProposalView) -> grpc.RpcError:
    """ApplyProposal straight to hsa-1 with the coordinator's identity and the approvals
    it holds: what a coordinator that skipped its own count would do. Returns the refusal."""
    root = cluster.layout.root / "coordinator"
    tls = TlsMaterial.from_files(cluster.layout.ca_cert, root / "tls.crt", root / "tls.key")
    with mtls_channel(cluster.node_addresses()["hsa-1"], tls, ANY_HSA) as channel:
        stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.ApplyProposal(
                services_pb2.ApplyProposalRequest(
                    proposal=view.proposal.raw, approvals=list(view.approvals)
                ),
                timeout=10,
            )
    return refused.value


def _show(cluster: LocalCluster, proposal_id: bytes) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_")}
    result = subprocess.run(
        [str(HSM_OPERATOR), "proposals", "show", proposal_id.hex()],
        env={**env, "HSM_CLUSTER": str(cluster.directory)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _stays_pending_with_two(
    cluster: LocalCluster, client: CoordinatorClient, view: ProposalView, version: int
) -> None:
    assert view.state == "pending"
    assert (len(view.approvals), view.threshold) == (2, 3)
    # The coordinator's sweeper retries quorate proposals every 2 s: give it two rounds.
    time.sleep(4.5)
    assert client.get_proposal(view.proposal_id).state == "pending"
    assert client.latest_state().version == version
    refusal = _ask_hsa_to_apply(cluster, view)
    assert refusal.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "2 of 3 approvals" in (refusal.details() or "")
    assert GOVERNANCE in (refusal.details() or "")
    assert cluster.node_status("hsa-1").version == version


def _applied(client: CoordinatorClient, view: ProposalView) -> Callable[[], bool]:
    return lambda: client.get_proposal(view.proposal_id).state == "applied"


def test_two_of_three_cannot_walk_around_a_higher_threshold(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    if not HSM_OPERATOR.is_file():
        pytest.fail(f"{HSM_OPERATOR} is missing: run `pip install -e '.[test]'`")
    cluster = local_cluster(nodes=3, operators=3, quorum=2)
    alice, bob, carol = (cluster.operator_signer(n) for n in ("alice", "bob", "carol"))
    with cluster.coordinator_client() as client:
        # Setting remove-host to 3 raises the highest threshold: all three approve (v2).
        setup = client.propose([set_quorum(3, "remove-host")], alice)
        assert setup.threshold == 3
        client.approve(setup.proposal_id, bob)
        client.approve(setup.proposal_id, carol)
        cluster.wait_for(_applied(client, setup), what="remove-host set to 3")
        assert client.latest_state().manifest.message.quorum == domain_pb2.QuorumPolicy(
            threshold=2,
            change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
        )

        # Walk-around 1: add a puppet operator whose approval would make the third.
        puppet_key = InMemorySigner.generate(SignatureAlgorithm.ED25519)
        puppet = make_operator("puppet", puppet_key.public_key)
        add = client.propose([add_operator(puppet)], alice)
        add = client.approve(add.proposal_id, bob)
        _stays_pending_with_two(cluster, client, add, version=2)
        assert (
            "threshold        3: the highest threshold in the policy (remove-host), because "
            f"add-operator changes {GOVERNANCE}"
        ) in _show(cluster, add.proposal_id)
        # With carol's approval too, it applies: three is what it needs.
        client.approve(add.proposal_id, carol)
        cluster.wait_for(_applied(client, add), what="the puppet added with 3 approvals")
        head = client.latest_state()
        assert head.version == 3
        assert puppet.operator_id in head.manifest.operators_by_id

        # Walk-around 2: lower remove-host to 2 with alice's and bob's approvals.
        lower = client.propose([set_quorum(2, "remove-host")], alice)
        lower = client.approve(lower.proposal_id, bob)
        _stays_pending_with_two(cluster, client, lower, version=3)
        shown = _show(cluster, lower.proposal_id)
        assert "pending: 2 of 3 approvals, 1 more needed" in shown
        assert (
            "threshold        3: the highest threshold in the current policy (remove-host), "
            f"because set-quorum changes {GOVERNANCE}"
        ) in shown
        client.approve(lower.proposal_id, carol)
        cluster.wait_for(_applied(client, lower), what="remove-host lowered with 3 approvals")
        assert client.latest_state().version == 4
    cluster.wait_converged()
