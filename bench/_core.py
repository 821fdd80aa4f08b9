"""The benchmark runner: configuration, the module contract, targets, floor ratios.

A benchmark is a module listed in `bench.BENCHMARK_MODULES` that defines
- `NAME` (short, unique, used on the command line and as the JSON key),
- `TITLE` (one line for the table and the report),
- `run(config: BenchConfig) -> dict[str, Figure]` (flat figures, names ending in their unit:
  `_ms`, `_us`, `_s`, `_ops_s`, `_mib`, `_ratio`, ...),
and may define
- `TARGETS: tuple[Target, ...]` (goals from the issues, checked and reported, never asserted),
- `FLOOR_RATIOS = True` (a key-service benchmark: for every figure `<op>_c<N>_ops_s` the
  runner adds, against the floor's `echo_1k_c<N>_*` at the same concurrency N,
  `<op>_c<N>_floor_ratio` = this throughput / the floor's (issue 7's goal: >= 0.8),
  `<op>_c<N>_p99_floor_ratio` = this p99 latency / the floor's (goal: <= 1.5), and
  `<op>_c<N>_cpu_floor_ratio` = this server CPU per call / the floor's, each when both sides
  have the figure; the floor runs first whenever such a benchmark is selected; a benchmark
  that measures `echo_1k_c<N>_*` itself, interleaved with its own rounds, is compared with
  that instead, and a ratio the benchmark gave itself, round by round, is kept).

Invariants: a benchmark that fails is reported with its error and the others still run; the
floor's figures are handed to later benchmarks in `config.floor`; raw samples and curves for
plots travel in the config, never in the figures (which stay flat and JSON-friendly).
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal, cast

__all__ = [
    "FLOOR_NAME",
    "FLOOR_PREFIX",
    "BenchConfig",
    "BenchError",
    "Benchmark",
    "Curve",
    "Figure",
    "Report",
    "Target",
    "TargetResult",
    "add_floor_ratios",
    "load_benchmarks",
    "run_benchmarks",
]

Figure = float | int | str | bool
FLOOR_NAME: Final = "floor"
FLOOR_PREFIX: Final = "echo_1k"
_OPS_FIGURE: Final = re.compile(r"^(?P<op>.+)_c(?P<concurrency>\d+)_ops_s$")
_COMPARISONS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": lambda measured, goal: measured < goal,
    "<=": lambda measured, goal: measured <= goal,
    ">": lambda measured, goal: measured > goal,
    ">=": lambda measured, goal: measured >= goal,
}
# (suffix of this benchmark's figure, suffix of the ratio): this figure / the floor's.
_FLOOR_RATIOS: Final = (
    ("ops_s", "floor_ratio"),
    ("p99_ms", "p99_floor_ratio"),
    ("server_cpu_us_per_op", "cpu_floor_ratio"),
)


class BenchError(Exception):
    """A benchmark could not produce its figures (the message says why)."""


@dataclass(frozen=True)
class Curve:
    """A scaling curve for a plot: one or more series of (x, y) points."""

    title: str
    x_label: str
    y_label: str
    series: dict[str, tuple[list[float], list[float]]]
    log_x: bool = False
    log_y: bool = False
    # A horizontal line per label (e.g. a target), drawn dashed.
    lines: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A goal for one figure: `figure` `op` `value`, e.g. propagation median < 300 ms."""

    figure: str
    op: Literal["<", "<=", ">", ">="]
    value: float
    text: str

    def check(self, figures: dict[str, Figure]) -> TargetResult:
        """Whether the figure meets the goal (None when it was not measured in this run)."""
        measured = figures.get(self.figure)
        if not isinstance(measured, (int, float)) or isinstance(measured, bool):
            return TargetResult(self, None, None)
        if not math.isfinite(float(measured)):
            return TargetResult(self, None, None)
        met = _COMPARISONS[self.op](float(measured), self.value)
        return TargetResult(self, float(measured), met)


@dataclass(frozen=True)
class TargetResult:
    """A target with what was measured (None: not measured in this run)."""

    target: Target
    measured: float | None
    met: bool | None


@dataclass
class BenchConfig:
    """What every benchmark gets: the mode, a scratch directory, and places for plot data."""

    quick: bool
    work_dir: Path
    log: Callable[[str], None] = print
    floor: dict[str, Figure] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    curves: dict[str, Curve] = field(default_factory=dict)

    def pick(self, quick: Any, full: Any) -> Any:
        """`quick` in quick mode, else `full` (sizes, durations, repetitions)."""
        return quick if self.quick else full

    def directory(self, name: str) -> Path:
        """A fresh, not yet existing path under the scratch directory (for a new domain)."""
        for index in range(1000):
            candidate = self.work_dir / (name if index == 0 else f"{name}-{index}")
            if not candidate.exists():
                return candidate
        raise BenchError(f"no free directory name for {name} under {self.work_dir}")

    def add_samples(self, group: str, label: str, values_ms: Sequence[float]) -> None:
        """Keep a latency distribution (milliseconds) for the plot of `group`."""
        self.samples.setdefault(group, {})[label] = [float(v) for v in values_ms]

    def add_curve(self, name: str, curve: Curve) -> None:
        """Keep a scaling curve for a plot named `name`."""
        self.curves[name] = curve


