"""`hsm-domain`: create, start, inspect and stop a local HSM domain on this machine.

Exit status: 0 on success, 1 when the command was refused or failed (a one-line cause on
stderr; `-v` adds the traceback), 2 on a usage error. Only `domain_core.errors.HsmDomainError`
and `OSError` are caught, once, in `main`; anything else is a bug and shows its traceback.
Nothing printed here holds a key or a passphrase. What processes and the coordinator say
(status details, host ids, warnings, log lines) is printed through `display.escape`, so it
cannot forge lines or drive the terminal; `--json` escapes as JSON does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from deploy import audit, cluster
from deploy.chaos import cli as chaos_cli
from deploy.cluster import ProcessStartError
from deploy.enrollment import host_key_fingerprints, read_enrollment
from deploy.init import (
    COORDINATOR_NAME,
    DomainLayout,
    add_node,
    init_domain,
    load_layout,
)
from deploy.status import DomainReport, collect_status, coordinator_members
from domain_core.display import escape
from domain_core.errors import HsmDomainError
from domain_edge.cli_support import exit_code, print_error, quiet_broken_pipe
from domain_edge.config import MAX_KEY_SERVICE_WORKERS, NodeConfig
from domain_edge.layout import DomainPaths

DEFAULT_DIR: Final = Path("hsm-cluster")
PROG: Final = "hsm-domain"


class _UsageError(Exception):
    """Arguments that parse but make no sense together (exit 2)."""


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived while `up` was running."""


# --- output -----------------------------------------------------------------------------------


class _Progress:
    """Progress of a long command: one updating line on a terminal, else one line per step."""

    def __init__(self, stream: TextIO, *, quiet: bool = False) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._quiet = quiet
        self._open_line = False
        self._lock = threading.Lock()

    def step(self, text: str) -> None:
        """Report an intermediate step (replaced by the next one on a terminal)."""
        if self._quiet:
            return
        with self._lock:
            if self._tty:
                self._stream.write(f"\r\033[K{text}")
                self._open_line = True
            else:
                self._stream.write(text + "\n")
            self._stream.flush()

    def done(self, text: str) -> None:
        """Report a result that stays on screen."""
        if self._quiet:
            return
        with self._lock:
            if self._tty and self._open_line:
                self._stream.write("\r\033[K")
                self._open_line = False
            self._stream.write(text + "\n")
            self._stream.flush()


def _short(hex_hash: str) -> str:
    return hex_hash[:12] if hex_hash else "-"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


# --- init -------------------------------------------------------------------------------------


def _check_counts(nodes: int, operators: int, quorum: int, workers: int = 0) -> None:
    if not 0 <= workers <= MAX_KEY_SERVICE_WORKERS:
        raise _UsageError(
            f"--workers must be between 0 and {MAX_KEY_SERVICE_WORKERS}, not {workers}"
        )
    if nodes < 1:
        raise _UsageError(f"--nodes must be at least 1, not {nodes}")
    if operators < 1:
        raise _UsageError(f"--operators must be at least 1, not {operators}")
    if not 1 <= quorum <= operators:
        raise _UsageError(f"--quorum must be between 1 and --operators ({operators}), not {quorum}")


def _layout_json(layout: DomainLayout) -> dict[str, Any]:
    return {
        "directory": str(layout.root),
        "domain_id": layout.domain_id,
        "genesis_hash": layout.genesis_hash.hex(),
        "nodes": list(layout.node_configs),
        "operators": {
            name: {"token": str(token), "passphrase_file": str(passphrase)}
            for name, (token, passphrase) in layout.operator_tokens.items()
        },
        "quorum": layout.quorum,
        "coordinator_config": str(layout.coordinator_config),
        "ca_certificate": str(layout.ca_cert),
        "client_certificate": str(layout.client_cert),
        "client_key": str(layout.client_key),
    }


def _cmd_init(args: argparse.Namespace) -> int:
    _check_counts(args.nodes, args.operators, args.quorum, args.workers)
    layout = init_domain(
        Path(args.directory),
        nodes=args.nodes,
        operators=args.operators,
        quorum=args.quorum,
        domain_id=args.domain_id,
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(_layout_json(layout), indent=2))
        return 0
    names = ", ".join(layout.operator_tokens)
    print(f"created domain {layout.domain_id!r} in {layout.root}")
    print(f"  genesis hash  {layout.genesis_hash.hex()}")
    print(f"  nodes         {', '.join(layout.node_configs)}")
    print(f"  operators     {names} (quorum {layout.quorum} of {len(layout.operator_tokens)})")
    print("  the operators/*.passphrase files are for this local demo only")
    print(f"next: hsm-domain up {args.directory}")
    return 0


# --- up ---------------------------------------------------------------------------------------


