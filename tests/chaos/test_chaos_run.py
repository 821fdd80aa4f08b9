"""The real `hsm-domain chaos` against a fresh local domain: 30 s of every fault type.

The command runs as a subprocess, exactly as a user runs it, on a domain made by
`init_domain`: it starts the coordinator and three HSAs as real processes behind its TCP
proxies, drives Encrypt/Decrypt/GenerateDataKey/CreateKey from two clients and quorum-approved
domain changes, kills, pauses and restarts HSAs, kills and restarts the coordinator, cuts links,
then checks its invariants. The test asserts that it exits 0, that its JSON report says every
invariant held and every fault type was injected, that it did real work, that its history
holds no secret, and that it left nothing behind (no process, no pid file, configs as before).

Two short cases check the usage errors (exit 2) and the refusal of a domain that `up` started
(nothing touched, `down` still stops it).
Runtime: about 45-55 s for the first case (30 s of faults, start, final checks), 2 s for the
second, on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.chaos_runs import INVARIANTS, hsm_domain, processes_using, run_chaos

from deploy import cluster
from deploy.chaos.history import read_history
from deploy.init import COORDINATOR_NAME, DomainLayout, init_domain, load_layout
from deploy.localdomain import FAST_SCRYPT_N

pytestmark = pytest.mark.chaos

FAULT_TYPES = ("kill", "pause", "coordinator", "partition")


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[DomainLayout]:
    """A fresh 3-node domain; whatever a failed run left running is stopped afterwards."""
    layout = init_domain(tmp_path / "domain", scrypt_n=FAST_SCRYPT_N)
    try:
        yield layout
    finally:
        cluster.stop_recorded(layout, grace=1.0)
        for pid in processes_using(layout.root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def test_chaos_run_with_every_fault_type_keeps_every_invariant(
    domain: DomainLayout, tmp_path: Path
) -> None:
    configs_before = {p: p.read_bytes() for p in domain.node_configs.values()}
    report_file = tmp_path / "report.json"
    result = run_chaos(
        domain.root,
        "--duration",
        "30",
        "--seed",
        "7",
        "--faults",
        ",".join(FAULT_TYPES),
        "--clients",
        "2",
        "--think-time",
        "0.02",
        "--json",
        report_file,
    )
    print(result.stdout)  # the report, shown with -s or on failure
    assert result.returncode == 0, result.stdout
    assert "result: every invariant held" in result.stdout
    assert "chaos " in result.stdout  # the progress display

    report = json.loads(report_file.read_text())
    assert report["all_invariants_held"] is True
    verdicts = {i["name"]: i for i in report["invariants"]}
    assert set(verdicts) == INVARIANTS
    assert all(v["held"] for v in verdicts.values()), verdicts
    assert verdicts["ciphertexts-decrypt"]["checked"] > 0
    assert verdicts["keys-work"]["checked"] > 0
    assert verdicts["versions-in-chain"]["checked"] > 0
    assert verdicts["versions-monotonic"]["checked"] > 0
    assert report["seed"] == 7
    assert report["fault_types"] == list(FAULT_TYPES)
    for kind in FAULT_TYPES:
        assert report["faults"][kind] >= 1, report["faults"]
    assert report["unhealed"] == []
    assert report["crashed_threads"] == []
    outcomes = report["outcomes"]
    assert report["operations_total"] == sum(outcomes.values()) > 0
    assert outcomes["ok"] > 0
    for op in ("encrypt", "decrypt", "generate_data_key", "create_key", "rotate-domain-key"):
        assert report["operations"][op]["ok"] > 0, report["operations"]
    assert report["convergence_seconds"] is not None
    assert report["final_version"] > 1

    # The history: every operation, every fault, nothing secret.
    history = Path(report["history"])
    assert history == domain.root / "chaos" / "history-7.jsonl"
    events = list(read_history(history))
    assert sum(1 for e in events if e["phase"] == "invoke") == report["operations_total"]
    nemesis = [e["op"] for e in events if e["process"] == "nemesis"]
    assert nemesis.count("kill") == report["faults"]["kill"]
    for event in events:
        assert "plaintext" not in event["args"]
        assert "plaintext" not in event["result"]
        assert "data_key" not in event["result"]

    # Nothing left behind.
    assert processes_using(domain.root) == []
    assert cluster.live_pids(load_layout(domain.root)) == {}
    assert not any(domain.run_dir.glob("*.pid"))
    assert {p: p.read_bytes() for p in domain.node_configs.values()} == configs_before
    assert not list((domain.root / "chaos").glob("operators-*"))


def test_usage_errors_exit_2(domain: DomainLayout) -> None:
    for args in (
        ["--faults", "kill,meteor"],
        ["--duration", "0"],
        ["--fault-duration", "3", "1"],
        ["--min-availability", "2"],
    ):
        result = run_chaos(domain.root, *args, timeout=60)
        assert result.returncode == 2, (args, result.stdout)
    assert "unknown fault type(s) meteor" in run_chaos(domain.root, "--faults", "meteor").stdout


def test_a_running_domain_is_refused_before_anything_is_touched(domain: DomainLayout) -> None:
    """Issue 13, item 12: on a domain `up` started, chaos printed "stopping the domain",
    failed, and removed the pid files of the four processes it left running. It must refuse
    with one line, touching nothing, and `down` must still stop everything."""
    up = subprocess.run(
        [hsm_domain(), "up", str(domain.root), "--detach"],
        capture_output=True,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        timeout=120,
        check=False,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    running = cluster.live_pids(domain)
    assert sorted(running) == [COORDINATOR_NAME, "hsa-1", "hsa-2", "hsa-3"]
    files = {p: p.read_bytes() for p in domain.run_dir.iterdir()}

    result = run_chaos(domain.root, "--duration", "1", "--seed", "3", timeout=60)
    assert result.returncode == 1, result.stdout
    assert result.stdout.count("\n") == 1, result.stdout
    assert result.stdout.startswith("hsm-domain: error: ")
    assert "is running already" in result.stdout
    assert f"stop it first: hsm-domain down {domain.root}" in result.stdout
    assert "stopping" not in result.stdout
    # Untouched: the same processes, the same run files, no chaos directory.
    assert cluster.live_pids(domain) == running
    assert {p: p.read_bytes() for p in domain.run_dir.iterdir()} == files
    assert not (domain.root / "chaos").exists()

    down = subprocess.run(
        [hsm_domain(), "down", str(domain.root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped 4 processes" in down.stdout
    assert processes_using(domain.root) == []
    assert cluster.live_pids(domain) == {}
