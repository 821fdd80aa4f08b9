"""Smoke test of bench/profile_keyservice.py: its in-process mode and its table.

The figures are never asserted (they measure); this checks that the script still drives the
real key service (a failing Encrypt or Decrypt would raise) and writes what it promises. The
gRPC mode needs a running domain and is exercised by running the script, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import profile_keyservice

pytestmark = pytest.mark.unit


def test_in_process_mode_runs_the_real_key_service(tmp_path: Path) -> None:
    out = tmp_path / "inprocess.json"
    assert profile_keyservice.main(["--in-process", "20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    figures = result["figures"]
    for operation in ("encrypt", "decrypt"):
        assert figures[f"{operation}_cpu_us_per_call_best"] > 0
        assert (
            figures[f"{operation}_cpu_us_per_call_median"]
            >= (figures[f"{operation}_cpu_us_per_call_best"])
        )
    assert result["settings"]["calls_per_repeat"] == 20


def test_the_table_gives_ratios_to_the_floor() -> None:
    summary = {"ops_s": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0, "server_cpu_us_per_op": 300.0}
    result = {
        "figures": {
            "echo_c16": {**summary, "errors": 0},
            "encrypt_c16": {
                **summary,
                "ops_s": 800.0,
                "errors": 0,
                "throughput_ratio": 0.8,
                "p99_ratio": 1.25,
            },
        }
    }
    table = profile_keyservice.render(result).splitlines()
    assert table[2].startswith("| echo | 16 | 1,000 |")
    assert "| floor | floor |" in table[2]
    assert "| 0.80 | 1.25 | 0 |" in table[3]
