"""Import tokens and the lifecycle of imported material (`domain_core.importtokens`,
`domain_core.keyimport`): what a token is bound to, when it expires, how material is wrapped,
and which state changes import and deletion make."""

from __future__ import annotations

import hmac
import importlib.util
import json
import os
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from support.repository import VECTORS

from domain_core import importtokens, keyimport, keylifecycle
from domain_core.contexts import MATERIAL_COMMITMENT_CONTEXT
from domain_core.errors import (
    ExpiredImportTokenError,
    FailedPreconditionError,
    IncorrectKeyMaterialError,
    InvalidCiphertextError,
    InvalidImportTokenError,
    InvalidInputError,
    UnsupportedOperationError,
)
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
OTHER_KEY_ID = "1f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
DOMAIN_KEYS = {1: bytes(range(32)), 2: bytes(range(1, 33))}
NOW = 1_767_225_600
OAEP_256 = keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_256
KEY_WRAP = keys_pb2.WRAPPING_ALGORITHM_RSA_AES_KEY_WRAP_SHA_256


def _parameters(algorithm: int = OAEP_256, generation: int = 2) -> importtokens.ImportParameters:
    return importtokens.new_import_parameters(
        domain_id="test",
        key_id=KEY_ID,
        domain_key=DOMAIN_KEYS[generation],
        generation=generation,
        algorithm=algorithm,
        wrapping_key_spec=keys_pb2.KEY_SPEC_RSA_2048,
        now=NOW,
    )


PARAMETERS = _parameters()


def _open(token: bytes, **changes: object) -> importtokens.WrappingKey:
    arguments: dict[str, object] = {
        "domain_id": "test",
        "key_id": KEY_ID,
        "domain_keys": DOMAIN_KEYS,
        "now": NOW + 60,
    }
    arguments.update(changes)
    return importtokens.open_import_token(token, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", [OAEP_256, KEY_WRAP])
def test_material_wrapped_as_an_owner_does_it_unwraps(algorithm: int) -> None:
    parameters = _parameters(algorithm)
    assert parameters.expires_at == NOW + importtokens.IMPORT_TOKEN_SECONDS
    material = os.urandom(32 if algorithm == OAEP_256 else 1200)
    wrapped = importtokens.wrap_material(parameters.public_key, algorithm, material)
    assert _open(parameters.import_token).unwrap(wrapped) == material


def test_aws_kms_style_wrapping_made_without_this_module_unwraps() -> None:
    """RSA-OAEP-SHA-256 of an AES key, then RFC 5649, built here from `cryptography` alone."""
    parameters = _parameters(KEY_WRAP)
    public = serialization.load_der_public_key(parameters.public_key)
    aes_key, material = os.urandom(32), os.urandom(600)
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    wrapped = public.encrypt(aes_key, oaep) + aes_key_wrap_with_padding(aes_key, material)  # type: ignore[union-attr]
    assert _open(parameters.import_token).unwrap(wrapped) == material


@pytest.mark.parametrize(
    "changes",
    [
        {"key_id": OTHER_KEY_ID},
        {"domain_id": "another"},
        {"domain_keys": {1: DOMAIN_KEYS[1]}},  # the token's generation is not held
        {"domain_keys": {2: DOMAIN_KEYS[1]}},  # another key under its generation number
    ],
)
def test_a_token_opens_only_for_what_it_was_made_for(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidImportTokenError) as info:
        _open(PARAMETERS.import_token, **changes)
    assert str(info.value) == "invalid import token"


def test_any_edit_of_a_token_is_refused_with_one_message() -> None:
    token = keys_pb2.ImportToken.FromString(PARAMETERS.import_token)
    edits = {
        "expires_at": token.expires_at + 86_400,
        "wrapping_algorithm": keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_1,
        "wrapping_key_spec": keys_pb2.KEY_SPEC_RSA_3072,
        "domain_key_generation": 1,
        "salt": bytes(32),
        "nonce": bytes(12),
        "ciphertext": token.ciphertext[:-1] + bytes([token.ciphertext[-1] ^ 1]),
    }
    for field, value in edits.items():
        edited = keys_pb2.ImportToken()
        edited.CopyFrom(token)
        setattr(edited, field, value)
        with pytest.raises(InvalidImportTokenError) as info:
            _open(edited.SerializeToString())
        assert str(info.value) == "invalid import token", field
    for junk in (b"", b"\xff" * 40, PARAMETERS.import_token[:-3]):
        with pytest.raises(InvalidImportTokenError):
            _open(junk)


def test_a_token_expires_after_24_hours() -> None:
    _open(PARAMETERS.import_token, now=PARAMETERS.expires_at - 1)
    with pytest.raises(ExpiredImportTokenError, match="GetParametersForImport again"):
        _open(PARAMETERS.import_token, now=PARAMETERS.expires_at)


def test_wrapped_bytes_that_do_not_open_are_invalid_ciphertext() -> None:
    wrapping = _open(PARAMETERS.import_token)
    wrapped = importtokens.wrap_material(PARAMETERS.public_key, OAEP_256, bytes(32))
    for bad in (wrapped[:-1], wrapped + b"\x00", bytes(256), b""):
        with pytest.raises(InvalidCiphertextError) as info:
            wrapping.unwrap(bad)
        assert str(info.value) == "invalid ciphertext"
    key_wrap = _open(_parameters(KEY_WRAP).import_token)
    with pytest.raises(InvalidCiphertextError):
        key_wrap.unwrap(wrapped + os.urandom(40))


def test_unknown_parameters_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="wrapping_algorithm"):
        _parameters(keys_pb2.WRAPPING_ALGORITHM_UNSPECIFIED)
    with pytest.raises(InvalidInputError, match="wrapping_key_spec"):
        importtokens.new_import_parameters(
            domain_id="test",
            key_id=KEY_ID,
            domain_key=DOMAIN_KEYS[1],
            generation=1,
            algorithm=OAEP_256,
            wrapping_key_spec=keys_pb2.KEY_SPEC_ECC_NIST_P256,
            now=NOW,
        )


