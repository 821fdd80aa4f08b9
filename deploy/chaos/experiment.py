"""One chaos experiment: the domain under load while faults are injected, then the checks.

`run_chaos` takes the domain's lock, refuses a running domain, starts it through
`ChaosRunner` (its processes and proxies), runs the workload (data-plane clients, a control
client making quorum-approved changes, a status sampler) and the fault injector for the
duration, heals, waits for the nodes to converge, observes the end directly
(`deploy.chaos.final`) and checks every invariant (`deploy.chaos.checker`).

Invariants: the first SIGINT/SIGTERM ends the faults early (the run still settles and
checks), a second one aborts without checks (`ChaosInterrupted`); whatever happens, every
process and proxy is stopped (`ChaosRunner.stop`) and the run's throwaway operator tokens are
deleted; the fault schedule and the workload are reproducible from the seed; nothing secret
is printed or written (the demo operators' passphrases are read, never shown).
"""

from __future__ import annotations

import logging
import random
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from deploy import cluster
from deploy._files import make_private_dir
from deploy.chaos.checker import availability, check_all
from deploy.chaos.control import ControlClient
from deploy.chaos.faults import Nemesis, Replicas, domain_fault_types
from deploy.chaos.final import Convergence, observe_the_end, wait_for_convergence
from deploy.chaos.history import History
from deploy.chaos.report import ChaosReport, ProgressLine, operations_by_outcome
from deploy.chaos.runner import ChaosOptions, ChaosRunner, refuse_if_running
from deploy.chaos.sampler import Sampler
from deploy.chaos.workload import DataClient, KeyRing, create_bootstrap_key
from deploy.init import COORDINATOR_NAME, DomainLayout, load_layout, read_passphrase
from domain_core.errors import InvalidInputError
from domain_core.signers import Signer
from domain_edge.file_tokens import load_file_token

__all__ = ["ChaosInterrupted", "run_chaos"]

log = logging.getLogger(__name__)

# How long the control workload follows an uncertain domain change on a domain with replicas.
REPLICATED_RESOLVE_SECONDS = 45.0


class ChaosInterrupted(Exception):
    """A second SIGINT/SIGTERM: the run stops at once, without its checks."""


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


# --- the run ----------------------------------------------------------------------------------


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


def run_chaos(options: ChaosOptions, out: TextIO) -> ChaosReport:
    """Run one chaos experiment on the domain in `options.directory`; return its report.

    A running domain (or one another command is starting) is refused before anything is
    written or started."""
    layout = load_layout(Path(options.directory))
    with cluster.domain_lock(layout, f"hsm-domain chaos {layout.root}"):
        refuse_if_running(layout)
        return _run_chaos(layout, options, out)


def for_domain(options: ChaosOptions, layout: DomainLayout) -> ChaosOptions:
    """The options as this domain runs them: its fault types (InvalidInputError if one asked
    for does not fit it) and, with replicas, the replicated workload (a longer follow-up of
    uncertain domain changes: a replica's write lock outlives a killed holder by its lease)."""
    try:
        types = domain_fault_types(options.faults.types, layout.replicated)
    except ValueError as error:
        raise InvalidInputError(str(error)) from None
    workload = options.workload
    if layout.replicated:
        workload = replace(
            workload,
            replicated=True,
            resolve_timeout=max(workload.resolve_timeout, REPLICATED_RESOLVE_SECONDS),
        )
    return replace(options, faults=replace(options.faults, types=types), workload=workload)


def _run_chaos(layout: DomainLayout, options: ChaosOptions, out: TextIO) -> ChaosReport:
    options = for_domain(options, layout)
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
                coordinators=runner.coordinators,
                etcd_members=runner.layout.etcd_members,
                faults=list(options.faults.types or ()),
                clients=options.workload.clients,
                duration=options.duration,
            )
            coordinators = (
                f"etcd ({len(runner.layout.etcd_members)} members), replicas "
                f"{', '.join(runner.coordinators)}"
                if runner.replicated
                else "coordinator"
            )
            progress.done(
                f"domain up: {coordinators} and {len(runner.members)} HSAs "
                f"({', '.join(runner.members)}), proxies in place"
            )
            return _experiment(runner, options, history, signers, token_dir, stop_faults, progress)
        finally:
            signals.ignore()
            progress.step("stopping the domain ...")
            runner.stop()
            shutil.rmtree(token_dir, ignore_errors=True)
            progress.clear()


