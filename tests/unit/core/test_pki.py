"""Tests for domain_core.pki: SPIFFE ids, the domain CA, issued certificates, peer identities."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
    UnauthenticatedError,
    WrongPassphraseError,
)
from domain_core.pki import (
    DomainCA,
    PeerIdentity,
    SpiffeId,
    SpiffeKind,
    ca_trust_domain,
    certificate_fingerprint,
    identity_dns_name,
    peer_identity,
    role_dns_name,
    spiffe_id_from_certificate,
    spiffe_id_from_san_values,
    verify_certificate_chain,
)
from domain_edge.ca_files import (
    CA_CERTIFICATE_FILE,
    CA_KEY_FILE,
    load_domain_ca,
    save_domain_ca,
)

pytestmark = pytest.mark.unit

DOMAIN = "example.org"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
KINDS: list[SpiffeKind] = ["hsa", "coordinator", "client"]


@pytest.fixture(scope="module")
def ca() -> DomainCA:
    return DomainCA.create(DOMAIN, now=NOW)


@pytest.fixture(scope="module")
def other_ca() -> DomainCA:
    """Another CA for the same domain id: same names, different key."""
    return DomainCA.create(DOMAIN, now=NOW)


def p256_public() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def self_signed(san: list[x509.GeneralName] | None) -> bytes:
    """A throwaway self-signed certificate with the given SAN entries (None: no SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- SPIFFE ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://example.org/hsa/hsa-1", SpiffeId("example.org", "hsa", "hsa-1")),
        ("spiffe://dom1/client/app", SpiffeId("dom1", "client", "app")),
        ("spiffe://a.b-c.d/coordinator/c0", SpiffeId("a.b-c.d", "coordinator", "c0")),
        ("spiffe://d/hsa/" + "a" * 63, SpiffeId("d", "hsa", "a" * 63)),
    ],
)
def test_spiffe_id_parse_valid(uri: str, expected: SpiffeId) -> None:
    parsed = SpiffeId.parse(uri)
    assert parsed == expected
    assert parsed.uri == uri
    assert str(parsed) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "example.org/hsa/x",
        "http://example.org/hsa/x",
        "SPIFFE://example.org/hsa/x",
        "spiffe:example.org/hsa/x",
        "spiffe://",
        "spiffe://example.org",
        "spiffe://example.org/",
        "spiffe://example.org/hsa",
        "spiffe://example.org/hsa/",
        "spiffe://example.org/hsa/x/",
        "spiffe://example.org/hsa/x/y",
        "spiffe://example.org//hsa/x",
        "spiffe:///hsa/x",
        "spiffe://Example.org/hsa/x",
        "spiffe://example.org/HSA/x",
        "spiffe://example.org/admin/x",
        "spiffe://example.org/hsa/X",
        "spiffe://example.org/hsa/x_1",
        "spiffe://example.org/hsa/-x",
        "spiffe://example.org/hsa/x-",
        "spiffe://example.org/hsa/" + "a" * 64,
        "spiffe://example.org:443/hsa/x",
        "spiffe://user@example.org/hsa/x",
        "spiffe://example.org/hsa/x?q=1",
        "spiffe://example.org/hsa/x#frag",
        "spiffe://example.org/hsa/x%41",
        "spiffe://example.org/hsa/x\n",
        " spiffe://example.org/hsa/x",
        "spiffe://-example.org/hsa/x",
        "spiffe://example.org./hsa/x",
        "spiffe://.example.org/hsa/x",
        "spiffe://example..org/hsa/x",
        "spiffe://" + ".".join(["a" * 63] * 4) + "/hsa/x",  # 255 > 253 characters
        "spiffe://exämple.org/hsa/x",
    ],
)
def test_spiffe_id_parse_rejects_malformed(uri: str) -> None:
    with pytest.raises(InvalidInputError):
        SpiffeId.parse(uri)


def test_spiffe_id_parse_rejects_non_strings() -> None:
    with pytest.raises(InvalidInputError):
        SpiffeId.parse(b"spiffe://example.org/hsa/x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("domain", "kind", "name"),
    [("example.org", "admin", "x"), ("Example", "hsa", "x"), ("d", "hsa", ""), ("d", "hsa", "a/b")],
)
def test_spiffe_id_constructor_validates(domain: str, kind: str, name: str) -> None:
    with pytest.raises(InvalidInputError):
        SpiffeId(domain, kind, name)  # type: ignore[arg-type]


