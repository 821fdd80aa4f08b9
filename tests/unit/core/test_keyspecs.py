"""domain_core.keyspecs: AWS KMS's key specs, usages and algorithms, and their operations.

Signatures are checked outside the module (with `cryptography` from the public key the module
returns, and with the `openssl` command line), RSA-OAEP ciphertexts made outside it decrypt,
MACs equal Python's `hmac`, and the committed golden vectors (tests/vectors/generate_keyspecs.py)
still hold. RSA keys are made once per module and size.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from domain_core import keyspecs, limits
from domain_core.errors import (
    InvalidCiphertextError,
    InvalidInputError,
    InvalidKeyUsageError,
)
from domain_core.keyspecs import AsymmetricKey
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).resolve().parents[2] / "vectors"  # support.repository.VECTORS

RAW = keys_pb2.MESSAGE_TYPE_RAW
DIGEST = keys_pb2.MESSAGE_TYPE_DIGEST
SIGN = keys_pb2.KEY_USAGE_SIGN_VERIFY
ENCRYPT = keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT
MAC = keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC
OAEP_1 = keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_1
OAEP_256 = keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_256
SYMMETRIC = keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT
RSA_SPECS: tuple[int, ...] = (
    keys_pb2.KEY_SPEC_RSA_2048,
    keys_pb2.KEY_SPEC_RSA_3072,
    keys_pb2.KEY_SPEC_RSA_4096,
)
ECC_SPECS: tuple[int, ...] = (
    keys_pb2.KEY_SPEC_ECC_NIST_P256,
    keys_pb2.KEY_SPEC_ECC_NIST_P384,
    keys_pb2.KEY_SPEC_ECC_NIST_P521,
)
HMAC_SPECS: tuple[int, ...] = (
    keys_pb2.KEY_SPEC_HMAC_224,
    keys_pb2.KEY_SPEC_HMAC_256,
    keys_pb2.KEY_SPEC_HMAC_384,
    keys_pb2.KEY_SPEC_HMAC_512,
)
ASYMMETRIC_SPECS = RSA_SPECS + ECC_SPECS
ALL_SPECS = (SYMMETRIC, *ASYMMETRIC_SPECS, *HMAC_SPECS)
ALL_SIGNING = tuple(v for _, v in keys_pb2.SigningAlgorithm.items() if v != 0)
ALL_MACS = tuple(v for _, v in keys_pb2.MacAlgorithm.items() if v != 0)
RSA_SIGNING = ALL_SIGNING[:6]
ECDSA_OF: dict[int, int] = dict(zip(ECC_SPECS, ALL_SIGNING[6:], strict=True))
HASH_OF = {
    "SHA_256": hashes.SHA256(),
    "SHA_384": hashes.SHA384(),
    "SHA_512": hashes.SHA512(),
}
MAC_HASH: dict[int, str] = dict(
    zip(HMAC_SPECS, ("sha224", "sha256", "sha384", "sha512"), strict=True)
)
MESSAGE = b"a message to sign: keyspecs unit tests"


def _hash(algorithm: int) -> hashes.HashAlgorithm:
    return HASH_OF[keyspecs.signing_algorithm_name(algorithm)[-7:]]


def _digest(algorithm: int, message: bytes) -> bytes:
    h = hashes.Hash(_hash(algorithm))
    h.update(message)
    return h.finalize()


def _flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _assert_clean(error: BaseException, *secrets: bytes) -> None:
    """`error`'s message (and what it chains) shows none of `secrets`, in hex or raw."""
    texts = [str(error), repr(error)]
    if error.__cause__ is not None:
        texts.append(str(error.__cause__))
    for secret in secrets:
        if len(secret) < 8:
            continue
        for text in texts:
            assert secret.hex() not in text.lower()
            assert secret.hex()[:32] not in text.lower()
            assert repr(secret)[2:34] not in text


# --- keys, made once per module --------------------------------------------------------------


@pytest.fixture(scope="module")
def materials() -> dict[int, bytes]:
    """Fresh material of every asymmetric spec: each RSA size generated once here."""
    return {spec: keyspecs.new_material(spec) for spec in ASYMMETRIC_SPECS}


@pytest.fixture(scope="module")
def signers(materials: dict[int, bytes]) -> dict[int, AsymmetricKey]:
    return {spec: AsymmetricKey.load(spec, SIGN, materials[spec]) for spec in ASYMMETRIC_SPECS}


@pytest.fixture(scope="module")
def decrypters(materials: dict[int, bytes]) -> dict[int, AsymmetricKey]:
    return {spec: AsymmetricKey.load(spec, ENCRYPT, materials[spec]) for spec in RSA_SPECS}


def _load(material: bytes) -> Any:
    """A private key of ours, parsed by `cryptography` alone (no slow RSA consistency check)."""
    return serialization.load_der_private_key(
        material, password=None, unsafe_skip_rsa_key_validation=True
    )


def _public(key: AsymmetricKey) -> Any:
    return serialization.load_der_public_key(key.public_key_der())


def _allowed_pairs() -> Iterator[tuple[int, int]]:
    for spec in RSA_SPECS[:1]:
        for algorithm in RSA_SIGNING:
            yield spec, algorithm
    for spec in ECC_SPECS:
        yield spec, ECDSA_OF[spec]