@dataclass
class _Workload:
    """What runs against the domain during the experiment: the status sampler, the data-plane
    clients, the control client (quorum-approved changes) and the fault injector."""

    ring: KeyRing
    sampler: Sampler
    clients: list[DataClient]
    control: ControlClient
    nemesis: Nemesis
    stop_load: threading.Event
    stop_sampler: threading.Event
    nemesis_crash: list[BaseException] = field(default_factory=list)
    nemesis_thread: threading.Thread | None = None

    @property
    def threads(self) -> list[threading.Thread]:
        """The load's threads (not the sampler's or the nemesis's)."""
        return [*self.clients, self.control]

    def run_nemesis(self, stop_faults: threading.Event, history: History) -> None:
        """Inject faults until `stop_faults` (the nemesis thread's body); a crash is recorded
        and reported, and makes the run not valid."""
        try:
            self.nemesis.run(stop_faults)
        except BaseException as error:
            self.nemesis_crash.append(error)
            log.exception("the fault injector crashed")
            history.info("nemesis", "crashed", error=f"{type(error).__name__}: {error}"[:500])

    def crashed_threads(self) -> list[str]:
        """The names of the threads that crashed."""
        crashed = [t.name for t in self.threads if getattr(t, "crashed", None) is not None]
        if self.nemesis_crash and self.nemesis_thread is not None:
            crashed.append(self.nemesis_thread.name)
        return crashed


