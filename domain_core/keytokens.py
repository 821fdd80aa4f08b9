"""Exported key tokens (EKTs) and signed key records: how a backing key leaves an HSA, and
how a key record is checked.

A token is AES-256-GCM of one backing key (a key's material of one version: 32 bytes for a
symmetric key, the HMAC key, or the PKCS#8 DER private key of an asymmetric key, at most
`MAX_KEY_MATERIAL_BYTES`) under a one-time *token key*, with a fresh 12-byte random nonce,
and with associated data

    binding   = SHA-256( KEY_TOKEN_CONTEXT
                         || lp(key id, UTF-8) || lp(u32 backing version)
                         || lp(u32 domain key generation) || lp(SHA-256(metadata bytes)) )
    token key = HKDF-SHA256(ikm = domain key of that generation, salt = the token's 32 random
                            salt bytes, info = KEY_TOKEN_KEY_CONTEXT || binding)

where `lp(x)` is `x` preceded by its length as a u64, big-endian (as in `canonical.digest`).
The context strings differ from every context in `canonical`, so a binding can never equal a
digest or signing input made there. Every token has its own AES key, so the domain key itself
never encrypts anything and no usage bound applies to it (the per-key bound of AES-GCM with
random nonces applies to one encryption per token key).

A key record is signed by the HSA that wrote it: `signature` is that host's Ed25519 signature
over `canonical.signing_input(KEY_RECORD, key_record_digest(record, domain id))`, where the
digest covers the domain id, the metadata bytes, the signer's host id and every field of every
token (in backing-version order). The revision is the coordinator's and is not signed.

Invariants kept here:
- a token opens only for the key id, backing version and generation it names, and only
  together with the exact metadata bytes it was sealed with: moving a token to another key or
  version, relabelling its generation, or changing the stored metadata (the policy, the state,
  anything) makes it fail. So every metadata change re-seals the record (`seal_record`);
- a key record verifies only if its metadata names the expected key and it holds exactly one
  token for each backing version 1..current_backing_version, every one of which opens, and
  whose material fits the key spec its metadata names (the length of a symmetric or HMAC key;
  an asymmetric key's DER is parsed where it is first used, `hsa_node.keyaccess`). This is
  how an HSA catches a coordinator that swaps tokens between keys or edits a stored policy;
- every record this module writes (`seal_record`, `rewrap_record`) is signed with the writing
  host's key; `verify_key_record_signature` accepts it only under the key of a host the caller
  trusts (the hosts of its verified domain state), so a removed host, or anyone else holding
  an old domain key generation, cannot write a record that a member accepts;
- every token failure is `InvalidKeyTokenError` with its one fixed message (no oracle),
  whatever went wrong: a node that lacks the token's generation gets the same error, and should
  sync the domain state and retry;
- metadata is serialized exactly once per change (deterministically) and carried as bytes from
  then on; nothing here re-serializes metadata (or a record) that it verifies or signs.

What a token or signature cannot show: a whole record replaced by an *older* complete record
(an earlier policy with its own valid tokens and signature). HSAs defend against that with
`metadata_version`, which grows with every change: an HSA must refuse a record older than one
it has already seen.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from domain_core import canonical, crypto, keyspecs
from domain_core.ciphertext import validate_key_id
from domain_core.contexts import KEY_TOKEN_CONTEXT, KEY_TOKEN_KEY_CONTEXT, PayloadType
from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    InvalidKeyTokenError,
    UnknownSignerError,
)
from domain_core.signers import PublicKey, Signer
from domain_proto import keys_pb2

__all__ = [
    "MAX_KEY_MATERIAL_BYTES",
    "TOKEN_SALT_BYTES",
    "RecordSigner",
    "key_record_digest",
    "key_record_signing_input",
    "key_token_binding",
    "needs_rewrap",
    "rewrap_record",
    "seal_record",
    "token_key",
    "unwrap_backing_key",
    "verify_key_record",
    "verify_key_record_signature",
    "wrap_backing_key",
]

TOKEN_SALT_BYTES: Final = 32

_MAX_U32: Final = 0xFFFFFFFF
# The largest material a token seals: an RSA-4096 PKCS#8 DER key is about 2,400 bytes.
MAX_KEY_MATERIAL_BYTES: Final = 4096


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _check_u32(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    if not 1 <= value <= _MAX_U32:
        raise ValueError(f"{what} must be between 1 and 2**32 - 1")


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != crypto.AES_KEY_BYTES:
        raise ValueError(f"{what} must be {crypto.AES_KEY_BYTES} bytes")


def _check_material(material: bytes) -> None:
    if not isinstance(material, bytes) or not 1 <= len(material) <= MAX_KEY_MATERIAL_BYTES:
        raise ValueError(f"backing_key must be 1 to {MAX_KEY_MATERIAL_BYTES} bytes")


def _versions_fit(metadata: keys_pb2.KeyMetadata) -> bool:
    """Whether a key's backing version fits its state: none (0, no token) only for a key of
    imported material that has none (pending import, or scheduled for deletion so), and a
    key pending import never holds one."""
    if metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT:
        return metadata.current_backing_version == 0 and (
            metadata.origin == keys_pb2.KEY_ORIGIN_EXTERNAL
        )
    if metadata.current_backing_version == 0:
        return (
            metadata.origin == keys_pb2.KEY_ORIGIN_EXTERNAL
            and metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION
        )
    return True


def _material_fits(metadata: keys_pb2.KeyMetadata, material: bytes) -> bool:
    """Whether `material` can be a key of the spec `metadata` names (cheap checks only: an
    asymmetric key's DER is parsed once, where it is first used)."""
    try:
        if not keyspecs.is_asymmetric(metadata.key_spec):
            keyspecs.check_material(metadata.key_spec, material)
    except (ValueError, InvalidInputError):
        return False
    return True


def key_token_binding(
    key_id: str, backing_version: int, generation: int, metadata_bytes: bytes
) -> bytes:
    """The 32-byte associated data of a token: what the token is about, domain-separated."""
    h = hashlib.sha256(KEY_TOKEN_CONTEXT)
    h.update(_lp(key_id.encode("utf-8")))
    h.update(_lp(struct.pack(">I", backing_version)))
    h.update(_lp(struct.pack(">I", generation)))
    h.update(_lp(crypto.sha256(metadata_bytes)))
    return h.digest()


def token_key(domain_key: bytes, salt: bytes, binding: bytes) -> bytes:
    """The one-time AES-256 key of one token: HKDF-SHA256 from the domain key, the token's
    random salt and its binding (so a token key serves exactly one token)."""
    return crypto.hkdf_sha256(domain_key, salt=salt, info=KEY_TOKEN_KEY_CONTEXT + binding)


def wrap_backing_key(
    domain_key: bytes,
    generation: int,
    metadata_bytes: bytes,
    key_id: str,
    backing_version: int,
    backing_key: bytes,
    *,
    nonce: bytes | None = None,
    salt: bytes | None = None,
) -> keys_pb2.KeyToken:
    """Seal one backing key under a domain key generation, bound to the key and its metadata.

    `nonce` and `salt` exist ONLY for the golden test vectors; production code leaves them
    unset so that a fresh random nonce and salt are drawn for every token.
    """
    _check_key(domain_key, "domain_key")
    _check_material(backing_key)
    _check_u32(generation, "generation")
    _check_u32(backing_version, "backing_version")
    if not isinstance(metadata_bytes, bytes):
        raise TypeError("metadata_bytes must be bytes")
    if not isinstance(key_id, str) or not key_id:
        raise ValueError("key_id must be a non-empty str")
    if nonce is None:
        nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    if salt is None:
        salt = crypto.random_bytes(TOKEN_SALT_BYTES)
    if len(salt) != TOKEN_SALT_BYTES:
        raise ValueError(f"salt must be {TOKEN_SALT_BYTES} bytes")
    binding = key_token_binding(key_id, backing_version, generation, metadata_bytes)
    return keys_pb2.KeyToken(
        key_id=key_id,
        backing_version=backing_version,
        domain_key_generation=generation,
        nonce=nonce,
        salt=salt,
        ciphertext=crypto.aes_gcm_seal(
            token_key(domain_key, salt, binding), backing_key, binding, nonce
        ),
    )


def unwrap_backing_key(
    token: keys_pb2.KeyToken,
    domain_keys: Mapping[int, bytes],
    metadata_bytes: bytes,
    expected_key_id: str,
) -> bytes:
    """Open a token of `expected_key_id` sealed with `metadata_bytes`; InvalidKeyTokenError else.

    `domain_keys` maps the generations this node holds to their keys.
    """
    if not isinstance(token, keys_pb2.KeyToken):
        raise TypeError("token must be a KeyToken")
    if not isinstance(metadata_bytes, bytes):
        raise TypeError("metadata_bytes must be bytes")
    domain_key = domain_keys.get(token.domain_key_generation)
    if (
        not expected_key_id
        or token.key_id != expected_key_id
        or token.backing_version == 0
        or token.domain_key_generation == 0
        or domain_key is None
        or len(domain_key) != crypto.AES_KEY_BYTES
        or len(token.nonce) != crypto.GCM_NONCE_BYTES
        or len(token.salt) != TOKEN_SALT_BYTES
        or not crypto.GCM_TAG_BYTES
        < len(token.ciphertext)
        <= MAX_KEY_MATERIAL_BYTES + crypto.GCM_TAG_BYTES
    ):
        raise InvalidKeyTokenError()
    binding = key_token_binding(
        token.key_id, token.backing_version, token.domain_key_generation, metadata_bytes
    )
    return crypto.aes_gcm_open(
        token_key(domain_key, token.salt, binding),
        token.ciphertext,
        binding,
        token.nonce,
        error=InvalidKeyTokenError,
    )


# --- signatures over key records -------------------------------------------------------------


def key_record_digest(record: keys_pb2.KeyRecord, domain_id: str) -> bytes:
    """The digest a key record's signature covers: `canonical.digest(KEY_RECORD, ...)` over the
    domain id, the metadata bytes, the signer's host id, then for each token in backing-version
    order its key id, u32 backing version, u32 generation, salt, nonce and ciphertext.

    Made from the fields as received, never from a re-serialization; the revision (the
    coordinator's) and the signature itself are left out.
    """
    if not isinstance(record, keys_pb2.KeyRecord):
        raise TypeError("record must be a KeyRecord")
    parts = [domain_id.encode("utf-8"), record.metadata, record.signer_host_id.encode("utf-8")]
    for token in sorted(record.tokens, key=lambda t: t.backing_version):
        parts += [
            token.key_id.encode("utf-8"),
            struct.pack(">I", token.backing_version),
            struct.pack(">I", token.domain_key_generation),
            token.salt,
            token.nonce,
            token.ciphertext,
        ]
    return canonical.digest(PayloadType.KEY_RECORD, *parts)


def key_record_signing_input(record: keys_pb2.KeyRecord, domain_id: str) -> bytes:
    """The exact bytes the writing host signs (and a verifier checks) for `record`."""
    return canonical.signing_input(PayloadType.KEY_RECORD, key_record_digest(record, domain_id))


@dataclass(frozen=True)
class RecordSigner:
    """How one host signs the key records it writes: its domain, host id and signing key."""

    domain_id: str
    host_id: str
    signer: Signer

    def __repr__(self) -> str:
        return f"RecordSigner({self.domain_id!r}, {self.host_id!r})"

    def sign(self, record: keys_pb2.KeyRecord) -> keys_pb2.KeyRecord:
        """Set the record's signer to this host and sign it (in place); returns the record."""
        record.signer_host_id = self.host_id
        record.signature = self.signer.sign(key_record_signing_input(record, self.domain_id))
        return record


def verify_key_record_signature(
    record: keys_pb2.KeyRecord, domain_id: str, host_keys: Mapping[str, PublicKey]
) -> str:
    """Check that a trusted host signed `record` for `domain_id`; returns the signer's host id.

    `host_keys` are the Ed25519 keys of the hosts the caller trusts (the hosts of its verified
    domain state). UnknownSignerError when the signer is not one of them, BadSignatureError
    when the signature does not verify over the record as received (any changed byte of the
    metadata, of a token or of the signer's id).
    """
    signer = record.signer_host_id
    key = host_keys.get(signer)
    if key is None:
        shown = repr(signer[:64]) if signer else "no host"
        raise UnknownSignerError(
            f"the key record is signed by {shown}, which is not a host of the verified domain state"
        )
    try:
        key.verify(record.signature, key_record_signing_input(record, domain_id))
    except BadSignatureError:
        raise BadSignatureError(
            f"the key record's signature by host {signer} does not verify"
        ) from None
    return signer


# --- records -------------------------------------------------------------------------------


def _parse_metadata(metadata_bytes: bytes) -> keys_pb2.KeyMetadata:
    metadata = keys_pb2.KeyMetadata()
    try:
        metadata.ParseFromString(metadata_bytes)
    except DecodeError:
        raise InvalidKeyTokenError() from None
    return metadata


def verify_key_record(
    record: keys_pb2.KeyRecord,
    domain_keys: Mapping[int, bytes],
    expected_key_id: str,
) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
    """Check a stored key record's tokens end to end; returns its metadata and backing keys by
    version.

    The metadata must parse and name `expected_key_id`; there must be exactly one token per
    backing version 1..current_backing_version, each naming `expected_key_id`, and each must
    open under a domain key this node holds together with the record's metadata bytes.
    Anything else is InvalidKeyTokenError. The signature is checked apart, first
    (`verify_key_record_signature`), because it needs the verified state's hosts.
    """
    if not isinstance(record, keys_pb2.KeyRecord):
        raise TypeError("record must be a KeyRecord")
    metadata = _parse_metadata(record.metadata)
    current = metadata.current_backing_version
    if (
        not expected_key_id
        or metadata.key_id != expected_key_id
        or not _versions_fit(metadata)
        or len(record.tokens) != current
    ):
        raise InvalidKeyTokenError()
    tokens_by_version: dict[int, keys_pb2.KeyToken] = {}
    for token in record.tokens:
        if token.backing_version in tokens_by_version or not 1 <= token.backing_version <= current:
            raise InvalidKeyTokenError()
        tokens_by_version[token.backing_version] = token
    backing_keys = {
        version: unwrap_backing_key(
            tokens_by_version[version], domain_keys, record.metadata, expected_key_id
        )
        for version in range(1, current + 1)
    }
    if not all(_material_fits(metadata, key) for key in backing_keys.values()):
        raise InvalidKeyTokenError()
    return metadata, backing_keys


def seal_record(
    metadata: keys_pb2.KeyMetadata,
    backing_keys: Mapping[int, bytes],
    domain_key: bytes,
    generation: int,
    *,
    signer: RecordSigner,
) -> keys_pb2.KeyRecord:
    """A new key record, signed by `signer`: the metadata serialized once (deterministically)
    and one fresh token per backing version, all under `generation`.

    Call it for every change of a key (create, rotate, policy, state): the tokens bind the
    metadata bytes, so old tokens do not open with new metadata. `backing_keys` must hold
    exactly the versions 1..metadata.current_backing_version. The record's revision is left 0
    for the caller (the coordinator assigns revisions).
    """
    if not isinstance(metadata, keys_pb2.KeyMetadata):
        raise TypeError("metadata must be a KeyMetadata")
    validate_key_id(metadata.key_id)
    current = metadata.current_backing_version
    if not _versions_fit(metadata) or set(backing_keys) != set(range(1, current + 1)):
        raise ValueError(
            "backing_keys must hold exactly the versions 1..current_backing_version "
            f"(1..{current}), got {sorted(backing_keys)[:10]}"
        )
    metadata_bytes = metadata.SerializeToString(deterministic=True)
    record = keys_pb2.KeyRecord(
        metadata=metadata_bytes,
        tokens=[
            wrap_backing_key(domain_key, generation, metadata_bytes, metadata.key_id, version, key)
            for version, key in sorted(backing_keys.items())
        ],
    )
    return signer.sign(record)


def needs_rewrap(record: keys_pb2.KeyRecord, generation: int) -> bool:
    """Whether any token of `record` is sealed under another generation than `generation`."""
    return any(token.domain_key_generation != generation for token in record.tokens)


def rewrap_record(
    record: keys_pb2.KeyRecord,
    domain_keys: Mapping[int, bytes],
    new_generation: int,
    expected_key_id: str | None = None,
    *,
    signer: RecordSigner,
) -> keys_pb2.KeyRecord:
    """The same record with every token re-sealed under `new_generation` (after a domain key
    rotation, before old generations are dropped), signed again by `signer` (the re-wrapping
    host).

    The tokens are verified first (with `expected_key_id`, or else the key id its metadata
    names, which still catches tokens of other keys); the caller checks the signature before
    (`verify_key_record_signature`). The metadata bytes and the revision are kept unchanged,
    so the coordinator can compare-and-swap on the revision and sees the same metadata.
    """
    if not isinstance(record, keys_pb2.KeyRecord):
        raise TypeError("record must be a KeyRecord")
    if expected_key_id is None:
        expected_key_id = _parse_metadata(record.metadata).key_id
    metadata, backing_keys = verify_key_record(record, domain_keys, expected_key_id)
    domain_key = domain_keys.get(new_generation)
    if domain_key is None:
        raise ValueError(f"this node holds no domain key of generation {new_generation}")
    rewrapped = keys_pb2.KeyRecord(
        metadata=record.metadata,
        tokens=[
            wrap_backing_key(
                domain_key, new_generation, record.metadata, metadata.key_id, version, key
            )
            for version, key in sorted(backing_keys.items())
        ],
        revision=record.revision,
    )
    return signer.sign(rewrapped)
