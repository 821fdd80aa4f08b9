"""domain_core.canonical: domain-separated digests, signing inputs, proposal ids."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_core import canonical
from domain_core.canonical import DIGEST_BYTES, digest, proposal_id, signing_input
from domain_core.contexts import HASH_CONTEXT, SIGNATURE_CONTEXT, PayloadType

pytestmark = pytest.mark.unit

ALL_TYPES = list(PayloadType)


def _reference_digest(payload_type: str, *parts: bytes) -> bytes:
    """An independent implementation of the documented encoding."""
    data = HASH_CONTEXT + struct.pack(">Q", len(payload_type)) + payload_type.encode()
    for part in parts:
        data += struct.pack(">Q", len(part)) + part
    return hashlib.sha256(data).digest()


# --- wire format ---------------------------------------------------------------------------


def test_payload_type_values_are_wire_format() -> None:
    assert {t.name: t.value for t in PayloadType} == {
        "MANIFEST": "manifest",
        "SEALED_STATE": "sealed-state",
        "PROPOSAL_APPROVAL": "proposal-approval",
        "PROPOSAL_CANCEL": "proposal-cancel",
        "HOST_ENROLLMENT": "host-enrollment",
        "AUDIT_CHECKPOINT": "audit-checkpoint",
        "KEY_RECORD": "key-record",
        "HEAD_CONFIRMATION": "head-confirmation",
        "KEY_FLOORS": "key-floors",
        "CREATE_KEY_ID": "create-key-id",
        "RECOVERY_SHARE": "recovery-share",
        "RECOVERY_SECRETS": "recovery-secrets",
        "RECOVERY_KEY_ENROLLMENT": "recovery-key-enrollment",
        "RECOVERY_CONTRIBUTION": "recovery-contribution",
    }


def test_contexts_are_fixed() -> None:
    assert HASH_CONTEXT == b"hsm-domain/v1 digest\x00"
    assert SIGNATURE_CONTEXT == b"hsm-domain/v1 signature\x00"
    assert bytes(32) == canonical.ZERO_HASH


@pytest.mark.parametrize(
    ("payload_type", "parts", "expected_hex"),
    [
        (
            PayloadType.MANIFEST,
            (b"abc",),
            "0a9530f0fcac7e3e94191d75175054c413e584a2e29027fec904400fa6b458b2",
        ),
        (
            PayloadType.SEALED_STATE,
            (b"ab", b"c"),
            "c1c44aea28afa681face3a01164256d6f5b83676ebbf10db0c0241a0cb4b26e7",
        ),
    ],
)
def test_digest_golden_vectors(
    payload_type: PayloadType, parts: tuple[bytes, ...], expected_hex: str
) -> None:
    assert digest(payload_type, *parts).hex() == expected_hex
    assert digest(payload_type, *parts) == _reference_digest(payload_type.value, *parts)


def test_signing_input_golden_vector() -> None:
    got = signing_input(PayloadType.PROPOSAL_APPROVAL, bytes(range(32)))
    assert got == (
        SIGNATURE_CONTEXT
        + struct.pack(">Q", len(b"proposal-approval"))
        + b"proposal-approval"
        + bytes(range(32))
    )


# --- separation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(ALL_TYPES, 2)))
def test_digest_differs_per_payload_type(a: PayloadType, b: PayloadType) -> None:
    assert digest(a, b"same payload") != digest(b, b"same payload")
    assert digest(a) != digest(b)


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(ALL_TYPES, 2)))
def test_signing_input_differs_per_payload_type(a: PayloadType, b: PayloadType) -> None:
    d = bytes(32)
    assert signing_input(a, d) != signing_input(b, d)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ((b"ab", b"c"), (b"a", b"bc")),
        ((b"abc",), (b"ab", b"c")),
        ((b"",), ()),
        ((b"", b""), (b"",)),
        ((b"a", b""), (b"", b"a")),
        ((b"\x00" * 8,), (b"", b"")),
    ],
)
def test_digest_differs_per_part_split(left: tuple[bytes, ...], right: tuple[bytes, ...]) -> None:
    for payload_type in ALL_TYPES:
        assert digest(payload_type, *left) != digest(payload_type, *right)


def test_digest_is_not_plain_sha256() -> None:
    assert digest(PayloadType.MANIFEST, b"x") != hashlib.sha256(b"x").digest()
    assert len(digest(PayloadType.MANIFEST, b"x")) == DIGEST_BYTES


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(ALL_TYPES),
    st.lists(st.binary(max_size=12), max_size=4),
    st.lists(st.binary(max_size=12), max_size=4),
)
def test_digest_is_injective_over_part_lists(
    payload_type: PayloadType, left: list[bytes], right: list[bytes]
) -> None:
    same = left == right
    assert (digest(payload_type, *left) == digest(payload_type, *right)) is same
    assert digest(payload_type, *left) == _reference_digest(payload_type.value, *left)


# --- signing input -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 16, 31, 33, 64])
def test_signing_input_refuses_non_32_byte_digest(length: int) -> None:
    with pytest.raises(ValueError, match="32-byte digest"):
        signing_input(PayloadType.MANIFEST, bytes(length))


def test_signing_input_binds_digest() -> None:
    a = signing_input(PayloadType.SEALED_STATE, bytes(32))
    b = signing_input(PayloadType.SEALED_STATE, b"\x01" + bytes(31))
    assert a != b
    assert a.startswith(SIGNATURE_CONTEXT)
    assert a.endswith(bytes(32))


# --- proposal id ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=256))
def test_proposal_id_is_sha256_of_bytes(data: bytes) -> None:
    assert proposal_id(data) == hashlib.sha256(data).digest()


def test_proposal_id_is_not_a_typed_digest() -> None:
    # Ids are plain SHA-256 (anyone can recompute them); digests are typed.
    assert proposal_id(b"p") != digest(PayloadType.PROPOSAL_APPROVAL, b"p")
