"""A local HA domain: coordinator replicas on a 3-member etcd cluster (issue 15, item 3).

Real processes: the system's `etcd` (three members), `domain-coordinator` replicas
coordinator-1..3, three HSAs. One test drives everything through the installed commands as a
person would (`hsm-domain init --coordinators 3`, `up`, `status`, `hsm-operator`, `hsm-kms`,
kill -9 of the leader and of an etcd member, `up` again, `down`); the other uses `LocalCluster`
with in-process clients made before the faults, and measures the failover (printed with `-s`):
from the leader's kill -9 to the next successful quorum change and CreateKey.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.cluster import LocalCluster, local_cluster
from support.tools import run_tool

from deploy import cluster as runner
from deploy.init import DomainLayout, load_layout
from domain_core.changes import set_settings
from domain_core.pki import SpiffeId
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.client import CoordinatorClient
from domain_edge.kms_client import KeyClient
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.etcd]
__all__ = ["local_cluster"]

TIMEOUT = 120.0
REPLICAS = ["coordinator-1", "coordinator-2", "coordinator-3"]
MEMBERS = ["etcd-1", "etcd-2", "etcd-3"]


def run(
    name: str, *args: str | Path, directory: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_tool(name, *args, cluster=directory, timeout=TIMEOUT)


def ok(name: str, *args: str | Path, directory: Path | None = None) -> str:
    result = run(name, *args, directory=directory)
    assert result.returncode == 0, f"{name} {args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def status(directory: Path) -> tuple[int, dict[str, Any]]:
    result = run("hsm-domain", "status", directory, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def replicas(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in report["processes"] if p["kind"] == "coordinator"}


def leaders(report: dict[str, Any]) -> list[str]:
    return [name for name, p in replicas(report).items() if p["leader"]]


def pid_of(directory: Path, name: str) -> int:
    return int((directory / "run" / f"{name}.pid").read_text())


def our_processes(directory: Path) -> list[int]:
    """Every process whose command line names a file under `directory` (etcd members, the
    replicas and the HSAs all do: a data directory or a config)."""
    found = []
    marker = str(directory).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            if any(a.startswith(marker) for a in arguments) and runner.is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture
def ha_directory(tmp_path: Path, etcd_bin: str) -> Iterator[Path]:
    """A directory for a domain the test starts with `hsm-domain up`; whatever still runs of
    it afterwards is stopped (`down`, then SIGKILL to every process that names it)."""
    directory = tmp_path / "ha"
    yield directory
    if (directory / "domain.json").exists():
        run("hsm-domain", "down", directory)
    for pid in our_processes(directory):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def operators(directory: Path, name: str) -> tuple[str, ...]:
    operators_dir = directory / "operators"
    return (
        "--token",
        str(operators_dir / f"{name}.token"),
        "--passphrase-file",
        str(operators_dir / f"{name}.passphrase"),
    )


def quorum_change_by_cli(directory: Path, generations: int) -> None:
    """alice proposes a settings change, bob approves (2 of 3) and waits until it applied."""
    proposed = json.loads(
        ok(
            "hsm-operator", "--json", "propose", "set-settings",
            "--generations-retained", str(generations), *operators(directory, "alice"), "--yes",
            directory=directory,
        )
    )  # fmt: skip
    out = ok(
        "hsm-operator", "approve", proposed["proposal_id"], *operators(directory, "bob"),
        "--yes", "--wait", directory=directory,
    )  # fmt: skip
    assert "applied" in out, out


def key_round_trip_by_cli(directory: Path, work: Path, label: str) -> None:
    key_id = ok("hsm-kms", "create-key", "--description", label, directory=directory).strip()
    plain = work / f"{label}.txt"
    plain.write_bytes(f"secret of {label}".encode())
    blob = work / f"{label}.blob"
    ok("hsm-kms", "encrypt", "--key-id", key_id, "--in", plain, "--out", blob, directory=directory)
    back = ok("hsm-kms", "decrypt", "--in", blob, directory=directory)
    assert back == plain.read_text()


def test_hsm_domain_runs_a_replicated_domain(ha_directory: Path, tmp_path: Path) -> None:
    directory = ha_directory
    created = json.loads(ok("hsm-domain", "init", directory, "--coordinators", "3", "--json"))
    assert list(created["coordinators"]) == REPLICAS
    assert created["store"] == "etcd"

    out = ok("hsm-domain", "up", directory, "--detach", "--timeout", "90")
    assert "etcd: 3/3 members healthy" in out
    assert "leads the coordinator replicas" in out
    assert "3/3 nodes healthy on version 1" in out
    code, report = status(directory)
    assert code == 0, report
    assert sorted(replicas(report)) == REPLICAS
    assert all(p["healthy"] and p["version"] == 1 for p in replicas(report).values())
    assert leaders(report) == [report["etcd"]["replica_leader"]]
    assert [(m["name"], m["healthy"]) for m in report["etcd"]["members"]] == [
        (m, True) for m in MEMBERS
    ]
    layout = load_layout(directory)
    addresses = {runner.read_ready_file(layout.ready_file(n)).address for n in REPLICAS}  # type: ignore[union-attr]
    for host in layout.node_configs:
        config = json.loads(layout.node_config(host).read_text())
        assert set(config["coordinator"].split(",")) == addresses
        assert len(config["coordinator_fingerprints"]) == 3

    work = tmp_path / "work"
    work.mkdir()
    quorum_change_by_cli(directory, 8)
    key_round_trip_by_cli(directory, work, "before")

    # kill -9 the leader: another replica leads within seconds, and the tools fail over.
    leader = leaders(report)[0]
    os.killpg(pid_of(directory, leader), signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        code, report = status(directory)
        if leaders(report) and leaders(report)[0] != leader:
            break
        assert time.monotonic() - killed_at < 30, report
        time.sleep(0.2)
    took = time.monotonic() - killed_at
    print(f"\nhsm-domain status names another leader {took:.1f} s after the kill -9")
    assert code == 1  # a replica is down
    assert not replicas(report)[leader]["running"]
    quorum_change_by_cli(directory, 9)
    key_round_trip_by_cli(directory, work, "after-leader-kill")

    # kill -9 one etcd member: two of three are a majority, everything still works.
    member = "etcd-2"
    os.killpg(pid_of(directory, member), signal.SIGKILL)
    key_round_trip_by_cli(directory, work, "after-member-kill")
    quorum_change_by_cli(directory, 10)
    code, report = status(directory)
    assert code == 1
    assert {m["name"]: m["healthy"] for m in report["etcd"]["members"]} == {
        "etcd-1": True,
        "etcd-2": False,
        "etcd-3": True,
    }

    # `up` starts exactly what is not running: the etcd member, then the replica.
    out = ok("hsm-domain", "up", directory, "--detach", "--json")
    assert sorted(json.loads(out)["started"]) == sorted([member, leader])
    code, report = status(directory)
    assert code == 0, report
    assert all(p["version"] == 4 for p in replicas(report).values())
    assert len(leaders(report)) == 1

    # A backup while everything runs (a consistent etcd snapshot at one revision).
    backup = tmp_path / "ha.backup"
    taken = json.loads(ok("hsm-domain", "backup", directory, backup, "--json"))
    assert taken["newest_version"] == 4

    # `down` stops every process: HSAs, replicas, etcd members.
    out = ok("hsm-domain", "down", directory)
    assert "stopped 9 processes" in out
    order = [line.split()[0] for line in out.splitlines() if "(pid " in line]
    kinds = [name.rpartition("-")[0] for name in order]
    assert kinds == ["hsa"] * 3 + ["coordinator"] * 3 + ["etcd"] * 3, order
    assert our_processes(directory) == []

    # The etcd cluster is lost whole. `restore` starts a fresh one on the domain's ports, loads
    # the backup into it, and stops the members it started; `up` serves the restored store.
    lost = tmp_path / "lost-etcd"
    lost.mkdir()
    for name in MEMBERS:
        (directory / "etcd" / name).rename(lost / name)
    restored = json.loads(ok("hsm-domain", "restore", directory, backup, "--json"))
    assert restored["keys_behind"] == []
    assert our_processes(directory) == []
    again = run("hsm-domain", "restore", directory, backup)
    assert again.returncode == 1
    assert "is not empty" in again.stderr
    assert "move DIR/etcd/etcd-*/ aside" in again.stderr
    assert our_processes(directory) == []
    ok("hsm-domain", "up", directory, "--detach", "--timeout", "90")
    code, report = status(directory)
    assert code == 0, report
    assert all(p["version"] == 4 for p in replicas(report).values())
    back = ok("hsm-kms", "decrypt", "--in", work / "before.blob", directory=directory)
    assert back == "secret of before"
    key_round_trip_by_cli(directory, work, "after-restore")
    ok("hsm-domain", "down", directory)
    assert our_processes(directory) == []


# --- in-process clients, measured failover ---------------------------------------------------


@pytest.fixture
def replicated(local_cluster: Callable[..., LocalCluster], etcd_bin: str) -> LocalCluster:
    return local_cluster(coordinators=3, start_timeout=90.0)


def key_client(cluster: LocalCluster) -> KeyClient:
    tls = cluster.client_tls()
    return KeyClient(
        list(cluster.node_addresses().values()),
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=10,
    )


def quorum_change(cluster: LocalCluster, client: CoordinatorClient, generations: int) -> int:
    """alice proposes a settings change, bob approves (2 of 3); the applied version."""
    settings = client.latest_state().manifest.message.settings
    change = set_settings(base=settings, key_generations_retained=generations)
    view = client.propose([change], cluster.operator_signer("alice"))
    view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    return view.applied_version


def issued(layout: DomainLayout, name: str) -> transport.TlsMaterial:
    """A certificate the domain CA issues now for `spiffe://local/coordinator/<name>`."""
    ca = load_domain_ca(layout.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(SpiffeId("local", "coordinator", name), key.public_key(), now=datetime.now(UTC))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return transport.TlsMaterial(layout.ca_cert.read_bytes(), cert, key_pem)


def install_head(cluster: LocalCluster, tls: transport.TlsMaterial) -> grpc.StatusCode:
    """InstallState of the HSA's own head on hsa-1, as the holder of `tls`."""
    with cluster.coordinator_client() as client:
        head = client.latest_state()
    channel = transport.mtls_channel(cluster.address("hsa-1"), tls, transport.hsa_host("hsa-1"))
    with channel:
        admin = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        try:
            admin.InstallState(services_pb2.InstallStateRequest(state=head.message), timeout=10)
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_every_replica_administers_the_hsas_and_no_twin_certificate_does(
    replicated: LocalCluster,
) -> None:
    """An attacker who has the domain CA issue another `coordinator/coordinator` certificate
    (the replicas' one SPIFFE id) is refused by every HSA: nodes pin the replicas' own
    certificates, all of them, so whichever replica leads may push."""
    layout = replicated.layout
    for name in REPLICAS:
        own = transport.TlsMaterial.from_files(
            layout.ca_cert, layout.coordinator_cert_of(name), layout.coordinator_key_of(name)
        )
        assert install_head(replicated, own) == grpc.StatusCode.OK, name
    for name in ("coordinator", "coordinator-1"):
        assert install_head(replicated, issued(layout, name)) == grpc.StatusCode.PERMISSION_DENIED


