"""`hsm-domain`: create, start, inspect and stop a local HSM domain on this machine.

The tool is a table of commands (`COMMANDS`: init, up, down, status, add-node, audit verify,
chaos, backup, backup verify, restore, recover, store migrate) run by the one skeleton of the three
tools (`domain_edge.cli`). Exit status: 0 on success, 1 when the command was refused or failed
(a one-line cause on stderr, and the last lines of a process's log when it failed to start;
`-v` adds the traceback), 2 on a usage error. Only `domain_core.errors.HsmDomainError` and
`OSError` are caught, once; anything else is a bug and shows its traceback.

Nothing printed here holds a key or a passphrase. What processes and the coordinator say
(status details, host ids, warnings, log lines) is printed through `display.escape`, so it
cannot forge lines or drive the terminal; `--json` escapes as JSON does.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from deploy import audit, backup, cluster, recovery
from deploy._coordinators import STORES
from deploy._domain_layout import read_domain_file
from deploy._up import check_counts, cmd_up
from deploy.bundles import hosts_summary
from deploy.chaos import cli as chaos_cli
from deploy.cluster import ProcessStartError
from deploy.enrollment import host_key_fingerprints, read_enrollment
from deploy.init import (
    DomainLayout,
    add_node,
    add_node_across_hosts,
    init_domain,
    init_domain_across_hosts,
    load_layout,
)
from deploy.status import DomainReport, collect_status
from domain_core.display import escape, hex_groups
from domain_core.errors import HsmDomainError, InvalidInputError
from domain_edge.cli import (
    Command,
    Group,
    Progress,
    Tool,
    UsageError,
    console_command,
    print_json,
    run_tool,
)
from domain_edge.hosts import COORDINATOR_PORT, HSA_PORT, HostAddress, parse_host_option
from domain_edge.layout import DomainPaths

__all__ = ["COMMANDS", "TOOL", "build_parser", "main"]

PROG: Final = "hsm-domain"


# --- output -----------------------------------------------------------------------------------


def _short(hex_hash: str) -> str:
    return hex_hash[:12] if hex_hash else "-"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


# --- init -------------------------------------------------------------------------------------


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
        "store": "etcd" if layout.etcd is not None else "sqlite",
        "coordinators": {
            name: str(layout.coordinator_config_of(name)) for name in layout.coordinators
        },
        "etcd": None
        if layout.etcd is None
        else {
            "cluster_file": str(layout.etcd_cluster_file),
            "members": {m.name: m.endpoint for m in layout.etcd.cluster.members},
            "store": layout.etcd.store_spec,
        },
        "ca_certificate": str(layout.ca_cert),
        "client_certificate": str(layout.client_cert),
        "client_key": str(layout.client_key),
    }


def _init_across_hosts(args: argparse.Namespace) -> int:
    """`init --host ... --coordinator ADDR`: a domain whose processes run from bundles."""
    try:
        hosts = [parse_host_option(text) for text in args.host]
        coordinator = HostAddress.parse(args.coordinator or "", COORDINATOR_PORT)
    except InvalidInputError as error:
        raise UsageError(error.message) from None
    if args.nodes not in (3, len(hosts)) or args.coordinators != 1 or args.store == "etcd":
        raise UsageError(
            "--host names every node (no --nodes) and a domain across hosts has one coordinator "
            "on SQLite (no --coordinators, --store etcd)"
        )
    check_counts(len(hosts), args.operators, args.quorum, args.workers)
    root = init_domain_across_hosts(
        Path(args.directory),
        hosts,
        coordinator,
        operators=args.operators,
        quorum=args.quorum,
        domain_id=args.domain_id,
        workers=args.workers,
        expose_metrics=args.expose_metrics,
    )
    summary = hosts_summary(root)
    if args.json:
        print_json(summary)
        return 0
    print(f"created domain {summary['domain_id']!r} across hosts in {root}")
    print(f"  genesis hash  {summary['genesis_hash']}")
    for name, bundle in summary["bundles"].items():
        print(f"  {name:<13} {summary['listen'][name]:<24} bundle {bundle}")
    print("  the operators/*.passphrase files are for this demo only")
    print("next: copy each bundle to its machine and start it there (docs/deploy.md):")
    print("  hsa-node --config BUNDLE/config.json   domain-coordinator --config BUNDLE/config.json")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    if args.host or args.coordinator:
        if not args.host or not args.coordinator:
            raise UsageError("a domain across hosts needs --host for each HSA and --coordinator")
        return _init_across_hosts(args)
    check_counts(
        args.nodes, args.operators, args.quorum, args.workers, args.coordinators, args.store
    )
    layout = init_domain(
        Path(args.directory),
        nodes=args.nodes,
        operators=args.operators,
        quorum=args.quorum,
        domain_id=args.domain_id,
        workers=args.workers,
        coordinators=args.coordinators,
        store=args.store,
    )
    if args.json:
        print_json(_layout_json(layout))
        return 0
    names = ", ".join(layout.operator_tokens)
    print(f"created domain {layout.domain_id!r} in {layout.root}")
    print(f"  genesis hash  {layout.genesis_hash.hex()}")
    print(f"  nodes         {', '.join(layout.node_configs)}")
    print(f"  operators     {names} (quorum {layout.quorum} of {len(layout.operator_tokens)})")
    print(f"  coordinators  {', '.join(layout.coordinators)}")
    if layout.etcd is not None:
        print(f"  store         etcd: {', '.join(layout.etcd.cluster.endpoints)} (up starts it)")
    else:
        print("  store         SQLite")
    print("  the operators/*.passphrase files are for this local demo only")
    print(f"next: {console_command('hsm-domain')} up {shlex.quote(args.directory)}")
    return 0


# --- down -------------------------------------------------------------------------------------


def _cmd_down(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    progress = Progress(sys.stdout)
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


def _etcd_lines(report: DomainReport) -> list[str]:
    """One line per etcd member (a domain on etcd)."""
    if report.etcd is None:
        return []
    lines = []
    for m in report.etcd.members:
        healthy = "yes" if m.healthy else ("no" if m.running else "down")
        line = f"{m.name:<14} {m.endpoint:<22} {healthy:<8} {'etcd ' + (m.version or '-'):<22}"
        if m.raft_leader:
            line += " (etcd's raft leader)"
        if not m.healthy:
            line += f" ({m.detail})"
        lines.append(line.rstrip())
    return lines


def _leader_line(report: DomainReport) -> list[str]:
    """Which coordinator replica leads (a domain on etcd), and whether it still runs."""
    if report.etcd is None:
        return []
    leader = report.etcd.replica_leader
    if not leader:
        return [f"leader: none ({report.etcd.detail})"]
    running = {p.name for p in report.processes if p.kind == "coordinator" and p.running}
    if leader not in running:
        return [
            f"leader: {leader} still holds the leadership but is not running; another replica "
            "takes over once its etcd lease lapses (within seconds)"
        ]
    return [f"leader: {leader} leads the coordinator replicas"]


def _status_lines(report: DomainReport) -> list[str]:
    """The text of `hsm-domain status`, one line per item; `_print_status` escapes each."""
    lines = [
        f"domain {report.domain_id}  genesis {_short(report.genesis_hash)}  "
        f"quorum {report.quorum} of {report.operators}",
        f"{'NAME':<14} {'ADDRESS':<22} {'HEALTHY':<8} {'VERSION':<8} {'STATE':<13} MEMBER",
    ]
    lines += _etcd_lines(report)
    for p in report.processes:
        version = "-" if p.version is None else str(p.version)
        healthy = "yes" if p.healthy else ("no" if p.running else "down")
        line = (
            f"{p.name:<14} {p.address or '-':<22} {healthy:<8} {version:<8} "
            f"{_short(p.state_hash):<13} {_yes_no(p.member)}"
        )
        if p.leader:
            line += "  (leader)"
        if p.detail:  # why it is unhealthy, or a warning it gives while healthy (a fork)
            line += f"  ({p.detail})"
        elif not p.expected:
            line += "  (not in the domain's state)"
        if p.workers:
            line += f"  [key service workers: {', '.join(p.workers)}]"
        lines.append(line)
    lines += _leader_line(report)
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
        print_json(report.to_json())
    else:
        _print_status(report)
    return 0 if report.all_healthy else 1


# --- add-node ---------------------------------------------------------------------------------


def _add_host_bundle(args: argparse.Namespace) -> int:
    """`add-node DIR --host NAME=ADDR`: a new HSA's bundle in a domain across hosts."""
    if args.host_id or args.start:
        raise UsageError("--host names the new HSA (no --host-id) and it starts on its machine")
    try:
        host, address = parse_host_option(args.host)
    except InvalidInputError as error:
        raise UsageError(error.message) from None
    directory = Path(args.directory)
    enrollment = add_node_across_hosts(directory, host, address)
    paths = DomainPaths(directory)
    domain_id = str(read_domain_file(paths.root)["domain_id"])
    verified = read_enrollment(enrollment, paths.ca_cert.read_bytes(), domain_id, datetime.now(UTC))
    keys = host_key_fingerprints(verified.host)
    if args.json:
        print_json(
            {
                "host_id": host,
                "enrollment": str(enrollment),
                "bundle": str(enrollment.parent),
                "address": address.address,
                "key_sha256": {label: digest.hex() for label, digest in keys},
            }
        )
        return 0
    print(f"prepared {host} at {address.address}: bundle {enrollment.parent}")
    _print_keys(host, keys)
    print(
        "next: copy the bundle to its machine and start it there; an operator proposes add-host "
        f"with {enrollment} and a quorum approves"
    )
    return 0


