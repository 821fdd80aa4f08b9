"""The real `hsm-domain chaos` against a fresh domain with three coordinator replicas on a real
three-member etcd cluster: replica and etcd faults beside the HSA faults.

The command runs as a subprocess, exactly as a user runs it, on a domain made by
`init_domain(coordinators=3)`: it starts the etcd members, the replicas (each with its etcd
traffic through proxies of its own) and three HSAs as real processes, drives the data plane
(CreateKey with idempotency keys, RotateKey among them) and quorum-approved domain changes
through every replica's address, and kills (the leader included, asked of etcd), pauses and
cuts replicas off from etcd, kills etcd members, kills, pauses and cuts HSAs; then it backs the
store up, verifies it from the genesis, and checks every invariant against the history, the
nodes and the store. The test asserts that it exits 0, that every invariant held and checked
something (a quorum change submitted while the leader was killed completed among them), that
every fault type was injected, and that it left nothing behind.

Runtime: about 65-80 s on 2 cores (50 s of faults, the start of etcd, three replicas and three
HSAs, the final checks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.chaos_runs import INVARIANTS, processes_using, run_chaos

from deploy import cluster
from deploy.chaos.history import read_history
from deploy.init import DomainLayout, init_domain, load_layout
from deploy.localdomain import FAST_SCRYPT_N

pytestmark = [pytest.mark.chaos, pytest.mark.etcd]

REPLICA_FAULTS = ("replica-kill", "replica-pause", "etcd-kill", "etcd-cut")
FAULTS = ("kill", "pause", "partition", *REPLICA_FAULTS)
STORE_INVARIANTS = {
    "changes-durable",
    "key-records-durable",
    "applied-once",
    "leader-kill-changes-complete",
}


@pytest.fixture
def replicated(tmp_path: Path, etcd_bin: str) -> Iterator[DomainLayout]:
    """A fresh domain: 3 HSAs, replicas coordinator-1..3 on a 3-member etcd cluster."""
    layout = init_domain(tmp_path / "domain", coordinators=3, scrypt_n=FAST_SCRYPT_N)
    try:
        yield layout
    finally:
        cluster.stop_recorded(layout, grace=1.0)
        for pid in processes_using(layout.root):
            cluster.stop_pid(pid, grace=0.5)


def test_chaos_with_replica_and_etcd_faults_keeps_every_invariant(
    replicated: DomainLayout, tmp_path: Path
) -> None:
    configs = [*replicated.node_configs.values()]
    configs += [replicated.coordinator_config_of(n) for n in replicated.coordinators]
    before = {p: p.read_bytes() for p in configs}
    report_file = tmp_path / "report.json"
    result = run_chaos(
        replicated.root,
        "--duration",
        "50",
        "--seed",
        "11",
        "--fault-interval",
        "1.5",
        "--clients",
        "2",
        "--think-time",
        "0.02",
        "--control-interval",
        "1.5",
        "--json",
        report_file,
    )
    print(result.stdout)  # the report, shown with -s or on failure
    assert result.returncode == 0, result.stdout
    assert "result: every invariant held" in result.stdout
    assert "3 coordinator replicas, 3 etcd members" in result.stdout

    report = json.loads(report_file.read_text())
    assert report["all_invariants_held"] is True
    verdicts = {i["name"]: i for i in report["invariants"]}
    assert set(verdicts) == INVARIANTS | STORE_INVARIANTS
    assert all(v["held"] for v in verdicts.values()), verdicts
    for name in STORE_INVARIANTS | {"versions-in-chain", "keys-work", "ciphertexts-decrypt"}:
        assert verdicts[name]["checked"] > 0, verdicts[name]
    assert report["coordinators"] == ["coordinator-1", "coordinator-2", "coordinator-3"]
    assert report["etcd_members"] == ["etcd-1", "etcd-2", "etcd-3"]
    assert report["fault_types"] == list(FAULTS)
    for kind in FAULTS:
        assert report["faults"][kind] >= 1, report["faults"]
    assert report["leader_faults"].get("replica-kill", 0) >= 1, report["leader_faults"]
    assert report["unhealed"] == []
    assert report["crashed_threads"] == []
    for op in ("create_key", "rotate_key", "rotate-domain-key", "encrypt", "decrypt"):
        assert report["operations"][op]["ok"] > 0, report["operations"]

    # The history: leader kills, the store read back, nothing secret.
    events = list(read_history(Path(report["history"])))
    kills = [e["args"] for e in events if e["op"] == "kill-replica"]
    assert any(k["leader"] for k in kills)
    stored = [e["args"] for e in events if e["process"] == "final" and e["op"] == "store"]
    assert stored == [{"backup": str(replicated.chaos_dir / "store-11.hsmbk"), "error": ""}]
    assert (replicated.chaos_dir / "store-11.hsmbk").exists()
    creates = [e for e in events if e["op"] == "create_key" and e["phase"] == "invoke"]
    assert all(e["args"].get("idempotency_key") for e in creates if e["process"] != "setup")
    for event in events:
        assert "plaintext" not in event["args"]
        assert "plaintext" not in event["result"]
        assert "data_key" not in event["result"]

    # Nothing left behind: no process, no pid file, every config as it was.
    assert processes_using(replicated.root) == []
    assert cluster.live_pids(load_layout(replicated.root)) == {}
    assert not any(replicated.run_dir.glob("*.pid"))
    assert {p: p.read_bytes() for p in configs} == before
    assert not list(replicated.chaos_dir.glob("*.config.json"))
    assert not list(replicated.chaos_dir.glob("operators-*"))


def test_fault_types_that_do_not_fit_the_domain_are_usage_errors(
    replicated: DomainLayout, tmp_path: Path
) -> None:
    result = run_chaos(replicated.root, "--faults", "kill,coordinator", timeout=60)
    assert result.returncode == 2, result.stdout
    assert "are for a domain with one coordinator" in result.stdout
    single = init_domain(tmp_path / "single", scrypt_n=FAST_SCRYPT_N)
    result = run_chaos(single.root, "--faults", "etcd-kill", timeout=60)
    assert result.returncode == 2, result.stdout
    assert "need coordinator replicas on etcd" in result.stdout
    assert not replicated.chaos_dir.exists()
    assert not single.chaos_dir.exists()
