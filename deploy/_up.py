"""`hsm-domain up`: start what of a local domain is not running, and watch it.

Invariants kept here:
- checking what runs and starting the rest is one step, under the domain lock
  (`cluster.domain_lock`): no other command starts a process of this domain meanwhile;
- `up` starts exactly what is not running and leaves the rest (its pid and ready files
  untouched), saying which is which;
- on a domain on etcd it starts the etcd members first and waits until every one is healthy,
  then the coordinator replicas (and waits until one leads), then the nodes;
- a foreground `up` stops on Ctrl-C (or SIGTERM) only what it started, nodes first, then its
  coordinators, then its etcd members; a detached one leaves them running, recorded in pid
  files for `down`;
- stopping the processes is never interrupted by a second signal (they are ignored while
  `up` stops what it started);
- the commands it prints to try next work pasted into a new shell: the tools are named by
  their path when they run from a virtual environment (`domain_edge.cli.console_command`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import FrameType
from typing import Any, Final

from deploy import _domain_etcd, cluster
from deploy._coordinators import check_coordinators
from deploy.init import DomainLayout, init_domain, load_layout
from deploy.status import coordinator_members
from domain_core.errors import InvalidInputError
from domain_core.limits import MAX_KEY_SERVICE_WORKERS
from domain_edge.cli import Progress, UsageError, console_command, shell_path
from domain_edge.config import NodeConfig
from domain_edge.layout import DomainPaths

__all__ = ["DEFAULT_DIR", "check_counts", "cmd_up"]

DEFAULT_DIR: Final = Path("hsm-cluster")


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while `up` was running."""


def check_counts(
    nodes: int,
    operators: int,
    quorum: int,
    workers: int = 0,
    coordinators: int = 1,
    store: str | None = None,
) -> None:
    """UsageError unless the counts (and the store) of a new domain make sense together."""
    try:
        check_coordinators(coordinators, store)
    except InvalidInputError as error:
        raise UsageError(error.message) from None
    if not 0 <= workers <= MAX_KEY_SERVICE_WORKERS:
        raise UsageError(
            f"--workers must be between 0 and {MAX_KEY_SERVICE_WORKERS}, not {workers}"
        )
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, not {nodes}")
    if operators < 1:
        raise UsageError(f"--operators must be at least 1, not {operators}")
    if not 1 <= quorum <= operators:
        raise UsageError(f"--quorum must be between 1 and --operators ({operators}), not {quorum}")


class _Runner:
    """The processes this `up` starts (`names`), so that they can all be stopped whatever
    happens; processes that were running before it are never its to stop."""

    def __init__(self, layout: DomainLayout, progress: Progress, names: Sequence[str]) -> None:
        self.layout = layout
        self.progress = progress
        self.names = list(names)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def what_it_started(self) -> str:
        """ "the domain", or the names, when this `up` started only some of its processes."""
        if set(self.names) == set(self.layout.process_names):
            return "the domain"
        return f"what this command started ({', '.join(self.names)})"

    def add(self, name: str, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self.processes[name] = process

    def stop_all(self) -> None:
        """Stop the nodes this `up` started, then its coordinators, then its etcd members (each
        kind in parallel); remove their run files.

        A process spawned but not yet registered (a stop signal arrived while it started) is
        found through its pid file, which is written right after the spawn.
        """
        with self._lock:
            processes = dict(self.processes)
        layout = self.layout
        for kind in (layout.node_configs, layout.coordinators, layout.etcd_members):
            group = [p for name, p in processes.items() if name in kind]
            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(cluster.stop_process, group))
        cluster.stop_recorded(layout, names=self.names)


def _start_etcd(
    layout: DomainLayout, runner: _Runner, running: Mapping[str, int], timeout: float
) -> DomainLayout:
    """Start the etcd members that do not run and wait until all are healthy; the layout to
    go on with (its etcd ports re-chosen if the cluster never ran and one was taken)."""
    progress = runner.progress
    assert layout.etcd is not None
    for name in layout.etcd.names:
        if name in running:
            progress.done(f"{name} running already (pid {running[name]})")
    moved = _domain_etcd.ensure_free_ports(layout, running)
    if moved.etcd != layout.etcd:
        progress.done("etcd: a port chosen at init is taken and the cluster never ran: new ports")
    runner.layout = layout = moved
    assert layout.etcd is not None
    wanted = [n for n in layout.etcd.names if n not in running]
    began = time.monotonic()
    if wanted:
        progress.step(f"starting etcd members {', '.join(wanted)} ...")
    else:
        progress.step("waiting until every etcd member is healthy ...")
    _domain_etcd.start_members(
        layout, running, timeout=timeout, on_start=lambda n, p: runner.add(n, p.process)
    )
    progress.done(
        f"etcd: {len(layout.etcd.names)}/{len(layout.etcd.names)} members healthy at "
        f"{','.join(layout.etcd.cluster.endpoints)} ({time.monotonic() - began:.1f} s)"
    )
    return layout


