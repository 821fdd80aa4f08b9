"""`hsm-domain chaos DIR`: the processes, proxies and configs of a run (`ChaosRunner`); the
run itself (load, faults, checks) is `deploy.chaos.experiment`.

The runner owns the domain's processes for the run. It refuses a domain that is running
already, starts the coordinator (or, on a domain with replicas, the etcd members and every
replica: `deploy.chaos.replicas`) and every member HSA itself (with pid files, so
`hsm-domain down DIR` can still stop them if the runner dies), and places TCP proxies
(`deploy.chaos.proxy`) on the links it cuts:
- one in front of each coordinator per HSA: each node config's `coordinator` names that node's
  own proxies (one per replica) while the run lasts, so cutting them isolates that node's
  calls to the coordinator (register, watch, pull, key records); the coordinators' pushes to
  the node go direct;
- one in front of each HSA for the workload's clients (their KeyClient endpoints);
- one in front of each coordinator's operator port, never cut, so the control workload keeps
  its addresses across restarts (all of them, comma-separated, on a domain with replicas);
- on a domain with replicas, one per replica and etcd member (`replicas.EtcdSide`): each
  replica's config `store` names its own, so cutting them cuts that replica off from etcd.
The status sampler and every final check talk to each process directly, not through proxies.

Invariants: a domain that runs already (any process with a live pid file) is refused before
anything is touched (no file written, no process signalled), and so is one that another
command is starting (the domain lock, `cluster.domain_lock`, held by `run_chaos` for the whole
run); every process and proxy the runner started is stopped, paused processes are resumed
first, only the run files of the processes it started are removed, and the node and
coordinator configs are restored byte for byte, whatever happens (normal end, error, Ctrl-C);
the run's files live in DIR/chaos/ (the history as JSON lines, the throwaway operator tokens,
which are deleted at the end); nothing secret is printed or written.
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

from deploy import _domain_etcd, cluster
from deploy._files import replace_file
from deploy.chaos.faults import FaultConfig
from deploy.chaos.history import History
from deploy.chaos.proxy import LinkMode, TcpProxy
from deploy.chaos.replicas import EtcdSide
from deploy.chaos.workload import WorkloadConfig
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
    """The processes, proxies and configs of one chaos run (implements `DomainControl`, and
    `ReplicaControl` on a domain with replicas)."""

    def __init__(self, layout: DomainLayout, options: ChaosOptions, history: History) -> None:
        self.layout = layout
        self.options = options
        self.history = history
        self.members: list[str] = []
        self.coordinators: list[str] = list(layout.coordinators)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.addresses: dict[str, str] = {}
        self.coordinator_addresses: dict[str, str] = {}  # name -> mutual-TLS address
        self.operator_addresses: dict[str, str] = {}  # name -> operator address
        self.client_proxies: dict[str, TcpProxy] = {}
        self.coordinator_proxies: dict[str, dict[str, TcpProxy]] = {}  # host -> coordinator
        self.operator_proxies: dict[str, TcpProxy] = {}
        self.etcd: EtcdSide | None = None
        self._saved_configs: dict[Path, bytes] = {}
        self._started: set[str] = set()  # every process name this run started
        self._paused: set[str] = set()
        self._lock = threading.RLock()
        self.tls: TlsMaterial = cluster.client_tls(layout)

    @property
    def replicated(self) -> bool:
        """Whether the domain's coordinators are replicas on etcd."""
        return self.layout.replicated

    # --- setting up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start etcd (with replicas), the coordinators, the proxies and every member HSA;
        wait until converged. The caller holds the domain lock and has refused a running
        domain (`refuse_if_running`)."""
        refuse_if_running(self.layout)
        cluster.remove_run_files(self.layout, self.layout.process_names)
        if self.replicated:
            # A cluster that never ran gets fresh ports if one was taken (as `up` does).
            self.layout = _domain_etcd.ensure_free_ports(self.layout, {})
            self.etcd = EtcdSide(self.layout, self.options.start_timeout)
        configs = [*self.layout.node_configs.values()]
        configs += [self.layout.coordinator_config_of(n) for n in self.coordinators]
        for path in configs:
            self._saved_configs[path] = path.read_bytes()
        if self.etcd is not None:
            self.etcd.start()
            self.etcd.place_proxies(self.coordinators)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.coordinators)) as pool:
            list(pool.map(self.start_replica, self.coordinators))
        if self.replicated:
            _domain_etcd.wait_for_leader(self.layout, self.options.start_timeout)
        self._start_nodes()
        cluster.wait_converged(self.layout, timeout=self.options.start_timeout, hosts=self.members)

    def _start_nodes(self) -> None:
        """The member HSAs (those of the coordinators' head), each behind its proxies."""
        with CoordinatorClient(self.stable_operator_address, self.layout.ca_cert.read_bytes()) as c:
            head = c.latest_state()
        hosts = head.manifest.hosts_by_id
        self.members = [h for h in self.layout.node_configs if h in hosts]
        if not self.members:
            raise InvalidInputError(
                f"no node of {self.layout.root} is a member of the domain's current state"
            )
        for host in self.members:
            self.coordinator_proxies[host] = {
                name: TcpProxy(
                    self.coordinator_addresses[name], name=f"chaos-proxy-{host}-{name}"
                ).start()
                for name in self.coordinators
            }
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            list(pool.map(self.start_node, self.members))
        for host in self.members:
            self.client_proxies[host] = TcpProxy(
                self.addresses[host], name=f"chaos-proxy-{host}-client"
            ).start()

    @property
    def client_endpoints(self) -> list[str]:
        """The proxy addresses the workload's clients use, one per HSA."""
        return [self.client_proxies[h].address for h in self.members]

    @property
    def stable_operator_address(self) -> str:
        """The operator port of every coordinator, through its never-cut proxy
        (comma-separated: one channel over the replicas)."""
        return ",".join(self.operator_proxies[n].address for n in self.coordinators)

    def node_addresses(self) -> dict[str, str]:
        """Current direct addresses of the member HSAs."""
        with self._lock:
            return {h: self.addresses[h] for h in self.members if h in self.addresses}

    def direct_operator_addresses(self) -> dict[str, str]:
        """Each coordinator's operator address, direct (for the sampler and final checks)."""
        with self._lock:
            return dict(self.operator_addresses)

    def _point_at_proxy(self, host: str) -> None:
        """Make `host`'s config name its own coordinator proxies (before every start)."""
        path = self.layout.node_configs[host]
        config = NodeConfig.load(path)
        proxies = self.coordinator_proxies[host]
        addresses = ",".join(proxies[n].address for n in self.coordinators)
        if config.coordinator != addresses:
            replace(config, coordinator=addresses).save(path)

    # --- DomainControl ------------------------------------------------------------------------

    def kill_node(self, host: str) -> None:
        """SIGKILL an HSA's process group."""
        self._kill(host)

    def start_node(self, host: str) -> None:
        """Start an HSA (pointed at its coordinator proxies); return once it is serving."""
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

    def _kill(self, name: str) -> None:
        with self._lock:
            process = self.processes.pop(name, None)
            self._paused.discard(name)
        if process is not None:
            cluster.stop_process(process, kill=True)

    def _signal(self, name: str, signum: signal.Signals) -> None:
        with self._lock:
            process = self.processes.get(name)
        if process is None or process.poll() is not None:
            raise UnavailableError(f"{name} is not running")
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
        """SIGKILL the coordinator (a domain with one)."""
        self._kill(COORDINATOR_NAME)

    def start_coordinator(self) -> None:
        """Start the coordinator again (its ports are pinned); follow it if they moved."""
        self.start_replica(COORDINATOR_NAME)

    def _proxies(self, host: str, link: str) -> list[TcpProxy]:
        if link == "client":
            return [self.client_proxies[host]]
        return list(self.coordinator_proxies[host].values())

    def cut_link(self, host: str, link: str, mode: str) -> None:
        """Cut one of `host`'s links through its proxies."""
        for proxy in self._proxies(host, link):
            proxy.cut(LinkMode(mode))

    def restore_link(self, host: str, link: str) -> None:
        """Restore one of `host`'s links."""
        for proxy in self._proxies(host, link):
            proxy.restore()

    # --- ReplicaControl -----------------------------------------------------------------------

    def replica_leader(self) -> str:
        """The replica that leads now, asked of etcd directly ("" if none)."""
        if self.etcd is None:
            return ""
        return self.etcd.leader()

    def kill_replica(self, name: str) -> None:
        """SIGKILL a coordinator replica's process group."""
        self._kill(name)

    def start_replica(self, name: str) -> None:
        """Start a coordinator (replica) pointed at its etcd proxies; return once it serves.
        Its ports are pinned after its first start; the proxies follow them if they moved."""
        if self.etcd is not None:
            self.etcd.point_at_proxies(name)
        with self._lock:
            self._started.add(name)
        process = cluster.start_coordinator(
            self.layout, name=name, detach=True, timeout=self.options.start_timeout
        )
        info = cluster.read_ready_file(self.layout.ready_file(name))
        if info is None or not info.operator_address:
            raise UnavailableError(f"{name} started but wrote no operator address")
        with self._lock:
            self.processes[name] = process
            moved = self.coordinator_addresses.get(name) not in (None, info.address)
            self.coordinator_addresses[name] = info.address
            self.operator_addresses[name] = info.operator_address
            operator_proxy = self.operator_proxies.get(name)
            if operator_proxy is None:
                self.operator_proxies[name] = TcpProxy(
                    info.operator_address, name=f"chaos-proxy-operator-{name}"
                ).start()
            elif operator_proxy.target != info.operator_address:
                operator_proxy.set_target(info.operator_address)
        # start_coordinator pointed every node config at the coordinators themselves; the
        # next start of each node points it back at its proxies.
        if moved:
            for proxies in self.coordinator_proxies.values():
                proxies[name].set_target(info.address)

    def pause_replica(self, name: str) -> None:
        """SIGSTOP a coordinator replica's process group."""
        self.pause_node(name)

    def resume_replica(self, name: str) -> None:
        """SIGCONT a coordinator replica's process group."""
        self.resume_node(name)

    def cut_etcd(self, name: str, mode: str) -> None:
        """Cut a replica off from etcd (every one of its etcd proxies)."""
        assert self.etcd is not None
        self.etcd.cut(name, mode)

    def restore_etcd(self, name: str) -> None:
        """Restore a replica's links to etcd."""
        assert self.etcd is not None
        self.etcd.restore(name)

    def kill_etcd(self, member: str) -> None:
        """SIGKILL an etcd member."""
        assert self.etcd is not None
        self.etcd.kill_member(member)

    def start_etcd(self, member: str) -> None:
        """Start an etcd member again on its data; return once it is healthy."""
        assert self.etcd is not None
        self.etcd.start_member(member)

    # --- tearing down -------------------------------------------------------------------------

    def stop(self) -> None:
        """Resume, stop (nodes first, then the coordinators, then etcd) and forget every
        process; close proxies; restore configs."""
        with self._lock:
            processes = dict(self.processes)
            self.processes.clear()
        for process in processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGCONT)
        for group in (self.members, self.coordinators):
            stopping = [p for n, p in processes.items() if n in group]
            if stopping:
                with concurrent.futures.ThreadPoolExecutor(max_workers=len(stopping)) as pool:
                    list(pool.map(lambda p: cluster.stop_process(p, grace=3.0), stopping))
        started = set(self._started)
        if self.etcd is not None:
            self.etcd.stop()
            started |= self.etcd.started
        cluster.remove_run_files(self.layout, sorted(started))
        for proxy in [
            *self.client_proxies.values(),
            *(p for proxies in self.coordinator_proxies.values() for p in proxies.values()),
            *self.operator_proxies.values(),
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
