"""Reading certificates: parsing, fingerprints, SPIFFE ids, peer identities, chain checks.

Invariants: a peer identity comes from the certificate gRPC verified in the handshake; a peer
with no certificate, or whose certificate carries no or several SPIFFE ids, is
UnauthenticatedError; parsed identities are remembered by the certificate's exact bytes
(bounded LRU), so a cached identity is only ever returned for the very bytes it was parsed
from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    UnauthenticatedError,
)
from domain_core.pki._names import (
    _SPIFFE_PREFIX,
    PEER_IDENTITY_CACHE_ENTRIES,
    SpiffeId,
    _require_aware,
    is_valid_trust_domain,
)
from domain_core.signers import PublicKey, SignatureAlgorithm

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
    except ValueError:
        raise MalformedMessageError("the certificate's extensions do not parse") from None
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
    """The certificate's basic constraints (None: it has none); MalformedMessageError when its
    extensions do not parse (cryptography parses them lazily, here)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        raise MalformedMessageError("the certificate's extensions do not parse") from None


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
