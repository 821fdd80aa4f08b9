"""Presenting a benchmark run: the terminal table, the JSON file, docs/benchmarks.md, plots.

Figures are flat `name -> value` maps whose names end in their unit (`_ms`, `_us`, `_s`,
`_ops_s`, `_mib`, `_mib_s`, `_ratio`, `_exponent`, ...). Latency figures that share a prefix
(`<prefix>_p50_ms`, `_p95_ms`, `_p99_ms`, `_ops_s`, `_server_cpu_us_per_op`, `_floor_ratio`,
`_p99_floor_ratio`, ...) are shown as one row of a latency table; every other figure as a row
of its own.

The markdown report is written between two marker lines (`GENERATED_BEGIN`, `GENERATED_END`):
regenerating it replaces only what lies between them, so a section someone appended after the
end marker (or wrote before the begin marker) is kept.

`run_cli` is the scaffolding the two command lines share (`python -m bench`, `python -m
bench.peers`) once they have parsed their arguments: run in a scratch directory, stop on
Ctrl-C and SIGTERM, then print, write JSON and the docs page, and give the exit status.

Invariants: writing never changes the report; the JSON file holds every figure exactly as
measured (no rounding); text outside the markers of an existing report is never lost; plots
need matplotlib, which is optional: without it, `write_plots` raises PlotsUnavailable with
what to install, and nothing else depends on it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from bench._core import (
    BenchConfig,
    BenchError,
    Benchmark,
    Figure,
    Report,
    TargetResult,
    run_benchmarks,
)

__all__ = [
    "GENERATED_BEGIN",
    "GENERATED_END",
    "PlotsUnavailable",
    "format_value",
    "latency_rows",
    "merge_generated",
    "print_report",
    "render_markdown",
    "report_json",
    "run_cli",
    "write_json",
    "write_markdown",
    "write_plots",
]

# Column key (the suffix after the row prefix), heading.
_LATENCY_COLUMNS: Final = (
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("ops_s", "ops/s"),
    ("server_cpu_us_per_op", "server CPU µs/op"),
    ("client_cpu_us_per_op", "client CPU µs/op"),
    ("ops_per_server_cpu_s", "ops/server CPU s"),
    ("ops_per_cpu_s", "ops/CPU s"),
    ("cores_busy", "cores busy"),
    ("floor_ratio", "ops/s x floor"),
    ("floor_low_ratio", "lowest round"),
    ("floor_high_ratio", "highest round"),
    ("p99_floor_ratio", "p99 x floor"),
    ("cpu_floor_ratio", "CPU x floor"),
    ("errors", "errors"),
)
_ROW_SUFFIXES: Final = (*(f"_{suffix}" for suffix, _ in _LATENCY_COLUMNS), "_mean_ms")
_UNITS: Final = (
    ("_ops_s", "ops/s"),
    ("_mib_s", "MiB/s"),
    ("_per_op", "µs/op"),
    ("_ms", "ms"),
    ("_us", "µs"),
    ("_mib", "MiB"),
    ("_per_s", "/s"),
    ("_s", "s"),
    ("_ratio", "x"),
    ("_bytes", "bytes"),
)


class PlotsUnavailable(RuntimeError):
    """Plots were asked for but matplotlib is not installed."""


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_value(name: str, value: Figure) -> str:
    """A figure as text with the unit its name ends in (e.g. '12.30 ms', '2,957 ops/s')."""
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    text = _number(float(value))
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return f"{text} {unit}"
    return text


def latency_rows(figures: dict[str, Figure]) -> tuple[list[str], dict[str, dict[str, Figure]]]:
    """Prefixes that have a `_p50_ms` figure, in order, with their columns; the rest apart."""
    prefixes = [key.removesuffix("_p50_ms") for key in figures if key.endswith("_p50_ms")]
    rows: dict[str, dict[str, Figure]] = {}
    for prefix in prefixes:
        row: dict[str, Figure] = {}
        for suffix, _ in _LATENCY_COLUMNS:
            key = f"{prefix}_{suffix}"
            if key in figures:
                row[suffix] = figures[key]
        rows[prefix] = row
    return prefixes, rows


def _other_figures(figures: dict[str, Figure], prefixes: Iterable[str]) -> dict[str, Figure]:
    taken = {f"{p}{suffix}" for p in prefixes for suffix in _ROW_SUFFIXES}
    return {k: v for k, v in figures.items() if k not in taken}


def _table(headings: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(headings) + " |"]
        lines.append(
            "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headings))) + " |"
        )
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return lines
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headings)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        )

    return [line(headings), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _figure_tables(figures: dict[str, Figure], markdown: bool) -> list[str]:
    prefixes, rows = latency_rows(figures)
    lines: list[str] = []
    if prefixes:
        columns = [(s, h) for s, h in _LATENCY_COLUMNS if any(s in rows[p] for p in prefixes)]
        body = [
            [
                p,
                *(
                    format_value(s, rows[p][s]).split(" ")[0] if s in rows[p] else ""
                    for s, _ in columns
                ),
            ]
            for p in prefixes
        ]
        lines += _table(["latency", *(h for _, h in columns)], body, markdown)
        lines.append("")
    others = _other_figures(figures, prefixes)
    if others:
        body = [[k, format_value(k, v)] for k, v in others.items()]
        lines += _table(["figure", "value"], body, markdown)
        lines.append("")
    return lines


def _target_line(result: TargetResult) -> list[str]:
    target = result.target
    if result.met is None or result.measured is None:
        verdict, measured = "not measured in this run", "-"
    else:
        verdict = "met" if result.met else "NOT MET"
        measured = format_value(target.figure, result.measured)
    return [target.text, f"{target.op} {_number(target.value)}", measured, verdict]


def _targets(report: Report, markdown: bool) -> list[str]:
    if not report.targets:
        return []
    rows = [_target_line(r) for r in report.targets]
    return _table(["target", "goal", "measured", "verdict"], rows, markdown)


def print_report(report: Report, stream: TextIO | None = None) -> None:
    """The figures of every benchmark as aligned tables, then the targets and the errors."""
    out = stream or sys.stdout
    mode = "quick" if report.quick else "full"
    out.write(f"\nhsm-domain benchmarks ({mode}), {report.started}\n")
    out.write(", ".join(f"{k} {v}" for k, v in report.machine.items()) + "\n")
    for name, figures in report.results.items():
        out.write(f"\n[{name}] {report.titles.get(name, '')} ({report.seconds[name]:.1f} s)\n")
        for line in _figure_tables(figures, markdown=False):
            out.write(line + "\n")
    if report.targets:
        out.write("\ntargets\n")
        for line in _targets(report, markdown=False):
            out.write(line + "\n")
    for name, error in report.errors.items():
        out.write(f"\n[{name}] FAILED: {error}\n")
    out.flush()


def report_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready document (every figure as measured)."""
    return {
        "command": report.command,
        "mode": "quick" if report.quick else "full",
        "started": report.started,
        "machine": report.machine,
        "results": report.results,
        "seconds": report.seconds,
        "errors": report.errors,
        "targets": [
            {
                "figure": r.target.figure,
                "goal": f"{r.target.op} {r.target.value}",
                "text": r.target.text,
                "measured": r.measured,
                "met": r.met,
            }
            for r in report.targets
        ],
    }


