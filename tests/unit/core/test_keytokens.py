"""domain_core.keytokens: a key token opens only for its key, version, generation and metadata,
under its own one-time key; a key record verifies only under the key of the host that signed it.

These are the checks that catch a lying coordinator: tokens moved between keys or versions,
edited policies, relabelled generations, and records with missing or extra tokens; and a
removed host (which still holds old domain-key generations): its signature is not accepted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from support.repository import VECTORS

from domain_core import canonical, crypto, keyspecs, keytokens
from domain_core.contexts import KEY_TOKEN_KEY_CONTEXT, PayloadType
from domain_core.errors import BadSignatureError, InvalidKeyTokenError, UnknownSignerError
from domain_core.keytokens import (
    RecordSigner,
    rewrap_record,
    seal_record,
    unwrap_backing_key,
    verify_key_record,
    verify_key_record_signature,
    wrap_backing_key,
)
from domain_core.policy import default_policy
from domain_core.signers import InMemorySigner, PublicKey
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
OTHER_KEY_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
APP = "spiffe://test/client/app"
DOMAIN_KEYS = {1: bytes(range(32)), 2: bytes(range(1, 33)), 3: bytes(range(2, 34))}
BACKING_KEYS = {1: b"\x11" * 32, 2: b"\x22" * 32, 3: b"\x33" * 32}
DOMAIN = "test"


def _host_signer(seed: int) -> InMemorySigner:
    return InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


HOSTS = {name: _host_signer(seed) for seed, name in enumerate(("hsa-1", "hsa-2", "hsa-3"), 1)}
SIGNER = RecordSigner(DOMAIN, "hsa-1", HOSTS["hsa-1"])
HOST_KEYS: dict[str, PublicKey] = {name: s.public_key for name, s in HOSTS.items()}


def _metadata(key_id: str = KEY_ID, versions: int = 3, **changes: Any) -> keys_pb2.KeyMetadata:
    metadata = keys_pb2.KeyMetadata(
        key_id=key_id,
        description="test key",
        state=keys_pb2.KEY_STATE_ENABLED,
        created_at=1_767_225_600,
        policy=default_policy(APP),
        current_backing_version=versions,
        creator=APP,
        metadata_version=1,
        domain_id="test",
    )
    for name, value in changes.items():
        setattr(metadata, name, value)
    return metadata


def _record(
    key_id: str = KEY_ID, generation: int = 2, backing_keys: dict[int, bytes] | None = None
) -> keys_pb2.KeyRecord:
    keys = BACKING_KEYS if backing_keys is None else backing_keys
    return seal_record(
        _metadata(key_id, len(keys)), keys, DOMAIN_KEYS[generation], generation, signer=SIGNER
    )


RECORD = _record()


def _expect_invalid(
    record: keys_pb2.KeyRecord, domain_keys: dict[int, bytes] = DOMAIN_KEYS, key_id: str = KEY_ID
) -> None:
    with pytest.raises(InvalidKeyTokenError) as info:
        verify_key_record(record, domain_keys, key_id)
    assert str(info.value) == "invalid key token"
    assert info.value.__cause__ is None


def _copy(record: keys_pb2.KeyRecord) -> keys_pb2.KeyRecord:
    out = keys_pb2.KeyRecord()
    out.CopyFrom(record)
    return out


# --- single tokens -------------------------------------------------------------------------


def test_wrap_unwrap_roundtrip() -> None:
    metadata = b"metadata bytes"
    token = wrap_backing_key(DOMAIN_KEYS[1], 1, metadata, KEY_ID, 4, BACKING_KEYS[1])
    assert (token.key_id, token.backing_version, token.domain_key_generation) == (KEY_ID, 4, 1)
    assert len(token.nonce) == 12
    assert len(token.salt) == 32
    assert len(token.ciphertext) == 48
    assert BACKING_KEYS[1] not in token.SerializeToString()
    assert unwrap_backing_key(token, DOMAIN_KEYS, metadata, KEY_ID) == BACKING_KEYS[1]


def test_tokens_use_fresh_nonces_and_salts() -> None:
    tokens = [
        wrap_backing_key(DOMAIN_KEYS[1], 1, b"m", KEY_ID, 1, BACKING_KEYS[1]) for _ in range(10)
    ]
    assert len({t.nonce for t in tokens}) == 10
    assert len({t.salt for t in tokens}) == 10


def test_each_token_has_its_own_key_derived_from_the_domain_key() -> None:
    # The usage bound of AES-GCM: the domain key never encrypts; every token is sealed under
    # HKDF-SHA256(domain key, salt = the token's salt, info = context || binding).
    token = wrap_backing_key(DOMAIN_KEYS[1], 1, b"m", KEY_ID, 1, BACKING_KEYS[1])
    binding = keytokens.key_token_binding(KEY_ID, 1, 1, b"m")
    key = crypto.hkdf_sha256(DOMAIN_KEYS[1], salt=token.salt, info=KEY_TOKEN_KEY_CONTEXT + binding)
    assert keytokens.token_key(DOMAIN_KEYS[1], token.salt, binding) == key
    assert crypto.aes_gcm_open(key, token.ciphertext, binding, token.nonce) == BACKING_KEYS[1]
    with pytest.raises(InvalidKeyTokenError):  # not under the domain key itself
        crypto.aes_gcm_open(DOMAIN_KEYS[1], token.ciphertext, binding, token.nonce)
    # Same nonce and salt forced, other binding: another key, so no nonce reuse under one key.
    other = wrap_backing_key(
        DOMAIN_KEYS[1], 1, b"m", KEY_ID, 2, BACKING_KEYS[1], nonce=token.nonce, salt=token.salt
    )
    assert other.ciphertext != token.ciphertext
    other_binding = keytokens.key_token_binding(KEY_ID, 2, 1, b"m")
    assert keytokens.token_key(DOMAIN_KEYS[1], token.salt, other_binding) != key


def _token() -> keys_pb2.KeyToken:
    return wrap_backing_key(DOMAIN_KEYS[1], 1, b"metadata", KEY_ID, 1, BACKING_KEYS[1])


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: setattr(t, "key_id", OTHER_KEY_ID),
        lambda t: setattr(t, "backing_version", 2),
        lambda t: setattr(t, "backing_version", 0),
        lambda t: setattr(t, "domain_key_generation", 2),  # relabelled generation
        lambda t: setattr(t, "domain_key_generation", 9),  # a generation this node lacks
        lambda t: setattr(t, "domain_key_generation", 0),
        lambda t: setattr(t, "nonce", bytes(12)),
        lambda t: setattr(t, "nonce", t.nonce[:11]),
        lambda t: setattr(t, "salt", bytes(32)),
        lambda t: setattr(t, "salt", t.salt[:31]),
        lambda t: setattr(t, "salt", b""),
        lambda t: setattr(t, "salt", bytes([t.salt[0] ^ 1]) + t.salt[1:]),
        lambda t: setattr(t, "ciphertext", t.ciphertext[:-1]),
        lambda t: setattr(t, "ciphertext", t.ciphertext + b"\x00"),
        lambda t: setattr(t, "ciphertext", bytes([t.ciphertext[0] ^ 1]) + t.ciphertext[1:]),
        lambda t: setattr(t, "ciphertext", t.ciphertext[:-1] + bytes([t.ciphertext[-1] ^ 0x80])),
    ],
)
def test_any_edit_of_a_token_fails(edit: Any) -> None:
    token = _token()
    edit(token)
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, DOMAIN_KEYS, b"metadata", KEY_ID)


def test_token_opens_only_with_its_key_id_metadata_and_domain_key() -> None:
    token = _token()
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, DOMAIN_KEYS, b"metadata", OTHER_KEY_ID)
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, DOMAIN_KEYS, b"metadatA", KEY_ID)
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, {1: DOMAIN_KEYS[2]}, b"metadata", KEY_ID)
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, {}, b"metadata", KEY_ID)
    with pytest.raises(InvalidKeyTokenError):
        unwrap_backing_key(token, DOMAIN_KEYS, b"metadata", "")


def test_binding_covers_every_field() -> None:
    base = keytokens.key_token_binding(KEY_ID, 1, 1, b"m")
    assert len(base) == 32
    others = {
        keytokens.key_token_binding(OTHER_KEY_ID, 1, 1, b"m"),
        keytokens.key_token_binding(KEY_ID, 2, 1, b"m"),
        keytokens.key_token_binding(KEY_ID, 1, 2, b"m"),
        keytokens.key_token_binding(KEY_ID, 1, 1, b"n"),
    }
    assert base not in others
    assert len(others) == 4


def test_wrap_rejects_programming_errors() -> None:
    with pytest.raises(ValueError, match="domain_key"):
        wrap_backing_key(bytes(16), 1, b"m", KEY_ID, 1, BACKING_KEYS[1])
    with pytest.raises(ValueError, match="backing_key"):
        wrap_backing_key(DOMAIN_KEYS[1], 1, b"m", KEY_ID, 1, b"")
    with pytest.raises(ValueError, match="backing_key"):
        wrap_backing_key(
            DOMAIN_KEYS[1], 1, b"m", KEY_ID, 1, bytes(keytokens.MAX_KEY_MATERIAL_BYTES + 1)
        )
    with pytest.raises(ValueError, match="generation"):
        wrap_backing_key(DOMAIN_KEYS[1], 0, b"m", KEY_ID, 1, BACKING_KEYS[1])
    with pytest.raises(ValueError, match="backing_version"):
        wrap_backing_key(DOMAIN_KEYS[1], 1, b"m", KEY_ID, 2**32, BACKING_KEYS[1])
    with pytest.raises(ValueError, match="salt"):
        wrap_backing_key(DOMAIN_KEYS[1], 1, b"m", KEY_ID, 1, BACKING_KEYS[1], salt=bytes(16))


# --- records -------------------------------------------------------------------------------


def test_sealed_record_verifies() -> None:
    metadata, keys = verify_key_record(RECORD, DOMAIN_KEYS, KEY_ID)
    assert metadata == _metadata()
    assert keys == BACKING_KEYS
    assert [t.backing_version for t in RECORD.tokens] == [1, 2, 3]
    assert {t.domain_key_generation for t in RECORD.tokens} == {2}
    assert RECORD.revision == 0


@pytest.mark.parametrize(
    ("spec", "length", "longest"),
    [
        (keys_pb2.KEY_SPEC_HMAC_224, 28, 64),
        (keys_pb2.KEY_SPEC_HMAC_256, 32, 64),
        (keys_pb2.KEY_SPEC_HMAC_384, 48, 128),
        (keys_pb2.KEY_SPEC_HMAC_512, 64, 128),
    ],
)
def test_material_must_fit_the_key_spec_the_metadata_names(
    spec: int, length: int, longest: int
) -> None:
    """A token seals any material, but a record verifies only if every version's material
    is of a length its key spec has (an HMAC key: AWS's range, longer when imported): a
    symmetric key's 32 bytes cannot pass for an HMAC_512 key, nor 48 bytes for an AES key."""
    metadata = _metadata(
        versions=1, key_spec=spec, key_usage=keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC
    )
    good = seal_record(metadata, {1: b"\x5a" * length}, DOMAIN_KEYS[1], 1, signer=SIGNER)
    assert verify_key_record(good, DOMAIN_KEYS, KEY_ID)[1] == {1: b"\x5a" * length}
    assert verify_key_record(
        seal_record(metadata, {1: b"\x5a" * longest}, DOMAIN_KEYS[1], 1, signer=SIGNER),
        DOMAIN_KEYS,
        KEY_ID,
    )
    for wrong in (length - 1, longest + 1):
        bad = seal_record(metadata, {1: b"\x5a" * wrong}, DOMAIN_KEYS[1], 1, signer=SIGNER)
        _expect_invalid(bad)
    symmetric = seal_record(
        _metadata(versions=1), {1: b"\x5a" * 48}, DOMAIN_KEYS[1], 1, signer=SIGNER
    )
    _expect_invalid(symmetric)
    unknown = seal_record(
        _metadata(versions=1, key_spec=99), {1: b"\x5a" * 32}, DOMAIN_KEYS[1], 1, signer=SIGNER
    )
    _expect_invalid(unknown)


def test_metadata_is_serialized_once_and_deterministically() -> None:
    again = _record()
    assert again.metadata == RECORD.metadata
    assert again.metadata == _metadata().SerializeToString(deterministic=True)
    assert [t.nonce for t in again.tokens] != [t.nonce for t in RECORD.tokens]


def test_verify_only_needs_the_generations_in_use() -> None:
    metadata, backing_keys = verify_key_record(RECORD, {2: DOMAIN_KEYS[2]}, KEY_ID)
    assert metadata.key_id == KEY_ID
    assert backing_keys == BACKING_KEYS
    _expect_invalid(RECORD, {1: DOMAIN_KEYS[1], 3: DOMAIN_KEYS[3]})


def test_record_of_another_key_fails() -> None:
    other = _record(OTHER_KEY_ID)
    _expect_invalid(other)
    metadata, backing_keys = verify_key_record(other, DOMAIN_KEYS, OTHER_KEY_ID)
    assert (metadata.key_id, backing_keys) == (OTHER_KEY_ID, BACKING_KEYS)


def test_metadata_naming_another_key_fails_even_with_matching_tokens() -> None:
    # Tokens that say KEY_ID and are bound to metadata bytes that name OTHER_KEY_ID: only a
    # faulty HSA could make them, but the metadata must still name the key asked for.
    metadata_bytes = _metadata(OTHER_KEY_ID).SerializeToString(deterministic=True)
    record = keys_pb2.KeyRecord(
        metadata=metadata_bytes,
        tokens=[
            wrap_backing_key(DOMAIN_KEYS[1], 1, metadata_bytes, KEY_ID, version, key)
            for version, key in BACKING_KEYS.items()
        ],
    )
    _expect_invalid(record)


def test_token_moved_from_another_key_fails() -> None:
    other = _record(OTHER_KEY_ID, backing_keys=BACKING_KEYS)
    moved = _copy(RECORD)
    moved.tokens[1].CopyFrom(other.tokens[1])
    _expect_invalid(moved)
    # Even relabelled with this key's id, it is bound to the other key.
    moved.tokens[1].key_id = KEY_ID
    _expect_invalid(moved)


def test_changed_policy_fails() -> None:
    metadata = _metadata()
    grant = metadata.policy.grants.add()
    grant.principals.append("spiffe://test/client/attacker")
    grant.operations.append(keys_pb2.KEY_OPERATION_DECRYPT)
    edited = _copy(RECORD)
    edited.metadata = metadata.SerializeToString(deterministic=True)
    _expect_invalid(edited)


@pytest.mark.parametrize(
    "changes",
    [
        {"state": keys_pb2.KEY_STATE_DISABLED},
        {"description": "changed"},
        {"metadata_version": 2},
        {"creator": "spiffe://test/client/other"},
    ],
)
def test_any_metadata_change_fails(changes: dict[str, Any]) -> None:
    edited = _copy(RECORD)
    edited.metadata = _metadata(**changes).SerializeToString(deterministic=True)
    _expect_invalid(edited)


def test_metadata_bytes_are_not_reserialized() -> None:
    # Same message, different (non-deterministic but valid) encoding: an unknown field
    # appended. The token binds the bytes, so this is a different record.
    edited = _copy(RECORD)
    edited.metadata = RECORD.metadata + b"\xf8\x07\x01"  # field 127, varint 1
    _expect_invalid(edited)


def test_swapped_tokens_between_versions_fail() -> None:
    swapped = _copy(RECORD)
    first, second = keys_pb2.KeyToken(), keys_pb2.KeyToken()
    first.CopyFrom(RECORD.tokens[0])
    second.CopyFrom(RECORD.tokens[1])
    # Swap the sealed contents but keep the version labels.
    swapped.tokens[0].nonce, swapped.tokens[0].ciphertext = second.nonce, second.ciphertext
    swapped.tokens[1].nonce, swapped.tokens[1].ciphertext = first.nonce, first.ciphertext
    _expect_invalid(swapped)
    # Swap the labels but keep the contents.
    relabelled = _copy(RECORD)
    relabelled.tokens[0].backing_version = 2
    relabelled.tokens[1].backing_version = 1
    _expect_invalid(relabelled)


def test_reordered_tokens_are_fine() -> None:
    reordered = _copy(RECORD)
    del reordered.tokens[:]
    reordered.tokens.extend(reversed(RECORD.tokens))
    assert verify_key_record(reordered, DOMAIN_KEYS, KEY_ID)[1] == BACKING_KEYS


def test_wrong_generation_fails() -> None:
    relabelled = _copy(RECORD)
    for token in relabelled.tokens:
        token.domain_key_generation = 3
    _expect_invalid(relabelled)


def test_missing_duplicate_and_extra_tokens_fail() -> None:
    missing = _copy(RECORD)
    del missing.tokens[2]
    _expect_invalid(missing)

    duplicate = _copy(RECORD)
    duplicate.tokens[2].CopyFrom(RECORD.tokens[1])
    _expect_invalid(duplicate)

    extra = _copy(RECORD)
    token = extra.tokens.add()
    token.CopyFrom(wrap_backing_key(DOMAIN_KEYS[2], 2, RECORD.metadata, KEY_ID, 4, b"\x44" * 32))
    _expect_invalid(extra)

    no_tokens = _copy(RECORD)
    del no_tokens.tokens[:]
    _expect_invalid(no_tokens)


def test_current_version_rolled_back_fails() -> None:
    # A coordinator that hides the newest backing key by editing the metadata.
    rolled = _copy(RECORD)
    rolled.metadata = _metadata(versions=2).SerializeToString(deterministic=True)
    del rolled.tokens[2]
    _expect_invalid(rolled)


@pytest.mark.parametrize("metadata", [b"\xff\xff\xff", b"\x0a\x05ab", b""])
def test_unparsable_or_empty_metadata_fails(metadata: bytes) -> None:
    broken = _copy(RECORD)
    broken.metadata = metadata
    _expect_invalid(broken)


def test_seal_record_requires_exactly_the_current_versions() -> None:
    with pytest.raises(ValueError, match=r"versions 1\.\.current_backing_version"):
        seal_record(_metadata(versions=3), {1: BACKING_KEYS[1]}, DOMAIN_KEYS[1], 1, signer=SIGNER)
    with pytest.raises(ValueError, match=r"versions 1\.\.current_backing_version"):
        seal_record(_metadata(versions=1), BACKING_KEYS, DOMAIN_KEYS[1], 1, signer=SIGNER)
    with pytest.raises(ValueError, match=r"versions 1\.\.current_backing_version"):
        seal_record(_metadata(versions=0), {}, DOMAIN_KEYS[1], 1, signer=SIGNER)


# --- rewrap --------------------------------------------------------------------------------


def test_rewrap_moves_every_token_to_the_new_generation() -> None:
    old = _record(generation=1)
    assert keytokens.needs_rewrap(old, 3)
    new = rewrap_record(old, DOMAIN_KEYS, 3, signer=SIGNER)
    assert not keytokens.needs_rewrap(new, 3)
    assert new.metadata == old.metadata
    assert {t.domain_key_generation for t in new.tokens} == {3}
    # The new record opens with generation 3 alone; the old one still with generation 1 alone.
    assert verify_key_record(new, {3: DOMAIN_KEYS[3]}, KEY_ID)[1] == BACKING_KEYS
    assert verify_key_record(old, {1: DOMAIN_KEYS[1]}, KEY_ID)[1] == BACKING_KEYS
    _expect_invalid(new, {1: DOMAIN_KEYS[1]})
    # The old token opens only with the old key, not with another key under its number.
    _expect_invalid(old, {1: DOMAIN_KEYS[3]})


def test_rewrap_keeps_the_revision_and_verifies_first() -> None:
    old = _record(generation=1)
    old.revision = 17
    assert rewrap_record(old, DOMAIN_KEYS, 2, signer=SIGNER).revision == 17
    tampered = _copy(old)
    tampered.metadata = _metadata(description="x").SerializeToString(deterministic=True)
    with pytest.raises(InvalidKeyTokenError):
        rewrap_record(tampered, DOMAIN_KEYS, 2, signer=SIGNER)
    with pytest.raises(InvalidKeyTokenError):
        rewrap_record(old, DOMAIN_KEYS, 2, expected_key_id=OTHER_KEY_ID, signer=SIGNER)
    with pytest.raises(ValueError, match="generation 9"):
        rewrap_record(old, DOMAIN_KEYS, 9, signer=SIGNER)


def test_rewrap_signs_again_as_the_rewrapping_host() -> None:
    old = _record(generation=1)
    assert verify_key_record_signature(old, DOMAIN, HOST_KEYS) == "hsa-1"
    other = RecordSigner(DOMAIN, "hsa-2", HOSTS["hsa-2"])
    new = rewrap_record(old, DOMAIN_KEYS, 2, signer=other)
    assert verify_key_record_signature(new, DOMAIN, HOST_KEYS) == "hsa-2"
    # After hsa-1 is removed, only the re-signed record is accepted.
    without_first = {k: v for k, v in HOST_KEYS.items() if k != "hsa-1"}
    assert verify_key_record_signature(new, DOMAIN, without_first) == "hsa-2"
    with pytest.raises(UnknownSignerError):
        verify_key_record_signature(old, DOMAIN, without_first)


# --- signatures ----------------------------------------------------------------------------


def test_a_sealed_record_is_signed_by_its_writer() -> None:
    assert RECORD.signer_host_id == "hsa-1"
    assert len(RECORD.signature) == 64
    assert verify_key_record_signature(RECORD, DOMAIN, HOST_KEYS) == "hsa-1"
    digest = keytokens.key_record_digest(RECORD, DOMAIN)
    HOST_KEYS["hsa-1"].verify(
        RECORD.signature, canonical.signing_input(PayloadType.KEY_RECORD, digest)
    )


def test_the_digest_is_made_of_the_fields_in_backing_version_order() -> None:
    parts = [DOMAIN.encode(), RECORD.metadata, b"hsa-1"]
    for token in sorted(RECORD.tokens, key=lambda t: t.backing_version):
        parts += [
            token.key_id.encode(),
            token.backing_version.to_bytes(4, "big"),
            token.domain_key_generation.to_bytes(4, "big"),
            token.salt,
            token.nonce,
            token.ciphertext,
        ]
    expected = canonical.digest(PayloadType.KEY_RECORD, *parts)
    assert keytokens.key_record_digest(RECORD, DOMAIN) == expected
    reordered = _copy(RECORD)
    del reordered.tokens[:]
    reordered.tokens.extend(reversed(RECORD.tokens))
    assert keytokens.key_record_digest(reordered, DOMAIN) == expected
    # The coordinator's revision is not signed.
    revised = _copy(RECORD)
    revised.revision = 99
    assert verify_key_record_signature(revised, DOMAIN, HOST_KEYS) == "hsa-1"


def _signed_fields(record: keys_pb2.KeyRecord) -> list[tuple[str, int, str]]:
    """(part, token index, field) of every signed bytes or text field of a record."""
    fields = [("record", -1, "metadata"), ("record", -1, "signer_host_id")]
    for index in range(len(record.tokens)):
        fields += [("token", index, name) for name in ("key_id", "salt", "nonce", "ciphertext")]
    return fields


def _flip(record: keys_pb2.KeyRecord, part: str, index: int, name: str, bit: int) -> None:
    target: Any = record if part == "record" else record.tokens[index]
    value = getattr(target, name)
    raw = bytearray(value.encode() if isinstance(value, str) else value)
    raw[(bit // 8) % len(raw)] ^= 1 << (bit % 7 if isinstance(value, str) else bit % 8)
    setattr(target, name, raw.decode() if isinstance(value, str) else bytes(raw))


@settings(max_examples=300, deadline=None)
@given(choice=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=10_000))
def test_any_flipped_bit_of_a_signed_field_fails(choice: int, bit: int) -> None:
    fields = [*_signed_fields(RECORD), ("signature", -1, "signature")]
    part, index, name = fields[choice % len(fields)]
    edited = _copy(RECORD)
    _flip(edited, "record" if part == "signature" else part, index, name, bit)
    hosts = dict(HOST_KEYS)
    if name == "signer_host_id":  # a name that is still a host: the key must not match
        hosts[edited.signer_host_id] = HOST_KEYS["hsa-1"]
        hosts["hsa-1"] = HOST_KEYS["hsa-2"]
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(edited, DOMAIN, hosts)


@pytest.mark.parametrize("field", ["backing_version", "domain_key_generation"])
def test_a_changed_token_number_fails(field: str) -> None:
    edited = _copy(RECORD)
    setattr(edited.tokens[0], field, getattr(edited.tokens[0], field) + 7)
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(edited, DOMAIN, HOST_KEYS)


def test_added_or_dropped_tokens_and_another_domain_fail() -> None:
    dropped = _copy(RECORD)
    del dropped.tokens[2]
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(dropped, DOMAIN, HOST_KEYS)
    added = _copy(RECORD)
    added.tokens.add().CopyFrom(RECORD.tokens[0])
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(added, DOMAIN, HOST_KEYS)
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(RECORD, "other-domain", HOST_KEYS)


def test_a_wrong_signer_fails() -> None:
    # hsa-2's signature, claiming to be hsa-1's; and hsa-1's signature claiming hsa-2.
    forged = _copy(RECORD)
    RecordSigner(DOMAIN, "hsa-1", HOSTS["hsa-2"]).sign(forged)
    with pytest.raises(BadSignatureError, match="hsa-1"):
        verify_key_record_signature(forged, DOMAIN, HOST_KEYS)
    relabelled = _copy(RECORD)
    relabelled.signer_host_id = "hsa-2"
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(relabelled, DOMAIN, HOST_KEYS)


def test_a_signer_that_is_not_a_trusted_host_fails() -> None:
    # A removed host (not in the verified head any more) signs a record of its own: it still
    # holds the domain key generation, so its tokens open; its signature is not accepted.
    removed = RecordSigner(DOMAIN, "hsa-3", HOSTS["hsa-3"])
    forged = seal_record(
        _metadata(versions=1, metadata_version=9),
        {1: b"\x66" * 32},
        DOMAIN_KEYS[2],
        2,
        signer=removed,
    )
    verify_key_record(forged, DOMAIN_KEYS, KEY_ID)  # the tokens alone would pass
    members = {k: v for k, v in HOST_KEYS.items() if k != "hsa-3"}
    with pytest.raises(UnknownSignerError, match="hsa-3"):
        verify_key_record_signature(forged, DOMAIN, members)
    unsigned = _copy(RECORD)
    unsigned.signer_host_id, unsigned.signature = "", b""
    with pytest.raises(UnknownSignerError):
        verify_key_record_signature(unsigned, DOMAIN, HOST_KEYS)
    no_signature = _copy(RECORD)
    no_signature.signature = b""
    with pytest.raises(BadSignatureError):
        verify_key_record_signature(no_signature, DOMAIN, HOST_KEYS)


def test_the_record_signer_does_not_show_its_key() -> None:
    assert repr(SIGNER) == "RecordSigner('test', 'hsa-1')"


# --- golden vector -------------------------------------------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "ciphertext_vector_generator_kt", VECTORS / "generate_ciphertext.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ciphertext_vector_generator_kt"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_key_token_vector_opens() -> None:
    committed = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    keys, vector = committed["keys"], committed["key_token"]
    assert vector == _generator().build()["key_token"]
    token = keys_pb2.KeyToken()
    token.ParseFromString(bytes.fromhex(vector["token"]))
    metadata = bytes.fromhex(vector["metadata"])
    assert (
        keytokens.key_token_binding(
            token.key_id, token.backing_version, token.domain_key_generation, metadata
        ).hex()
        == vector["binding"]
    )
    domain_keys = {keys["domain_key_generation"]: bytes.fromhex(keys["domain_key"])}
    assert unwrap_backing_key(token, domain_keys, metadata, keys["key_id"]) == bytes.fromhex(
        keys["backing_key"]
    )
    binding = bytes.fromhex(vector["binding"])
    assert (
        keytokens.token_key(domain_keys[token.domain_key_generation], token.salt, binding).hex()
        == vector["token_key"]
    )


def test_committed_tokens_of_other_key_specs_open_and_verify() -> None:
    """The HMAC_384 and ECC_NIST_P256 token vectors: regenerated byte for byte, each opens to
    its committed material, and a one-token record of it verifies (its material fits the
    metadata's key spec); the P-256 material is a PKCS#8 key `cryptography` loads."""
    committed = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    keys, vectors = committed["keys"], committed["spec_tokens"]
    assert vectors == _generator().build()["spec_tokens"]
    assert [v["key_spec"] for v in vectors] == ["HMAC_384", "ECC_NIST_P256"]
    domain_keys = {keys["domain_key_generation"]: bytes.fromhex(keys["domain_key"])}
    for vector in vectors:
        token = keys_pb2.KeyToken.FromString(bytes.fromhex(vector["token"]))
        metadata = bytes.fromhex(vector["metadata"])
        material = bytes.fromhex(vector["material"])
        assert unwrap_backing_key(token, domain_keys, metadata, keys["key_id"]) == material
        record = keys_pb2.KeyRecord(metadata=metadata, tokens=[token])
        parsed, opened = verify_key_record(record, domain_keys, keys["key_id"])
        assert keyspecs.spec_name(parsed.key_spec) == vector["key_spec"]
        assert opened == {1: material}
    private = serialization.load_der_private_key(bytes.fromhex(vectors[1]["material"]), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)


def test_committed_key_record_signature_verifies() -> None:
    committed = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    vector = committed["key_record"]
    assert vector == _generator().build()["key_record"]
    record = keys_pb2.KeyRecord.FromString(bytes.fromhex(vector["record"]))
    assert keytokens.key_record_digest(record, vector["domain_id"]).hex() == vector["digest"]
    key = PublicKey.from_der(bytes.fromhex(vector["signer_public_key"]))
    assert (
        verify_key_record_signature(record, vector["domain_id"], {record.signer_host_id: key})
        == record.signer_host_id
    )