# --- the CA ----------------------------------------------------------------------------------


def test_ca_certificate(ca: DomainCA) -> None:
    cert = load(ca.certificate_pem)
    assert ca.domain_id == DOMAIN
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        f"hsm-domain CA {DOMAIN}"
    )
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "hsm-domain"
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(public)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{DOMAIN}"]
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_ca_create_validates(fixed_now: datetime) -> None:
    with pytest.raises(ValueError, match="domain id"):
        DomainCA.create("Bad Domain", now=fixed_now)
    with pytest.raises(ValueError, match="timezone-aware"):
        DomainCA.create(DOMAIN, now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="validity_days"):
        DomainCA.create(DOMAIN, now=fixed_now, validity_days=0)


# --- issued certificates ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_issued_certificate(ca: DomainCA, kind: SpiffeKind) -> None:
    spiffe = SpiffeId(DOMAIN, kind, "node-1")
    public = p256_public()
    pem = ca.issue(spiffe, public, now=NOW)
    cert = load(pem)
    cert.verify_directly_issued_by(load(ca.certificate_pem))
    verify_certificate_chain(pem, ca.certificate_pem, NOW)
    assert cert.public_key() == public
    assert cert.issuer == load(ca.certificate_pem).subject

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe.uri]
    derived = [] if kind == "client" else [f"node-1.{kind}.{DOMAIN}", f"{kind}.{DOMAIN}"]
    assert san.get_values_for_type(x509.DNSName) == [*derived, "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert spiffe_id_from_certificate(pem) == spiffe

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if kind == "client":
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.key_encipherment
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = load(ca.certificate_pem).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ca_ski.value.digest

    assert 0 < cert.serial_number < 2**159
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_serials_are_random(ca: DomainCA) -> None:
    spiffe = SpiffeId(DOMAIN, "hsa", "a")
    serials = {load(ca.issue(spiffe, p256_public(), now=NOW)).serial_number for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_issued_certificate_passes_an_rfc5280_client_verifier(
    ca: DomainCA, kind: SpiffeKind
) -> None:
    """cryptography's own path validator accepts our certificates as TLS clients."""
    pem = ca.issue(SpiffeId(DOMAIN, kind, "n"), p256_public(), now=NOW)
    verifier = PolicyBuilder().store(Store([ca.certificate])).time(NOW).build_client_verifier()
    verified = verifier.verify(load(pem), [])
    assert verified.subjects is not None


@pytest.mark.parametrize("kind", KINDS)
def test_only_hosts_and_coordinators_pass_a_server_verifier(ca: DomainCA, kind: SpiffeKind) -> None:
    pem = ca.issue(SpiffeId(DOMAIN, kind, "n"), p256_public(), now=NOW)
    builder = PolicyBuilder().store(Store([ca.certificate])).time(NOW)
    for subject in (
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier = builder.build_server_verifier(subject)
        if kind == "client":
            with pytest.raises(VerificationError):
                verifier.verify(load(pem), [])
        else:
            verifier.verify(load(pem), [])


def test_custom_dns_names_and_ips(ca: DomainCA) -> None:
    pem = ca.issue(
        SpiffeId(DOMAIN, "hsa", "h"),
        p256_public(),
        now=NOW,
        dns_names=["hsa-1.internal"],
        ip_addresses=["10.0.0.7"],
    )
    san = load(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        f"h.hsa.{DOMAIN}",
        f"hsa.{DOMAIN}",
        "hsa-1.internal",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


# --- the role and identity DNS names clients check servers for -------------------------------


def test_role_and_identity_names_follow_the_spiffe_id() -> None:
    assert role_dns_name(DOMAIN, "hsa") == "hsa.example.org"
    assert role_dns_name(DOMAIN, "coordinator") == "coordinator.example.org"
    assert identity_dns_name(SpiffeId(DOMAIN, "hsa", "hsa-2")) == "hsa-2.hsa.example.org"
    assert identity_dns_name(SpiffeId(DOMAIN, "coordinator", "c")) == "c.coordinator.example.org"
    with pytest.raises(ValueError, match="role name"):
        role_dns_name(DOMAIN, "client")
    with pytest.raises(ValueError, match="role name"):
        identity_dns_name(SpiffeId(DOMAIN, "client", "demo-app"))


@pytest.mark.parametrize("domain", ["local", "example.org", "hsa.local", "coordinator.hsa"])
def test_names_of_different_kinds_and_identities_never_collide(domain: str) -> None:
    """Every server name the CA can put in one domain's certificates names one thing only."""
    names: dict[str, str] = {}
    for kind in ("hsa", "coordinator"):
        role = role_dns_name(domain, kind)
        assert names.setdefault(role, f"role {kind}") == f"role {kind}"
        for name in ("hsa", "coordinator", "client", "hsa-1", "a"):
            spiffe = SpiffeId(domain, kind, name)  # type: ignore[arg-type]
            what = spiffe.uri
            assert names.setdefault(identity_dns_name(spiffe), what) == what


@pytest.mark.parametrize(
    "name",
    [
        f"hsa.{DOMAIN}",
        f"HSA.{DOMAIN.upper()}",
        f"hsa-1.hsa.{DOMAIN}",
        f"coordinator.{DOMAIN}",
        f"x.coordinator.{DOMAIN}.",
        f"client.{DOMAIN}",
        f"deep.name.hsa.{DOMAIN}",
    ],
)
def test_a_certificate_cannot_be_given_another_identitys_name(ca: DomainCA, name: str) -> None:
    """The attack: a client (or coordinator) certificate that carries the HSA role name would
    pass a client's check for "an HSA". The CA refuses to issue it."""
    for kind in KINDS:
        with pytest.raises(ValueError, match="reserved"):
            ca.issue(SpiffeId(DOMAIN, kind, "c"), p256_public(), now=NOW, dns_names=[name])


@pytest.mark.parametrize("name", ["*.example.org", "*", f"*.hsa.{DOMAIN}", "h*.org"])
def test_wildcard_names_are_refused(ca: DomainCA, name: str) -> None:
    """gRPC matches a wildcard certificate name against the name it expects (measured): a
    certificate with `*.example.org` would pass for `hsa.example.org`."""
    with pytest.raises(ValueError, match="wildcard"):
        ca.issue(SpiffeId(DOMAIN, "coordinator", "c"), p256_public(), now=NOW, dns_names=[name])


def test_the_trust_domain_comes_from_the_ca_certificate(ca: DomainCA) -> None:
    assert ca_trust_domain(ca.certificate_pem) == DOMAIN
    assert ca_trust_domain(load(ca.certificate_pem).public_bytes(serialization.Encoding.DER)) == (
        DOMAIN
    )
    leaf = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    with pytest.raises(InvalidInputError, match="not the certificate of a domain CA"):
        ca_trust_domain(leaf)
    with pytest.raises(InvalidInputError, match="does not parse"):
        ca_trust_domain(b"not a certificate")


def test_ed25519_leaf_key_is_refused(ca: DomainCA) -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError, match="P-256"):
        ca.issue(SpiffeId(DOMAIN, "hsa", "h"), key, now=NOW)  # type: ignore[arg-type]


def test_p384_leaf_key_is_refused(ca: DomainCA) -> None:
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        ca.issue(SpiffeId(DOMAIN, "hsa", "h"), key, now=NOW)


def test_ca_issues_only_for_its_domain(ca: DomainCA) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        ca.issue(SpiffeId("other.org", "hsa", "h"), p256_public(), now=NOW)


def test_leaf_never_outlives_the_ca() -> None:
    short = DomainCA.create(DOMAIN, now=NOW, validity_days=30)
    pem = short.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    assert load(pem).not_valid_after_utc == short.certificate.not_valid_after_utc
    with pytest.raises(ValueError, match="CA is not valid"):
        short.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW + timedelta(days=31))


# --- fingerprints and SPIFFE ids from certificates -------------------------------------------


def test_fingerprint_is_sha256_of_der(ca: DomainCA) -> None:
    pem = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    der = load(pem).public_bytes(serialization.Encoding.DER)
    assert certificate_fingerprint(pem) == hashlib.sha256(der).digest()
    assert certificate_fingerprint(der) == hashlib.sha256(der).digest()
    assert len(certificate_fingerprint(pem)) == 32
    other = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    assert certificate_fingerprint(other) != certificate_fingerprint(pem)


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAA==\n"])
def test_fingerprint_of_garbage(data: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        certificate_fingerprint(data)


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (None, "no SPIFFE id"),
        ([x509.DNSName("localhost")], "no SPIFFE id"),
        ([x509.UniformResourceIdentifier("https://example.org/hsa/x")], "no SPIFFE id"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://example.org/hsa/a"),
                x509.UniformResourceIdentifier("spiffe://example.org/hsa/b"),
            ],
            "exactly one",
        ),
        ([x509.UniformResourceIdentifier("spiffe://example.org/root/a")], "malformed"),
        ([x509.UniformResourceIdentifier("SPIFFE://example.org/hsa/a")], "malformed"),
    ],
)
def test_spiffe_id_from_bad_certificates(san: list[x509.GeneralName] | None, reason: str) -> None:
    with pytest.raises(UnauthenticatedError, match=reason):
        spiffe_id_from_certificate(self_signed(san))