def _print_keys(host: str, keys: Sequence[tuple[str, bytes]]) -> None:
    print(f"{host}'s keys (approvers compare these with you before they approve):")
    width = max(len(label) for label, _ in keys)
    for label, digest in keys:
        print(f"  {label.ljust(width)}  SHA-256 {hex_groups(digest.hex())}")


def _cmd_add_node(args: argparse.Namespace) -> int:
    if args.host:
        return _add_host_bundle(args)
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
        print_json(
            {
                "host_id": host,
                "enrollment": str(enrollment),
                "config": str(layout.node_configs[host]),
                "started": bool(args.start),
                "address": address,
                "key_sha256": {label: digest.hex() for label, digest in keys},
            }
        )
        return 0
    print(f"prepared {host}: enrollment {enrollment}")
    _print_keys(host, keys)
    if args.start:
        print(f"{host} running at {address} (not a member until operators add it)")
    print(
        "next: an operator proposes add-host with this enrollment file and a quorum approves; "
        "the node then follows the new state"
    )
    if not args.start:
        print(
            f"start it with: {console_command('hsm-domain')} up {shlex.quote(str(directory))} "
            "(or add-node --start next time)"
        )
    return 0


# --- the table ------------------------------------------------------------------------------------


def _shared_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """`-v` before or after the command name."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show the traceback of an error" if suppress else "show tracebacks",
    )


def _counts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="number of HSA nodes (default 3)")
    parser.add_argument("--operators", type=int, default=3, help="number of operators (default 3)")
    parser.add_argument("--quorum", type=int, default=2, help="approvals needed (default 2)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="key service worker processes per node, 0-16, written into the node configs "
        "when the domain is created (default 0: the node alone)",
    )
    parser.add_argument(
        "--coordinators",
        type=int,
        default=1,
        metavar="N",
        help="coordinator replicas, 1-9 (default 1); 2 or more imply --store etcd",
    )
    parser.add_argument(
        "--store",
        choices=STORES,
        default=None,
        help="the coordinators' store: sqlite (one file, one coordinator; the default for one) "
        "or etcd (a 3-member etcd cluster on this host that `up` starts; the default for 2 or "
        "more coordinators)",
    )


def _directory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="domain directory")


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="new (or empty) directory for the domain")
    _counts(parser)
    parser.add_argument(
        "--domain-id", default="local", help="domain (trust domain) id, default local"
    )
    hosts = parser.add_argument_group(
        "a domain across hosts (each process started from its bundle on its machine)"
    )
    hosts.add_argument(
        "--host",
        metavar="NAME=ADDR",
        action="append",
        default=[],
        help=f"an HSA and where others reach it: an IP or a DNS name, port {HSA_PORT} unless "
        "ADDR ends in :PORT (repeat for each HSA)",
    )
    hosts.add_argument(
        "--coordinator",
        metavar="ADDR",
        help=f"where HSAs reach the coordinator (port {COORDINATOR_PORT} unless :PORT; "
        "operators use the next port)",
    )
    hosts.add_argument(
        "--expose-metrics",
        action="store_true",
        help="serve each process's metrics (its port + 2000) on its address, not loopback",
    )
    parser.add_argument("--json", action="store_true", help="print the created files as JSON")


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", metavar="DIR", nargs="?", help="domain directory (default ./hsm-cluster)"
    )
    _counts(parser)
    parser.add_argument(
        "--detach", action="store_true", help="leave the processes running and exit"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for each step (default 60)"
    )
    parser.add_argument("--json", action="store_true", help="print endpoints as JSON once healthy")


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    _directory(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output (full hashes)")


def _add_node_arguments(parser: argparse.ArgumentParser) -> None:
    _directory(parser)
    parser.add_argument("--host-id", help="host id (default: the next free hsa-N)")
    parser.add_argument(
        "--host",
        metavar="NAME=ADDR",
        help="a domain across hosts (init --host): the new HSA and its address; writes its "
        "bundle in DIR/bundles/NAME",
    )
    parser.add_argument("--start", action="store_true", help="start the node (detached) right away")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


COMMANDS: Final[tuple[Command | Group, ...]] = (
    Command(
        "init",
        "create a local domain: CA, node identities, operator tokens, genesis",
        _cmd_init,
        """
        hsm-domain init ./demo --nodes 3 --operators 3 --quorum 2
        hsm-domain init ./ha --coordinators 3   # 3 replicas on a 3-member etcd cluster
        hsm-domain init ./demo --json | jq .genesis_hash
        hsm-domain init ./prod --host hsa-1=10.0.0.11 --host hsa-2=10.0.0.12 \\
            --host hsa-3=10.0.0.13 --coordinator 10.0.0.10   # bundles for three machines
        """,
        arguments=_init_arguments,
    ),
    Command(
        "up",
        "start the etcd members (a domain on etcd), the coordinators and every node that is "
        "not running (the rest is left as it is); wait for Ctrl-C (or --detach)",
        cmd_up,
        """
        hsm-domain up                 # uses ./hsm-cluster, creating it if needed
        hsm-domain up ./demo --detach # leave it running; stop with hsm-domain down ./demo
        hsm-domain up ./demo --detach # again, after hsa-2 crashed: starts hsa-2 only
        hsm-domain up ./ha --coordinators 3 --detach  # a new HA domain: etcd, 3 replicas
        """,
        notes="Ctrl-C stops what this command started, not what ran before it.",
        arguments=_up_arguments,
    ),
    Command(
        "down",
        "stop the processes of a domain started with up: nodes, coordinators, then etcd "
        "members (SIGTERM, SIGKILL after 5 s)",
        _cmd_down,
        "hsm-domain down ./demo",
        arguments=_directory,
    ),
    Command(
        "status",
        "show every process: address, health, version, state hash; pending proposals; on "
        "etcd each member's health and which coordinator replica leads",
        _cmd_status,
        """
        hsm-domain status ./demo
        hsm-domain status ./demo --json | jq '.processes[] | {name, healthy, version}'
        """,
        notes="exit status 0 if every expected process is healthy (on etcd: every member too, "
        "and one replica leads), 1 otherwise",
        arguments=_status_arguments,
    ),
    Command(
        "add-node",
        "prepare a new node (identity, certificate, enrollment file) for an add-host proposal",
        _cmd_add_node,
        """
        hsm-domain add-node ./demo --start
        hsm-domain add-node ./demo --host-id hsa-9 --json
        """,
        arguments=_add_node_arguments,
    ),
    Group(
        "audit",
        "check the nodes' audit logs (hash chain and signed checkpoints)",
        "hsm-domain audit verify ./demo",
        commands=(audit.VERIFY_COMMAND,),
        metavar="AUDIT_COMMAND",
    ),
    chaos_cli.COMMAND,
    backup.BACKUP_COMMAND,
    backup.RESTORE_COMMAND,
    recovery.RECOVER_COMMAND,
    backup.STORE_GROUP,
)


def _explain(error: BaseException, stream: TextIO) -> None:
    """After the one-line cause: the last lines of the log of a process that did not start."""
    if isinstance(error, ProcessStartError) and error.log_tail:
        print(f"last lines of {error.log_file}:", file=stream)
        for line in error.log_tail:
            print(f"  | {escape(line)}", file=stream)


TOOL: Final = Tool(
    prog=PROG,
    description="Create, start, inspect and stop a local HSM domain on this machine.",
    example="""
        hsm-domain up                 # init ./hsm-cluster if needed, start, wait for Ctrl-C
        hsm-domain init demo --nodes 3 --operators 3 --quorum 2
        hsm-domain up demo --detach && hsm-domain status demo && hsm-domain down demo
        """,
    commands=COMMANDS,
    shared_options=_shared_options,
    heading="example:",
    gap="\n",
    explain=_explain,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole `hsm-domain` parser."""
    return TOOL.parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `hsm-domain` command; return the exit status."""
    return run_tool(TOOL, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