class _Runner:
    """The processes this `up` starts (`names`), so that they can all be stopped whatever
    happens; processes that were running before it are never its to stop."""

    def __init__(self, layout: DomainLayout, progress: _Progress, names: Sequence[str]) -> None:
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
        """Stop the nodes this `up` started (in parallel), then its coordinator; remove their
        run files.

        A process spawned but not yet registered (a stop signal arrived while it started) is
        found through its pid file, which is written right after the spawn.
        """
        with self._lock:
            processes = dict(self.processes)
        nodes = [p for name, p in processes.items() if name != COORDINATOR_NAME]
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            list(pool.map(cluster.stop_process, nodes))
        if COORDINATOR_NAME in processes:
            cluster.stop_process(processes[COORDINATOR_NAME])
        cluster.stop_recorded(self.layout, names=self.names)


def _start_coordinator(
    layout: DomainLayout, runner: _Runner, running: Mapping[str, int], timeout: float
) -> cluster.ReadyInfo | None:
    """Start the coordinator unless it runs; its ready file's content."""
    progress = runner.progress
    if COORDINATOR_NAME in running:
        info = cluster.read_ready_file(layout.ready_file(COORDINATOR_NAME))
        where = f" at {info.address}" if info else ""
        progress.done(f"coordinator running already (pid {running[COORDINATOR_NAME]}){where}")
        return info
    began = time.monotonic()
    looked_for = {h: NodeConfig.load(layout.node_configs[h]).coordinator for h in running}
    progress.step("starting the coordinator ...")
    # Pid files are written in both modes: `up` and `down` find every process through them.
    process = cluster.start_coordinator(layout, detach=True, timeout=timeout)
    runner.add(COORDINATOR_NAME, process)
    info = cluster.read_ready_file(layout.ready_file(COORDINATOR_NAME))
    address = info.address if info else "?"
    progress.done(f"coordinator serving at {address} ({time.monotonic() - began:.1f} s)")
    stale = sorted(h for h, old in looked_for.items() if old and old != address)
    if stale:
        progress.done(
            f"warning: {', '.join(stale)} (running) still look for the coordinator at its old "
            f"address: restart them (hsm-domain down {layout.root}, then up)"
        )
    return info


def _start_domain(
    layout: DomainLayout, runner: _Runner, running: Mapping[str, int], *, timeout: float
) -> tuple[list[str], list[str], int]:
    """Start the coordinator and every node that is not `running`, then wait until every
    member is healthy on one version; return (members, others, version)."""
    progress = runner.progress
    began = time.monotonic()
    info = _start_coordinator(layout, runner, running, timeout)
    operator_address = info.operator_address if info else ""
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
    coordinator = endpoints.get(COORDINATOR_NAME, {})
    print("endpoints:")
    print(
        f"  coordinator  {coordinator.get('address', '?')} (HSAs, mutual TLS)  "
        f"{coordinator.get('operator_address', '?')} (operators, TLS)"
    )
    for host in layout.node_configs:
        address = endpoints.get(host, {}).get("address", "?")
        note = "  not a member: add it with an add-host proposal" if host in others else ""
        print(f"  {host:<12} {address}{note}")
    directory = _shell_path(layout.root)
    print("credentials:")
    print(f"  CA {layout.ca_cert}")
    print(f"  demo client {layout.client_cert} / {layout.client_key}")
    print("what to try next:")
    print(f"  hsm-domain status {directory}")
    print(
        f"  hsm-kms --help        application keys (create, encrypt, decrypt) as the demo "
        f"client in {directory}/{layout.client_dir.relative_to(layout.root)}"
    )
    print(
        f"  hsm-operator --help   propose and approve changes with the tokens in "
        f"{directory}/{layout.operators_dir.relative_to(layout.root)}"
    )
    print(f"  hsm-domain add-node {directory} --start")
    if ctrl_c_stops is None:
        print(f"  hsm-domain down {directory}")
    elif ctrl_c_stops == "the domain":
        print(f"  Ctrl-C here (or hsm-domain down {directory}) stops the domain")
    else:
        print(f"  Ctrl-C here stops {ctrl_c_stops}; hsm-domain down {directory} stops the domain")
    sys.stdout.flush()


def _shell_path(path: Path) -> str:
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else "."


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


