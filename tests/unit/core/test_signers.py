"""Tests for domain_core.signers: public keys, in-memory signers and passphrase file tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import stat
import time
from functools import cache
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.signers import (
    InMemorySigner,
    PublicKey,
    SignatureAlgorithm,
)
from domain_edge.file_tokens import (
    DEFAULT_SCRYPT_N,
    FileTokenSigner,
    create_file_token,
    load_file_token,
    read_file_token_public,
)

pytestmark = pytest.mark.unit

ALGORITHMS = list(SignatureAlgorithm)
PASSPHRASE = b"correct horse battery staple 7f3a9c"
FAST_N = 2**14


@cache
def signer_for(algorithm: SignatureAlgorithm) -> InMemorySigner:
    """One signer per algorithm for the whole module (hypothesis cannot use function fixtures)."""
    return InMemorySigner.generate(algorithm)


def spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def flip_bit(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index // 8] ^= 1 << (index % 8)
    return bytes(out)


# --- sign and verify -------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_then_verify(algorithm: SignatureAlgorithm) -> None:
    signer = InMemorySigner.generate(algorithm)
    signature = signer.sign(b"approve proposal 42")
    signer.public_key.verify(signature, b"approve proposal 42")
    assert signer.algorithm is algorithm
    assert signer.public_key.algorithm is algorithm


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signature_does_not_verify_under_another_key(algorithm: SignatureAlgorithm) -> None:
    signature = InMemorySigner.generate(algorithm).sign(b"m")
    other = InMemorySigner.generate(algorithm).public_key
    with pytest.raises(BadSignatureError, match=f"under key {other.key_id[:16]}"):
        other.verify(signature, b"m")


def test_signature_of_one_algorithm_fails_under_the_other() -> None:
    message = b"m"
    ed_sig = signer_for(SignatureAlgorithm.ED25519).sign(message)
    ec_sig = signer_for(SignatureAlgorithm.ECDSA_P256).sign(message)
    with pytest.raises(BadSignatureError):
        signer_for(SignatureAlgorithm.ECDSA_P256).public_key.verify(ed_sig, message)
    with pytest.raises(BadSignatureError):
        signer_for(SignatureAlgorithm.ED25519).public_key.verify(ec_sig, message)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=256), data=st.data())
def test_any_flipped_bit_in_signature_fails(
    algorithm: SignatureAlgorithm, message: bytes, data: st.DataObject
) -> None:
    signer = signer_for(algorithm)
    signature = signer.sign(message)
    index = data.draw(st.integers(0, len(signature) * 8 - 1))
    with pytest.raises(BadSignatureError):
        signer.public_key.verify(flip_bit(signature, index), message)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=50, deadline=None)
@given(message=st.binary(min_size=1, max_size=256), data=st.data())
def test_any_flipped_bit_in_message_fails(
    algorithm: SignatureAlgorithm, message: bytes, data: st.DataObject
) -> None:
    signer = signer_for(algorithm)
    signature = signer.sign(message)
    index = data.draw(st.integers(0, len(message) * 8 - 1))
    with pytest.raises(BadSignatureError):
        signer.public_key.verify(signature, flip_bit(message, index))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=50, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_signature_is_bad_signature_never_another_error(
    algorithm: SignatureAlgorithm, garbage: bytes
) -> None:
    with pytest.raises(BadSignatureError):
        signer_for(algorithm).public_key.verify(garbage, b"message")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_signature_truncated_or_extended_fails(algorithm: SignatureAlgorithm) -> None:
    signer = signer_for(algorithm)
    signature = signer.sign(b"m")
    for bad in (b"", signature[:-1], signature + b"\x00", signature * 2):
        with pytest.raises(BadSignatureError):
            signer.public_key.verify(bad, b"m")


def test_verify_rejects_non_bytes_as_programming_error() -> None:
    key = signer_for(SignatureAlgorithm.ED25519).public_key
    with pytest.raises(TypeError):
        key.verify("signature", b"m")  # type: ignore[arg-type]


def test_ecdsa_signature_is_der_over_sha256_like_a_pkcs11_token() -> None:
    """A token hashes on the host, signs the digest (CKM_ECDSA) and returns r||s; we DER it."""
    private = ec.generate_private_key(ec.SECP256R1())
    key = PublicKey(SignatureAlgorithm.ECDSA_P256, spki(private.public_key()))
    message = b"proposal bytes"
    digest = hashlib.sha256(message).digest()
    der = private.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # what the token returns
    rebuilt = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(rebuilt, message)
    # and our own ECDSA signatures verify with plain cryptography ECDSA-SHA256
    signer = InMemorySigner(private)
    private.public_key().verify(signer.sign(message), message, ec.ECDSA(hashes.SHA256()))
    # the raw r||s form is not accepted: signatures are DER
    with pytest.raises(BadSignatureError):
        key.verify(raw, message)


def test_ed25519_signatures_agree_between_pynacl_and_cryptography() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    signer = InMemorySigner(private)
    message = b"sealed state"
    assert signer.sign(message) == private.sign(message)  # Ed25519 is deterministic
    private.public_key().verify(signer.sign(message), message)
    raw_seed = private.private_bytes_raw()
    nacl_sig = nacl.signing.SigningKey(raw_seed).sign(message).signature
    signer.public_key.verify(nacl_sig, message)


def test_ecdsa_signing_is_deterministic_for_golden_vectors() -> None:
    signer = signer_for(SignatureAlgorithm.ECDSA_P256)
    assert signer.sign(b"x") == signer.sign(b"x")


# --- public keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_key_id_is_sha256_of_spki_and_stable(algorithm: SignatureAlgorithm) -> None:
    key = signer_for(algorithm).public_key
    assert key.key_id == hashlib.sha256(key.spki_der).hexdigest()
    assert len(key.key_id) == 64
    assert key.key_id == key.key_id.lower()
    again = PublicKey.from_pem(key.to_pem())
    assert again == key
    assert again.key_id == key.key_id
    assert PublicKey.from_der(key.spki_der) == key
    assert hash(again) == hash(key)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_to_pem_is_standard_spki_pem(algorithm: SignatureAlgorithm) -> None:
    key = signer_for(algorithm).public_key
    loaded = serialization.load_pem_public_key(key.to_pem())
    assert spki(loaded) == key.spki_der


def test_algorithm_mismatching_der_is_rejected() -> None:
    ed_der = signer_for(SignatureAlgorithm.ED25519).public_key.spki_der
    ec_der = signer_for(SignatureAlgorithm.ECDSA_P256).public_key.spki_der
    with pytest.raises(MalformedMessageError):
        PublicKey(SignatureAlgorithm.ECDSA_P256, ed_der)
    with pytest.raises(MalformedMessageError):
        PublicKey(SignatureAlgorithm.ED25519, ec_der)


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x30\x03\x02\x01\x01", id="not-spki"),
        pytest.param(os.urandom(44), id="random"),
        pytest.param(spki(ec.generate_private_key(ec.SECP384R1()).public_key()), id="p384"),
        pytest.param(spki(ed25519.Ed25519PrivateKey.generate().public_key()) + b"\x00", id="trail"),
        pytest.param(
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )[:-1],
            id="truncated",
        ),
    ],
)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_malformed_spki_is_rejected(algorithm: SignatureAlgorithm, der: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        PublicKey(algorithm, der)


def test_rsa_key_is_rejected() -> None:
    der = spki(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    with pytest.raises(MalformedMessageError):
        PublicKey.from_der(der)
    with pytest.raises(MalformedMessageError):
        PublicKey(SignatureAlgorithm.ECDSA_P256, der)


def test_compressed_ec_point_is_rejected_so_key_ids_are_unique() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    compressed = private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    # SPKI header for id-ecPublicKey / prime256v1 with a 33-byte compressed point.
    header = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
    der = header + compressed
    assert serialization.load_der_public_key(der) == private.public_key()  # valid DER...
    with pytest.raises(MalformedMessageError, match="canonical"):
        PublicKey(SignatureAlgorithm.ECDSA_P256, der)  # ...but not canonical


def test_algorithm_given_as_string_is_accepted_only_if_known() -> None:
    der = signer_for(SignatureAlgorithm.ED25519).public_key.spki_der
    key = PublicKey("ed25519", der)  # type: ignore[arg-type]
    assert key.algorithm is SignatureAlgorithm.ED25519
    with pytest.raises(MalformedMessageError, match="unknown signature algorithm"):
        PublicKey("rsa", der)  # type: ignore[arg-type]


def test_raw_ed25519() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    key = InMemorySigner(private).public_key
    assert key.raw_ed25519() == private.public_key().public_bytes_raw()
    assert len(key.raw_ed25519()) == 32
    with pytest.raises(ValueError, match="ed25519"):
        signer_for(SignatureAlgorithm.ECDSA_P256).public_key.raw_ed25519()


def test_public_key_pickles_and_still_verifies() -> None:
    signer = signer_for(SignatureAlgorithm.ED25519)
    key = pickle.loads(pickle.dumps(signer.public_key))  # noqa: S301 (our own bytes)
    assert key == signer.public_key
    key.verify(signer.sign(b"m"), b"m")


def test_public_key_repr_is_short_and_has_no_verifier() -> None:
    text = repr(signer_for(SignatureAlgorithm.ED25519).public_key)
    assert "VerifyKey" not in text


def test_from_pem_rejects_garbage() -> None:
    with pytest.raises(MalformedMessageError):
        PublicKey.from_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# --- in-memory signers -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pkcs8_roundtrip(algorithm: SignatureAlgorithm) -> None:
    signer = InMemorySigner.generate(algorithm)
    for data in (signer.private_pkcs8_der(), signer.private_pkcs8_pem()):
        again = InMemorySigner.from_pkcs8(data)
        assert again.public_key == signer.public_key
        signer.public_key.verify(again.sign(b"m"), b"m")


def test_from_pkcs8_rejects_garbage_without_echoing_it() -> None:
    with pytest.raises(MalformedMessageError) as info:
        InMemorySigner.from_pkcs8(b"SECRETSECRET")
    assert "SECRETSECRET" not in str(info.value)


def test_signer_refuses_other_curves() -> None:
    with pytest.raises(ValueError, match="P-256"):
        InMemorySigner(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(TypeError):
        InMemorySigner(rsa.generate_private_key(public_exponent=65537, key_size=2048))  # type: ignore[arg-type]


def test_signer_repr_holds_no_secret() -> None:
    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    secret_hex = signer.private_pkcs8_der()[-32:].hex()
    assert secret_hex not in repr(signer)
    assert signer.key_id[:16] in repr(signer)


# --- file tokens -----------------------------------------------------------------------------


def make_token(tmp_path: Path, algorithm: SignatureAlgorithm = SignatureAlgorithm.ED25519) -> Path:
    path = tmp_path / "operator.token"
    create_file_token(path, algorithm, PASSPHRASE, name="alice", scrypt_n=FAST_N)
    return path


def read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_bytes())
    return document


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document))


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def assert_no_secret(text: str) -> None:
    assert PASSPHRASE.decode() not in text
    assert base64.b64encode(PASSPHRASE).decode() not in text


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_file_token_roundtrip(tmp_path: Path, algorithm: SignatureAlgorithm) -> None:
    path = tmp_path / "t.token"
    public = create_file_token(path, algorithm, PASSPHRASE, name="alice", scrypt_n=FAST_N)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    signer = load_file_token(path, PASSPHRASE)
    assert isinstance(signer, FileTokenSigner)
    assert signer.name == "alice"
    assert signer.public_key == public
    public.verify(signer.sign(b"approve"), b"approve")
    assert read_file_token_public(path) == ("alice", public)


def test_file_token_format(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    assert document["format"] == "hsm-domain-file-token"
    assert document["version"] == 1
    assert document["name"] == "alice"
    assert document["algorithm"] == "ed25519"
    kdf = document["kdf"]
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", FAST_N, 8, 1)
    assert len(base64.b64decode(kdf["salt"])) == 16
    assert len(base64.b64decode(document["nonce"])) == 12
    # the ciphertext is AES-256-GCM of the PKCS#8 key with the header as associated data
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    key = Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=FAST_N, r=8, p=1).derive(
        PASSPHRASE
    )
    pkcs8 = AESGCM(key).decrypt(
        base64.b64decode(document["nonce"]),
        base64.b64decode(document["ciphertext"]),
        canonical(header),
    )
    assert InMemorySigner.from_pkcs8(pkcs8).public_key == PublicKey.from_der(
        base64.b64decode(document["public_key"])
    )


def test_passphrase_never_in_file(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    data = path.read_bytes()
    assert PASSPHRASE not in data
    assert base64.b64encode(PASSPHRASE) not in data


def test_passphrase_callback_is_called_once_and_after_the_file_checks(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    calls: list[int] = []

    def ask() -> bytes:
        calls.append(1)
        return PASSPHRASE

    assert load_file_token(path, ask).name == "alice"
    assert calls == [1]
    path.write_text("{not json")
    with pytest.raises(TokenError):
        load_file_token(path, ask)
    assert calls == [1]


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    with pytest.raises(WrongPassphraseError, match="does not open token") as info:
        load_file_token(path, b"wrong " + PASSPHRASE)
    assert_no_secret(str(info.value))
    assert_no_secret(repr(info.value))
    assert str(path) in str(info.value)


def test_missing_token(tmp_path: Path) -> None:
    with pytest.raises(TokenNotFoundError):
        load_file_token(tmp_path / "absent.token", PASSPHRASE)
    with pytest.raises(TokenNotFoundError):
        read_file_token_public(tmp_path / "absent.token")


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    before = path.read_bytes()
    with pytest.raises(AlreadyExistsError):
        create_file_token(path, SignatureAlgorithm.ED25519, PASSPHRASE, name="bob", scrypt_n=FAST_N)
    assert path.read_bytes() == before


def test_new_tokens_cost_at_least_2_17_by_default(tmp_path: Path) -> None:
    path = tmp_path / "default.token"
    public = create_file_token(path, SignatureAlgorithm.ED25519, PASSPHRASE, name="alice")
    assert DEFAULT_SCRYPT_N >= 2**17
    assert read_json(path)["kdf"]["n"] == DEFAULT_SCRYPT_N
    assert load_file_token(path, PASSPHRASE).public_key == public


def test_a_token_made_with_an_older_cost_keeps_opening(tmp_path: Path) -> None:
    path = tmp_path / "old.token"
    public = create_file_token(
        path, SignatureAlgorithm.ED25519, PASSPHRASE, name="alice", scrypt_n=2**15
    )
    assert read_json(path)["kdf"]["n"] == 2**15
    assert load_file_token(path, PASSPHRASE).public_key == public


@pytest.mark.parametrize("n", [2**13, 2**21, 3 * 2**14, 0])
def test_create_refuses_bad_scrypt_n(tmp_path: Path, n: int) -> None:
    with pytest.raises(ValueError, match="scrypt_n"):
        create_file_token(
            tmp_path / "t", SignatureAlgorithm.ED25519, PASSPHRASE, name="a", scrypt_n=n
        )
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("name", ["", "x" * 129, "bad\nname", "esc\x1b[31m"])
def test_create_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInputError):
        create_file_token(tmp_path / "t", SignatureAlgorithm.ED25519, PASSPHRASE, name=name)


def test_create_refuses_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        create_file_token(tmp_path / "t", SignatureAlgorithm.ED25519, b"", name="a")


def test_swapped_public_key_is_detected(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    other = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    document["public_key"] = base64.b64encode(other.spki_der).decode()
    write_json(path, document)
    with pytest.raises(TokenError) as info:
        load_file_token(path, PASSPHRASE)
    assert_no_secret(str(info.value))


def test_swapped_algorithm_and_key_is_detected(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    other = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256).public_key
    document["public_key"] = base64.b64encode(other.spki_der).decode()
    document["algorithm"] = "ecdsa-p256"
    write_json(path, document)
    with pytest.raises(TokenError):
        load_file_token(path, PASSPHRASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "mallory"),
        ("nonce", base64.b64encode(b"\x00" * 12).decode()),
        ("kdf", "n=2**15"),
    ],
)
def test_edited_header_is_detected(tmp_path: Path, field: str, value: str) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    if field == "kdf":
        document["kdf"]["n"] = 2**15  # a valid, different parameter: caught by the AEAD
    else:
        document[field] = value
    write_json(path, document)
    with pytest.raises(TokenError):
        load_file_token(path, PASSPHRASE)


def test_flipped_ciphertext_bit_is_detected(tmp_path: Path) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    ciphertext = base64.b64decode(document["ciphertext"])
    document["ciphertext"] = base64.b64encode(flip_bit(ciphertext, 7)).decode()
    write_json(path, document)
    with pytest.raises(TokenError):
        load_file_token(path, PASSPHRASE)


def test_private_key_not_matching_header_key_is_detected(tmp_path: Path) -> None:
    """Even a file whose AEAD opens is refused if its private key is not the header's key."""
    path = tmp_path / "forged.token"
    claimed = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    actual = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {
        "format": "hsm-domain-file-token",
        "version": 1,
        "name": "alice",
        "algorithm": "ed25519",
        "public_key": base64.b64encode(claimed.spki_der).decode(),
        "kdf": {
            "name": "scrypt",
            "n": FAST_N,
            "r": 8,
            "p": 1,
            "salt": base64.b64encode(salt).decode(),
        },
        "nonce": base64.b64encode(nonce).decode(),
    }
    key = Scrypt(salt=salt, length=32, n=FAST_N, r=8, p=1).derive(PASSPHRASE)
    ciphertext = AESGCM(key).encrypt(nonce, actual.private_pkcs8_der(), canonical(header))
    write_json(path, dict(header, ciphertext=base64.b64encode(ciphertext).decode()))
    with pytest.raises(TokenError, match="does not match its public key"):
        load_file_token(path, PASSPHRASE)


