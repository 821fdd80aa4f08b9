"""Client-side envelope encryption: a self-describing, chunked format for data of any size.

The client calls GenerateDataKey (getting a data key and its HSMC blob), encrypts locally with
the data key, and stores the blob in the envelope header. To decrypt, it reads the header,
asks the key service to Decrypt the blob (with the header's encryption context), and opens
the chunks with the returned data key. Layout (integers big-endian; the byte table is in
docs/ciphertext-format.md):

    magic b"HSME" | version 0x01 | u32 len | encrypted data key (HSMC blob)
    | u32 len | canonical encryption context | u32 chunk size | nonce prefix (8, random)
    | chunk 0 | chunk 1 | ... | final chunk

    header digest = SHA-256(ENVELOPE_CONTEXT || header)      (header = magic .. nonce prefix)
    chunk i       = AES-256-GCM(data key, nonce = prefix || u32 i, chunk plaintext,
                                associated data = header digest || u32 i || final flag (1 byte))

Every chunk but the last holds exactly `chunk size` plaintext bytes; the final chunk holds
fewer (possibly none, so a stream whose length is a multiple of the chunk size ends with an
empty final chunk) and carries final flag 1. A chunk is therefore known to be final from its
length alone, with no lookahead.

Invariants kept here:
- every chunk is bound to the whole header (data key blob, context, chunk size, prefix), to its
  position and to whether it is last, so a changed header, dropped, reordered, duplicated or
  truncated chunk, a stream without its final chunk, or bytes after it all fail;
- every failure is `InvalidCiphertextError("invalid ciphertext")` with no detail, and the
  decryptor refuses all further input after one;
- memory is bounded by the chunk size, whatever the stream length.

A streaming decryptor RELEASES PLAINTEXT CHUNK BY CHUNK, before it has seen the end of the
stream: each released chunk is authentic and in place, but a truncated stream is only detected
at the end (`finalize`). A caller writing the plaintext somewhere must treat it as unconfirmed
until `finalize` returns, and discard it on error. `domain_edge.envelope_files` does this for
files: it writes to a temporary file next to the target and renames it into place only on
success.

A data key must encrypt only one envelope (GenerateDataKey gives a fresh one per call); the
random nonce prefix is a second line of defence, not a licence to reuse data keys.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from domain_core import crypto
from domain_core.ciphertext import decode_context, encode_context, parse_header
from domain_core.contexts import ENVELOPE_CONTEXT
from domain_core.errors import InvalidCiphertextError
from domain_core.limits import DEFAULT_LIMITS, MAX_CHUNK_SIZE, Limits

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "NONCE_PREFIX_BYTES",
    "ByteReader",
    "ByteWriter",
    "EnvelopeDecryptor",
    "EnvelopeEncryptor",
    "EnvelopeHeader",
    "decrypt_stream",
    "encrypt_stream",
    "open_envelope",
    "parse_envelope_header",
    "seal_envelope",
]

MAGIC: Final = b"HSME"
FORMAT_VERSION: Final = 1
NONCE_PREFIX_BYTES: Final = 8
DEFAULT_CHUNK_SIZE: Final = 64 * 1024

_U32: Final = struct.Struct(">I")
_MAX_CHUNKS: Final = 1 << 32
_TAG_BYTES: Final = crypto.GCM_TAG_BYTES
_NON_FINAL: Final = b"\x00"
_FINAL: Final = b"\x01"


class ByteReader(Protocol):
    """Anything with `read(n) -> bytes` (a file opened "rb", io.BytesIO, a socket file)."""

    def read(self, size: int = -1, /) -> bytes: ...


class ByteWriter(Protocol):
    """Anything with `write(bytes)` (a file opened "wb", io.BytesIO)."""

    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class EnvelopeHeader:
    """An envelope's header: what the client needs to get the data key, and the chunk layout."""

    encrypted_data_key: bytes
    """The HSMC blob of the data key: Decrypt it with `context` to get the data key."""
    context: dict[str, str]
    """The encryption context, for the Decrypt call."""
    chunk_size: int
    nonce_prefix: bytes
    raw: bytes
    """The header bytes exactly as read; every chunk is bound to their digest."""

    @property
    def digest(self) -> bytes:
        """SHA-256(ENVELOPE_CONTEXT || header): the first part of every chunk's associated data."""
        return _header_digest(self.raw)


