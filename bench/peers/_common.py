"""What every side-by-side peer shares: ports, process-tree CPU, one measured cell, ratios.

A peer is a server we start on 127.0.0.1 (ours, OpenBao, PyKMIP) with an asyncio client that
offers the same operations on the same payload (`PeerClient`). `measure_cell` runs one
operation at one concurrency through `bench._load.run_tasks` (closed loop, bounded by time
and count, warm-up first) and reads the server's CPU time over the measured window only.

Invariants: server CPU is utime + stime of the server's whole process tree (the root process,
its live descendants, and the children they reaped during the window, through cutime and
cstime), read from /proc before and after the window, so that a server made of several
processes (PyKMIP starts a multiprocessing manager and a policy monitor) is counted whole and
nothing is counted twice; client CPU is this process's own CPU time over the same window; a
cell with no successful call is an error, never a zero; figures are medians over rounds, and
latency percentiles pool every round's calls; a CPU comparison is also made round by round
(`paired_cpu_ratio_figures`), from cells measured back to back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from bench._core import BenchError, Figure
from bench._load import LoadResult, run_tasks
from bench._stats import median, paired_ratios

__all__ = [
    "CALL_TIMEOUT",
    "CONCURRENCIES",
    "OPERATIONS",
    "PAYLOAD_BYTES",
    "CellRun",
    "OpCall",
    "Peer",
    "ProcStat",
    "TreeCpu",
    "cell_figures",
    "cell_prefix",
    "descendants",
    "floor_ratio_figures",
    "free_port",
    "measure_cell",
    "paired_cpu_ratio_figures",
    "parse_stat",
    "process_table",
    "ratio_figures",
    "tree_cpu_seconds",
    "wait_until",
]

PAYLOAD_BYTES: Final = 1024
OPERATIONS: Final = ("encrypt", "decrypt")
CONCURRENCIES: Final = (1, 16)
CALL_TIMEOUT: Final = 30.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

OpCall = Callable[[], Awaitable[object]]


class Peer(Protocol):
    """A running server and the means to call it (see the module docstring)."""

    @property
    def label(self) -> str:
        """Figure prefix, e.g. `ours`, `openbao_audit`."""
        ...

    @property
    def description(self) -> str:
        """One line: what runs, with which options (for the report)."""
        ...

    def server_pids(self) -> list[int]:
        """The root process(es) of the server, whose process trees are measured."""
        ...

    def client(self, concurrency: int) -> AbstractAsyncContextManager[Mapping[str, OpCall]]:
        """An asyncio client for `concurrency` callers: operation name -> one call.

        Create it inside the event loop that uses it; leaving the block closes it.
        """
        ...


# --- ports -----------------------------------------------------------------------------------


def free_port(consecutive: int = 1, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port P such that P..P+consecutive-1 were all free on `host` a moment ago.

    The OS picks P (bind to port 0); the sockets are closed before returning, so another
    process may still take one: callers retry their server start on a new port if so.
    """
    if consecutive < 1:
        raise ValueError("consecutive must be at least 1")
    for _ in range(attempts):
        held: list[socket.socket] = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(first)
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            if port + consecutive - 1 > 65535:
                continue
            for offset in range(1, consecutive):
                extra = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(extra)
                extra.bind((host, port + offset))
            return port
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise BenchError(f"no {consecutive} consecutive free ports on {host}")