@pytest.mark.parametrize(
    ("kdf_edit", "reason"),
    [
        ({"n": 2**30}, "n"),
        ({"n": 2**21}, "n"),
        ({"n": 2**13}, "n"),
        ({"n": 3 * 2**14}, "n"),
        ({"n": 32768.0}, "n"),
        ({"n": True}, "n"),
        ({"r": 1024}, "r and p"),
        ({"p": 64}, "r and p"),
        ({"name": "pbkdf2"}, "scrypt"),
        ({"extra": 1}, "exactly"),
    ],
)
def test_hostile_kdf_parameters_are_refused_quickly(
    tmp_path: Path, kdf_edit: dict[str, object], reason: str
) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    document["kdf"].update(kdf_edit)
    write_json(path, document)
    start = time.monotonic()
    with pytest.raises(TokenError, match=reason):
        load_file_token(path, PASSPHRASE)
    with pytest.raises(TokenError):
        read_file_token_public(path)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.pop("nonce"), "missing"),
        (lambda d: d.update(extra="x"), "unexpected"),
        (lambda d: d.update(algorithm="rsa"), "algorithm"),
        (lambda d: d.update(public_key="!!notbase64"), "base64"),
        (lambda d: d.update(public_key=base64.b64encode(b"junk").decode()), "public_key"),
        (lambda d: d.update(nonce=base64.b64encode(b"short").decode()), "nonce"),
        (lambda d: d.update(ciphertext=""), "ciphertext"),
        (lambda d: d.update(name=42), "name"),
    ],
)
def test_malformed_token_files_are_token_errors(tmp_path: Path, edit: Any, reason: str) -> None:
    path = make_token(tmp_path)
    document = read_json(path)
    edit(document)
    write_json(path, document)
    with pytest.raises(TokenError, match=reason) as info:
        load_file_token(path, PASSPHRASE)
    assert not isinstance(info.value, WrongPassphraseError)
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b"\xff\xfe", b"{" * 10 + b"}", b" " * (65 * 1024)]
)
def test_garbage_token_files_are_token_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "t.token"
    path.write_bytes(content)
    with pytest.raises(TokenError):
        load_file_token(path, PASSPHRASE)


def test_token_path_that_is_a_directory_is_a_token_error(tmp_path: Path) -> None:
    with pytest.raises(TokenError):
        load_file_token(tmp_path, PASSPHRASE)


def test_file_token_signer_repr_has_no_secret(tmp_path: Path) -> None:
    signer = load_file_token(make_token(tmp_path), PASSPHRASE)
    assert "alice" in repr(signer)
    assert_no_secret(repr(signer))
