"""The `hsm-domain chaos` command: arguments, the run, the report and the exit status.

Exit status: 0 when every invariant held, 1 when one broke (or the run could not be made),
2 on a usage error (through `domain_edge.cli`, like every command). The report goes to
stdout; `--json FILE` writes it as JSON as well.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any, Final

from deploy.chaos.experiment import ChaosInterrupted, run_chaos
from deploy.chaos.faults import (
    FAULT_TYPES,
    REPLICA_FAULT_TYPES,
    FaultConfig,
    domain_fault_types,
    parse_fault_types,
)
from deploy.chaos.runner import ChaosOptions
from deploy.chaos.workload import WorkloadConfig
from deploy.init import load_layout
from domain_edge.cli import Command, UsageError

__all__ = ["COMMAND", "EXIT_BROKEN", "EXIT_HELD", "EXIT_USAGE"]

EXIT_HELD: Final = 0
EXIT_BROKEN: Final = 1
EXIT_USAGE: Final = 2


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} cannot be negative")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} cannot be negative")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be between 0 and 1")
    return value


def _fault_types(text: str) -> tuple[str, ...] | None:
    try:
        return parse_fault_types(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# Every option of `chaos` but DIR: (flag, add_argument keywords).
_OPTIONS: Final[tuple[tuple[str, dict[str, Any]], ...]] = (
    (
        "--duration",
        {
            "type": _positive,
            "default": 60.0,
            "metavar": "S",
            "help": "seconds of faults (default 60)",
        },
    ),
    (
        "--seed",
        {
            "type": int,
            "default": None,
            "metavar": "N",
            "help": "seed of the fault schedule and the workload (default: a new one, printed)",
        },
    ),
    (
        "--faults",
        {
            "type": _fault_types,
            "default": None,
            "metavar": "LIST",
            "help": f"comma-separated fault types: {','.join(FAULT_TYPES)} (one coordinator), "
            f"kill,pause,partition,{','.join(REPLICA_FAULT_TYPES)} (coordinator replicas on "
            "etcd) (default all: every type the domain supports)",
        },
    ),
    (
        "--fault-interval",
        {
            "type": _positive,
            "default": 2.0,
            "metavar": "S",
            "help": "mean seconds between two faults (default 2)",
        },
    ),
    (
        "--fault-duration",
        {
            "type": _positive,
            "nargs": 2,
            "metavar": ("MIN", "MAX"),
            "default": (0.5, 3.0),
            "help": "how long a fault lasts before it is repaired, in seconds (default 0.5 3)",
        },
    ),
    (
        "--max-down",
        {
            "type": _count,
            "default": None,
            "metavar": "N",
            "help": "HSAs unreachable by clients at once (default: all but one)",
        },
    ),
    (
        "--clients",
        {
            "type": _count,
            "default": 3,
            "metavar": "N",
            "help": "data-plane client threads (default 3)",
        },
    ),
    (
        "--control-interval",
        {
            "type": _positive,
            "default": 2.0,
            "metavar": "S",
            "help": "seconds between two quorum-approved domain changes (default 2)",
        },
    ),
    (
        "--client-timeout",
        {
            "type": _positive,
            "default": 2.0,
            "metavar": "S",
            "help": "seconds per client attempt before failing over (default 2)",
        },
    ),
    (
        "--think-time",
        {
            "type": _non_negative,
            "default": 0.005,
            "metavar": "S",
            "help": "seconds a client waits between operations (default 0.005)",
        },
    ),
    (
        "--settle-timeout",
        {
            "type": _positive,
            "default": 30.0,
            "metavar": "S",
            "help": "bound on convergence after the faults stop, in seconds (default 30)",
        },
    ),
    (
        "--min-availability",
        {
            "type": _fraction,
            "default": 0.9,
            "metavar": "F",
            "help": "fraction of data-plane operations that must succeed "
            "while an HSA is reachable (default 0.9)",
        },
    ),
    (
        "--history",
        {"type": Path, "default": None, "metavar": "FILE", "help": "history file (JSON lines)"},
    ),
    (
        "--json",
        {"type": Path, "default": None, "metavar": "FILE", "help": "write the report as JSON"},
    ),
)


def _arguments(parser: argparse.ArgumentParser) -> None:
    """The `chaos` arguments: DIR, then `_OPTIONS`."""
    parser.add_argument("directory", metavar="DIR", help="domain directory (not running)")
    for flag, options in _OPTIONS:
        parser.add_argument(flag, **options)


def _cmd_chaos(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    low, high = args.fault_duration
    if low > high:
        raise UsageError("--fault-duration MIN must not exceed MAX")
    try:
        domain_fault_types(args.faults, load_layout(directory).replicated)
    except ValueError as error:
        raise UsageError(str(error)) from None
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    options = ChaosOptions(
        directory=directory,
        duration=args.duration,
        seed=seed,
        faults=FaultConfig(
            types=args.faults,
            interval=args.fault_interval,
            min_duration=low,
            max_duration=high,
            max_down=args.max_down,
        ),
        workload=WorkloadConfig(
            clients=args.clients,
            think_time=args.think_time,
            client_timeout=args.client_timeout,
            control_interval=args.control_interval,
        ),
        settle_timeout=args.settle_timeout,
        min_availability=args.min_availability,
        history_path=args.history,
    )
    try:
        report = run_chaos(options, sys.stdout)
    except ChaosInterrupted as stop:
        print(f"hsm-domain chaos: {stop}: stopped without checking", file=sys.stderr)
        return EXIT_BROKEN
    print(report.render(), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return EXIT_HELD if report.held else EXIT_BROKEN


#: `hsm-domain chaos DIR ...` (in the table of `deploy.cli`).
COMMAND: Final = Command(
    "chaos",
    "run the domain under load and faults (kill, pause, coordinator, partition; with "
    "replicas: replica-kill, replica-pause, etcd-kill, etcd-cut), then check its invariants",
    _cmd_chaos,
    """
    hsm-domain init ./demo && hsm-domain chaos ./demo --duration 60 --seed 7
    hsm-domain chaos ./demo --duration 300 --seed 1 --faults kill,partition --json report.json
    hsm-domain init ./ha --coordinators 3 && hsm-domain chaos ./ha --duration 300 --seed 1
    hsm-domain chaos ./ha --faults replica-kill,etcd-kill,etcd-cut --duration 60
    """,
    notes="""
    exit status 0 if every invariant held, 1 if one broke, 2 on a usage error.
    The history (every operation and fault, JSON lines) goes to DIR/chaos/history-<seed>.jsonl;
    on a domain with replicas the store's backup read at the end to DIR/chaos/store-<seed>.hsmbk.
    """,
    arguments=_arguments,
)
