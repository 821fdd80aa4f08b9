"""The cells of `bench.kms_latency`: one (mode, operation, concurrency)'s figures, the closed
loops that measure them (threads, or asyncio coroutines), medians over rounds, the table.

Invariants: every loop is bounded by a number of calls and a time budget; a warm-up of
`WARMUP_CALLS` calls (not measured) comes before each cell; a cell with no completed call is an
error, never a zero.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench._stats import percentile

__all__ = [
    "WARMUP_CALLS",
    "Cell",
    "make_cell",
    "measure_async",
    "measure_threads",
    "medians",
    "table",
]

WARMUP_CALLS = 30


@dataclass(frozen=True)
class Cell:
    """The figures of one (mode, operation, concurrency)."""

    mode: str
    operation: str
    concurrency: int
    calls: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_us: float
    """CPU time of this (client) process per call, all threads, in microseconds."""
    round: int = 1
    """Which round measured it (`measure` numbers them from 1)."""


def make_cell(
    mode: str,
    operation: str,
    concurrency: int,
    latencies: list[float],
    elapsed: float,
    cpu: float,
) -> Cell:
    """The cell of one measured run: `latencies` in seconds, `cpu` this process's seconds."""
    if not latencies:
        raise RuntimeError(f"no {operation} call completed ({mode}, {concurrency} callers)")
    ms = [latency * 1000 for latency in latencies]
    return Cell(
        mode=mode,
        operation=operation,
        concurrency=concurrency,
        calls=len(ms),
        seconds=round(elapsed, 3),
        throughput=round(len(ms) / elapsed, 1),
        p50_ms=round(percentile(ms, 50), 3),
        p99_ms=round(percentile(ms, 99), 3),
        mean_ms=round(statistics.fmean(ms), 3),
        client_cpu_us=round(cpu / len(ms) * 1e6, 1),
    )


def _run_threads(
    call: Callable[[], object], concurrency: int, ops: int, seconds: float
) -> tuple[list[float], float]:
    """`ops` calls (or fewer, when `seconds` run out) from `concurrency` threads."""
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def worker(latencies: list[float]) -> None:
        try:
            while next(counter) < ops and time.monotonic() < deadline:
                started = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - started)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return [latency for r in results for latency in r], elapsed


def measure_threads(
    mode: str,
    operations: dict[str, Callable[[], object]],
    concurrency: int,
    ops: int,
    seconds: float,
) -> list[Cell]:
    """A warm-up, then one measured cell per operation."""
    cells = []
    for name, call in operations.items():
        _run_threads(call, concurrency, WARMUP_CALLS, seconds)
        cpu = time.process_time()
        latencies, elapsed = _run_threads(call, concurrency, ops, seconds)
        cpu = time.process_time() - cpu
        cells.append(make_cell(mode, name, concurrency, latencies, elapsed, cpu))
    return cells


async def _run_async(
    call: Callable[[], Awaitable[object]], concurrency: int, ops: int, seconds: float
) -> tuple[list[float], float]:
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while next(counter) < ops and time.monotonic() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def measure_async(
    mode: str,
    operations: dict[str, Callable[[], Awaitable[object]]],
    concurrency: int,
    ops: int,
    seconds: float,
) -> list[Cell]:
    """A warm-up, then one measured cell per operation."""
    cells = []
    for name, call in operations.items():
        await _run_async(call, concurrency, WARMUP_CALLS, seconds)
        cpu = time.process_time()
        latencies, elapsed = await _run_async(call, concurrency, ops, seconds)
        cpu = time.process_time() - cpu
        cells.append(make_cell(mode, name, concurrency, latencies, elapsed, cpu))
    return cells


def medians(cells: list[Cell]) -> list[Cell]:
    """One cell per (mode, operation, concurrency): the medians over the rounds."""
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.mode, cell.operation, cell.concurrency), []).append(cell)
    return [
        Cell(
            mode=mode,
            operation=operation,
            concurrency=concurrency,
            calls=sum(c.calls for c in group),
            seconds=round(sum(c.seconds for c in group), 3),
            throughput=round(statistics.median(c.throughput for c in group), 1),
            p50_ms=round(statistics.median(c.p50_ms for c in group), 3),
            p99_ms=round(statistics.median(c.p99_ms for c in group), 3),
            mean_ms=round(statistics.median(c.mean_ms for c in group), 3),
            client_cpu_us=round(statistics.median(c.client_cpu_us for c in group), 1),
        )
        for (mode, operation, concurrency), group in groups.items()
    ]


def table(cells: list[Cell]) -> str:
    header = ("mode", "op", "callers", "calls", "ops/s", "p50 ms", "p99 ms", "client us")
    lines = ["{:<15} {:<8} {:>7} {:>6} {:>8} {:>8} {:>8} {:>9}".format(*header)]
    for c in cells:
        lines.append(
            f"{c.mode:<15} {c.operation:<8} {c.concurrency:>7} {c.calls:>6} {c.throughput:>8.1f} "
            f"{c.p50_ms:>8.2f} {c.p99_ms:>8.2f} {c.client_cpu_us:>9.0f}"
        )
    return "\n".join(lines)
