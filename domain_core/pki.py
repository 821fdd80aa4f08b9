"""The domain CA and its SPIFFE-style TLS certificates, and reading identities off peers.

Invariants kept here:
- every certificate the CA issues has a P-256 key (gRPC's TLS stack refuses Ed25519 leaves),
  exactly one SPIFFE URI `spiffe://<domain>/<kind>/<name>` in its subject alternative names,
  plus the DNS names and IP addresses a client dials, `CA:FALSE`, digitalSignature only, and an
  extended key usage per kind: hosts and coordinators serve and call (serverAuth + clientAuth),
  clients only call (clientAuth);
- every server certificate (kinds hsa and coordinator) also carries two DNS names derived from
  its SPIFFE id and nothing else: the identity name `<name>.<kind>.<domain>` and the role name
  `<kind>.<domain>` (`identity_dns_name`, `role_dns_name`). Clients check the server they dial
  for one of them (`domain_edge.transport.ExpectedServer`), so a certificate of another kind or
  host fails the TLS handshake. The names of different kinds and identities never collide (the
  kind is always the label right before the domain, and a role name has one label fewer), and
  the CA refuses to put a name of that namespace, or a wildcard, anywhere else;
- the CA signs only for its own trust domain and never past its own expiry;
- a `SpiffeId` exists only in its strict form: lower-case DNS-style trust domain, a kind from
  {hsa, coordinator, client}, one lower-case name; nothing else (no port, query, extra path);
- a peer identity comes from the certificate gRPC verified in the handshake; a peer with no
  certificate, or whose certificate carries no or several SPIFFE ids, is UnauthenticatedError.
  Parsed identities are remembered by the certificate's exact bytes (bounded LRU), so a
  cached identity is only ever returned for the very bytes it was parsed from.

Time is always passed in (`now=`, timezone-aware) so tests control it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, cast, get_args

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    UnauthenticatedError,
)
from domain_core.signers import PublicKey, SignatureAlgorithm

__all__ = [
    "PEER_IDENTITY_CACHE_ENTRIES",
    "SERVER_KINDS",
    "SPIFFE_KINDS",
    "DomainCA",
    "PeerIdentity",
    "SpiffeId",
    "SpiffeKind",
    "ca_trust_domain",
    "certificate_der",
    "certificate_fingerprint",
    "certificate_public_key",
    "check_domain_ca",
    "identity_dns_name",
    "is_valid_name",
    "is_valid_trust_domain",
    "parse_certificate",
    "peer_identity",
    "role_dns_name",
    "spiffe_id_from_certificate",
    "spiffe_id_from_san_values",
    "verify_certificate_chain",
]

SpiffeKind = Literal["hsa", "coordinator", "client"]
SPIFFE_KINDS: Final[tuple[str, ...]] = get_args(SpiffeKind)
# The kinds that serve: their certificates carry the role and identity DNS names.
SERVER_KINDS: Final[tuple[str, ...]] = ("hsa", "coordinator")
_MAX_DNS_NAME_LENGTH: Final = 253

_BACKDATE: Final = timedelta(minutes=5)
_MAX_TRUST_DOMAIN_LENGTH: Final = 253
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE: Final = re.compile(_LABEL)
_TRUST_DOMAIN_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SPIFFE_PREFIX: Final = "spiffe://"
# Peer certificates whose parsed identity is kept (`peer_identity`); one per client usually.
PEER_IDENTITY_CACHE_ENTRIES: Final = 1024


def is_valid_name(name: object) -> bool:
    """Whether `name` is a valid host id or SPIFFE name: a lower-case DNS label (1-63 chars)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def is_valid_trust_domain(domain: object) -> bool:
    """Whether `domain` is a valid trust domain: dot-separated lower-case DNS labels."""
    return (
        isinstance(domain, str)
        and len(domain) <= _MAX_TRUST_DOMAIN_LENGTH
        and _TRUST_DOMAIN_RE.fullmatch(domain) is not None
    )