ALLOWED_PAIRS = list(_allowed_pairs())
PAIR_IDS = [
    f"{keyspecs.spec_name(s)}-{keyspecs.signing_algorithm_name(a)}" for s, a in ALLOWED_PAIRS
]


# --- names -----------------------------------------------------------------------------------

NAME_FUNCTIONS: list[tuple[EnumTypeWrapper, str, Callable[[int], str], Callable[[str], int]]] = [
    (keys_pb2.KeySpec, "KEY_SPEC_", keyspecs.spec_name, keyspecs.spec_from_name),
    (keys_pb2.KeyUsage, "KEY_USAGE_", keyspecs.usage_name, keyspecs.usage_from_name),
    (
        keys_pb2.SigningAlgorithm,
        "SIGNING_ALGORITHM_",
        keyspecs.signing_algorithm_name,
        keyspecs.signing_algorithm_from_name,
    ),
    (
        keys_pb2.EncryptionAlgorithm,
        "ENCRYPTION_ALGORITHM_",
        keyspecs.encryption_algorithm_name,
        keyspecs.encryption_algorithm_from_name,
    ),
    (
        keys_pb2.MacAlgorithm,
        "MAC_ALGORITHM_",
        keyspecs.mac_algorithm_name,
        keyspecs.mac_algorithm_from_name,
    ),
    (
        keys_pb2.MessageType,
        "MESSAGE_TYPE_",
        keyspecs.message_type_name,
        keyspecs.message_type_from_name,
    ),
]


@pytest.mark.parametrize(
    ("enum", "prefix", "to_name", "from_name"),
    NAME_FUNCTIONS,
    ids=[p for _, p, _, _ in NAME_FUNCTIONS],
)
def test_every_enum_value_round_trips_through_its_aws_name(
    enum: EnumTypeWrapper,
    prefix: str,
    to_name: Callable[[int], str],
    from_name: Callable[[str], int],
) -> None:
    for full_name, value in enum.items():
        name = full_name.removeprefix(prefix)
        if name == "UNSPECIFIED":
            with pytest.raises(InvalidInputError):
                to_name(value)
            with pytest.raises(InvalidInputError):
                from_name(name)
            continue
        assert to_name(value) == name
        assert from_name(name) == value
    with pytest.raises(InvalidInputError, match="use one of"):
        to_name(99)
    with pytest.raises(InvalidInputError, match="use one of") as info:
        from_name("NOT_A_NAME")
    assert "NOT_A_NAME" in str(info.value)
    with pytest.raises(InvalidInputError):
        from_name(prefix + to_name(max(v for _, v in enum.items())))


def test_names_are_aws_names() -> None:
    assert [keyspecs.spec_name(s) for s in ALL_SPECS] == [
        "SYMMETRIC_DEFAULT",
        "RSA_2048",
        "RSA_3072",
        "RSA_4096",
        "ECC_NIST_P256",
        "ECC_NIST_P384",
        "ECC_NIST_P521",
        "HMAC_224",
        "HMAC_256",
        "HMAC_384",
        "HMAC_512",
    ]
    assert [keyspecs.usage_name(u) for u in (ENCRYPT, SIGN, MAC)] == [
        "ENCRYPT_DECRYPT",
        "SIGN_VERIFY",
        "GENERATE_VERIFY_MAC",
    ]
    assert [keyspecs.encryption_algorithm_name(a) for a in (0, OAEP_1, OAEP_256)] == [
        "SYMMETRIC_DEFAULT",
        "RSAES_OAEP_SHA_1",
        "RSAES_OAEP_SHA_256",
    ]
    assert keyspecs.message_type_name(RAW) == "RAW"
    assert keyspecs.message_type_name(DIGEST) == "DIGEST"
    assert keyspecs.signing_algorithm_name(RSA_SIGNING[3]) == "RSASSA_PKCS1_V1_5_SHA_256"
    assert keyspecs.mac_algorithm_name(ALL_MACS[0]) == "HMAC_SHA_224"
    with pytest.raises(InvalidInputError, match="RSA_2048, RSA_3072"):
        keyspecs.spec_from_name("RSA_1024")


# --- specs, usages, algorithms ---------------------------------------------------------------


def _expected_usages(spec: int) -> set[int]:
    if spec == SYMMETRIC:
        return {ENCRYPT}
    if spec in RSA_SPECS:
        return {ENCRYPT, SIGN}
    if spec in ECC_SPECS:
        return {SIGN}
    return {MAC}


@pytest.mark.parametrize("spec", ALL_SPECS, ids=keyspecs.spec_name)
def test_spec_usage_pairs_are_aws_pairs(spec: int) -> None:
    for usage in (ENCRYPT, SIGN, MAC):
        if usage in _expected_usages(spec):
            keyspecs.check_spec_usage(spec, usage)
        else:
            with pytest.raises(InvalidInputError, match="takes key usage") as info:
                keyspecs.check_spec_usage(spec, usage)
            assert not isinstance(info.value, InvalidKeyUsageError)
            for allowed in _expected_usages(spec):
                assert keyspecs.usage_name(allowed) in str(info.value)
    with pytest.raises(InvalidInputError):
        keyspecs.check_spec_usage(spec, 7)
    with pytest.raises(InvalidInputError):
        keyspecs.check_spec_usage(42, SIGN)


