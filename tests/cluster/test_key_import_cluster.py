"""Imported key material through real HSA processes (issue 19, item 5).

Checked outside the domain's own code: the HMAC of imported material equals Python's `hmac`
on the same bytes; a ciphertext of an imported symmetric key opens with the material itself
(`domain_core.ciphertext.decrypt`, the format's reference code, given the bytes we imported);
a signature of an imported P-256 key verifies under the public key `cryptography` derives from
it. And as an adversary would try: a token of another key, an edited token, material wrapped
under another public key, other material after a deletion, an import into a key made in the
domain.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.cluster import LocalCluster

from domain_core import ciphertext
from domain_core.errors import (
    FailedPreconditionError,
    IncorrectKeyMaterialError,
    InvalidCiphertextError,
    InvalidImportTokenError,
    InvalidInputError,
    UnsupportedOperationError,
)
from domain_edge.kms_client import ImportParameters, KeyClient

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("import") / "domain", nodes=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


def _client(domain: LocalCluster, host: str) -> KeyClient:
    tls = domain.client_tls()
    return KeyClient(
        [domain.address(host)], ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem
    )


@pytest.fixture(scope="module")
def one(domain: LocalCluster) -> Iterator[KeyClient]:
    with _client(domain, "hsa-1") as client:
        yield client


@pytest.fixture(scope="module")
def two(domain: LocalCluster) -> Iterator[KeyClient]:
    with _client(domain, "hsa-2") as client:
        yield client


@pytest.mark.parametrize(
    ("wrapping", "wrapping_key_spec", "length"),
    [
        ("RSAES_OAEP_SHA_256", "RSA_2048", 32),
        ("RSAES_OAEP_SHA_1", "RSA_3072", 45),
        ("RSA_AES_KEY_WRAP_SHA_256", "RSA_4096", 64),
    ],
)
def test_imported_hmac_keys_equal_pythons_hmac(
    one: KeyClient, two: KeyClient, wrapping: str, wrapping_key_spec: str, length: int
) -> None:
    key = one.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC", origin="EXTERNAL")
    assert (key.state, key.origin, key.current_backing_version) == ("pending-import", "EXTERNAL", 0)
    with pytest.raises(FailedPreconditionError, match="no key material"):
        one.generate_mac(key.key_id, b"m", "HMAC_SHA_256")
    material = os.urandom(length)
    parameters = one.get_parameters_for_import(key.key_id, wrapping, wrapping_key_spec)
    public = serialization.load_der_public_key(parameters.public_key)
    assert public.key_size == int(wrapping_key_spec[-4:])  # type: ignore[union-attr]
    enabled = two.import_key_material(key.key_id, parameters, material)  # the other HSA opens it
    assert (enabled.state, enabled.current_backing_version) == ("enabled", 1)
    for message in (b"m", b"imported material", os.urandom(4096)):
        expected = hmac.new(material, message, hashlib.sha256).digest()
        assert one.generate_mac(key.key_id, message, "HMAC_SHA_256") == expected
        assert two.verify_mac(key.key_id, message, expected, "HMAC_SHA_256")


def test_an_imported_symmetric_key_is_the_aes_key_of_its_ciphertexts(
    one: KeyClient, two: KeyClient
) -> None:
    key = one.create_key(origin="EXTERNAL")
    material = os.urandom(32)
    one.import_key_material(key.key_id, one.get_parameters_for_import(key.key_id), material)
    blob = one.encrypt(key.key_id, b"opened outside", {"a": "b"})
    assert ciphertext.decrypt(material, blob, {"a": "b"}) == b"opened outside"
    assert two.decrypt(blob, {"a": "b"}) == b"opened outside"
    # Delete, then only the same material comes back (and with it the old ciphertexts).
    assert one.delete_imported_key_material(key.key_id).state == "pending-import"
    with pytest.raises(FailedPreconditionError, match="no key material"):
        two.decrypt(blob, {"a": "b"})
    with pytest.raises(IncorrectKeyMaterialError, match="same material"):
        two.import_key_material(
            key.key_id, two.get_parameters_for_import(key.key_id), os.urandom(32)
        )
    two.import_key_material(key.key_id, two.get_parameters_for_import(key.key_id), material)
    assert one.decrypt(blob, {"a": "b"}) == b"opened outside"
    with pytest.raises(FailedPreconditionError, match="already"):
        one.import_key_material(key.key_id, one.get_parameters_for_import(key.key_id), material)
    with pytest.raises(UnsupportedOperationError):
        one.rotate_key(key.key_id)


def test_an_imported_signing_key_signs_as_its_owner_expects(one: KeyClient) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = one.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY", origin="EXTERNAL")
    parameters = one.get_parameters_for_import(key.key_id, "RSA_AES_KEY_WRAP_SHA_256")
    one.import_key_material(key.key_id, parameters, der)
    own_public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert one.get_public_key(key.key_id).public_key == own_public
    signature = one.sign(key.key_id, b"signed in the domain", "ECDSA_SHA_256")
    private.public_key().verify(signature, b"signed in the domain", ec.ECDSA(hashes.SHA256()))
    # Material of another spec is refused, and nothing changes.
    other = one.create_key(key_spec="ECC_NIST_P384", key_usage="SIGN_VERIFY", origin="EXTERNAL")
    with pytest.raises(InvalidInputError, match="not a ECC_NIST_P384 key"):
        one.import_key_material(
            other.key_id,
            one.get_parameters_for_import(other.key_id, "RSA_AES_KEY_WRAP_SHA_256"),
            der,
        )
    assert one.describe_key(other.key_id).state == "pending-import"


def test_tokens_and_wrapped_material_that_are_not_right_are_refused(
    one: KeyClient, two: KeyClient
) -> None:
    first = one.create_key(origin="EXTERNAL")
    second = one.create_key(origin="EXTERNAL")
    material = os.urandom(32)
    for_first = one.get_parameters_for_import(first.key_id)
    # A token made for another key, even with its own public key.
    with pytest.raises(InvalidImportTokenError, match="invalid import token"):
        two.import_key_material(second.key_id, for_first, material)
    # Any edit of a token.
    token = bytearray(for_first.import_token)
    token[len(token) // 2] ^= 1
    edited = ImportParameters(
        first.key_id, bytes(token), for_first.public_key, for_first.wrapping_algorithm, 0
    )
    with pytest.raises(InvalidImportTokenError, match="invalid import token"):
        two.import_key_material(first.key_id, edited, material)
    # Material wrapped under another public key than the token's.
    for_second = one.get_parameters_for_import(second.key_id)
    crossed = ImportParameters(
        first.key_id, for_first.import_token, for_second.public_key, "RSAES_OAEP_SHA_256", 0
    )
    with pytest.raises(InvalidCiphertextError):
        two.import_key_material(first.key_id, crossed, material)
    # An expiry in the past; material of the wrong length.
    with pytest.raises(InvalidInputError, match="valid_to"):
        one.import_key_material(first.key_id, for_first, material, valid_to=1)
    with pytest.raises(InvalidInputError, match="32 bytes"):
        one.import_key_material(first.key_id, for_first, material[:31])
    assert one.describe_key(first.key_id).state == "pending-import"
    # A key made in the domain takes no import.
    made = one.create_key()
    with pytest.raises(UnsupportedOperationError, match="EXTERNAL"):
        one.get_parameters_for_import(made.key_id)
    with pytest.raises(UnsupportedOperationError, match="EXTERNAL"):
        one.import_key_material(made.key_id, for_first, material)
    with pytest.raises(UnsupportedOperationError, match="EXTERNAL"):
        one.delete_imported_key_material(made.key_id)