def wait_until(
    ready: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll `ready` until it is true; BenchError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {timeout:g} s")
        time.sleep(interval)


# --- process-tree CPU ------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat we use: parent, and CPU ticks including reaped children."""

    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one /proc/PID/stat line (the command name may hold spaces and parentheses)."""
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError("not a /proc/PID/stat line")
    pid = int(head.partition("(")[0].strip())
    fields = tail.split()
    # After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17), 1-based.
    ppid = int(fields[1])
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ProcStat(pid=pid, ppid=ppid, ticks=ticks)


def process_table(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every process now, by pid (processes that vanish while being read are left out)."""
    table: dict[int, ProcStat] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        table[stat.pid] = stat
    return table


def descendants(roots: Iterable[int], parents: Mapping[int, int]) -> set[int]:
    """The roots and every process below them, given pid -> parent pid."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in parents]
    while pending:
        pid = pending.pop()
        if pid in found:
            continue
        found.add(pid)
        pending.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds used so far by the process trees under `roots` (see the module docstring)."""
    table = process_table()
    missing = [pid for pid in roots if pid not in table]
    if missing:
        raise ProcessLookupError(f"process {missing[0]} does not exist (any more)")
    members = descendants(roots, {pid: stat.ppid for pid, stat in table.items()})
    return sum(table[pid].ticks for pid in members) / _CLOCK_TICKS


@dataclass
class TreeCpu:
    """Server CPU over a window: `start()` then `stop()`; `seconds` in between."""

    roots: list[int]
    _start: float = 0.0
    seconds: float = 0.0

    def start(self) -> None:
        """Take the first reading."""
        self._start = tree_cpu_seconds(self.roots)

    def stop(self) -> None:
        """Take the second reading."""
        self.seconds = tree_cpu_seconds(self.roots) - self._start


# --- one measured cell -----------------------------------------------------------------------


@dataclass
class CellRun:
    """One measured window of one (peer, operation, concurrency)."""

    load: LoadResult
    server_cpu_s: float
    client_cpu_s: float

    @property
    def server_cpu_us_per_op(self) -> float:
        """Server CPU microseconds per successful call."""
        return self.server_cpu_s * 1e6 / self.load.operations

    @property
    def client_cpu_us_per_op(self) -> float:
        """Client (this process) CPU microseconds per successful call."""
        return self.client_cpu_s * 1e6 / self.load.operations


def cell_prefix(label: str, operation: str, concurrency: int) -> str:
    """Figure prefix of one cell: `<peer>_<op>_1k_c<N>`."""
    return f"{label}_{operation}_1k_c{concurrency}"


def measure_cell(
    peer: Peer,
    operation: str,
    concurrency: int,
    *,
    duration: float,
    max_ops: int,
    warmup: float = 0.5,
) -> CellRun:
    """Run `operation` against `peer` with `concurrency` asyncio callers; one `CellRun`."""
    server = TreeCpu(peer.server_pids())
    client = [0.0, 0.0]

    def on_start() -> None:
        server.start()
        client[0] = time.process_time()

    def on_stop() -> None:
        server.stop()
        client[1] = time.process_time()

    async def main() -> LoadResult:
        async with peer.client(concurrency) as calls:
            if operation not in calls:
                raise BenchError(f"{peer.label} cannot do {operation}")
            return await run_tasks(
                calls[operation],
                concurrency=concurrency,
                duration=duration,
                max_ops=max_ops,
                warmup=warmup,
                on_start=on_start,
                on_stop=on_stop,
            )

    load = asyncio.run(main())
    if load.operations == 0:
        raise BenchError(
            f"no {operation} call to {peer.label} succeeded at concurrency {concurrency}: "
            f"{load.first_error or 'no call finished in the window'}"
        )
    return CellRun(load, server.seconds, client[1] - client[0])


def cell_figures(prefix: str, runs: Sequence[CellRun]) -> dict[str, Figure]:
    """Latency percentiles of every round's calls pooled; throughput and CPU as medians."""
    if not runs:
        raise ValueError(f"no runs for {prefix}")
    pooled = LoadResult(concurrency=runs[0].load.concurrency)
    for run in runs:
        pooled.latencies_ns.extend(run.load.latencies_ns)
        pooled.errors += run.load.errors
    figures: dict[str, Figure] = dict(pooled.figures(prefix))
    figures[f"{prefix}_ops_s"] = median([r.load.ops_per_second for r in runs])
    figures[f"{prefix}_server_cpu_us_per_op"] = median([r.server_cpu_us_per_op for r in runs])
    figures[f"{prefix}_client_cpu_us_per_op"] = median([r.client_cpu_us_per_op for r in runs])
    return figures


def _number(figures: Mapping[str, Figure], key: str) -> float | None:
    value = figures.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


def ratio_figures(
    figures: Mapping[str, Figure],
    *,
    ours: str,
    others: Sequence[str],
    operations: Sequence[str] = OPERATIONS,
    concurrencies: Sequence[int] = CONCURRENCIES,
) -> dict[str, Figure]:
    """Ours against each other peer, per cell and worst case.

    `cpu_<ours>_over_<other>_<op>_1k_c<N>_ratio`: our server CPU per op / theirs (below 1:
    we spend less); `ops_<ours>_over_<other>_..._ratio`: our throughput / theirs (above 1:
    we are faster). `cpu_<ours>_over_<other>_max_ratio` is the worst (highest) CPU ratio over
    every cell both measured, and `ops_<other>_over_<ours>_max_ratio` the worst throughput
    ratio the other way round (below 1: we are faster in every cell).
    """
    out: dict[str, Figure] = {}
    for other in others:
        cpu_ratios: list[float] = []
        speed_ratios: list[float] = []
        for operation in operations:
            for concurrency in concurrencies:
                mine = cell_prefix(ours, operation, concurrency)
                theirs = cell_prefix(other, operation, concurrency)
                cell = f"{operation}_1k_c{concurrency}"
                my_cpu = _number(figures, f"{mine}_server_cpu_us_per_op")
                their_cpu = _number(figures, f"{theirs}_server_cpu_us_per_op")
                if my_cpu is not None and their_cpu is not None:
                    cpu_ratios.append(my_cpu / their_cpu)
                    out[f"cpu_{ours}_over_{other}_{cell}_ratio"] = cpu_ratios[-1]
                my_ops = _number(figures, f"{mine}_ops_s")
                their_ops = _number(figures, f"{theirs}_ops_s")
                if my_ops is not None and their_ops is not None:
                    out[f"ops_{ours}_over_{other}_{cell}_ratio"] = my_ops / their_ops
                    speed_ratios.append(their_ops / my_ops)
        if cpu_ratios:
            out[f"cpu_{ours}_over_{other}_max_ratio"] = max(cpu_ratios)
        if speed_ratios:
            out[f"ops_{other}_over_{ours}_max_ratio"] = max(speed_ratios)
    return out


def paired_cpu_ratio_figures(
    runs: Mapping[str, Sequence[CellRun]],
    *,
    ours: str,
    others: Sequence[str],
    operations: Sequence[str] = OPERATIONS,
    concurrencies: Sequence[int] = CONCURRENCIES,
) -> dict[str, Figure]:
    """Our server CPU per op over another peer's, round by round (`runs`: every round's cell,
    in round order, by `cell_prefix`).

    Within a round the two cells of one (operation, concurrency) run back to back, so a change
    of the machine's speed between rounds (on this VM a fixed loop's CPU time moves by up to
    2x within seconds) divides out of that round's ratio, where the ratio of two medians over
    rounds keeps it. `cpu_<ours>_over_<other>_<op>_1k_c<N>_paired_ratio` is the median of the
    rounds' ratios, `..._paired_low_ratio` / `..._paired_high_ratio` the lowest and highest
    round, and `cpu_<ours>_over_<other>_paired_max_ratio` the worst cell's median.
    """
    out: dict[str, Figure] = {}
    for other in others:
        medians: list[float] = []
        for operation in operations:
            for concurrency in concurrencies:
                mine = runs.get(cell_prefix(ours, operation, concurrency), ())
                theirs = runs.get(cell_prefix(other, operation, concurrency), ())
                spread = paired_ratios(
                    (m.server_cpu_us_per_op, t.server_cpu_us_per_op)
                    for m, t in zip(mine, theirs, strict=False)
                    if t.server_cpu_s > 0
                )
                if spread is None:
                    continue
                name = f"cpu_{ours}_over_{other}_{operation}_1k_c{concurrency}_paired"
                medians.append(spread.median)
                out[f"{name}_ratio"] = spread.median
                out[f"{name}_low_ratio"] = spread.low
                out[f"{name}_high_ratio"] = spread.high
        if medians:
            out[f"cpu_{ours}_over_{other}_paired_max_ratio"] = max(medians)
    return out


def floor_ratio_figures(
    runs: Mapping[str, Sequence[CellRun]],
    *,
    labels: Sequence[str],
    floor: str,
    operations: Sequence[str] = OPERATIONS,
    concurrencies: Sequence[int] = CONCURRENCIES,
) -> dict[str, Figure]:
    """Each of `labels` against its own floor (its `floor` operation's cells), round by round.

    `<label>_<op>_1k_c<N>_floor_ratio`: throughput / the floor's, median of the rounds' ratios
    (with `_floor_low_ratio` / `_floor_high_ratio`, the lowest and highest round);
    `<label>_<op>_1k_c<N>_cpu_floor_ratio`: server CPU per call / the floor's, likewise a
    median. A round counts when both cells were measured in it (`runs` in round order).
    """
    out: dict[str, Figure] = {}
    for label in labels:
        for concurrency in concurrencies:
            below = runs.get(cell_prefix(label, floor, concurrency), ())
            for operation in operations:
                prefix = cell_prefix(label, operation, concurrency)
                pairs = list(zip(runs.get(prefix, ()), below, strict=False))
                speed = paired_ratios(
                    (m.load.ops_per_second, f.load.ops_per_second) for m, f in pairs
                )
                if speed is not None:
                    out[f"{prefix}_floor_ratio"] = speed.median
                    out[f"{prefix}_floor_low_ratio"] = speed.low
                    out[f"{prefix}_floor_high_ratio"] = speed.high
                cpu = paired_ratios(
                    (m.server_cpu_us_per_op, f.server_cpu_us_per_op)
                    for m, f in pairs
                    if f.server_cpu_s > 0
                )
                if cpu is not None:
                    out[f"{prefix}_cpu_floor_ratio"] = cpu.median
    return out
