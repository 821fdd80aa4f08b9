"""domain_core.crypto: AES-GCM and sealed boxes fail with one detail-free error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_core import crypto
from domain_core.errors import InvalidCiphertextError, InvalidKeyTokenError

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NONCE = bytes(range(12))
AD = b"associated data"
PLAINTEXT = b"the domain keys, or anything else secret"
SEALED = crypto.aes_gcm_seal(KEY, PLAINTEXT, AD, NONCE)

X_PRIVATE, X_PUBLIC = crypto.x25519_generate()
X_OTHER_PRIVATE, _ = crypto.x25519_generate()
BOX = crypto.seal_to_host(X_PUBLIC, b"current domain key")


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _assert_no_detail(error: BaseException, message: str = "invalid key token") -> None:
    assert str(error) == message
    assert error.args == (message,)
    # No chained exception (e.g. the library's InvalidTag) that could carry detail.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


# --- AES-256-GCM ---------------------------------------------------------------------------


def test_aes_gcm_roundtrip() -> None:
    assert crypto.aes_gcm_open(KEY, SEALED, AD, NONCE) == PLAINTEXT
    assert len(SEALED) == len(PLAINTEXT) + crypto.GCM_TAG_BYTES


def test_aes_gcm_empty_plaintext_roundtrip() -> None:
    sealed = crypto.aes_gcm_seal(KEY, b"", b"", NONCE)
    assert crypto.aes_gcm_open(KEY, sealed, b"", NONCE) == b""


@pytest.mark.parametrize(
    ("key", "nonce", "expected_hex"),
    [
        # NIST GCM test cases 13 and 14 (256-bit zero key, zero IV).
        (bytes(32), b"", "530f8afbc74536b9a963b4f1c4cb738b"),
        (
            bytes(32),
            bytes(16),
            "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919",
        ),
    ],
)
def test_aes_gcm_known_answers(key: bytes, nonce: bytes, expected_hex: str) -> None:
    assert crypto.aes_gcm_seal(key, nonce, b"", bytes(12)).hex() == expected_hex


OpenArgs = tuple[bytes, bytes, bytes, bytes]
TAMPERS: dict[str, Callable[[], OpenArgs]] = {
    "wrong key": lambda: (OTHER_KEY, SEALED, AD, NONCE),
    "wrong associated data": lambda: (KEY, SEALED, AD + b"!", NONCE),
    "empty associated data": lambda: (KEY, SEALED, b"", NONCE),
    "wrong nonce": lambda: (KEY, SEALED, AD, _flip(NONCE, 0)),
    "short nonce": lambda: (KEY, SEALED, AD, NONCE[:11]),
    "long nonce": lambda: (KEY, SEALED, AD, NONCE + b"\x00"),
    "short key": lambda: (KEY[:31], SEALED, AD, NONCE),
    "truncated by one byte": lambda: (KEY, SEALED[:-1], AD, NONCE),
    "tag only": lambda: (KEY, SEALED[-16:], AD, NONCE),
    "shorter than a tag": lambda: (KEY, SEALED[:15], AD, NONCE),
    "empty": lambda: (KEY, b"", AD, NONCE),
    "extra byte": lambda: (KEY, SEALED + b"\x00", AD, NONCE),
    "flipped first ciphertext bit": lambda: (KEY, _flip(SEALED, 0), AD, NONCE),
    "flipped middle bit": lambda: (KEY, _flip(SEALED, len(SEALED) // 2), AD, NONCE),
    "flipped tag bit": lambda: (KEY, _flip(SEALED, len(SEALED) - 1), AD, NONCE),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_aes_gcm_open_fails_with_one_error(case: str) -> None:
    with pytest.raises(InvalidKeyTokenError) as info:
        crypto.aes_gcm_open(*TAMPERS[case]())
    _assert_no_detail(info.value)


@pytest.mark.parametrize("case", ["wrong key", "short nonce", "flipped tag bit"])
def test_aes_gcm_open_raises_the_requested_error(case: str) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        crypto.aes_gcm_open(*TAMPERS[case](), error=InvalidCiphertextError)
    _assert_no_detail(info.value, "invalid ciphertext")


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(SEALED) * 8 - 1))
def test_aes_gcm_any_flipped_bit_fails(bit: int) -> None:
    tampered = bytearray(SEALED)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(InvalidKeyTokenError):
        crypto.aes_gcm_open(KEY, bytes(tampered), AD, NONCE)


@pytest.mark.parametrize(
    ("key", "nonce"),
    [(KEY[:16], NONCE), (KEY + b"\x00", NONCE), (KEY, NONCE[:8]), (KEY, NONCE + NONCE)],
)
def test_aes_gcm_seal_refuses_bad_parameters(key: bytes, nonce: bytes) -> None:
    # Sealing with a bad key or nonce is a programming error, not a domain error.
    with pytest.raises(ValueError, match="AES-256-GCM"):
        crypto.aes_gcm_seal(key, b"x", b"", nonce)


# --- sealed boxes --------------------------------------------------------------------------


def test_sealed_box_opens_with_the_right_key() -> None:
    assert crypto.open_sealed_box(X_PRIVATE, BOX) == b"current domain key"


def test_sealed_boxes_are_randomised() -> None:
    assert crypto.seal_to_host(X_PUBLIC, b"k") != crypto.seal_to_host(X_PUBLIC, b"k")


@pytest.mark.parametrize(
    ("private", "box"),
    [
        (X_OTHER_PRIVATE, BOX),
        (X_PRIVATE, _flip(BOX, 0)),
        (X_PRIVATE, _flip(BOX, 40)),
        (X_PRIVATE, _flip(BOX, len(BOX) - 1)),
        (X_PRIVATE, BOX[:-1]),
        (X_PRIVATE, BOX[:47]),
        (X_PRIVATE, b""),
        (X_PRIVATE, BOX + b"\x00"),
    ],
    ids=["wrong key", "flip-0", "flip-40", "flip-last", "truncated", "too short", "empty", "extra"],
)
def test_sealed_box_fails_with_one_error(private: bytes, box: bytes) -> None:
    with pytest.raises(InvalidKeyTokenError) as info:
        crypto.open_sealed_box(private, box)
    _assert_no_detail(info.value)


def test_sealed_box_key_length_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.seal_to_host(X_PUBLIC[:31], b"k")
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.open_sealed_box(X_PRIVATE[:31], BOX)


def test_x25519_public_from_private() -> None:
    assert crypto.x25519_public_from_private(X_PRIVATE) == X_PUBLIC
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.x25519_public_from_private(b"short")


# --- small helpers -------------------------------------------------------------------------


def test_random_bytes() -> None:
    assert len(crypto.random_bytes(0)) == 0
    assert len(crypto.random_bytes(33)) == 33
    assert crypto.random_bytes(16) != crypto.random_bytes(16)
    with pytest.raises(ValueError, match=">= 0"):
        crypto.random_bytes(-1)


def test_new_aes_key() -> None:
    assert len(crypto.new_aes_key()) == crypto.AES_KEY_BYTES == 32
    assert crypto.new_aes_key() != crypto.new_aes_key()


def test_constant_time_equal() -> None:
    assert crypto.constant_time_equal(b"abc", b"abc")
    assert not crypto.constant_time_equal(b"abc", b"abd")
    assert not crypto.constant_time_equal(b"abc", b"ab")


def test_hkdf_rfc5869_case_1() -> None:
    okm = crypto.hkdf_sha256(
        bytes([0x0B] * 22), salt=bytes(range(13)), info=bytes(range(0xF0, 0xFA)), length=42
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_rfc5869_case_3_empty_salt_and_info() -> None:
    okm = crypto.hkdf_sha256(bytes([0x0B] * 22), salt=b"", info=b"", length=42)
    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


@given(
    key=st.binary(min_size=1, max_size=80),
    salt=st.binary(max_size=100),
    info=st.binary(max_size=100),
    length=st.integers(min_value=1, max_value=255 * 32),
)
def test_hkdf_is_cryptographys_hkdf(key: bytes, salt: bytes, info: bytes, length: int) -> None:
    expected = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)
    assert crypto.hkdf_sha256(key, salt=salt, info=info, length=length) == expected


@pytest.mark.parametrize("length", [0, 255 * 32 + 1])
def test_hkdf_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.8160"):
        crypto.hkdf_sha256(KEY, salt=b"s", info=b"i", length=length)


def test_hkdf_binds_salt_and_info() -> None:
    base = crypto.hkdf_sha256(KEY, salt=b"s", info=b"i")
    assert len(base) == 32
    assert crypto.hkdf_sha256(KEY, salt=b"t", info=b"i") != base
    assert crypto.hkdf_sha256(KEY, salt=b"s", info=b"j") != base


def test_sha256() -> None:
    assert crypto.sha256(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