def _start_coordinators(
    layout: DomainLayout, runner: _Runner, running: Mapping[str, int], timeout: float
) -> None:
    """Start every coordinator that does not run (replicas in parallel); on etcd, wait until
    one of them leads."""
    progress = runner.progress
    for name in layout.coordinators:
        if name in running:
            info = cluster.read_ready_file(layout.ready_file(name))
            where = f" at {info.address}" if info else ""
            progress.done(f"{name} running already (pid {running[name]}){where}")
    wanted = [n for n in layout.coordinators if n not in running]
    looked_for = {
        h: NodeConfig.load(layout.node_configs[h]).coordinator
        for h in running
        if h in layout.node_configs
    }
    began = time.monotonic()
    if wanted:
        progress.step(f"starting {', '.join(wanted)} ...")

    def start(name: str) -> str:
        # Pid files are written in both modes: `up` and `down` find every process through them.
        runner.add(name, cluster.start_coordinator(layout, name=name, detach=True, timeout=timeout))
        return name

    with ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        for future in as_completed([pool.submit(start, name) for name in wanted]):
            name = future.result()
            info = cluster.read_ready_file(layout.ready_file(name))
            address = info.address if info else "?"
            progress.done(f"{name} serving at {address} ({time.monotonic() - began:.1f} s)")
    addresses = cluster.coordinator_addresses(layout)
    stale = sorted(h for h, old in looked_for.items() if old and old != addresses)
    if stale and wanted:
        progress.done(
            f"warning: {', '.join(stale)} (running) still look for the coordinator at its old "
            f"address: restart them (hsm-domain down {layout.root}, then up)"
        )
    if layout.replicated:
        progress.step("waiting until a coordinator replica leads ...")
        leader = _domain_etcd.wait_for_leader(layout, timeout)
        progress.done(f"{leader} leads the coordinator replicas")


def _start_domain(
    layout: DomainLayout, runner: _Runner, running: Mapping[str, int], *, timeout: float
) -> tuple[list[str], list[str], int]:
    """Start the etcd members, the coordinators and every node that is not `running`, then
    wait until every member is healthy on one version; return (members, others, version)."""
    progress = runner.progress
    began = time.monotonic()
    if layout.etcd is not None:
        layout = _start_etcd(layout, runner, running, timeout)
    _start_coordinators(layout, runner, running, timeout)
    operator_address = cluster.coordinator_operator_addresses(layout)
    found = coordinator_members(layout, operator_address) if operator_address else None
    members = [h for h in layout.node_configs if h in set(found or layout.genesis_nodes)]
    others = [h for h in layout.node_configs if h not in members]
    for host in layout.node_configs:
        if host in running:
            progress.done(f"{host} running already (pid {running[host]})")
    wanted = [h for h in layout.node_configs if h not in running]
    total = len(wanted)
    started = 0
    if total:
        progress.step(f"0/{total} nodes started ...")

    def start(host: str) -> str:
        proc = cluster.start_node(
            layout, host, detach=True, timeout=timeout, wait_for_health=host in members
        )
        runner.add(host, proc)
        return host

    with ThreadPoolExecutor(max_workers=max(1, total)) as pool:
        futures = [pool.submit(start, host) for host in wanted]
        for future in as_completed(futures):
            host = future.result()
            started += 1
            node_info = cluster.read_ready_file(layout.ready_file(host))
            where = node_info.address if node_info else "?"
            state = "serving" if host in members else "running (not a member of the domain)"
            progress.step(
                f"{started}/{total} nodes started: {host} {state} at {where} "
                f"({time.monotonic() - began:.1f} s)"
            )
    statuses = cluster.wait_converged(layout, timeout=timeout, hosts=members)
    version = next(iter(statuses.values())).version if statuses else 0
    progress.done(
        f"{len(members)}/{len(members)} nodes healthy on version {version} "
        f"({time.monotonic() - began:.1f} s)"
    )
    return members, others, version


