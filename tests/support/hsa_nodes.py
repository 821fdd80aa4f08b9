"""Test support for real `hsa-node` (and coordinator) processes of a domain made by `init_domain`.

`Domain` is a local domain on disk with its operators' signers; `Processes` starts nodes and
the coordinator as real processes (each in its own session, always killed by `kill_all`) and
calls them over mutual TLS as the coordinator, the demo application or a host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.init import DomainLayout, init_domain, load_layout, read_passphrase
from deploy.localdomain import FAST_SCRYPT_N
from domain_core import quorum
from domain_core.model import Proposal, SealedState
from domain_core.signers import Signer
from domain_edge import transport
from domain_edge.config import NodeConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.identity_files import TLS_CERTIFICATE_FILE, TLS_KEY_FILE
from domain_edge.layout import COORDINATOR_NAME, DEMO_CLIENT
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from hsa_node.servicers import CoordinatorPin

HOSTS = ("hsa-1", "hsa-2", "hsa-3")
COORDINATOR = COORDINATOR_NAME
DEADLINE = 5.0
START_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parents[2]
ROTATE = [domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey())]


# --- the domain on disk --------------------------------------------------------------------


@dataclass
class Domain:
    """A local domain made by `init_domain`, its operators' signers, and TLS identities."""

    layout: DomainLayout
    operators: list[Signer]
    genesis: SealedState

    def node_dir(self, host: str) -> Path:
        return self.layout.node_dir(host)

    def data_dir(self, host: str) -> Path:
        return self.layout.node_data_dir(host)

    def tls(self, who: str) -> TlsMaterial:
        """TLS material of the coordinator, the demo app, or a host."""
        directory = {
            COORDINATOR: self.layout.coordinator_dir,
            DEMO_CLIENT: self.layout.client_dir,
        }.get(who, self.layout.node_identity_dir(who))
        return TlsMaterial.from_files(
            self.layout.ca_cert, directory / TLS_CERTIFICATE_FILE, directory / TLS_KEY_FILE
        )

    def coordinator_pin(self) -> CoordinatorPin:
        """The coordinator every node config of this domain pins (HsaAdmin's one caller)."""
        return CoordinatorPin.from_config(NodeConfig.load(self.layout.node_configs["hsa-1"]))

    def configure_nodes(self, **changes: Any) -> None:
        """Rewrite every node config with `changes` (NodeConfig fields)."""
        for path in self.layout.node_configs.values():
            dataclasses.replace(NodeConfig.load(path), **changes).save(path)


def make_domain_template(root: Path) -> Path:
    """A 3-node, 3-operator, quorum-2 domain with fast gossip; copy it per test."""
    layout = init_domain(root, nodes=3, operators=3, quorum=2, scrypt_n=FAST_SCRYPT_N)
    for path in layout.node_configs.values():
        config = NodeConfig.load(path)
        dataclasses.replace(config, gossip_interval_seconds=0.2, pull_interval_seconds=0.5).save(
            path
        )
    return root


def copy_domain(template: Path, root: Path) -> Domain:
    """A private copy of a template domain, with its operators' tokens opened."""
    shutil.copytree(template, root, symlinks=True)
    layout = load_layout(root)
    operators: list[Signer] = [
        load_file_token(token, read_passphrase(passphrase))
        for token, passphrase in layout.operator_tokens.values()
    ]
    genesis = SealedState.from_bytes(layout.genesis_state.read_bytes())
    return Domain(layout=layout, operators=operators, genesis=genesis)


@pytest.fixture(scope="module")
def domain_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One template domain per test module (key generation and scrypt run once), for `domain`.

    A fixture: a conftest or test module imports it (`from support.hsa_nodes import
    domain_template`)."""
    return make_domain_template(tmp_path_factory.mktemp("template") / "d")


@pytest.fixture
def domain(domain_template: Path, tmp_path: Path) -> Domain:
    """A private copy of the module's template domain for one test."""
    return copy_domain(domain_template, tmp_path / "d")


# --- processes -----------------------------------------------------------------------------


def stub(factory: Callable[[grpc.Channel], Any], channel: grpc.Channel) -> Any:
    """A generated stub (the generated code is untyped)."""
    return factory(channel)


