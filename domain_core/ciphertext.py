"""The ciphertext blob of Encrypt: versioned, self-describing, opened without a key id.

Layout (all integers big-endian; docs/ciphertext-format.md has the byte table):

    magic b"HSMC" | version 0x01 | key id length (1) | key id (ASCII) | backing version (u32)
    | nonce (32, random) | IV (12) | ciphertext | tag (16)

The *prefix* is everything before the nonce; the *header* is everything before the ciphertext.

    one-time key = HKDF-SHA256(backing key, salt = nonce, info = ENCRYPT_INFO || prefix)
    blob body    = AES-256-GCM(one-time key, IV, plaintext,
                               associated data = header || encode_context(context))

Invariants kept here:
- every blob names its key id and backing version, and both are bound twice: into the key
  derivation (HKDF info) and into the AEAD's associated data, so a blob whose header is edited
  to name another key or version cannot open under any key;
- every Encrypt uses a fresh 256-bit random nonce, so each blob is sealed under its own
  one-time key and AES-GCM's nonce limits never apply to a backing key;
- the encryption context is encoded canonically (entries sorted by UTF-8 key bytes, every field
  length-prefixed), so the order in which a caller lists it never matters, while adding,
  removing or changing an entry makes the blob fail to open;
- anything wrong with a blob (malformed, truncated, tampered, foreign, wrong key, wrong context)
  raises `InvalidCiphertextError` with its one fixed message and no chained cause, and
  `decrypt` never returns partial plaintext;
- inputs that are not about a blob (plaintext size, encryption context) are checked against
  `Limits` and rejected with a message that names the limit.
"""

from __future__ import annotations

import functools
import re
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from domain_core import canonical, crypto
from domain_core.contexts import ENCRYPT_INFO, PayloadType
from domain_core.errors import InvalidCiphertextError, InvalidInputError, LimitExceededError
from domain_core.limits import DEFAULT_LIMITS, MAX_IDEMPOTENCY_KEY_CHARS, Limits

__all__ = [
    "BACKING_KEY_BYTES",
    "FORMAT_VERSION",
    "IV_BYTES",
    "MAGIC",
    "NONCE_BYTES",
    "TAG_BYTES",
    "CiphertextHeader",
    "decode_context",
    "decrypt",
    "decrypt_encoded",
    "derive_one_time_key",
    "encode_context",
    "encrypt",
    "encrypt_encoded",
    "new_key_id",
    "parse_header",
    "validate_key_id",
]

MAGIC: Final = b"HSMC"
FORMAT_VERSION: Final = 1
NONCE_BYTES: Final = 32
IV_BYTES: Final = crypto.GCM_NONCE_BYTES
TAG_BYTES: Final = crypto.GCM_TAG_BYTES
BACKING_KEY_BYTES: Final = crypto.AES_KEY_BYTES

_MAX_KEY_ID_BYTES: Final = 255
_MAX_U32: Final = 0xFFFFFFFF
_U32: Final = struct.Struct(">I")
# magic, version, key id length
_FIXED_START: Final = len(MAGIC) + 2
# Key ids are UUIDs in their canonical lower-case text form (what `new_key_id` makes).
_KEY_ID_RE: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --- key ids ---------------------------------------------------------------------------------


def new_key_id() -> str:
    """A fresh key id: a random (version 4) UUID in canonical lower-case form."""
    return str(uuid.uuid4())


def idempotent_key_id(domain_id: str, principal: str, idempotency_key: str) -> str:
    """The key id of a CreateKey sent with `idempotency_key` by `principal`: a version 4 UUID
    taken from a digest of the three (`PayloadType.CREATE_KEY_ID`), so every retry of one
    creation, to any HSA, names the same key, and no other principal's can.

    InvalidInputError unless the idempotency key is 1 to `MAX_IDEMPOTENCY_KEY_CHARS` printable
    ASCII characters.
    """
    key = idempotency_key
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS
        or not all("!" <= c <= "~" for c in key)
    ):
        raise InvalidInputError(
            f"an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
            "without spaces (a UUID, say), the same in every retry of one CreateKey"
        )
    digest = canonical.digest(
        PayloadType.CREATE_KEY_ID, domain_id.encode(), principal.encode(), key.encode()
    )
    return str(uuid.UUID(bytes=digest[:16], version=4))