def _require_aware(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


# --- SPIFFE ids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpiffeId:
    """A SPIFFE-style identity `spiffe://<domain>/<kind>/<name>`, valid by construction."""

    domain: str
    kind: SpiffeKind
    name: str

    def __post_init__(self) -> None:
        if not is_valid_trust_domain(self.domain):
            raise InvalidInputError(
                f"invalid trust domain {str(self.domain)[:80]!r}: use lower-case letters, "
                "digits, '-' and '.'"
            )
        if self.kind not in SPIFFE_KINDS:
            raise InvalidInputError(
                f"invalid SPIFFE kind {str(self.kind)[:40]!r}: use one of {', '.join(SPIFFE_KINDS)}"
            )
        if not is_valid_name(self.name):
            raise InvalidInputError(
                f"invalid SPIFFE name {str(self.name)[:80]!r}: use 1-63 lower-case letters, "
                "digits and '-', not starting or ending with '-'"
            )

    @property
    def uri(self) -> str:
        """The URI form, as carried in certificates."""
        return f"{_SPIFFE_PREFIX}{self.domain}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse the strict URI form; InvalidInputError for anything else."""
        if not isinstance(uri, str):
            raise InvalidInputError("a SPIFFE id must be a string")
        shown = uri[:120]
        if not uri.startswith(_SPIFFE_PREFIX):
            raise InvalidInputError(f"{shown!r} is not a SPIFFE id: it must start with spiffe://")
        parts = uri[len(_SPIFFE_PREFIX) :].split("/")
        if len(parts) != 3:
            raise InvalidInputError(
                f"{shown!r} is not a SPIFFE id of the form spiffe://<domain>/<kind>/<name>"
            )
        domain, kind, name = parts
        if kind not in SPIFFE_KINDS:
            raise InvalidInputError(
                f"{shown!r}: kind {kind[:40]!r} is not one of {', '.join(SPIFFE_KINDS)}"
            )
        return cls(domain, cast(SpiffeKind, kind), name)


def role_dns_name(domain: str, kind: str) -> str:
    """`<kind>.<domain>`: the DNS name every server certificate of `kind` in `domain` carries.

    A client that may talk to any server of one kind (an application to any HSA) checks the
    server's certificate for it in the TLS handshake.
    """
    if not is_valid_trust_domain(domain):
        raise ValueError(f"invalid trust domain {str(domain)[:80]!r}")
    if kind not in SERVER_KINDS:
        raise ValueError(f"only {' and '.join(SERVER_KINDS)} certificates carry a role name")
    return f"{kind}.{domain}"


def identity_dns_name(spiffe: SpiffeId) -> str:
    """`<name>.<kind>.<domain>`: the DNS name that the server certificate of exactly `spiffe`
    carries. A client that knows which host it dials checks the server's certificate for it."""
    if not isinstance(spiffe, SpiffeId):
        raise TypeError("spiffe must be a SpiffeId")
    return f"{spiffe.name}.{role_dns_name(spiffe.domain, spiffe.kind)}"


def _in_reserved_namespace(name: str, domain: str) -> bool:
    """Whether a DNS name is, or is under, a role name of `domain` (any kind)."""
    lowered = name.lower().rstrip(".")
    return any(
        lowered == f"{kind}.{domain}" or lowered.endswith(f".{kind}.{domain}")
        for kind in SPIFFE_KINDS
    )


# --- certificates ----------------------------------------------------------------------------


def parse_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes; MalformedMessageError if neither parses."""
    if not isinstance(data, bytes):
        raise TypeError("certificate must be bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise MalformedMessageError("not a valid X.509 certificate (PEM or DER)") from None


def certificate_der(cert_pem_or_der: bytes) -> bytes:
    """The DER encoding of a certificate given as PEM or DER."""
    return parse_certificate(cert_pem_or_der).public_bytes(serialization.Encoding.DER)


def certificate_fingerprint(cert_pem_or_der: bytes) -> bytes:
    """SHA-256 of the certificate's DER encoding (32 bytes), given PEM or DER."""
    cert = parse_certificate(cert_pem_or_der)
    return cert.fingerprint(hashes.SHA256())


def _spiffe_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        uri
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri[: len(_SPIFFE_PREFIX)].lower() == _SPIFFE_PREFIX
    ]


def spiffe_id_from_certificate(cert_pem: bytes) -> SpiffeId:
    """The one SPIFFE id in a certificate's SAN (PEM or DER); UnauthenticatedError otherwise."""
    try:
        cert = parse_certificate(cert_pem)
    except MalformedMessageError:
        raise UnauthenticatedError("the peer certificate does not parse") from None
    return _the_spiffe_id(_spiffe_uris(cert))


