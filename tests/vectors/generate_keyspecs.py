"""Generate the golden vectors of the key specs: fixed keys, their public keys, signatures, MACs
and an RSA-OAEP ciphertext, made by `domain_core.keyspecs`.

Run `python tests/vectors/generate_keyspecs.py` to rewrite tests/vectors/keyspec_vectors.json.
The unit tests regenerate the vectors in memory and compare them byte for byte, except what is
randomized (RSASSA-PSS and ECDSA signatures, the RSA-OAEP ciphertext: under a `randomized` key),
which they check by verifying or decrypting the committed bytes. Rerunning this script makes new
randomized values. Every key here is fixed and public: never use one anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from domain_core import keyspecs
from domain_proto import keys_pb2

OUT = Path(__file__).with_name("keyspec_vectors.json")

MESSAGE = b"hsm-domain key spec vector: a message to sign and to MAC"
OAEP_PLAINTEXT = b"hsm-domain RSAES_OAEP_SHA_256 vector plaintext"
P256_SCALAR = 0x351A18F3EEFE54DC0796FC55BB13A415F90EFE9CF2BDAD69696FCCF9DF9545A
# An RSA-2048 key made once by keyspecs.new_material (unencrypted PKCS#8 DER).
RSA_2048_PKCS8 = bytes.fromhex(
    "308204bd020100300d06092a864886f70d0101010500048204a7308204a30201000282010100d23a6e374328"
    "41b65ffeb86e9726aea4de7712f7d52944e0dfffd6cff5ab86f3ef49f173ac02a99488fd6fd5f9b6d359d9c4"
    "353836ab687ec3ac4fdf173df317e7db02f4d6fa62cf8e06c7234700bf6b5f87689c8e95d09aeab07f698477"
    "407141aad50ea7e23ca84573dcdd8684beda0a7233f2ecad1e21da5396dff82ec3306d204ce6a877a6c0c08d"
    "fb7683904c46cd70ad1945fb7c593f55e343edd5b48b48e94844756a1a8d47f4904d57b88c0fa6946847b64f"
    "ea58fc8c5f5a96376bd30479fda247373d32c0fdd1699395510b688996851cb647b1c946705593b6564b1da4"
    "292403ba3e24b0362ca5523f38afcbb877c7c128a38222ac89de77fa652f0203010001028201000507e6eea5"
    "9f1cab7647f736964c13ae8305b5cb7e80baa83da9615a4aabc1d2abed9e11ec3cdd6808e5dfbb997a8ee63d"
    "e2dc79d83d13dc176753e5fd2810b2dd6be2a48f51cb498cec3699c3da386523bd197b72f76782e838df0e5c"
    "602a324ba5ab41958796ccaebf78ba9dbc7c2b659d4406fd33a0b3f8b09012135e087260ca339c2c9cdeaf5b"
    "42e8b9b071f93c0d2950f535586c59308f1eedf1697410f753e213cad3259cae5548ae7dfa56fd5d17b7ffd4"
    "8bc51fdbc116e37d144fe4ec967ebdca77a602f40e41d32ff66e004013af2d73c2b3e9126ef5041de94f66af"
    "3b6ef0b58fae9b2e5116eb012730ef0036a9d5c2960b55b6d5eae3dbe98e9902818100ea899c97052bc69346"
    "9bd02b689d41f28a6550a7d6d1eac462f85863a3fe28ef942800305efc5a6fa771dbf578194323a5fd0cfebd"
    "ed8d5f8475c8bad57d867fddb91f6ebd2b211bea5874d40aa41935b5441f4a90e5c9920ed7a8ff24d7902e18"
    "c990c7d4a30bc7ccb8d82868c366df9c3493b35b27aa4738c0b5b534a6d40302818100e577566b2210a0f86f"
    "66c5b87f10953bfc167ee86f2b0887ed20a1d3a9f97942073608be5a65a05e4677a82334a36ce18ac79a7978"
    "3462cd78962138a6965ec8c30f5401d422fe1ea99d462623340a2eb3e16b12ac6f6c961197d6e30a77d54b6f"
    "b23fc1cb74c14432f0509c05e8845b2dfdfac1071705c8adcdbaf389b8406502818100805a9341eae88c2229"
    "70383aa963f6a55fac16b9e3ccb9e8842959661e6787cba58f469b324074d5ca137bc718d4ea7365f1d8dcc8"
    "e06a902d93b028df9174bc2181a07c2036ac45f4b838279b333740b754f2b3021d5f74f97e78d4393b678272"
    "ba4cebafa9135762e87e138f51f0c8cb59d2c3434dafd88e6c9884f4ada03502818067d5d0ad3a04fc526f56"
    "ba31fa8dae7a2e609f9cde7142b2ff82bcb7e33a98bc6036fb4de7ea04dfa453912a1d2fb69d790749c79db5"
    "56e053a8dbef9eb27cc1ac42cb68e86dcd4062d06065f19822e36f5299f9213e6a8c9df96fabdd98cc540e7f"
    "428a975e85f62e76c08359c915db8cbc5933efd9632ca4396c57b8024061028180144c9c0d85252420f49a66"
    "fb6331b1ba0df7a1db3361bf3459c53aa1df1081fdda7640fe5d5f14ace8f1f9c3c105bf3b33d17d44a02810"
    "6a6469bb4f70221fcce485490f171d5c16b84b82e0ff40cb63428f6a68bd161a2adb3cf561b49d0001c613d5"
    "9cd2e4d96fae0e0fa4b4ed2fcee5a7512aeef2afbe94b644755a3ad94c"
)
HMAC_SPECS = (
    keys_pb2.KEY_SPEC_HMAC_224,
    keys_pb2.KEY_SPEC_HMAC_256,
    keys_pb2.KEY_SPEC_HMAC_384,
    keys_pb2.KEY_SPEC_HMAC_512,
)
HMAC_KEY_BYTES = {"HMAC_224": 28, "HMAC_256": 32, "HMAC_384": 48, "HMAC_512": 64}
# The hash of each RSA signing algorithm, for its DIGEST message.
DIGESTS = {"SHA_256": hashlib.sha256, "SHA_384": hashlib.sha384, "SHA_512": hashlib.sha512}


def p256_pkcs8() -> bytes:
    """The fixed P-256 key, as unencrypted PKCS#8 DER."""
    key = ec.derive_private_key(P256_SCALAR, ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def hmac_key(spec: int) -> bytes:
    """The fixed key of an HMAC spec: consecutive bytes from a start of its own."""
    size = HMAC_KEY_BYTES[keyspecs.spec_name(spec)]
    start = 0x10 * (spec - keys_pb2.KEY_SPEC_HMAC_224 + 1)
    return bytes((start + i) % 256 for i in range(size))


def digest_of(algorithm_name: str, message: bytes) -> bytes:
    """The digest a DIGEST message of `algorithm_name` (e.g. RSASSA_PSS_SHA_256) carries."""
    return DIGESTS[algorithm_name[-7:]](message).digest()


def _rsa() -> dict[str, Any]:
    key = keyspecs.AsymmetricKey.load(
        keys_pb2.KEY_SPEC_RSA_2048, keys_pb2.KEY_USAGE_SIGN_VERIFY, RSA_2048_PKCS8
    )
    raw, digest = keys_pb2.MESSAGE_TYPE_RAW, keys_pb2.MESSAGE_TYPE_DIGEST
    deterministic: dict[str, Any] = {}
    randomized: dict[str, Any] = {}
    for algorithm in keyspecs.signing_algorithms(key.spec, keys_pb2.KEY_USAGE_SIGN_VERIFY):
        name = keyspecs.signing_algorithm_name(algorithm)
        signed = {
            "RAW": key.sign(algorithm, MESSAGE, raw).hex(),
            "DIGEST": key.sign(algorithm, digest_of(name, MESSAGE), digest).hex(),
        }
        (randomized if "PSS" in name else deterministic)[name] = signed
    encrypting = keyspecs.AsymmetricKey.load(
        keys_pb2.KEY_SPEC_RSA_2048, keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT, RSA_2048_PKCS8
    )
    oaep = keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_256
    ciphertext = encrypting.encrypt(oaep, OAEP_PLAINTEXT)
    return {
        "private_key_pkcs8": RSA_2048_PKCS8.hex(),
        "public_key_der": key.public_key_der().hex(),
        "signatures": deterministic,
        "oaep": {
            "algorithm": keyspecs.encryption_algorithm_name(oaep),
            "plaintext": OAEP_PLAINTEXT.hex(),
            "max_plaintext_bytes": keyspecs.max_oaep_plaintext(key.spec, oaep),
        },
        "randomized": {"signatures": randomized, "oaep_ciphertext": ciphertext.hex()},
    }


def _p256() -> dict[str, Any]:
    material = p256_pkcs8()
    key = keyspecs.AsymmetricKey.load(
        keys_pb2.KEY_SPEC_ECC_NIST_P256, keys_pb2.KEY_USAGE_SIGN_VERIFY, material
    )
    algorithm = keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_256
    name = keyspecs.signing_algorithm_name(algorithm)
    signed = {
        "RAW": key.sign(algorithm, MESSAGE, keys_pb2.MESSAGE_TYPE_RAW).hex(),
        "DIGEST": key.sign(algorithm, digest_of(name, MESSAGE), keys_pb2.MESSAGE_TYPE_DIGEST).hex(),
    }
    return {
        "private_key_scalar": f"{P256_SCALAR:064x}",
        "private_key_pkcs8": material.hex(),
        "public_key_der": key.public_key_der().hex(),
        "randomized": {"signatures": {name: signed}},
    }


def _hmacs() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in HMAC_SPECS:
        (algorithm,) = keyspecs.mac_algorithms(spec, keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC)
        out[keyspecs.spec_name(spec)] = {
            "key": hmac_key(spec).hex(),
            "algorithm": keyspecs.mac_algorithm_name(algorithm),
            "mac": keyspecs.generate_mac(spec, hmac_key(spec), algorithm, MESSAGE).hex(),
        }
    return out


def build() -> dict[str, Any]:
    """Every vector, as hex strings; randomized values under the keys named `randomized`."""
    return {
        "message": MESSAGE.hex(),
        "rsa_2048": _rsa(),
        "ecc_nist_p256": _p256(),
        "hmac": _hmacs(),
    }


def main() -> int:
    """Write the vectors file."""
    OUT.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
