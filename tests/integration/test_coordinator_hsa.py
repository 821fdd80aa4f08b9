"""The whole quorum flow with real processes: a coordinator and three `hsa-node`s.

Operators propose and approve through `CoordinatorClient`; the coordinator has an HSA apply
the proposal, verifies and stores the state, answers APPLIED, and every HSA installs it (the
push, the stream or the pull, whichever comes first). HSA status is read as the demo-app
client, which any CA-certified caller may do. A domain whose key rotation is overdue gets a
scheduled rotation from the coordinator without any operator.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from test_coordinator import ROOT, CoordinatorProcess, Domain, make_domain

from deploy.init import init_domain, read_passphrase
from deploy.localdomain import FAST_SCRYPT_N
from domain_edge.client import CoordinatorClient, remove_host, rotate_domain_key, set_quorum
from domain_edge.config import NodeConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.transport import hsa_host, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

_T = TypeVar("_T")
WAIT = 20.0


def wait_for(what: str, probe: Callable[[], _T | None], timeout: float = WAIT) -> _T:
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class HsaProcess:
    """One `hsa-node` process; killed (process group) by its finalizer."""

    def __init__(self, domain: Domain, host_id: str, log_path: Path) -> None:
        self.domain = domain
        self.host_id = host_id
        self.config = domain.layout.node_configs[host_id]
        self.ready_file = domain.layout.ready_file(host_id)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> None:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hsa_node",
                    "--config",
                    str(self.config),
                    "--ready-file",
                    str(self.ready_file),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )

    def wait_ready(self) -> None:
        assert self.proc is not None

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.host_id} exited: {self.log_path.read_text()[-2000:]}")
            return self.ready_file.exists()

        wait_for(f"{self.host_id} ready", ready)
        self.address = json.loads(self.ready_file.read_text())["address"]

    def status(self) -> services_pb2.HsaStatus | None:
        """GetStatus as the demo-app client; None while unreachable."""
        tls = self.domain.tls("client", "demo-app")
        with mtls_channel(self.address, tls, hsa_host(self.host_id)) as channel:
            stub: Any = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
            try:
                status: services_pb2.HsaStatus = stub.GetStatus(
                    services_pb2.HsaStatusRequest(), timeout=5
                )
            except grpc.RpcError:
                return None
            return status

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclasses.dataclass
class Cluster:
    domain: Domain
    coordinator: CoordinatorProcess
    hsas: dict[str, HsaProcess]
    client: CoordinatorClient


def start_cluster(domain: Domain, logs: Path, stack: list[Callable[[], None]]) -> Cluster:
    coordinator = CoordinatorProcess(domain.layout, logs / "coordinator.log")
    stack.append(coordinator.stop)
    coordinator.start()
    hsas: dict[str, HsaProcess] = {}
    for host_id, path in domain.layout.node_configs.items():
        config = NodeConfig.load(path)
        dataclasses.replace(config, coordinator=coordinator.address).save(path)
        hsa = HsaProcess(domain, host_id, logs / f"{host_id}.log")
        stack.append(hsa.stop)
        hsa.start()
        hsas[host_id] = hsa
    for hsa in hsas.values():
        hsa.wait_ready()
    client = CoordinatorClient(coordinator.operator_address, domain.ca_pem)
    stack.append(client.close)
    wait_for(
        "every HSA to register",
        lambda: {h.host_id for h in client.list_hsas()} == set(hsas),
    )
    return Cluster(domain, coordinator, hsas, client)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    stack: list[Callable[[], None]] = []
    yield stack
    for action in reversed(stack):
        action()


@pytest.fixture
def cluster(tmp_path: Path, cleanup: list[Callable[[], None]]) -> Cluster:
    return start_cluster(make_domain(tmp_path / "d"), tmp_path, cleanup)


def all_at(cluster: Cluster, version: int, state_hash: bytes) -> dict[str, int] | None:
    """Each HSA's version once every HSA is at `version` with `state_hash`, else None."""
    statuses = {h: hsa.status() for h, hsa in cluster.hsas.items()}
    if all(
        s is not None and (s.version, s.state_hash) == (version, state_hash)
        for s in statuses.values()
    ):
        return {h: s.version for h, s in statuses.items() if s is not None}
    return None


def test_quorum_applies_and_every_hsa_follows(cluster: Cluster) -> None:
    client = cluster.client
    alice, bob, carol = (cluster.domain.operators[n] for n in ("alice", "bob", "carol"))
    overtaken = client.propose([set_quorum(3)], carol)

    view = client.propose([rotate_domain_key()], alice, reason="rotate now")
    assert view.state == "pending"
    assert view.detail == "1 of 2 approvals; 1 more needed"
    applied = client.approve(view.proposal_id, bob)
    # The final approval returns only once the new state is verified and stored.
    assert (applied.state, applied.applied_version) == ("applied", 2)
    head = client.latest_state()
    assert head.version == 2
    assert head.manifest.current_generation == 2
    assert head.proposal is not None
    assert head.proposal.id == view.proposal_id
    wait_for("every HSA at version 2", lambda: all_at(cluster, 2, head.hash))

    # The proposal made for version 1 is stale now, and says so.
    stale = client.get_proposal(overtaken.proposal_id)
    assert stale.state == "stale"
    assert stale.detail == "domain is at version 2, this proposal is for 1: propose again"

    # Removing hsa-3 rotates the key; hsa-3 stops following, the others reach version 3.
    view = client.propose([remove_host("hsa-3")], bob)
    applied = client.approve(view.proposal_id, carol)
    assert (applied.state, applied.applied_version) == ("applied", 3)
    head = client.latest_state()
    assert set(head.manifest.hosts_by_id) == {"hsa-1", "hsa-2"}

    def removed() -> bool:
        statuses = {h: hsa.status() for h, hsa in cluster.hsas.items()}
        three = statuses["hsa-3"]
        return (
            all(
                s is not None and (s.version, s.state_hash) == (3, head.hash)
                for h, s in statuses.items()
                if h != "hsa-3"
            )
            and three is not None
            and not three.member
        )

    wait_for("hsa-1 and hsa-2 at version 3, hsa-3 out", removed)
    status = client.domain_status()
    assert (status.version, status.pending_proposals) == (3, 0)


def test_scheduled_rotation_without_operators(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    # A domain whose genesis is 25 hours old: the 24-hour rotation is overdue.
    past = datetime.now(UTC) - timedelta(hours=25)
    layout = init_domain(
        tmp_path / "d", nodes=2, operators=1, quorum=1, now=past, scrypt_n=FAST_SCRYPT_N
    )
    operators = {
        name: load_file_token(token, read_passphrase(passphrase))
        for name, (token, passphrase) in layout.operator_tokens.items()
    }
    domain = Domain(layout, dict(operators), layout.ca_cert.read_bytes())
    cluster = start_cluster(domain, tmp_path, cleanup)
    head = wait_for(
        "the scheduled rotation",
        lambda: (s := cluster.client.latest_state()).version >= 2 and s,
    )
    assert head.version == 2
    assert head.proposal is None
    assert [g.generation for g in head.manifest.message.key_generations] == [1, 2]
    wait_for("every HSA at version 2", lambda: all_at(cluster, 2, head.hash))
    # Not due again for 24 hours: the chain stays at version 2.
    time.sleep(3)
    assert cluster.client.latest_state().version == 2
