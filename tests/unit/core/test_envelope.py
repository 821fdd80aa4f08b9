"""domain_core.envelope: chunked envelope encryption that detects every rearrangement."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.repository import VECTORS

from domain_core import ciphertext, envelope
from domain_core.envelope import (
    EnvelopeDecryptor,
    EnvelopeEncryptor,
    decrypt_stream,
    encrypt_stream,
    open_envelope,
    parse_envelope_header,
    seal_envelope,
)
from domain_core.errors import InvalidCiphertextError, LimitExceededError
from domain_core.limits import MAX_CHUNK_SIZE
from domain_edge.envelope_files import decrypt_to_file

pytestmark = pytest.mark.unit

BACKING_KEY = bytes(range(32))
KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
CONTEXT = {"bucket": "backups", "object": "db-2026-01-01.tar"}
DATA_KEY = bytes(range(100, 132))
OTHER_DATA_KEY = bytes(range(101, 133))
EDK = ciphertext.encrypt(BACKING_KEY, KEY_ID, 1, DATA_KEY, CONTEXT)
CHUNK = 16
TAG = 16


def _seal(plaintext: bytes, chunk_size: int = CHUNK) -> bytes:
    return seal_envelope(DATA_KEY, EDK, CONTEXT, plaintext, chunk_size=chunk_size)


def _split(sealed: bytes, chunk_size: int = CHUNK) -> tuple[bytes, list[bytes]]:
    """Header and chunks (every chunk full-size except the last)."""
    header = parse_envelope_header(sealed).raw
    body = sealed[len(header) :]
    full = chunk_size + TAG
    chunks = [body[i : i + full] for i in range(0, len(body), full)]
    if len(chunks[-1]) == full:  # an exact multiple ends with an empty (16-byte) final chunk
        raise AssertionError("the last chunk must be shorter than a full chunk")
    return header, chunks


def _expect_invalid(sealed: bytes, data_key: bytes = DATA_KEY) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        open_envelope(data_key, sealed)
    assert str(info.value) == "invalid ciphertext"
    assert info.value.__cause__ is None


PLAINTEXT = bytes(range(256)) * 2 + b"tail"  # 516 bytes: 32 full chunks and a 4-byte final
SEALED = _seal(PLAINTEXT)


# --- roundtrips ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 10 * CHUNK + 3])
def test_roundtrip_sizes(size: int) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    sealed = _seal(plaintext)
    assert open_envelope(DATA_KEY, sealed) == plaintext
    _header, chunks = _split(sealed)
    assert len(chunks) == size // CHUNK + 1
    assert len(chunks[-1]) == size % CHUNK + TAG


def test_roundtrip_default_chunk_size_one_chunk() -> None:
    plaintext = bytes(envelope.DEFAULT_CHUNK_SIZE)
    sealed = seal_envelope(DATA_KEY, EDK, CONTEXT, plaintext)
    assert parse_envelope_header(sealed).chunk_size == 64 * 1024
    assert open_envelope(DATA_KEY, sealed) == plaintext


def test_header_exposes_what_the_client_needs_to_decrypt() -> None:
    header = parse_envelope_header(SEALED)
    assert header.encrypted_data_key == EDK
    assert header.context == CONTEXT
    assert header.chunk_size == CHUNK
    assert len(header.nonce_prefix) == 8
    # The client's path: Decrypt the data key with the key service, then open the envelope.
    data_key = ciphertext.decrypt(BACKING_KEY, header.encrypted_data_key, header.context)
    assert open_envelope(data_key, SEALED) == PLAINTEXT


def test_header_layout_matches_the_spec() -> None:
    header = parse_envelope_header(SEALED).raw
    encoded_context = ciphertext.encode_context(CONTEXT)
    assert header[:5] == b"HSME\x01"
    assert header[5:9] == struct.pack(">I", len(EDK))
    assert header[9 : 9 + len(EDK)] == EDK
    at = 9 + len(EDK)
    assert header[at : at + 4] == struct.pack(">I", len(encoded_context))
    assert header[at + 4 : at + 4 + len(encoded_context)] == encoded_context
    at += 4 + len(encoded_context)
    assert header[at : at + 4] == struct.pack(">I", CHUNK)
    assert len(header) == at + 4 + 8


def test_incremental_update_in_odd_pieces_matches_one_shot() -> None:
    encryptor = EnvelopeEncryptor(DATA_KEY, EDK, CONTEXT, CHUNK)
    pieces = [encryptor.header()]
    for i in range(0, len(PLAINTEXT), 7):
        pieces.append(encryptor.update(PLAINTEXT[i : i + 7]))
    pieces.append(encryptor.finalize())
    sealed = b"".join(pieces)
    header = parse_envelope_header(sealed)
    decryptor = EnvelopeDecryptor(DATA_KEY, header)
    out = bytearray()
    body = sealed[len(header.raw) :]
    for i in range(0, len(body), 5):
        out += decryptor.update(body[i : i + 5])
    out += decryptor.finalize()
    assert bytes(out) == PLAINTEXT


class _TrickleReader:
    """A reader that returns at most `step` bytes per call (like a pipe or socket)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            size = self._step
        return self._data.read(min(size, self._step))


