"""What the kernel says about a process: CPU time and resident memory, from /proc.

Shared by every benchmark that reports server CPU per operation or memory (the floor, the
key service, and side-by-side runs against other servers such as OpenBao), so that every
figure of that kind is measured the same way: utime + stime of the process (all its threads)
from `/proc/PID/stat`, and VmRSS / VmHWM from `/proc/PID/status`.

Invariants: read-only; a process that has gone away raises ProcessLookupError (never a made-up
zero); Linux only (these benchmarks run on Linux; elsewhere the calls raise OSError).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "cpu_seconds", "memory_kib", "rss_mib", "tree_pids"]

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

    def per_op_us(self, operations: int) -> float:
        """CPU microseconds per operation over the sampled interval."""
        return self.seconds * 1e6 / operations if operations else float("nan")
