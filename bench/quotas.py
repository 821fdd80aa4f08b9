"""Request-rate quotas alone: what taking a token costs each key-service call (no domain, no
network).

Calls `hsa_node.quotas.Quotas.admit` as the key service does for every call (principal,
operation), with quotas too large to run out (the cost of a token does not depend on the
rate; a refusal would stop the run), from one thread and
from 4 at once, for one principal and for 10,000 (the buckets are an LRU of bounded size: many
principals cost a dictionary of that size). `admit_us_*` is the time per call; the key service
spends 150-600 µs of server CPU per call, so this is the whole cost of the quotas on its hot
path. 200,000 calls per cell (20,000 in quick mode).

    python -m bench.quotas [--calls N] [--json FILE]

It is also a module of the `python -m bench` runner (NAME, TITLE, run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Final

from bench._core import BenchConfig, Figure
from domain_core.limits import DEFAULT_LIMITS
from hsa_node.quotas import Quotas

__all__ = ["NAME", "TITLE", "main", "measure", "run"]

NAME: Final = "quotas"
TITLE: Final = "request-rate quotas: the cost of one token per key-service call"

THREADS: Final = 4
OPERATIONS: Final = ("Encrypt", "Decrypt", "GenerateDataKey", "DescribeKey")


# Quotas that these loops never exhaust (millions of calls a second).
_UNLIMITED: Final = dataclasses.replace(
    DEFAULT_LIMITS,
    crypto_requests_per_second=1e12,
    crypto_request_burst=10**12,
    read_requests_per_second=1e12,
    read_request_burst=10**12,
)


def _run(quotas: Quotas, principals: list[str], calls: int, failures: list[BaseException]) -> None:
    count = len(principals)
    try:
        for n in range(calls):
            quotas.admit(principals[n % count], OPERATIONS[n % len(OPERATIONS)])
    except BaseException as error:  # reported by the cell: a refusal is a broken measurement
        failures.append(error)


def _cell(principals: int, calls: int, threads: int) -> float:
    """µs per admitted call, `threads` threads sharing one `Quotas` (3 HSAs' shares)."""
    quotas = Quotas(_UNLIMITED, lambda: 3)
    names = [f"spiffe://bench/client/app-{n}" for n in range(principals)]
    per_thread = calls // threads
    failures: list[BaseException] = []
    workers = [
        threading.Thread(
            target=_run, args=(quotas, names[t::threads] or names, per_thread, failures)
        )
        for t in range(threads)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise RuntimeError(f"a quota benchmark thread failed: {failures[0]!r}")
    return (time.perf_counter() - started) / (per_thread * threads) * 1e6


def measure(calls: int) -> dict[str, Figure]:
    """Every cell: 1 and 10,000 principals, 1 and `THREADS` threads."""
    figures: dict[str, Figure] = {"calls_per_cell": calls}
    for principals in (1, 10_000):
        for threads in (1, THREADS):
            key = f"admit_us_{principals}_principals_{threads}_threads"
            figures[key] = round(_cell(principals, calls, threads), 3)
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry: 20,000 calls per cell in quick mode, 200,000 in full."""
    return measure(int(config.pick(20_000, 200_000)))


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print it, and write `--json` if asked."""
    parser = argparse.ArgumentParser(prog="python -m bench.quotas", description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000, help="calls per cell (200000)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.calls < THREADS:
        parser.error(f"--calls must be at least {THREADS}")
    figures = measure(args.calls)
    for name, value in figures.items():
        print(f"{name:<40} {value:,.3f}" if isinstance(value, float) else f"{name:<40} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