def test_streams_with_short_reads() -> None:
    sink = io.BytesIO()
    assert encrypt_stream(
        _TrickleReader(PLAINTEXT, 3), sink, DATA_KEY, EDK, CONTEXT, chunk_size=CHUNK
    ) == len(PLAINTEXT)
    reader = _TrickleReader(sink.getvalue(), 3)
    header = parse_envelope_header(reader)
    out = io.BytesIO()
    assert decrypt_stream(reader, out, DATA_KEY, header) == len(PLAINTEXT)
    assert out.getvalue() == PLAINTEXT


class _PatternReader:
    """`total` bytes of a cheap deterministic pattern, generated as they are read."""

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.hash = hashlib.sha256()
        self._block = hashlib.sha256(b"pattern").digest() * 2048  # 64 KiB

    def read(self, size: int = -1, /) -> bytes:
        n = min(self.remaining, len(self._block) if size < 0 else size, len(self._block))
        self.remaining -= n
        data = self._block[:n]
        self.hash.update(data)
        return data


class _HashingWriter:
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes, /) -> int:
        self.hash.update(data)
        self.count += len(data)
        return len(data)


def test_20_mib_streams_through_with_only_the_ciphertext_in_memory() -> None:
    total = 20 * 1024 * 1024 + 12345
    source = _PatternReader(total)
    sealed = io.BytesIO()
    assert encrypt_stream(source, sealed, DATA_KEY, EDK, CONTEXT) == total
    sealed.seek(0)
    header = parse_envelope_header(sealed)
    sink = _HashingWriter()
    assert decrypt_stream(sealed, sink, DATA_KEY, header) == total
    assert sink.count == total
    assert sink.hash.digest() == source.hash.digest()


# --- rearrangements all fail ---------------------------------------------------------------


def test_wrong_data_key_fails() -> None:
    _expect_invalid(SEALED, OTHER_DATA_KEY)


def test_dropped_chunks_fail() -> None:
    header, chunks = _split(SEALED)
    for i in range(len(chunks)):
        _expect_invalid(header + b"".join(chunks[:i] + chunks[i + 1 :]))


def test_reordered_chunks_fail() -> None:
    header, chunks = _split(SEALED)
    for i in range(len(chunks) - 2):
        swapped = [*chunks[:i], chunks[i + 1], chunks[i], *chunks[i + 2 :]]
        _expect_invalid(header + b"".join(swapped))


def test_duplicated_chunks_fail() -> None:
    header, chunks = _split(SEALED)
    for i in range(len(chunks) - 1):
        _expect_invalid(header + b"".join([*chunks[: i + 1], chunks[i], *chunks[i + 1 :]]))


