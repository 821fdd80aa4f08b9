"""What the kernel says about a process: CPU time and resident memory, from /proc.

Shared by every benchmark of our domain that reports CPU per operation or memory (the floor,
memory, the key service, scaling, the key-service profile), so that every figure of that kind
is measured the same way: utime + stime of the process (all its threads) from
`/proc/PID/stat`, and VmRSS / VmHWM from `/proc/PID/status`. (The side-by-side peers read
other servers' whole process trees, children reaped in the window included, their own way:
`bench.peers._common`.)

`CpuMeter` reads a whole measured window at once: every HSA process tree (the node and its key
service worker processes), and optionally the coordinator and the client, so that every
benchmark that reports them sums the same processes the same way; it is the one way those
benchmarks meter a window.

Invariants: read-only; a process that has gone away raises ProcessLookupError (never a made-up
zero); Linux only (these benchmarks run on Linux; elsewhere the calls raise OSError).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuMeter",
    "CpuSample",
    "cpu_seconds",
    "memory_kib",
    "per_op_us",
    "rss_mib",
    "tree_pids",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: Path, pid: int) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} does not exist (any more)") from None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, in seconds (all threads)."""
    text = _read(Path(f"/proc/{pid}/stat"), pid)
    # Fields after the parenthesised command name (which may hold spaces): state is field 3,
    # utime field 14 and stime field 15 (1-based, proc(5)).
    fields = text.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def tree_pids(pid: int) -> list[int]:
    """`pid` and every live descendant of it (children's CPU is not in the parent's
    utime/stime until they are reaped, so a server with worker processes is sampled whole)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (resident peak) of the process, in KiB."""
    found: dict[str, int] = {}
    for line in _read(Path(f"/proc/{pid}/status"), pid).splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    if "VmRSS" not in found:
        raise ProcessLookupError(f"process {pid} has no resident memory (a zombie?)")
    return found


def rss_mib(pid: int) -> float:
    """Resident set size of the process now, in MiB."""
    return memory_kib(pid)["VmRSS"] / 1024.0


def per_op_us(seconds: float, operations: int) -> float:
    """CPU microseconds per operation; NaN when nothing was done (never a made-up zero)."""
    return seconds * 1e6 / operations if operations else float("nan")


@dataclass
class CpuSample:
    """CPU time of a process at two moments: `start()` then `stop()`; `seconds` in between."""

    pid: int
    _start: float = 0.0
    seconds: float = 0.0

    def start(self) -> CpuSample:
        """Take the first reading."""
        self._start = cpu_seconds(self.pid)
        return self

    def stop(self) -> float:
        """Take the second reading; the CPU seconds used in between."""
        self.seconds = cpu_seconds(self.pid) - self._start
        return self.seconds


class CpuMeter:
    """CPU seconds over one measured window: every HSA's process tree (summed), and the
    coordinator and the client when given; `start()` then `stop()`, e.g. as a load run's
    `on_start` and `on_stop`.

    The trees are read when the meter is made (before the window, so the scan of /proc is not
    in it): a worker process started later is not counted. `wall_s` is the window's
    wall-clock length (monotonic clock).
    """

    def __init__(
        self,
        hsa_pids: Iterable[int],
        *,
        coordinator: int | None = None,
        client: int | None = None,
    ) -> None:
        self._hsas = [CpuSample(pid) for root in hsa_pids for pid in tree_pids(root)]
        self._coordinator = CpuSample(coordinator) if coordinator is not None else None
        self._client = CpuSample(client) if client is not None else None
        self._began = 0.0
        self.wall_s = 0.0

    def _samples(self) -> list[CpuSample]:
        extra = (self._coordinator, self._client)
        return [*self._hsas, *(sample for sample in extra if sample is not None)]

    def start(self) -> None:
        """Take the first readings."""
        self._began = time.monotonic()
        for sample in self._samples():
            sample.start()

    def stop(self) -> None:
        """Take the second readings."""
        for sample in self._samples():
            sample.stop()
        self.wall_s = time.monotonic() - self._began

    @property
    def hsa_seconds(self) -> float:
        """CPU seconds of every HSA process (nodes and their workers) in the window."""
        return sum(sample.seconds for sample in self._hsas)

    @property
    def coordinator_seconds(self) -> float:
        """CPU seconds of the coordinator in the window; ValueError when it was not metered."""
        if self._coordinator is None:
            raise ValueError("this meter does not read the coordinator")
        return self._coordinator.seconds

    @property
    def client_seconds(self) -> float:
        """CPU seconds of the client in the window; ValueError when it was not metered."""
        if self._client is None:
            raise ValueError("this meter does not read the client")
        return self._client.seconds