def test_spiffe_id_from_garbage() -> None:
    with pytest.raises(UnauthenticatedError):
        spiffe_id_from_certificate(b"not a certificate")


def test_peer_identity(ca: DomainCA) -> None:
    spiffe = SpiffeId(DOMAIN, "client", "app-1")
    pem = ca.issue(spiffe, p256_public(), now=NOW)
    context = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [pem],
        "x509_subject_alternative_name": [spiffe.uri.encode()],
    }
    peer = peer_identity(context)
    assert peer == PeerIdentity(
        spiffe=spiffe, certificate_pem=pem, fingerprint=certificate_fingerprint(pem)
    )


@pytest.mark.parametrize(
    "context",
    [{}, {"x509_pem_cert": []}, {"transport_security_type": [b"ssl"]}],
)
def test_peer_identity_without_certificate(context: dict[str, list[bytes]]) -> None:
    with pytest.raises(UnauthenticatedError, match="presented no client certificate"):
        peer_identity(context)


def test_peer_identity_without_spiffe_id() -> None:
    with pytest.raises(UnauthenticatedError, match="no SPIFFE id"):
        peer_identity({"x509_pem_cert": [self_signed([x509.DNSName("localhost")])]})


def test_peer_identity_accepts_a_bare_bytes_value_and_tuples(ca: DomainCA) -> None:
    pem = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    assert peer_identity({"x509_pem_cert": pem}).spiffe.name == "h"
    assert peer_identity({"x509_pem_cert": (pem,)}).spiffe.name == "h"
    with pytest.raises(UnauthenticatedError, match="more than one"):
        peer_identity({"x509_pem_cert": [pem, pem]})