def _endpoints(layout: DomainLayout) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    if layout.etcd is not None:
        pids = cluster.live_pids(layout)
        for member in layout.etcd.cluster.members:
            result[member.name] = {"address": member.endpoint, "pid": str(pids.get(member.name))}
    for name in layout.process_names:
        info = cluster.read_ready_file(layout.ready_file(name))
        if info is not None:
            entry = {"address": info.address, "pid": str(info.pid)}
            if info.operator_address:
                entry["operator_address"] = info.operator_address
            result[name] = entry
    return result


def _print_next_steps(
    layout: DomainLayout, others: Sequence[str], ctrl_c_stops: str | None
) -> None:
    """Endpoints, credentials and what to try next; `ctrl_c_stops` says what Ctrl-C stops
    (None: nothing, this command leaves)."""
    endpoints = _endpoints(layout)
    print("endpoints:")
    for name in layout.etcd_members:
        print(f"  {name:<14} {endpoints.get(name, {}).get('address', '?')} (etcd, clients)")
    for name in layout.coordinators:
        coordinator = endpoints.get(name, {})
        print(
            f"  {name:<14} {coordinator.get('address', '?')} (HSAs, mutual TLS)  "
            f"{coordinator.get('operator_address', '?')} (operators, TLS)"
        )
    for host in layout.node_configs:
        address = endpoints.get(host, {}).get("address", "?")
        note = "  not a member: add it with an add-host proposal" if host in others else ""
        print(f"  {host:<14} {address}{note}")
    directory = shell_path(layout.root)
    print("credentials:")
    print(f"  CA {layout.ca_cert}")
    print(f"  demo client {layout.client_cert} / {layout.client_key}")
    domain, kms, operator = (console_command(n) for n in ("hsm-domain", "hsm-kms", "hsm-operator"))
    print("what to try next:")
    print(f"  {domain} status {directory}")
    print(
        f"  {kms} --help        application keys (create, encrypt, decrypt) as the demo "
        f"client in {directory}/{layout.client_dir.relative_to(layout.root)}"
    )
    print(
        f"  {operator} --help   propose and approve changes with the tokens in "
        f"{directory}/{layout.operators_dir.relative_to(layout.root)}"
    )
    print(f"  {domain} add-node {directory} --start")
    if ctrl_c_stops is None:
        print(f"  {domain} down {directory}")
    elif ctrl_c_stops == "the domain":
        print(f"  Ctrl-C here (or {domain} down {directory}) stops the domain")
    else:
        print(f"  Ctrl-C here stops {ctrl_c_stops}; {domain} down {directory} stops the domain")
    activate = _activate_hint(domain)
    if activate:
        print(f"  ({activate})")
    sys.stdout.flush()


def _activate_hint(domain_command: str) -> str:
    """How to type the commands without their path, when they carry one (a virtual
    environment's `bin/activate` puts its scripts on PATH)."""
    scripts = domain_command.rpartition("/")[0]
    if not scripts:
        return ""
    return f"or run `source {scripts}/activate` once, then type the commands without {scripts}/"