def test_kind_predicates() -> None:
    assert [s for s in ALL_SPECS if keyspecs.is_symmetric(s)] == [SYMMETRIC]
    assert tuple(s for s in ALL_SPECS if keyspecs.is_asymmetric(s)) == ASYMMETRIC_SPECS
    assert tuple(s for s in ALL_SPECS if keyspecs.is_hmac(s)) == HMAC_SPECS
    for predicate in (keyspecs.is_symmetric, keyspecs.is_asymmetric, keyspecs.is_hmac):
        with pytest.raises(InvalidInputError):
            predicate(11)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=keyspecs.spec_name)
def test_algorithms_as_describe_key_lists_them(spec: int) -> None:
    for usage in (ENCRYPT, SIGN, MAC):
        signing = keyspecs.signing_algorithms(spec, usage)
        encryption = keyspecs.encryption_algorithms(spec, usage)
        macs = keyspecs.mac_algorithms(spec, usage)
        expected_signing: tuple[int, ...] = ()
        expected_encryption: tuple[int, ...] = ()
        expected_macs: tuple[int, ...] = ()
        if usage == SIGN and spec in RSA_SPECS:
            expected_signing = RSA_SIGNING
        elif usage == SIGN and spec in ECC_SPECS:
            expected_signing = (ECDSA_OF[spec],)
        elif usage == ENCRYPT and spec in RSA_SPECS:
            expected_encryption = (OAEP_1, OAEP_256)
        elif usage == ENCRYPT and spec == SYMMETRIC:
            expected_encryption = (keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT,)
        elif usage == MAC and spec in HMAC_SPECS:
            expected_macs = (ALL_MACS[HMAC_SPECS.index(spec)],)
        assert (signing, encryption, macs) == (expected_signing, expected_encryption, expected_macs)


def test_ecc_specs_sign_with_their_own_hash() -> None:
    names = [keyspecs.signing_algorithm_name(ECDSA_OF[s]) for s in ECC_SPECS]
    assert names == ["ECDSA_SHA_256", "ECDSA_SHA_384", "ECDSA_SHA_512"]
    assert [keyspecs.mac_algorithms(s, MAC) for s in HMAC_SPECS] == [(a,) for a in ALL_MACS]


# --- material --------------------------------------------------------------------------------


# The longest HMAC key AWS KMS imports for each HMAC spec (a new key has the shortest).
HMAC_LONGEST: dict[int, int] = dict(zip(HMAC_SPECS, (64, 64, 128, 128), strict=True))


@pytest.mark.parametrize(
    ("spec", "size", "longest"),
    [(SYMMETRIC, 32, 32), *zip(HMAC_SPECS, (28, 32, 48, 64), (64, 64, 128, 128), strict=True)],
    ids=["SYMMETRIC_DEFAULT", "HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512"],
)
def test_symmetric_material_has_aws_lengths(spec: int, size: int, longest: int) -> None:
    """A new key has AWS KMS's length for its spec; imported HMAC keys may be longer, up to
    AWS's bound; nothing shorter or longer passes."""
    material = keyspecs.new_material(spec)
    assert len(material) == size
    assert keyspecs.new_material(spec) != material
    keyspecs.check_material(spec, material)
    keyspecs.check_material(spec, material + bytes(longest - size))
    for wrong in (material[:-1], material + bytes(longest - size + 1), b""):
        with pytest.raises(ValueError, match="must be") as info:
            keyspecs.check_material(spec, wrong)
        _assert_clean(info.value, material)


def test_asymmetric_material_is_pkcs8_of_the_spec(materials: dict[int, bytes]) -> None:
    sizes: dict[int, int] = dict(zip(RSA_SPECS, (2048, 3072, 4096), strict=True))
    curves: dict[int, str] = dict(
        zip(ECC_SPECS, ("secp256r1", "secp384r1", "secp521r1"), strict=True)
    )
    for spec, material in materials.items():
        keyspecs.check_material(spec, material)
        key = _load(material)
        # The PKCS#8 encoding byte for byte, as cryptography writes it.
        assert material == key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if spec in RSA_SPECS:
            assert isinstance(key, rsa.RSAPrivateKey)
            assert key.key_size == sizes[spec]
            assert key.private_numbers().public_numbers.e == 65537
        else:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            assert key.curve.name == curves[spec]


def test_check_material_refuses_other_types_sizes_and_curves(materials: dict[int, bytes]) -> None:
    p256, p384 = materials[ECC_SPECS[0]], materials[ECC_SPECS[1]]
    rsa2048, rsa3072 = materials[RSA_SPECS[0]], materials[RSA_SPECS[1]]
    rsa_key = serialization.load_der_private_key(rsa2048, password=None)
    ec_key = serialization.load_der_private_key(p256, password=None)
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    sec1 = ec_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cases = [
        (ECC_SPECS[0], p384, "not a key on secp256r1"),
        (ECC_SPECS[1], p256, "not a key on secp384r1"),
        (ECC_SPECS[0], rsa2048, "not a key on secp256r1"),
        (RSA_SPECS[1], rsa2048, "not an RSA-3072 key"),
        (RSA_SPECS[0], rsa3072, "not an RSA-2048 key"),
        (RSA_SPECS[0], p256, "not an RSA-2048 key"),
        (RSA_SPECS[0], pkcs1, "not an unencrypted PKCS#8"),
        (ECC_SPECS[0], sec1, "not an unencrypted PKCS#8"),
        (RSA_SPECS[0], rsa2048[:-1], "not an unencrypted PKCS#8"),
        (RSA_SPECS[0], bytes(32), "not an unencrypted PKCS#8"),
        (ECC_SPECS[0], b"", "not an unencrypted PKCS#8"),
    ]
    for spec, material, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            keyspecs.check_material(spec, material)
        _assert_clean(info.value, material)
        assert keyspecs.spec_name(spec) in str(info.value)
    with pytest.raises(ValueError, match="has no private key"):
        AsymmetricKey.load(SYMMETRIC, ENCRYPT, p256)
    with pytest.raises(InvalidInputError):
        keyspecs.check_material(12, bytes(32))