def test_missing_final_chunk_fails() -> None:
    header, chunks = _split(SEALED)
    _expect_invalid(header + b"".join(chunks[:-1]))
    # Also when the final chunk is the empty one that follows an exact multiple.
    exact = _seal(bytes(4 * CHUNK))
    header, chunks = _split(exact)
    assert len(chunks[-1]) == TAG
    _expect_invalid(header + b"".join(chunks[:-1]))


def test_every_truncation_fails() -> None:
    for length in range(len(SEALED)):
        _expect_invalid(SEALED[:length])


def test_bytes_after_the_final_chunk_fail() -> None:
    for extra in (b"\x00", bytes(CHUNK + TAG), SEALED[-TAG:]):
        _expect_invalid(SEALED + extra)


def test_chunk_from_another_envelope_with_the_same_data_key_fails() -> None:
    other = _seal(PLAINTEXT)  # same key and EDK, different nonce prefix
    header, chunks = _split(SEALED)
    _, other_chunks = _split(other)
    _expect_invalid(header + b"".join([*chunks[:3], other_chunks[3], *chunks[4:]]))
    # And the other envelope's body under this header.
    _expect_invalid(header + b"".join(other_chunks))


def test_final_chunk_moved_earlier_fails() -> None:
    # An envelope of one full chunk and a short final, cut to look like "final only".
    sealed = _seal(bytes(CHUNK + 3))
    header, chunks = _split(sealed)
    _expect_invalid(header + chunks[1])


