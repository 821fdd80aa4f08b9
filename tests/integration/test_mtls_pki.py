"""A real gRPC server with mutual TLS from the domain PKI: who gets in, and who the server sees.

Refusals happen in the TLS handshake, so the client sees UNAVAILABLE (FACTS.md, "TLS in gRPC");
positive identity is checked inside the servicer through `peer_identity`.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from domain_core.errors import UnauthenticatedError
from domain_core.identity import HostIdentity
from domain_core.pki import DomainCA, SpiffeId, SpiffeKind, certificate_fingerprint, peer_identity

pytestmark = pytest.mark.integration

DOMAIN = "test.domain"
ECHO = "/hsmdomain.test.Echo/WhoAmI"
TIMEOUT = 10.0


@dataclass(frozen=True)
class Credentials:
    key_pem: bytes
    cert_pem: bytes


def issue(ca: DomainCA, kind: SpiffeKind, name: str) -> Credentials:
    """A fresh P-256 key and a certificate for it from `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(SpiffeId(ca.domain_id, kind, name), key.public_key(), now=datetime.now(UTC))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Credentials(key_pem, cert)


def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo the caller's SPIFFE id, as the server sees it from the verified certificate."""
    try:
        peer = peer_identity(context.auth_context())
    except UnauthenticatedError as exc:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
    return peer.spiffe.uri.encode() + b" " + peer.fingerprint.hex().encode() + b" " + request


@dataclass(frozen=True)
class Server:
    port: int
    ca: DomainCA
    host: HostIdentity


@pytest.fixture(scope="module")
def ca() -> DomainCA:
    return DomainCA.create(DOMAIN, now=datetime.now(UTC))


@pytest.fixture(scope="module")
def other_ca() -> DomainCA:
    """A CA for the same domain id with another key: its certificates must not get in."""
    return DomainCA.create(DOMAIN, now=datetime.now(UTC))


@pytest.fixture(scope="module")
def server(ca: DomainCA) -> Iterator[Server]:
    host = HostIdentity.generate("hsa-1")
    cert = ca.issue(host.spiffe_id(DOMAIN), host.tls_public_key, now=datetime.now(UTC))
    credentials = grpc.ssl_server_credentials(
        [(host.tls_private_key_pem(), cert)],
        root_certificates=ca.certificate_pem,
        require_client_auth=True,
    )
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    try:
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        handler = grpc.method_handlers_generic_handler(
            "hsmdomain.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
        )
        grpc_server.add_generic_rpc_handlers((handler,))
        port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
        assert port > 0
        grpc_server.start()
        yield Server(port=port, ca=ca, host=host)
    finally:
        grpc_server.stop(grace=None).wait(TIMEOUT)


def channel(
    server: Server, client: Credentials | None, *, root: bytes | None = None, target: str = ""
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root if root is not None else server.ca.certificate_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(target or f"127.0.0.1:{server.port}", credentials)


def call_who_am_i(chan: grpc.Channel, payload: bytes = b"hello") -> bytes:
    method = chan.unary_unary(ECHO, request_serializer=None, response_deserializer=None)
    answer: bytes = method(payload, timeout=TIMEOUT)
    return answer


@pytest.mark.parametrize(("kind", "name"), [("client", "app-1"), ("hsa", "hsa-2")])
def test_client_with_ca_certificate_is_seen_with_its_spiffe_id(
    server: Server, kind: SpiffeKind, name: str
) -> None:
    client = issue(server.ca, kind, name)
    with channel(server, client) as chan:
        answer = call_who_am_i(chan)
    uri, fingerprint, echoed = answer.split(b" ")
    assert uri.decode() == f"spiffe://{DOMAIN}/{kind}/{name}"
    assert bytes.fromhex(fingerprint.decode()) == certificate_fingerprint(client.cert_pem)
    assert echoed == b"hello"


def test_health_service_over_mtls(server: Server) -> None:
    with channel(server, issue(server.ca, "coordinator", "coord-1")) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_localhost_name_verifies_too(server: Server) -> None:
    """The server certificate carries DNS localhost as well as the loopback IPs."""
    client = issue(server.ca, "client", "app-1")
    with channel(server, client, target=f"localhost:{server.port}") as chan:
        assert call_who_am_i(chan).startswith(b"spiffe://")


def assert_refused_in_handshake(chan: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call_who_am_i(chan)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(server: Server) -> None:
    with channel(server, None) as chan:
        assert_refused_in_handshake(chan)


def test_client_with_certificate_from_another_ca_is_refused(
    server: Server, other_ca: DomainCA
) -> None:
    with channel(server, issue(other_ca, "client", "app-1")) as chan:
        assert_refused_in_handshake(chan)


def test_client_that_does_not_trust_the_server_ca_refuses_it(
    server: Server, other_ca: DomainCA
) -> None:
    client = issue(server.ca, "client", "app-1")
    with channel(server, client, root=other_ca.certificate_pem) as chan:
        assert_refused_in_handshake(chan)


def test_plaintext_client_is_refused(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as chan:
        assert_refused_in_handshake(chan)
