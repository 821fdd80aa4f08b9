"""Who is calling: the verified peer identity of a call, and requiring a kind of caller.

Invariants: a caller's identity comes only from the certificate gRPC verified in the handshake
(`pki.peer_identity`, `pki.spiffe_id_from_san_values`); a call from a caller of another kind
is PermissionDeniedError, one without a usable identity UnauthenticatedError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, cast

import grpc
from cryptography import x509

from domain_core.errors import PermissionDeniedError
from domain_core.pki import (
    PeerIdentity,
    SpiffeId,
    peer_identity,
    spiffe_id_from_san_values,
)


def caller(context: grpc.ServicerContext) -> PeerIdentity:
    """The authenticated peer of a call, from its client certificate."""
    return peer_identity(cast(Mapping[str, Sequence[bytes]], context.auth_context()))


_SAN_PROPERTY: Final = "x509_subject_alternative_name"
_CN_PROPERTY: Final = "x509_common_name"
# The subject alternative names gRPC lists as peer identities.
_IDENTITY_NAME_TYPES: Final = (
    x509.DNSName,
    x509.UniformResourceIdentifier,
    x509.RFC822Name,
    x509.IPAddress,
)


class CertificatePeerContext:
    """What a servicer reads of its `grpc.ServicerContext` (who the verified peer is), built
    from a certificate: for calling servicers in-process, as benchmarks and tests do.

    It answers as gRPC does after a handshake with that certificate: `auth_context` with the
    PEM, `peer_identities` with the subject alternative names (DNS, URI, e-mail, IP, in the
    certificate's order) or else the common name. An integration test checks the servicers'
    readings of a real handshake against each other.
    """

    def __init__(self, cert_pem: bytes) -> None:
        self._cert_pem = cert_pem
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            self._key = _CN_PROPERTY
            self._identities = [
                str(a.value).encode()
                for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            ]
        else:
            self._key = _SAN_PROPERTY
            self._identities = [
                str(name.value).encode() for name in names if isinstance(name, _IDENTITY_NAME_TYPES)
            ]

    def auth_context(self) -> dict[str, list[bytes]]:
        """The auth context's certificate property, as gRPC gives it."""
        return {"x509_pem_cert": [self._cert_pem]}

    def peer_identities(self) -> list[bytes] | None:
        """The peer's identities, as gRPC gives them (None when it has none)."""
        return list(self._identities) or None

    def peer_identity_key(self) -> str | None:
        """Which auth property `peer_identities` holds."""
        return self._key if self._identities else None


def caller_spiffe(context: grpc.ServicerContext) -> SpiffeId:
    """The authenticated peer's SPIFFE id, for calls that need no more than who is calling.

    The same answer as `caller(context).spiffe` at a fraction of the cost (~3 µs instead of
    ~17 µs measured in a serving thread): gRPC hands out the verified certificate's subject
    alternative names without building the whole auth context, and nothing is hashed or
    parsed twice. Falls back to the certificate for anything unusual (no SAN), which then
    raises the usual UnauthenticatedError.
    """
    values = context.peer_identities()
    if values is None or context.peer_identity_key() != _SAN_PROPERTY:
        return caller(context).spiffe
    return spiffe_id_from_san_values(tuple(values))


def _require_kind(spiffe: SpiffeId, kinds: tuple[str, ...]) -> None:
    if spiffe.kind not in kinds:
        raise PermissionDeniedError(
            f"{spiffe.uri} may not call this; it is for {' or '.join(kinds)} identities"
        )


def require_caller(context: grpc.ServicerContext, *kinds: str) -> PeerIdentity:
    """The caller's identity, refused with PERMISSION_DENIED unless it is of one of `kinds`."""
    identity = caller(context)
    _require_kind(identity.spiffe, kinds)
    return identity


def require_caller_spiffe(context: grpc.ServicerContext, *kinds: str) -> SpiffeId:
    """`require_caller` for callers that need only the SPIFFE id (see `caller_spiffe`)."""
    spiffe = caller_spiffe(context)
    _require_kind(spiffe, kinds)
    return spiffe