def _header_digest(raw: bytes) -> bytes:
    return hashlib.sha256(ENVELOPE_CONTEXT + raw).digest()


def _chunk_nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + _U32.pack(counter)


def _chunk_ad(digest: bytes, counter: int, final: bool) -> bytes:
    return digest + _U32.pack(counter) + (_FINAL if final else _NON_FINAL)


def _check_data_key(data_key: bytes) -> None:
    if not isinstance(data_key, bytes) or len(data_key) != crypto.AES_KEY_BYTES:
        raise ValueError(f"data_key must be {crypto.AES_KEY_BYTES} bytes")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError("chunk_size must be an int")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}")


def _max_encrypted_data_key_bytes(limits: Limits) -> int:
    # The largest HSMC blob: 6 + 255 (key id) + 4 + 32 + 12 + plaintext + 16.
    return 325 + limits.max_plaintext_bytes


def _max_context_bytes(limits: Limits) -> int:
    return 4 + 8 * limits.max_encryption_context_entries + limits.max_encryption_context_bytes


# --- encryption ------------------------------------------------------------------------------


class EnvelopeEncryptor:
    """Encrypts one envelope incrementally: write `header()`, then every `update()`, then
    `finalize()`. Holds at most one chunk of plaintext."""

    def __init__(
        self,
        data_key: bytes,
        encrypted_data_key: bytes,
        context: Mapping[str, str],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        nonce_prefix: bytes | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """`nonce_prefix` exists ONLY for the golden test vectors; leave it unset."""
        _check_data_key(data_key)
        _check_chunk_size(chunk_size)
        if not isinstance(encrypted_data_key, bytes):
            raise TypeError("encrypted_data_key must be bytes")
        try:
            parse_header(encrypted_data_key, limits)
        except InvalidCiphertextError:
            raise ValueError(
                "encrypted_data_key is not a key service ciphertext blob (HSMC); pass the "
                "ciphertext_blob returned by GenerateDataKey"
            ) from None
        encoded_context = encode_context(context, limits)
        if nonce_prefix is None:
            nonce_prefix = crypto.random_bytes(NONCE_PREFIX_BYTES)
        elif not isinstance(nonce_prefix, bytes) or len(nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ValueError(f"nonce_prefix must be {NONCE_PREFIX_BYTES} bytes")
        self._header = (
            MAGIC
            + bytes((FORMAT_VERSION,))
            + _U32.pack(len(encrypted_data_key))
            + encrypted_data_key
            + _U32.pack(len(encoded_context))
            + encoded_context
            + _U32.pack(chunk_size)
            + nonce_prefix
        )
        self._digest = _header_digest(self._header)
        self._key = data_key
        self._prefix = nonce_prefix
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._counter = 0
        self._finalized = False

    def header(self) -> bytes:
        """The header bytes; they come first in the envelope."""
        return self._header

    def _seal(self, plaintext: bytes, final: bool) -> bytes:
        if self._counter >= _MAX_CHUNKS:
            raise ValueError("too many chunks for one envelope; use a larger chunk size")
        sealed = crypto.aes_gcm_seal(
            self._key,
            plaintext,
            _chunk_ad(self._digest, self._counter, final),
            _chunk_nonce(self._prefix, self._counter),
        )
        self._counter += 1
        return sealed

    def update(self, data: bytes) -> bytes:
        """Encrypt more plaintext; returns the chunks completed so far (possibly none)."""
        if self._finalized:
            raise RuntimeError("the envelope is finalized")
        self._buffer += data
        out = bytearray()
        size = self._chunk_size
        offset = 0
        while len(self._buffer) - offset >= size:
            out += self._seal(bytes(self._buffer[offset : offset + size]), final=False)
            offset += size
        del self._buffer[:offset]
        return bytes(out)

    def finalize(self) -> bytes:
        """The final chunk (the remaining plaintext, shorter than a chunk, possibly empty)."""
        if self._finalized:
            raise RuntimeError("the envelope is finalized")
        self._finalized = True
        out = self._seal(bytes(self._buffer), final=True)
        self._buffer.clear()
        return out


def encrypt_stream(
    reader: ByteReader,
    writer: ByteWriter,
    data_key: bytes,
    encrypted_data_key: bytes,
    context: Mapping[str, str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Encrypt everything `reader` yields into `writer` as one envelope; returns the number of
    plaintext bytes. Memory use is about one chunk."""
    encryptor = EnvelopeEncryptor(data_key, encrypted_data_key, context, chunk_size, limits=limits)
    writer.write(encryptor.header())
    total = 0
    while True:
        data = reader.read(chunk_size)
        if not data:
            break
        total += len(data)
        out = encryptor.update(data)
        if out:
            writer.write(out)
    writer.write(encryptor.finalize())
    return total


def seal_envelope(
    data_key: bytes,
    encrypted_data_key: bytes,
    context: Mapping[str, str],
    plaintext: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """One-shot envelope encryption of bytes held in memory."""
    encryptor = EnvelopeEncryptor(data_key, encrypted_data_key, context, chunk_size, limits=limits)
    return encryptor.header() + encryptor.update(plaintext) + encryptor.finalize()


# --- decryption ------------------------------------------------------------------------------


def _read_exact(reader: ByteReader, n: int) -> bytes:
    """Exactly `n` bytes (looping over short reads); InvalidCiphertextError at an early end."""
    parts = []
    remaining = n
    while remaining > 0:
        data = reader.read(remaining)
        if not data:
            raise InvalidCiphertextError()
        if len(data) > remaining:
            raise ValueError("reader returned more bytes than asked for")
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def _read_u32(reader: ByteReader) -> tuple[bytes, int]:
    raw = _read_exact(reader, _U32.size)
    return raw, _U32.unpack(raw)[0]


def parse_envelope_header(
    source: ByteReader | bytes, limits: Limits = DEFAULT_LIMITS
) -> EnvelopeHeader:
    """Read and check an envelope header, leaving `source` at the first chunk.

    `source` is a reader, or the envelope as bytes. Nothing here is authenticated yet (that
    needs the data key): the header only tells the client what to Decrypt. Anything malformed
    or out of bounds is InvalidCiphertextError.
    """
    reader: ByteReader = io.BytesIO(source) if isinstance(source, bytes) else source
    start = _read_exact(reader, len(MAGIC) + 1)
    if start != MAGIC + bytes((FORMAT_VERSION,)):
        raise InvalidCiphertextError()
    edk_length_raw, edk_length = _read_u32(reader)
    if edk_length > _max_encrypted_data_key_bytes(limits):
        raise InvalidCiphertextError()
    encrypted_data_key = _read_exact(reader, edk_length)
    parse_header(encrypted_data_key, limits)
    context_length_raw, context_length = _read_u32(reader)
    if context_length > _max_context_bytes(limits):
        raise InvalidCiphertextError()
    encoded_context = _read_exact(reader, context_length)
    context = decode_context(encoded_context, limits)
    chunk_size_raw, chunk_size = _read_u32(reader)
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidCiphertextError()
    nonce_prefix = _read_exact(reader, NONCE_PREFIX_BYTES)
    raw = (
        start
        + edk_length_raw
        + encrypted_data_key
        + context_length_raw
        + encoded_context
        + chunk_size_raw
        + nonce_prefix
    )
    return EnvelopeHeader(
        encrypted_data_key=encrypted_data_key,
        context=context,
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        raw=raw,
    )


class EnvelopeDecryptor:
    """Decrypts the chunks that follow a parsed header, incrementally.

    `update()` returns the plaintext of every complete chunk at once (see the module note:
    released plaintext is unconfirmed until `finalize()` returns); `finalize()` opens the final
    chunk and fails if the stream was cut short. After any failure every call fails.
    """

    def __init__(self, data_key: bytes, header: EnvelopeHeader) -> None:
        _check_data_key(data_key)
        if not isinstance(header, EnvelopeHeader):
            raise TypeError("header must be an EnvelopeHeader (from parse_envelope_header)")
        self._key = data_key
        self._digest = header.digest
        self._prefix = header.nonce_prefix
        self._full = header.chunk_size + _TAG_BYTES
        self._buffer = bytearray()
        self._counter = 0
        self._done = False
        self._failed = False

    def _open(self, sealed: bytes, final: bool) -> bytes:
        if self._counter >= _MAX_CHUNKS:
            raise InvalidCiphertextError()
        plaintext = crypto.aes_gcm_open(
            self._key,
            sealed,
            _chunk_ad(self._digest, self._counter, final),
            _chunk_nonce(self._prefix, self._counter),
            error=InvalidCiphertextError,
        )
        self._counter += 1
        return plaintext

    def _check_usable(self) -> None:
        if self._failed or self._done:
            self._failed = True
            raise InvalidCiphertextError()

    def update(self, data: bytes) -> bytes:
        """Feed more envelope bytes; returns the plaintext of the chunks completed by them."""
        self._check_usable()
        try:
            self._buffer += data
            out = bytearray()
            offset = 0
            while len(self._buffer) - offset >= self._full:
                out += self._open(bytes(self._buffer[offset : offset + self._full]), final=False)
                offset += self._full
            del self._buffer[:offset]
            return bytes(out)
        except InvalidCiphertextError:
            self._failed = True
            self._buffer.clear()
            raise

    def finalize(self) -> bytes:
        """Open the final chunk; InvalidCiphertextError if it is missing, altered or followed
        by anything. Only when this returns is the whole plaintext confirmed."""
        self._check_usable()
        self._done = True
        sealed = bytes(self._buffer)
        self._buffer.clear()
        try:
            return self._open(sealed, final=True)
        except InvalidCiphertextError:
            self._failed = True
            raise


def _decrypt_into(
    reader: ByteReader, writer: ByteWriter, decryptor: EnvelopeDecryptor, read_size: int
) -> int:
    total = 0
    while True:
        data = reader.read(read_size)
        if not data:
            break
        out = decryptor.update(data)
        if out:
            writer.write(out)
            total += len(out)
    out = decryptor.finalize()
    writer.write(out)
    return total + len(out)


def decrypt_stream(
    reader: ByteReader, writer: ByteWriter, data_key: bytes, header: EnvelopeHeader
) -> int:
    """Decrypt the chunks that follow `header` in `reader` into `writer`; returns the
    plaintext length.

    Plaintext is written chunk by chunk as it is authenticated, and on InvalidCiphertextError
    the writer already holds unconfirmed plaintext: the caller must discard it. For a file
    that appears whole or not at all, use `domain_edge.envelope_files.decrypt_to_file`.
    """
    decryptor = EnvelopeDecryptor(data_key, header)
    return _decrypt_into(reader, writer, decryptor, header.chunk_size + _TAG_BYTES)


def open_envelope(data_key: bytes, envelope: bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """One-shot decryption of an envelope held in memory; all of the plaintext or nothing.

    Get the data key first from `parse_envelope_header(envelope)`: Decrypt its
    `encrypted_data_key` with its `context`.
    """
    if not isinstance(envelope, bytes):
        raise TypeError("envelope must be bytes")
    reader = io.BytesIO(envelope)
    header = parse_envelope_header(reader, limits)
    decryptor = EnvelopeDecryptor(data_key, header)
    body = decryptor.update(reader.read())
    return body + decryptor.finalize()
