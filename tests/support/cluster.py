"""A local domain of real processes for cluster and chaos tests: `LocalCluster`.

    with LocalCluster(tmp_path / "domain") as cluster:    # init, start, wait converged
        cluster.kill_node("hsa-2")
        ...

or, in a test, the `local_cluster` fixture (a factory; clusters close at teardown):

    def test_x(local_cluster):
        cluster = local_cluster(nodes=3)

A replicated domain (`coordinators=3`: a 3-member etcd cluster of the system's `etcd`,
replicas coordinator-1..3, needs the `etcd_bin` fixture so that a missing etcd skips, or
fails under HSM_REQUIRE_ALL), with faults for chaos tests:

    def test_y(local_cluster, etcd_bin):
        cluster = local_cluster(coordinators=3)
        killed = cluster.kill_replica("leader")        # SIGKILL whoever leads
        cluster.wait_for_leader(other_than=killed)     # another takes over
        cluster.pause_replica("coordinator-2"); cluster.resume_replica("coordinator-2")
        cluster.kill_etcd_member("etcd-1"); cluster.start_etcd()

A `deploy.localdomain.LocalDomain` (the mechanism the benchmarks' domain shares); what is the
tests' own: three nodes by default, an existing domain directory reused, nodes started one
after the other, every process killed (SIGKILL) rather than asked to stop, the processes' logs
printed on failure, and `wait_for` failing the test.

Invariants: every process a cluster starts is killed in `close()` (with its whole process
group), which runs on leaving the `with` block, at fixture teardown and, as a last resort,
at interpreter exit (atexit), whether or not the test failed. When a test fails (or an
exception leaves the `with` block) the tail of every process's log is printed, so the
failure report shows what the processes said.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from deploy import cluster as runner
from deploy.init import DomainLayout, load_layout
from deploy.localdomain import FAST_SCRYPT_N, LocalDomain
from domain_core.errors import UnavailableError
from domain_edge.client import CoordinatorClient
from domain_edge.file_tokens import FileTokenSigner
from domain_edge.layout import DomainPaths
from domain_proto import services_pb2

__all__ = [
    "FAST_SCRYPT_N",
    "LEADER",
    "LocalCluster",
    "close_clusters",
    "local_cluster",
    "terminal_stream",
]

T = TypeVar("T")


class _Writer(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


_LOG_LINES = 40
LEADER = "leader"


class LocalCluster(LocalDomain):
    """A coordinator and N HSAs as real processes, in a fresh domain directory."""

    noun = "cluster"
    kill_on_stop = True
    parallel_start = False

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        operators: int = 3,
        quorum: int = 2,
        domain_id: str = "local",
        start_timeout: float = 30.0,
        workers: int = 0,
        coordinators: int = 1,
        store: str | None = None,
    ) -> None:
        super().__init__(
            directory,
            nodes=nodes,
            operators=operators,
            quorum=quorum,
            domain_id=domain_id,
            start_timeout=start_timeout,
            workers=workers,
            coordinators=coordinators,
            store=store,
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def init(self) -> DomainLayout:
        """Create the domain directory (fast scrypt) unless it exists already."""
        if DomainPaths(self.directory).domain_file.exists():
            self._layout = load_layout(self.directory)
            return self._layout
        return super().init()

    def _wait_started(self) -> None:
        """The genesis nodes converged (a reused directory may hold nodes not yet members)."""
        self.wait_converged(hosts=self.layout.genesis_nodes)

    def close(self, *, dump_logs: bool = False) -> None:
        """Kill every process (SIGKILL to its group); print the logs' tails if asked."""
        if dump_logs:
            self._stop_after_failure()
        else:
            self.stop()

    def _report_failure(self) -> None:
        if self.initialised:
            self.dump_logs()

    def dump_logs(self, stream: _Writer | None = None, lines: int = _LOG_LINES) -> None:
        """Print the last lines of every process's log."""
        out: _Writer = stream or sys.stderr
        for name in self.layout.process_names:
            path = self.layout.log_file(name)
            tail = runner.log_tail(path, lines)
            out.write(f"----- {name}: last {len(tail)} lines of {path}\n")
            for line in tail:
                out.write(f"  {line}\n")
        out.flush()

    # --- processes, clients -------------------------------------------------------------------

    def start_node(self, host: str, *, wait_for_health: bool = True) -> None:
        """Start (or restart) one node; by default returns once it is SERVING, its key service
        included (it took a peer's key floors: a peer must be up)."""
        super().start_node(host, wait_for_health=wait_for_health)
        if wait_for_health:
            self.wait_for(
                lambda: not self.node_status(host).key_service_waiting,
                timeout=self.start_timeout,
                what=f"{host}'s key service to take a peer's key floors",
            )

    def operator_signer(self, name: str) -> FileTokenSigner:
        """Open operator `name`'s file token with its demo passphrase file."""
        return self.open_operator_signer(name)

    def coordinator_client(self, **kwargs: Any) -> CoordinatorClient:
        """A `domain_edge.client.CoordinatorClient` for the operator port."""
        return CoordinatorClient(self.coordinator_operator_address, self.ca_pem(), **kwargs)

    # --- replicas and etcd members (a domain on etcd) ------------------------------------------

    def replica(self, which: str = LEADER) -> str:
        """Replica `which` by name, or "leader": the one that leads now (waiting for one)."""
        if which != LEADER:
            if which not in self.layout.coordinators:
                raise ValueError(f"no replica {which!r}: {', '.join(self.layout.coordinators)}")
            return which
        return self.wait_for_leader()

    def wait_for_leader(self, timeout: float = 30.0, other_than: str = "") -> str:
        """Wait until a running replica (not `other_than`) leads; its name."""

        def leads() -> str:
            name = self.leader()
            return name if name and name != other_than and self.is_running(name) else ""

        return self.wait_for(
            leads, timeout=timeout, what=f"a replica other than {other_than!r} to lead"
        )

    def kill_replica(self, which: str = LEADER) -> str:
        """SIGKILL a coordinator replica (by name, or "leader"); its name."""
        name = self.replica(which)
        self.kill(name)
        return name

    def pause_replica(self, which: str = LEADER) -> str:
        """SIGSTOP a coordinator replica (by name, or "leader"); its name."""
        name = self.replica(which)
        self.pause(name)
        return name

    def resume_replica(self, name: str) -> None:
        """SIGCONT a replica paused with `pause_replica`."""
        self.resume(name)

    def kill_etcd_member(self, name: str) -> None:
        """SIGKILL one etcd member (`etcd-<n>`); `start_etcd()` starts it again."""
        self._etcd_member(name)
        self.kill(name)

    def pause_etcd_member(self, name: str) -> None:
        """SIGSTOP one etcd member: alive but silent."""
        self._etcd_member(name)
        self.pause(name)

    def resume_etcd_member(self, name: str) -> None:
        """SIGCONT an etcd member paused with `pause_etcd_member`."""
        self.resume(name)

    def _etcd_member(self, name: str) -> None:
        if name not in self.layout.etcd_members:
            raise ValueError(f"no etcd member {name!r}: {', '.join(self.layout.etcd_members)}")

    # --- observing ----------------------------------------------------------------------------

    def wait_converged(
        self, timeout: float = 30.0, hosts: Iterator[str] | tuple[str, ...] | None = None
    ) -> dict[str, services_pb2.HsaStatus]:
        """Wait until the nodes (default: all running) are healthy on one version and hash."""
        wanted = list(hosts) if hosts is not None else list(self.node_addresses())
        return runner.wait_converged(self.layout, timeout=timeout, hosts=wanted)

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 15.0, what: str = "the condition"
    ) -> T:
        """Poll `predicate` until it returns a truthy value (returned); fail after `timeout`.

        Exceptions other than UnavailableError propagate at once; UnavailableError (a process
        down) counts as "not yet".
        """
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            value: T | None
            try:
                value = predicate()
            except UnavailableError as error:
                value, last_error = None, error.message
            if value:
                return value
            if time.monotonic() > deadline:
                suffix = f" (last error: {last_error})" if last_error else ""
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{suffix}")
            time.sleep(0.1)