def test_a_data_key_pair_matches_its_halves() -> None:
    assert keyspecs.DATA_KEY_PAIR_SPECS == ASYMMETRIC_SPECS
    # ECC only: an RSA pair takes the same path, and RSA keys are made once per module.
    for spec in ECC_SPECS:
        private_der, public_der = keyspecs.new_data_key_pair(spec)
        assert keyspecs.new_data_key_pair(spec)[1] != public_der
        keyspecs.check_material(spec, private_der)
        key = AsymmetricKey.load(spec, SIGN, private_der)
        assert key.public_key_der() == public_der
        (algorithm,) = keyspecs.signing_algorithms(spec, SIGN)
        _verify_outside(key, algorithm, MESSAGE, key.sign(algorithm, MESSAGE, RAW))
    for spec in (SYMMETRIC, *HMAC_SPECS):
        with pytest.raises(InvalidInputError, match="key pair spec RSA_2048"):
            keyspecs.new_data_key_pair(spec)


def test_asymmetric_key_repr_shows_only_spec_and_usage(materials: dict[int, bytes]) -> None:
    material = materials[ECC_SPECS[0]]
    key = AsymmetricKey.load(ECC_SPECS[0], SIGN, material)
    assert repr(key) == "AsymmetricKey(spec=ECC_NIST_P256, usage=SIGN_VERIFY)"
    assert key.spec == ECC_SPECS[0]
    assert key.public_key_der() is key.public_key_der()
    assert not hasattr(key, "__dict__")
    with pytest.raises(InvalidInputError, match="takes key usage SIGN_VERIFY"):
        AsymmetricKey.load(ECC_SPECS[0], ENCRYPT, material)


# --- sign and verify -------------------------------------------------------------------------


def _verify_outside(key: AsymmetricKey, algorithm: int, message: bytes, signature: bytes) -> None:
    """Verify with `cryptography` alone, from the DER public key (raises when it fails)."""
    public = _public(key)
    name = keyspecs.signing_algorithm_name(algorithm)
    hash_ = _hash(algorithm)
    if name.startswith("RSASSA_PSS"):
        pss = padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
        public.verify(signature, message, pss, hash_)
    elif name.startswith("RSASSA_PKCS1"):
        public.verify(signature, message, padding.PKCS1v15(), hash_)
    else:
        utils.decode_dss_signature(signature)  # DER, as AWS returns it
        public.verify(signature, message, ec.ECDSA(hash_))


@pytest.mark.parametrize(("spec", "algorithm"), ALLOWED_PAIRS, ids=PAIR_IDS)
def test_raw_and_digest_signatures_verify_outside(
    signers: dict[int, AsymmetricKey], spec: int, algorithm: int
) -> None:
    key = signers[spec]
    digest = _digest(algorithm, MESSAGE)
    from_raw = key.sign(algorithm, MESSAGE, RAW)
    from_digest = key.sign(algorithm, digest, DIGEST)
    for signature in (from_raw, from_digest):
        _verify_outside(key, algorithm, MESSAGE, signature)
        assert key.verify(algorithm, MESSAGE, RAW, signature)
        assert key.verify(algorithm, digest, DIGEST, signature)
    if "PKCS1" in keyspecs.signing_algorithm_name(algorithm):
        assert from_raw == from_digest  # deterministic: the same signature
    # The salt of RSASSA-PSS is the digest's length: another salt length does not verify.
    if "PSS" in keyspecs.signing_algorithm_name(algorithm):
        hash_ = _hash(algorithm)
        with pytest.raises(InvalidSignature):
            _public(key).verify(
                from_raw, MESSAGE, padding.PSS(padding.MGF1(hash_), hash_.digest_size - 1), hash_
            )


@pytest.mark.parametrize("spec", RSA_SPECS[1:], ids=keyspecs.spec_name)
def test_larger_rsa_keys_sign(signers: dict[int, AsymmetricKey], spec: int) -> None:
    key = signers[spec]
    for algorithm in (RSA_SIGNING[2], RSA_SIGNING[4]):
        signature = key.sign(algorithm, MESSAGE, RAW)
        assert len(signature) == _public(key).key_size // 8
        _verify_outside(key, algorithm, MESSAGE, signature)


OPENSSL_CASES = [
    (
        RSA_SPECS[0],
        RSA_SIGNING[0],
        [
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:32",
            "-sigopt",
            "rsa_mgf1_md:sha256",
        ],
    ),
    (RSA_SPECS[0], RSA_SIGNING[4], []),
    (ECC_SPECS[1], ECDSA_OF[ECC_SPECS[1]], []),
    (ECC_SPECS[2], ECDSA_OF[ECC_SPECS[2]], []),
]


