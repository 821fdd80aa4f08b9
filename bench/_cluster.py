"""A local domain of real processes for benchmarks: `BenchDomain`.

    with BenchDomain(work_dir / "floor", nodes=1) as domain:   # init, start, converge
        channel = domain.node_channel("hsa-1")
        ...

`BenchDomain(..., workers=N)` gives every node N key service worker processes (written into
the node configs by `init_domain`); `key_endpoints(host)` lists the addresses serving a
node's key service (the node's, then its workers').

Built on `deploy.init.init_domain` and the process runner `deploy.cluster` (the same code
`hsm-domain up` uses), so a benchmark measures the real process model, mutual TLS and
interceptors.

Invariants: every process a domain starts is stopped in `stop()` (SIGTERM to its process
group, SIGKILL after a grace period), which runs on leaving the `with` block, whether or not
the benchmark failed, and, as a last resort, at interpreter exit (atexit); `python -m bench`
turns SIGTERM into SystemExit so that these run. Operator passphrases are read from the demo
passphrase files of the local domain and never printed.
"""

from __future__ import annotations

import atexit
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Final

import grpc

from deploy import cluster as runner
from deploy.init import COORDINATOR_NAME, DomainLayout, init_domain, load_layout, read_passphrase
from domain_core import quorum
from domain_core.client import CoordinatorClient
from domain_core.config import check_worker_count
from domain_core.errors import UnavailableError
from domain_core.pb import domain_pb2, services_pb2, services_pb2_grpc
from domain_core.signers import FileTokenSigner, load_file_token
from domain_core.transport import TlsMaterial

__all__ = [
    "FAST_SCRYPT_N",
    "AppliedChange",
    "BenchDomain",
    "StatusPoller",
    "apply_change",
    "log_events",
]

# Operator tokens of a benchmark domain are throwaway: a cheaper key derivation than the
# default saves seconds per domain without changing anything that is measured.
FAST_SCRYPT_N: Final = 2**14
STOP_GRACE_SECONDS: Final = 3.0


