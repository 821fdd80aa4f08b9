"""Host enrollments: how a new host proves it holds the keys an add-host change names.

An enrollment (`domain_pb2.HostEnrollment`) is made by the new host and travels, as the exact
bytes the host produced, inside the add-host change (`AddHost.enrollment`). Every verifier
runs `verify_enrollment` on it before the change counts: `hsm-operator` (propose, proposals
show, approve, sign-offline), the coordinator (SubmitProposal) and every HSA (applying a
proposal, and verifying a state through `transition.apply_changes`).

The enrollment signing input is `signing_input(HOST_ENROLLMENT, digest(HOST_ENROLLMENT,
domain id, host record bytes, certificate DER))`: it binds the domain, the host id, the
Ed25519 and X25519 public keys and the TLS certificate fingerprint (all in the host record)
and the certificate itself. The address hint is not in it and is never trusted.

Invariants kept by `verify_enrollment` (each failure is an `EnrollmentError` naming the check,
a malformed encoding a `MalformedMessageError`); an enrollment verifies only if:
- its bytes and its host record are canonical and structurally valid for the domain;
- possession of the signing key: `signature` is the Ed25519 signature of the signing input
  under the record's signing key;
- possession of the agreement key: the record's X25519 key is the Montgomery form of its
  Ed25519 key (`crypto.x25519_public_from_ed25519`); its private key is the Ed25519 secret
  scalar, so only the holder of the signing key can open what is sealed to it;
- possession of the TLS key: `tls_signature` is the ECDSA P-256 signature of the same input
  under the certificate's key;
- the certificate is the one the record names (SHA-256 of its DER), was issued by the domain
  CA the verified state pins (`DomainSettings.domain_ca_certificate`), is valid at the
  verifier's time, is a leaf, and carries exactly `spiffe://<domain>/hsa/<host id>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from domain_core import canonical, crypto, model
from domain_core.contexts import PayloadType
from domain_core.errors import (
    BadSignatureError,
    EnrollmentError,
    HsmDomainError,
    MalformedMessageError,
)
from domain_core.identity import HostIdentity
from domain_core.pki import (
    SpiffeId,
    certificate_der,
    certificate_public_key,
    spiffe_id_from_certificate,
    verify_certificate_chain,
)
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_proto import domain_pb2

__all__ = [
    "VerifiedEnrollment",
    "enrollment_digest",
    "enrollment_signing_input",
    "host_key_fingerprints",
    "make_enrollment",
    "verify_enrollment",
]


def enrollment_digest(domain_id: str, host_bytes: bytes, certificate: bytes) -> bytes:
    """The digest an enrollment's two signatures cover (see the module docstring)."""
    return canonical.digest(
        PayloadType.HOST_ENROLLMENT, domain_id.encode("utf-8"), host_bytes, certificate
    )


def enrollment_signing_input(domain_id: str, host_bytes: bytes, certificate: bytes) -> bytes:
    """What the host's signing key and its TLS key both sign to enroll."""
    return canonical.signing_input(
        PayloadType.HOST_ENROLLMENT, enrollment_digest(domain_id, host_bytes, certificate)
    )


def host_key_fingerprints(host: domain_pb2.Host) -> tuple[tuple[str, bytes], ...]:
    """(label, SHA-256) of each key a host record names, as approvers compare them out of band.

    The TLS certificate's SHA-256 (of its DER) is the fingerprint the domain state pins and
    `domain status` shows; the signing key's is the SHA-256 of its SubjectPublicKeyInfo DER;
    the agreement key's the SHA-256 of its raw 32 bytes.
    """
    return (
        ("TLS certificate", bytes(host.tls_certificate_fingerprint)),
        ("signing key (Ed25519)", crypto.sha256(host.signing_public_key)),
        ("agreement key (X25519)", crypto.sha256(host.agreement_public_key)),
    )


@dataclass(frozen=True)
class VerifiedEnrollment:
    """An enrollment that passed `verify_enrollment`: its exact bytes and what they name."""

    raw: bytes = field(repr=False)
    host: domain_pb2.Host = field(repr=False)
    certificate: bytes = field(repr=False)  # DER
    address: str

    @property
    def host_id(self) -> str:
        return self.host.host_id

    def __repr__(self) -> str:
        return f"VerifiedEnrollment({self.host.host_id!r})"