@dataclass
class Processes:
    """Running node and coordinator processes of one domain, with clients to call them."""

    domain: Domain
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, IO[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    operator_address: str = ""
    channels: list[grpc.Channel] = field(default_factory=list)

    def ready_file(self, name: str) -> Path:
        return self.domain.layout.run_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.domain.layout.log_dir / f"{name}.log"

    def log_text(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start a node (a host id) or the coordinator; does not wait."""
        self.ready_file(name).unlink(missing_ok=True)
        if name == COORDINATOR:
            module, config = "domain_coordinator", self.domain.layout.coordinator_config
        else:
            module, config = "hsa_node", self.domain.layout.node_configs[name]
        log = self.log_path(name).open("ab")
        self.logs[name] = log
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                module,
                "--config",
                str(config),
                "--ready-file",
                str(self.ready_file(name)),
            ],
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def wait_ready(self, name: str) -> str:
        proc = self.procs[name]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.ready_file(name).exists():
                ready = json.loads(self.ready_file(name).read_text())
                assert ready["name"] == name
                assert ready["pid"] == proc.pid
                self.addresses[name] = ready["address"]
                if name == COORDINATOR:
                    self.operator_address = ready["operator_address"]
                return str(ready["address"])
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log_text(name)}")
            time.sleep(0.05)
        pytest.fail(f"{name} did not become ready:\n{self.log_text(name)}")

    def start(self, *names: str) -> None:
        for name in names:
            self.spawn(name)
        for name in names:
            self.wait_ready(name)

    def wait_key_service(self, *hosts: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until each host's key service serves (it took a peer's key floors)."""
        for host in hosts:
            wait_for(
                lambda host=host: not self.status(host).key_service_waiting,  # type: ignore[misc]
                timeout,
                f"{host}'s key service to take a peer's key floors",
            )

    def stop(self, name: str) -> int:
        """SIGTERM and wait: the exit status (0 for a clean stop)."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=10)
        finally:
            self.logs.pop(name).close()

    def kill_all(self) -> None:
        """Kill every process group still running; close logs and channels."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            self.procs.pop(name)
        for log in self.logs.values():
            log.close()
        self.logs.clear()
        for channel in self.channels:
            channel.close()
        self.channels.clear()

    # --- clients -------------------------------------------------------------------------

    def channel(self, name: str, who: str = COORDINATOR) -> grpc.Channel:
        """A mutual-TLS channel to a running process (the coordinator or a host), as `who`."""
        server = transport.COORDINATOR if name == COORDINATOR else transport.hsa_host(name)
        channel = transport.mtls_channel(self.addresses[name], self.domain.tls(who), server)
        self.channels.append(channel)
        return channel

    def operator_channel(self) -> grpc.Channel:
        """A server-authenticated channel to the coordinator's operator port."""
        channel = transport.secure_channel(
            self.operator_address, self.domain.layout.ca_cert.read_bytes(), transport.COORDINATOR
        )
        self.channels.append(channel)
        return channel

    def admin(self, host: str, who: str = COORDINATOR) -> Any:
        return stub(services_pb2_grpc.HsaAdminStub, self.channel(host, who))

    def status(self, host: str) -> services_pb2.HsaStatus:
        response: services_pb2.HsaStatus = self.admin(host).GetStatus(
            services_pb2.HsaStatusRequest(), timeout=DEADLINE, wait_for_ready=True
        )
        return response

    def apply(
        self, host: str, proposal: Proposal, approvals: Sequence[domain_pb2.Approval]
    ) -> SealedState:
        message = self.admin(host).ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=list(approvals)),
            timeout=DEADLINE,
        )
        return SealedState.from_message(message)

    def install(self, host: str, state: SealedState) -> services_pb2.InstallStateResponse:
        response: services_pb2.InstallStateResponse = self.admin(host).InstallState(
            services_pb2.InstallStateRequest(state=state.message), timeout=DEADLINE
        )
        return response


# --- helpers -------------------------------------------------------------------------------


def propose(
    domain: Domain,
    head: SealedState,
    changes: Sequence[domain_pb2.Change],
    approvers: Sequence[int] = (0, 1),
) -> tuple[Proposal, list[domain_pb2.Approval]]:
    """A proposal against `head` and approvals by the operators at `approvers`."""
    now = int(time.time())
    signers = [domain.operators[i] for i in approvers]
    proposal = Proposal.create(
        domain_id=domain.layout.domain_id,
        base_version=head.version,
        base_state_hash=head.hash,
        changes=changes,
        proposer_id=signers[0].public_key.key_id,
        created_at=now,
        expires_at=now + 3600,
        reason="test",
        nonce=os.urandom(16),
    )
    return proposal, [quorum.approve(proposal, s) for s in signers]


def remove_host(host: str) -> list[domain_pb2.Change]:
    return [domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id=host))]


def advance(procs: Processes, head: SealedState, hosts: Sequence[str]) -> SealedState:
    """Apply a rotate-domain-key proposal on the first host and install it on `hosts`."""
    proposal, approvals = propose(procs.domain, head, ROTATE)
    state = procs.apply(hosts[0], proposal, approvals)
    for host in hosts:
        procs.install(host, state)
    return state


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what or condition}")


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def code_of(error: grpc.RpcError) -> grpc.StatusCode:
    return error.code()


def details_of(error: grpc.RpcError) -> str:
    return str(error.details())


def health_status(channel: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
    return int(response.status)