def _json_default(value: object) -> object:
    return str(value)


def write_json(report: Report, path: Path) -> None:
    """Write the report as JSON (non-finite numbers become null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(report_json(report)), indent=2, default=_json_default) + "\n")


def _description(docstring: str | None) -> str:
    """A module docstring as markdown text (its first line is the benchmark's summary)."""
    if not docstring:
        return ""
    return docstring.strip() + "\n"


def _duration(report: Report) -> str:
    seconds = sum(report.seconds.values())
    return f"{seconds / 60:.1f} minutes" if seconds >= 120 else f"{seconds:.0f} s"


def render_markdown(
    report: Report,
    descriptions: dict[str, str],
    plots: dict[str, list[Path]],
    docs_dir: Path,
) -> str:
    """docs/benchmarks.md: how it was produced, targets, and each benchmark's figures."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/` (do not edit by hand: run the command below again).",
        "",
        f"- command: `{report.command}`",
        f"- date: {report.started}",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in report.machine.items()),
        "",
        "Every process of the domain, the benchmark client included, shares this machine's "
        "cores, so figures are orders of magnitude, not guarantees; full runs repeat and give "
        "medians. Key-service figures carry their ratios to the floor (Echo at the same "
        "concurrency over the same stack and client; `keyservice` measures it as `echo_1k` "
        "in a run right beside each of its targeted runs, and gives the median over rounds of "
        "each round's ratio, with the lowest and highest round): `_floor_ratio` = this "
        "throughput / the floor's (issue 7's goal: at least 0.8), `_p99_floor_ratio` = this "
        "p99 latency / the floor's (goal: at most 1.5), `_cpu_floor_ratio` = this server CPU "
        "per call / the floor's.",
        "",
        f"Run it again with `python -m bench all` (this run: {_duration(report)} on "
        f"{report.machine.get('nproc', '?')} cores; add `--quick` for a CI smoke run of under "
        "2 minutes that writes no docs; `--json FILE` keeps every figure).",
        "",
    ]
    if report.targets:
        lines += ["## Targets", "", *_targets(report, markdown=True), ""]
    if report.errors:
        lines += ["## Failures", ""]
        lines += [f"- `{name}`: {error}" for name, error in report.errors.items()]
        lines.append("")
    for name, figures in report.results.items():
        lines += [f"## {name}: {report.titles.get(name, '')}", ""]
        description = descriptions.get(name, "")
        if description:
            lines += [description, ""]
        lines += _figure_tables(figures, markdown=True)
        for plot in plots.get(name, []):
            relative = plot.relative_to(docs_dir) if plot.is_relative_to(docs_dir) else plot
            lines += [f"![{plot.stem}]({relative.as_posix()})", ""]
        lines.append(f"({report.seconds.get(name, 0.0):.1f} s)")
        lines.append("")
    lines += [
        "## Adding a benchmark",
        "",
        "A benchmark is a module in `bench/` with `NAME`, `TITLE` and "
        "`run(config) -> dict[str, Figure]` (flat figures whose names end in their unit), "
        "listed in `bench.BENCHMARK_MODULES` (one line). `FLOOR_RATIOS = True` makes the "
        "runner add `<op>_c<N>_floor_ratio`, `_p99_floor_ratio` and `_cpu_floor_ratio` to "
        "every `<op>_c<N>_ops_s`; `TARGETS` are checked and reported. Text added to this file "
        "after the end marker below is kept when the report is regenerated. Shared helpers: "
        "`bench._cluster.BenchDomain` (a local domain of real "
        "processes, always stopped), `bench._load` (closed-loop sync and asyncio load), "
        "`bench._proc` (CPU time and memory from /proc), `bench._stats` (percentiles, fits, "
        "paired ratios).",
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"


GENERATED_BEGIN: Final = "<!-- bench: generated part begins (python -m bench all) -->"
GENERATED_END: Final = (
    "<!-- bench: generated part ends; text below this line is kept when it is regenerated -->"
)
_BEGIN_PREFIX: Final = "<!-- bench: generated part begins"
_END_PREFIX: Final = "<!-- bench: generated part ends"
# The last section of reports written before the markers existed.
_LEGACY_LAST_SECTION: Final = "## Adding a benchmark"


def _marker_index(lines: list[str], prefix: str, start: int = 0) -> int | None:
    for index in range(start, len(lines)):
        if lines[index].startswith(prefix):
            return index
    return None


def _legacy_kept(lines: list[str]) -> list[str]:
    """What to keep of a report without markers: sections after the generated ones, or all of
    a file this module did not write."""
    if not lines or lines[0] != "# Benchmarks":
        return lines
    last = next((i for i, line in enumerate(lines) if line == _LEGACY_LAST_SECTION), None)
    if last is None:
        return []
    following = next(
        (i for i in range(last + 1, len(lines)) if lines[i].startswith("#")), len(lines)
    )
    return lines[following:]


def merge_generated(existing: str | None, generated: str) -> str:
    """`generated` between the two marker lines, with what `existing` holds outside them.

    A file with both markers keeps everything before the begin marker and after the end
    marker; a file without them (written before the markers existed) keeps the sections after
    its generated ones, and a file this module did not write is kept whole, after the end
    marker.
    """
    body = [GENERATED_BEGIN, *generated.rstrip("\n").split("\n"), GENERATED_END]
    if existing is None:
        return "\n".join(body) + "\n"
    lines = existing.rstrip("\n").split("\n") if existing.strip() else []
    begin = _marker_index(lines, _BEGIN_PREFIX)
    end = _marker_index(lines, _END_PREFIX, 0 if begin is None else begin + 1)
    if begin is not None and end is not None:
        before, after = lines[:begin], lines[end + 1 :]
    else:
        before, after = [], _legacy_kept(lines)
    if after and after[0].strip():
        after = ["", *after]
    return "\n".join([*before, *body, *after]) + "\n"


def write_markdown(
    report: Report,
    path: Path,
    descriptions: dict[str, str],
    plots: dict[str, list[Path]],
) -> None:
    """Write the generated report into docs/benchmarks.md (or `path`), keeping what lies
    outside its markers (see `merge_generated`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(
        report, {k: _description(v) for k, v in descriptions.items()}, plots, path.parent
    )
    existing = path.read_text() if path.exists() else None
    path.write_text(merge_generated(existing, text))


_SAFE_NAME: Final = re.compile(r"[^a-z0-9_-]+")


def _one_two_five(low: float, high: float) -> list[float]:
    """Tick values 1, 2, 5, 10, 20, ... covering [low, high] (for a log axis)."""
    ticks: list[float] = []
    decade = 10.0 ** math.floor(math.log10(low))
    while decade <= high * 10:
        ticks += [decade * m for m in (1.0, 2.0, 5.0)]
        decade *= 10
    inside = [t for t in ticks if low <= t <= high]
    below = [t for t in ticks if t < low][-1:]
    above = [t for t in ticks if t > high][:1]
    return below + inside + above


def _owner(name: str, benchmarks: Iterable[str]) -> str:
    """The benchmark a plot belongs to: the longest benchmark name its own name starts with."""
    matches = [b for b in benchmarks if name.startswith(b)]
    return max(matches, key=len) if matches else ""


def write_plots(
    config: BenchConfig, directory: Path, benchmarks: Iterable[str]
) -> dict[str, list[Path]]:
    """PNG plots of the latency distributions and scaling curves; paths by benchmark name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        raise PlotsUnavailable(
            "matplotlib is not installed, so no plots were drawn; install it with "
            "`pip install matplotlib` (or the project's bench extra)"
        ) from None
    names = list(benchmarks)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}

    for group, series in config.samples.items():
        plotted = {label: values for label, values in series.items() if len(values) >= 2}
        if not plotted:
            continue
        figure, axes = plt.subplots(figsize=(7, 4.2))
        for label, values in plotted.items():
            ordered = sorted(values)
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axes.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered):,})")
        axes.set_xscale("log")
        every = [v for values in plotted.values() for v in values if v > 0]
        axes.set_xticks(_one_two_five(min(every), max(every)))
        axes.xaxis.set_major_formatter(ticker.ScalarFormatter())
        axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel("latency, ms (log scale)")
        axes.set_ylabel("fraction of calls at or below")
        axes.set_title(f"{group}: latency distribution")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        path = directory / f"{_SAFE_NAME.sub('_', group.lower())}_latency.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.setdefault(_owner(group, names) or group, []).append(path)

    for name, curve in config.curves.items():
        figure, axes = plt.subplots(figsize=(7, 4.2))
        for label, (xs, ys) in curve.series.items():
            axes.plot(xs, ys, marker="o", label=label)
        for label, value in curve.lines.items():
            axes.axhline(value, linestyle="--", linewidth=1, color="grey")
            axes.annotate(label, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7)
        if curve.log_x:
            axes.set_xscale("log")
            axes.set_xticks(sorted({x for xs, _ in curve.series.values() for x in xs}))
            axes.xaxis.set_major_formatter(ticker.ScalarFormatter())
            axes.xaxis.set_minor_formatter(ticker.NullFormatter())
        if curve.log_y:
            axes.set_yscale("log")
            values = [y for _, ys in curve.series.values() for y in ys if y > 0]
            axes.set_yticks(_one_two_five(min(values), max(values)))
            axes.yaxis.set_major_formatter(ticker.ScalarFormatter())
            axes.yaxis.set_minor_formatter(ticker.NullFormatter())
        axes.set_xlabel(curve.x_label)
        axes.set_ylabel(curve.y_label)
        axes.set_title(curve.title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        path = directory / f"{_SAFE_NAME.sub('_', name.lower())}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.setdefault(_owner(name, names) or name, []).append(path)
    return written


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through every `finally`, so the servers a benchmark started are stopped.
    raise SystemExit(128 + signum)


def run_cli(
    name: str,
    selected: Sequence[str],
    available: dict[str, Benchmark],
    *,
    command: str,
    quick: bool,
    keep: bool,
    json_path: Path | None,
    write_docs: Callable[[Report, BenchConfig], None] | None,
    scratch_prefix: str,
    stopped: str,
) -> int:
    """Run the selected benchmarks for a command line; print the table, write the JSON file
    and (with `write_docs`) the docs page; the exit status.

    `name` prefixes the messages ("bench: ..."), `stopped` says what Ctrl-C stopped ("domain",
    "server"). Both `python -m bench` and `python -m bench.peers` come through here, so their
    signal handling, scratch directories and exit statuses (0 ok, 1 a benchmark failed,
    2 bad usage, 130 Ctrl-C, 128 + signal on SIGTERM) stay the same.
    """
    work_dir = Path(tempfile.mkdtemp(prefix=scratch_prefix))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    config = BenchConfig(quick=quick, work_dir=work_dir, log=_log)
    began = time.monotonic()
    try:
        report = run_benchmarks(selected, available, config, command=command)
    except BenchError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; every {stopped} it started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            _log(f"scratch directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(report)
    if json_path is not None:
        write_json(report, json_path)
        _log(f"wrote {json_path}")
    if write_docs is not None:
        write_docs(report, config)
    _log(f"{name}: {time.monotonic() - began:.1f} s in all")
    return 0 if report.ok else 1
