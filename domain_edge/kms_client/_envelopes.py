"""Envelope encryption through the key service: a data key from GenerateDataKey, the data
streamed through `domain_core.envelope`.

Invariants: the data key is dropped as soon as the helper is done with it, and no plaintext
or data key is logged or put in a message; a decryption into a path appears whole or not at
all (`domain_edge.envelope_files`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import cast, overload

from domain_core import crypto, envelope
from domain_core.errors import InvalidCiphertextError
from domain_edge.envelope_files import decrypt_to_file
from domain_edge.kms_client._client import KeyClient
from domain_edge.kms_client._core import checked_context


def _reader(source: envelope.ByteReader | bytes) -> envelope.ByteReader:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return source


@overload
def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: None = None,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> bytes: ...


@overload
def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: envelope.ByteWriter,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> int: ...


def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: envelope.ByteWriter | None = None,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> bytes | int:
    """Envelope-encrypt `source` (bytes or a reader) under a fresh data key of `key_id`.

    GenerateDataKey gives the data key and its blob; the data is encrypted locally with
    AES-256-GCM in chunks (`envelope.EnvelopeEncryptor`), so memory stays about one chunk
    whatever the size. With `writer`, the envelope goes there and the plaintext length is
    returned; without, the envelope is returned as bytes. The data key is dropped right after
    use (Python cannot overwrite it in memory; see the package docstring).
    """
    wanted = checked_context(context, client.limits)
    data_key, blob = client.generate_data_key(key_id, wanted)
    try:
        out: envelope.ByteWriter = io.BytesIO() if writer is None else writer
        total = envelope.encrypt_stream(
            _reader(source),
            out,
            data_key,
            blob,
            wanted,
            chunk_size=chunk_size,
            limits=client.limits,
        )
    finally:
        del data_key
    if writer is None:
        return cast(io.BytesIO, out).getvalue()
    return total


@overload
def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: None = None,
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> bytes: ...


@overload
def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: envelope.ByteWriter | str | os.PathLike[str],
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> int: ...


def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: envelope.ByteWriter | str | os.PathLike[str] | None = None,
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> bytes | int:
    """Decrypt an envelope: read its header, Decrypt its data key through the key service,
    then open the chunks as they stream by.

    `context`, when given, must equal the context the envelope was made with (else "invalid
    ciphertext", like Decrypt); without it the header's context is used. `key_id` refuses an
    envelope whose data key belongs to another key.

    Output: None returns the plaintext as bytes (all or nothing); a path gets a temporary file
    renamed into place only once everything verified (nothing is left on failure); a writer gets
    plaintext chunk by chunk, each authentic, but the whole only confirmed when this returns:
    on InvalidCiphertextError the caller must discard what the writer received.
    """
    reader = _reader(source)
    header = envelope.parse_envelope_header(reader, client.limits)
    wanted = header.context if context is None else checked_context(context, client.limits)
    if wanted != header.context:
        raise InvalidCiphertextError()
    data_key = client.decrypt(header.encrypted_data_key, wanted, key_id=key_id)
    try:
        if len(data_key) != crypto.AES_KEY_BYTES:
            raise InvalidCiphertextError()
        if output is None:
            buffer = io.BytesIO()
            envelope.decrypt_stream(reader, buffer, data_key, header)
            return buffer.getvalue()
        if isinstance(output, str | os.PathLike):
            return decrypt_to_file(reader, output, data_key, header)
        return envelope.decrypt_stream(reader, output, data_key, header)
    finally:
        del data_key
