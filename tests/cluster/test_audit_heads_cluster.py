"""The audit log of a stopped HSA cut back or deleted, against real processes (issue 13, 6).

An attacker with the HSA's disk cuts `audit.log` back to an earlier checkpoint (the file alone
still verifies) and makes the head file beside it agree (its checkpoint line is a genuine
signed head), or deletes the log and its head file. The heads the HSA published off the host
(the coordinator's, the peers' copies) catch both: the HSA refuses to restart, loudly, and
`hsm-domain audit verify` fails naming the cut and where the head came from. The coordinator
refuses a lower, forged or foreign head, and a head forged into the coordinator's store is
believed by nobody.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster, local_cluster
from support.tools import console_script

from deploy.audit import audit_log_path
from deploy.cluster import ProcessStartError, coordinator_operator_channel
from domain_edge.audit import AuditHead, head_file
from domain_edge.config import NodeConfig
from domain_edge.transport import ANY_HSA, COORDINATOR, TlsMaterial, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster
__all__ = ["local_cluster"]

HOST = "hsa-1"


def hsm_domain() -> str:
    """Path of the installed `hsm-domain` console script."""
    return console_script("hsm-domain")


def audit_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hsm_domain(), "audit", "verify", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        check=False,
    )


def line_of(output: str, label: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"{label}: "))


def create_key(cluster: LocalCluster, address: str) -> str:
    with mtls_channel(address, cluster.client_tls(), ANY_HSA) as channel:
        stub = services_pb2_grpc.KeyServiceStub(channel)
        request = services_pb2.CreateKeyRequest(description="audit heads")
        return str(stub.CreateKey(request, timeout=30).metadata.key_id)


def encrypt(cluster: LocalCluster, address: str, key_id: str, count: int) -> None:
    with mtls_channel(address, cluster.client_tls(), ANY_HSA) as channel:
        stub = services_pb2_grpc.KeyServiceStub(channel)
        for i in range(count):
            stub.Encrypt(
                services_pb2.EncryptRequest(
                    key_id=key_id, plaintext=b"x", encryption_context={"n": str(i)}
                ),
                timeout=30,
            )


def busy_for_checkpoints(cluster: LocalCluster, address: str, rounds: int = 3) -> None:
    """Calls spread over more than `rounds` seconds: a checkpoint after each second."""
    key_id = create_key(cluster, address)
    for _ in range(rounds):
        encrypt(cluster, address, key_id, 5)
        time.sleep(1.3)


def coordinator_heads(cluster: LocalCluster) -> dict[tuple[str, str], AuditHead]:
    with coordinator_operator_channel(cluster.layout, cluster.coordinator_operator_address) as ch:
        stub = services_pb2_grpc.CoordinatorStub(ch)
        response = stub.GetAuditHeads(services_pb2.AuditHeadsRequest(), timeout=5)
    heads = [AuditHead.parse(bytes(h.checkpoint)) for h in response.heads]
    return {(h.host, h.log): h for h in heads}


def data_dir(cluster: LocalCluster, host: str) -> Path:
    config = NodeConfig.load(cluster.layout.node_configs[host])
    return config.path(config.data_dir)


def peer_copy(cluster: LocalCluster, holder: str, host: str, log: str) -> AuditHead | None:
    path = data_dir(cluster, holder) / "peer-audit-heads.json"
    if not path.exists():
        return None
    for line in json.loads(path.read_text())["heads"]:
        head = AuditHead.parse(line.encode())
        if (head.host, head.log) == (host, log):
            return head
    return None


def local_head(path: Path) -> AuditHead:
    return AuditHead.parse(head_file(path).read_bytes().rstrip(b"\n"))


def wait_published(cluster: LocalCluster, host: str, log: str) -> AuditHead:
    """Until the coordinator and both peers hold the host's current head of `log`."""
    path = data_dir(cluster, host) / log
    peers = [h for h in cluster.hosts if h != host]

    def published() -> AuditHead | None:
        if not head_file(path).exists():
            return None
        head = local_head(path)
        at_coordinator = coordinator_heads(cluster).get((host, log))
        if at_coordinator is None or at_coordinator.raw != head.raw:
            return None
        copies = [peer_copy(cluster, peer, host, log) for peer in peers]
        if any(copy is None or copy.raw != head.raw for copy in copies):
            return None
        return head

    return cluster.wait_for(published, timeout=30, what=f"{host} {log}'s head to be published")


