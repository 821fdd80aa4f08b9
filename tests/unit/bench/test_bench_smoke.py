"""Smoke tests of bench/: the CLI starts, the helpers compute right, the runner keeps its rules.

The benchmarks themselves are not tests (they measure; figures are never asserted); this file
checks the machinery they rely on: percentiles and fits, floor ratios, the registry and the
runner (floor first, failures isolated, targets checked), load generators bounded by count,
/proc readings, the report writers (and that regenerating the report keeps appended text),
and the parts of the benchmarks that need no domain: the module contract and standalone entry
points, the key service's figures and client choice, raw AES-GCM of the envelope baseline, and
the audit-log benchmark end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from support.repository import ROOT

from bench import BENCHMARK_MODULES, audit_append, envelope, idle_streams, keyservice, kms_latency
from bench._core import (
    BenchConfig,
    Benchmark,
    Curve,
    Figure,
    Report,
    Target,
    add_floor_ratios,
    load_benchmarks,
    run_benchmarks,
)
from bench._load import LoadResult, run_tasks, run_threads
from bench._proc import CpuMeter, CpuSample, cpu_seconds, memory_kib, per_op_us
from bench._stats import (
    linear_fit,
    loglog_exponent,
    median,
    paired_ratios,
    percentile,
    summarize_ms,
)
from bench.report import (
    GENERATED_BEGIN,
    GENERATED_END,
    format_value,
    latency_rows,
    merge_generated,
    print_report,
    render_markdown,
    write_json,
    write_markdown,
)
from domain_proto import services_pb2

pytestmark = pytest.mark.unit

REPOSITORY = ROOT


def _bench_cli(*arguments: str, module: str = "bench") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the command line ----------------------------------------------------------------------


def test_help_works() -> None:
    result = _bench_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "python -m bench all --quick" in result.stdout
    result = _bench_cli("all", "--help")
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout
    assert "--json" in result.stdout


def test_list_names_every_registered_benchmark() -> None:
    result = _bench_cli("list")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert names == list(load_benchmarks(BENCHMARK_MODULES))
    assert names[0] == "floor"


@pytest.mark.parametrize(
    "module",
    [
        "bench.kms_latency",
        "bench.rewrap",
        "bench.audit_append",
        "bench.quotas",
        "bench.proposals",
        "bench.recovery",
    ],
)
def test_standalone_entry_points_still_work(module: str) -> None:
    result = _bench_cli("--help", module=module)
    assert result.returncode == 0, result.stderr
    assert "--json" in result.stdout


def test_the_recovery_benchmark_measures_and_checks_what_it_rebuilt() -> None:
    from bench import recovery

    figures = recovery.run(1)
    for count, threshold in recovery.CASES:
        case = f"n{count}_m{threshold}"
        assert figures[f"recovery_build_ms_{case}"] > 0
        assert figures[f"recovery_rebuild_ms_{case}"] > 0
        assert figures[f"recovery_package_bytes_{case}"] > 100 * count


def test_every_registered_module_keeps_the_contract() -> None:
    loaded = load_benchmarks(BENCHMARK_MODULES)
    assert list(loaded)[:2] == ["floor", "keyservice"]
    for name in ("keyservice", "envelope", "memory", "kms_latency", "audit_append", "rewrap"):
        assert name in loaded
        assert loaded[name].title
    assert loaded["keyservice"].floor_ratios
    assert loaded["kms_latency"].floor_ratios
    assert not loaded["envelope"].floor_ratios


def test_unknown_benchmark_is_a_usage_error() -> None:
    result = _bench_cli("run", "no-such-benchmark", "--no-docs")
    assert result.returncode == 2
    assert "unknown benchmark no-such-benchmark" in result.stderr


# --- statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0], 25, 1.75),
        ([4.0, 1.0, 3.0, 2.0], 75, 3.25),  # order of the input does not matter
        ([7.0], 99, 7.0),
        (list(map(float, range(1, 101))), 99, 99.01),
        (list(map(float, range(1, 101))), 95, 95.05),
    ],
)
def test_percentile_interpolates_between_ranks(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_refuses_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1.0], 101)
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_summarize_ms_converts_nanoseconds() -> None:
    figures = summarize_ms([1_000_000, 2_000_000, 3_000_000, 4_000_000], "x")
    assert figures["x_p50_ms"] == pytest.approx(2.5)
    assert figures["x_mean_ms"] == pytest.approx(2.5)
    assert figures["x_max_ms"] == pytest.approx(4.0)
    assert figures["x_p99_ms"] == pytest.approx(3.97)
    with pytest.raises(ValueError, match="no latencies"):
        summarize_ms([], "x")


def test_fits_recover_known_growth() -> None:
    fit = linear_fit([1.0, 2.0, 3.0], [5.0, 7.0, 9.0])
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx((2.0, 3.0, 1.0))
    xs = [10.0, 100.0, 1000.0]
    assert loglog_exponent(xs, [3 * x for x in xs]) == pytest.approx(1.0)
    assert loglog_exponent(xs, [x * x for x in xs]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive"):
        loglog_exponent([0.0, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="distinct"):
        linear_fit([1.0, 1.0], [1.0, 2.0])


# --- floor ratios and the runner -------------------------------------------------------------


def test_floor_ratios_for_every_throughput_figure() -> None:
    figures: dict[str, Figure] = {
        "encrypt_1k_c16_ops_s": 2400.0,
        "encrypt_1k_c16_p99_ms": 45.0,
        "encrypt_1k_c16_server_cpu_us_per_op": 600.0,
        "encrypt_1k_c1_ops_s": 750.0,
        "encrypt_1k_c1_p99_ms": math.nan,  # not measured: no p99 ratio
        "encrypt_1k_3node_c16_ops_s": 3300.0,  # compared with the one-node floor
        "decrypt_1k_c4_ops_s": 100.0,  # no floor at concurrency 4: no ratio
    }
    floor: dict[str, Figure] = {
        "echo_1k_c16_ops_s": 3000.0,
        "echo_1k_c16_p99_ms": 30.0,
        "echo_1k_c16_server_cpu_us_per_op": 300.0,
        "echo_1k_c1_ops_s": 1500.0,
        "echo_1k_c1_p99_ms": 2.0,
    }
    add_floor_ratios(figures, floor)
    # throughput: this / the floor's (the goal: at least 0.8)
    assert figures["encrypt_1k_c16_floor_ratio"] == pytest.approx(0.8)
    assert figures["encrypt_1k_c1_floor_ratio"] == pytest.approx(0.5)
    assert figures["encrypt_1k_3node_c16_floor_ratio"] == pytest.approx(1.1)
    # p99: this / the floor's (goal: at most 1.5)
    assert figures["encrypt_1k_c16_p99_floor_ratio"] == pytest.approx(1.5)
    assert "encrypt_1k_c1_p99_floor_ratio" not in figures
    # server CPU per call: this / the floor's
    assert figures["encrypt_1k_c16_cpu_floor_ratio"] == pytest.approx(2.0)
    assert "encrypt_1k_c1_cpu_floor_ratio" not in figures
    assert not any(key.startswith("decrypt_1k_c4_") and "ratio" in key for key in figures)


def test_targets_compare_both_ways_and_skip_what_was_not_measured() -> None:
    figures: dict[str, Figure] = {"a_ratio": 0.8, "b_ratio": 1.5, "c_ratio": math.nan}
    assert Target("a_ratio", ">=", 0.8, "").check(figures).met is True
    assert Target("a_ratio", ">", 0.8, "").check(figures).met is False
    assert Target("b_ratio", "<=", 1.5, "").check(figures).met is True
    assert Target("b_ratio", "<", 1.5, "").check(figures).met is False
    unmeasured = Target("c_ratio", "<=", 1.5, "").check(figures)
    assert (unmeasured.measured, unmeasured.met) == (None, None)
    assert Target("d_ratio", ">=", 0.8, "").check(figures).met is None


def _module(name: str, run: object, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(f"fake_{name}")
    module.NAME = name  # type: ignore[attr-defined]
    module.TITLE = f"fake {name}"  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def test_a_floor_measured_in_the_same_rounds_is_preferred(tmp_path: Path) -> None:
    def floor(config: BenchConfig) -> dict[str, Figure]:
        return {"echo_1k_c16_ops_s": 4000.0, "echo_1k_c16_p99_ms": 8.0}

    def keyservice(config: BenchConfig) -> dict[str, Figure]:
        return {
            "echo_1k_c16_ops_s": 3000.0,  # measured interleaved with its own rounds
            "echo_1k_c16_p99_ms": 10.0,
            "encrypt_1k_c16_ops_s": 1500.0,
            "encrypt_1k_c16_p99_ms": 15.0,
        }

    available = {
        "floor": Benchmark(_module("floor", floor)),
        "kms": Benchmark(_module("kms", keyservice, FLOOR_RATIOS=True)),
    }
    config = BenchConfig(quick=True, work_dir=tmp_path, log=lambda message: None)
    report = run_benchmarks(["kms"], available, config, command="test")
    figures = report.results["kms"]
    assert figures["encrypt_1k_c16_floor_ratio"] == pytest.approx(0.5)  # 1500 / 3000, not 4000
    assert figures["encrypt_1k_c16_p99_floor_ratio"] == pytest.approx(1.5)
    assert "echo_1k_c16_floor_ratio" not in figures  # the floor is not compared with itself


def test_runner_runs_the_floor_first_adds_ratios_and_isolates_failures(tmp_path: Path) -> None:
    order: list[str] = []

    def floor(config: BenchConfig) -> dict[str, Figure]:
        order.append("floor")
        return {"echo_1k_c1_ops_s": 2000.0}

    def keyservice(config: BenchConfig) -> dict[str, Figure]:
        order.append("kms")
        assert config.floor["echo_1k_c1_ops_s"] == 2000.0
        return {"encrypt_1k_c1_ops_s": 1800.0, "encrypt_1k_c1_p50_ms": 2.0}

    def broken(config: BenchConfig) -> dict[str, Figure]:
        order.append("broken")
        raise RuntimeError("the domain did not start")

    available = {
        "broken": Benchmark(_module("broken", broken)),
        "kms": Benchmark(
            _module(
                "kms",
                keyservice,
                FLOOR_RATIOS=True,
                TARGETS=(
                    Target("encrypt_1k_c1_p50_ms", "<", 5.0, "fast enough"),
                    Target("encrypt_1k_c1_p50_ms", "<", 1.0, "very fast"),
                    Target("encrypt_1k_c1_floor_ratio", ">=", 0.8, "near the floor"),
                    Target("absent_ms", "<", 1.0, "not measured"),
                ),
            )
        ),
        "floor": Benchmark(_module("floor", floor)),
    }
    config = BenchConfig(quick=True, work_dir=tmp_path, log=lambda message: None)
    report = run_benchmarks(["broken", "kms"], available, config, command="test")
    assert order == ["floor", "broken", "kms"]
    assert report.errors == {"broken": "RuntimeError: the domain did not start"}
    assert not report.ok
    assert report.results["kms"]["encrypt_1k_c1_floor_ratio"] == pytest.approx(0.9)
    verdicts = [(r.target.text, r.met) for r in report.targets]
    assert verdicts == [
        ("fast enough", True),
        ("very fast", False),
        ("near the floor", True),
        ("not measured", None),
    ]


def test_a_module_without_the_contract_is_refused() -> None:
    with pytest.raises(TypeError, match="NAME"):
        Benchmark(types.ModuleType("empty"))
    bad = Benchmark(_module("bad", lambda config: {"x": [1, 2]}))
    with pytest.raises(TypeError, match="not a number"):
        bad.run(BenchConfig(quick=True, work_dir=Path(".")))


def test_config_directories_are_fresh(tmp_path: Path) -> None:
    config = BenchConfig(quick=True, work_dir=tmp_path)
    first = config.directory("floor")
    first.mkdir()
    assert config.directory("floor") == tmp_path / "floor-1"
    assert config.pick(1, 2) == 1
    assert BenchConfig(quick=False, work_dir=tmp_path).pick(1, 2) == 2


# --- load generators and /proc --------------------------------------------------------------


def test_thread_load_is_bounded_by_count_and_counts_failures() -> None:
    calls = [0]

    def call() -> None:
        calls[0] += 1
        if calls[0] % 3 == 0:
            raise RuntimeError("every third call fails")

    result = run_threads(call, concurrency=2, duration=60.0, max_ops=500, warmup=0.0)
    assert 500 <= result.operations < 500 + 2 * 64 + 2
    assert result.errors > 0
    assert "every third call fails" in result.first_error
    figures = result.figures("t")
    assert figures["t_errors"] == result.errors
    assert figures["t_ops_s"] > 0


def test_task_load_is_bounded_by_count() -> None:
    async def call() -> None:
        await asyncio.sleep(0)

    result = asyncio.run(run_tasks(call, concurrency=4, duration=60.0, max_ops=300, warmup=0.0))
    assert 300 <= result.operations <= 304
    assert result.errors == 0


def test_proc_readings_of_this_process() -> None:
    sample = CpuSample(os.getpid()).start()
    sum(i * i for i in range(200_000))
    assert sample.stop() >= 0.0
    assert cpu_seconds(os.getpid()) > 0.0
    memory = memory_kib(os.getpid())
    assert memory["VmRSS"] > 1000
    assert memory["VmHWM"] >= memory["VmRSS"]
    with pytest.raises(ProcessLookupError):
        cpu_seconds(2**22 + 12345)  # above the kernel's pid limit


def test_cpu_meter_reads_only_what_it_was_given() -> None:
    meter = CpuMeter([os.getpid()], client=os.getpid())
    meter.start()
    sum(i * i for i in range(200_000))
    meter.stop()
    assert meter.hsa_seconds >= 0.0
    assert meter.client_seconds >= 0.0
    assert meter.wall_s > 0.0
    with pytest.raises(ValueError, match="coordinator"):
        _ = meter.coordinator_seconds


def test_cpu_per_op_is_nan_when_nothing_was_done() -> None:
    assert per_op_us(0.5, 1000) == pytest.approx(500.0)
    assert math.isnan(per_op_us(0.5, 0))


# --- the report ------------------------------------------------------------------------------


def test_values_carry_their_units() -> None:
    assert format_value("x_p50_ms", 12.3456) == "12.35 ms"
    assert format_value("x_ops_s", 2957.4) == "2,957 ops/s"
    assert format_value("x_server_cpu_us_per_op", 273.0) == "273.0 µs/op"
    assert format_value("x_rss_mib", 62.5) == "62.50 MiB"
    assert format_value("x_median_s", 0.94) == "0.940 s"
    assert format_value("x_floor_ratio", 3.0) == "3.00 x"
    assert format_value("x_encrypt_mib_s", 512.25) == "512.2 MiB/s"
    assert format_value("x_keys_per_s", 1500.0) == "1,500 /s"
    assert format_value("x_per_key_bytes", 4200.0) == "4,200 bytes"
    assert format_value("x_changes", 20) == "20"
    assert format_value("x_client", "sync") == "sync"


def test_latency_rows_group_by_prefix() -> None:
    figures: dict[str, Figure] = {
        "a_c1_p50_ms": 1.0,
        "a_c1_p99_ms": 2.0,
        "a_c1_ops_s": 900.0,
        "a_c1_floor_ratio": 0.5,
        "a_c1_p99_floor_ratio": 1.2,
        "other_ms": 3.0,
    }
    prefixes, rows = latency_rows(figures)
    assert prefixes == ["a_c1"]
    assert rows["a_c1"] == {
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "ops_s": 900.0,
        "floor_ratio": 0.5,
        "p99_floor_ratio": 1.2,
    }


def _report(tmp_path: Path) -> tuple[BenchConfig, Report]:
    config = BenchConfig(quick=False, work_dir=tmp_path, log=lambda message: None)

    def measure(config: BenchConfig) -> dict[str, Figure]:
        config.add_samples("demo", "c1", [1.0, 2.0, 3.0])
        config.add_curve("demo_curve", Curve("t", "x", "y", {"s": ([1.0, 2.0], [3.0, 4.0])}))
        return {"demo_c1_p50_ms": 1.5, "demo_c1_ops_s": 600.0, "demo_nan_ms": math.nan}

    available = {
        "demo": Benchmark(
            _module("demo", measure, TARGETS=(Target("demo_c1_p50_ms", "<", 2.0, "quick"),))
        )
    }
    return config, run_benchmarks(["demo"], available, config, command="python -m bench run demo")


def test_json_and_markdown_and_table(tmp_path: Path) -> None:
    config, report = _report(tmp_path)
    assert config.samples == {"demo": {"c1": [1.0, 2.0, 3.0]}}
    path = tmp_path / "out" / "bench.json"
    write_json(report, path)
    document = json.loads(path.read_text())
    assert document["command"] == "python -m bench run demo"
    assert document["mode"] == "full"
    assert document["results"]["demo"]["demo_c1_p50_ms"] == 1.5
    assert document["results"]["demo"]["demo_nan_ms"] is None
    assert document["targets"][0]["met"] is True
    assert document["machine"]["nproc"] == str(os.cpu_count())

    markdown = render_markdown(report, {"demo": "How it is measured."}, {}, tmp_path)
    assert "`python -m bench run demo`" in markdown
    assert "How it is measured." in markdown
    assert "| quick | < 2.00 | 1.50 ms | met |" in markdown
    assert "| demo_c1 | 1.50 | 600.0 |" in markdown

    stream = io.StringIO()
    print_report(report, stream)
    text = stream.getvalue()
    assert "[demo] fake demo" in text
    assert "demo_nan_ms" in text


# --- the markdown report keeps what others appended -------------------------------------------


def test_regenerating_the_report_keeps_text_outside_the_markers(tmp_path: Path) -> None:
    _, report = _report(tmp_path)
    path = tmp_path / "docs" / "benchmarks.md"
    write_markdown(report, path, {"demo": "First run."}, {})
    first = path.read_text()
    assert first.startswith(GENERATED_BEGIN + "\n# Benchmarks\n")
    assert first.rstrip("\n").endswith(GENERATED_END)
    appended = "\n## Peers: OpenBao\n\nWritten by someone else.\n"
    path.write_text("Preface kept.\n" + first + appended)

    write_markdown(report, path, {"demo": "Second run."}, {})
    second = path.read_text()
    assert second.startswith("Preface kept.\n" + GENERATED_BEGIN)
    assert "Second run." in second
    assert "First run." not in second
    assert second.endswith(GENERATED_END + "\n" + appended)
    assert second.count(GENERATED_BEGIN) == 1
    assert second.count(GENERATED_END) == 1


def test_merging_into_a_report_written_before_the_markers() -> None:
    legacy = "\n".join(
        [
            "# Benchmarks",
            "",
            "## floor: old figures",
            "",
            "## Adding a benchmark",
            "",
            "A benchmark is a module...",
            "",
            "## Peers (appended by hand)",
            "",
            "Kept.",
        ]
    )
    merged = merge_generated(legacy, "# Benchmarks\n\nnew figures\n")
    assert "old figures" not in merged
    assert "new figures" in merged
    assert merged.endswith(GENERATED_END + "\n\n## Peers (appended by hand)\n\nKept.\n")
    # a generated legacy report with nothing appended leaves nothing behind
    plain = merge_generated(legacy.split("## Peers")[0], "# Benchmarks\n")
    assert plain == f"{GENERATED_BEGIN}\n# Benchmarks\n{GENERATED_END}\n"
    # a file bench/ did not write is never dropped
    foreign = merge_generated("My own notes.\n", "# Benchmarks\n")
    assert foreign.endswith(GENERATED_END + "\n\nMy own notes.\n")
    assert merge_generated(None, "x\n") == f"{GENERATED_BEGIN}\nx\n{GENERATED_END}\n"


# --- parts of the benchmarks that need no domain ------------------------------------------------


def test_keyservice_uses_the_floors_client_at_each_concurrency() -> None:
    floor: dict[str, Figure] = {"echo_1k_c1_client": "async", "echo_1k_c16_client": "sync"}
    assert keyservice.client_for(floor, 1) == "async"
    assert keyservice.client_for(floor, 16) == "sync"
    assert keyservice.client_for({}, 1) == "sync"
    assert keyservice.client_for({}, 16) == "async"


def test_keyservice_targets_name_the_ratios_the_runner_adds() -> None:
    figures: dict[str, Figure] = {}
    for operation in keyservice.TARGETED:
        for concurrency in keyservice.CONCURRENCIES:
            prefix = f"{operation}_c{concurrency}"
            figures |= {f"{prefix}_ops_s": 800.0, f"{prefix}_p99_ms": 3.0}
    add_floor_ratios(
        figures,
        {"echo_1k_c1_ops_s": 1000.0, "echo_1k_c1_p99_ms": 2.0}
        | {"echo_1k_c16_ops_s": 1000.0, "echo_1k_c16_p99_ms": 2.0},
    )
    results = [target.check(figures) for target in keyservice.TARGETS]
    assert len(results) == 2 * len(keyservice.TARGETED) * len(keyservice.CONCURRENCIES)
    assert all(r.measured is not None for r in results)
    throughput = [r for r in results if r.target.figure.endswith("_c1_floor_ratio")]
    assert throughput
    assert all(r.met for r in throughput)  # 0.8 >= 0.8
    p99 = [r for r in results if r.target.figure.endswith("_p99_floor_ratio")]
    assert p99
    assert all(r.met for r in p99)  # 1.5 <= 1.5


def test_keyservice_cell_pools_rounds_and_spreads_calls() -> None:
    cell = keyservice.Cell(server_cpu_s=0.003)
    for latencies, elapsed in (([1_000_000, 2_000_000], 0.01), ([3_000_000, 4_000_000], 0.001)):
        load = LoadResult(concurrency=1, latencies_ns=list(latencies), elapsed=elapsed)
        cell.rounds.append(load)
    figures = cell.figures("encrypt_1k_c1")
    assert figures["encrypt_1k_c1_p50_ms"] == pytest.approx(2.5)
    assert figures["encrypt_1k_c1_ops_s"] == pytest.approx(1100.0)  # median of 200 and 2000
    assert figures["encrypt_1k_c1_server_cpu_us_per_op"] == pytest.approx(750.0)
    with pytest.raises(RuntimeError, match="no encrypt_1k_c1 call succeeded: refused"):
        keyservice.Cell(rounds=[LoadResult(concurrency=1, first_error="refused")]).figures(
            "encrypt_1k_c1"
        )

    calls: list[str] = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def Encrypt(self, request: object, timeout: float) -> None:
            calls.append(self.name)

    class Diagnostics:
        def Echo(self, request: object, timeout: float) -> None:
            calls.append("echo")

    nodes = [{"KeyService": Stub(n), "Diagnostics": Diagnostics()} for n in "abc"]
    operation = keyservice.Operation("encrypt_1k", "Encrypt", services_pb2.EncryptRequest())
    call = keyservice._round_robin(nodes, operation)
    for _ in range(6):
        call()
    assert calls == ["a", "b", "c", "a", "b", "c"]
    floor = keyservice.Operation(
        "echo_1k", "Echo", services_pb2.EchoMessage(), service="Diagnostics"
    )
    keyservice._round_robin(nodes[:1], floor)()
    assert calls[-1] == "echo"


def test_paired_ratios_divide_out_a_machine_that_changes_speed() -> None:
    # The same work on both sides while the machine runs at 1x, 2x and 0.5x speed by round:
    # every round's ratio is 0.5; the ratio of the two medians is not.
    ours = [500.0, 1000.0, 250.0]
    floors = [1000.0, 2000.0, 500.0]
    spread = paired_ratios(zip(ours, floors, strict=True))
    assert spread is not None
    assert (spread.median, spread.low, spread.high) == (0.5, 0.5, 0.5)
    uneven = paired_ratios([(1.0, 2.0), (3.0, 1.0), (1.0, 1.0), (5.0, 0.0), (math.nan, 1.0)])
    assert uneven is not None  # the last two rounds have no usable ratio and are left out
    assert (uneven.median, uneven.low, uneven.high) == (1.0, 0.5, 3.0)
    assert paired_ratios([(1.0, 0.0), (1.0, math.inf)]) is None
    assert paired_ratios([]) is None


def _measured(calls: int, elapsed: float, latency_ms: float, cpu_s: float) -> keyservice.Measured:
    latencies = [int(latency_ms * 1e6)] * calls
    load = LoadResult(concurrency=16, latencies_ns=latencies, elapsed=elapsed)
    return keyservice.Measured(load, cpu_s)


def test_keyservice_floor_ratios_are_taken_round_by_round() -> None:
    # The machine at 1x, half and twice its speed by round: Encrypt does 0.6 of the floor's
    # calls in each round, at 1.5 times its p99 and 2 times its CPU per call.
    pairs = [
        keyservice.FloorPair(
            floor=_measured(1000, 1.0 * slow, 4.0 * slow, 0.25 * slow),
            operation=_measured(600, 1.0 * slow, 6.0 * slow, 0.30 * slow),
        )
        for slow in (1.0, 2.0, 0.5)
    ]
    pairs.append(  # a round with an outlier floor: the median ignores it, the spread shows it
        keyservice.FloorPair(
            floor=_measured(1000, 1.0, 4.0, 0.25), operation=_measured(900, 1.0, 6.0, 0.45)
        )
    )
    figures = keyservice.paired_floor_figures({("encrypt_1k", 16): pairs})
    assert figures["encrypt_1k_c16_floor_ratio"] == pytest.approx(0.6)  # medians: 750 / 1000
    assert figures["encrypt_1k_c16_floor_low_ratio"] == pytest.approx(0.6)
    assert figures["encrypt_1k_c16_floor_high_ratio"] == pytest.approx(0.9)
    assert figures["encrypt_1k_c16_p99_floor_ratio"] == pytest.approx(1.5)
    assert figures["encrypt_1k_c16_cpu_floor_ratio"] == pytest.approx(2.0)
    # The runner adds ratios of medians only where the benchmark gave none itself.
    figures |= {"encrypt_1k_c16_ops_s": 600.0, "create_key_c16_ops_s": 100.0}
    add_floor_ratios(figures, {"echo_1k_c16_ops_s": 500.0})
    assert figures["encrypt_1k_c16_floor_ratio"] == pytest.approx(0.6)  # kept, not 1.2
    assert figures["create_key_c16_floor_ratio"] == pytest.approx(0.2)


def test_keyservice_schedule_puts_a_floor_run_beside_each_targeted_run() -> None:
    def operation(name: str) -> keyservice.Operation:
        return keyservice.Operation(name, "Encrypt", services_pb2.EncryptRequest())

    floor = keyservice.Operation(
        "echo_1k", "Echo", services_pb2.EchoMessage(), service="Diagnostics"
    )
    operations = [operation("encrypt_1k"), operation("decrypt_1k"), operation("create_key")]

    def names(round_: int, with_floor: keyservice.Operation | None) -> list[list[str]]:
        floors = {} if with_floor is None else {"encrypt_1k": with_floor, "decrypt_1k": with_floor}
        groups = keyservice._schedule(operations, floors, round_)
        return [[op.name for op in group] for group in groups]

    assert names(0, floor) == [
        ["echo_1k", "encrypt_1k"],
        ["echo_1k", "decrypt_1k"],
        ["create_key"],  # no target, no floor beside it
    ]
    assert names(1, floor) == [
        ["create_key"],
        ["decrypt_1k", "echo_1k"],
        ["encrypt_1k", "echo_1k"],
    ]
    assert names(0, None) == [["encrypt_1k"], ["decrypt_1k"], ["create_key"]]


def test_keyservice_session_calls_are_paired_with_the_floor_of_sessions() -> None:
    from bench._cluster import BenchDomain

    class _Stub:
        def __init__(self, channel: object) -> None:
            del channel

        def Encrypt(self, request: object, timeout: float) -> object:
            return services_pb2.EncryptResponse(ciphertext_blob=b"blob")

        def CreateKey(self, request: object, timeout: float) -> object:
            return services_pb2.KeyMetadataResponse()

    class _Domain:
        hosts = ("hsa-1",)

        @contextlib.contextmanager
        def node_channel(self, host: str) -> Iterator[object]:
            yield object()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keyservice.services_pb2_grpc, "KeyServiceStub", _Stub)
        domain = cast(BenchDomain, _Domain())
        floors, operations = keyservice._operations(domain, suffix="", full_set=True)
        _, three_nodes = keyservice._operations(domain, suffix="_3node", full_set=False)
    by_name = {op.name: op for op in operations}
    assert by_name["encrypt_1k_session"].session == "encrypt"
    assert by_name["decrypt_1k_session"].session == "decrypt"
    assert floors["encrypt_1k_session"].name == "echo_1k_session"
    assert floors["encrypt_1k_session"].session == keyservice.SESSION_ECHO
    assert floors["decrypt_1k_session"] is floors["encrypt_1k_session"]
    assert {name for name, f in floors.items() if f.name == "echo_1k"} == set(keyservice.TARGETED)
    assert "create_key" not in floors
    assert not any(op.session for op in three_nodes)  # sessions: one node only
    # A session run's pairs give `<op>_session_c<N>_floor_ratio` and the rest.
    pairs = {
        ("encrypt_1k_session", 16): [
            keyservice.FloorPair(
                floor=_measured(1000, 1.0, 4.0, 0.25), operation=_measured(900, 1.0, 6.0, 0.45)
            )
        ]
    }
    figures = keyservice.paired_floor_figures(pairs)
    assert figures["encrypt_1k_session_c16_floor_ratio"] == pytest.approx(0.9)
    assert figures["encrypt_1k_session_c16_p99_floor_ratio"] == pytest.approx(1.5)


def test_kms_latency_figures_follow_the_runner_names() -> None:
    cells = [
        kms_latency.Cell("threads", "encrypt", 16, 100, 0.1, throughput, 2.0, p99, 2.5, 300.0)
        for throughput, p99 in ((900.0, 9.0), (1000.0, 10.0), (1100.0, 30.0))
    ]
    figures = kms_latency.figures_of(cells)
    assert figures["keyclient_encrypt_1k_3node_c16_ops_s"] == 1000.0
    assert figures["keyclient_encrypt_1k_3node_c16_p99_ms"] == 10.0
    assert figures["keyclient_encrypt_1k_3node_c16_client_cpu_us_per_op"] == 300.0
    add_floor_ratios(figures, {"echo_1k_c16_ops_s": 2000.0, "echo_1k_c16_p99_ms": 5.0})
    assert figures["keyclient_encrypt_1k_3node_c16_floor_ratio"] == pytest.approx(0.5)
    assert figures["keyclient_encrypt_1k_3node_c16_p99_floor_ratio"] == pytest.approx(2.0)


def test_kms_latency_compares_keyclient_with_raw_sessions_round_by_round() -> None:
    def cell(mode: str, operation: str, throughput: float, round_: int) -> kms_latency.Cell:
        return kms_latency.Cell(
            mode, operation, 16, 100, 0.1, throughput, 2.0, 3.0, 2.5, 300.0, round=round_
        )

    # Round 2 ran on a machine half as fast: each round's ratio stays 0.8 and 0.9.
    cells = [
        cell("threads", "encrypt", 800.0, 1),
        cell("asyncio-session", "encrypt", 1000.0, 1),
        cell("threads", "encrypt", 450.0, 2),
        cell("asyncio-session", "encrypt", 500.0, 2),
        cell("threads", "encrypt", 1000.0, 3),  # no session cell in round 3: left out
        cell("threads-unary", "decrypt", 500.0, 1),  # no KeyClient-over-session pair
        cell("asyncio-session", "decrypt", 1000.0, 1),
        cell("asyncio-keyclient", "decrypt", 950.0, 1),
    ]
    figures = kms_latency.figures_of(cells)
    assert figures["keyclient_over_session_raw_encrypt_c16_ratio"] == pytest.approx(0.85)
    assert figures["keyclient_over_session_raw_encrypt_c16_low_ratio"] == pytest.approx(0.8)
    assert figures["keyclient_over_session_raw_encrypt_c16_high_ratio"] == pytest.approx(0.9)
    assert not any(key.startswith("keyclient_over_session_raw_decrypt") for key in figures)
    assert figures["async_keyclient_over_session_raw_decrypt_c16_ratio"] == pytest.approx(0.95)
    # Every mode has its figure name; the unary KeyClient and raw sessions among them.
    assert figures["async_session_raw_encrypt_1k_3node_c16_ops_s"] == 750.0
    assert figures["keyclient_unary_decrypt_1k_3node_c16_ops_s"] == 500.0
    assert set(kms_latency.FIGURE_MODES) == set(kms_latency.MODES)
    assert kms_latency.FIGURE_MODES["threads"] == "keyclient"  # KeyClient's default: sessions
    # Quick runs measure exactly what the ratios need, and the targets read those ratios.
    assert {kms_latency.FIGURE_MODES[m] for m in kms_latency.QUICK_MODES} == {
        "keyclient",
        "async_session_raw",
        "async_keyclient",
    }
    assert {t.figure: t.check(figures).met for t in kms_latency.TARGETS} == {
        "keyclient_over_session_raw_encrypt_c16_ratio": False,  # 0.85 < 0.9
        "keyclient_over_session_raw_decrypt_c16_ratio": None,  # not measured
        "async_keyclient_over_session_raw_encrypt_c16_ratio": None,
        "async_keyclient_over_session_raw_decrypt_c16_ratio": True,  # 0.95
    }


def test_raw_aes_gcm_baseline_round_trips_and_detects_tampering(tmp_path: Path) -> None:
    from cryptography.exceptions import InvalidTag

    plain = tmp_path / "plain"
    data = os.urandom(3 * envelope.CHUNK_BYTES + 123)
    plain.write_bytes(data)
    key, prefix = os.urandom(32), os.urandom(8)
    sealed, opened = tmp_path / "sealed", tmp_path / "opened"
    envelope.raw_encrypt(plain, sealed, key, prefix)
    assert sealed.stat().st_size == len(data) + 4 * 16  # four chunks, a tag each
    envelope.raw_decrypt(sealed, opened, key, prefix)
    assert opened.read_bytes() == data
    tampered = bytearray(sealed.read_bytes())
    tampered[envelope.CHUNK_BYTES + 40] ^= 1
    sealed.write_bytes(bytes(tampered))
    with pytest.raises(InvalidTag):
        envelope.raw_decrypt(sealed, opened, key, prefix)


def test_audit_append_runs_as_a_runner_module(tmp_path: Path) -> None:
    config = BenchConfig(quick=True, work_dir=tmp_path, log=lambda message: None)
    figures = Benchmark(audit_append).run(config)
    assert figures["records"] == 5_000
    # Background checkpoints (as the HSA's): at least one per 1000 records that waited for
    # the log's thread, and the last on close; how many depends on when that thread ran.
    assert 1 <= int(figures["checkpoints"]) <= 5 + 1 + 10
    for name in ("append_1_thread_per_s", "append_4_threads_per_s", "verify_records_per_s"):
        value = figures[name]
        assert isinstance(value, float)
        assert value > 0
    assert 200 < float(figures["record_bytes"]) < 1000


def test_idle_streams_figures_take_ratios_round_by_round() -> None:
    def phase(p99_ms: float, errors: int = 0) -> idle_streams.Phase:
        # 100 calls: 98 fast ones and two slow ones, so that p99 lies between them.
        return idle_streams.Phase([1.0] * 98 + [p99_ms, p99_ms], errors, "x" if errors else "")

    rounds = [
        idle_streams.Round(
            quiet={op: phase(2.0 * slow) for op in idle_streams.OPERATIONS},
            streams={op: phase(2.0 * slow) for op in idle_streams.OPERATIONS},
            attack={op: phase(3.0 * slow, errors=1) for op in idle_streams.OPERATIONS},
            streams_open=8,
            reads={"reads": 1000.0 * slow, "errors": 1.0, "seconds": 2.0},
        )
        for slow in (1.0, 4.0, 0.5)  # the machine's speed changes between rounds
    ]
    figures = idle_streams.figures_of(rounds)
    assert figures["encrypt_1k_quiet_p99_ms"] == pytest.approx(2.0)  # median of 2, 8, 1
    assert figures["encrypt_1k_attack_p99_ratio"] == pytest.approx(1.5)
    assert figures["create_key_streams_p99_ratio"] == pytest.approx(1.0)
    assert figures["create_key_attack_errors"] == 3
    assert figures["create_key_attack_first_error"] == "x"
    assert figures["unauthenticated_reads_per_s"] == pytest.approx(5500.0 / 6.0, abs=0.1)
    assert figures["unauthenticated_read_errors"] == 3
    assert figures["idle_streams_open"] == 8
    targets = [target.check(figures) for target in idle_streams.TARGETS]
    assert [result.met for result in targets] == [True, True]
    result = _bench_cli("--help", module="bench.idle_streams")
    assert result.returncode == 0, result.stderr
    assert "--json" in result.stdout


def test_the_quota_benchmark_measures_every_cell() -> None:
    from bench import quotas

    figures = quotas.measure(400)
    cells = [k for k in figures if k.startswith("admit_us_")]
    assert len(cells) == 4
    assert all(0 < float(figures[k]) < 10_000 for k in cells)
