"""Key service worker processes of an HSA, as real processes of a local domain.

One domain of two HSAs; hsa-1 runs with two workers (`key_service_workers: 2`). The test
follows one life: ciphertexts cross between the workers and the main process; a worker killed
with SIGKILL is restarted; a domain-key rotation and then the removal of hsa-1 reach the
workers (removed, they refuse with UNAVAILABLE); a SIGTERM to the main process leaves no
worker behind; `hsm-domain audit verify` checks every worker's log and names a tampered one;
and workers stop by themselves when their main process is killed. Every process is killed at
teardown whatever the outcome.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.cluster import LocalCluster

from deploy import cluster as runner
from domain_edge import transport
from domain_edge.config import NodeConfig
from domain_edge.kms_client import KeyClient, read_cluster
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from hsa_node.storage import read_worker_ready, worker_ready_path

pytestmark = pytest.mark.cluster

HOST = "hsa-1"
WORKERS = 2
DEADLINE = 10.0
CONTEXT = {"tenant": "acme"}


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "domain", nodes=2)
    failed_before = request.session.testsfailed
    try:
        layout = cluster.init()
        path = layout.node_configs[HOST]
        config = NodeConfig.load(path)
        dataclasses.replace(config, key_service_workers=WORKERS).save(path)
        cluster.start()
        yield cluster
    finally:
        cluster.close(dump_logs=request.session.testsfailed > failed_before)


def data_dir(cluster: LocalCluster) -> Path:
    config = NodeConfig.load(cluster.layout.node_configs[HOST])
    return config.path(config.data_dir)


def worker_pids(cluster: LocalCluster) -> list[int]:
    pids = []
    for index in range(1, WORKERS + 1):
        ready = read_worker_ready(worker_ready_path(data_dir(cluster), index))
        assert ready is not None, f"worker {index} wrote no ready file"
        pids.append(ready.pid)
    return pids


def endpoints(cluster: LocalCluster) -> list[str]:
    """The main address, then the workers' (from the main ready file)."""
    info = runner.read_ready_file(cluster.layout.ready_file(HOST))
    assert info is not None
    return [info.address, *info.workers]


def key_stub(
    address: str, tls: TlsMaterial
) -> tuple[grpc.Channel, services_pb2_grpc.KeyServiceStub]:
    channel = transport.mtls_channel(address, tls, transport.hsa_host(HOST))
    return channel, services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]


def encrypt(address: str, tls: TlsMaterial, key_id: str, plaintext: bytes) -> bytes:
    channel, stub = key_stub(address, tls)
    with channel:
        request = services_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, encryption_context=CONTEXT
        )
        return bytes(stub.Encrypt(request, timeout=DEADLINE).ciphertext_blob)


def decrypt(address: str, tls: TlsMaterial, blob: bytes) -> bytes:
    channel, stub = key_stub(address, tls)
    with channel:
        request = services_pb2.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT)
        return bytes(stub.Decrypt(request, timeout=DEADLINE).plaintext)


def create_key(address: str, tls: TlsMaterial) -> str:
    channel, stub = key_stub(address, tls)
    with channel:
        request = services_pb2.CreateKeyRequest(description="worker test")
        return str(stub.CreateKey(request, timeout=DEADLINE).metadata.key_id)


def apply(cluster: LocalCluster, change: domain_pb2.Change) -> int:
    with cluster.coordinator_client() as client:
        view = client.propose([change], cluster.operator_signer("alice"), reason="test")
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    return int(view.applied_version)


def is_alive(pid: int) -> bool:
    return runner.is_alive(pid)


def audit_verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return hsm_domain("audit", "verify", directory)


def hsm_domain(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "hsm-domain"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        check=False,
    )


def records(path: Path) -> list[dict[str, object]]:
    values = [json.loads(line) for line in path.read_text().splitlines()]
    return [value for value in values if "type" not in value]