def test_the_clients_fail_over_when_the_leader_dies_and_when_an_etcd_member_dies(
    replicated: LocalCluster,
) -> None:
    cluster = replicated
    assert sorted(cluster.layout.coordinators) == REPLICAS
    first = cluster.wait_for_leader()
    with cluster.coordinator_client(timeout=15) as operators, key_client(cluster) as keys:
        assert quorum_change(cluster, operators, 8) == 2
        before = keys.create_key("before")
        blob = keys.encrypt(before.key_id, b"kept across the failover")

        # kill -9 the leader; the clients made before go on at once, through the others.
        killed = cluster.kill_replica("leader")
        assert killed == first
        killed_at = time.monotonic()
        assert quorum_change(cluster, operators, 9) == 3
        changed_after = time.monotonic() - killed_at
        created = keys.create_key("after the leader's death")
        created_after = time.monotonic() - killed_at
        leader = cluster.wait_for_leader(other_than=killed)
        led_after = time.monotonic() - killed_at
        print(
            f"\nfailover after kill -9 of {killed}: {leader} leads after {led_after:.2f} s; "
            f"quorum change applied after {changed_after:.2f} s; CreateKey after "
            f"{created_after:.2f} s"
        )
        assert led_after < 15
        assert keys.decrypt(blob) == b"kept across the failover"
        assert keys.decrypt(keys.encrypt(created.key_id, b"x")) == b"x"

        # A replica restarted after its death joins as a follower; the leader stays.
        cluster.start_coordinator(killed)
        assert cluster.leader() == leader

        # One etcd member dies: the other two are a majority; nothing is refused.
        cluster.kill_etcd_member("etcd-1")
        assert quorum_change(cluster, operators, 10) == 4
        again = keys.create_key("one etcd member down")
        assert keys.decrypt(keys.encrypt(again.key_id, b"y")) == b"y"
        cluster.start_etcd()

        # A paused leader loses the lead once its lease lapses; another takes over.
        paused = cluster.pause_replica("leader")
        successor = cluster.wait_for_leader(other_than=paused)
        cluster.resume_replica(paused)
        assert cluster.leader() == successor
    cluster.wait_converged(hosts=tuple(cluster.hosts))
