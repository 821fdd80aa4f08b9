"""Benchmarks of a running hsm-domain: `python -m bench all [--quick] [--json FILE]`.

Every benchmark is a module in `BENCHMARK_MODULES` that defines `NAME`, `TITLE` and
`run(config) -> dict[str, Figure]` (see `bench._core` for the whole contract); adding one is
one line in that list. Each starts the domain it needs (real processes, mutual TLS, the same
server stack as production) and stops it again, whatever happens.

Performance figures live here, never in timed test assertions. Targets from the issues are
checked and reported (met / not met), not asserted.
"""

from __future__ import annotations

from bench._core import (
    BenchConfig,
    BenchError,
    Benchmark,
    Curve,
    Figure,
    Report,
    Target,
    add_floor_ratios,
    load_benchmarks,
    run_benchmarks,
)

__all__ = [
    "BENCHMARK_MODULES",
    "BenchConfig",
    "BenchError",
    "Benchmark",
    "Curve",
    "Figure",
    "Report",
    "Target",
    "add_floor_ratios",
    "load_benchmarks",
    "run_benchmarks",
]

# The registry, in running order (the floor always runs first). One line per benchmark.
BENCHMARK_MODULES: list[str] = [
    "bench.floor",
    "bench.keyservice",
    "bench.envelope",
    "bench.kms_latency",
    "bench.scaling",
    "bench.propagation",
    "bench.replicas",
    "bench.catchup",
    "bench.verification",
    "bench.startup",
    "bench.memory",
    "bench.audit_append",
    "bench.quotas",
    "bench.keyspecs",
    "bench.rewrap",
    "bench.idle_streams",
    "bench.proposals",
    "bench.peers",
]