def test_peer_identity_cache_never_answers_for_another_certificate(ca: DomainCA) -> None:
    # Same SPIFFE id, different keys: the parsed identity is remembered by the exact bytes,
    # so each certificate keeps its own fingerprint however often they alternate.
    spiffe = SpiffeId(DOMAIN, "hsa", "rotated")
    first = ca.issue(spiffe, p256_public(), now=NOW)
    second = ca.issue(spiffe, p256_public(), now=NOW)
    other = ca.issue(SpiffeId(DOMAIN, "client", "other"), p256_public(), now=NOW)
    for _ in range(3):
        for pem in (first, second, other):
            peer = peer_identity({"x509_pem_cert": [pem]})
            assert peer.certificate_pem == pem
            assert peer.fingerprint == certificate_fingerprint(pem)
    assert peer_identity({"x509_pem_cert": [other]}).spiffe == SpiffeId(DOMAIN, "client", "other")
    # One byte more (a trailing newline) is other bytes: parsed, not looked up.
    assert peer_identity({"x509_pem_cert": [first + b"\n"]}).certificate_pem == first + b"\n"


def test_peer_identity_cache_is_bounded_and_keeps_no_failure(ca: DomainCA) -> None:
    from domain_core import pki
    from domain_core.pki import _certificates

    bad = self_signed([x509.DNSName("localhost")])
    for _ in range(2):  # a refusal is not remembered: it is refused again, with its reason
        with pytest.raises(UnauthenticatedError, match="no SPIFFE id"):
            peer_identity({"x509_pem_cert": [bad]})
    with pytest.raises(UnauthenticatedError, match="does not parse"):
        peer_identity({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\ngarbage"]})
    info = _certificates._identity_of_certificate.cache_info()
    assert info.maxsize == pki.PEER_IDENTITY_CACHE_ENTRIES
    assert info.currsize <= info.maxsize


# --- chain verification ----------------------------------------------------------------------


def test_certificate_from_another_ca_fails(ca: DomainCA, other_ca: DomainCA) -> None:
    pem = other_ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    with pytest.raises(BadSignatureError, match="not issued by"):
        verify_certificate_chain(pem, ca.certificate_pem, NOW)
    verify_certificate_chain(pem, other_ca.certificate_pem, NOW)


def test_tampered_certificate_fails(ca: DomainCA) -> None:
    der = bytearray(
        load(ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)).public_bytes(
            serialization.Encoding.DER
        )
    )
    index = der.find(b"localhost")
    der[index] ^= 0x01  # "mocalhost": still parses, no longer what the CA signed
    with pytest.raises(BadSignatureError):
        verify_certificate_chain(bytes(der), ca.certificate_pem, NOW)


@pytest.mark.parametrize(
    ("when", "reason"),
    [
        (NOW + timedelta(days=366), "expired"),
        (NOW - timedelta(minutes=6), "not valid before"),
    ],
)
def test_certificate_outside_its_validity_fails(ca: DomainCA, when: datetime, reason: str) -> None:
    pem = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    with pytest.raises(UnauthenticatedError, match=reason):
        verify_certificate_chain(pem, ca.certificate_pem, when)
    verify_certificate_chain(pem, ca.certificate_pem, NOW + timedelta(days=364))


def test_expired_ca_fails() -> None:
    short = DomainCA.create(DOMAIN, now=NOW, validity_days=1)
    pem = short.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    with pytest.raises(UnauthenticatedError, match="expired"):
        verify_certificate_chain(pem, short.certificate_pem, NOW + timedelta(days=2))


def test_ca_certificate_is_not_a_leaf(ca: DomainCA) -> None:
    with pytest.raises(UnauthenticatedError, match="not a leaf"):
        verify_certificate_chain(ca.certificate_pem, ca.certificate_pem, NOW)


def test_leaf_is_not_a_ca(ca: DomainCA) -> None:
    leaf = ca.issue(SpiffeId(DOMAIN, "hsa", "h"), p256_public(), now=NOW)
    with pytest.raises(UnauthenticatedError, match="not a CA"):
        verify_certificate_chain(leaf, leaf, NOW)


def test_chain_verification_of_garbage(ca: DomainCA) -> None:
    with pytest.raises(UnauthenticatedError):
        verify_certificate_chain(b"garbage", ca.certificate_pem, NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_certificate_chain(ca.certificate_pem, ca.certificate_pem, datetime(2026, 1, 1))


# --- saving and loading the CA ---------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ca_save_load_roundtrip(tmp_path: Path, ca: DomainCA) -> None:
    directory = tmp_path / "ca"
    save_domain_ca(ca, directory)
    assert mode(directory) == 0o700
    assert mode(directory / CA_KEY_FILE) == 0o600
    assert mode(directory / CA_CERTIFICATE_FILE) == 0o644
    loaded = load_domain_ca(directory)
    assert loaded.certificate_pem == ca.certificate_pem
    assert loaded.domain_id == DOMAIN
    pem = loaded.issue(SpiffeId(DOMAIN, "client", "c"), p256_public(), now=NOW)
    verify_certificate_chain(pem, ca.certificate_pem, NOW)


def test_ca_save_refuses_to_overwrite(tmp_path: Path, ca: DomainCA) -> None:
    save_domain_ca(ca, tmp_path)
    before = (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_domain_ca(DomainCA.create(DOMAIN, now=NOW), tmp_path)
    assert (tmp_path / CA_KEY_FILE).read_bytes() == before


def test_ca_load_refuses_loose_key_file(tmp_path: Path, ca: DomainCA) -> None:
    save_domain_ca(ca, tmp_path)
    os.chmod(tmp_path / CA_KEY_FILE, 0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_domain_ca(tmp_path)


def test_ca_load_missing(tmp_path: Path, ca: DomainCA) -> None:
    with pytest.raises(TokenNotFoundError):
        load_domain_ca(tmp_path)
    save_domain_ca(ca, tmp_path)
    (tmp_path / CA_KEY_FILE).unlink()
    with pytest.raises(TokenNotFoundError):
        load_domain_ca(tmp_path)


def test_ca_load_refuses_mismatched_key(tmp_path: Path, ca: DomainCA, other_ca: DomainCA) -> None:
    save_domain_ca(ca, tmp_path / "a")
    save_domain_ca(other_ca, tmp_path / "b")
    os.replace(tmp_path / "b" / CA_KEY_FILE, tmp_path / "a" / CA_KEY_FILE)
    with pytest.raises(TokenError, match="does not match"):
        load_domain_ca(tmp_path / "a")


def test_ca_with_passphrase(tmp_path: Path, ca: DomainCA) -> None:
    passphrase = b"ca passphrase 91c2e"
    save_domain_ca(ca, tmp_path, passphrase=passphrase)
    assert passphrase not in (tmp_path / CA_KEY_FILE).read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / CA_KEY_FILE).read_bytes()
    with pytest.raises(TokenError, match="encrypted"):
        load_domain_ca(tmp_path)
    with pytest.raises(WrongPassphraseError) as info:
        load_domain_ca(tmp_path, passphrase=b"wrong")
    assert passphrase.decode() not in str(info.value)
    assert load_domain_ca(tmp_path, passphrase=lambda: passphrase).domain_id == DOMAIN


def test_ca_repr_has_no_key(ca: DomainCA) -> None:
    assert repr(ca) == f"DomainCA({DOMAIN!r})"


# --- the SAN list gRPC hands out (the key service's hot path) ---------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((b"spiffe://example.org/client/app",), SpiffeId(DOMAIN, "client", "app")),
        (
            (b"localhost", b"127.0.0.1", b"::1", b"spiffe://example.org/hsa/h-1"),
            SpiffeId(DOMAIN, "hsa", "h-1"),
        ),
        (
            (b"https://example.org/x", b"spiffe://example.org/client/a"),
            SpiffeId(DOMAIN, "client", "a"),
        ),
    ],
)
def test_spiffe_id_from_san_values(values: tuple[bytes, ...], expected: SpiffeId) -> None:
    assert spiffe_id_from_san_values(values) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((), "no SPIFFE id"),
        ((b"localhost", b"127.0.0.1"), "no SPIFFE id"),
        ((b"spiffe://example.org/client/a", b"spiffe://example.org/client/b"), "2 SPIFFE ids"),
        ((b"SPIFFE://example.org/client/a",), "malformed SPIFFE id"),
        ((b"spiffe://example.org/client/\xc3\xa9",), "malformed SPIFFE id"),
        ((b"spiffe://example.org/client",), "malformed SPIFFE id"),
    ],
)
def test_spiffe_id_from_san_values_refuses_what_a_certificate_would(
    values: tuple[bytes, ...], message: str
) -> None:
    for _ in range(2):  # refusals are not remembered: each call raises again
        with pytest.raises(UnauthenticatedError, match=message):
            spiffe_id_from_san_values(values)


