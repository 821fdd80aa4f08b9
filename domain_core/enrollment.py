"""Host enrollments: how a new node proves who it is before operators add it.

Pure verification, shared by `deploy` (which writes enrollments for new local nodes) and
`operator_tool` (which checks one before proposing to add its host); both import it from here
so that there is one implementation.

An enrollment (`domain_pb2.HostEnrollment`) carries the serialized host record, the host's
CA-issued TLS certificate and a signature by the host's Ed25519 key over
`signing_input(HOST_ENROLLMENT, sha256(host bytes))` (proof of possession).

Invariants kept by `read_enrollment`: a host record is returned only if the signature over the
bytes as received verifies under the key inside them, the record is structurally valid for the
domain, the certificate was issued by the domain CA and is valid now, and the certificate's
fingerprint and SPIFFE id are the ones the record names. Anything else raises an
`HsmDomainError` saying which check failed.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from domain_core import canonical, crypto, model
from domain_core.canonical import PayloadType
from domain_core.errors import (
    BadSignatureError,
    LimitExceededError,
    MalformedMessageError,
    NotFoundError,
    UnauthenticatedError,
)
from domain_core.pb import domain_pb2
from domain_core.pki import (
    SpiffeId,
    certificate_fingerprint,
    spiffe_id_from_certificate,
    verify_certificate_chain,
)
from domain_core.signers import PublicKey, SignatureAlgorithm

__all__ = [
    "MAX_ENROLLMENT_BYTES",
    "enrollment_signing_input",
    "parse_enrollment",
    "read_enrollment",
]

MAX_ENROLLMENT_BYTES: Final = 64 * 1024


def enrollment_signing_input(host_bytes: bytes) -> bytes:
    """What a new host signs to enroll: the domain-separated SHA-256 of its host record bytes."""
    return canonical.signing_input(PayloadType.HOST_ENROLLMENT, crypto.sha256(host_bytes))


def parse_enrollment(data: bytes, ca_pem: bytes, domain_id: str, now: datetime) -> domain_pb2.Host:
    """Verify a serialized HostEnrollment and return the host record it carries."""
    if len(data) > MAX_ENROLLMENT_BYTES:
        raise LimitExceededError(
            f"an enrollment is at most {MAX_ENROLLMENT_BYTES} bytes, this one is {len(data)}"
        )
    enrollment = domain_pb2.HostEnrollment()
    try:
        enrollment.ParseFromString(data)
    except DecodeError:
        raise MalformedMessageError("the enrollment does not parse as a HostEnrollment") from None
    host = domain_pb2.Host()
    try:
        host.ParseFromString(enrollment.host)
    except DecodeError:
        raise MalformedMessageError("the enrollment's host record does not parse") from None
    model.validate_host(host, domain_id)
    key = PublicKey(SignatureAlgorithm.ED25519, host.signing_public_key)
    try:
        key.verify(enrollment.signature, enrollment_signing_input(enrollment.host))
    except BadSignatureError:
        raise BadSignatureError(
            f"the enrollment of {host.host_id} is not signed by the host key it names"
        ) from None
    cert_pem = enrollment.tls_certificate_pem
    verify_certificate_chain(cert_pem, ca_pem, now)
    if not crypto.constant_time_equal(
        certificate_fingerprint(cert_pem), host.tls_certificate_fingerprint
    ):
        raise UnauthenticatedError(
            f"the enrollment of {host.host_id}: its TLS certificate is not the one the host "
            "record names (fingerprints differ)"
        )
    expected = SpiffeId(domain_id, "hsa", host.host_id)
    actual = spiffe_id_from_certificate(cert_pem)
    if actual != expected:
        raise UnauthenticatedError(
            f"the enrollment of {host.host_id}: its certificate names {actual.uri}, "
            f"expected {expected.uri}"
        )
    return host


def read_enrollment(path: Path, ca_pem: bytes, domain_id: str, now: datetime) -> domain_pb2.Host:
    """Read and verify an enrollment file (see `parse_enrollment`)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ENROLLMENT_BYTES + 1)
    except FileNotFoundError:
        raise NotFoundError(f"no enrollment file at {path}") from None
    return parse_enrollment(data, ca_pem, domain_id, now)
