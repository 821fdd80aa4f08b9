"""`hsm-domain up DIR --detach` to all-healthy, with the real executable, in a fresh directory.

Each run creates the domain (3 nodes, 3 operators, quorum 2: init's CA, identities, operator
tokens with the default scrypt cost, genesis ceremony), starts the coordinator and the nodes,
and exits once every node is healthy on one version; then `hsm-domain down DIR` stops it.
- `startup_up_to_healthy_median_s`: wall clock from spawning `hsm-domain up` to its exit
  (interpreter start, init, processes started, all healthy);
- `startup_processes_to_healthy_median_s`: what `up --json` reports itself
  (`seconds_to_healthy`: from starting the coordinator to all nodes healthy);
- `startup_down_median_s`: `hsm-domain down` to exit.
Median of 5 runs (1 in quick mode). A run that leaves processes behind is cleaned up with the
pid files `up` wrote (`deploy.cluster.stop_recorded`), whatever happened.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from bench._core import BenchConfig, BenchError, Figure
from bench._stats import median
from deploy import cluster as runner
from deploy.init import load_layout
from domain_edge.layout import DomainPaths

NAME: Final = "startup"
TITLE: Final = "hsm-domain up (fresh directory, 3 nodes) to all-healthy, and down"

UP_TIMEOUT: Final = 180.0
DOWN_TIMEOUT: Final = 60.0

__all__ = ["NAME", "TITLE", "hsm_domain_executable", "run"]


def hsm_domain_executable() -> str:
    """The installed `hsm-domain` console script (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "hsm-domain"
    if beside.exists():
        return str(beside)
    found = shutil.which("hsm-domain")
    if found is None:
        raise BenchError(
            "the hsm-domain executable is not installed; run `pip install -e .` in the repository"
        )
    return found


def _cleanup(directory: Path) -> None:
    """Stop whatever `up` left running in `directory` (by its pid files)."""
    if DomainPaths(directory).domain_file.exists():
        runner.stop_recorded(load_layout(directory), grace=3.0)


def _one_run(executable: str, directory: Path) -> dict[str, float]:
    began = time.perf_counter()
    up = subprocess.run(
        [executable, "up", str(directory), "--detach", "--json", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
        check=False,
    )
    up_s = time.perf_counter() - began
    if up.returncode != 0:
        raise BenchError(f"hsm-domain up exited with {up.returncode}: {up.stderr.strip()[-500:]}")
    try:
        reported = float(json.loads(up.stdout)["seconds_to_healthy"])
    except (ValueError, KeyError, TypeError) as error:
        raise BenchError(f"hsm-domain up --json printed no seconds_to_healthy ({error})") from None
    began = time.perf_counter()
    down = subprocess.run(
        [executable, "down", str(directory)],
        capture_output=True,
        text=True,
        timeout=DOWN_TIMEOUT,
        check=False,
    )
    down_s = time.perf_counter() - began
    if down.returncode != 0:
        raise BenchError(f"hsm-domain down exited with {down.returncode}: {down.stderr[-500:]}")
    return {"up_to_healthy_s": up_s, "processes_to_healthy_s": reported, "down_s": down_s}


def run(config: BenchConfig) -> dict[str, Figure]:
    """Median of `up` to healthy and `down` over fresh directories."""
    executable = hsm_domain_executable()
    repetitions = int(config.pick(1, 5))
    runs: list[dict[str, float]] = []
    for repetition in range(repetitions):
        directory = config.directory("startup")
        try:
            timings = _one_run(executable, directory)
        finally:
            _cleanup(directory)
        runs.append(timings)
        config.log(
            f"   run {repetition + 1}: up to healthy {timings['up_to_healthy_s']:.2f} s "
            f"(processes {timings['processes_to_healthy_s']:.2f} s), "
            f"down {timings['down_s']:.2f} s"
        )
    figures: dict[str, Figure] = {"startup_runs": repetitions, "startup_nodes": 3}
    for key in runs[0]:
        values = [r[key] for r in runs]
        figures[f"startup_{key.removesuffix('_s')}_median_s"] = median(values)
        figures[f"startup_{key.removesuffix('_s')}_max_s"] = max(values)
    config.add_samples(
        "startup", "hsm-domain up to healthy", [r["up_to_healthy_s"] * 1000 for r in runs]
    )
    return figures
