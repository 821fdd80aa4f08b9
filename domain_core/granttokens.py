"""Grant tokens: a grant as CreateGrant made it, usable before the key's metadata that holds it
reached every HSA (AWS KMS's grant tokens, for its eventual consistency).

A token is a serialized `GrantToken`: the serialized `KeyGrant`, sealed under a one-time key
derived from a domain key generation (`crypto.seal_under_domain_key`) and bound to

    binding = SHA-256( GRANT_TOKEN_CONTEXT || lp(domain id) || lp(key id)
                       || lp(u64 metadata version) || lp(u32 generation) )

where the metadata version is the key's first version that holds the grant.

Invariants:
- a token opens only for the domain, key, version and generation it was made for; every
  failure is `InvalidGrantTokenError` with its one fixed message (no oracle);
- a token adds its grant only where the key's verified metadata is older than the version
  that holds the grant (`pending_grant`): once an HSA has that version (or a later one, after
  the grant was retired or revoked) the metadata alone decides, so a token never outlives its
  grant's revocation.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

from google.protobuf.message import DecodeError

from domain_core import crypto
from domain_core.contexts import GRANT_TOKEN_CONTEXT, GRANT_TOKEN_KEY_CONTEXT
from domain_core.errors import InvalidGrantTokenError
from domain_proto import keys_pb2

__all__ = ["OpenedGrantToken", "open_grant_token", "pending_grant", "seal_grant_token"]

_SALT_BYTES = 32


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _binding(domain_id: str, key_id: str, metadata_version: int, generation: int) -> bytes:
    h = hashlib.sha256(GRANT_TOKEN_CONTEXT)
    h.update(_lp(domain_id.encode("utf-8")))
    h.update(_lp(key_id.encode("utf-8")))
    h.update(_lp(struct.pack(">Q", metadata_version)))
    h.update(_lp(struct.pack(">I", generation)))
    return h.digest()


def seal_grant_token(
    *,
    domain_id: str,
    key_id: str,
    metadata_version: int,
    grant: keys_pb2.KeyGrant,
    domain_key: bytes,
    generation: int,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The token of `grant`, first held by version `metadata_version` of key `key_id`.
    `salt` and `nonce` exist ONLY for the golden test vectors."""
    binding = _binding(domain_id, key_id, metadata_version, generation)
    salt = crypto.random_bytes(_SALT_BYTES) if salt is None else salt
    nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES) if nonce is None else nonce
    token = keys_pb2.GrantToken(
        key_id=key_id,
        metadata_version=metadata_version,
        domain_key_generation=generation,
        salt=salt,
        nonce=nonce,
        ciphertext=crypto.seal_under_domain_key(
            domain_key,
            GRANT_TOKEN_KEY_CONTEXT,
            binding,
            grant.SerializeToString(deterministic=True),
            salt,
            nonce,
        ),
    )
    return token.SerializeToString(deterministic=True)


class OpenedGrantToken:
    """What a grant token says: the key, the first metadata version holding the grant, and
    the grant."""

    __slots__ = ("grant", "key_id", "metadata_version")

    def __init__(self, key_id: str, metadata_version: int, grant: keys_pb2.KeyGrant) -> None:
        self.key_id = key_id
        self.metadata_version = metadata_version
        self.grant = grant

    def __repr__(self) -> str:
        return f"OpenedGrantToken({self.key_id}, version {self.metadata_version})"


def open_grant_token(
    token_bytes: bytes, *, domain_id: str, domain_keys: Mapping[int, bytes]
) -> OpenedGrantToken:
    """Open a token of this domain under a generation this node holds; InvalidGrantTokenError
    for anything else."""
    token = keys_pb2.GrantToken()
    try:
        token.ParseFromString(token_bytes)
    except DecodeError:
        raise InvalidGrantTokenError() from None
    domain_key = domain_keys.get(token.domain_key_generation)
    if (
        domain_key is None
        or not token.key_id
        or token.metadata_version == 0
        or len(token.salt) != _SALT_BYTES
        or len(token.nonce) != crypto.GCM_NONCE_BYTES
    ):
        raise InvalidGrantTokenError()
    binding = _binding(domain_id, token.key_id, token.metadata_version, token.domain_key_generation)
    plaintext = crypto.open_under_domain_key(
        domain_key,
        GRANT_TOKEN_KEY_CONTEXT,
        binding,
        token.ciphertext,
        token.salt,
        token.nonce,
        error=InvalidGrantTokenError,
    )
    grant = keys_pb2.KeyGrant()
    try:
        grant.ParseFromString(plaintext)
    except DecodeError:  # sealed by an HSA: cannot happen
        raise InvalidGrantTokenError() from None
    return OpenedGrantToken(token.key_id, int(token.metadata_version), grant)


def pending_grant(
    opened: OpenedGrantToken, metadata: keys_pb2.KeyMetadata
) -> keys_pb2.KeyGrant | None:
    """The token's grant, if it is for this key and this HSA's metadata of it is older than
    the version that holds the grant; else None (the metadata decides)."""
    if opened.key_id != metadata.key_id or metadata.metadata_version >= opened.metadata_version:
        return None
    return opened.grant