class BenchDomain:
    """A coordinator and N HSAs as real processes, in a fresh directory (always stopped)."""

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 1,
        operators: int = 3,
        quorum: int = 2,
        start_timeout: float = 60.0,
        workers: int = 0,
    ) -> None:
        """`workers`: key service worker processes of each node (`key_service_workers`)."""
        self.directory = Path(directory)
        self.nodes, self.operators, self.quorum = nodes, operators, quorum
        self.workers = check_worker_count(workers)
        self.start_timeout = start_timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._layout: DomainLayout | None = None
        self._stopped = False
        self._coordinator_client: CoordinatorClient | None = None
        self._signers: dict[int, FileTokenSigner] = {}

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def layout(self) -> DomainLayout:
        """The domain's files."""
        if self._layout is None:
            raise RuntimeError("the domain is not initialised; call start() first")
        return self._layout

    def start(self) -> BenchDomain:
        """Init, start the coordinator and every node (in parallel), wait until converged."""
        atexit.register(self.stop)
        try:
            self._layout = init_domain(
                self.directory,
                nodes=self.nodes,
                operators=self.operators,
                quorum=self.quorum,
                scrypt_n=FAST_SCRYPT_N,
                workers=self.workers,
            )
            self.processes[COORDINATOR_NAME] = runner.start_coordinator(
                self.layout, timeout=self.start_timeout
            )
            hosts = list(self.layout.node_configs)
            with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
                started = pool.map(self._spawn_node, hosts)
                for host, process in zip(hosts, started, strict=True):
                    self.processes[host] = process
            self.wait_converged()
            self.wait_registered(hosts)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn_node(self, host: str) -> subprocess.Popen[bytes]:
        return runner.start_node(
            self.layout, host, timeout=self.start_timeout, wait_for_health=False
        )

    def __enter__(self) -> BenchDomain:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop every process (nodes in parallel, then the coordinator); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._coordinator_client is not None:
            self._coordinator_client.close()
        self._signers.clear()
        nodes = [p for name, p in self.processes.items() if name != COORDINATOR_NAME]
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            list(pool.map(lambda p: runner.stop_process(p, grace=STOP_GRACE_SECONDS), nodes))
        coordinator = self.processes.get(COORDINATOR_NAME)
        if coordinator is not None:
            runner.stop_process(coordinator, grace=STOP_GRACE_SECONDS)
        self.processes.clear()
        if self._layout is not None:
            runner.remove_run_files(self._layout, self._layout.process_names)
        atexit.unregister(self.stop)

    # --- processes ---------------------------------------------------------------------

    def pid(self, name: str) -> int:
        """The process id of `name` (the coordinator or a host id)."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            raise UnavailableError(f"{name} is not running")
        return process.pid

    def stop_node(self, host: str) -> int:
        """SIGTERM one node (SIGKILL after the grace period); its exit status."""
        process = self.processes.pop(host, None)
        if process is None:
            raise RuntimeError(f"{host} is not running")
        code = runner.stop_process(process, grace=STOP_GRACE_SECONDS)
        self.layout.ready_file(host).unlink(missing_ok=True)
        return code

    def start_node(self, host: str, *, wait_for_health: bool = False) -> None:
        """Start one (stopped) node; returns once it wrote its ready file (or is SERVING)."""
        if host in self.processes and self.processes[host].poll() is None:
            raise RuntimeError(f"{host} is running already")
        self._layout = load_layout(self.directory)
        self.processes[host] = runner.start_node(
            self.layout, host, timeout=self.start_timeout, wait_for_health=wait_for_health
        )

    # --- addresses, identities, clients ------------------------------------------------

    def address(self, name: str) -> str:
        """The mutual-TLS address `name` wrote to its ready file."""
        info = runner.read_ready_file(self.layout.ready_file(name))
        if info is None:
            raise UnavailableError(f"{name} has no ready file: it is not running")
        return info.address

    def key_endpoints(self, host: str) -> list[str]:
        """The addresses serving `host`'s key service: the node's, then its workers' (from
        its ready file, so only workers that are ready)."""
        info = runner.read_ready_file(self.layout.ready_file(host))
        if info is None:
            raise UnavailableError(f"{host} has no ready file: it is not running")
        return [info.address, *info.workers]

    @property
    def hosts(self) -> list[str]:
        """The host ids of the domain's nodes."""
        return list(self.layout.node_configs)

    def client_tls(self) -> TlsMaterial:
        """The demo application's TLS identity (spiffe://<domain>/client/demo-app)."""
        return runner.client_tls(self.layout)

    def node_channel(self, host: str) -> grpc.Channel:
        """A mutual-TLS channel to one node, as the demo application (close it after use)."""
        return runner.node_channel(self.layout, self.address(host))

    def coordinator_client(self) -> CoordinatorClient:
        """A quorum-flow client of the coordinator's operator port (one per domain, reused)."""
        if self._coordinator_client is None:
            info = runner.read_ready_file(self.layout.ready_file(COORDINATOR_NAME))
            if info is None:
                raise UnavailableError("the coordinator is not running")
            self._coordinator_client = CoordinatorClient(
                info.operator_address, self.layout.ca_cert.read_bytes(), timeout=30.0
            )
        return self._coordinator_client

    def operator_signer(self, index: int) -> FileTokenSigner:
        """The `index`-th operator's file token, opened once with its demo passphrase file.

        Kept open for the domain's lifetime: opening a token costs a key derivation (tens of
        milliseconds), which is the operator's time and no part of what is measured.
        """
        signer = self._signers.get(index)
        if signer is None:
            name = list(self.layout.operator_tokens)[index]
            token, passphrase = self.layout.operator_tokens[name]
            signer = load_file_token(token, read_passphrase(passphrase))
            self._signers[index] = signer
        return signer

    # --- observing ---------------------------------------------------------------------

    def wait_converged(
        self, hosts: Iterable[str] | None = None, timeout: float | None = None
    ) -> dict[str, services_pb2.HsaStatus]:
        """Wait until the nodes (default: all) are healthy on one version and hash."""
        return runner.wait_converged(
            self.layout,
            timeout=self.start_timeout if timeout is None else timeout,
            hosts=list(hosts) if hosts is not None else None,
        )

    def wait_registered(self, hosts: Iterable[str], timeout: float | None = None) -> None:
        """Wait until the coordinator lists these hosts (so it pushes new states to them)."""
        wanted = set(hosts)
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        client = self.coordinator_client()
        while True:
            listed = {h.host_id for h in client.list_hsas() if h.address}
            if wanted <= listed:
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(wanted - listed))
                raise UnavailableError(f"the coordinator does not list {missing} in time")
            time.sleep(0.05)