def test_workers_serve_follow_restart_and_stop(cluster: LocalCluster) -> None:
    tls = cluster.client_tls()
    main, worker_1, worker_2 = endpoints(cluster)
    assert len({main, worker_1, worker_2}) == 3
    first_pids = worker_pids(cluster)

    # Ciphertexts cross between the processes of the host.
    key_id = create_key(worker_1, tls)
    plaintext = b"worker-made ciphertext"
    blob = encrypt(worker_1, tls, key_id, plaintext)
    assert decrypt(worker_2, tls, blob) == plaintext
    assert decrypt(main, tls, blob) == plaintext

    # `hsm-domain status` shows them.
    status = hsm_domain("status", cluster.directory, "--json")
    assert status.returncode == 0, status.stderr
    listed_workers = {p["name"]: p["workers"] for p in json.loads(status.stdout)["processes"]}
    assert listed_workers[HOST] == [worker_1, worker_2]
    assert listed_workers["hsa-2"] == []
    text = hsm_domain("status", cluster.directory)
    assert f"[key service workers: {worker_1}, {worker_2}]" in text.stdout

    # A client made from the domain directory spreads over the workers too.
    listed, _ = read_cluster(cluster.directory)
    assert {main, worker_1, worker_2} <= set(listed)
    with KeyClient.from_cluster(cluster.directory) as client:
        assert {main, worker_1, worker_2} <= set(client.endpoints)
        for _ in range(len(listed)):
            assert client.decrypt(blob, CONTEXT) == plaintext

    # Workers serve the key service and Diagnostics, not the HSA's admin or peer services.
    with transport.mtls_channel(worker_2, tls, transport.hsa_host(HOST)) as channel:
        assert transport.check_health(channel)
        echo = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
        assert echo.Echo(services_pb2.EchoMessage(payload=b"x"), timeout=DEADLINE).payload == b"x"
        admin = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            admin.GetStatus(services_pb2.HsaStatusRequest(), timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED

    # A worker killed with SIGKILL is started again and serves again.
    os.kill(first_pids[0], signal.SIGKILL)

    def restarted() -> bool:
        ready = read_worker_ready(worker_ready_path(data_dir(cluster), 1))
        return ready is not None and ready.pid != first_pids[0] and len(endpoints(cluster)) == 3

    cluster.wait_for(restarted, timeout=20, what="worker 1 to be restarted")
    new_pid = worker_pids(cluster)[0]
    assert is_alive(new_pid)
    assert not is_alive(first_pids[0])
    assert endpoints(cluster)[1] == worker_1  # its port again, as it was free
    assert decrypt(worker_1, tls, blob) == plaintext
    log_file = cluster.layout.log_file(HOST)
    assert re.search(r"key service worker 1 \(pid \d+\) exited", log_file.read_text())

    # A domain-key rotation reaches both workers from the main process's store.
    rotated = apply(cluster, domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey()))

    def workers_installed(version: int) -> bool:
        text = log_file.read_text()
        return all(
            re.search(rf"{HOST}/worker-{index} .* installed state version {version} ", text)
            for index in (1, 2)
        )

    cluster.wait_for(lambda: workers_installed(rotated), timeout=10, what="the workers to rotate")
    later_key = create_key(worker_2, tls)
    later_blob = encrypt(worker_2, tls, later_key, b"after the rotation")
    assert decrypt(worker_1, tls, later_blob) == b"after the rotation"
    assert decrypt(main, tls, later_blob) == b"after the rotation"

    # Removing the host from the domain stops its workers serving keys.
    apply(cluster, domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id=HOST)))

    def refused_by_workers() -> bool:
        for address in (worker_1, worker_2):
            try:
                decrypt(address, tls, blob)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                continue
            return False
        return True

    cluster.wait_for(refused_by_workers, timeout=10, what="the removed host's workers to refuse")

    def not_serving(address: str) -> bool:
        # The health status follows the node's serving flag through a listener, a moment
        # after the key service starts refusing.
        with transport.mtls_channel(address, tls, transport.hsa_host(HOST)) as channel:
            return not transport.check_health(channel)

    cluster.wait_for(
        lambda: not_serving(worker_1) and not_serving(worker_2),
        timeout=10,
        what="the removed host's workers to report NOT_SERVING",
    )

    # SIGTERM to the main process alone: it stops its workers and exits cleanly.
    process = cluster.processes.pop(HOST)
    pids = worker_pids(cluster)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    assert not any(is_alive(pid) for pid in pids)

    # Every worker's log verifies and holds the worker's records; a tampered one is named.
    result = audit_verify(cluster.layout.root)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for index in (1, 2):
        assert any(
            line.startswith(f"{HOST} audit-worker-{index}.log: ")
            and ", ok; reaches its published head" in line
            for line in lines
        ), lines
    worker_logs = [data_dir(cluster) / f"audit-worker-{index}.log" for index in (1, 2)]
    operations_1 = [r["operation"] for r in records(worker_logs[0])]
    operations_2 = [r["operation"] for r in records(worker_logs[1])]
    assert {"CreateKey", "Encrypt", "Decrypt"} <= set(operations_1)
    assert {"CreateKey", "Encrypt", "Decrypt"} <= set(operations_2)
    for path in [*worker_logs, data_dir(cluster) / "audit.log"]:
        assert plaintext not in path.read_bytes()
    text = worker_logs[1].read_text()
    worker_logs[1].write_text(text.replace('"tenant":"acme"', '"tenant":"other"', 1))
    result = audit_verify(cluster.layout.root)
    assert result.returncode == 1
    assert re.search(
        rf"{HOST} audit-worker-2\.log: record \d+ was edited: .*audit-worker-2\.log\)",
        result.stdout,
    ), result.stdout
    assert any(
        line.startswith(f"{HOST}: ") and ", ok;" in line for line in result.stdout.splitlines()
    )
    worker_logs[1].write_text(text)

    # Workers stop by themselves when their main process dies without a word.
    cluster.start_node(HOST, wait_for_health=False)  # removed: never healthy again
    assert len(endpoints(cluster)) == 1 + WORKERS
    pids = worker_pids(cluster)
    assert all(is_alive(pid) for pid in pids)
    os.kill(cluster.processes[HOST].pid, signal.SIGKILL)
    cluster.wait_for(
        lambda: not any(is_alive(pid) for pid in pids),
        timeout=10,
        what="the orphaned workers to exit",
    )