def _install_stop_handlers() -> dict[int, Any]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested(signal.Signals(signum).name)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _ignore_stop_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _watch(runner: _Runner) -> None:
    """Wait until a stop signal, reporting processes that exit on their own."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        for name, process in list(runner.processes.items()):
            if name not in reported and process.poll() is not None:
                reported.add(name)
                runner.progress.done(
                    f"{name} exited with status {process.returncode}; "
                    f"see {runner.layout.log_file(name)}"
                )
        if runner.processes and len(reported) == len(runner.processes):
            runner.progress.done("every process of the domain has exited")
            return


def cmd_up(args: argparse.Namespace) -> int:
    """`hsm-domain up`: stop signals end it (stopping what it started), never abort it."""
    previous = _install_stop_handlers()
    try:
        return _up(args)
    except _StopRequested:
        # Stopped before anything was started (e.g. during init): nothing to clean up.
        return 0
    finally:
        _restore(previous)


def _up_json(
    layout: DomainLayout,
    version: int,
    seconds: float,
    others: Sequence[str],
    started: Sequence[str],
    already: Mapping[str, int],
) -> str:
    return json.dumps(
        {
            "directory": str(layout.root),
            "version": version,
            "seconds_to_healthy": round(seconds, 3),
            "endpoints": _endpoints(layout),
            "not_members": list(others),
            "started": list(started),
            "already_running": dict(already),
        },
        indent=2,
    )


def _up(args: argparse.Namespace) -> int:
    directory = Path(args.directory) if args.directory else DEFAULT_DIR
    progress = Progress(sys.stdout, quiet=args.json)
    if not DomainPaths(directory).domain_file.exists():
        check_counts(
            args.nodes, args.operators, args.quorum, args.workers, args.coordinators, args.store
        )
        progress.step(f"initialising a new domain in {directory} ...")
        created = init_domain(
            directory,
            nodes=args.nodes,
            operators=args.operators,
            quorum=args.quorum,
            workers=args.workers,
            coordinators=args.coordinators,
            store=args.store,
        )
        progress.done(
            f"initialised {directory}: {args.nodes} nodes, {args.operators} operators, "
            f"quorum {args.quorum}, {_coordinators_text(created)}"
        )
    layout = load_layout(directory)
    lock = contextlib.ExitStack()
    runner: _Runner | None = None
    began = time.monotonic()
    stopped_by: str | None = None
    keep_running = False
    try:
        # Checking what runs and starting the rest is one step: no other command starts a
        # process of this domain meanwhile (it would run twice, one copy untracked).
        lock.enter_context(cluster.domain_lock(layout, f"hsm-domain up {directory}"))
        running = cluster.live_pids(layout)
        missing = [name for name in layout.process_names if name not in running]
        cluster.remove_run_files(layout, missing)  # stale ones; a live process's are kept
        runner = _Runner(layout, progress, missing)
        _, others, version = _start_domain(layout, runner, running, timeout=args.timeout)
        layout = runner.layout  # the etcd ports may have been chosen again
        lock.close()  # what had to start runs and is recorded: others may act now
        started = [name for name in layout.process_names if name in runner.processes]
        if args.json:
            print(
                _up_json(layout, version, time.monotonic() - began, others, started, running),
                flush=True,
            )
        else:
            progress.done(_start_summary(started, running))
            foreground = not args.detach and bool(started)
            _print_next_steps(layout, others, runner.what_it_started() if foreground else None)
        if args.detach or not runner.processes:
            keep_running = True
            return 0
        _watch(runner)
        return 1
    except _StopRequested as stop:
        stopped_by = str(stop)
        return 0
    finally:
        _ignore_stop_signals()
        if runner is not None and not keep_running:
            if stopped_by is not None:
                progress.done(f"{stopped_by}: stopping {runner.what_it_started()} ...")
            runner.stop_all()
            if stopped_by is not None:
                progress.done("stopped")
        lock.close()


def _coordinators_text(layout: DomainLayout) -> str:
    """ "1 coordinator on SQLite", or "3 coordinator replicas on a 3-member etcd cluster"."""
    if layout.etcd is None:
        return "1 coordinator on SQLite"
    count = len(layout.coordinators)
    noun = "coordinator replica" if count == 1 else "coordinator replicas"
    return f"{count} {noun} on a {len(layout.etcd.names)}-member etcd cluster"


def _start_summary(started: Sequence[str], running: Mapping[str, int]) -> str:
    """One line: what this `up` started and what ran already."""
    already = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
    if not started:
        return f"nothing to start: every process runs already: {already}"
    line = f"started: {', '.join(started)}"
    return f"{line}; running already: {already}" if already else line


def start_detached(layout: DomainLayout, progress: Progress, *, timeout: float) -> list[str]:
    """Start every process of the domain that does not run, detached, as `up --detach` does
    (members waited for until healthy, other nodes until ready); the names started. What it
    started is stopped again if it fails."""
    with cluster.domain_lock(layout, f"hsm-domain up {layout.root}"):
        running = cluster.live_pids(layout)
        missing = [name for name in layout.process_names if name not in running]
        cluster.remove_run_files(layout, missing)
        runner = _Runner(layout, progress, missing)
        try:
            _start_domain(layout, runner, running, timeout=timeout)
        except BaseException:
            runner.stop_all()
            raise
        return [name for name in runner.layout.process_names if name in runner.processes]
