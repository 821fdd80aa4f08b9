"""A fork that gossip finds is visible: in the HSA's status, its log and `hsm-domain status`.

The scenario of `test_an_equivocating_coordinator_is_caught_by_gossip` (in
`test_malicious_coordinator.py`): a malicious coordinator pushes one valid version 2 to hsa-1
and another to hsa-2 (both quorum-approved, honestly sealed), so each accepts the one it is
given. Gossiping, each finds that its peer holds another state for version 2. Neither stops
serving (the data plane must not stop because a peer is wrong): each stays healthy on its own
verified chain, logs the fork at ERROR once, and its `GetStatus` detail, which `hsm-domain
status` prints, says where to look.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from grpc_health.v1 import health_pb2
from support.hsa_nodes import ROTATE, health_status
from support.malicious_coordinator import Attack, LogWatch, echo, wait_until

from deploy.cli import main as hsm_domain

pytestmark = pytest.mark.chaos


def test_a_fork_found_by_gossip_shows_in_the_status_and_the_node_keeps_serving(
    attack: Attack, capsys: pytest.CaptureFixture[str]
) -> None:
    genesis = attack.sim.genesis
    first = attack.sim.transition(ROTATE, append=False)
    proposal = attack.sim.propose(ROTATE, base=genesis, proposer=1)
    second = attack.sim.apply(
        proposal, attack.sim.approve(proposal, [1, 2]), "hsa-2", base=genesis, append=False
    )
    assert first.hash != second.hash
    held = {"hsa-1": first, "hsa-2": second}
    peer = {"hsa-1": "hsa-2", "hsa-2": "hsa-1"}
    logs = {h: LogWatch(attack.procs.log_path(h)) for h in attack.hosts}
    # Pushed at the same moment: pushed one after the other, the second host could pull the
    # first one's state by gossip (every 0.3 s) before its own push arrives, and hold no fork.
    with ThreadPoolExecutor(len(held)) as pool:
        pushes = {h: pool.submit(attack.server.push, attack.address(h), s) for h, s in held.items()}
        answers = {host: push.result() for host, push in pushes.items()}
    for host, state in held.items():
        assert answers[host].state_hash == state.hash

    def detail(host: str) -> str:
        return attack.server.status(attack.address(host)).detail

    # Gossip runs every 0.3 s here, each host with its only peer.
    wait_until(lambda: all(detail(h) for h in attack.hosts), "both hosts to report the fork", 5)
    time.sleep(1.0)  # a few more gossip rounds meet the same fork again
    for host in attack.hosts:
        expected = f"fork detected at version 2 with peer {peer[host]}: investigate"
        status = attack.server.status(attack.address(host))
        assert status.detail == expected
        # Still on its own verified state, healthy, a member, SERVING, and answering.
        assert (status.version, status.state_hash) == (2, held[host].hash)
        assert (status.healthy, status.member) == (True, True)
        channel = attack.procs.channel(host, "demo-app")
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        echo(channel)
        # Logged at ERROR once, however many rounds met it; the refusal itself is a WARNING.
        text = logs[host].text()
        errors = [line for line in text.splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert f"ERROR fork detected at version 2 with peer {peer[host]}:" in errors[0]
        assert f"from peer {peer[host]}: ForkError" in text

    # `hsm-domain status` shows it (the coordinator is not one of the domain's processes here,
    # and hsa-3 is not running: the command reports them and exits 1).
    root = str(attack.domain.layout.root)
    assert hsm_domain(["status", root]) == 1
    lines = capsys.readouterr().out.splitlines()
    for host in attack.hosts:
        [line] = [line for line in lines if line.startswith(f"{host} ")]
        assert f"(fork detected at version 2 with peer {peer[host]}: investigate)" in line
    assert hsm_domain(["status", root, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    shown = {p["name"]: p for p in report["processes"]}
    for host in attack.hosts:
        assert shown[host]["healthy"] is True
        assert shown[host]["detail"].startswith("fork detected at version 2 with peer")
