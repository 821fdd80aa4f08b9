"""A real gRPC server from `transport.make_server`, in this process: streams cannot starve it.

The attacks of issue 21 item 2 and 3, at the library level (the same server stack every process
runs; tests/cluster/test_server_resources.py runs them against real processes): idle streams
that would each hold a worker of the call pool, more streams than a peer or the server may
keep, streams that never send or read again, a client that stops reading, and health calls
with invented service names. Small `StreamLimits` and a two-thread call pool make every bound
reachable in a few hundred milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from domain_core.errors import NotFoundError
from domain_core.pki import DomainCA, SpiffeId
from domain_edge import transport
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

SERVICE = "hsmdomain.v1.Diagnostics"
NUMBERS = "/hsmdomain.test.Streams/Numbers"
FLOOD = "/hsmdomain.test.Streams/Flood"
FAILING = "/hsmdomain.test.Streams/Failing"
DEADLINE = 2.0
WORKERS = 2  # the call pool: two idle streams holding a worker each would starve it


class Echo(services_pb2_grpc.DiagnosticsServicer):
    def Echo(
        self, request: services_pb2.EchoMessage, context: grpc.ServicerContext
    ) -> services_pb2.EchoMessage:
        return services_pb2.EchoMessage(payload=request.payload)


def numbers(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """One number now, then one every 0.2 s."""
    count = 0
    while context.is_active():
        yield str(count).encode()
        count += 1
        for _ in range(2):
            if not context.is_active():
                return
            time.sleep(0.1)


def flood(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """256 KiB responses as fast as the client takes them."""
    chunk = b"x" * 256 * 1024
    while context.is_active():
        yield chunk


def failing(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    raise NotFoundError("key k does not exist")


@dataclass
class Server:
    port: int
    server: grpc.Server
    health: transport.HealthService
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A new channel (a new connection) to the server."""
        target = f"127.0.0.1:{self.port}"
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        channel = (
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )
        self.channels.append(channel)
        return channel


def start_server(
    limits: transport.StreamLimits, tls: transport.TlsMaterial | None = None
) -> Server:
    server = transport.make_server(max_workers=WORKERS, max_concurrent_rpcs=200, streams=limits)
    services_pb2_grpc.add_DiagnosticsServicer_to_server(Echo(), server)  # type: ignore[no-untyped-call]
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "hsmdomain.test.Streams",
                {
                    "Numbers": grpc.unary_stream_rpc_method_handler(numbers),
                    "Flood": grpc.unary_stream_rpc_method_handler(flood),
                    "Failing": grpc.unary_stream_rpc_method_handler(failing),
                },
            )
        ]
    )
    health = transport.add_health_and_reflection(server, [SERVICE])
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(tls))
    server.start()
    transport.set_serving(health, [SERVICE], True)
    return Server(port, server, health)


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(limits: transport.StreamLimits, tls: transport.TlsMaterial | None = None) -> Server:
        server = start_server(limits, tls)
        started.append(server)
        return server

    yield make
    for server in started:
        for channel in server.channels:
            channel.close()
        server.server.stop(0).wait(5)


