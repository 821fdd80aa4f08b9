"""The key service of a whole local domain under concurrency and failures (real processes).

Concurrent key changes through every HSA at once all land (compare-and-swap at the
coordinator, retried on a conflict); the data plane keeps serving cached keys while an HSA and
then the coordinator are killed, with the client moving to another HSA; every HSA's audit log
verifies afterwards under its host key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_core import ciphertext
from domain_edge import transport
from domain_edge.audit import verify_audit_log
from domain_edge.identity_files import load_host_identity
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

HOSTS = ("hsa-1", "hsa-2", "hsa-3")
DEADLINE = 5.0


class Client:
    """KeyService stubs on every node for the demo application, with failover."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.tls = tls = cluster.client_tls()
        self.channels = {
            h: transport.mtls_channel(cluster.address(h), tls, transport.hsa_host(h)) for h in HOSTS
        }
        self.stubs = {h: services_pb2_grpc.KeyServiceStub(c) for h, c in self.channels.items()}

    def on(self, host: str) -> Any:
        return self.stubs[host]

    def call(self, method: str, request: Any, prefer: int) -> Any:
        """Call `method` on the preferred node, moving on to the next on UNAVAILABLE."""
        last: grpc.RpcError | None = None
        for offset in range(len(HOSTS)):
            host = HOSTS[(prefer + offset) % len(HOSTS)]
            try:
                return getattr(self.stubs[host], method)(request, timeout=2.0)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                last = error
        assert last is not None
        raise last

    def reconnect(self, host: str) -> None:
        """A new channel to a restarted node (the old one may be waiting out its backoff)."""
        self.channels[host].close()
        self.channels[host] = transport.mtls_channel(
            self.cluster.address(host), self.tls, transport.hsa_host(host)
        )
        self.stubs[host] = services_pb2_grpc.KeyServiceStub(self.channels[host])

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@pytest.fixture
def cluster(local_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster(nodes=3, operators=3, quorum=2)


def test_concurrent_key_changes_through_every_node_all_land(cluster: LocalCluster) -> None:
    client = Client(cluster)
    try:
        key = client.on("hsa-1").CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE)
        key_id = key.metadata.key_id
        blobs: list[tuple[int, bytes]] = []
        lock = threading.Lock()
        rounds = 4

        def rotate(stub: Any) -> None:
            # ABORTED means the compare-and-swap lost to another node more often than the HSA
            # retries by itself; the documented answer is to retry, as a client would.
            for _ in range(20):
                try:
                    stub.RotateKey(services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE)
                    return
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.ABORTED:
                        raise
            raise AssertionError("RotateKey was aborted 20 times in a row")

        def rotate_and_use(host: str) -> None:
            stub = client.on(host)
            for _ in range(rounds):
                rotate(stub)
                sealed = stub.Encrypt(
                    services_pb2.EncryptRequest(key_id=key_id, plaintext=host.encode()),
                    timeout=DEADLINE,
                )
                with lock:
                    blobs.append((sealed.backing_version, sealed.ciphertext_blob))

        with ThreadPoolExecutor(max_workers=3) as pool:
            for future in [pool.submit(rotate_and_use, h) for h in HOSTS]:
                future.result()

        def described() -> keys_pb2.KeyMetadata:
            response = client.on("hsa-2").DescribeKey(
                services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE
            )
            metadata: keys_pb2.KeyMetadata = response.metadata
            return metadata

        # Every rotation landed: none was lost to a concurrent writer. (hsa-2 may describe the
        # key as it last wrote it for up to its cache's TTL.)
        final = cluster.wait_for(
            lambda: (m := described()).current_backing_version == 1 + 3 * rounds and m,
            timeout=5,
            what="hsa-2 to see all 12 rotations",
        )
        assert final.metadata_version == 1 + 3 * rounds
        # The node that rotated used its new version at once (never an older one than it made).
        assert len({v for v, _ in blobs}) >= rounds
        for host in HOSTS:
            for version, blob in blobs:
                assert ciphertext.parse_header(blob).backing_version == version
                opened = client.on(host).Decrypt(
                    services_pb2.DecryptRequest(ciphertext_blob=blob), timeout=DEADLINE
                )
                assert opened.plaintext in {h.encode() for h in HOSTS}
    finally:
        client.close()


def test_the_data_plane_survives_a_lost_node_and_a_lost_coordinator(
    cluster: LocalCluster,
) -> None:
    client = Client(cluster)
    try:
        keys = [
            client.on(HOSTS[i % 3])
            .CreateKey(services_pb2.CreateKeyRequest(description=f"k{i}"), timeout=DEADLINE)
            .metadata.key_id
            for i in range(3)
        ]
        # Warm every node's cache with every key.
        sealed = {}
        for host in HOSTS:
            for key_id in keys:
                sealed[key_id] = client.on(host).Encrypt(
                    services_pb2.EncryptRequest(key_id=key_id, plaintext=key_id.encode()),
                    timeout=DEADLINE,
                )
        stop = threading.Event()
        done = [0]
        errors: list[str] = []

        def worker(index: int) -> None:
            while not stop.is_set():
                key_id = keys[index % len(keys)]
                try:
                    blob = client.call(
                        "Encrypt",
                        services_pb2.EncryptRequest(key_id=key_id, plaintext=b"load"),
                        prefer=index,
                    ).ciphertext_blob
                    opened = client.call(
                        "Decrypt",
                        services_pb2.DecryptRequest(ciphertext_blob=blob),
                        prefer=index + 1,
                    )
                    assert opened.plaintext == b"load"
                    done[0] += 1
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}")
                index += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            cluster.kill_node("hsa-2")
            time.sleep(1.0)
            cluster.kill_coordinator()
            time.sleep(3.0)  # past the cache's TTL: the nodes serve from their caches
            served_during_outage = done[0]
            time.sleep(1.0)
            assert done[0] > served_during_outage  # still serving with both down
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
        assert errors == []
        assert done[0] > 50
        # Calls that need the coordinator say so, and clients can retry later.
        with pytest.raises(grpc.RpcError) as refused:
            client.on("hsa-1").CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        cluster.start_coordinator()
        cluster.start_node("hsa-2")
        client.reconnect("hsa-2")
        for key_id, response in sealed.items():
            opened = client.on("hsa-2").Decrypt(
                services_pb2.DecryptRequest(ciphertext_blob=response.ciphertext_blob),
                timeout=DEADLINE,
            )
            assert opened.plaintext == key_id.encode()

        def create_on_hsa3() -> keys_pb2.KeyMetadata | None:
            # hsa-3 reconnects to the restarted coordinator within its channel's backoff (1 s).
            try:
                response = client.on("hsa-3").CreateKey(
                    services_pb2.CreateKeyRequest(), timeout=DEADLINE
                )
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return None
            metadata: keys_pb2.KeyMetadata = response.metadata
            return metadata

        created = cluster.wait_for(create_on_hsa3, timeout=5, what="CreateKey to work again")
        assert created.state == keys_pb2.KEY_STATE_ENABLED
    finally:
        client.close()

    # Every node's audit log verifies under its host key (a clean stop signs the tail).
    for host in HOSTS:
        assert cluster.stop_node(host) == 0
        identity = load_host_identity(cluster.layout.node_dir(host) / "identity")
        report = verify_audit_log(
            cluster.layout.node_dir(host) / "data" / "audit.log",
            identity.signing_public_key,
            host_id=host,
        )
        assert report.ok, report.reason
        assert report.records > 0
        assert report.unsigned_tail == 0