def _the_spiffe_id(uris: Sequence[str]) -> SpiffeId:
    """The rule every reading of a peer shares: exactly one spiffe:// URI, parsed strictly."""
    if not uris:
        raise UnauthenticatedError("peer certificate carries no SPIFFE id")
    if len(uris) > 1:
        raise UnauthenticatedError(
            f"peer certificate carries {len(uris)} SPIFFE ids; exactly one is allowed"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidInputError as exc:
        raise UnauthenticatedError(
            f"peer certificate carries a malformed SPIFFE id: {exc.message}"
        ) from None


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other end of a mutually authenticated gRPC call."""

    spiffe: SpiffeId
    certificate_pem: bytes
    fingerprint: bytes


def peer_identity(auth_context: Mapping[str, Iterable[bytes] | bytes]) -> PeerIdentity:
    """The peer's identity from `grpc.ServicerContext.auth_context()` (sync or aio).

    Trusts the handshake to have verified the chain against the domain CA; callers that need
    more (a host in the current domain state) compare `fingerprint` themselves. Values are lists
    of bytes at runtime; a bare `bytes` (as grpc-stubs types the sync context) is accepted too.
    """
    value = auth_context.get("x509_pem_cert") or []
    certs = [value] if isinstance(value, bytes) else list(value)
    if not certs:
        raise UnauthenticatedError("the peer presented no client certificate")
    if len(certs) != 1:
        raise UnauthenticatedError("the peer presented more than one leaf certificate")
    return _identity_of_certificate(bytes(certs[0]).rstrip(b"\x00"))


@functools.lru_cache(maxsize=PEER_IDENTITY_CACHE_ENTRIES)
def _identity_of_certificate(pem: bytes) -> PeerIdentity:
    """The identity a verified peer certificate carries, remembered by its exact bytes.

    Parsing a certificate costs more than the rest of a key-service call's bookkeeping, and
    every call of a connection presents the same bytes. The result is a pure function of the
    bytes (the handshake, not this, decides whether they are trusted), so a cache keyed on
    them returns exactly what parsing would; a certificate that does not parse raises every
    time (exceptions are not cached). Bounded, least recently used first out; thread-safe.
    """
    spiffe = spiffe_id_from_certificate(pem)
    return PeerIdentity(
        spiffe=spiffe, certificate_pem=pem, fingerprint=certificate_fingerprint(pem)
    )


_SPIFFE_PREFIX_BYTES: Final = _SPIFFE_PREFIX.encode("ascii")


@functools.lru_cache(maxsize=PEER_IDENTITY_CACHE_ENTRIES)
def spiffe_id_from_san_values(values: tuple[bytes, ...]) -> SpiffeId:
    """The one SPIFFE id among a verified peer's subject alternative names, as gRPC lists them
    (`ServicerContext.peer_identities()` when `peer_identity_key()` is the SAN property).

    The same rule as `spiffe_id_from_certificate`: exactly one value starting with spiffe://
    (any case), parsed strictly. gRPC flattens the DNS, URI, e-mail and IP entries into one
    list; only a URI can start with spiffe:// (a DNS name or an address cannot hold ':' and
    '/', and the domain CA issues no e-mail names). For the key service's hot path: it avoids
    building the whole auth context and hashing the certificate on every call. Remembered by
    the exact values (thread-safe, bounded); refusals raise every time.
    """
    prefix = _SPIFFE_PREFIX_BYTES
    return _the_spiffe_id(
        [
            v.decode("ascii", "backslashreplace")
            for v in values
            if v[: len(prefix)].lower() == prefix
        ]
    )


def verify_certificate_chain(cert_pem: bytes, ca_cert_pem: bytes, now: datetime) -> None:
    """Check that `cert_pem` was issued by the CA `ca_cert_pem` and both are valid at `now`.

    For certificates received outside TLS (enrollment files). BadSignatureError if the CA did
    not sign it, UnauthenticatedError if it is expired, not yet valid, or not a leaf.
    """
    _require_aware(now)
    try:
        cert = parse_certificate(cert_pem)
        ca = parse_certificate(ca_cert_pem)
    except MalformedMessageError as exc:
        raise UnauthenticatedError(exc.message) from None
    ca_constraints = _basic_constraints(ca)
    if ca_constraints is None or not ca_constraints.ca:
        raise UnauthenticatedError("the trusted certificate given as CA is not a CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise BadSignatureError(
            f"the certificate was not issued by the CA {_common_name(ca)!r}"
        ) from None
    constraints = _basic_constraints(cert)
    if constraints is not None and constraints.ca:
        raise UnauthenticatedError("the certificate is a CA certificate, not a leaf")
    for label, c in (("the CA certificate", ca), ("the certificate", cert)):
        if now < c.not_valid_before_utc:
            raise UnauthenticatedError(
                f"{label} is not valid before {c.not_valid_before_utc.isoformat()}; check the clock"
            )
        if now > c.not_valid_after_utc:
            raise UnauthenticatedError(
                f"{label} expired at {c.not_valid_after_utc.isoformat()}; issue a new one"
            )


def certificate_public_key(cert_pem_or_der: bytes) -> PublicKey:
    """The P-256 key a TLS certificate certifies, as a `PublicKey` that verifies ECDSA
    signatures by that key; MalformedMessageError for anything that is not a P-256 key."""
    cert = parse_certificate(cert_pem_or_der)
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise MalformedMessageError("the certificate's public key does not parse") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedMessageError("the certificate's key is not an EC P-256 key")
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PublicKey(SignatureAlgorithm.ECDSA_P256, spki)


def check_domain_ca(ca_cert_pem_or_der: bytes, domain_id: str) -> None:
    """Raise MalformedMessageError unless the bytes are a CA certificate naming exactly the
    trust domain `spiffe://<domain_id>` (what a domain state pins as its CA)."""
    try:
        cert = parse_certificate(ca_cert_pem_or_der)
    except TypeError:
        raise MalformedMessageError("the domain CA certificate must be bytes") from None
    constraints = _basic_constraints(cert)
    if constraints is None or not constraints.ca:
        raise MalformedMessageError("the domain CA certificate is not a CA certificate")
    if _ca_trust_domains(cert) != [domain_id]:
        raise MalformedMessageError(
            f"the domain CA certificate does not name the trust domain spiffe://{domain_id}"
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


# --- TLS keys ----------------------------------------------------------------------------


def new_tls_key_pem() -> bytes:
    """A fresh P-256 TLS private key as unencrypted PKCS#8 PEM (as gRPC reads it). SECRET.

    TLS keys are P-256: gRPC's TLS stack refuses Ed25519 leaves. Store the result 0600.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def tls_public_key(key_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public half of a P-256 key made by `new_tls_key_pem` (to have it certified)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key.public_key()


