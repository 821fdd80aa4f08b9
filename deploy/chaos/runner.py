"""`hsm-domain chaos DIR`: run a local domain under load while faults are injected, then check.

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
command is starting (the domain lock, `cluster.domain_lock`, held for the whole run); every
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
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from deploy import cluster
from deploy._files import make_private_dir, replace_file
from deploy.chaos.checker import (
    ChainEntry,
    DecryptObservation,
    FinalObservations,
    KeyObservation,
    availability,
    check_all,
    completions,
)
from deploy.chaos.faults import FaultConfig, Nemesis
from deploy.chaos.history import History
from deploy.chaos.proxy import LinkMode, TcpProxy
from deploy.chaos.report import ChaosReport, ProgressLine, operations_by_outcome
from deploy.chaos.workload import (
    AckedCiphertext,
    ControlClient,
    DataClient,
    KeyRing,
    Sampler,
    WorkloadConfig,
    create_bootstrap_key,
)
from deploy.init import COORDINATOR_NAME, DomainLayout, load_layout, read_passphrase
from domain_core.chain import TrustedChain
from domain_core.errors import HsmDomainError, InvalidInputError, UnavailableError
from domain_core.model import SealedState
from domain_core.signers import Signer
from domain_edge.client import CoordinatorClient
from domain_edge.config import NodeConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.kms_client import KeyClient
from domain_edge.layout import DomainPaths
from domain_edge.transport import TlsMaterial

__all__ = ["ChaosInterrupted", "ChaosOptions", "ChaosRunner", "run_chaos"]

log = logging.getLogger(__name__)

_KEY_CHECK_PLAINTEXT: Final = b"chaos key check"
_FINAL_WORKERS: Final = 6


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


class ChaosInterrupted(Exception):
    """A second SIGINT/SIGTERM: the run stops at once, without its checks."""


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


def _operator_signers(layout: DomainLayout) -> list[tuple[str, Signer]]:
    """Open the demo operator tokens with their passphrase files (LOCAL DEMO ONLY)."""
    signers: list[tuple[str, Signer]] = []
    for name, (token, passphrase_file) in layout.operator_tokens.items():
        if token.exists() and passphrase_file.exists():
            signers.append((name, load_file_token(token, read_passphrase(passphrase_file))))
    if not signers:
        raise InvalidInputError(
            f"{layout.operators_dir} holds no token with a passphrase file: the control "
            "workload needs the demo operators of `hsm-domain init`"
        )
    return signers


def wait_for_convergence(
    runner: ChaosRunner, timeout: float
) -> tuple[float | None, dict[str, tuple[int, str]], tuple[int, str] | None, str]:
    """Poll until every member HSA is healthy on the coordinator's head.

    Returns (seconds taken or None, heads of the nodes, coordinator head, last problem).
    """
    began = time.monotonic()
    deadline = began + timeout
    heads: dict[str, tuple[int, str]] = {}
    coordinator: tuple[int, str] | None = None
    problem = "nothing observed yet"
    with CoordinatorClient(
        runner.stable_operator_address, runner.layout.ca_cert.read_bytes(), timeout=2.0
    ) as client:
        while True:
            problems: list[str] = []
            try:
                status = client.domain_status()
                coordinator = (status.version, status.state_hash.hex())
            except HsmDomainError as error:
                problems.append(f"coordinator: {error.message}")
            for host in runner.members:
                try:
                    node = cluster.node_status(runner.layout, host, timeout=1.0)
                except UnavailableError as error:
                    problems.append(error.message)
                    heads.pop(host, None)
                    continue
                heads[host] = (node.version, node.state_hash.hex())
                if not node.healthy:
                    problems.append(f"{host} is not healthy: {node.detail or 'no detail'}")
                elif heads[host] != coordinator:
                    problems.append(
                        f"{host} is at version {node.version}, the coordinator at "
                        f"{coordinator[0] if coordinator else '?'}"
                    )
            if not problems:
                return time.monotonic() - began, heads, coordinator, ""
            problem = "; ".join(problems)
            if time.monotonic() > deadline:
                return None, heads, coordinator, problem
            time.sleep(0.1)


def final_chain(runner: ChaosRunner) -> tuple[list[ChainEntry], str]:
    """The coordinator's chain, verified from the pinned genesis; (entries, error)."""
    layout = runner.layout
    entries: list[ChainEntry] = []
    try:
        genesis = SealedState.from_bytes(layout.genesis_state.read_bytes())
        chain = TrustedChain.from_genesis(layout.domain_id, layout.genesis_hash, genesis)
        entries.append(ChainEntry(1, genesis.hash.hex(), ""))
        with CoordinatorClient(
            runner.stable_operator_address, layout.ca_cert.read_bytes(), timeout=10.0
        ) as client:
            while True:
                batch = client.states_after(chain.version)
                batch = [s for s in batch if s.version > chain.version]
                if not batch:
                    break
                for state in batch:
                    chain.update(state, now=int(time.time()))
                    entries.append(
                        ChainEntry(
                            state.version,
                            state.hash.hex(),
                            state.proposal.id.hex() if state.proposal is not None else "",
                        )
                    )
    except HsmDomainError as error:
        return entries, f"{type(error).__name__}: {error.message}"
    return entries, ""