def _cmd_up(args: argparse.Namespace) -> int:
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
    progress = _Progress(sys.stdout, quiet=args.json)
    if not DomainPaths(directory).domain_file.exists():
        _check_counts(args.nodes, args.operators, args.quorum, args.workers)
        progress.step(f"initialising a new domain in {directory} ...")
        init_domain(
            directory,
            nodes=args.nodes,
            operators=args.operators,
            quorum=args.quorum,
            workers=args.workers,
        )
        progress.done(
            f"initialised {directory}: {args.nodes} nodes, {args.operators} operators, "
            f"quorum {args.quorum}"
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


def _start_summary(started: Sequence[str], running: Mapping[str, int]) -> str:
    """One line: what this `up` started and what ran already."""
    already = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
    if not started:
        return f"nothing to start: every process runs already: {already}"
    line = f"started: {', '.join(started)}"
    return f"{line}; running already: {already}" if already else line


# --- down -------------------------------------------------------------------------------------


def _cmd_down(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    progress = _Progress(sys.stdout)
    stopped = cluster.stop_recorded(layout, progress=progress.done)
    if not stopped:
        print(f"nothing is running in {args.directory}")
        return 0
    still = [name for name, pid in stopped.items() if cluster.is_alive(pid)]
    if still:
        raise HsmDomainError(f"could not stop {', '.join(still)}")
    print(f"stopped {len(stopped)} process{'es' if len(stopped) != 1 else ''}")
    return 0


# --- status -----------------------------------------------------------------------------------


def _status_lines(report: DomainReport) -> list[str]:
    """The text of `hsm-domain status`, one line per item; `_print_status` escapes each."""
    lines = [
        f"domain {report.domain_id}  genesis {_short(report.genesis_hash)}  "
        f"quorum {report.quorum} of {report.operators}",
        f"{'NAME':<12} {'ADDRESS':<22} {'HEALTHY':<8} {'VERSION':<8} {'STATE':<13} MEMBER",
    ]
    for p in report.processes:
        version = "-" if p.version is None else str(p.version)
        healthy = "yes" if p.healthy else ("no" if p.running else "down")
        line = (
            f"{p.name:<12} {p.address or '-':<22} {healthy:<8} {version:<8} "
            f"{_short(p.state_hash):<13} {_yes_no(p.member)}"
        )
        if p.detail:  # why it is unhealthy, or a warning it gives while healthy (a fork)
            line += f"  ({p.detail})"
        elif not p.expected:
            line += "  (not in the domain's state)"
        if p.workers:
            line += f"  [key service workers: {', '.join(p.workers)}]"
        lines.append(line)
    view = report.coordinator
    if view.reachable:
        lines.append(
            f"coordinator: version {view.version}, state {_short(view.state_hash)}, "
            f"{view.pending_proposals} pending proposal(s), "
            f"{len(view.registered_hsas)} HSA(s) registered"
        )
        if view.store_behind:
            lines.append(f"  WARNING: {view.store_behind}")
        lines += [f"  pending {proposal_id}" for proposal_id in view.pending_proposal_ids]
        for host, said in sorted(view.reported.items()):
            lines.append(
                f"  {host} reports version {said['version'] or '-'}, "
                f"state {_short(said['state_hash'])}"
            )
    else:
        lines.append(f"coordinator: unreachable ({view.detail})")
    lines.append("all healthy" if report.all_healthy else "NOT all healthy")
    return lines


def _print_status(report: DomainReport) -> None:
    """Print the status; every line escaped (`display.escape`): details, host ids and
    warnings are what processes and the coordinator say, and must not drive the terminal."""
    for line in _status_lines(report):
        print(escape(line))


def _cmd_status(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    report = collect_status(layout)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print_status(report)
    return 0 if report.all_healthy else 1


# --- add-node ---------------------------------------------------------------------------------


def _cmd_add_node(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    enrollment = add_node(directory, args.host_id)
    host = enrollment.parent.name
    layout = load_layout(directory)
    verified = read_enrollment(
        enrollment, layout.ca_cert.read_bytes(), layout.domain_id, datetime.now(UTC)
    )
    keys = host_key_fingerprints(verified.host)
    address = ""
    if args.start:
        with cluster.domain_lock(layout, f"hsm-domain add-node {directory} --start"):
            cluster.start_node(layout, host, detach=True, wait_for_health=False)
        info = cluster.read_ready_file(layout.ready_file(host))
        address = info.address if info else ""
    if args.json:
        print(
            json.dumps(
                {
                    "host_id": host,
                    "enrollment": str(enrollment),
                    "config": str(layout.node_configs[host]),
                    "started": bool(args.start),
                    "address": address,
                    "key_sha256": {label: digest.hex() for label, digest in keys},
                },
                indent=2,
            )
        )
        return 0
    print(f"prepared {host}: enrollment {enrollment}")
    print(f"{host}'s keys (approvers compare these with you before they approve):")
    width = max(len(label) for label, _ in keys)
    for label, digest in keys:
        text = digest.hex()
        print(
            f"  {label.ljust(width)}  SHA-256 {' '.join(text[i : i + 4] for i in range(0, 64, 4))}"
        )
    if args.start:
        print(f"{host} running at {address} (not a member until operators add it)")
    print(
        "next: an operator proposes add-host with this enrollment file and a quorum approves; "
        "the node then follows the new state"
    )
    if not args.start:
        print(f"start it with: hsm-domain up {directory} (or add-node --start next time)")
    return 0


# --- parser -----------------------------------------------------------------------------------


def _epilog(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def _parser() -> argparse.ArgumentParser:
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create, start, inspect and stop a local HSM domain on this machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(
            """
            example:
              hsm-domain up                 # init ./hsm-cluster if needed, start, wait for Ctrl-C
              hsm-domain init demo --nodes 3 --operators 3 --quorum 2
              hsm-domain up demo --detach && hsm-domain status demo && hsm-domain down demo
            """
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[verbose],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=_epilog(example),
        )

    def counts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=int, default=3, help="number of HSA nodes (default 3)")
        p.add_argument("--operators", type=int, default=3, help="number of operators (default 3)")
        p.add_argument("--quorum", type=int, default=2, help="approvals needed (default 2)")
        p.add_argument(
            "--workers",
            type=int,
            default=0,
            help="key service worker processes per node, 0-16, written into the node configs "
            "when the domain is created (default 0: the node alone)",
        )

    p = command(
        "init",
        "create a local domain: CA, node identities, operator tokens, genesis",
        """
        example:
          hsm-domain init ./demo --nodes 3 --operators 3 --quorum 2
          hsm-domain init ./demo --json | jq .genesis_hash
        """,
    )
    p.add_argument("directory", metavar="DIR", help="new (or empty) directory for the domain")
    counts(p)
    p.add_argument("--domain-id", default="local", help="domain (trust domain) id, default local")
    p.add_argument("--json", action="store_true", help="print the created files as JSON")
    p.set_defaults(handler=_cmd_init)

    p = command(
        "up",
        "start the coordinator and every node that is not running (the rest is left as it "
        "is); wait for Ctrl-C (or --detach)",
        """
        example:
          hsm-domain up                 # uses ./hsm-cluster, creating it if needed
          hsm-domain up ./demo --detach # leave it running; stop with hsm-domain down ./demo
          hsm-domain up ./demo --detach # again, after hsa-2 crashed: starts hsa-2 only
        Ctrl-C stops what this command started, not what ran before it.
        """,
    )
    p.add_argument(
        "directory", metavar="DIR", nargs="?", help="domain directory (default ./hsm-cluster)"
    )
    counts(p)
    p.add_argument("--detach", action="store_true", help="leave the processes running and exit")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each step (default 60)"
    )
    p.add_argument("--json", action="store_true", help="print endpoints as JSON once healthy")
    p.set_defaults(handler=_cmd_up)

    p = command(
        "down",
        "stop the processes of a domain started with up (SIGTERM, SIGKILL after 5 s)",
        """
        example:
          hsm-domain down ./demo
        """,
    )
    p.add_argument("directory", metavar="DIR", help="domain directory")
    p.set_defaults(handler=_cmd_down)

    p = command(
        "status",
        "show every process: address, health, version, state hash; and pending proposals",
        """
        example:
          hsm-domain status ./demo
          hsm-domain status ./demo --json | jq '.processes[] | {name, healthy, version}'
        exit status 0 if every expected process is healthy, 1 otherwise
        """,
    )
    p.add_argument("directory", metavar="DIR", help="domain directory")
    p.add_argument("--json", action="store_true", help="machine-readable output (full hashes)")
    p.set_defaults(handler=_cmd_status)

    p = command(
        "add-node",
        "prepare a new node (identity, certificate, enrollment file) for an add-host proposal",
        """
        example:
          hsm-domain add-node ./demo --start
          hsm-domain add-node ./demo --host-id hsa-9 --json
        """,
    )
    p.add_argument("directory", metavar="DIR", help="domain directory")
    p.add_argument("--host-id", help="host id (default: the next free hsa-N)")
    p.add_argument("--start", action="store_true", help="start the node (detached) right away")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_add_node)

    p = command(
        "audit",
        "check the nodes' audit logs (hash chain and signed checkpoints)",
        """
        example:
          hsm-domain audit verify ./demo
        """,
    )
    audit.register(p, [verbose])

    p = command(
        "chaos",
        "run the domain under load and faults (kill, pause, coordinator, partition), "
        "then check its invariants",
        chaos_cli.EXAMPLES,
    )
    chaos_cli.register(p)
    return parser


def _print_error(error: BaseException, verbose: bool) -> None:
    print_error(PROG, error, verbose=verbose)
    if isinstance(error, ProcessStartError) and error.log_tail:
        print(f"last lines of {error.log_file}:", file=sys.stderr)
        for line in error.log_tail:
            print(f"  | {escape(line)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one `hsm-domain` command; return the exit status."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as error:
        return exit_code(error)
    verbose = bool(getattr(args, "verbose", False))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except _UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe()  # the reader went away (e.g. `| head`)
    except (HsmDomainError, OSError) as error:
        _print_error(error, verbose)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
