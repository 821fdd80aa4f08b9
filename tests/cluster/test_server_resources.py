"""Idle streams and health floods against a real local domain (issue 21, items 2 and 3).

The attacks as the review ran them, against real processes: idle health `Watch` and
reflection streams on the coordinator's operator port (anyone may connect, no certificate),
on its HSAs' port and on an HSA (with application certificates issued by the domain CA, as
any application of the domain holds), then the calls everyone else makes, each within its
normal deadline; and health calls with large invented service names, then the process's
resident memory. Before the fix 100 such streams stopped both coordinator ports and 16 an
HSA's Encrypt, and every invented name stayed in the health servicer's table for good.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.cluster import LocalCluster

from deploy import cluster as runner
from domain_core.pki import SpiffeId
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.kms_client import KeyClient
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

STREAMS = 100  # of each kind, per target
DEADLINE = 3.0  # the calls below take 4-8 ms on a quiet machine
APPLICATIONS = 8  # application identities the attacker holds (one is enough before the fix)
FLOOD_CALLS = 200
FLOOD_NAME_BYTES = 1_000_000
RSS_GROWTH_LIMIT_MIB = 64  # the leak grew the coordinator by ~1 MiB per call
RSS_ROUND_GROWTH_LIMIT_MIB = 16


class IdleStreams:
    """Streams an attacker opens and leaves alone: never read, never ended."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._quiet = threading.Event()

    def open(self, channel: grpc.Channel, count: int) -> None:
        """`count` health watches and `count` reflection streams on `channel`."""
        health = health_pb2_grpc.HealthStub(channel)
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

        def silence() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            self._quiet.wait()  # a request stream that sends nothing until the test ends
            yield from ()

        for _ in range(count):
            self.calls.append(health.Watch(health_pb2.HealthCheckRequest(service="")))
            self.calls.append(reflect.ServerReflectionInfo(silence()))

    def refusals(self) -> Counter[grpc.StatusCode]:
        """How the streams that already ended were refused (open ones are left out)."""
        return Counter(call.code() for call in self.calls if not call.is_active())

    def close(self) -> None:
        self._quiet.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def idle() -> Iterator[IdleStreams]:
    streams = IdleStreams()
    yield streams
    streams.close()