def test_changed_header_fields_fail() -> None:
    header = parse_envelope_header(SEALED)
    body = SEALED[len(header.raw) :]
    other_context = {**CONTEXT, "object": "other"}
    other_edk = ciphertext.encrypt(BACKING_KEY, KEY_ID, 1, DATA_KEY, CONTEXT)
    for edk, context in ((EDK, other_context), (other_edk, CONTEXT)):
        forged = EnvelopeEncryptor(
            DATA_KEY, edk, context, CHUNK, nonce_prefix=header.nonce_prefix
        ).header()
        _expect_invalid(forged + body)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_any_single_flipped_bit_fails(data: st.DataObject) -> None:
    bit = data.draw(st.integers(min_value=0, max_value=len(SEALED) * 8 - 1), label="bit")
    flipped = bytearray(SEALED)
    flipped[bit // 8] ^= 1 << (bit % 8)
    _expect_invalid(bytes(flipped))


def test_decryptor_refuses_everything_after_a_failure_or_the_end() -> None:
    header = parse_envelope_header(SEALED)
    body = bytearray(SEALED[len(header.raw) :])
    body[0] ^= 1
    decryptor = EnvelopeDecryptor(DATA_KEY, header)
    with pytest.raises(InvalidCiphertextError):
        decryptor.update(bytes(body))
    with pytest.raises(InvalidCiphertextError):
        decryptor.update(b"")
    with pytest.raises(InvalidCiphertextError):
        decryptor.finalize()
    done = EnvelopeDecryptor(DATA_KEY, header)
    done.update(SEALED[len(header.raw) :])
    done.finalize()
    with pytest.raises(InvalidCiphertextError):
        done.update(b"more")
    with pytest.raises(InvalidCiphertextError):
        done.finalize()


def test_plaintext_is_released_chunk_by_chunk_and_truncation_shows_at_the_end() -> None:
    _header, chunks = _split(SEALED)
    parsed = parse_envelope_header(SEALED)
    decryptor = EnvelopeDecryptor(DATA_KEY, parsed)
    released = decryptor.update(b"".join(chunks[:-1]))
    assert released == PLAINTEXT[: len(released)]
    assert len(released) == (len(chunks) - 1) * CHUNK
    with pytest.raises(InvalidCiphertextError):
        decryptor.finalize()


# --- malformed headers ---------------------------------------------------------------------


def _header_with(
    *, edk_length: int | None = None, context: bytes | None = None, chunk_size: int = CHUNK
) -> bytes:
    edk_length = len(EDK) if edk_length is None else edk_length
    context = ciphertext.encode_context(CONTEXT) if context is None else context
    return (
        b"HSME\x01"
        + struct.pack(">I", edk_length)
        + EDK
        + struct.pack(">I", len(context))
        + context
        + struct.pack(">I", chunk_size)
        + bytes(8)
    )


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"HSME",
        b"HSMC\x01" + bytes(100),
        b"HSME\x02" + SEALED[5:],
        _header_with(edk_length=0xFFFFFFFF),
        _header_with(edk_length=len(EDK) - 1),
        b"HSME\x01" + struct.pack(">I", 10) + bytes(10) + SEALED[9 + len(EDK) :],  # EDK not HSMC
        _header_with(context=b"\x00\x00\x00\x01"),
        _header_with(context=b"\xff\xff\xff\xff"),
        _header_with(chunk_size=0),
        _header_with(chunk_size=MAX_CHUNK_SIZE + 1),
    ],
)
def test_malformed_headers_fail(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        parse_envelope_header(blob)
    assert str(info.value) == "invalid ciphertext"


def test_encryptor_rejects_misuse() -> None:
    with pytest.raises(ValueError, match="data_key"):
        EnvelopeEncryptor(bytes(16), EDK, CONTEXT)
    with pytest.raises(ValueError, match="HSMC"):
        EnvelopeEncryptor(DATA_KEY, b"not a blob", CONTEXT)
    with pytest.raises(ValueError, match="chunk_size"):
        EnvelopeEncryptor(DATA_KEY, EDK, CONTEXT, 0)
    with pytest.raises(ValueError, match="nonce_prefix"):
        EnvelopeEncryptor(DATA_KEY, EDK, CONTEXT, nonce_prefix=bytes(12))
    with pytest.raises(LimitExceededError):
        EnvelopeEncryptor(DATA_KEY, EDK, {f"k{i}": "v" for i in range(65)})
    encryptor = EnvelopeEncryptor(DATA_KEY, EDK, CONTEXT)
    encryptor.finalize()
    with pytest.raises(RuntimeError):
        encryptor.update(b"x")
    with pytest.raises(RuntimeError):
        encryptor.finalize()


# --- decrypting to a file (domain_edge.envelope_files) ---------------------------------


def test_decrypt_to_path_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    reader = io.BytesIO(SEALED)
    header = parse_envelope_header(reader)
    assert decrypt_to_file(reader, target, DATA_KEY, header) == len(PLAINTEXT)
    assert target.read_bytes() == PLAINTEXT
    assert target.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("cut", [TAG, 3 * (CHUNK + TAG)])
def test_decrypt_to_path_leaves_nothing_on_failure(tmp_path: Path, cut: int) -> None:
    target = tmp_path / "out.bin"
    truncated = SEALED[:-cut]
    reader = io.BytesIO(truncated)
    header = parse_envelope_header(reader)
    with pytest.raises(InvalidCiphertextError):
        decrypt_to_file(reader, target, DATA_KEY, header)
    assert list(tmp_path.iterdir()) == []
    # An existing file is left as it was.
    target.write_bytes(b"previous")
    reader = io.BytesIO(truncated)
    header = parse_envelope_header(reader)
    with pytest.raises(InvalidCiphertextError):
        decrypt_to_file(reader, str(target), DATA_KEY, header)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


# --- golden vectors ------------------------------------------------------------------------


def test_committed_envelope_vectors_open() -> None:
    committed: dict[str, Any] = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    keys = committed["keys"]
    for case in committed["envelopes"]:
        sealed = bytes.fromhex(case["envelope"])
        header = parse_envelope_header(sealed)
        assert header.raw.hex() == case["header"]
        assert header.digest.hex() == case["header_digest"]
        assert header.context == case["context"]
        assert header.chunk_size == case["chunk_size"]
        data_key = ciphertext.decrypt(
            bytes.fromhex(keys["backing_key"]), header.encrypted_data_key, header.context
        )
        assert data_key.hex() == keys["data_key"]
        assert open_envelope(data_key, sealed) == bytes.fromhex(case["plaintext"])