def _workload(
    runner: ChaosRunner,
    options: ChaosOptions,
    history: History,
    signers: list[tuple[str, Signer]],
    token_dir: Path,
) -> _Workload:
    """Build the workload (the sampler already sampling; nothing else started yet)."""
    workload = options.workload
    run_tag = f"seed-{options.seed}"
    if runner.replicated:
        # CreateKey idempotency keys are per caller: a new run must not reuse an old run's.
        run_tag += f"-{secrets.token_hex(3)}"
    ring = KeyRing()
    if workload.clients > 0:
        create_bootstrap_key(runner.client_endpoints, runner.tls, ring, history, run_tag)
    rng = random.Random(options.seed)  # noqa: S311 - a reproducible schedule, not a secret
    stop_sampler = threading.Event()
    coordinators = (
        runner.direct_operator_addresses()
        if runner.replicated
        else {COORDINATOR_NAME: runner.stable_operator_address}
    )
    sampler = Sampler(
        runner.node_addresses,
        coordinators,
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

    def on_fault(kind: str, target: str, led: bool) -> None:
        if kind == "replica-kill" and led:
            control.nudge()  # a domain change while the leader is down

    replicas = (
        Replicas(runner, runner.coordinators, runner.layout.etcd_members)
        if runner.replicated
        else None
    )
    nemesis = Nemesis(
        runner, runner.members, options.faults, rng, history, replicas=replicas, on_fault=on_fault
    )
    return _Workload(ring, sampler, clients, control, nemesis, stop_load, stop_sampler)


def _inject_faults(
    load: _Workload,
    options: ChaosOptions,
    history: History,
    stop_faults: threading.Event,
    progress: ProgressLine,
) -> tuple[float, list[str]]:
    """Start the load and the faults; stop the faults after the duration (or a first signal),
    then heal; (seconds of faults, faults that could not be healed)."""
    load.nemesis_thread = threading.Thread(
        target=load.run_nemesis, args=(stop_faults, history), name="chaos-nemesis", daemon=True
    )
    began = time.monotonic()
    for thread in load.threads:
        thread.start()
    load.nemesis_thread.start()
    while not stop_faults.wait(0.25 if progress.tty else 1.0):
        elapsed = time.monotonic() - began
        if elapsed >= options.duration:
            break
        progress.tick(elapsed, options.duration, history, load.nemesis)
    stop_faults.set()
    load.stop_load.set()
    faults_for = time.monotonic() - began
    progress.step("faults stopped: healing ...")
    load.nemesis_thread.join()
    unhealed = load.nemesis.heal(timeout=max(30.0, options.settle_timeout))
    history.info("runner", "faults-stopped", unhealed=unhealed, seconds=round(faults_for, 3))
    return faults_for, unhealed


def _settle(
    runner: ChaosRunner,
    load: _Workload,
    options: ChaosOptions,
    history: History,
    progress: ProgressLine,
) -> Convergence:
    """Wait for the nodes to converge after the repairs, then for the load's last operations,
    then read the heads again (a change acknowledged meanwhile must reach every node too).

    Convergence is timed from the end of the repairs."""
    workload = options.workload
    progress.step("waiting for the nodes to converge ...")
    converged = wait_for_convergence(runner, options.settle_timeout)
    history.info(
        "runner",
        "converged" if converged.seconds is not None else "not-converged",
        seconds=None if converged.seconds is None else round(converged.seconds, 3),
        detail=converged.detail[:500],
    )
    progress.step("waiting for the workload to finish its last operations ...")
    for thread in load.threads:
        thread.join(timeout=workload.resolve_timeout + 3 * workload.client_timeout + 5)
    if converged.seconds is None:
        return converged
    settled = wait_for_convergence(runner, options.settle_timeout)
    if settled.seconds is None:
        return replace(settled, detail=f"after the workload's last operations: {settled.detail}")
    return replace(settled, seconds=converged.seconds)


def _experiment(
    runner: ChaosRunner,
    options: ChaosOptions,
    history: History,
    signers: list[tuple[str, Signer]],
    token_dir: Path,
    stop_faults: threading.Event,
    progress: ProgressLine,
) -> ChaosReport:
    """Load and faults for the duration, settling, the final observations, the checks."""
    load = _workload(runner, options, history, signers, token_dir)
    try:
        faults_for, unhealed = _inject_faults(load, options, history, stop_faults, progress)
        convergence = _settle(runner, load, options, history, progress)
    finally:
        stop_faults.set()
        load.stop_load.set()
        load.stop_sampler.set()
    load.sampler.join(timeout=10)
    backup = runner.layout.chaos_dir / f"store-{options.seed}.hsmbk" if runner.replicated else None
    final = observe_the_end(runner, history, load.ring, convergence, progress, backup)
    events = history.events()
    results = check_all(
        events,
        history.plaintexts(),
        final,
        convergence_bound=options.settle_timeout,
        min_availability=options.min_availability,
        expect_data_plane=options.workload.clients > 0,
    )
    for result in results:
        history.info("checker", "invariant", **result.to_json())
    return ChaosReport(
        seed=options.seed,
        duration=options.duration,
        faults_seconds=faults_for,
        nodes=list(runner.members),
        clients=options.workload.clients,
        fault_types=list(options.faults.types or ()),
        faults=_fault_counts(events, domain_fault_types(None, runner.replicated)),
        partitions=_partition_counts(events),
        repairs_failed=load.nemesis.figures.repairs_failed,
        operations=operations_by_outcome(events),
        availability=availability(events, runner.members),
        min_availability=options.min_availability,
        convergence_seconds=convergence.seconds,
        final_version=convergence.coordinator[0] if convergence.coordinator else None,
        invariants=results,
        history_path=history.path,
        samples=load.sampler.samples,
        crashed_threads=load.crashed_threads(),
        unhealed=unhealed,
        unfinished=history.pending(),
        coordinators=list(runner.coordinators) if runner.replicated else [],
        etcd_members=runner.layout.etcd_members,
        leader_faults=dict(load.nemesis.figures.leader_faults),
    )


def _partition_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    """Link cuts by link and mode ("client/refuse", ...)."""
    counts: dict[str, int] = {}
    for event in events:
        if event["phase"] == "info" and event["process"] == "nemesis" and event["op"] == "cut":
            name = f"{event['args'].get('link')}/{event['args'].get('mode')}"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _fault_counts(events: list[dict[str, Any]], types: tuple[str, ...]) -> dict[str, int]:
    """Faults injected by type (every type of the domain listed, 0 if none)."""
    names = {
        "kill": "kill",
        "pause": "pause",
        "kill-coordinator": "coordinator",
        "cut": "partition",
        "kill-replica": "replica-kill",
        "pause-replica": "replica-pause",
        "kill-etcd": "etcd-kill",
        "cut-etcd": "etcd-cut",
    }
    counts = dict.fromkeys(types, 0)
    for event in events:
        if event["phase"] == "info" and event["process"] == "nemesis" and event["op"] in names:
            kind = names[event["op"]]
            counts[kind] = counts.get(kind, 0) + 1
    return counts
