"""domain_core.ciphertext: the Encrypt blob opens only as sealed, and fails with one error.

Also runs Wycheproof's AES-256-GCM vectors through domain_core.crypto, and checks the
committed golden vectors of the blob format.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.repository import VECTORS

from domain_core import ciphertext, crypto
from domain_core.ciphertext import decrypt, encrypt, parse_header
from domain_core.errors import InvalidCiphertextError, InvalidInputError, LimitExceededError
from domain_core.limits import Limits

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
OTHER_KEY_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
CONTEXT = {"tenant": "acme", "purpose": "tests", "ü": "ß"}
PLAINTEXT = b"a secret of moderate length, to be sealed under a backing key"
BLOB = encrypt(KEY, KEY_ID, 2, PLAINTEXT, CONTEXT)


def _expect_invalid(blob: bytes, key: bytes = KEY, context: dict[str, str] = CONTEXT) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        decrypt(key, blob, context)
    _assert_no_detail(info.value)


def _assert_no_detail(error: BaseException) -> None:
    assert str(error) == "invalid ciphertext"
    assert error.args == ("invalid ciphertext",)
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def _flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --- roundtrip and header -----------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [b"", b"x", PLAINTEXT, bytes(4096)])
@pytest.mark.parametrize("context", [{}, {"a": "b"}, CONTEXT])
def test_roundtrip(plaintext: bytes, context: dict[str, str]) -> None:
    blob = encrypt(KEY, KEY_ID, 7, plaintext, context)
    assert decrypt(KEY, blob, context) == plaintext


def test_header_names_key_and_version_and_layout_matches_the_spec() -> None:
    header = parse_header(BLOB)
    assert header.key_id == KEY_ID
    assert header.backing_version == 2
    key_id_bytes = KEY_ID.encode()
    assert BLOB[:4] == b"HSMC"
    assert BLOB[4] == 1
    assert BLOB[5] == len(key_id_bytes) == 36
    assert BLOB[6:42] == key_id_bytes
    assert BLOB[42:46] == struct.pack(">I", 2)
    assert BLOB[46:78] == header.nonce
    assert BLOB[78:90] == header.iv
    assert header.header == BLOB[:90]
    assert header.prefix == BLOB[:46]
    assert len(BLOB) == 90 + len(PLAINTEXT) + 16


def test_every_blob_has_fresh_nonce_and_iv() -> None:
    blobs = {encrypt(KEY, KEY_ID, 1, b"same", {}) for _ in range(20)}
    assert len(blobs) == 20
    headers = [parse_header(b) for b in blobs]
    assert len({h.nonce for h in headers}) == 20
    assert len({h.iv for h in headers}) == 20


def test_injected_nonce_and_iv_are_deterministic() -> None:
    nonce, iv = bytes(32), bytes(12)
    one = encrypt(KEY, KEY_ID, 1, b"p", CONTEXT, nonce=nonce, iv=iv)
    assert one == encrypt(KEY, KEY_ID, 1, b"p", CONTEXT, nonce=nonce, iv=iv)
    with pytest.raises(ValueError, match="nonce"):
        encrypt(KEY, KEY_ID, 1, b"p", {}, nonce=bytes(12))
    with pytest.raises(ValueError, match="iv"):
        encrypt(KEY, KEY_ID, 1, b"p", {}, iv=bytes(32))


def test_one_time_key_differs_per_nonce_and_from_the_backing_key() -> None:
    header = parse_header(BLOB)
    k1 = ciphertext.derive_one_time_key(KEY, header.nonce, header.prefix)
    k2 = ciphertext.derive_one_time_key(KEY, bytes(32), header.prefix)
    assert len({k1, k2, KEY}) == 3


# --- context -------------------------------------------------------------------------------


def test_context_order_does_not_matter() -> None:
    reordered = dict(reversed(list(CONTEXT.items())))
    assert list(reordered) != list(CONTEXT)
    assert decrypt(KEY, BLOB, reordered) == PLAINTEXT


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"tenant": "acme", "purpose": "tests"},  # removed
        {**CONTEXT, "extra": "x"},  # added
        {**CONTEXT, "tenant": "acme2"},  # value changed
        {"Tenant": "acme", "purpose": "tests", "ü": "ß"},  # key changed (case)
        {"tenant": "acme", "purpose": "tests", "üß": "ß"},  # bytes moved into the key
    ],
)
def test_a_different_context_fails(context: dict[str, str]) -> None:
    _expect_invalid(BLOB, context=context)


def test_context_encoding_is_canonical_and_unambiguous() -> None:
    assert ciphertext.encode_context({}) == b"\x00\x00\x00\x00"
    assert ciphertext.encode_context({"b": "1", "a": "2"}) == (
        b"\x00\x00\x00\x02" + b"\x00\x00\x00\x01a\x00\x00\x00\x012"
        b"\x00\x00\x00\x01b\x00\x00\x00\x011"
    )
    # Sorted by UTF-8 bytes, not by code points' str order quirks: "Z" < "a" < "é".
    encoded = ciphertext.encode_context({"é": "1", "a": "1", "Z": "1"})
    assert encoded.index(b"Z") < encoded.index(b"a") < encoded.index("é".encode())
    # Length prefixes: moving bytes between key and value changes the encoding.
    assert ciphertext.encode_context({"ab": "c"}) != ciphertext.encode_context({"a": "bc"})


_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


@given(st.dictionaries(_TEXT, _TEXT, max_size=6))
@settings(max_examples=100, deadline=None)
def test_context_decode_inverts_encode(context: dict[str, str]) -> None:
    encoded = ciphertext.encode_context(context)
    assert ciphertext.decode_context(encoded) == context


@pytest.mark.parametrize(
    "encoded",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x00\x00",  # trailing byte
        b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01v",  # empty key
        b"\x00\x00\x00\x01\x00\x00\x00\x01k\x00\x00\x00\x00",  # empty value
        b"\x00\x00\x00\x01\x00\x00\x00\x01k\x00\x00\x00\x05v",  # length past the end
        b"\x00\x00\x00\x01\x00\x00\x00\x01\xff\x00\x00\x00\x01v",  # not UTF-8
        # unsorted
        b"\x00\x00\x00\x02\x00\x00\x00\x01b\x00\x00\x00\x011\x00\x00\x00\x01a\x00\x00\x00\x011",
        # duplicate key
        b"\x00\x00\x00\x02\x00\x00\x00\x01a\x00\x00\x00\x011\x00\x00\x00\x01a\x00\x00\x00\x012",
        b"\x00\x00\x00\x41",  # 65 entries claimed
    ],
)
def test_non_canonical_context_encodings_are_refused(encoded: bytes) -> None:
    with pytest.raises(InvalidCiphertextError):
        ciphertext.decode_context(encoded)


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({"": "v"}, "must not be empty"),
        ({"k": ""}, "must not be empty"),
        ({"k": "\ud800"}, "valid UTF-8"),
    ],
)
def test_invalid_context_is_bad_input(context: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        encrypt(KEY, KEY_ID, 1, b"p", context)
    assert not isinstance(info.value, InvalidCiphertextError)


def test_context_limits() -> None:
    limits = Limits()
    at_limit = {f"k{i}": "v" for i in range(limits.max_encryption_context_entries)}
    assert decrypt(KEY, encrypt(KEY, KEY_ID, 1, b"p", at_limit), at_limit) == b"p"
    with pytest.raises(LimitExceededError, match="has 65 entries; the limit is 64"):
        encrypt(KEY, KEY_ID, 1, b"p", {**at_limit, "one more": "v"})
    big = {"k": "v" * (limits.max_encryption_context_bytes - 1)}
    encrypt(KEY, KEY_ID, 1, b"p", big)
    with pytest.raises(LimitExceededError, match="is 8193 bytes; the limit is 8192"):
        encrypt(KEY, KEY_ID, 1, b"p", {"k": "v" * limits.max_encryption_context_bytes})
    # The same limits guard Decrypt's context, before the blob is looked at.
    with pytest.raises(LimitExceededError):
        decrypt(KEY, BLOB, {**at_limit, "one more": "v"})


def test_plaintext_limit() -> None:
    encrypt(KEY, KEY_ID, 1, bytes(4096), {})
    with pytest.raises(LimitExceededError) as info:
        encrypt(KEY, KEY_ID, 1, bytes(4097), {})
    assert str(info.value) == "plaintext is 4097 bytes; the limit is 4096"
    small = Limits(max_plaintext_bytes=10)
    with pytest.raises(LimitExceededError, match="the limit is 10"):
        encrypt(KEY, KEY_ID, 1, bytes(11), {}, limits=small)


# --- key ids -------------------------------------------------------------------------------


def test_new_key_ids_are_valid_uuid4_strings() -> None:
    ids = {ciphertext.new_key_id() for _ in range(50)}
    assert len(ids) == 50
    for key_id in ids:
        assert ciphertext.validate_key_id(key_id) == key_id
        assert uuid.UUID(key_id).version == 4


@pytest.mark.parametrize(
    "key_id",
    [
        "",
        "not-a-key",
        KEY_ID.upper(),
        "{" + KEY_ID + "}",
        KEY_ID.replace("-", ""),
        KEY_ID + "0",
        " " + KEY_ID,
        "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4\u0431",
    ],
)
def test_invalid_key_ids_are_refused(key_id: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid key id"):
        ciphertext.validate_key_id(key_id)
    with pytest.raises(InvalidInputError):
        encrypt(KEY, key_id, 1, b"p", {})


def test_programming_errors_are_not_domain_errors() -> None:
    with pytest.raises(ValueError, match="backing_key"):
        encrypt(bytes(16), KEY_ID, 1, b"p", {})
    with pytest.raises(ValueError, match="backing_version"):
        encrypt(KEY, KEY_ID, 0, b"p", {})
    with pytest.raises(ValueError, match="backing_version"):
        encrypt(KEY, KEY_ID, 2**32, b"p", {})
    with pytest.raises(TypeError):
        encrypt(KEY, KEY_ID, 1, "text", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_header("HSMC")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backing_key"):
        decrypt(bytes(31), BLOB, CONTEXT)


# --- the pre-encoded paths of the key service ---------------------------------------------


def test_encoded_paths_make_and_open_the_same_blobs() -> None:
    encoded = ciphertext.encode_context(CONTEXT)
    sealed = ciphertext.encrypt_encoded(KEY, KEY_ID, 2, PLAINTEXT, encoded)
    assert parse_header(sealed).key_id == KEY_ID
    assert decrypt(KEY, sealed, CONTEXT) == PLAINTEXT
    for blob in (BLOB, sealed):
        header = parse_header(blob)
        assert ciphertext.decrypt_encoded(KEY, blob, encoded, header) == PLAINTEXT
    # The encoding is the associated data: another context's encoding opens nothing.
    with pytest.raises(InvalidCiphertextError) as info:
        ciphertext.decrypt_encoded(KEY, BLOB, ciphertext.encode_context({}), parse_header(BLOB))
    _assert_no_detail(info.value)


def test_decrypt_encoded_refuses_the_header_of_another_blob() -> None:
    encoded = ciphertext.encode_context(CONTEXT)
    other = encrypt(KEY, KEY_ID, 2, PLAINTEXT, CONTEXT)
    for blob, header in ((BLOB, parse_header(other)), (other, parse_header(BLOB))):
        with pytest.raises(InvalidCiphertextError) as info:
            ciphertext.decrypt_encoded(KEY, blob, encoded, header)
        _assert_no_detail(info.value)
    with pytest.raises(ValueError, match="backing_key"):
        ciphertext.decrypt_encoded(bytes(31), BLOB, encoded, parse_header(BLOB))
    with pytest.raises(TypeError):
        ciphertext.decrypt_encoded(KEY, BLOB, CONTEXT, parse_header(BLOB))  # type: ignore[arg-type]


def test_encrypt_encoded_checks_as_encrypt_does() -> None:
    encoded = ciphertext.encode_context({})
    with pytest.raises(ValueError, match="backing_key"):
        ciphertext.encrypt_encoded(bytes(16), KEY_ID, 1, b"p", encoded)
    with pytest.raises(LimitExceededError, match="plaintext"):
        ciphertext.encrypt_encoded(KEY, KEY_ID, 1, bytes(4097), encoded)
    with pytest.raises(TypeError):
        ciphertext.encrypt_encoded(KEY, KEY_ID, 1, b"p", {})  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="invalid key id"):
        ciphertext.encrypt_encoded(KEY, KEY_ID.upper(), 1, b"p", encoded)


def test_remembered_prefixes_still_check_their_inputs() -> None:
    # The prefix of (key id, version 1) is remembered after this; True == 1 must still be
    # refused, and bad values refused every time.
    assert parse_header(encrypt(KEY, KEY_ID, 1, b"p", {})).backing_version == 1
    for _ in range(2):
        with pytest.raises(TypeError, match="backing_version"):
            encrypt(KEY, KEY_ID, True, b"p", {})
        with pytest.raises(ValueError, match="backing_version"):
            encrypt(KEY, KEY_ID, 0, b"p", {})
        with pytest.raises(InvalidInputError, match="invalid key id"):
            encrypt(KEY, KEY_ID + " ", 1, b"p", {})


# --- every failure is one error ------------------------------------------------------------


def test_wrong_backing_key_fails() -> None:
    _expect_invalid(BLOB, key=OTHER_KEY)


def test_key_id_swap_in_header_fails() -> None:
    swapped = BLOB.replace(KEY_ID.encode(), OTHER_KEY_ID.encode())
    assert parse_header(swapped).key_id == OTHER_KEY_ID
    _expect_invalid(swapped)


def test_backing_version_change_fails() -> None:
    changed = BLOB[:42] + struct.pack(">I", 3) + BLOB[46:]
    assert parse_header(changed).backing_version == 3
    _expect_invalid(changed)


def test_blob_of_another_key_id_fails_even_with_the_same_backing_key() -> None:
    other = encrypt(KEY, OTHER_KEY_ID, 2, PLAINTEXT, CONTEXT)
    # Graft the other blob's body onto this blob's header.
    grafted = BLOB[:90] + other[90:]
    _expect_invalid(grafted)


def test_every_truncation_fails() -> None:
    for length in range(len(BLOB)):
        _expect_invalid(BLOB[:length])


def test_appended_bytes_fail() -> None:
    _expect_invalid(BLOB + b"\x00")


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"HSMC",
        b"HSMD" + BLOB[4:],
        b"HSMC\x02" + BLOB[5:],  # unknown format version
        BLOB[:5] + b"\x00" + BLOB[6:],  # key id length 0
        BLOB[:5] + b"\xff" + BLOB[6:],  # key id length past the end
        BLOB[:42] + b"\x00\x00\x00\x00" + BLOB[46:],  # backing version 0
        BLOB[:6] + KEY_ID.upper().encode() + BLOB[42:],  # key id not canonical
        BLOB[:6] + b"\xff" * 36 + BLOB[42:],  # key id not ASCII
        bytes(200),
        crypto.random_bytes(300),
        b"HSMC\x01" + bytes(5000),  # longer than any blob
    ],
)
def test_malformed_and_foreign_blobs_fail_in_parse_and_decrypt(blob: bytes) -> None:
    with pytest.raises(InvalidCiphertextError) as info:
        parse_header(blob)
    _assert_no_detail(info.value)
    _expect_invalid(blob)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_single_flipped_bit_fails(data: st.DataObject) -> None:
    bit = data.draw(st.integers(min_value=0, max_value=len(BLOB) * 8 - 1), label="bit")
    flipped = _flip_bit(BLOB, bit)
    with pytest.raises(InvalidCiphertextError) as info:
        decrypt(KEY, flipped, CONTEXT)
    _assert_no_detail(info.value)


def test_every_single_flipped_bit_of_the_header_fails() -> None:
    for bit in range(90 * 8):
        _expect_invalid(_flip_bit(BLOB, bit))


# --- golden vectors ------------------------------------------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "ciphertext_vector_generator", VECTORS / "generate_ciphertext.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ciphertext_vector_generator"] = module
    spec.loader.exec_module(module)
    return module


def _committed() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    return result


def test_regenerated_vectors_match_committed_bytes() -> None:
    assert _generator().build() == _committed()


def test_committed_ciphertext_vectors_decrypt() -> None:
    committed = _committed()
    key = bytes.fromhex(committed["keys"]["backing_key"])
    for case in committed["ciphertexts"]:
        blob = bytes.fromhex(case["blob"])
        header = parse_header(blob)
        assert header.key_id == committed["keys"]["key_id"]
        assert header.backing_version == committed["keys"]["backing_version"]
        assert header.header.hex() == case["header"]
        assert decrypt(key, blob, case["context"]) == bytes.fromhex(case["plaintext"])
        # The documented construction, step by step, with the primitives only.
        one_time_key = crypto.hkdf_sha256(
            key, salt=bytes.fromhex(case["nonce"]), info=bytes.fromhex(case["hkdf_info"])
        )
        assert one_time_key.hex() == case["one_time_key"]
        body = blob[len(header.header) :]
        assert crypto.aes_gcm_open(
            one_time_key,
            body,
            bytes.fromhex(case["associated_data"]),
            bytes.fromhex(case["iv"]),
            error=InvalidCiphertextError,
        ) == bytes.fromhex(case["plaintext"])


# --- Wycheproof ----------------------------------------------------------------------------

_WYCHEPROOF = json.loads((VECTORS / "wycheproof_aes_gcm.json").read_text("utf-8"))
_WYCHEPROOF_CASES = [
    test
    for group in _WYCHEPROOF["testGroups"]
    if (group["keySize"], group["ivSize"], group["tagSize"]) == (256, 96, 128)
    for test in group["tests"]
]


def test_wycheproof_file_is_the_expected_subset() -> None:
    assert _WYCHEPROOF["source"]["license"] == "Apache-2.0"
    assert len(_WYCHEPROOF_CASES) == _WYCHEPROOF["numberOfTests"] == 66
    assert {t["result"] for t in _WYCHEPROOF_CASES} == {"valid", "invalid"}


@pytest.mark.parametrize("case", _WYCHEPROOF_CASES, ids=lambda c: f"tc{c['tcId']}")
def test_wycheproof_aes_256_gcm(case: dict[str, Any]) -> None:
    key = bytes.fromhex(case["key"])
    iv = bytes.fromhex(case["iv"])
    aad = bytes.fromhex(case["aad"])
    sealed = bytes.fromhex(case["ct"] + case["tag"])
    if case["result"] == "valid":
        msg = bytes.fromhex(case["msg"])
        assert crypto.aes_gcm_open(key, sealed, aad, iv, error=InvalidCiphertextError) == msg
        assert crypto.aes_gcm_seal(key, msg, aad, iv) == sealed
    else:
        assert case["result"] == "invalid"
        with pytest.raises(InvalidCiphertextError) as info:
            crypto.aes_gcm_open(key, sealed, aad, iv, error=InvalidCiphertextError)
        _assert_no_detail(info.value)


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=4096))
def test_peek_key_id_never_raises_and_agrees_with_the_parser(noise: bytes, size: int) -> None:
    """`peek_key_id` (a scheduling hint) reads any bytes without raising, and names the key
    `parse_header` finds in every blob that parses."""
    key_id = str(uuid.uuid4())
    blob = encrypt(bytes(32), key_id, 3, bytes(size % 64), {"a": "b"})
    assert ciphertext.peek_key_id(blob) == parse_header(blob).key_id == key_id
    for candidate in (
        noise,
        blob[: len(noise) % len(blob)],
        ciphertext.MAGIC + b"\x01\xff" + noise,
    ):
        assert isinstance(ciphertext.peek_key_id(candidate), str)
