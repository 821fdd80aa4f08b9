"""Key specs beyond symmetric encryption, through real HSA processes (issue 19, item 1).

Everything the domain answers is checked outside its own code: signatures with `cryptography`
and with the `openssl` command against GetPublicKey's DER, RSA-OAEP ciphertexts made with
`cryptography` from that public key decrypted by the domain, data key pairs whose private and
public halves belong together. A key made through one HSA is used through the other (its
material travels only in its key token), and a key of one kind never serves another kind's
operation.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from support.cluster import LocalCluster

from domain_core.errors import (
    InvalidCiphertextError,
    InvalidInputError,
    InvalidKeyUsageError,
    PermissionDeniedError,
    UnsupportedOperationError,
)
from domain_edge.kms_client import KeyClient

pytestmark = pytest.mark.cluster

_HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("keyspecs") / "domain", nodes=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


def _client(domain: LocalCluster, host: str) -> KeyClient:
    tls = domain.client_tls()
    return KeyClient(
        [domain.address(host)],
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=20,
    )


@pytest.fixture(scope="module")
def one(domain: LocalCluster) -> Iterator[KeyClient]:
    with _client(domain, "hsa-1") as client:
        yield client


@pytest.fixture(scope="module")
def two(domain: LocalCluster) -> Iterator[KeyClient]:
    with _client(domain, "hsa-2") as client:
        yield client


def _verify_with_cryptography(
    public_der: bytes, algorithm: str, message: bytes, sig: bytes
) -> None:
    public = serialization.load_der_public_key(public_der)
    hash_ = _HASHES[algorithm[-3:]]
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(sig, message, ec.ECDSA(hash_))
    elif algorithm.startswith("RSASSA_PSS"):
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, message, padding.PSS(padding.MGF1(hash_), hash_.digest_size), hash_)
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(sig, message, padding.PKCS1v15(), hash_)


def _verify_with_openssl(
    tmp_path: Path, public_der: bytes, algorithm: str, message: bytes, sig: bytes
) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed"
    (tmp_path / "pub.der").write_bytes(public_der)
    (tmp_path / "msg.bin").write_bytes(message)
    (tmp_path / "sig.bin").write_bytes(sig)
    digest = f"-sha{algorithm[-3:]}"
    options: list[str] = []
    if algorithm.startswith("RSASSA_PSS"):
        options = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
    return subprocess.run(
        [
            openssl,
            "dgst",
            digest,
            "-keyform",
            "DER",
            "-verify",
            str(tmp_path / "pub.der"),
            *options,
            "-signature",
            str(tmp_path / "sig.bin"),
            str(tmp_path / "msg.bin"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("key_spec", "algorithms"),
    [
        ("ECC_NIST_P256", ["ECDSA_SHA_256"]),
        ("ECC_NIST_P384", ["ECDSA_SHA_384"]),
        ("ECC_NIST_P521", ["ECDSA_SHA_512"]),
        (
            "RSA_2048",
            [
                "RSASSA_PSS_SHA_256",
                "RSASSA_PSS_SHA_384",
                "RSASSA_PSS_SHA_512",
                "RSASSA_PKCS1_V1_5_SHA_256",
                "RSASSA_PKCS1_V1_5_SHA_384",
                "RSASSA_PKCS1_V1_5_SHA_512",
            ],
        ),
        ("RSA_3072", ["RSASSA_PSS_SHA_256"]),
        ("RSA_4096", ["RSASSA_PKCS1_V1_5_SHA_512"]),
    ],
)
def test_signatures_verify_outside_the_domain(
    one: KeyClient, two: KeyClient, tmp_path: Path, key_spec: str, algorithms: list[str]
) -> None:
    key = one.create_key(description=key_spec, key_spec=key_spec, key_usage="SIGN_VERIFY")
    assert (key.key_spec, key.key_usage) == (key_spec, "SIGN_VERIFY")
    public = two.get_public_key(key.key_id)
    assert (public.key_spec, public.key_usage) == (key_spec, "SIGN_VERIFY")
    assert set(algorithms) <= set(public.signing_algorithms)
    assert public.encryption_algorithms == ()
    message = f"a message for {key_spec}".encode()
    for algorithm in algorithms:
        signature = two.sign(key.key_id, message, algorithm)
        _verify_with_cryptography(public.public_key, algorithm, message, signature)
        result = _verify_with_openssl(tmp_path, public.public_key, algorithm, message, signature)
        assert result.returncode == 0, result.stderr
        assert "Verified OK" in result.stdout
        assert one.verify(key.key_id, message, signature, algorithm)
        # A DIGEST is signed as the digest of the message: the same signature checks.
        digest = hashlib.new(f"sha{algorithm[-3:]}", message).digest()
        by_digest = one.sign(key.key_id, digest, algorithm, digest=True)
        _verify_with_cryptography(public.public_key, algorithm, message, by_digest)
        assert two.verify(key.key_id, digest, signature, algorithm, digest=True)
        # A changed message or signature is "not valid", an answer and not an error.
        assert not one.verify(key.key_id, message + b"!", signature, algorithm)
        tampered = bytearray(signature)
        tampered[len(tampered) // 2] ^= 1
        assert not one.verify(key.key_id, message, bytes(tampered), algorithm)
        with pytest.raises(InvalidSignature):
            _verify_with_cryptography(public.public_key, algorithm, message, bytes(tampered))
    other = "RSASSA_PSS_SHA_256" if key_spec.startswith("ECC") else "ECDSA_SHA_256"
    with pytest.raises(InvalidKeyUsageError, match=r"ECDSA|RSASSA"):
        one.sign(key.key_id, message, other)
    with pytest.raises(InvalidInputError, match="digest"):
        one.sign(key.key_id, b"short", algorithms[0], digest=True)


def test_rsa_oaep_ciphertexts_of_cryptography_decrypt_in_the_domain(
    one: KeyClient, two: KeyClient
) -> None:
    key = one.create_key(key_spec="RSA_2048", key_usage="ENCRYPT_DECRYPT")
    public = two.get_public_key(key.key_id)
    assert set(public.encryption_algorithms) == {"RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"}
    assert public.signing_algorithms == ()
    rsa_public = serialization.load_der_public_key(public.public_key)
    assert isinstance(rsa_public, rsa.RSAPublicKey)
    assert rsa_public.key_size == 2048
    for name, hash_, limit in (
        ("RSAES_OAEP_SHA_256", hashes.SHA256(), 190),
        ("RSAES_OAEP_SHA_1", hashes.SHA1(), 214),  # noqa: S303 (OAEP's hash, as AWS offers)
    ):
        plaintext = bytes(range(256))[:limit]
        outside = rsa_public.encrypt(plaintext, padding.OAEP(padding.MGF1(hash_), hash_, None))
        assert two.decrypt(outside, key_id=key.key_id, encryption_algorithm=name) == plaintext
        inside = one.encrypt(key.key_id, b"from the domain", encryption_algorithm=name)
        assert len(inside) == 256
        assert two.decrypt(inside, key_id=key.key_id, encryption_algorithm=name) == (
            b"from the domain"
        )
        with pytest.raises(InvalidInputError, match=str(limit)):
            one.encrypt(key.key_id, plaintext + b"x", encryption_algorithm=name)
        tampered = bytearray(outside)
        tampered[5] ^= 1
        with pytest.raises(InvalidCiphertextError):
            one.decrypt(bytes(tampered), key_id=key.key_id, encryption_algorithm=name)
    # Without its algorithm an RSA key refuses symmetric use; an RSA blob takes no context.
    with pytest.raises(InvalidKeyUsageError, match="RSA_2048"):
        one.encrypt(key.key_id, b"x")
    with pytest.raises(InvalidInputError, match="context"):
        one.encrypt(key.key_id, b"x", {"a": "b"}, encryption_algorithm="RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidInputError, match="key_id"):
        one.decrypt(b"\x00" * 256, encryption_algorithm="RSAES_OAEP_SHA_256")
    with pytest.raises(InvalidKeyUsageError):
        one.sign(key.key_id, b"m", "RSASSA_PSS_SHA_256")


@pytest.mark.parametrize(
    ("key_spec", "algorithm", "digest"),
    [
        ("HMAC_224", "HMAC_SHA_224", hashlib.sha224),
        ("HMAC_256", "HMAC_SHA_256", hashlib.sha256),
        ("HMAC_384", "HMAC_SHA_384", hashlib.sha384),
        ("HMAC_512", "HMAC_SHA_512", hashlib.sha512),
    ],
)
def test_macs_across_hsas(
    one: KeyClient,
    two: KeyClient,
    key_spec: str,
    algorithm: str,
    digest: Callable[[], object],
) -> None:
    key = one.create_key(key_spec=key_spec, key_usage="GENERATE_VERIFY_MAC")
    message = b"authenticate me"
    mac = one.generate_mac(key.key_id, message, algorithm)
    assert len(mac) == digest().digest_size  # type: ignore[attr-defined]
    assert two.generate_mac(key.key_id, message, algorithm) == mac  # deterministic, one key
    assert two.verify_mac(key.key_id, message, mac, algorithm)
    assert not two.verify_mac(key.key_id, message + b".", mac, algorithm)
    assert not one.verify_mac(key.key_id, message, mac[:-1] + bytes([mac[-1] ^ 1]), algorithm)
    wrong = "HMAC_SHA_512" if algorithm != "HMAC_SHA_512" else "HMAC_SHA_256"
    with pytest.raises(InvalidKeyUsageError):
        one.generate_mac(key.key_id, message, wrong)
    # The HMAC key is no AES key, and a symmetric key makes no MACs.
    with pytest.raises(InvalidKeyUsageError, match=key_spec):
        one.encrypt(key.key_id, b"x")
    with pytest.raises(InvalidKeyUsageError):
        one.generate_data_key(key.key_id)


def test_a_symmetric_key_signs_nothing_and_makes_no_macs(one: KeyClient) -> None:
    key = one.create_key()
    assert (key.key_spec, key.key_usage) == ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    with pytest.raises(InvalidKeyUsageError, match="SYMMETRIC_DEFAULT"):
        one.sign(key.key_id, b"m", "ECDSA_SHA_256")
    with pytest.raises(InvalidKeyUsageError):
        one.generate_mac(key.key_id, b"m", "HMAC_SHA_256")
    with pytest.raises(InvalidKeyUsageError):
        one.get_public_key(key.key_id)
    with pytest.raises(InvalidKeyUsageError):
        one.encrypt(key.key_id, b"m", encryption_algorithm="RSAES_OAEP_SHA_256")


def test_data_key_pairs(one: KeyClient, two: KeyClient) -> None:
    key = one.create_key()
    context = {"purpose": "pairs"}
    for spec in ("ECC_NIST_P256", "RSA_2048"):
        pair = one.generate_data_key_pair(key.key_id, spec, context)
        assert pair.key_pair_spec == spec
        private = serialization.load_der_private_key(pair.private_key, None)
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert public_der == pair.public_key
        assert two.decrypt(pair.private_key_blob, context) == pair.private_key
        with pytest.raises(InvalidCiphertextError):
            two.decrypt(pair.private_key_blob, {"purpose": "other"})
    bare = two.generate_data_key_pair_without_plaintext(key.key_id, "ECC_NIST_P384", context)
    assert bare.private_key == b""
    private = serialization.load_der_private_key(one.decrypt(bare.private_key_blob, context), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    with pytest.raises(InvalidInputError, match="key_pair_spec"):
        one.generate_data_key_pair(key.key_id, "HMAC_256")
    signing = one.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY")
    with pytest.raises(InvalidKeyUsageError):
        one.generate_data_key_pair(signing.key_id, "ECC_NIST_P256")


def test_creation_and_rotation_rules(one: KeyClient, domain: LocalCluster) -> None:
    with pytest.raises(InvalidInputError, match="usage"):
        one.create_key(key_spec="ECC_NIST_P256", key_usage="ENCRYPT_DECRYPT")
    with pytest.raises(InvalidInputError, match="usage"):
        one.create_key(key_spec="HMAC_256", key_usage="SIGN_VERIFY")
    with pytest.raises(InvalidInputError):
        one.create_key(key_spec="RSA_1024", key_usage="SIGN_VERIFY")
    with pytest.raises(UnsupportedOperationError, match="rotation"):
        one.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC", enable_rotation=True)
    signing = one.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY")
    with pytest.raises(UnsupportedOperationError, match="rotate"):
        one.rotate_key(signing.key_id)
    # A disabled signing key signs nothing; the policy decides before anything else.
    one.disable_key(signing.key_id)
    with pytest.raises(Exception, match="disabled"):
        one.sign(signing.key_id, b"m", "ECDSA_SHA_256")
    one.enable_key(signing.key_id)
    one.put_key_policy(
        signing.key_id,
        {"grants": [{"principals": ["spiffe://local/client/demo-app"], "operations": ["admin"]}]},
    )
    with pytest.raises(PermissionDeniedError, match="sign"):
        one.sign(signing.key_id, b"m", "ECDSA_SHA_256")
    with pytest.raises(PermissionDeniedError, match="public key"):
        one.get_public_key(signing.key_id)


def test_the_audit_names_the_algorithm_and_never_the_message(
    one: KeyClient, domain: LocalCluster
) -> None:
    key = one.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC")
    secret_message = b"do-not-audit-this-message-4711"
    mac = one.generate_mac(key.key_id, secret_message, "HMAC_SHA_256")
    one.verify_mac(key.key_id, secret_message, mac, "HMAC_SHA_256")
    path = domain.layout.node_dir("hsa-1") / "data" / "audit.log"
    text = path.read_text()
    assert secret_message.decode() not in text
    assert mac.hex() not in text
    records = [json.loads(line) for line in text.splitlines() if line]
    mine = [r for r in records if r.get("key_id") == key.key_id]
    operations = [(r["operation"], r["result"], r["detail"]) for r in mine]
    assert ("GenerateMac", "ok", "HMAC_SHA_256") in operations
    assert ("VerifyMac", "ok", "HMAC_SHA_256: valid") in operations


def test_a_blob_naming_an_hmac_or_signing_key_never_uses_its_material_as_an_aes_key(
    one: KeyClient,
) -> None:
    """An adversary writes a ciphertext header naming a MAC key (whose 32 bytes would make an
    AES-256 key) or a signing key: Decrypt and ReEncrypt refuse the key's kind before any
    material is touched, whatever the blob holds."""
    from domain_core import ciphertext

    mac_key = one.create_key(key_spec="HMAC_256", key_usage="GENERATE_VERIFY_MAC")
    signing = one.create_key(key_spec="ECC_NIST_P256", key_usage="SIGN_VERIFY")
    symmetric = one.create_key()
    for target in (mac_key, signing):
        forged = ciphertext.encrypt(bytes(32), target.key_id, 1, b"guess", {})
        with pytest.raises(InvalidKeyUsageError, match=target.key_spec):
            one.decrypt(forged)
        with pytest.raises(InvalidKeyUsageError, match=target.key_spec):
            one.re_encrypt(forged, symmetric.key_id)
        blob = one.encrypt(symmetric.key_id, b"secret")
        with pytest.raises(InvalidKeyUsageError, match=target.key_spec):
            one.re_encrypt(blob, target.key_id)
        with pytest.raises(InvalidKeyUsageError, match=target.key_spec):
            one.generate_data_key(target.key_id)