class Attacker:
    """Streams opened and left alone: never read past the first answer, never ended."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._quiet = threading.Event()

    def watch(self, channel: grpc.Channel, service: str = "") -> Any:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service)
        )
        self.calls.append(call)
        return call

    def reflect(self, channel: grpc.Channel) -> Any:
        """A reflection stream that asks one question, then sends nothing more."""

        def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            self._quiet.wait()

        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests())
        self.calls.append(call)
        return call

    def close(self) -> None:
        self._quiet.set()
        for call in self.calls:
            call.cancel()


@pytest.fixture
def attacker() -> Iterator[Attacker]:
    streams = Attacker()
    yield streams
    streams.close()


def first(call: Any) -> grpc.StatusCode:
    """OK when the stream answered, else the status it ended with."""
    try:
        next(call)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def echo(channel: grpc.Channel) -> float:
    """One unary call; its latency in seconds (it must finish within DEADLINE)."""
    stub = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    assert stub.Echo(services_pb2.EchoMessage(payload=b"x"), timeout=DEADLINE).payload == b"x"
    return time.perf_counter() - started


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- no stream holds a worker -----------------------------------------------------------------


def test_idle_streams_hold_no_worker_of_the_call_pool(
    make_server: Callable[..., Server], attacker: Attacker
) -> None:
    server = make_server(transport.StreamLimits(per_peer=60, total=60, blocking=3))
    channel = server.channel()
    # Twenty times the call pool in health watchers, and every thread the quota has for
    # generator streams: none of them may take a worker from unary calls.
    watchers = [attacker.watch(channel) for _ in range(40)]
    reflectors = [attacker.reflect(channel) for _ in range(3)]
    assert {first(call) for call in watchers + reflectors} == {grpc.StatusCode.OK}
    assert server.health.watchers() == 40
    for _ in range(20):
        assert echo(server.channel()) < DEADLINE
    # A fourth generator stream would need a fourth thread: refused at once, not queued.
    assert first(attacker.reflect(channel)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert first(attacker.reflect(server.channel())) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The watchers still get news.
    transport.set_serving(server.health, [SERVICE], False)
    assert next(watchers[7]).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_streams_are_capped_per_peer_and_per_server(
    make_server: Callable[..., Server], attacker: Attacker, tmp_path: Any
) -> None:
    ca = DomainCA.create("local", now=datetime.now(UTC))
    server_tls = tls_for(ca, SpiffeId("local", "hsa", "hsa-1"))
    server = make_server(transport.StreamLimits(per_peer=3, total=5, blocking=2), server_tls)

    def credentials(name: str) -> grpc.ChannelCredentials:
        tls = tls_for(ca, SpiffeId("local", "client", name))
        return transport.channel_credentials(tls.ca_pem, tls.cert_pem, tls.key_pem)

    app_1 = credentials("app-1")
    # One identity over several connections is still one peer.
    codes = [first(attacker.watch(server.channel(app_1))) for _ in range(5)]
    assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    refused = attacker.watch(server.channel(app_1))
    with pytest.raises(grpc.RpcError) as error:
        next(refused)
    assert "spiffe://local/client/app-1 has 3 streams open" in str(error.value.details())
    # Another identity has its own share, until the server's total is reached.
    app_2 = server.channel(credentials("app-2"))
    assert [first(attacker.watch(app_2)) for _ in range(3)] == [grpc.StatusCode.OK] * 2 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    # Unary calls pass, whoever asks.
    assert echo(app_2) < DEADLINE
    # Streams that end give their places back.
    for call in attacker.calls:
        call.cancel()
    wait_until(lambda: server.health.watchers() == 0)
    assert first(attacker.watch(app_2)) == grpc.StatusCode.OK


def tls_for(ca: DomainCA, spiffe: SpiffeId) -> transport.TlsMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(spiffe, key.public_key(), now=datetime.now(UTC))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return transport.TlsMaterial(ca.certificate_pem, cert, key_pem)


# --- streams end when idle ------------------------------------------------------------------


def test_idle_streams_are_ended_and_their_places_come_back(
    make_server: Callable[..., Server], attacker: Attacker
) -> None:
    idle = 0.5
    server = make_server(
        transport.StreamLimits(per_peer=10, total=10, blocking=1, idle_seconds=idle)
    )
    channel = server.channel()
    watcher = attacker.watch(channel)
    reflector = attacker.reflect(channel)
    assert first(watcher) == first(reflector) == grpc.StatusCode.OK
    assert first(attacker.reflect(channel)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    started = time.monotonic()
    # Both end by themselves, cleanly (OK: the client may watch again).
    assert list(watcher) == []
    assert list(reflector) == []
    assert watcher.code() == reflector.code() == grpc.StatusCode.OK
    assert idle <= time.monotonic() - started + 0.2 < idle + 3
    wait_until(lambda: server.health.watchers() == 0)
    # The thread the reflection stream held is free again.
    assert first(attacker.reflect(channel)) == grpc.StatusCode.OK


def test_a_stream_with_traffic_is_not_idle(
    make_server: Callable[..., Server], attacker: Attacker
) -> None:
    server = make_server(
        transport.StreamLimits(per_peer=10, total=10, blocking=2, idle_seconds=0.6)
    )
    call = server.channel().unary_stream(NUMBERS)(b"", timeout=10)
    attacker.calls.append(call)
    # Ten answers take two seconds, longer than idle_seconds: the stream lives on.
    received = [next(call) for _ in range(10)]
    assert received == [str(n).encode() for n in range(10)]


def test_a_client_that_stops_reading_is_cancelled(
    make_server: Callable[..., Server], attacker: Attacker
) -> None:
    server = make_server(
        transport.StreamLimits(per_peer=10, total=10, blocking=1, idle_seconds=0.5)
    )
    channel = server.channel()
    stuck = channel.unary_stream(FLOOD)(b"", timeout=30)
    attacker.calls.append(stuck)
    assert len(next(stuck)) == 256 * 1024  # then never read again: the server's send blocks
    # The stream's thread comes back once the stuck send is cancelled.
    deadline = time.monotonic() + 10
    while first(attacker.reflect(channel)) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the stuck stream kept its thread"
        time.sleep(0.1)


def test_errors_in_a_stream_keep_their_status(make_server: Callable[..., Server]) -> None:
    server = make_server(transport.StreamLimits())
    call = server.channel().unary_stream(FAILING)(b"", timeout=DEADLINE)
    assert next(call) == b"first"
    with pytest.raises(grpc.RpcError) as error:
        next(call)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "key k does not exist"


# --- health ------------------------------------------------------------------------------------


def test_health_refuses_unknown_names_and_keeps_nothing_of_them(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(transport.StreamLimits())
    stub = health_pb2_grpc.HealthStub(server.channel())
    for name in ("", SERVICE):
        response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    for index in range(300):
        request = health_pb2.HealthCheckRequest(service=f"invented.Service{index}")
        with pytest.raises(grpc.RpcError) as checked:
            stub.Check(request, timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as watched:
            next(stub.Watch(request, timeout=DEADLINE))
        assert checked.value.code() == watched.value.code() == grpc.StatusCode.NOT_FOUND
    assert watched.value.details() == (
        "no health status for service 'invented.Service299'; this server reports on "
        f"'', '{SERVICE}'"
    )
    # Nothing of the 600 calls stayed behind.
    assert server.health.names == ("", SERVICE)
    assert server.health.watchers() == 0


def test_health_requests_are_capped_before_they_are_parsed(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(transport.StreamLimits())
    stub = health_pb2_grpc.HealthStub(server.channel())
    large = health_pb2.HealthCheckRequest(service="x" * 1_000_000)
    for call in (
        lambda: stub.Check(large, timeout=DEADLINE),
        lambda: next(stub.Watch(large, timeout=DEADLINE)),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "takes at most 1024" in str(error.value.details())
    assert server.health.watchers() == 0


def test_health_watchers_are_forgotten_when_their_calls_end(
    make_server: Callable[..., Server], attacker: Attacker
) -> None:
    server = make_server(transport.StreamLimits(per_peer=50, total=50))
    calls = [attacker.watch(server.channel(), SERVICE) for _ in range(30)]
    assert {first(call) for call in calls} == {grpc.StatusCode.OK}
    assert server.health.watchers() == 30
    for call in calls:
        call.cancel()
    wait_until(lambda: server.health.watchers() == 0)
    with pytest.raises(ValueError, match="not a name"):
        server.health.set("invented", health_pb2.HealthCheckResponse.SERVING)
    server.health.enter_graceful_shutdown()
    server.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)  # ignored from now on
    stub = health_pb2_grpc.HealthStub(server.channel())
    status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=DEADLINE).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
