"""A real gRPC server with mutual TLS from the domain PKI: who gets in, and who the server sees.

Refusals happen in the TLS handshake, so the client sees UNAVAILABLE (FACTS.md, "TLS in gRPC");
positive identity is checked inside the servicer through `peer_identity`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support.impostor import ImpostorServer

from domain_coordinator._hsa import HsaConnections
from domain_core.errors import UnauthenticatedError
from domain_core.identity import HostIdentity
from domain_core.pki import DomainCA, SpiffeId, SpiffeKind, certificate_fingerprint, peer_identity
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca, save_domain_ca
from domain_proto import domain_pb2

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
    """Echo the caller's SPIFFE id, as the server sees it from the verified certificate.

    Both ways of reading it must give the same answer: `peer_identity` over the certificate
    and `transport.caller_spiffe` over gRPC's list of subject alternative names (the key
    service's hot path); and `CertificatePeerContext` (what in-process tests and benchmarks
    call servicers with) must list the identities gRPC lists. Any difference is INTERNAL.
    """
    outcomes = []
    for read in (
        lambda: peer_identity(context.auth_context()).spiffe,
        lambda: transport.caller_spiffe(context),
    ):
        try:
            outcomes.append(("ok", read().uri))
        except UnauthenticatedError as exc:
            outcomes.append(("refused", exc.message))
    if outcomes[0] != outcomes[1]:
        context.abort(grpc.StatusCode.INTERNAL, f"the two readings differ: {outcomes}")
    # The in-process stand-in answers as gRPC does for the same certificate.
    pem = bytes(next(iter(context.auth_context()["x509_pem_cert"]))).rstrip(b"\x00")
    stand_in = transport.CertificatePeerContext(pem)
    real = (context.peer_identity_key(), list(context.peer_identities() or []))
    imitated = (stand_in.peer_identity_key(), list(stand_in.peer_identities() or []))
    if real != imitated:
        context.abort(grpc.StatusCode.INTERNAL, f"stand-in {imitated} != gRPC {real}")
    kind, text = outcomes[0]
    if kind == "refused":
        context.abort(grpc.StatusCode.UNAUTHENTICATED, text)
    peer = peer_identity(context.auth_context())
    return peer.spiffe.uri.encode() + b" " + peer.fingerprint.hex().encode() + b" " + request


@dataclass(frozen=True)
class Server:
    port: int
    ca: DomainCA
    host: HostIdentity
    ca_key: ec.EllipticCurvePrivateKey


def issue_with_san(
    server: Server, san: list[x509.GeneralName] | None, *, common_name: str = "odd"
) -> Credentials:
    """A certificate from the server's CA with exactly the SAN entries given (None: no SAN
    extension at all): shapes `DomainCA.issue` never makes, to see how a server reads them."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(server.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(server.ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Credentials(key_pem, cert)


@pytest.fixture(scope="module")
def ca_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[DomainCA, ec.EllipticCurvePrivateKey]:
    """The domain CA, and its key as read back from the files `save` writes (to sign
    certificates of shapes the CA itself never issues)."""
    directory = tmp_path_factory.mktemp("ca")
    save_domain_ca(DomainCA.create(DOMAIN, now=datetime.now(UTC)), directory)
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return load_domain_ca(directory), key


@pytest.fixture(scope="module")
def ca(ca_files: tuple[DomainCA, ec.EllipticCurvePrivateKey]) -> DomainCA:
    return ca_files[0]


@pytest.fixture(scope="module")
def other_ca() -> DomainCA:
    """A CA for the same domain id with another key: its certificates must not get in."""
    return DomainCA.create(DOMAIN, now=datetime.now(UTC))


@pytest.fixture(scope="module")
def server(ca: DomainCA, ca_files: tuple[DomainCA, ec.EllipticCurvePrivateKey]) -> Iterator[Server]:
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
        yield Server(port=port, ca=ca, host=host, ca_key=ca_files[1])
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


SPIFFE_APP = f"spiffe://{DOMAIN}/client/app-9"