def validate_key_id(key_id: str) -> str:
    """Return `key_id` if it is a canonical lower-case UUID string, else InvalidInputError."""
    if not isinstance(key_id, str) or _KEY_ID_RE.fullmatch(key_id) is None:
        shown = key_id[:80] if isinstance(key_id, str) else type(key_id).__name__
        raise InvalidInputError(
            f"invalid key id {shown!r}: key ids are lower-case UUIDs such as "
            "'1b4e28ba-2fa1-41d2-883f-0016d3cca427'"
        )
    return key_id


# --- encryption context ----------------------------------------------------------------------


def encode_context(context: Mapping[str, str], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The canonical encoding of an encryption context.

    `u32 count`, then the entries sorted by the UTF-8 bytes of their keys, each as
    `u32 len(key) key u32 len(value) value`. Keys and values must be non-empty strings that
    encode as UTF-8; at most `limits.max_encryption_context_entries` entries and
    `limits.max_encryption_context_bytes` bytes (the sum of the UTF-8 lengths of all keys and
    values). The result does not depend on the order of `context`.
    """
    if type(context) is not dict and not isinstance(context, Mapping):
        raise TypeError("an encryption context is a mapping of str to str")
    if len(context) > limits.max_encryption_context_entries:
        raise LimitExceededError(
            f"encryption context has {len(context)} entries; the limit is "
            f"{limits.max_encryption_context_entries}"
        )
    entries: list[tuple[bytes, bytes]] = []
    total = 0
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("encryption context keys and values must be str")
        if not key or not value:
            raise InvalidInputError(
                "encryption context keys and values must not be empty"
                + (f" (key {key[:80]!r})" if key else "")
            )
        try:
            key_bytes = key.encode("utf-8")
            value_bytes = value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                "encryption context keys and values must be valid UTF-8 text"
            ) from None
        total += len(key_bytes) + len(value_bytes)
        entries.append((key_bytes, value_bytes))
    if total > limits.max_encryption_context_bytes:
        raise LimitExceededError(
            f"encryption context is {total} bytes; the limit is "
            f"{limits.max_encryption_context_bytes}"
        )
    entries.sort()
    out = bytearray(_U32.pack(len(entries)))
    for key_bytes, value_bytes in entries:
        out += _U32.pack(len(key_bytes)) + key_bytes + _U32.pack(len(value_bytes)) + value_bytes
    return bytes(out)


def decode_context(
    encoded: bytes,
    limits: Limits = DEFAULT_LIMITS,
    error: type[Exception] = InvalidCiphertextError,
) -> dict[str, str]:
    """Parse a canonical context encoding; anything non-canonical raises `error()`.

    Used for contexts carried inside other formats (the envelope header): the bytes must be
    exactly what `encode_context` makes for the result (sorted, no duplicate keys, non-empty
    UTF-8, within limits, nothing left over).
    """
    if not isinstance(encoded, bytes):
        raise TypeError("an encoded encryption context is bytes")
    try:
        (count,) = _U32.unpack_from(encoded, 0)
        if count > limits.max_encryption_context_entries:
            raise ValueError("too many entries")
        offset = _U32.size
        context: dict[str, str] = {}
        for _ in range(count):
            fields = []
            for _ in range(2):
                (length,) = _U32.unpack_from(encoded, offset)
                offset += _U32.size
                if length == 0 or offset + length > len(encoded):
                    raise ValueError("bad length")
                fields.append(encoded[offset : offset + length].decode("utf-8"))
                offset += length
            context[fields[0]] = fields[1]
        if offset != len(encoded) or len(context) != count:
            raise ValueError("trailing bytes or duplicate key")
        canonical = encode_context(context, limits)
    except (struct.error, ValueError, InvalidInputError):
        # UnicodeDecodeError is a ValueError; LimitExceededError is an InvalidInputError.
        raise error() from None
    if canonical != encoded:
        raise error()
    return context


# --- blobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CiphertextHeader:
    """The public part of a blob: which key and backing version opens it, and with what."""

    key_id: str
    backing_version: int
    nonce: bytes
    iv: bytes
    header: bytes
    """Every byte before the ciphertext (magic .. IV): the first part of the associated data."""

    @property
    def prefix(self) -> bytes:
        """Every byte before the nonce (magic .. backing version): bound into the HKDF info."""
        return self.header[: -(NONCE_BYTES + IV_BYTES)]


def _require_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes) or len(key) != BACKING_KEY_BYTES:
        raise ValueError(f"{what} must be {BACKING_KEY_BYTES} bytes")


def _prefix(key_id: str, backing_version: int) -> bytes:
    if type(key_id) is str and type(backing_version) is int:
        return _cached_prefix(key_id, backing_version)
    return _make_prefix(key_id, backing_version)


# The prefix is public and a pure function of (key id, version); a key's current version is
# sealed under again and again. Only exact str and int reach the cache, so that a value that
# merely compares equal (True == 1) is checked, not looked up; errors are never cached.
_PREFIX_CACHE_ENTRIES: Final = 4096


@functools.lru_cache(maxsize=_PREFIX_CACHE_ENTRIES)
def _cached_prefix(key_id: str, backing_version: int) -> bytes:
    return _make_prefix(key_id, backing_version)


def _make_prefix(key_id: str, backing_version: int) -> bytes:
    encoded = validate_key_id(key_id).encode("ascii")
    if isinstance(backing_version, bool) or not isinstance(backing_version, int):
        raise TypeError("backing_version must be an int")
    if not 1 <= backing_version <= _MAX_U32:
        raise ValueError("backing_version must be between 1 and 2**32 - 1")
    return MAGIC + bytes((FORMAT_VERSION, len(encoded))) + encoded + _U32.pack(backing_version)


def derive_one_time_key(backing_key: bytes, nonce: bytes, prefix: bytes) -> bytes:
    """HKDF-SHA256(backing key, salt=nonce, info=ENCRYPT_INFO || prefix): one key per blob."""
    _require_key(backing_key, "backing_key")
    return _one_time_key(backing_key, nonce, prefix)


def _one_time_key(backing_key: bytes, nonce: bytes, prefix: bytes) -> bytes:
    # The one definition of the derivation (the caller checked the backing key).
    return crypto.hkdf_sha256(backing_key, salt=nonce, info=ENCRYPT_INFO + prefix)


def _check_plaintext(backing_key: bytes, plaintext: bytes, limits: Limits) -> None:
    _require_key(backing_key, "backing_key")
    if not isinstance(plaintext, bytes):
        raise TypeError("plaintext must be bytes")
    if len(plaintext) > limits.max_plaintext_bytes:
        raise LimitExceededError(
            f"plaintext is {len(plaintext)} bytes; the limit is {limits.max_plaintext_bytes}"
        )


def encrypt(
    backing_key: bytes,
    key_id: str,
    backing_version: int,
    plaintext: bytes,
    context: Mapping[str, str],
    *,
    nonce: bytes | None = None,
    iv: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Seal `plaintext` under a backing key; returns the self-describing blob.

    `nonce` and `iv` exist ONLY so that the golden test vectors are reproducible. Production
    code must leave them unset: both are then drawn fresh from the OS CSPRNG, which is what
    makes every blob's one-time key unique. A caller that passes a fixed nonce reuses a
    one-time key and, with a fixed IV too, breaks AES-GCM.
    """
    _check_plaintext(backing_key, plaintext, limits)
    encoded_context = encode_context(context, limits)
    return _seal(backing_key, key_id, backing_version, plaintext, encoded_context, nonce, iv)


def encrypt_encoded(
    backing_key: bytes,
    key_id: str,
    backing_version: int,
    plaintext: bytes,
    encoded_context: bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """`encrypt` (fresh nonce and IV), with the context given as the bytes `encode_context`
    returned for it: for a caller that encoded, and so checked, the context already."""
    _check_plaintext(backing_key, plaintext, limits)
    if not isinstance(encoded_context, bytes):
        raise TypeError("encoded_context must be the bytes encode_context returned")
    return _seal(backing_key, key_id, backing_version, plaintext, encoded_context, None, None)


def _seal(
    backing_key: bytes,
    key_id: str,
    backing_version: int,
    plaintext: bytes,
    encoded_context: bytes,
    nonce: bytes | None,
    iv: bytes | None,
) -> bytes:
    prefix = _prefix(key_id, backing_version)
    if nonce is None and iv is None:
        # Both from one draw of the CSPRNG: one system call (which releases the GIL) per blob.
        fresh = crypto.random_bytes(NONCE_BYTES + IV_BYTES)
        nonce, iv = fresh[:NONCE_BYTES], fresh[NONCE_BYTES:]
    if nonce is None:
        nonce = crypto.random_bytes(NONCE_BYTES)
    elif not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes")
    if iv is None:
        iv = crypto.random_bytes(IV_BYTES)
    elif not isinstance(iv, bytes) or len(iv) != IV_BYTES:
        raise ValueError(f"iv must be {IV_BYTES} bytes")
    header = prefix + nonce + iv
    one_time_key = _one_time_key(backing_key, nonce, prefix)
    return header + crypto.aes_gcm_seal(one_time_key, plaintext, header + encoded_context, iv)


def _max_blob_bytes(limits: Limits) -> int:
    return (
        _FIXED_START
        + _MAX_KEY_ID_BYTES
        + 4
        + NONCE_BYTES
        + IV_BYTES
        + (limits.max_plaintext_bytes + TAG_BYTES)
    )


def peek_key_id(blob: bytes) -> str:
    """The key id a blob's header names, read without checking anything ("" when the blob is
    too short to name one). A hint for scheduling only (which key a call will need): the
    call itself parses the header (`parse_header`) and refuses what does not hold."""
    if len(blob) <= _FIXED_START:
        return ""
    end = _FIXED_START + blob[len(MAGIC) + 1]
    return blob[_FIXED_START:end].decode("ascii", "replace") if end <= len(blob) else ""


def parse_header(blob: bytes, limits: Limits = DEFAULT_LIMITS) -> CiphertextHeader:
    """Read a blob's header without opening it; InvalidCiphertextError if it is malformed.

    Checks magic, format version, key id form, backing version (>= 1) and that the blob is
    long enough to hold a tag and no longer than the largest blob `encrypt` can make. It says
    nothing about whether the blob is authentic: only `decrypt` knows that.
    """
    if not isinstance(blob, bytes):
        raise TypeError("a ciphertext blob is bytes")
    if not _FIXED_START <= len(blob) <= _max_blob_bytes(limits):
        raise InvalidCiphertextError()
    if blob[: len(MAGIC)] != MAGIC or blob[len(MAGIC)] != FORMAT_VERSION:
        raise InvalidCiphertextError()
    key_id_length = blob[len(MAGIC) + 1]
    nonce_at = _FIXED_START + key_id_length + _U32.size
    header_length = nonce_at + NONCE_BYTES + IV_BYTES
    if key_id_length == 0 or len(blob) < header_length + TAG_BYTES:
        raise InvalidCiphertextError()
    try:
        key_id = validate_key_id(blob[_FIXED_START : _FIXED_START + key_id_length].decode("ascii"))
    except (UnicodeDecodeError, InvalidInputError):
        raise InvalidCiphertextError() from None
    (backing_version,) = _U32.unpack_from(blob, nonce_at - _U32.size)
    if backing_version == 0:
        raise InvalidCiphertextError()
    return CiphertextHeader(
        key_id=key_id,
        backing_version=backing_version,
        nonce=blob[nonce_at : nonce_at + NONCE_BYTES],
        iv=blob[nonce_at + NONCE_BYTES : header_length],
        header=blob[:header_length],
    )


def decrypt(
    backing_key: bytes,
    blob: bytes,
    context: Mapping[str, str],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Open a blob with the backing key its header names; all of the plaintext or nothing.

    The caller finds the backing key with `parse_header(blob)` (key id and backing version).
    A context that is itself invalid (empty key, over the limits) is rejected as bad input
    first, since no blob could have been made with it; every failure that concerns the blob
    raises InvalidCiphertextError("invalid ciphertext").
    """
    _require_key(backing_key, "backing_key")
    encoded_context = encode_context(context, limits)
    return _open(backing_key, blob, encoded_context, parse_header(blob, limits))


def decrypt_encoded(
    backing_key: bytes,
    blob: bytes,
    encoded_context: bytes,
    header: CiphertextHeader,
) -> bytes:
    """`decrypt`, with the context given as the bytes `encode_context` returned for it and the
    header `parse_header` returned for this very blob (so that neither is done twice).

    A header that is not the one of `blob` opens nothing (InvalidCiphertextError).
    """
    _require_key(backing_key, "backing_key")
    if not isinstance(encoded_context, bytes):
        raise TypeError("encoded_context must be the bytes encode_context returned")
    if not isinstance(blob, bytes) or not blob.startswith(header.header):
        raise InvalidCiphertextError()
    return _open(backing_key, blob, encoded_context, header)


def _open(
    backing_key: bytes, blob: bytes, encoded_context: bytes, header: CiphertextHeader
) -> bytes:
    one_time_key = _one_time_key(backing_key, header.nonce, header.prefix)
    return crypto.aes_gcm_open(
        one_time_key,
        blob[len(header.header) :],
        header.header + encoded_context,
        header.iv,
        error=InvalidCiphertextError,
    )