@pytest.mark.parametrize(
    ("spec", "algorithm", "options"),
    OPENSSL_CASES,
    ids=[keyspecs.signing_algorithm_name(a) for _, a, _ in OPENSSL_CASES],
)
def test_openssl_verifies_signatures(
    signers: dict[int, AsymmetricKey],
    require_tool: Callable[[str, str], str],
    tmp_path: Path,
    spec: int,
    algorithm: int,
    options: list[str],
) -> None:
    openssl = require_tool("openssl", "verify signatures with another implementation")
    key = signers[spec]
    digest_option = "-" + keyspecs.signing_algorithm_name(algorithm)[-7:].replace("_", "").lower()
    (tmp_path / "public.der").write_bytes(key.public_key_der())
    (tmp_path / "message").write_bytes(MESSAGE)
    raw = key.sign(algorithm, MESSAGE, RAW)
    signatures = {
        "raw": raw,
        "digest": key.sign(algorithm, _digest(algorithm, MESSAGE), DIGEST),
        "bad": _flip_bit(raw, len(raw) * 8 - 1),  # in the last byte, so still DER
    }
    for name, signature in signatures.items():
        (tmp_path / name).write_bytes(signature)
        result = subprocess.run(
            [
                openssl,
                "dgst",
                digest_option,
                "-keyform",
                "DER",
                "-verify",
                str(tmp_path / "public.der"),
                *options,
                "-signature",
                str(tmp_path / name),
                str(tmp_path / "message"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if name == "bad":
            assert result.returncode != 0
            assert "Verification failure" in result.stdout
        else:
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "Verified OK"


@pytest.mark.parametrize(("spec", "algorithm"), ALLOWED_PAIRS, ids=PAIR_IDS)
def test_verify_is_false_for_a_wrong_signature(
    signers: dict[int, AsymmetricKey], spec: int, algorithm: int
) -> None:
    key = signers[spec]
    signature = key.sign(algorithm, MESSAGE, RAW)
    assert key.verify(algorithm, MESSAGE, RAW, signature)
    for bit in (0, 7, len(signature) * 4, len(signature) * 8 - 1):
        assert not key.verify(algorithm, MESSAGE, RAW, _flip_bit(signature, bit))
    assert not key.verify(algorithm, _flip_bit(MESSAGE, 3), RAW, signature)
    for malformed in (b"", signature[:-1], signature + b"\x00", b"\x30\x00", bytes(600)):
        assert not key.verify(algorithm, MESSAGE, RAW, malformed)
    other = ALLOWED_PAIRS[0][0] if spec != ALLOWED_PAIRS[0][0] else ECC_SPECS[0]
    other_algorithm = keyspecs.signing_algorithms(other, SIGN)[0]
    assert not key.verify(
        algorithm, MESSAGE, RAW, signers[other].sign(other_algorithm, MESSAGE, RAW)
    )


@pytest.mark.parametrize("spec", ASYMMETRIC_SPECS, ids=keyspecs.spec_name)
def test_every_algorithm_the_spec_does_not_allow_is_refused(
    signers: dict[int, AsymmetricKey], spec: int
) -> None:
    key = signers[spec]
    allowed = keyspecs.signing_algorithms(spec, SIGN)
    refused = [a for a in ALL_SIGNING if a not in allowed]
    assert len(refused) == len(ALL_SIGNING) - len(allowed) > 0
    for algorithm in refused:
        with pytest.raises(InvalidKeyUsageError) as info:
            key.sign(algorithm, MESSAGE, RAW)
        message = str(info.value)
        assert message.startswith(f"key spec {keyspecs.spec_name(spec)} signs with ")
        assert message.endswith(f"; not {keyspecs.signing_algorithm_name(algorithm)}")
        with pytest.raises(InvalidKeyUsageError):
            key.verify(algorithm, MESSAGE, RAW, b"\x00" * 64)
    # No algorithm, or a number that is no algorithm: a bad argument, not a key usage.
    for algorithm in (keys_pb2.SIGNING_ALGORITHM_UNSPECIFIED, 77):
        with pytest.raises(InvalidInputError, match="signing algorithm") as error:
            key.sign(algorithm, MESSAGE, RAW)
        assert not isinstance(error.value, InvalidKeyUsageError)


def test_the_aws_message_for_a_wrong_ecc_algorithm(signers: dict[int, AsymmetricKey]) -> None:
    with pytest.raises(InvalidKeyUsageError) as info:
        signers[ECC_SPECS[0]].sign(RSA_SIGNING[0], MESSAGE, RAW)
    assert (
        str(info.value) == "key spec ECC_NIST_P256 signs with ECDSA_SHA_256; not RSASSA_PSS_SHA_256"
    )


def test_usage_decides_which_operations_a_key_has(
    signers: dict[int, AsymmetricKey], decrypters: dict[int, AsymmetricKey]
) -> None:
    signer, decrypter = signers[RSA_SPECS[0]], decrypters[RSA_SPECS[0]]
    assert signer.public_key_der() == decrypter.public_key_der()
    with pytest.raises(InvalidKeyUsageError, match="key usage ENCRYPT_DECRYPT does not sign"):
        decrypter.sign(RSA_SIGNING[0], MESSAGE, RAW)
    with pytest.raises(InvalidKeyUsageError, match="does not sign or verify"):
        decrypter.verify(RSA_SIGNING[0], MESSAGE, RAW, bytes(256))
    with pytest.raises(InvalidKeyUsageError, match="key usage SIGN_VERIFY does not encrypt"):
        signer.encrypt(OAEP_256, b"x")
    with pytest.raises(InvalidKeyUsageError, match="does not encrypt or decrypt"):
        signer.decrypt(OAEP_256, bytes(256))
    with pytest.raises(InvalidKeyUsageError, match="does not encrypt or decrypt"):
        signers[ECC_SPECS[0]].encrypt(OAEP_256, b"x")


@pytest.mark.parametrize(("spec", "algorithm"), ALLOWED_PAIRS, ids=PAIR_IDS)
def test_a_digest_of_the_wrong_length_is_refused(
    signers: dict[int, AsymmetricKey], spec: int, algorithm: int
) -> None:
    key = signers[spec]
    digest = _digest(algorithm, MESSAGE)
    size = len(digest)
    for wrong in (digest[:-1], digest + b"\x00", b"", bytes(20), MESSAGE):
        with pytest.raises(InvalidInputError, match=f"digest of {size} bytes, not {len(wrong)}"):
            key.sign(algorithm, wrong, DIGEST)
        with pytest.raises(InvalidInputError, match=f"digest of {size} bytes"):
            key.verify(algorithm, wrong, DIGEST, key.sign(algorithm, digest, DIGEST))
    with pytest.raises(InvalidInputError, match="message type"):
        key.sign(algorithm, digest, 2)


def test_message_limits_of_sign_and_verify(signers: dict[int, AsymmetricKey]) -> None:
    assert limits.MAX_KMS_MESSAGE_BYTES == 4096
    assert limits.MIN_KMS_MESSAGE_BYTES == 1
    for spec in (RSA_SPECS[0], ECC_SPECS[0]):
        key = signers[spec]
        algorithm = keyspecs.signing_algorithms(spec, SIGN)[0]
        longest = bytes(range(256)) * 16
        signature = key.sign(algorithm, longest, RAW)
        assert key.verify(algorithm, longest, RAW, signature)
        _verify_outside(key, algorithm, longest, signature)
        assert key.verify(algorithm, b"x", RAW, key.sign(algorithm, b"x", RAW))
        for wrong in (longest + b"x", b""):
            with pytest.raises(InvalidInputError, match=f"is {len(wrong)} bytes; Sign") as info:
                key.sign(algorithm, wrong, RAW)
            assert "1 to 4096 bytes" in str(info.value)
            with pytest.raises(InvalidInputError, match="1 to 4096 bytes"):
                key.verify(algorithm, wrong, RAW, signature)


# --- RSA-OAEP --------------------------------------------------------------------------------


def _oaep(algorithm: int) -> padding.OAEP:
    sha1 = hashes.SHA1()  # noqa: S303 (AWS's RSAES_OAEP_SHA_1)
    hash_: hashes.HashAlgorithm = sha1 if algorithm == OAEP_1 else hashes.SHA256()
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


def test_max_oaep_plaintext_as_aws() -> None:
    table = {
        (RSA_SPECS[0], OAEP_1): 214,
        (RSA_SPECS[0], OAEP_256): 190,
        (RSA_SPECS[1], OAEP_1): 342,
        (RSA_SPECS[1], OAEP_256): 318,
        (RSA_SPECS[2], OAEP_1): 470,
        (RSA_SPECS[2], OAEP_256): 446,
    }
    assert {pair: keyspecs.max_oaep_plaintext(*pair) for pair in table} == table
    with pytest.raises(InvalidKeyUsageError, match="only RSA key specs"):
        keyspecs.max_oaep_plaintext(ECC_SPECS[0], OAEP_256)
    with pytest.raises(InvalidKeyUsageError, match="not SYMMETRIC_DEFAULT"):
        keyspecs.max_oaep_plaintext(RSA_SPECS[0], keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT)


@pytest.mark.parametrize("spec", RSA_SPECS, ids=keyspecs.spec_name)
@pytest.mark.parametrize("algorithm", [OAEP_1, OAEP_256], ids=["SHA_1", "SHA_256"])
def test_oaep_ciphertexts_cross_with_cryptography(
    decrypters: dict[int, AsymmetricKey],
    materials: dict[int, bytes],
    spec: int,
    algorithm: int,
) -> None:
    key = decrypters[spec]
    public = _public(key)
    assert isinstance(public, rsa.RSAPublicKey)
    private = _load(materials[spec])
    assert isinstance(private, rsa.RSAPrivateKey)
    limit = keyspecs.max_oaep_plaintext(spec, algorithm)
    for plaintext in (b"", b"k", b"\x5a" * (limit // 2)):
        outside = public.encrypt(plaintext, _oaep(algorithm))
        assert key.decrypt(algorithm, outside) == plaintext
        inside = key.encrypt(algorithm, plaintext)
        assert len(inside) == public.key_size // 8
        assert private.decrypt(inside, _oaep(algorithm)) == plaintext
    longest = b"\xa5" * limit
    assert key.decrypt(algorithm, key.encrypt(algorithm, longest)) == longest
    with pytest.raises(InvalidInputError, match=f"at most {limit} bytes") as info:
        key.encrypt(algorithm, longest + b"\xa5")
    _assert_clean(info.value, longest)


def test_a_ciphertext_that_does_not_decrypt_says_nothing(
    decrypters: dict[int, AsymmetricKey],
) -> None:
    key = decrypters[RSA_SPECS[0]]
    ciphertext = key.encrypt(OAEP_256, b"secret plaintext")
    wrong = [
        _flip_bit(ciphertext, 5),
        _flip_bit(ciphertext, len(ciphertext) * 8 - 1),
        ciphertext[:-1],
        ciphertext + b"\x00",
        b"",
        b"\xff" * len(ciphertext),  # larger than the modulus
        bytes(len(ciphertext)),
    ]
    for blob in wrong:
        with pytest.raises(InvalidCiphertextError) as info:
            key.decrypt(OAEP_256, blob)
        assert str(info.value) == "invalid ciphertext"
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__ or info.value.__context__ is None
    # The other OAEP hash does not open it either.
    with pytest.raises(InvalidCiphertextError):
        key.decrypt(OAEP_1, ciphertext)
    with pytest.raises(InvalidKeyUsageError, match="encrypts with RSAES_OAEP_SHA_1"):
        key.decrypt(keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT, ciphertext)
    with pytest.raises(InvalidInputError, match="unknown encryption algorithm"):
        key.encrypt(9, b"x")


# --- HMAC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", HMAC_SPECS, ids=keyspecs.spec_name)
def test_hmac_equals_pythons_hmac(spec: int) -> None:
    key = keyspecs.new_material(spec)
    (algorithm,) = keyspecs.mac_algorithms(spec, MAC)
    for message in (b"x", MESSAGE, bytes(4096)):
        mac = keyspecs.generate_mac(spec, key, algorithm, message)
        assert mac == hmac.new(key, message, MAC_HASH[spec]).digest()
        assert keyspecs.verify_mac(spec, key, algorithm, message, mac)
        assert not keyspecs.verify_mac(spec, key, algorithm, message, _flip_bit(mac, 0))
        assert not keyspecs.verify_mac(spec, key, algorithm, message, mac[:-1])
        assert not keyspecs.verify_mac(spec, key, algorithm, _flip_bit(message, 1), mac)
        assert not keyspecs.verify_mac(spec, key, algorithm, message, b"")
    for wrong in (b"", bytes(4097)):
        for call in (
            lambda m: keyspecs.generate_mac(spec, key, algorithm, m),
            lambda m: keyspecs.verify_mac(spec, key, algorithm, m, bytes(32)),
        ):
            with pytest.raises(InvalidInputError, match=f"is {len(wrong)} bytes; GenerateMac"):
                call(wrong)


@pytest.mark.parametrize("spec", HMAC_SPECS, ids=keyspecs.spec_name)
def test_a_mac_algorithm_of_another_spec_is_refused(spec: int) -> None:
    key = keyspecs.new_material(spec)
    (own,) = keyspecs.mac_algorithms(spec, MAC)
    for algorithm in ALL_MACS:
        if algorithm == own:
            continue
        with pytest.raises(InvalidKeyUsageError) as info:
            keyspecs.generate_mac(spec, key, algorithm, MESSAGE)
        assert str(info.value) == (
            f"key spec {keyspecs.spec_name(spec)} uses {keyspecs.mac_algorithm_name(own)}; "
            f"not {keyspecs.mac_algorithm_name(algorithm)}"
        )
        _assert_clean(info.value, key)
        with pytest.raises(InvalidKeyUsageError):
            keyspecs.verify_mac(spec, key, algorithm, MESSAGE, bytes(32))
    with pytest.raises(InvalidInputError, match="MAC algorithm"):
        keyspecs.generate_mac(spec, key, keys_pb2.MAC_ALGORITHM_UNSPECIFIED, MESSAGE)
    with pytest.raises(ValueError, match="bytes"):
        keyspecs.generate_mac(spec, key + bytes(HMAC_LONGEST[spec] - len(key) + 1), own, MESSAGE)


def test_only_hmac_specs_make_macs() -> None:
    for spec in (SYMMETRIC, RSA_SPECS[0], ECC_SPECS[0]):
        with pytest.raises(InvalidKeyUsageError, match="does not generate MACs"):
            keyspecs.generate_mac(spec, bytes(32), ALL_MACS[1], MESSAGE)
        with pytest.raises(InvalidKeyUsageError, match="does not verify MACs"):
            keyspecs.verify_mac(spec, bytes(32), ALL_MACS[1], MESSAGE, bytes(32))


# --- no secrets in errors --------------------------------------------------------------------


def test_no_error_message_shows_material_or_message(
    materials: dict[int, bytes], signers: dict[int, AsymmetricKey]
) -> None:
    rsa2048, p256 = materials[RSA_SPECS[0]], materials[ECC_SPECS[0]]
    hmac_key = keyspecs.new_material(HMAC_SPECS[1])
    long_message = b"\x5a\x17" * 2049
    calls: list[tuple[Callable[[], object], tuple[bytes, ...]]] = [
        (lambda: keyspecs.check_material(ECC_SPECS[1], p256), (p256,)),
        (lambda: keyspecs.check_material(RSA_SPECS[1], rsa2048), (rsa2048,)),
        (lambda: keyspecs.check_material(HMAC_SPECS[3], hmac_key), (hmac_key,)),
        (lambda: AsymmetricKey.load(RSA_SPECS[0], SIGN, rsa2048[:-3]), (rsa2048,)),
        (lambda: signers[RSA_SPECS[0]].sign(RSA_SIGNING[0], long_message, RAW), (long_message,)),
        (lambda: signers[ECC_SPECS[0]].sign(ALL_SIGNING[7], MESSAGE, RAW), (MESSAGE,)),
        (lambda: signers[ECC_SPECS[0]].sign(ALL_SIGNING[6], MESSAGE[:31], DIGEST), (MESSAGE,)),
        (lambda: keyspecs.generate_mac(HMAC_SPECS[1], hmac_key, ALL_MACS[0], MESSAGE), (hmac_key,)),
        (
            lambda: keyspecs.generate_mac(HMAC_SPECS[1], hmac_key, ALL_MACS[1], long_message),
            (hmac_key, long_message),
        ),
    ]
    for call, secrets in calls:
        with pytest.raises((InvalidInputError, ValueError)) as info:
            call()
        _assert_clean(info.value, *secrets)
        assert info.value.__cause__ is None


# --- golden vectors --------------------------------------------------------------------------


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "keyspec_vector_generator", VECTORS / "generate_keyspecs.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["keyspec_vector_generator"] = module
    spec.loader.exec_module(module)
    return module


def _committed() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((VECTORS / "keyspec_vectors.json").read_text("utf-8"))
    return result


def _deterministic(vectors: Any) -> Any:
    """`vectors` without what is randomized (every value under a key named `randomized`)."""
    if isinstance(vectors, dict):
        return {k: _deterministic(v) for k, v in vectors.items() if k != "randomized"}
    return vectors


def _shape(vectors: Any) -> Any:
    if isinstance(vectors, dict):
        return {k: _shape(v) for k, v in vectors.items()}
    return type(vectors).__name__


def test_regenerated_vectors_match_committed_bytes() -> None:
    regenerated, committed = _generator().build(), _committed()
    assert _deterministic(regenerated) == _deterministic(committed)
    assert _shape(regenerated) == _shape(committed)
    assert regenerated["rsa_2048"]["randomized"] != committed["rsa_2048"]["randomized"]


def test_committed_signatures_verify() -> None:
    committed = _committed()
    message = bytes.fromhex(committed["message"])
    for section, spec in (("rsa_2048", RSA_SPECS[0]), ("ecc_nist_p256", ECC_SPECS[0])):
        vector = committed[section]
        material = bytes.fromhex(vector["private_key_pkcs8"])
        key = AsymmetricKey.load(spec, SIGN, material)
        assert key.public_key_der().hex() == vector["public_key_der"]
        signatures = {**vector.get("signatures", {}), **vector["randomized"]["signatures"]}
        expected = keyspecs.signing_algorithms(spec, SIGN)
        assert sorted(signatures) == sorted(keyspecs.signing_algorithm_name(a) for a in expected)
        for name, signed in signatures.items():
            algorithm = keyspecs.signing_algorithm_from_name(name)
            digest = _digest(algorithm, message)
            for form in ("RAW", "DIGEST"):
                signature = bytes.fromhex(signed[form])
                _verify_outside(key, algorithm, message, signature)
                assert key.verify(algorithm, message, RAW, signature)
                assert key.verify(algorithm, digest, DIGEST, signature)
                assert not key.verify(algorithm, message, RAW, _flip_bit(signature, 9))
            if "PKCS1" in name:
                assert signed["RAW"] == signed["DIGEST"]
                assert key.sign(algorithm, message, RAW).hex() == signed["RAW"]
    scalar = int(committed["ecc_nist_p256"]["private_key_scalar"], 16)
    derived = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (
        derived.public_bytes(serialization.Encoding.DER, spki).hex()
        == (committed["ecc_nist_p256"]["public_key_der"])
    )


def test_committed_oaep_ciphertext_decrypts() -> None:
    vector = _committed()["rsa_2048"]
    material = bytes.fromhex(vector["private_key_pkcs8"])
    algorithm = keyspecs.encryption_algorithm_from_name(vector["oaep"]["algorithm"])
    assert algorithm == OAEP_256
    ciphertext = bytes.fromhex(vector["randomized"]["oaep_ciphertext"])
    plaintext = bytes.fromhex(vector["oaep"]["plaintext"])
    key = AsymmetricKey.load(RSA_SPECS[0], ENCRYPT, material)
    assert key.decrypt(algorithm, ciphertext) == plaintext
    private = serialization.load_der_private_key(material, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.decrypt(ciphertext, _oaep(OAEP_256)) == plaintext
    assert vector["oaep"]["max_plaintext_bytes"] == 190


def test_committed_macs_equal_pythons_hmac() -> None:
    committed = _committed()
    message = bytes.fromhex(committed["message"])
    assert sorted(committed["hmac"]) == ["HMAC_224", "HMAC_256", "HMAC_384", "HMAC_512"]
    for name, vector in committed["hmac"].items():
        spec = keyspecs.spec_from_name(name)
        key = bytes.fromhex(vector["key"])
        algorithm = keyspecs.mac_algorithm_from_name(vector["algorithm"])
        assert hmac.new(key, message, MAC_HASH[spec]).hexdigest() == vector["mac"]
        assert keyspecs.generate_mac(spec, key, algorithm, message).hex() == vector["mac"]
        assert keyspecs.verify_mac(spec, key, algorithm, message, bytes.fromhex(vector["mac"]))