def test_san_values_and_certificate_give_the_same_id(ca: DomainCA) -> None:
    pem = ca.issue(SpiffeId(DOMAIN, "client", "app-7"), p256_public(), now=NOW)
    san = load(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    values = tuple(
        str(v).encode()
        for t in (x509.DNSName, x509.UniformResourceIdentifier, x509.IPAddress)
        for v in san.get_values_for_type(t)
    )
    assert spiffe_id_from_san_values(values) == spiffe_id_from_certificate(pem)


def test_a_ca_certificate_whose_extensions_do_not_parse_is_a_domain_error(ca: DomainCA) -> None:
    """A flipped byte inside an extension (a genesis's CA certificate is not covered by the
    state hash) is refused as malformed, never an exception from the X.509 library."""
    from domain_core.errors import MalformedMessageError
    from domain_core.pki import check_domain_ca

    der = ca.certificate_der
    oid = der.index(bytes.fromhex("551d13"))  # id-ce-basicConstraints
    value = der.index(b"\x04", oid + 3)  # the extension's OCTET STRING, after "critical"
    ca_true = der.index(bytes.fromhex("0101ff"), value)  # BOOLEAN TRUE inside it
    broken = der[:ca_true] + bytes.fromhex("0102ff") + der[ca_true + 3 :]
    with pytest.raises(MalformedMessageError, match="extensions do not parse"):
        check_domain_ca(broken, DOMAIN)