@pytest.fixture
def cluster(local_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster(nodes=2)


def application_tls(cluster: LocalCluster, name: str) -> transport.TlsMaterial:
    """A certificate for application `name`, issued with the domain CA (DIR/ca)."""
    ca = load_domain_ca(cluster.layout.root / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(
        SpiffeId(cluster.layout.domain_id, "client", name), key.public_key(), now=datetime.now(UTC)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return transport.TlsMaterial(cluster.ca_pem(), cert, key_pem)


def channels_as_applications(
    cluster: LocalCluster, address: str, opened: list[grpc.Channel]
) -> list[grpc.Channel]:
    channels = [
        transport.mtls_channel(
            address, application_tls(cluster, f"attacker-{index}"), transport.ANY_HSA
        )
        for index in range(APPLICATIONS)
    ]
    opened.extend(channels)
    return channels


def operator_channel(cluster: LocalCluster, opened: list[grpc.Channel]) -> grpc.Channel:
    channel = runner.coordinator_operator_channel(
        cluster.layout, cluster.coordinator_operator_address
    )
    opened.append(channel)
    return channel


def assert_everyone_is_served(cluster: LocalCluster, opened: list[grpc.Channel]) -> None:
    """The operator port, the HSAs' port and every HSA answer within their deadlines; CreateKey
    goes through an HSA to the coordinator's HSA port (its key-record calls)."""
    operator: Any = services_pb2_grpc.CoordinatorStub(  # type: ignore[no-untyped-call]
        operator_channel(cluster, opened)
    )
    status = operator.GetDomainStatus(services_pb2.DomainStatusRequest(), timeout=DEADLINE)
    assert status.version == 1
    identity = cluster.layout.node_dir("hsa-1") / "identity"
    hsa_tls = transport.TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )
    hsa_channel = transport.mtls_channel(
        cluster.coordinator_address, hsa_tls, transport.COORDINATOR
    )
    opened.append(hsa_channel)
    as_hsa: Any = services_pb2_grpc.CoordinatorStub(hsa_channel)  # type: ignore[no-untyped-call]
    latest = as_hsa.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
    assert latest.manifest
    tls = cluster.client_tls()
    for host in cluster.hosts:
        with KeyClient(
            [cluster.address(host)],
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
            timeout=DEADLINE,
            attempts=1,
        ) as client:
            key_id = client.create_key(description=f"made while streams idle on {host}").key_id
            blob = client.encrypt(key_id, b"still served", {"t": "1"})
            assert client.decrypt(blob, {"t": "1"}) == b"still served"


def test_idle_streams_on_the_operator_port_stop_no_call(
    cluster: LocalCluster, idle: IdleStreams
) -> None:
    opened: list[grpc.Channel] = []
    try:
        channel = operator_channel(cluster, opened)
        idle.open(channel, STREAMS)
        time.sleep(1.0)  # every stream reached the server
        assert_everyone_is_served(cluster, opened)
        # No reflection there; health watches beyond the caller's share are refused at once.
        refusals = idle.refusals()
        assert refusals[grpc.StatusCode.UNIMPLEMENTED] == STREAMS
        assert refusals[grpc.StatusCode.RESOURCE_EXHAUSTED] >= STREAMS - 4
    finally:
        for channel in opened:
            channel.close()


def test_idle_streams_from_applications_stop_no_hsa(
    cluster: LocalCluster, idle: IdleStreams
) -> None:
    """Several application identities (each capped on its own) at once, on an HSA and on the
    coordinator's HSA port (health and reflection there take any domain certificate)."""
    opened: list[grpc.Channel] = []
    try:
        for address in (cluster.address("hsa-1"), cluster.coordinator_address):
            for channel in channels_as_applications(cluster, address, opened):
                idle.open(channel, STREAMS // APPLICATIONS + 1)
        time.sleep(1.0)
        assert_everyone_is_served(cluster, opened)
        assert idle.refusals()[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0
    finally:
        for channel in opened:
            channel.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def flood(channel: grpc.Channel, calls: int = FLOOD_CALLS) -> Counter[grpc.StatusCode]:
    """Health Watch calls, each with a new large invented name, each cancelled after its
    first answer."""
    stub = health_pb2_grpc.HealthStub(channel)
    codes: Counter[grpc.StatusCode] = Counter()
    for _ in range(calls):
        name = os.urandom(8).hex() + "x" * (FLOOD_NAME_BYTES - 16)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=10)
        try:
            next(call)
            codes[grpc.StatusCode.OK] += 1  # answered (SERVICE_UNKNOWN) and kept
        except grpc.RpcError as error:
            codes[error.code()] += 1
        call.cancel()
    return codes


def assert_unknown_names_refused(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    unknown = health_pb2.HealthCheckRequest(service="invented.Service")
    with pytest.raises(grpc.RpcError) as checked:
        stub.Check(unknown, timeout=DEADLINE)
    with pytest.raises(grpc.RpcError) as watched:
        next(stub.Watch(unknown, timeout=DEADLINE))
    assert checked.value.code() == watched.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_floods_leave_no_memory_behind(cluster: LocalCluster) -> None:
    opened: list[grpc.Channel] = []
    try:
        targets = {
            "coordinator": operator_channel(cluster, opened),
            "hsa-1": channels_as_applications(cluster, cluster.address("hsa-1"), opened)[0],
        }
        for name, channel in targets.items():
            pid = cluster.pid(name)
            before = rss_mib(pid)
            codes = flood(channel)
            time.sleep(0.5)
            grown = rss_mib(pid) - before
            print(f"{name}: {before:.0f} MiB, then {grown:+.1f} MiB after the flood")
            assert grown < RSS_GROWTH_LIMIT_MIB, f"{name} grew by {grown:.0f} MiB"
            assert codes == {grpc.StatusCode.INVALID_ARGUMENT: FLOOD_CALLS}, name
            # Another flood finds the memory the first one used: no growth with the count.
            settled = rss_mib(pid)
            flood(channel)
            time.sleep(0.5)
            again = rss_mib(pid) - settled
            assert again < RSS_ROUND_GROWTH_LIMIT_MIB, f"{name} grew again by {again:.0f} MiB"
            assert_unknown_names_refused(channel)
        # Every process still answers normally afterwards.
        assert_everyone_is_served(cluster, opened)
    finally:
        for channel in opened:
            channel.close()
