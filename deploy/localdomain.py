"""A local domain of real processes driven from Python: `LocalDomain`.

    with LocalDomain(directory, nodes=3) as domain:   # init, start, wait until converged
        channel = domain.node_channel("hsa-1")
        ...

    with LocalDomain(directory, coordinators=3) as domain:   # etcd, 3 replicas, 3 HSAs
        domain.kill(domain.leader())
        ...

The one mechanism behind the benchmarks' `bench._cluster.BenchDomain` and the tests'
`LocalCluster` (tests/support/cluster.py): it creates the domain with `deploy.init` (cheap
operator token key derivation) and runs the etcd members (a domain on etcd), the coordinators
and the HSAs through `deploy._domain_etcd` and `deploy.cluster`, the code `hsm-domain up`
uses, so that what runs is the real process model with mutual TLS.
Subclasses choose the policies that really differ (how processes are stopped, whether nodes
start in parallel, what "started" waits for, what happens when a start fails) through the
class attributes and hooks below.

Invariants:
- every process a domain starts is stopped by `stop()` with its whole process group, nodes
  first, then the coordinators, then the etcd members (SIGTERM and SIGKILL after `stop_grace`
  seconds, or SIGKILL at once when `kill_on_stop`; a paused process is resumed first);
  `stop()` is idempotent and runs when `start()` fails, on leaving the `with` block whether or
  not its body failed, and, as a last resort, at interpreter exit (atexit, registered at
  construction);
- the etcd members are healthy before any coordinator starts, every coordinator is started
  (and on etcd one leads) before any node, and a process that is running is never started a
  second time;
- operator passphrases are read from the demo passphrase files of the local domain and never
  printed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Final, Self

import grpc

from deploy import _domain_etcd
from deploy import cluster as runner
from deploy._runfiles import stop_and_wait
from deploy.enrollment import VerifiedEnrollment, read_enrollment
from deploy.etcd import EtcdProcess
from deploy.init import (
    DomainLayout,
    add_node,
    init_domain,
    load_layout,
    read_passphrase,
)
from domain_core.errors import UnavailableError
from domain_edge.client import CoordinatorClient
from domain_edge.config import check_worker_count
from domain_edge.file_tokens import FileTokenSigner, load_file_token
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2

__all__ = ["FAST_SCRYPT_N", "LocalDomain"]

# Operator tokens of a local test or benchmark domain are throwaway: a cheaper key derivation
# than the default saves seconds per domain without changing anything that is tested or measured.
FAST_SCRYPT_N: Final = 2**14
_REGISTERED_POLL_SECONDS: Final = 0.05
_CALL_TIMEOUT_SECONDS: Final = 30.0  # one coordinator call while the machine is busy starting


class LocalDomain:
    """A coordinator and N HSAs as real processes, in a fresh directory (always stopped)."""

    #: What error messages call this domain ("the cluster is not initialised").
    noun: ClassVar[str] = "domain"
    #: Seconds `stop()`, `stop_node()` and `stop_coordinator()` wait after SIGTERM (or after
    #: SIGKILL) before they SIGKILL the process group.
    stop_grace: ClassVar[float] = runner.STOP_GRACE_SECONDS
    #: Whether `stop()` kills at once (SIGKILL) rather than asking first (SIGTERM).
    kill_on_stop: ClassVar[bool] = False
    #: Whether `start()` starts the nodes in parallel (faster for many nodes) or in order.
    parallel_start: ClassVar[bool] = True

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        operators: int = 3,
        quorum: int = 2,
        domain_id: str = "local",
        start_timeout: float = runner.DEFAULT_START_TIMEOUT,
        workers: int = 0,
        coordinators: int = 1,
        store: str | None = None,
    ) -> None:
        """`workers`: key service worker processes of each node (`key_service_workers`);
        `coordinators` replicas on `store` (see `deploy.init.init_domain`)."""
        self.directory = Path(directory)
        self.nodes, self.operators, self.quorum = nodes, operators, quorum
        self.domain_id = domain_id
        self.workers = check_worker_count(workers)
        self.coordinators, self.store = coordinators, store
        self.start_timeout = start_timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._paused: set[str] = set()
        self._layout: DomainLayout | None = None
        self._stopped = False
        atexit.register(self.stop)

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def layout(self) -> DomainLayout:
        """The domain's files (re-read when a node starts, so nodes added later appear)."""
        if self._layout is None:
            raise RuntimeError(f"the {self.noun} is not initialised; call start() first")
        return self._layout

    @property
    def initialised(self) -> bool:
        """Whether the domain directory exists (init ran)."""
        return self._layout is not None

    @property
    def stopped(self) -> bool:
        """Whether `stop()` ran (its processes are gone; the domain cannot start again)."""
        return self._stopped

    def init(self) -> DomainLayout:
        """Create the domain directory (fast key derivation for the operator tokens)."""
        self._layout = init_domain(
            self.directory,
            nodes=self.nodes,
            operators=self.operators,
            quorum=self.quorum,
            domain_id=self.domain_id,
            scrypt_n=FAST_SCRYPT_N,
            workers=self.workers,
            coordinators=self.coordinators,
            store=self.store,
        )
        return self._layout

    def start(self) -> Self:
        """Init, start the etcd members (on etcd), every coordinator and every node, wait until
        started (`_wait_started`)."""
        try:
            self.init()
            if self.layout.etcd is not None:
                self.start_etcd()
            self.start_coordinators()
            hosts = list(self.layout.node_configs)
            if self.parallel_start:
                with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
                    futures = {host: pool.submit(self._spawn_node, host) for host in hosts}
                # Record every node that did start before raising the first failure, so that
                # `stop()` stops it too.
                for host, future in futures.items():
                    if future.exception() is None:
                        self.processes[host] = future.result()
                for future in futures.values():
                    future.result()
            else:
                for host in hosts:
                    self.processes[host] = self._spawn_node(host)
            self._wait_started()
        except BaseException:
            self._stop_after_failure()
            raise
        return self

    def _spawn_node(self, host: str) -> subprocess.Popen[bytes]:
        return runner.start_node(
            self.layout, host, timeout=self.start_timeout, wait_for_health=False
        )

    def _wait_started(self) -> None:
        """What `start()` waits for: every node converged and listed by the coordinator."""
        hosts = list(self.layout.node_configs)
        runner.wait_converged(self.layout, timeout=self.start_timeout, hosts=hosts)
        self.wait_registered(hosts)

    def _stop_after_failure(self) -> None:
        """Stop every process after a failure (a failed start, an exception in the `with`
        block), then `_report_failure` unless it had been stopped already."""
        if self._stopped:
            return
        self.stop()
        self._report_failure()

    def _report_failure(self) -> None:
        """Show what the processes said after a failure: nothing here; a subclass may."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.stop()
        else:
            self._stop_after_failure()

    def stop(self) -> None:
        """Stop every process (the nodes in parallel, then the coordinators, then the etcd
        members); idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for name in list(self._paused):
            self.resume(name)
        order = self._stop_order()
        for kind in order:
            group = [p for name, p in self.processes.items() if name in kind]
            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(self._stop_process, group))
        leftover = [p for name, p in self.processes.items() if not any(name in k for k in order)]
        for process in leftover:
            self._stop_process(process)
        if self._layout is not None:
            runner.remove_run_files(self._layout, self._layout.process_names)
        atexit.unregister(self.stop)

    def _stop_order(self) -> list[set[str]]:
        if self._layout is None:
            return [set(self.processes)]
        layout = self._layout
        return [set(layout.node_configs), set(layout.coordinators), set(layout.etcd_members)]

    def _stop_process(self, process: subprocess.Popen[bytes]) -> int:
        return runner.stop_process(process, grace=self.stop_grace, kill=self.kill_on_stop)

    # --- processes ----------------------------------------------------------------------------

    def pid(self, name: str) -> int:
        """The process id of `name` (the coordinator or a host id)."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            raise UnavailableError(f"{name} is not running")
        return process.pid

    def is_running(self, name: str) -> bool:
        """Whether the process `name` was started and has not exited."""
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def _coordinator(self, name: str | None) -> str:
        """`name`, or the domain's only coordinator (ValueError if it has replicas)."""
        if name is not None:
            return name
        if len(self.layout.coordinators) != 1:
            raise ValueError(f"say which coordinator: {', '.join(self.layout.coordinators)}")
        return self.layout.coordinators[0]

    def start_coordinator(self, name: str | None = None) -> None:
        """Start coordinator `name` (default: the only one) again; returns once it is SERVING."""
        name = self._coordinator(name)
        self._reap(name)
        self.processes[name] = runner.start_coordinator(
            self.layout, name=name, timeout=self.start_timeout
        )

    def start_coordinators(self) -> None:
        """Start every coordinator that does not run (replicas in parallel); on etcd, return
        once one of them leads."""
        names = [n for n in self.layout.coordinators if not self.is_running(n)]
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            futures = [pool.submit(self.start_coordinator, name) for name in names]
        for future in futures:
            future.result()
        if self.layout.replicated:
            _domain_etcd.wait_for_leader(self.layout, self.start_timeout)

    def stop_coordinator(self, grace: float | None = None, name: str | None = None) -> int:
        """SIGTERM coordinator `name` (default: the only one; SIGKILL after `grace`, default
        `stop_grace`); its exit status."""
        return self._stop(self._coordinator(name), grace=grace, kill=False)

    def kill_coordinator(self, name: str | None = None) -> int:
        """SIGKILL coordinator `name` (default: the only one)."""
        return self._stop(self._coordinator(name), grace=None, kill=True)

    # --- replicas and etcd (a domain on etcd) ---------------------------------------------------

    def start_etcd(self) -> None:
        """Start every etcd member that does not run; returns once every member is healthy."""
        running = {n: self.processes[n].pid for n in self.layout.etcd_members if self.is_running(n)}
        for name in self.layout.etcd_members:
            if name not in running:
                self._reap(name)

        def record(name: str, started: EtcdProcess) -> None:
            self.processes[name] = started.process

        _domain_etcd.start_members(
            self.layout, running, timeout=self.start_timeout, on_start=record
        )

    def leader(self) -> str:
        """The coordinator replica that leads now ("" if none; the only coordinator on SQLite)."""
        if not self.layout.replicated:
            return self.layout.coordinators[0]
        return _domain_etcd.replica_leader(self.layout)

    def kill(self, name: str) -> int:
        """SIGKILL process `name` (a node, a coordinator, an etcd member): a crash."""
        return self._stop(name, grace=None, kill=True)

    def pause(self, name: str) -> None:
        """SIGSTOP process `name`'s group: alive but silent, as a hung or descheduled host."""
        stop_and_wait(self.pid(name), group=True)
        self._paused.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT process `name`'s group after `pause`."""
        self._paused.discard(name)
        process = self.processes.get(name)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)

    def start_node(self, host: str, *, wait_for_health: bool = False) -> None:
        """Start one (stopped) node; returns once it wrote its ready file (or is SERVING)."""
        self._reap(host)
        self._layout = load_layout(self.directory)
        self.processes[host] = runner.start_node(
            self.layout, host, timeout=self.start_timeout, wait_for_health=wait_for_health
        )

    def stop_node(self, host: str, grace: float | None = None) -> int:
        """SIGTERM one node (SIGKILL after `grace`, default `stop_grace`); its exit status."""
        return self._stop(host, grace=grace, kill=False)

    def kill_node(self, host: str) -> int:
        """SIGKILL one node: no chance to clean up, as in a crash."""
        return self._stop(host, grace=None, kill=True)

    def add_node(self, host_id: str | None = None, *, start: bool = True) -> VerifiedEnrollment:
        """Prepare a new node and return its verified enrollment (`.raw` goes into the add-host
        change, `changes.add_host(enrollment.raw)`; `.host` is the record it adds).

        The node is started (not yet a member, so not healthy) unless `start` is False.
        """
        path = add_node(self.directory, host_id)
        self._layout = load_layout(self.directory)
        enrollment = read_enrollment(path, self.ca_pem(), self.layout.domain_id, datetime.now(UTC))
        if start:
            self.start_node(enrollment.host_id, wait_for_health=False)
        return enrollment

    def _stop(self, name: str, *, grace: float | None, kill: bool) -> int:
        if name in self._paused:
            self.resume(name)
        process = self.processes.pop(name, None)
        if process is None:
            raise RuntimeError(f"{name} is not running in this {self.noun}")
        wait = self.stop_grace if grace is None else grace
        code = runner.stop_process(process, grace=wait, kill=kill)
        self.layout.ready_file(name).unlink(missing_ok=True)
        return code

    def _reap(self, name: str) -> None:
        """Forget `name`'s process if it exited; refuse to start a second one if it runs."""
        process = self.processes.get(name)
        if process is not None:
            if process.poll() is None:
                raise RuntimeError(f"{name} is running already (pid {process.pid})")
            del self.processes[name]

    # --- addresses, identities, clients -------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """The host ids of the domain's nodes."""
        return list(self.layout.node_configs)

    def _ready(self, name: str) -> runner.ReadyInfo:
        """What `name` wrote to its ready file; UnavailableError if it has none."""
        info = runner.read_ready_file(self.layout.ready_file(name))
        if info is None:
            raise UnavailableError(f"{name} has no ready file: it is not running")
        return info

    def address(self, name: str) -> str:
        """The mutual-TLS address `name` wrote to its ready file."""
        return self._ready(name).address

    def key_endpoints(self, host: str) -> list[str]:
        """The addresses serving `host`'s key service: the node's, then its workers' (from
        its ready file, so only workers that are ready)."""
        info = self._ready(host)
        return [info.address, *info.workers]

    def node_addresses(self) -> dict[str, str]:
        """Addresses of the nodes that are running now."""
        return {h: self.address(h) for h in self.layout.node_configs if self.is_running(h)}

    def _coordinator_ready(self) -> list[runner.ReadyInfo]:
        found = [
            info
            for name in self.layout.coordinators
            if self.is_running(name)
            and (info := runner.read_ready_file(self.layout.ready_file(name))) is not None
        ]
        if not found:
            raise UnavailableError(f"no coordinator of this {self.noun} is running")
        return found

    @property
    def coordinator_address(self) -> str:
        """The mutual-TLS (HSA-facing) address of every coordinator that runs, comma-separated
        (one address for a domain on SQLite)."""
        return ",".join(info.address for info in self._coordinator_ready())

    @property
    def coordinator_operator_address(self) -> str:
        """The server-auth TLS (operator-facing) address of every coordinator that runs,
        comma-separated: a client over them fails over between the replicas."""
        return ",".join(info.operator_address for info in self._coordinator_ready())

    def client_tls(self) -> TlsMaterial:
        """The demo application's TLS identity (spiffe://<domain>/client/demo-app)."""
        return runner.client_tls(self.layout)

    def ca_pem(self) -> bytes:
        """The domain CA certificate."""
        return self.layout.ca_cert.read_bytes()

    def node_channel(self, host: str) -> grpc.Channel:
        """A mutual-TLS channel to one node, as the demo application (close it after use)."""
        return runner.node_channel(self.layout, self.address(host), host)

    def open_operator_signer(self, name: str) -> FileTokenSigner:
        """Open operator `name`'s file token with its demo passphrase file.

        Every call derives the token's key again (tens of milliseconds).
        """
        token, passphrase = self.layout.operator_tokens[name]
        return load_file_token(token, read_passphrase(passphrase))

    # --- observing ----------------------------------------------------------------------------

    def node_status(self, host: str, timeout: float = 2.0) -> services_pb2.HsaStatus:
        """HsaAdmin.GetStatus of one node (UnavailableError if it does not answer)."""
        return runner.node_status(self.layout, host, timeout=timeout)

    def wait_registered(self, hosts: Iterable[str], timeout: float | None = None) -> None:
        """Wait until the coordinator lists these hosts (so it pushes new states to them)."""
        wanted = set(hosts)
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        with CoordinatorClient(
            self.coordinator_operator_address, self.ca_pem(), timeout=_CALL_TIMEOUT_SECONDS
        ) as client:
            while True:
                listed = {h.host_id for h in client.list_hsas() if h.address}
                if wanted <= listed:
                    return
                if time.monotonic() > deadline:
                    missing = ", ".join(sorted(wanted - listed))
                    raise UnavailableError(f"the coordinator does not list {missing} in time")
                time.sleep(_REGISTERED_POLL_SECONDS)