@dataclass(frozen=True)
class AppliedChange:
    """A change the domain applied: its version and when the final approval went out/back."""

    version: int
    started_wall: float  # time.time() just before the final approval was sent
    started: float  # time.perf_counter() at the same moment
    acknowledged: float  # time.perf_counter() when the coordinator answered (state stored)


def apply_change(domain: BenchDomain, changes: Sequence[domain_pb2.Change]) -> AppliedChange:
    """Propose `changes` as operator 0, approve as operators 1.. until the quorum is met.

    Every approval is signed before the clock starts (signing is the operator's time, on
    their token); the clock starts just before the final approval is sent.
    """
    client = domain.coordinator_client()
    view = client.propose(changes, domain.operator_signer(0), reason="benchmark")
    approvals = [
        quorum.approve(view.proposal, domain.operator_signer(index))
        for index in range(1, domain.quorum)
    ]
    if not approvals:
        raise RuntimeError("a benchmark domain needs a quorum of at least 2 to time approvals")
    for approval in approvals[:-1]:
        client.submit_approval(approval)
    started_wall = time.time()
    started = time.perf_counter()
    result = client.submit_approval(approvals[-1])
    acknowledged = time.perf_counter()
    if not result.applied:
        raise UnavailableError(
            f"the proposal was not applied: {result.state} ({result.detail or 'no detail'})"
        )
    return AppliedChange(result.applied_version, started_wall, started, acknowledged)


class StatusPoller:
    """`HsaAdmin.GetStatus` of several nodes over reused channels (as the demo application)."""

    def __init__(self, domain: BenchDomain, hosts: Iterable[str]) -> None:
        self._channels = {host: domain.node_channel(host) for host in hosts}
        self._stubs = {
            host: services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
            for host, channel in self._channels.items()
        }

    def version(self, host: str, timeout: float = 2.0) -> int:
        """The version `host` reports now (0 if it does not answer)."""
        try:
            status: services_pb2.HsaStatus = self._stubs[host].GetStatus(
                services_pb2.HsaStatusRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return 0
        return int(status.version)

    def wait_version(
        self, hosts: Iterable[str], version: int, *, timeout: float, interval: float = 0.002
    ) -> dict[str, float]:
        """Poll until every host reports `version` (or later); when each did (perf_counter).

        The hosts still behind are asked one after the other, then the poller sleeps
        `interval`; a host is not asked again once it is current. UnavailableError after
        `timeout` seconds, naming the hosts still behind.
        """
        pending = list(hosts)
        reached: dict[str, float] = {}
        deadline = time.perf_counter() + timeout
        while pending:
            for host in list(pending):
                if self.version(host) >= version:
                    reached[host] = time.perf_counter()
                    pending.remove(host)
            if not pending:
                break
            if time.perf_counter() > deadline:
                raise UnavailableError(
                    f"{', '.join(pending)} did not reach version {version} in {timeout:g} s"
                )
            time.sleep(interval)
        return reached

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            channel.close()


_LOG_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S,%f"


def log_events(path: Path, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
    """(wall-clock time, match) of every line of a process log that `pattern` finds.

    The processes log with Python's default `asctime` (local time, millisecond resolution)
    at the start of each line; lines without a parsable time are skipped.
    """
    events: list[tuple[float, re.Match[str]]] = []
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        match = pattern.search(line)
        if match is None:
            continue
        try:
            stamp = datetime.strptime(line[:23], _LOG_TIME_FORMAT).timestamp()
        except ValueError:
            continue
        events.append((stamp, match))
    return events