def checkpoint_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith('{"count":')]


def cut_after(path: Path, checkpoint_line: str) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[: lines.index(checkpoint_line) + 1]))


def refused_start(cluster: LocalCluster, host: str) -> str:
    """Start `host`, which must refuse; the whole log of its failed start."""
    log_file = cluster.layout.log_file(host)
    before = log_file.stat().st_size if log_file.exists() else 0
    with pytest.raises(ProcessStartError, match="exited with status 1 before it was ready"):
        cluster.start_node(host)
    return log_file.read_bytes()[before:].decode()


def test_a_cut_or_deleted_audit_log_is_refused_and_reported(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    address = cluster.node_addresses()[HOST]
    busy_for_checkpoints(cluster, address)
    published = wait_published(cluster, HOST, "audit.log")
    log = audit_log_path(cluster.layout, HOST)
    assert cluster.stop_node(HOST) == 0

    # The attack of the issue: cut the log back to its first checkpoint, and make the head
    # file agree with it (a genuine signed checkpoint line of this log).
    first = checkpoint_lines(log)[0]
    first_head = AuditHead.parse(first.encode())
    assert first_head.seq < published.seq
    cut_after(log, first)
    head_file(log).write_text(first + "\n")

    result = audit_verify(cluster.layout.root)
    assert result.returncode == 1, result.stdout
    line = line_of(result.stdout, HOST)
    assert (
        f"the log ends at record {first_head.seq}, but its host signed a checkpoint of record "
        f"{published.seq}"
    ) in line
    assert f"records {first_head.seq + 1} to {published.seq} were cut off" in line
    assert "(from: coordinator, hsa-2's copy, hsa-3's copy)" in line
    assert str(log) in line
    assert "the coordinator at" in result.stdout.splitlines()[0]
    for peer in ("hsa-2", "hsa-3"):
        assert ", ok" in line_of(result.stdout, peer)

    said = refused_start(cluster, HOST)
    assert "the coordinator holds" in said
    assert "above this host's own head file: adopted it" in said
    assert f"audit log {log} ends at record {first_head.seq}" in said
    assert f"signed checkpoint of record {published.seq}" in said
    assert "refusing to resume below the persisted head" in said
    assert "restore the log from a backup" in said
    assert len(checkpoint_lines(log)) == 1  # the refusal left the evidence as it was

    # Delete the log and its head file, and take the coordinator away: the peers' copies
    # still tell, at restart and to `audit verify`.
    log.unlink()
    head_file(log).unlink()
    assert cluster.stop_coordinator() == 0
    result = audit_verify(cluster.layout.root)
    assert result.returncode == 1, result.stdout
    assert result.stdout.splitlines()[0].startswith(
        "published heads: the coordinator is not running; peer copies:"
    )
    line = line_of(result.stdout, HOST)
    assert (
        f"the audit log is missing, but its host signed a checkpoint of record {published.seq}"
    ) in line
    assert "(from: hsa-2's copy, hsa-3's copy)" in line
    assert "the log was deleted" in line

    said = refused_start(cluster, HOST)
    assert "peer hsa-2 holds" in said or "peer hsa-3 holds" in said
    assert f"audit log {log} is missing" in said
    assert f"record {published.seq}" in said
    assert "refusing to start a new chain at record 1" in said
    assert not log.exists()


def hsa_tls(cluster: LocalCluster, host: str) -> TlsMaterial:
    config = NodeConfig.load(cluster.layout.node_configs[host])
    return TlsMaterial.from_files(
        config.path(config.tls.ca), config.path(config.tls.cert), config.path(config.tls.key)
    )


def test_the_coordinator_keeps_heads_up_and_nobody_believes_a_forged_one(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=2)
    address = cluster.node_addresses()[HOST]
    busy_for_checkpoints(cluster, address)
    published = wait_published(cluster, HOST, "audit.log")
    log = audit_log_path(cluster.layout, HOST)
    lower = checkpoint_lines(log)[0]

    forged_value = json.loads(published.raw)
    forged_value["seq"] = published.seq + 1000  # a higher head, the signature left as it was
    forged = json.dumps(forged_value, sort_keys=True, separators=(",", ":")).encode()
    other_value = json.loads(lower)
    other_value["host"] = "hsa-2"  # hsa-1 reporting a head of hsa-2

    def register(*checkpoints: bytes) -> services_pb2.RegisterHsaResponse:
        with mtls_channel(
            cluster.coordinator_address, hsa_tls(cluster, HOST), COORDINATOR
        ) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)
            return stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(
                    host_id=HOST,
                    address=address,
                    audit_heads=[services_pb2.AuditHead(checkpoint=c) for c in checkpoints],
                ),
                timeout=5,
            )

    response = register(lower.encode())
    [refusal] = response.refused_audit_heads
    assert f"a checkpoint of record {AuditHead.parse(lower.encode()).seq} is below" in refusal
    assert "the log may have been cut; refused" in refusal
    response = register(forged)
    [refusal] = response.refused_audit_heads
    assert "not signed by hsa-1's host key: not believed" in refusal
    response = register(json.dumps(other_value, sort_keys=True, separators=(",", ":")).encode())
    [refusal] = response.refused_audit_heads
    assert "is not a head of hsa-1's logs" in refusal
    assert coordinator_heads(cluster)[(HOST, "audit.log")].seq >= published.seq
    coordinator_log = cluster.layout.log_file("coordinator").read_text()
    assert "the log may have been cut; refused" in coordinator_log

    # Whoever holds the coordinator's store forges a far higher head of hsa-2's log (hsa-2
    # stopped first, or its next report would replace the head that does not verify).
    hsa_2_log = audit_log_path(cluster.layout, "hsa-2")
    assert cluster.stop_node("hsa-2") == 0
    db = cluster.layout.root / "coordinator" / "coordinator.db"
    with sqlite3.connect(db, timeout=10) as connection:
        connection.execute(
            "INSERT OR REPLACE INTO audit_heads (host_id, log, seq, checkpoint, reported_at) "
            "VALUES ('hsa-2', 'audit.log', ?, ?, 0)",
            (published.seq + 1000, forged.replace(b'"host":"hsa-1"', b'"host":"hsa-2"')),
        )
    connection.close()
    result = audit_verify(cluster.layout.root)
    assert result.returncode == 0, result.stdout
    line = line_of(result.stdout, "hsa-2")
    assert ", ok" in line
    assert (
        f"ignored a head of record {published.seq + 1000} (coordinator): not signed by hsa-2's "
        "host key"
    ) in line
    cluster.start_node("hsa-2")  # the forged head does not stop it either
    said = cluster.layout.log_file("hsa-2").read_text()
    assert "ignored a head from the coordinator" in said
    assert hsa_2_log.exists()


def test_the_workers_logs_are_published_and_guarded_too(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3, workers=1)
    worker_address = cluster.key_endpoints(HOST)[1]
    busy_for_checkpoints(cluster, worker_address, rounds=2)
    worker_log = data_dir(cluster, HOST) / "audit-worker-1.log"
    published = wait_published(cluster, HOST, worker_log.name)
    assert cluster.stop_node(HOST) == 0
    worker_log.unlink()
    head_file(worker_log).unlink()

    result = audit_verify(cluster.layout.root)
    assert result.returncode == 1, result.stdout
    line = line_of(result.stdout, f"{HOST} audit-worker-1.log")
    assert (
        f"the audit log is missing, but its host signed a checkpoint of record {published.seq}"
    ) in line
    assert "(from: coordinator, hsa-2's copy, hsa-3's copy)" in line

    said = refused_start(cluster, HOST)
    assert f"audit log {worker_log} is missing" in said
    assert not worker_log.exists()