class Benchmark:
    """A loaded benchmark module, checked against the contract in the module docstring."""

    def __init__(self, module: ModuleType) -> None:
        name = getattr(module, "NAME", None)
        run = getattr(module, "run", None)
        if not isinstance(name, str) or not name or not callable(run):
            raise TypeError(f"{module.__name__} must define NAME (a string) and run(config)")
        self.module = module
        self.name: str = name
        self.title: str = str(getattr(module, "TITLE", name))
        self.targets: tuple[Target, ...] = tuple(getattr(module, "TARGETS", ()))
        self.floor_ratios: bool = bool(getattr(module, "FLOOR_RATIOS", False))
        self._run = cast(Callable[[BenchConfig], dict[str, Figure]], run)

    def run(self, config: BenchConfig) -> dict[str, Figure]:
        """Run the benchmark and check that it returned flat figures."""
        figures = self._run(config)
        if not isinstance(figures, dict):
            raise TypeError(f"{self.name}.run returned {type(figures).__name__}, not a dict")
        for key, value in figures.items():
            if not isinstance(key, str) or not isinstance(value, (int, float, str, bool)):
                raise TypeError(f"{self.name}: figure {key!r} is not a number, string or bool")
        return figures


def load_benchmarks(modules: Sequence[str]) -> dict[str, Benchmark]:
    """Import the benchmark modules (in order) and index them by NAME."""
    found: dict[str, Benchmark] = {}
    for module_name in modules:
        benchmark = Benchmark(importlib.import_module(module_name))
        if benchmark.name in found:
            raise TypeError(f"two benchmarks are named {benchmark.name!r}")
        found[benchmark.name] = benchmark
    return found


def _positive(value: Figure | None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number > 0 else None


def add_floor_ratios(figures: dict[str, Figure], floor: Mapping[str, Figure]) -> None:
    """For every `<op>_c<N>_ops_s`, add its ratios to the floor at concurrency N.

    `<op>_c<N>_floor_ratio` = throughput / the floor's (higher is better, goal >= 0.8),
    `<op>_c<N>_p99_floor_ratio` = p99 latency / the floor's (lower is better, goal <= 1.5),
    `<op>_c<N>_cpu_floor_ratio` = server CPU per call / the floor's (lower is better); each
    only when both sides have a positive, finite figure, and never over a ratio the benchmark
    gave itself (from floor runs paired with its own, round by round).
    """
    for key in list(figures):
        match = _OPS_FIGURE.match(key)
        if match is None or key.startswith(f"{FLOOR_PREFIX}_c"):
            continue  # (the floor is not compared with itself)
        prefix = key.removesuffix("_ops_s")
        floor_prefix = f"{FLOOR_PREFIX}_c{match['concurrency']}"
        for suffix, ratio in _FLOOR_RATIOS:
            mine = _positive(figures.get(f"{prefix}_{suffix}"))
            theirs = _positive(floor.get(f"{floor_prefix}_{suffix}"))
            if mine is not None and theirs is not None:
                figures.setdefault(f"{prefix}_{ratio}", mine / theirs)


@dataclass
class Report:
    """Everything one invocation measured, for the table, the JSON file and the docs."""

    command: str
    quick: bool
    started: str
    machine: dict[str, str]
    results: dict[str, dict[str, Figure]] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    targets: list[TargetResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every selected benchmark produced its figures."""
        return not self.errors


def load_average() -> str:
    """The 1-minute load average (other work on a shared machine inflates wall-clock figures)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def machine_description() -> dict[str, str]:
    """nproc, CPU model, Python, grpcio, OS and load of this machine, for the report."""
    import grpc

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count() or 0),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": str(getattr(grpc, "__version__", "?")),
        "os": f"{platform.system()} {platform.release()}",
        "load average at start": load_average(),
    }


def run_benchmarks(
    selected: Sequence[str],
    available: dict[str, Benchmark],
    config: BenchConfig,
    *,
    command: str,
) -> Report:
    """Run the selected benchmarks in registry order (the floor first when ratios need it)."""
    unknown = [name for name in selected if name not in available]
    if unknown:
        raise BenchError(
            f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(available)}"
        )
    wanted = set(selected)
    if any(available[name].floor_ratios for name in wanted) and FLOOR_NAME in available:
        wanted.add(FLOOR_NAME)
    order = [name for name in available if name in wanted]
    if FLOOR_NAME in order:
        order.remove(FLOOR_NAME)
        order.insert(0, FLOOR_NAME)
    report = Report(
        command=command,
        quick=config.quick,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        machine=machine_description(),
    )
    for name in order:
        benchmark = available[name]
        report.titles[name] = benchmark.title
        config.log(f"== {name}: {benchmark.title}")
        began = time.monotonic()
        try:
            figures = benchmark.run(config)
            if benchmark.floor_ratios:
                if not config.floor:
                    raise BenchError("the floor was not measured, so no floor ratio can be given")
                # A benchmark that measured the floor itself, interleaved with its own rounds,
                # is compared with that; else with the floor benchmark's.
                own = {k: v for k, v in figures.items() if k.startswith(f"{FLOOR_PREFIX}_c")}
                add_floor_ratios(figures, {**config.floor, **own})
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            report.errors[name] = f"{type(error).__name__}: {error}"
            config.log(f"   {name} FAILED: {report.errors[name]}")
            traceback.print_exc(file=sys.stderr)
            figures = {}
        report.seconds[name] = time.monotonic() - began
        if figures:
            report.results[name] = figures
            if name == FLOOR_NAME:
                config.floor = dict(figures)
        for target in benchmark.targets:
            report.targets.append(target.check(figures))
        config.log(f"   {name} took {report.seconds[name]:.1f} s")
    report.machine["load average at end"] = load_average()
    return report