@pytest.mark.parametrize(
    ("san", "expected"),
    [
        ([x509.UniformResourceIdentifier(SPIFFE_APP)], SPIFFE_APP),
        (
            [
                x509.DNSName("app.example"),
                x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                x509.UniformResourceIdentifier("https://app.example/x"),
                x509.UniformResourceIdentifier(SPIFFE_APP),
            ],
            SPIFFE_APP,
        ),
        (
            [x509.UniformResourceIdentifier(SPIFFE_APP.replace("spiffe", "SPIFFE"))],
            "malformed SPIFFE",
        ),
        ([x509.DNSName("app.example")], "no SPIFFE id"),
        (None, "no SPIFFE id"),
        (
            [
                x509.UniformResourceIdentifier(SPIFFE_APP),
                x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/client/app-10"),
            ],
            "2 SPIFFE ids",
        ),
        ([x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/robot/app")], "malformed SPIFFE"),
        ([x509.UniformResourceIdentifier(f"spiffe://{DOMAIN}/client")], "malformed SPIFFE"),
    ],
)
def test_both_ways_of_reading_the_caller_agree_on_real_handshakes(
    server: Server, san: list[x509.GeneralName] | None, expected: str
) -> None:
    """`caller_spiffe` (gRPC's SAN list) answers exactly as the certificate does, refusals
    included, for certificate shapes the domain CA never issues."""
    client = issue_with_san(server, san, common_name=SPIFFE_APP)
    with channel(server, client) as chan:
        if expected.startswith("spiffe://"):
            assert call_who_am_i(chan).split(b" ")[0].decode() == expected
            return
        with pytest.raises(grpc.RpcError) as info:
            call_who_am_i(chan)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
    assert expected in (info.value.details() or "")


# --- clients check whom they talk to ------------------------------------------------------------


@dataclass
class Impostor:
    """A server holding some certificate, counting the calls that reach its servicer."""

    port: int
    seen: list[bytes]


@pytest.fixture
def serve_as() -> Iterator[Callable[[Credentials, bytes], Impostor]]:
    """Start a server with the given certificate (trusting the given CA for clients); every
    call that reaches the servicer is recorded."""
    servers: list[grpc.Server] = []

    def start(credentials: Credentials, ca_pem: bytes) -> Impostor:
        seen: list[bytes] = []

        def record(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen.append(request)
            return b"answered"

        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servers.append(grpc_server)
        handler = grpc.method_handlers_generic_handler(
            "hsmdomain.test.Echo", {"WhoAmI": grpc.unary_unary_rpc_method_handler(record)}
        )
        grpc_server.add_generic_rpc_handlers((handler,))
        tls = transport.TlsMaterial(ca_pem, credentials.cert_pem, credentials.key_pem)
        port = grpc_server.add_secure_port("127.0.0.1:0", transport.server_credentials(tls))
        grpc_server.start()
        return Impostor(port, seen)

    yield start
    for grpc_server in servers:
        grpc_server.stop(grace=None).wait(TIMEOUT)


def legacy_server_certificate(server: Server, spiffe: SpiffeId) -> Credentials:
    """A server certificate as the CA issued them before server names: the SPIFFE URI, DNS
    localhost and the loopback IP, nothing else."""
    return issue_with_san(
        server,
        [
            x509.UniformResourceIdentifier(spiffe.uri),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
        common_name=spiffe.name,
    )


@pytest.mark.parametrize(
    ("holder", "expected", "accepted"),
    [
        (("hsa", "hsa-1"), transport.ANY_HSA, True),
        (("hsa", "hsa-1"), transport.hsa_host("hsa-1"), True),
        (("coordinator", "coordinator"), transport.COORDINATOR, True),
        # The attacks: a certificate of the domain CA, of another kind or another host.
        (("coordinator", "coordinator"), transport.ANY_HSA, False),
        (("coordinator", "coordinator"), transport.hsa_host("coordinator"), False),
        (("hsa", "hsa-2"), transport.hsa_host("hsa-1"), False),
        (("hsa", "hsa-1"), transport.COORDINATOR, False),
        (("hsa", "hsa"), transport.COORDINATOR, False),
        (("client", "hsa-1"), transport.ANY_HSA, False),
        (("client", "demo-app"), transport.hsa_host("hsa-1"), False),
        (("other-ca", "hsa-1"), transport.ANY_HSA, False),
        (("legacy", "hsa-1"), transport.ANY_HSA, False),
    ],
)
def test_a_client_channel_talks_only_to_the_server_it_expects(
    server: Server,
    other_ca: DomainCA,
    serve_as: Callable[[Credentials, bytes], Impostor],
    holder: tuple[str, str],
    expected: transport.ExpectedServer,
    accepted: bool,
) -> None:
    """A server whose certificate (from the domain CA) is not the expected role's or host's
    fails the handshake: the request never reaches its servicer, and gRPC says why."""
    kind, name = holder
    if kind == "other-ca":
        credentials = issue(other_ca, "hsa", name)
    elif kind == "legacy":
        credentials = legacy_server_certificate(server, SpiffeId(DOMAIN, "hsa", name))
    else:
        credentials = issue(server.ca, kind, name)  # type: ignore[arg-type]
    impostor = serve_as(credentials, server.ca.certificate_pem)
    client = issue(server.ca, "client", "app-1")
    with transport.secure_channel(
        f"127.0.0.1:{impostor.port}",
        server.ca.certificate_pem,
        expected,
        cert_pem=client.cert_pem,
        key_pem=client.key_pem,
    ) as chan:
        if accepted:
            assert call_who_am_i(chan, b"secret") == b"answered"
            assert impostor.seen == [b"secret"]
            return
        with pytest.raises(grpc.RpcError) as info:
            call_who_am_i(chan, b"secret")
    assert impostor.seen == []
    code, details = info.value.code(), info.value.details() or ""
    assert code == grpc.StatusCode.UNAVAILABLE
    assert transport.never_sent(code, details)
    # A certificate of this domain's CA that lacks the name: the hostname check refused it.
    assert transport.wrong_server(code, details) == (kind in ("coordinator", "hsa", "legacy"))


def test_the_expected_domain_is_the_one_the_ca_names(server: Server) -> None:
    assert transport.ANY_HSA.tls_name(DOMAIN) == f"hsa.{DOMAIN}"
    assert transport.hsa_host("hsa-3").tls_name(DOMAIN) == f"hsa-3.hsa.{DOMAIN}"
    assert transport.COORDINATOR.tls_name(DOMAIN) == f"coordinator.{DOMAIN}"
    assert transport.server_name_option(server.ca.certificate_pem, transport.ANY_HSA) == (
        "grpc.ssl_target_name_override",
        f"hsa.{DOMAIN}",
    )
    with pytest.raises(ValueError, match="kind"):
        transport.ExpectedServer("client")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ExpectedServer"):
        transport.server_name_option(server.ca.certificate_pem, "hsa")  # type: ignore[arg-type]


def test_the_coordinator_talks_only_to_the_host_it_names(
    server: Server, serve_as: Callable[[Credentials, bytes], Impostor]
) -> None:
    """The coordinator dials an HSA by its registered address: if another host (a removed
    one, say) serves that address, the coordinator's calls (ApplyProposal, InstallState) must
    not reach it. `HsaConnections` expects the host id it was given."""
    coordinator = issue(server.ca, "coordinator", "coordinator")
    tls = transport.TlsMaterial(
        server.ca.certificate_pem, coordinator.cert_pem, coordinator.key_pem
    )
    other_host = ImpostorServer(
        transport.TlsMaterial(server.ca.certificate_pem, *_cert_and_key(server, "hsa-2")),
        service="HsaAdmin",
    )
    connections = HsaConnections(tls, timeout=5.0)
    with other_host:
        with pytest.raises(grpc.RpcError) as refused:
            connections.get_status(other_host.address, host_id="hsa-1")
        assert transport.wrong_server(refused.value.code(), refused.value.details() or "")
        with pytest.raises(grpc.RpcError):
            connections.install_state(other_host.address, domain_pb2.SealedState(), host_id="hsa-1")
        assert other_host.seen == []
        # The host that does hold that certificate is reached (an empty status comes back).
        assert connections.get_status(other_host.address, host_id="hsa-2").version == 0
        assert [method for method, _ in other_host.seen] == ["GetStatus"]
    connections.close()


def _cert_and_key(server: Server, host_id: str) -> tuple[bytes, bytes]:
    credentials = issue(server.ca, "hsa", host_id)
    return credentials.cert_pem, credentials.key_pem
