"""Generate the golden vectors of the ciphertext, envelope, key token and key record formats.

Run `python tests/vectors/generate_ciphertext.py` to rewrite tests/vectors/ciphertext_vectors.json.
The unit tests regenerate them in memory and compare byte for byte, and open the committed
bytes, so a change of a format (layout, context strings, key derivation, associated data)
cannot go unnoticed. Every key, nonce and IV here is fixed: never use them anywhere else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core import ciphertext, envelope, granttokens, importtokens, keytokens
from domain_core.contexts import ENCRYPT_INFO
from domain_core.signers import InMemorySigner
from domain_proto import keys_pb2

OUT = Path(__file__).with_name("ciphertext_vectors.json")

BACKING_KEY = bytes(range(0x00, 0x20))
KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
BACKING_VERSION = 3
DATA_KEY = bytes(range(0x80, 0xA0))
DOMAIN_KEY = bytes(range(0xC0, 0xE0))
DOMAIN_KEY_GENERATION = 5
HOST_SIGNING_KEY = bytes(range(0x40, 0x60))  # the Ed25519 seed of the vectors' host


def _ciphertext_case(
    name: str, plaintext: bytes, context: dict[str, str], nonce: bytes, iv: bytes
) -> dict[str, Any]:
    blob = ciphertext.encrypt(
        BACKING_KEY, KEY_ID, BACKING_VERSION, plaintext, context, nonce=nonce, iv=iv
    )
    header = ciphertext.parse_header(blob)
    encoded_context = ciphertext.encode_context(context)
    return {
        "name": name,
        "plaintext": plaintext.hex(),
        "context": context,
        "nonce": nonce.hex(),
        "iv": iv.hex(),
        "prefix": header.prefix.hex(),
        "header": header.header.hex(),
        "hkdf_info": (ENCRYPT_INFO + header.prefix).hex(),
        "one_time_key": ciphertext.derive_one_time_key(BACKING_KEY, nonce, header.prefix).hex(),
        "encoded_context": encoded_context.hex(),
        "associated_data": (header.header + encoded_context).hex(),
        "blob": blob.hex(),
    }


def _envelope_case(
    name: str,
    plaintext: bytes,
    context: dict[str, str],
    chunk_size: int,
    nonce_prefix: bytes,
    encrypted_data_key: bytes,
) -> dict[str, Any]:
    encryptor = envelope.EnvelopeEncryptor(
        DATA_KEY, encrypted_data_key, context, chunk_size, nonce_prefix=nonce_prefix
    )
    header = encryptor.header()
    sealed = header + encryptor.update(plaintext) + encryptor.finalize()
    return {
        "name": name,
        "plaintext": plaintext.hex(),
        "context": context,
        "chunk_size": chunk_size,
        "nonce_prefix": nonce_prefix.hex(),
        "header": header.hex(),
        "header_digest": envelope.parse_envelope_header(sealed).digest.hex(),
        "envelope": sealed.hex(),
    }


def build() -> dict[str, Any]:
    """Every vector, as hex strings (and contexts as JSON objects)."""
    context = {"tenant": "zürich-42", "purpose": "golden vector", "b": "2"}
    ciphertexts = [
        _ciphertext_case(
            "with-context",
            b"hsm-domain ciphertext vector",
            context,
            bytes(range(0x20, 0x40)),
            bytes(range(0x40, 0x4C)),
        ),
        _ciphertext_case("empty", b"", {}, bytes(range(0x60, 0x80)), bytes(range(0x50, 0x5C))),
        _ciphertext_case(
            "data-key", DATA_KEY, context, bytes(range(0xA0, 0xC0)), bytes(range(0x70, 0x7C))
        ),
    ]
    encrypted_data_key = bytes.fromhex(ciphertexts[2]["blob"])
    envelopes = [
        _envelope_case(
            "two-chunks-and-a-short-final",
            b"envelope vector: forty bytes of payload!",
            context,
            16,
            bytes(range(0xE0, 0xE8)),
            encrypted_data_key,
        ),
        _envelope_case(
            "exact-multiple-empty-final",
            bytes(range(32)),
            context,
            16,
            bytes(range(0xE8, 0xF0)),
            encrypted_data_key,
        ),
        _envelope_case("empty", b"", context, 16, bytes(range(0xF0, 0xF8)), encrypted_data_key),
    ]
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY_ID,
        description="golden vector key",
        state=keys_pb2.KEY_STATE_ENABLED,
        created_at=1_767_225_600,
        current_backing_version=BACKING_VERSION,
        creator="spiffe://vectors/client/app",
        metadata_version=4,
        domain_id="vectors",
        policy=keys_pb2.KeyPolicy(
            grants=[
                keys_pb2.PolicyGrant(
                    principals=["spiffe://vectors/client/app"],
                    operations=[keys_pb2.KEY_OPERATION_ENCRYPT, keys_pb2.KEY_OPERATION_ADMIN],
                )
            ]
        ),
    )
    metadata_bytes = metadata.SerializeToString(deterministic=True)
    token_nonce = bytes(range(0x10, 0x1C))
    token_salt = bytes(range(0x20, 0x40))
    token = keytokens.wrap_backing_key(
        DOMAIN_KEY,
        DOMAIN_KEY_GENERATION,
        metadata_bytes,
        KEY_ID,
        BACKING_VERSION,
        BACKING_KEY,
        nonce=token_nonce,
        salt=token_salt,
    )
    binding = keytokens.key_token_binding(
        KEY_ID, BACKING_VERSION, DOMAIN_KEY_GENERATION, metadata_bytes
    )
    # A record of one token, as the vector's host signs it (Ed25519 is deterministic). The
    # metadata says backing version 3, so this record is for the signature, not for a key.
    host = InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(HOST_SIGNING_KEY))
    record = keys_pb2.KeyRecord(metadata=metadata_bytes, tokens=[token])
    keytokens.RecordSigner("vectors", "hsa-1", host).sign(record)
    return {
        "keys": {
            "backing_key": BACKING_KEY.hex(),
            "key_id": KEY_ID,
            "backing_version": BACKING_VERSION,
            "data_key": DATA_KEY.hex(),
            "domain_key": DOMAIN_KEY.hex(),
            "domain_key_generation": DOMAIN_KEY_GENERATION,
        },
        "ciphertexts": ciphertexts,
        "envelopes": envelopes,
        "key_token": {
            "metadata": metadata_bytes.hex(),
            "nonce": token_nonce.hex(),
            "salt": token_salt.hex(),
            "binding": binding.hex(),
            "token_key": keytokens.token_key(DOMAIN_KEY, token_salt, binding).hex(),
            "token": token.SerializeToString(deterministic=True).hex(),
            "ciphertext": token.ciphertext.hex(),
        },
        "spec_tokens": spec_tokens(),
        "import_token": import_token(),
        "grant_token": grant_token(),
        "key_record": {
            "domain_id": "vectors",
            "signer_public_key": host.public_key.spki_der.hex(),
            "digest": keytokens.key_record_digest(record, "vectors").hex(),
            "signing_input": keytokens.key_record_signing_input(record, "vectors").hex(),
            "signature": record.signature.hex(),
            "record": record.SerializeToString(deterministic=True).hex(),
        },
    }


# Tokens of keys of other specs (issue 19): the same format sealing other material. The P-256
# private key is the one of keyspec_vectors.json (its fixed scalar).
_P256_SCALAR = 0x0351A18F3EEFE54DC0796FC55BB13A415F90EFE9CF2BDAD69696FCCF9DF9545A


def _spec_token(name: str, spec: int, usage: int, material: bytes) -> dict[str, Any]:
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY_ID,
        description=f"golden vector {name} key",
        state=keys_pb2.KEY_STATE_ENABLED,
        created_at=1_767_225_600,
        current_backing_version=1,
        creator="spiffe://vectors/client/app",
        metadata_version=1,
        domain_id="vectors",
        key_spec=spec,  # type: ignore[arg-type]
        key_usage=usage,  # type: ignore[arg-type]
    )
    metadata_bytes = metadata.SerializeToString(deterministic=True)
    nonce, salt = bytes(range(0x30, 0x3C)), bytes(range(0x50, 0x70))
    token = keytokens.wrap_backing_key(
        DOMAIN_KEY,
        DOMAIN_KEY_GENERATION,
        metadata_bytes,
        KEY_ID,
        1,
        material,
        nonce=nonce,
        salt=salt,
    )
    return {
        "key_spec": name,
        "material": material.hex(),
        "metadata": metadata_bytes.hex(),
        "token": token.SerializeToString(deterministic=True).hex(),
    }


def spec_tokens() -> list[dict[str, Any]]:
    """Key tokens of an HMAC_384 key and an ECC_NIST_P256 key (PKCS#8 DER material)."""
    p256 = ec.derive_private_key(_P256_SCALAR, ec.SECP256R1())
    p256_der = p256.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return [
        _spec_token(
            "HMAC_384",
            keys_pb2.KEY_SPEC_HMAC_384,
            keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC,
            bytes(range(0x60, 0x90)),
        ),
        _spec_token(
            "ECC_NIST_P256",
            keys_pb2.KEY_SPEC_ECC_NIST_P256,
            keys_pb2.KEY_USAGE_SIGN_VERIFY,
            p256_der,
        ),
    ]


def import_token() -> dict[str, Any]:
    """An import token sealing the RSA-2048 key of keyspec_vectors.json (as a wrapping key),
    and material wrapped under it with RSAES_OAEP_SHA_256 (randomized: opened, not compared)."""
    keyspecs_vectors = json.loads(OUT.with_name("keyspec_vectors.json").read_text("utf-8"))
    private_der = bytes.fromhex(keyspecs_vectors["rsa_2048"]["private_key_pkcs8"])
    expires_at = 1_767_312_000
    token = importtokens.seal_wrapping_key(
        domain_id="vectors",
        key_id=KEY_ID,
        domain_key=DOMAIN_KEY,
        generation=DOMAIN_KEY_GENERATION,
        algorithm=keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_256,
        wrapping_key_spec=keys_pb2.KEY_SPEC_RSA_2048,
        expires_at=expires_at,
        private_der=private_der,
        salt=bytes(range(0x70, 0x90)),
        nonce=bytes(range(0x90, 0x9C)),
    )
    return {
        "domain_id": "vectors",
        "expires_at": expires_at,
        "token": token.hex(),
        "commitment_of_backing_key": importtokens.material_commitment(BACKING_KEY, KEY_ID).hex(),
    }


def grant_token() -> dict[str, Any]:
    """A grant token of a fixed grant (fixed salt and nonce), with the grant's bytes."""
    grant = keys_pb2.KeyGrant(
        grant_id="ab" * 32,
        name="vector grant",
        grantee_principal="spiffe://vectors/client/bob",
        operations=[keys_pb2.KEY_OPERATION_ENCRYPT, keys_pb2.KEY_OPERATION_DECRYPT],
        constraints=keys_pb2.ContextConditions(encryption_context_subset={"tenant": "acme"}),
        issuing_principal="spiffe://vectors/client/app",
        created_at=1_767_225_600,
    )
    token = granttokens.seal_grant_token(
        domain_id="vectors",
        key_id=KEY_ID,
        metadata_version=7,
        grant=grant,
        domain_key=DOMAIN_KEY,
        generation=DOMAIN_KEY_GENERATION,
        salt=bytes(range(0xA0, 0xC0)),
        nonce=bytes(range(0xC0, 0xCC)),
    )
    return {
        "domain_id": "vectors",
        "metadata_version": 7,
        "grant": grant.SerializeToString(deterministic=True).hex(),
        "token": token.hex(),
    }


def main() -> int:
    """Write the vectors file."""
    OUT.write_text(json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