@contextlib.contextmanager
def _direct_clients(runner: ChaosRunner) -> Iterator[dict[str, KeyClient]]:
    tls = runner.tls
    clients = {
        host: KeyClient(
            [address],
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
            timeout=5.0,
            attempts=4,
            total_timeout=20.0,
        )
        for host, address in runner.node_addresses().items()
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def final_decrypts(
    runner: ChaosRunner, acked: list[AckedCiphertext], progress: ProgressLine | None = None
) -> dict[int, dict[str, DecryptObservation]]:
    """Decrypt every acknowledged ciphertext on every node, directly."""
    observed: dict[int, dict[str, DecryptObservation]] = {a.op_id: {} for a in acked}
    lock = threading.Lock()
    done = 0
    with _direct_clients(runner) as clients:
        total = len(acked) * len(clients)

        def one(item: tuple[str, AckedCiphertext]) -> None:
            host, ciphertext = item
            try:
                plaintext = clients[host].decrypt(ciphertext.blob, ciphertext.context)
                seen = DecryptObservation(plaintext)
            except HsmDomainError as error:
                seen = DecryptObservation(None, f"{type(error).__name__}: {error.message[:200]}")
            nonlocal done
            with lock:
                observed[ciphertext.op_id][host] = seen
                done += 1
                count = done
            if progress is not None and count % 200 == 0:
                progress.update(f"final decrypts: {count}/{total} ...")

        work = [(host, a) for a in acked for host in clients]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_FINAL_WORKERS) as pool:
            list(pool.map(one, work))
    return observed


def final_keys(runner: ChaosRunner, key_ids: list[str]) -> dict[str, dict[str, KeyObservation]]:
    """Describe every acknowledged key and round-trip data with it, on every node."""
    observed: dict[str, dict[str, KeyObservation]] = {k: {} for k in key_ids}
    lock = threading.Lock()
    with _direct_clients(runner) as clients:

        def one(item: tuple[str, str]) -> None:
            host, key_id = item
            client = clients[host]
            try:
                client.describe_key(key_id)
            except HsmDomainError as error:
                seen = KeyObservation(False, False, f"{type(error).__name__}: {error.message}")
            else:
                try:
                    blob = client.encrypt(key_id, _KEY_CHECK_PLAINTEXT)
                    ok = client.decrypt(blob) == _KEY_CHECK_PLAINTEXT
                    seen = KeyObservation(True, ok, "" if ok else "decrypt returned other bytes")
                except HsmDomainError as error:
                    seen = KeyObservation(True, False, f"{type(error).__name__}: {error.message}")
            with lock:
                observed[key_id][host] = seen

        work = [(host, k) for k in key_ids for host in clients]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_FINAL_WORKERS) as pool:
            list(pool.map(one, work))
    return observed


# --- the run ----------------------------------------------------------------------------------


def _acked_keys(events: list[dict[str, Any]]) -> list[str]:
    return [
        str(done["result"]["key_id"])
        for invoke, done in completions(events)
        if invoke["op"] == "create_key" and done["phase"] == "ok"
    ]


