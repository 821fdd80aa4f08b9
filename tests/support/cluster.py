"""A local domain of real processes for cluster and chaos tests: `LocalCluster`.

    with LocalCluster(tmp_path / "domain") as cluster:    # init, start, wait converged
        cluster.kill_node("hsa-2")
        ...

or, in a test, the `local_cluster` fixture (a factory; clusters close at teardown):

    def test_x(local_cluster):
        cluster = local_cluster(nodes=3)

Invariants: every process a cluster starts is killed in `close()` (with its whole process
group), which runs on leaving the `with` block, at fixture teardown and, as a last resort,
at interpreter exit (atexit), whether or not the test failed. When a test fails (or an
exception leaves the `with` block) the tail of every process's log is printed, so the
failure report shows what the processes said.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

from deploy import cluster as runner
from deploy.enrollment import read_enrollment
from deploy.init import (
    COORDINATOR_NAME,
    DomainLayout,
    add_node,
    init_domain,
    load_layout,
    read_passphrase,
)
from domain_core.errors import UnavailableError
from domain_core.pb import domain_pb2, services_pb2
from domain_core.signers import FileTokenSigner, load_file_token
from domain_core.transport import TlsMaterial

if TYPE_CHECKING:
    from types import TracebackType

    from domain_core.client import CoordinatorClient

__all__ = ["LocalCluster", "local_cluster"]

T = TypeVar("T")


class _Writer(Protocol):
    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...


FAST_SCRYPT_N = 2**14
_LOG_LINES = 40


class LocalCluster:
    """A coordinator and N HSAs as real processes, in a fresh domain directory."""

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        operators: int = 3,
        quorum: int = 2,
        domain_id: str = "local",
        start_timeout: float = 30.0,
    ) -> None:
        self.directory = Path(directory)
        self.nodes, self.operators, self.quorum = nodes, operators, quorum
        self.domain_id = domain_id
        self.start_timeout = start_timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._layout: DomainLayout | None = None
        self._closed = False
        atexit.register(self.close)

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def layout(self) -> DomainLayout:
        """The domain's files (re-read, so nodes added later appear)."""
        if self._layout is None:
            raise RuntimeError("the cluster is not initialised; call start() first")
        return self._layout

    def init(self) -> DomainLayout:
        """Create the domain directory (fast scrypt) unless it exists already."""
        if (self.directory / "domain.json").exists():
            self._layout = load_layout(self.directory)
        else:
            self._layout = init_domain(
                self.directory,
                nodes=self.nodes,
                operators=self.operators,
                quorum=self.quorum,
                domain_id=self.domain_id,
                scrypt_n=FAST_SCRYPT_N,
            )
        return self._layout

    def start(self) -> LocalCluster:
        """Init if needed, start the coordinator and every node, wait until converged."""
        self.init()
        try:
            self.start_coordinator()
            for host in self.layout.node_configs:
                self.processes[host] = runner.start_node(
                    self.layout, host, timeout=self.start_timeout, wait_for_health=False
                )
            self.wait_converged(hosts=self.layout.genesis_nodes)
        except BaseException:
            self.close(dump_logs=True)
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(dump_logs=exc is not None)

    def close(self, *, dump_logs: bool = False) -> None:
        """Kill every process (SIGKILL to its group); print the logs' tails if asked."""
        if self._closed:
            return
        self._closed = True
        for process in self.processes.values():
            runner.stop_process(process, kill=True)
        if dump_logs and self._layout is not None:
            self.dump_logs()
        if self._layout is not None:
            runner.remove_run_files(self._layout, self._layout.process_names)
        atexit.unregister(self.close)

    @property
    def initialised(self) -> bool:
        """Whether the domain directory exists (init ran)."""
        return self._layout is not None

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

    # --- processes ----------------------------------------------------------------------------

    def start_coordinator(self) -> None:
        """Start the coordinator (again); returns once it is SERVING."""
        self._reap(COORDINATOR_NAME)
        self.processes[COORDINATOR_NAME] = runner.start_coordinator(
            self.layout, timeout=self.start_timeout
        )

    def stop_coordinator(self, grace: float = runner.STOP_GRACE_SECONDS) -> int:
        """SIGTERM the coordinator (SIGKILL after `grace`); return its exit status."""
        return self._stop(COORDINATOR_NAME, grace=grace, kill=False)

    def kill_coordinator(self) -> int:
        """SIGKILL the coordinator."""
        return self._stop(COORDINATOR_NAME, grace=runner.STOP_GRACE_SECONDS, kill=True)

    def start_node(self, host: str, *, wait_for_health: bool = True) -> None:
        """Start (or restart) one node; by default returns once it is SERVING."""
        self._reap(host)
        self._layout = load_layout(self.directory)
        self.processes[host] = runner.start_node(
            self.layout, host, timeout=self.start_timeout, wait_for_health=wait_for_health
        )

    def stop_node(self, host: str, grace: float = runner.STOP_GRACE_SECONDS) -> int:
        """SIGTERM one node (SIGKILL after `grace`); return its exit status."""
        return self._stop(host, grace=grace, kill=False)

    def kill_node(self, host: str) -> int:
        """SIGKILL one node: no chance to clean up, as in a crash."""
        return self._stop(host, grace=runner.STOP_GRACE_SECONDS, kill=True)

    def add_node(self, host_id: str | None = None, *, start: bool = True) -> domain_pb2.Host:
        """Prepare a new node and return its verified host record for an add-host proposal.

        The node is started (not yet a member, so not healthy) unless `start` is False.
        """
        path = add_node(self.directory, host_id)
        self._layout = load_layout(self.directory)
        host = read_enrollment(path, self.ca_pem(), self.layout.domain_id, datetime.now(UTC))
        if start:
            self.start_node(host.host_id, wait_for_health=False)
        return host

    def is_running(self, name: str) -> bool:
        """Whether the process `name` was started and has not exited."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def _stop(self, name: str, *, grace: float, kill: bool) -> int:
        process = self.processes.pop(name, None)
        if process is None:
            raise RuntimeError(f"{name} is not running in this cluster")
        code = runner.stop_process(process, grace=grace, kill=kill)
        self.layout.ready_file(name).unlink(missing_ok=True)
        return code

    def _reap(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None:
            if process.poll() is None:
                raise RuntimeError(f"{name} is running already (pid {process.pid})")
            del self.processes[name]

    # --- addresses, identities, clients -------------------------------------------------------

    def address(self, name: str) -> str:
        """The address `name` wrote to its ready file (mutual TLS)."""
        info = runner.read_ready_file(self.layout.ready_file(name))
        if info is None:
            raise UnavailableError(f"{name} has no ready file: it is not running")
        return info.address

    def node_addresses(self) -> dict[str, str]:
        """Addresses of the nodes that are running now."""
        return {h: self.address(h) for h in self.layout.node_configs if self.is_running(h)}

    @property
    def coordinator_address(self) -> str:
        """The coordinator's mutual-TLS (HSA-facing) address."""
        return self.address(COORDINATOR_NAME)

    @property
    def coordinator_operator_address(self) -> str:
        """The coordinator's server-auth TLS (operator-facing) address."""
        info = runner.read_ready_file(self.layout.ready_file(COORDINATOR_NAME))
        if info is None:
            raise UnavailableError("the coordinator is not running")
        return info.operator_address

    def client_tls(self) -> TlsMaterial:
        """The demo application's TLS identity (spiffe://<domain>/client/demo-app)."""
        return runner.client_tls(self.layout)

    def ca_pem(self) -> bytes:
        """The domain CA certificate."""
        return self.layout.ca_cert.read_bytes()

    def operator_signer(self, name: str) -> FileTokenSigner:
        """Open operator `name`'s file token with its demo passphrase file."""
        token, passphrase = self.layout.operator_tokens[name]
        return load_file_token(token, read_passphrase(passphrase))

    def coordinator_client(self, **kwargs: Any) -> CoordinatorClient:
        """A `domain_core.client.CoordinatorClient` for the operator port."""
        from domain_core.client import CoordinatorClient

        return CoordinatorClient(self.coordinator_operator_address, self.ca_pem(), **kwargs)

    # --- observing ----------------------------------------------------------------------------

    def node_status(self, host: str, timeout: float = 2.0) -> services_pb2.HsaStatus:
        """HsaAdmin.GetStatus of one node (UnavailableError if it does not answer)."""
        return runner.node_status(self.layout, host, timeout=timeout)

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
    failed = request.session.testsfailed > failed_before
    # Teardown output is captured and not shown for a failure in the call phase: write the
    # logs to the terminal itself.
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for cluster in clusters:
        cluster.close()
        if failed and cluster.initialised:
            stream: _Writer = _ReporterStream(reporter) if reporter is not None else sys.stderr
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