def make_enrollment(
    identity: HostIdentity, domain_id: str, certificate: bytes, *, address: str = ""
) -> bytes:
    """The enrollment of `identity` in `domain_id` with its CA-issued TLS `certificate`.

    Signed by the host's Ed25519 key and by its TLS key; the certificate must be for the
    identity's TLS key (ValueError otherwise). Returns the bytes operators propose.
    """
    der = certificate_der(certificate)
    if certificate_public_key(der).spki_der != _tls_spki(identity):
        raise ValueError("the certificate is not for this host's TLS key")
    host = model.make_host(
        domain_id,
        identity.host_id,
        identity.signing_public_key,
        identity.agreement_public_key,
        crypto.sha256(der),
    )
    host_bytes = host.SerializeToString(deterministic=True)
    message = enrollment_signing_input(domain_id, host_bytes, der)
    enrollment = domain_pb2.HostEnrollment(
        host=host_bytes,
        tls_certificate=der,
        signature=identity.signer.sign(message),
        address=address,
        tls_signature=identity.tls_signer.sign(message),
    )
    raw = enrollment.SerializeToString(deterministic=True)
    model.parse_enrollment(raw, domain_id)  # the address hint and the sizes
    return raw


def _tls_spki(identity: HostIdentity) -> bytes:
    """The SubjectPublicKeyInfo DER of a host identity's TLS key."""
    return identity.tls_signer.public_key.spki_der


def _at(now: int | datetime) -> datetime:
    if isinstance(now, datetime):
        return now
    return datetime.fromtimestamp(now, UTC)


def verify_enrollment(
    raw: bytes, *, domain_id: str, ca_certificate: bytes, now: int | datetime
) -> VerifiedEnrollment:
    """Verify an enrollment completely (see the module docstring) and return what it names.

    `ca_certificate` is the domain CA certificate of the verified state (PEM or DER); `now`
    the verifier's time (unix seconds or an aware datetime; a state's `created_at` when a
    state is verified, so that every verifier decides alike).
    """
    enrollment, host = model.parse_enrollment(raw, domain_id)
    who = f"the enrollment of {host.host_id}"
    signing_key = PublicKey(SignatureAlgorithm.ED25519, host.signing_public_key)
    try:
        derived = crypto.x25519_public_from_ed25519(signing_key.raw_ed25519())
    except ValueError:
        raise EnrollmentError(f"{who}: its signing key is not a valid Ed25519 key") from None
    if not crypto.constant_time_equal(derived, host.agreement_public_key):
        raise EnrollmentError(
            f"{who}: its agreement key is not the one derived from its signing key, so nothing "
            "proves the host holds it; make the enrollment with `hsm-domain add-node`"
        )
    certificate = enrollment.tls_certificate
    if not certificate:
        raise EnrollmentError(f"{who} carries no TLS certificate")
    message = enrollment_signing_input(domain_id, enrollment.host, certificate)
    try:
        signing_key.verify(enrollment.signature, message)
    except BadSignatureError:
        raise EnrollmentError(
            f"{who} is not signed by the signing key it names (no proof of possession)"
        ) from None
    if not crypto.constant_time_equal(crypto.sha256(certificate), host.tls_certificate_fingerprint):
        raise EnrollmentError(
            f"{who}: its TLS certificate is not the one the host record names (fingerprints differ)"
        )
    try:
        verify_certificate_chain(certificate, ca_certificate, _at(now))
    except HsmDomainError as error:
        raise EnrollmentError(
            f"{who}: its TLS certificate does not verify against the domain CA: {error.message}"
        ) from None
    expected = SpiffeId(domain_id, "hsa", host.host_id)
    try:
        actual = spiffe_id_from_certificate(certificate)
    except HsmDomainError as error:
        raise EnrollmentError(f"{who}: {error.message}") from None
    if actual != expected:
        raise EnrollmentError(f"{who}: its certificate names {actual.uri}, expected {expected.uri}")
    try:
        tls_key = certificate_public_key(certificate)
    except MalformedMessageError as error:
        raise EnrollmentError(f"{who}: {error.message}") from None
    try:
        tls_key.verify(enrollment.tls_signature, message)
    except BadSignatureError:
        raise EnrollmentError(
            f"{who} is not signed by the key of its TLS certificate (no proof that the host "
            "holds it: a certificate copied from a TLS handshake does not enroll)"
        ) from None
    return VerifiedEnrollment(
        raw=raw, host=host, certificate=certificate, address=enrollment.address
    )