# --- the domain CA ---------------------------------------------------------------------------


class DomainCA:
    """The domain's certificate authority: a P-256 key and a self-signed CA certificate.

    `domain_edge.ca_files.save_domain_ca` writes the key unencrypted by default (a local demo
    domain) or encrypted under a passphrase; a production domain would keep it offline or in
    an HSM.
    """

    __slots__ = ("_certificate", "_domain_id", "_key")

    def __init__(
        self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey
    ) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise TypeError("the CA key must be an EC P-256 private key")
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the CA certificate does not match the CA key")
        constraints = _basic_constraints(certificate)
        if constraints is None or not constraints.ca:
            raise ValueError("the CA certificate is not a CA certificate")
        uris = _ca_trust_domains(certificate)
        if len(uris) != 1:
            raise ValueError("the CA certificate must name exactly one spiffe:// trust domain")
        self._certificate = certificate
        self._key = private_key
        self._domain_id = uris[0]

    def __repr__(self) -> str:
        return f"DomainCA({self._domain_id!r})"

    @classmethod
    def create(cls, domain_id: str, *, now: datetime, validity_days: int = 3650) -> DomainCA:
        """A new CA for trust domain `domain_id`, valid from `now` - 5 min for `validity_days`."""
        if not is_valid_trust_domain(domain_id):
            raise ValueError(f"invalid domain id {str(domain_id)[:80]!r}")
        _require_aware(now)
        if validity_days < 1:
            raise ValueError("validity_days must be at least 1")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-domain"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"hsm-domain CA {domain_id}"[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{_SPIFFE_PREFIX}{domain_id}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def domain_id(self) -> str:
        """The trust domain this CA issues for."""
        return self._domain_id

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._certificate

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate as PEM: the trust root for every TLS peer of the domain."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate_der(self) -> bytes:
        """The CA certificate as DER: what the genesis pins in `DomainSettings`."""
        return self._certificate.public_bytes(serialization.Encoding.DER)

    def private_key_pem(self, passphrase: bytes | None = None) -> bytes:
        """The CA key as PKCS#8 PEM, encrypted under `passphrase` if one is given. SECRET.

        Without a passphrase the key is unencrypted (fit for a local demo domain only);
        ValueError for a passphrase that is not non-empty bytes.
        """
        encryption: serialization.KeySerializationEncryption
        if passphrase is None:
            encryption = serialization.NoEncryption()
        elif isinstance(passphrase, bytes) and passphrase:
            encryption = serialization.BestAvailableEncryption(passphrase)
        else:
            raise ValueError("the CA passphrase must be non-empty bytes")
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def issue(
        self,
        spiffe: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        *,
        now: datetime,
        validity_days: int = 365,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> bytes:
        """Issue a TLS certificate (PEM) for `spiffe` over a P-256 `public_key`.

        The certificate is valid from `now` - 5 min for `validity_days`, cut at the CA's expiry.
        A server certificate (hsa, coordinator) gets the identity and role DNS names first
        (see the module docstring); `dns_names` may not hold a wildcard or a name of that
        namespace (ValueError), so no certificate can pass for another kind or identity.
        """
        if not isinstance(spiffe, SpiffeId):
            raise TypeError("spiffe must be a SpiffeId")
        if spiffe.domain != self._domain_id:
            raise ValueError(
                f"this CA issues for trust domain {self._domain_id!r}, not {spiffe.domain!r}"
            )
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("TLS certificates need an EC P-256 public key (gRPC refuses Ed25519)")
        _require_aware(now)
        if validity_days < 1:
            raise ValueError("validity_days must be at least 1")
        not_before = now - _BACKDATE
        not_after = min(now + timedelta(days=validity_days), self._certificate.not_valid_after_utc)
        if not_after <= max(not_before, self._certificate.not_valid_before_utc):
            raise ValueError("the CA is not valid at `now`; create or renew the CA")
        if isinstance(dns_names, str) or isinstance(ip_addresses, str):
            raise TypeError("dns_names and ip_addresses are sequences of strings")
        for name in dns_names:
            if not isinstance(name, str) or not name:
                raise TypeError("dns_names are non-empty strings")
            if "*" in name:
                raise ValueError(f"a wildcard DNS name ({name[:80]!r}) would match other servers")
            if _in_reserved_namespace(name, self._domain_id):
                raise ValueError(
                    f"the DNS name {name[:80]!r} is reserved for the role and identity names the "
                    "CA derives from SPIFFE ids"
                )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe.uri)]
        if spiffe.kind in SERVER_KINDS:
            derived = [identity_dns_name(spiffe), role_dns_name(spiffe.domain, spiffe.kind)]
            if max(len(d) for d in derived) > _MAX_DNS_NAME_LENGTH:
                raise ValueError(
                    f"{spiffe.uri} is too long for its DNS names (at most "
                    f"{_MAX_DNS_NAME_LENGTH} characters): use a shorter trust domain"
                )
            names += [x509.DNSName(d) for d in derived]
        names += [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if spiffe.kind != "client":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        ca_ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-domain"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, spiffe.kind),
                        x509.NameAttribute(NameOID.COMMON_NAME, spiffe.name),
                    ]
                )
            )
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _ca_trust_domains(cert: x509.Certificate) -> list[str]:
    """Trust domains named by a CA certificate's `spiffe://<domain>` URI SANs."""
    return [
        uri[len(_SPIFFE_PREFIX) :]
        for uri in _spiffe_uris(cert)
        if is_valid_trust_domain(uri[len(_SPIFFE_PREFIX) :])
    ]


@functools.lru_cache(maxsize=16)
def ca_trust_domain(ca_cert_pem: bytes) -> str:
    """The trust domain a domain CA certificate (PEM or DER) names (`spiffe://<domain>`).

    What a client needs to know which server names to expect; InvalidInputError if the
    certificate does not parse or names no single trust domain (it is not a domain CA).
    """
    try:
        cert = parse_certificate(ca_cert_pem)
    except MalformedMessageError:
        raise InvalidInputError("the CA certificate does not parse") from None
    domains = _ca_trust_domains(cert)
    if len(domains) != 1:
        raise InvalidInputError(
            "the CA certificate names no single spiffe://<domain> trust domain: it is not the "
            "certificate of a domain CA (use DIR/ca/ca.crt of the domain)"
        )
    return domains[0]


def _serial_number() -> int:
    """A random positive serial of at most 159 bits (RFC 5280: at most 20 octets, positive)."""
    return max(1, x509.random_serial_number())