# --- the lifecycle of imported material ------------------------------------------------------


def _external(spec: int = keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT) -> keys_pb2.KeyMetadata:
    usage = (
        keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC
        if spec == keys_pb2.KEY_SPEC_HMAC_256
        else keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT
    )
    key = keylifecycle.new_key(
        description="",
        key_policy=None,
        enable_rotation=False,
        rotation_period_days=0,
        creator="spiffe://test/client/app",
        domain_id="test",
        key_spec=spec,
        key_usage=usage,
        origin=keys_pb2.KEY_ORIGIN_EXTERNAL,
    )
    return key.metadata(KEY_ID, NOW)


def test_import_delete_and_import_the_same_material_again() -> None:
    metadata, keys = _external(), {}
    assert (metadata.state, metadata.current_backing_version) == (
        keys_pb2.KEY_STATE_PENDING_IMPORT,
        0,
    )
    with pytest.raises(FailedPreconditionError, match="no key material"):
        keylifecycle.require_enabled(metadata)
    material = os.urandom(32)
    assert keyimport.import_material(metadata, keys, material, NOW + 60, NOW)
    assert (metadata.state, metadata.current_backing_version, keys) == (
        keys_pb2.KEY_STATE_ENABLED,
        1,
        {1: material},
    )
    assert metadata.material_commitment == importtokens.material_commitment(material, KEY_ID)
    with pytest.raises(FailedPreconditionError, match="already"):
        keyimport.import_material(metadata, keys, material, 0, NOW)
    assert not keyimport.material_expired(metadata, NOW + 59)
    assert keyimport.material_expired(metadata, NOW + 60)
    assert keyimport.delete_material(metadata, keys, NOW)
    assert (metadata.state, metadata.current_backing_version, keys) == (
        keys_pb2.KEY_STATE_PENDING_IMPORT,
        0,
        {},
    )
    assert not keyimport.delete_material(metadata, keys, NOW)  # nothing left to delete
    with pytest.raises(IncorrectKeyMaterialError):
        keyimport.import_material(metadata, keys, os.urandom(32), 0, NOW)
    assert keyimport.import_material(metadata, keys, material, 0, NOW)
    assert not keyimport.material_expired(metadata, NOW + 10**9)


def test_import_rules() -> None:
    metadata = _external(keys_pb2.KEY_SPEC_HMAC_256)
    for wrong in (os.urandom(31), os.urandom(65)):
        with pytest.raises(InvalidInputError, match="not a HMAC_256 key"):
            keyimport.import_material(metadata, {}, wrong, 0, NOW)
    with pytest.raises(InvalidInputError, match="valid_to"):
        keyimport.import_material(metadata, {}, os.urandom(40), NOW, NOW)
    assert metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT
    with pytest.raises(FailedPreconditionError, match="pending import"):
        keylifecycle.set_state(metadata, keys_pb2.KEY_STATE_ENABLED)
    # Scheduled for deletion without material, then cancelled: pending import again.
    assert keylifecycle.schedule_deletion(metadata, 7, NOW)
    assert keylifecycle.cancel_deletion(metadata)
    assert metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT
    made = _external()
    made.origin = keys_pb2.KEY_ORIGIN_DOMAIN
    for call in (
        lambda: keyimport.import_material(made, {}, bytes(32), 0, NOW),
        lambda: keyimport.delete_material(made, {1: bytes(32)}, NOW),
    ):
        with pytest.raises(UnsupportedOperationError, match="EXTERNAL"):
            call()
    with pytest.raises(UnsupportedOperationError, match="rotation"):
        keylifecycle.new_key(
            description="",
            key_policy=None,
            enable_rotation=True,
            rotation_period_days=0,
            creator="spiffe://test/client/app",
            domain_id="test",
            origin=keys_pb2.KEY_ORIGIN_EXTERNAL,
        )


def test_committed_import_token_vector() -> None:
    """The import token vector regenerates byte for byte, opens (before its expiry) to the
    RSA-2048 key of keyspec_vectors.json, and the commitment vector is HMAC-SHA-256 keyed
    with the backing key over the context and key id."""
    committed = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    keys, vector = committed["keys"], committed["import_token"]
    spec = importlib.util.spec_from_file_location(
        "ciphertext_vector_generator_it", VECTORS / "generate_ciphertext.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ciphertext_vector_generator_it"] = module
    spec.loader.exec_module(module)
    assert vector == module.import_token()
    wrapping = importtokens.open_import_token(
        bytes.fromhex(vector["token"]),
        domain_id=vector["domain_id"],
        key_id=keys["key_id"],
        domain_keys={keys["domain_key_generation"]: bytes.fromhex(keys["domain_key"])},
        now=vector["expires_at"] - 1,
    )
    rsa_vectors = json.loads((VECTORS / "keyspec_vectors.json").read_text("utf-8"))["rsa_2048"]
    public = wrapping.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public.hex() == rsa_vectors["public_key_der"]
    backing_key = bytes.fromhex(keys["backing_key"])
    expected = hmac.new(
        backing_key, MATERIAL_COMMITMENT_CONTEXT + keys["key_id"].encode(), "sha256"
    ).digest()
    assert vector["commitment_of_backing_key"] == expected.hex()