@pytest.fixture
def local_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalCluster]]:
    """Factory fixture: `local_cluster(nodes=3, ...)` starts a cluster; all close at teardown.

    Logs are printed when the test failed. Use with `from support.cluster import local_cluster`
    in the test module (or a conftest).
    """
    clusters: list[LocalCluster] = []
    failed_before = request.session.testsfailed

    def make(name: str = "domain", **kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / name, **kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    close_clusters(request, clusters, failed_before)


def terminal_stream(request: pytest.FixtureRequest) -> _Writer:
    """Where fixture teardown can print for a person to read: pytest's terminal reporter
    (teardown output is captured and not shown for a failure in the call phase), or stderr."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    return _ReporterStream(reporter) if reporter is not None else sys.stderr


def close_clusters(
    request: pytest.FixtureRequest, clusters: Iterable[LocalCluster], failed_before: int
) -> None:
    """Close every cluster; if a test failed since `failed_before`, print each one's log tails."""
    failed = request.session.testsfailed > failed_before
    for cluster in clusters:
        cluster.close()
        if failed and cluster.initialised:
            stream = terminal_stream(request)
            stream.write(f"\n===== logs of the local cluster in {cluster.directory}\n")
            cluster.dump_logs(stream)


class _ReporterStream:
    """A text stream that writes through pytest's terminal reporter (not captured)."""

    def __init__(self, reporter: Any) -> None:
        self._reporter = reporter

    def write(self, text: str) -> int:
        self._reporter.write(text)
        return len(text)

    def flush(self) -> None:
        self._reporter.flush()
