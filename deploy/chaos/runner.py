"""`hsm-domain chaos DIR`: the processes, proxies and configs of a run (`ChaosRunner`); the
run itself (load, faults, checks) is `deploy.chaos.experiment`.

The runner owns the domain's processes for the run. It refuses a domain that is running
already, starts the coordinator and every member HSA itself (with pid files, so
`hsm-domain down DIR` can still stop them if the runner dies), and places TCP proxies
(`deploy.chaos.proxy`) on the links it cuts:
- one in front of the coordinator per HSA: each node config's `coordinator` names that node's
  own proxy while the run lasts, so cutting it isolates that node's calls to the coordinator
  (register, watch, pull, key records); the coordinator's pushes to the node go direct;
- one in front of each HSA for the workload's clients (their KeyClient endpoints);
- one in front of the coordinator's operator port, never cut, so the control workload keeps
  one address across coordinator restarts.
The status sampler and every final check talk to each process directly, not through proxies.

Invariants: a domain that runs already (any process with a live pid file) is refused before
anything is touched (no file written, no process signalled), and so is one that another
command is starting (the domain lock, `cluster.domain_lock`, held by `run_chaos` for the whole
run); every
process and proxy the runner started is stopped, paused processes are resumed first, only the
run files of the processes it started are removed, and the node configs are restored byte
for byte, whatever happens (normal end, error, Ctrl-C); the run's files live in DIR/chaos/
(the history as JSON lines, the throwaway operator tokens, which are deleted at the end);
nothing secret is printed or written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploy import cluster
from deploy._files import replace_file
from deploy.chaos.faults import FaultConfig
from deploy.chaos.history import History
from deploy.chaos.proxy import LinkMode, TcpProxy
from deploy.chaos.workload import (
    WorkloadConfig,
)
from deploy.init import COORDINATOR_NAME, DomainLayout
from domain_core.errors import InvalidInputError, UnavailableError
from domain_edge.client import CoordinatorClient
from domain_edge.config import NodeConfig
from domain_edge.layout import DomainPaths
from domain_edge.transport import TlsMaterial

__all__ = ["ChaosOptions", "ChaosRunner", "refuse_if_running"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChaosOptions:
    """Everything a chaos run needs to know."""

    directory: Path
    duration: float = 60.0
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    settle_timeout: float = 30.0
    min_availability: float = 0.9
    history_path: Path | None = None
    sample_interval: float = 0.5
    start_timeout: float = 30.0

    def history_file(self) -> Path:
        """Where the history goes (default DIR/chaos/history-<seed>.jsonl)."""
        if self.history_path is not None:
            return self.history_path
        return DomainPaths(Path(self.directory).absolute()).chaos_dir / f"history-{self.seed}.jsonl"


class ChaosRunner:
    """The processes, proxies and configs of one chaos run (implements `DomainControl`)."""

    def __init__(self, layout: DomainLayout, options: ChaosOptions, history: History) -> None:
        self.layout = layout
        self.options = options
        self.history = history
        self.members: list[str] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}
        self.coordinator_address = ""
        self.operator_address = ""
        self.client_proxies: dict[str, TcpProxy] = {}
        self.coordinator_proxies: dict[str, TcpProxy] = {}
        self.operator_proxy: TcpProxy | None = None
        self._saved_configs: dict[Path, bytes] = {}
        self._started: set[str] = set()  # every process name this run started
        self._paused: set[str] = set()
        self._lock = threading.RLock()
        self.tls: TlsMaterial = cluster.client_tls(layout)

    # --- setting up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the coordinator, the proxies and every member HSA; wait until converged.

        The caller holds the domain lock and has refused a running domain
        (`refuse_if_running`)."""
        refuse_if_running(self.layout)
        cluster.remove_run_files(self.layout, self.layout.process_names)
        for path in self.layout.node_configs.values():
            self._saved_configs[path] = path.read_bytes()
        timeout = self.options.start_timeout
        self._started.add(COORDINATOR_NAME)
        self.processes[COORDINATOR_NAME] = cluster.start_coordinator(
            self.layout, detach=True, timeout=timeout
        )
        info = cluster.read_ready_file(self.layout.ready_file(COORDINATOR_NAME))
        if info is None or not info.operator_address:
            raise UnavailableError("the coordinator wrote no operator address")
        self.coordinator_address, self.operator_address = info.address, info.operator_address
        self.operator_proxy = TcpProxy(info.operator_address, name="chaos-proxy-operator").start()
        with CoordinatorClient(self.operator_address, self.layout.ca_cert.read_bytes()) as client:
            head = client.latest_state()
        hosts = head.manifest.hosts_by_id
        self.members = [h for h in self.layout.node_configs if h in hosts]
        if not self.members:
            raise InvalidInputError(
                f"no node of {self.layout.root} is a member of the domain's current state"
            )
        for host in self.members:
            self.coordinator_proxies[host] = TcpProxy(
                self.coordinator_address, name=f"chaos-proxy-{host}-coordinator"
            ).start()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            list(pool.map(self.start_node, self.members))
        for host in self.members:
            self.client_proxies[host] = TcpProxy(
                self.addresses[host], name=f"chaos-proxy-{host}-client"
            ).start()
        cluster.wait_converged(self.layout, timeout=timeout, hosts=self.members)

    @property
    def client_endpoints(self) -> list[str]:
        """The proxy addresses the workload's clients use, one per HSA."""
        return [self.client_proxies[h].address for h in self.members]

    @property
    def stable_operator_address(self) -> str:
        """The operator port, through its never-cut proxy."""
        assert self.operator_proxy is not None
        return self.operator_proxy.address

    def node_addresses(self) -> dict[str, str]:
        """Current direct addresses of the member HSAs."""
        with self._lock:
            return {h: self.addresses[h] for h in self.members if h in self.addresses}

    def _point_at_proxy(self, host: str) -> None:
        """Make `host`'s config name its own coordinator proxy (before every start)."""
        path = self.layout.node_configs[host]
        config = NodeConfig.load(path)
        proxy = self.coordinator_proxies[host].address
        if config.coordinator != proxy:
            replace(config, coordinator=proxy).save(path)

    # --- DomainControl ------------------------------------------------------------------------

    def kill_node(self, host: str) -> None:
        """SIGKILL an HSA's process group."""
        with self._lock:
            process = self.processes.pop(host, None)
            self._paused.discard(host)
        if process is not None:
            cluster.stop_process(process, kill=True)

    def start_node(self, host: str) -> None:
        """Start an HSA (pointed at its coordinator proxy); return once it is serving."""
        with self._lock:
            self._point_at_proxy(host)
            self._started.add(host)
            process = cluster.start_node(
                self.layout, host, detach=True, timeout=self.options.start_timeout
            )
            self.processes[host] = process
            info = cluster.read_ready_file(self.layout.ready_file(host))
            if info is None:
                raise UnavailableError(f"{host} started but its ready file is gone")
            self.addresses[host] = info.address
            proxy = self.client_proxies.get(host)
        if proxy is not None and proxy.target != info.address:
            proxy.set_target(info.address)

    def _signal(self, host: str, signum: signal.Signals) -> None:
        with self._lock:
            process = self.processes.get(host)
        if process is None or process.poll() is not None:
            raise UnavailableError(f"{host} is not running")
        os.killpg(process.pid, signum)

    def pause_node(self, host: str) -> None:
        """SIGSTOP an HSA's process group."""
        self._signal(host, signal.SIGSTOP)
        with self._lock:
            self._paused.add(host)

    def resume_node(self, host: str) -> None:
        """SIGCONT an HSA's process group."""
        with self._lock:
            self._paused.discard(host)
        with contextlib.suppress(UnavailableError, ProcessLookupError):
            self._signal(host, signal.SIGCONT)

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator."""
        with self._lock:
            process = self.processes.pop(COORDINATOR_NAME, None)
        if process is not None:
            cluster.stop_process(process, kill=True)

    def start_coordinator(self) -> None:
        """Start the coordinator again (its ports are pinned); follow it if they moved."""
        with self._lock:
            self.processes[COORDINATOR_NAME] = cluster.start_coordinator(
                self.layout, detach=True, timeout=self.options.start_timeout
            )
            info = cluster.read_ready_file(self.layout.ready_file(COORDINATOR_NAME))
            if info is None:
                raise UnavailableError("the coordinator started but its ready file is gone")
            # start_coordinator points every node config at the coordinator itself; the
            # next start of each node points it back at its proxy.
            if info.address != self.coordinator_address:
                self.coordinator_address = info.address
                for proxy in self.coordinator_proxies.values():
                    proxy.set_target(info.address)
            if info.operator_address != self.operator_address and self.operator_proxy:
                self.operator_address = info.operator_address
                self.operator_proxy.set_target(info.operator_address)

    def _proxy(self, host: str, link: str) -> TcpProxy:
        proxies = self.client_proxies if link == "client" else self.coordinator_proxies
        return proxies[host]

    def cut_link(self, host: str, link: str, mode: str) -> None:
        """Cut one of `host`'s links through its proxy."""
        self._proxy(host, link).cut(LinkMode(mode))

    def restore_link(self, host: str, link: str) -> None:
        """Restore one of `host`'s links."""
        self._proxy(host, link).restore()

    # --- tearing down -------------------------------------------------------------------------

    def stop(self) -> None:
        """Resume, stop (nodes first) and forget every process; close proxies; restore configs."""
        with self._lock:
            processes = dict(self.processes)
            self.processes.clear()
        for process in processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGCONT)
        nodes = [p for n, p in processes.items() if n != COORDINATOR_NAME]
        if nodes:
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
                list(pool.map(lambda p: cluster.stop_process(p, grace=3.0), nodes))
        if COORDINATOR_NAME in processes:
            cluster.stop_process(processes[COORDINATOR_NAME], grace=3.0)
        cluster.remove_run_files(self.layout, sorted(self._started))
        for proxy in [
            *self.client_proxies.values(),
            *self.coordinator_proxies.values(),
            *([self.operator_proxy] if self.operator_proxy else []),
        ]:
            proxy.close()
        for path, content in self._saved_configs.items():
            with contextlib.suppress(OSError):
                if path.read_bytes() != content:
                    replace_file(path, content)


# --- observing the end ------------------------------------------------------------------------


def refuse_if_running(layout: DomainLayout) -> None:
    """InvalidInputError (one line) if any process of the domain runs: the chaos run starts,
    kills and restarts the processes itself, so it never takes over (or loses track of) ones
    that `hsm-domain up` started."""
    running = cluster.live_pids(layout)
    if running:
        names = ", ".join(f"{n} (pid {p})" for n, p in running.items())
        raise InvalidInputError(
            f"{layout.root} is running already ({names}); chaos starts its own processes: "
            f"stop it first: hsm-domain down {layout.root}"
        )
