"""A local domain of real processes for benchmarks: `BenchDomain`.

    with BenchDomain(work_dir / "floor", nodes=1) as domain:   # init, start, converge
        channel = domain.node_channel("hsa-1")
        ...

`BenchDomain(..., workers=N)` gives every node N key service worker processes (written into
the node configs by `init_domain`); `key_endpoints(host)` lists the addresses serving a
node's key service (the node's, then its workers').

A `deploy.localdomain.LocalDomain` (built on `deploy.init.init_domain` and the process runner
`deploy.cluster`, the same code `hsm-domain up` uses), so a benchmark measures the real process
model, mutual TLS and interceptors. What is the benchmarks' own: one node by default, nodes
started in parallel, a graceful stop, and one coordinator client and opened operator tokens
kept for the domain's lifetime.

Invariants: every process a domain starts is stopped in `stop()` (SIGTERM to its process
group, SIGKILL after a grace period), which runs on leaving the `with` block, whether or not
the benchmark failed, and, as a last resort, at interpreter exit (atexit); `python -m bench`
turns SIGTERM into SystemExit so that these run. Operator passphrases are read from the demo
passphrase files of the local domain and never printed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import grpc

from deploy import cluster as runner
from deploy.init import DomainLayout
from deploy.localdomain import FAST_SCRYPT_N, LocalDomain
from domain_core import quorum
from domain_core.errors import UnavailableError
from domain_edge.client import CoordinatorClient
from domain_edge.config import NodeConfig
from domain_edge.file_tokens import FileTokenSigner
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "FAST_SCRYPT_N",
    "AppliedChange",
    "BenchDomain",
    "StatusPoller",
    "apply_change",
    "log_events",
]

STOP_GRACE_SECONDS: Final = 3.0
BENCH_CREATE_KEY_RATE: Final = 1_000_000


class BenchDomain(LocalDomain):
    """A coordinator and N HSAs as real processes, in a fresh directory (always stopped)."""

    stop_grace = STOP_GRACE_SECONDS

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 1,
        operators: int = 3,
        quorum: int = 2,
        start_timeout: float = 60.0,
        workers: int = 0,
        coordinators: int = 1,
        store: str | None = None,
    ) -> None:
        """`workers`: key service worker processes of each node (`key_service_workers`);
        `coordinators` replicas on `store` ("sqlite" or "etcd"; more than one implies etcd)."""
        super().__init__(
            directory,
            nodes=nodes,
            operators=operators,
            quorum=quorum,
            start_timeout=start_timeout,
            workers=workers,
            coordinators=coordinators,
            store=store,
        )
        self._coordinator_client: CoordinatorClient | None = None
        self._signers: dict[int, FileTokenSigner] = {}

    def stop(self) -> None:
        """Close the coordinator client, forget the opened tokens, stop every process."""
        if self._coordinator_client is not None:
            self._coordinator_client.close()
            self._coordinator_client = None
        self._signers.clear()
        super().stop()

    def init(self) -> DomainLayout:
        """Create the domain directory, with the CreateKey quota lifted on every node: a
        benchmark measures what CreateKey costs, not the per-principal rate a KMS allows."""
        layout = super().init()
        for path in layout.node_configs.values():
            config = NodeConfig.load(path)
            unlimited = {
                "create_key_per_second": BENCH_CREATE_KEY_RATE,
                "create_key_burst": BENCH_CREATE_KEY_RATE,
            }
            dataclasses.replace(config, limits={**config.limits, **unlimited}).save(path)
        return layout

    def coordinator_client(self) -> CoordinatorClient:
        """A quorum-flow client of the coordinator's operator port (one per domain, reused)."""
        if self._coordinator_client is None:
            self._coordinator_client = CoordinatorClient(
                self.coordinator_operator_address, self.ca_pem(), timeout=30.0
            )
        return self._coordinator_client

    def operator_signer(self, index: int) -> FileTokenSigner:
        """The `index`-th operator's file token, opened once with its demo passphrase file.

        Kept open for the domain's lifetime: opening a token costs a key derivation (tens of
        milliseconds), which is the operator's time and no part of what is measured.
        """
        signer = self._signers.get(index)
        if signer is None:
            signer = self.open_operator_signer(list(self.layout.operator_tokens)[index])
            self._signers[index] = signer
        return signer

    def wait_converged(
        self, hosts: Iterable[str] | None = None, timeout: float | None = None
    ) -> dict[str, services_pb2.HsaStatus]:
        """Wait until the nodes (default: all) are healthy on one version and hash."""
        return runner.wait_converged(
            self.layout,
            timeout=self.start_timeout if timeout is None else timeout,
            hosts=list(hosts) if hosts is not None else None,
        )


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
