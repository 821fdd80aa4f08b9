"""`hsa-node` processes keeping current from a real `domain-coordinator` process.

The nodes register with the coordinator (RegisterHsa), cache its peer list (ListHsas ->
peers.json), seal the states the coordinator asks for (ApplyProposal after the operators'
quorum), and catch up through the pull (a restarted node) and the WatchStates stream (a node
the coordinator cannot push to).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from support.hsa_nodes import (
    COORDINATOR,
    DEADLINE,
    HOSTS,
    ROTATE,
    Domain,
    Processes,
    propose,
    stub,
    wait_for,
)

from domain_core.model import Proposal, SealedState
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def procs(domain: Domain) -> Iterator[Processes]:
    """The coordinator running, node configs pointing at it (nodes not started yet)."""
    running = Processes(domain)
    try:
        running.start(COORDINATOR)
        domain.configure_nodes(coordinator=running.addresses[COORDINATOR])
        yield running
    finally:
        running.kill_all()


def submit(procs: Processes, proposal: Proposal, approvals: list[domain_pb2.Approval]) -> None:
    """The operators' side of the quorum flow: propose, then approve until the quorum."""
    coordinator = stub(services_pb2_grpc.CoordinatorStub, procs.operator_channel())
    coordinator.SubmitProposal(
        services_pb2.SubmitProposalRequest(proposal=proposal.raw, proposer_approval=approvals[0]),
        timeout=DEADLINE,
    )
    for approval in approvals[1:]:
        coordinator.SubmitApproval(
            services_pb2.SubmitApprovalRequest(approval=approval), timeout=DEADLINE
        )


def versions(procs: Processes, hosts: tuple[str, ...] = HOSTS) -> list[int]:
    return [procs.status(host).version for host in hosts]


def registered(procs: Processes) -> dict[str, str]:
    coordinator = stub(services_pb2_grpc.CoordinatorStub, procs.operator_channel())
    listed = coordinator.ListHsas(services_pb2.ListHsasRequest(), timeout=DEADLINE)
    return {h.host_id: h.address for h in listed.hsas}


def reports(procs: Processes) -> dict[str, tuple[str, int, bytes]]:
    """What the coordinator lists for each node: address, reported version and state hash."""
    coordinator = stub(services_pb2_grpc.CoordinatorStub, procs.operator_channel())
    listed = coordinator.ListHsas(services_pb2.ListHsasRequest(), timeout=DEADLINE)
    return {h.host_id: (h.address, h.version, h.state_hash) for h in listed.hsas}


def peers_file(domain: Domain, host: str) -> dict[str, str]:
    path = domain.data_dir(host) / "peers.json"
    if not path.exists():
        return {}
    return {p["host_id"]: p["address"] for p in json.loads(path.read_text())["peers"]}


def test_nodes_register_apply_and_catch_up_through_the_coordinator(
    domain: Domain, procs: Processes
) -> None:
    procs.start(*HOSTS)
    expected = {host: procs.addresses[host] for host in HOSTS}
    wait_for(lambda: registered(procs) == expected, what="every node to register")
    genesis = (1, domain.genesis.hash)
    wait_for(
        lambda: {h: r[1:] for h, r in reports(procs).items()} == dict.fromkeys(HOSTS, genesis),
        what="every node to report the genesis state it holds",
    )
    # Each node keeps the other hosts at the addresses whose answers verified under their keys.
    wait_for(
        lambda: all(
            peers_file(domain, host) == {h: a for h, a in expected.items() if h != host}
            for host in HOSTS
        ),
        what="every node to cache the addresses of its verified peers",
    )

    # Quorum through the coordinator: it asks an HSA to seal, stores, and every node installs.
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    submit(procs, proposal, approvals)
    wait_for(lambda: versions(procs) == [2, 2, 2], what="every node at version 2")
    hashes = {procs.status(host).state_hash for host in HOSTS}
    assert len(hashes) == 1

    # A node that was down while the domain moved on catches up from the coordinator.
    assert procs.stop("hsa-3") == 0
    coordinator = stub(services_pb2_grpc.CoordinatorStub, procs.operator_channel())
    latest = coordinator.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
    head = SealedState.from_message(latest)
    assert head.version == 2
    proposal, approvals = propose(domain, head, ROTATE)
    submit(procs, proposal, approvals)
    wait_for(lambda: versions(procs, ("hsa-1", "hsa-2")) == [3, 3], what="hsa-1/2 at 3")
    procs.start("hsa-3")
    wait_for(lambda: procs.status("hsa-3").version == 3, what="hsa-3 to catch up to 3")
    assert procs.status("hsa-3").healthy


def test_the_watch_stream_delivers_states_the_coordinator_cannot_push(
    domain: Domain, procs: Processes
) -> None:
    # Slow pull and gossip: after their first round, only the stream brings new states.
    domain.configure_nodes(pull_interval_seconds=60.0, gossip_interval_seconds=60.0)
    procs.start(*HOSTS)
    wait_for(lambda: len(registered(procs)) == 3, what="every node to register")
    wait_for(
        lambda: "hsa-3 watches states" in procs.log_text(COORDINATOR),
        what="hsa-3 to open its stream",
    )
    # A node registers again when its key service starts serving: wait for that first, or it
    # would put its own address back over the one below and the push would succeed.
    wait_for(
        lambda: not procs.status("hsa-3").key_service_waiting,
        what="hsa-3's key service to serve",
    )
    # Register hsa-3 at an address where nothing listens: the coordinator's push fails. (A
    # registration of hsa-3's own still in flight may land after ours: register again until
    # ours holds for a moment.)
    as_hsa3 = stub(services_pb2_grpc.CoordinatorStub, procs.channel(COORDINATOR, "hsa-3"))

    def nowhere_holds() -> bool:
        as_hsa3.RegisterHsa(
            services_pb2.RegisterHsaRequest(host_id="hsa-3", address="127.0.0.1:9"),
            timeout=DEADLINE,
        )
        time.sleep(0.5)
        return registered(procs)["hsa-3"] == "127.0.0.1:9"

    wait_for(nowhere_holds, what="hsa-3 to stay registered where nothing listens")

    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    submit(procs, proposal, approvals)
    wait_for(lambda: versions(procs) == [2, 2, 2], what="every node at version 2")
    assert "version 2" in procs.log_text("hsa-3")
    assert "from coordinator stream" in procs.log_text("hsa-3")

    # Each node registered again as soon as it installed version 2, not at its next pull
    # (60 s away): the coordinator lists hsa-3 back at its own address, and every node
    # reporting version 2 with the hash of the state it installed.
    head_hash = procs.status("hsa-3").state_hash
    wait_for(
        lambda: reports(procs) == {host: (procs.addresses[host], 2, head_hash) for host in HOSTS},
        timeout=10.0,
        what="every node to report version 2 to the coordinator",
    )