class _Signals:
    """First SIGINT/SIGTERM ends the faults early (then settle and check); a second aborts."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            raise ChaosInterrupted(signal.Signals(signum).name)
        self._stop.set()

    def ignore(self) -> None:
        """Ignore further signals (while the processes are being stopped)."""
        for signum in self._previous:
            signal.signal(signum, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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


def run_chaos(options: ChaosOptions, out: TextIO) -> ChaosReport:
    """Run one chaos experiment on the domain in `options.directory`; return its report.

    A running domain (or one another command is starting) is refused before anything is
    written or started."""
    layout = load_layout(Path(options.directory))
    with cluster.domain_lock(layout, f"hsm-domain chaos {layout.root}"):
        refuse_if_running(layout)
        return _run_chaos(layout, options, out)


def _run_chaos(layout: DomainLayout, options: ChaosOptions, out: TextIO) -> ChaosReport:
    signers = _operator_signers(layout)
    history_path = options.history_file()
    chaos_dir = layout.chaos_dir
    make_private_dir(chaos_dir)
    token_dir = chaos_dir / f"operators-{options.seed}"
    stop_faults = threading.Event()
    progress = ProgressLine(out)
    with History(history_path) as history, _Signals(stop_faults) as signals:
        runner = ChaosRunner(layout, options, history)
        try:
            progress.step("starting the domain ...")
            runner.start()
            history.info(
                "runner",
                "start",
                seed=options.seed,
                nodes=runner.members,
                faults=list(options.faults.types),
                clients=options.workload.clients,
                duration=options.duration,
            )
            progress.done(
                f"domain up: coordinator and {len(runner.members)} HSAs "
                f"({', '.join(runner.members)}), proxies in place"
            )
            return _experiment(runner, options, history, signers, token_dir, stop_faults, progress)
        finally:
            signals.ignore()
            progress.step("stopping the domain ...")
            runner.stop()
            shutil.rmtree(token_dir, ignore_errors=True)
            progress.clear()


def _experiment(
    runner: ChaosRunner,
    options: ChaosOptions,
    history: History,
    signers: list[tuple[str, Signer]],
    token_dir: Path,
    stop_faults: threading.Event,
    progress: ProgressLine,
) -> ChaosReport:
    workload = options.workload
    run_tag = f"seed-{options.seed}"
    ring = KeyRing()
    if workload.clients > 0:
        create_bootstrap_key(runner.client_endpoints, runner.tls, ring, history, run_tag)
    rng = random.Random(options.seed)  # noqa: S311 - a reproducible schedule, not a secret
    stop_sampler = threading.Event()
    sampler = Sampler(
        runner.node_addresses,
        runner.stable_operator_address,
        runner.tls,
        history,
        stop_sampler,
        options.sample_interval,
    )
    sampler.start()
    stop_load = threading.Event()
    clients = [
        DataClient(
            i,
            runner.client_endpoints,
            runner.tls,
            ring,
            history,
            workload,
            options.seed,
            stop_load,
            run_tag,
        )
        for i in range(workload.clients)
    ]
    control = ControlClient(
        runner.stable_operator_address,
        runner.layout.ca_cert.read_bytes(),
        signers,
        token_dir,
        history,
        workload,
        options.seed,
        stop_load,
    )
    nemesis = Nemesis(runner, runner.members, options.faults, rng, history)
    nemesis_crash: list[BaseException] = []

    def run_nemesis() -> None:
        try:
            nemesis.run(stop_faults)
        except BaseException as error:  # recorded and reported: the run is then not valid
            nemesis_crash.append(error)
            log.exception("the fault injector crashed")
            history.info("nemesis", "crashed", error=f"{type(error).__name__}: {error}"[:500])

    nemesis_thread = threading.Thread(target=run_nemesis, name="chaos-nemesis", daemon=True)
    threads: list[threading.Thread] = [*clients, control]
    try:
        began = time.monotonic()
        for thread in threads:
            thread.start()
        nemesis_thread.start()
        while not stop_faults.wait(0.25 if progress.tty else 1.0):
            elapsed = time.monotonic() - began
            if elapsed >= options.duration:
                break
            progress.tick(elapsed, options.duration, history, nemesis)
        stop_faults.set()
        stop_load.set()
        faults_for = time.monotonic() - began
        progress.step("faults stopped: healing ...")
        nemesis_thread.join()
        unhealed = nemesis.heal(timeout=max(30.0, options.settle_timeout))
        history.info("runner", "faults-stopped", unhealed=unhealed, seconds=round(faults_for, 3))
        # Convergence is timed from the end of the repairs, while the workload's last
        # operations finish; once they have, the heads are read again for the checks (a
        # domain change acknowledged meanwhile must reach every node too).
        progress.step("waiting for the nodes to converge ...")
        converged_after, heads, coordinator_head, detail = wait_for_convergence(
            runner, options.settle_timeout
        )
        history.info(
            "runner",
            "converged" if converged_after is not None else "not-converged",
            seconds=None if converged_after is None else round(converged_after, 3),
            detail=detail[:500],
        )
        progress.step("waiting for the workload to finish its last operations ...")
        for thread in threads:
            thread.join(timeout=workload.resolve_timeout + 3 * workload.client_timeout + 5)
        if converged_after is not None:
            settled, heads, coordinator_head, detail = wait_for_convergence(
                runner, options.settle_timeout
            )
            if settled is None:
                converged_after = None
                detail = f"after the workload's last operations: {detail}"
    finally:
        stop_faults.set()
        stop_load.set()
        stop_sampler.set()
    sampler.join(timeout=10)
    for host, (version, state_hash) in heads.items():
        history.info("final", "status", host=host, version=version, state_hash=state_hash)
    progress.step("checking the final chain ...")
    chain, chain_error = final_chain(runner)
    events = history.events()
    acked = ring.ciphertexts()
    progress.step(f"decrypting {len(acked)} acknowledged ciphertexts on every node ...")
    decrypts = final_decrypts(runner, acked, progress)
    key_ids = _acked_keys(events)
    progress.step(f"checking {len(key_ids)} acknowledged keys on every node ...")
    keys = final_keys(runner, key_ids)
    final = FinalObservations(
        nodes=runner.members,
        decrypts=decrypts,
        keys=keys,
        chain=chain,
        chain_error=chain_error,
        converged_after=converged_after,
        heads=heads,
        coordinator_head=coordinator_head,
        convergence_detail=detail,
    )
    events = history.events()
    results = check_all(
        events,
        history.plaintexts(),
        final,
        convergence_bound=options.settle_timeout,
        min_availability=options.min_availability,
        expect_data_plane=workload.clients > 0,
    )
    for result in results:
        history.info("checker", "invariant", **result.to_json())
    crashed = [t.name for t in threads if getattr(t, "crashed", None) is not None]
    if nemesis_crash:
        crashed.append(nemesis_thread.name)
    return ChaosReport(
        seed=options.seed,
        duration=options.duration,
        faults_seconds=faults_for,
        nodes=list(runner.members),
        clients=workload.clients,
        fault_types=list(options.faults.types),
        faults=_fault_counts(events),
        partitions=_partition_counts(events),
        repairs_failed=nemesis.figures.repairs_failed,
        operations=operations_by_outcome(events),
        availability=availability(events, runner.members),
        min_availability=options.min_availability,
        convergence_seconds=converged_after,
        final_version=coordinator_head[0] if coordinator_head else None,
        invariants=results,
        history_path=history.path,
        samples=sampler.samples,
        crashed_threads=crashed,
        unhealed=unhealed,
        unfinished=history.pending(),
    )


def _partition_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """Link cuts by link and mode ("client/refuse", ...)."""
    counts: dict[str, int] = {}
    for event in events:
        if event["phase"] == "info" and event["process"] == "nemesis" and event["op"] == "cut":
            name = f"{event['args'].get('link')}/{event['args'].get('mode')}"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _fault_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    names = {
        "kill": "kill",
        "pause": "pause",
        "kill-coordinator": "coordinator",
        "cut": "partition",
    }
    counts = dict.fromkeys(names.values(), 0)
    for event in events:
        if event["phase"] == "info" and event["process"] == "nemesis" and event["op"] in names:
            counts[names[event["op"]]] += 1
    return counts
