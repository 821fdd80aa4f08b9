"""Importing a key's material, as AWS KMS does it (GetParametersForImport, ImportKeyMaterial):
the wrapping key and its import token, unwrapping, and the material's commitment.

An owner imports material into a key created with origin EXTERNAL. GetParametersForImport
gives a fresh RSA wrapping key's public half and an *import token*: the private half, sealed
the way a key token seals a backing key (docs/ciphertext-format.md section 5),

    binding   = SHA-256( IMPORT_TOKEN_CONTEXT || lp(domain id) || lp(key id)
                         || lp(u32 generation) || lp(i64 expires at)
                         || lp(u32 wrapping algorithm) || lp(u32 wrapping key spec) )
    token key = HKDF-SHA256(ikm = domain key of that generation, salt = 32 random bytes,
                            info = IMPORT_TOKEN_KEY_CONTEXT || binding)
    sealed    = AES-256-GCM(token key, 12 random bytes, PKCS#8 DER, associated data = binding)

so any HSA of the domain holding that generation can open it, and nobody else (the wrapping
key never leaves the HSAs in the clear and needs no storage). The owner wraps the material
under the public key (`wrap_material`: RSA-OAEP, or RSA-OAEP of a fresh AES key and that
key's RFC 5649 wrap of the material) and sends it with the token to ImportKeyMaterial.

Invariants:
- a token opens only for the domain, key, generation, expiry and parameters it was made for;
  every failure to open is `InvalidImportTokenError` with its one fixed message (no oracle);
  a token past its expiry is `ExpiredImportTokenError`, checked only once it opened;
- material that does not unwrap is `InvalidCiphertextError` ("invalid ciphertext", nothing
  more);
- the commitment of imported material (`material_commitment`) is HMAC-SHA-256 keyed with the
  material over a fixed context and the key id: it shows whether material offered again is the
  same (compared in constant time, `IncorrectKeyMaterialError` if not) and nothing else a
  caller could not learn from a MAC the key makes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from google.protobuf.message import DecodeError

from domain_core import crypto, keyspecs
from domain_core.contexts import (
    IMPORT_TOKEN_CONTEXT,
    IMPORT_TOKEN_KEY_CONTEXT,
    MATERIAL_COMMITMENT_CONTEXT,
)
from domain_core.errors import (
    ExpiredImportTokenError,
    IncorrectKeyMaterialError,
    InvalidCiphertextError,
    InvalidImportTokenError,
    InvalidInputError,
)
from domain_proto import keys_pb2

__all__ = [
    "IMPORT_TOKEN_SECONDS",
    "WRAPPING_KEY_SPECS",
    "ImportParameters",
    "WrappingKey",
    "check_commitment",
    "material_commitment",
    "new_import_parameters",
    "open_import_token",
    "seal_wrapping_key",
    "wrap_material",
]

# How long import parameters stay valid (AWS KMS: 24 hours).
IMPORT_TOKEN_SECONDS: Final = 24 * 3600
WRAPPING_KEY_SPECS: Final = (
    keys_pb2.KEY_SPEC_RSA_2048,
    keys_pb2.KEY_SPEC_RSA_3072,
    keys_pb2.KEY_SPEC_RSA_4096,
)
_ALGORITHMS: Final = {
    keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_1: "RSAES_OAEP_SHA_1",
    keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_256: "RSAES_OAEP_SHA_256",
    keys_pb2.WRAPPING_ALGORITHM_RSA_AES_KEY_WRAP_SHA_256: "RSA_AES_KEY_WRAP_SHA_256",
}
_SALT_BYTES: Final = 32


def _lp(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def algorithm_name(algorithm: int) -> str:
    """AWS KMS's name of a wrapping algorithm; InvalidInputError for any other number."""
    name = _ALGORITHMS.get(cast("keys_pb2.WrappingAlgorithm", algorithm))
    if name is None:
        raise InvalidInputError(
            f"wrapping_algorithm must be one of {', '.join(_ALGORITHMS.values())}"
        )
    return name


def _check_spec(spec: int) -> None:
    if spec not in WRAPPING_KEY_SPECS:
        names = ", ".join(keyspecs.spec_name(s) for s in WRAPPING_KEY_SPECS)
        raise InvalidInputError(f"wrapping_key_spec must be one of {names}")


def _binding(
    domain_id: str, key_id: str, generation: int, expires_at: int, algorithm: int, spec: int
) -> bytes:
    h = hashlib.sha256(IMPORT_TOKEN_CONTEXT)
    h.update(_lp(domain_id.encode("utf-8")))
    h.update(_lp(key_id.encode("utf-8")))
    h.update(_lp(struct.pack(">I", generation)))
    h.update(_lp(struct.pack(">q", expires_at)))
    h.update(_lp(struct.pack(">I", algorithm)))
    h.update(_lp(struct.pack(">I", spec)))
    return h.digest()


@dataclass(frozen=True)
class ImportParameters:
    """What GetParametersForImport answers: the token, the wrapping public key (DER
    SubjectPublicKeyInfo) and when both stop being valid (unix seconds)."""

    import_token: bytes
    public_key: bytes
    expires_at: int


def new_import_parameters(
    *,
    domain_id: str,
    key_id: str,
    domain_key: bytes,
    generation: int,
    algorithm: int,
    wrapping_key_spec: int,
    now: int,
) -> ImportParameters:
    """A fresh wrapping key of `wrapping_key_spec` and its import token, sealed under the
    domain key of `generation`, valid for `IMPORT_TOKEN_SECONDS` from `now`."""
    algorithm_name(algorithm)
    _check_spec(wrapping_key_spec)
    private_der = keyspecs.new_material(wrapping_key_spec)
    private = serialization.load_der_private_key(private_der, None)
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    expires_at = now + IMPORT_TOKEN_SECONDS
    token = seal_wrapping_key(
        domain_id=domain_id,
        key_id=key_id,
        domain_key=domain_key,
        generation=generation,
        algorithm=algorithm,
        wrapping_key_spec=wrapping_key_spec,
        expires_at=expires_at,
        private_der=private_der,
    )
    return ImportParameters(token, public_der, expires_at)


def seal_wrapping_key(
    *,
    domain_id: str,
    key_id: str,
    domain_key: bytes,
    generation: int,
    algorithm: int,
    wrapping_key_spec: int,
    expires_at: int,
    private_der: bytes,
    salt: bytes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The import token of a wrapping key (serialized `ImportToken`, see the module
    docstring). `salt` and `nonce` exist ONLY for the golden test vectors; production code
    leaves them unset so that fresh random ones are drawn for every token."""
    binding = _binding(domain_id, key_id, generation, expires_at, algorithm, wrapping_key_spec)
    salt = crypto.random_bytes(_SALT_BYTES) if salt is None else salt
    nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES) if nonce is None else nonce
    token = keys_pb2.ImportToken(
        key_id=key_id,
        domain_key_generation=generation,
        expires_at=expires_at,
        wrapping_algorithm=cast("keys_pb2.WrappingAlgorithm", algorithm),
        wrapping_key_spec=cast("keys_pb2.KeySpec", wrapping_key_spec),
        salt=salt,
        nonce=nonce,
        ciphertext=crypto.seal_under_domain_key(
            domain_key, IMPORT_TOKEN_KEY_CONTEXT, binding, private_der, salt, nonce
        ),
    )
    return token.SerializeToString(deterministic=True)


@dataclass(frozen=True)
class WrappingKey:
    """An opened import token: the wrapping private key and how material is wrapped for it."""

    algorithm: int
    private_key: rsa.RSAPrivateKey

    def __repr__(self) -> str:
        return f"WrappingKey({algorithm_name(self.algorithm)}, {self.private_key.key_size} bits)"

    def unwrap(self, encrypted: bytes) -> bytes:
        """The material wrapped in `encrypted`; InvalidCiphertextError if it does not open."""
        modulus = self.private_key.key_size // 8
        try:
            if self.algorithm == keys_pb2.WRAPPING_ALGORITHM_RSA_AES_KEY_WRAP_SHA_256:
                if len(encrypted) <= modulus:
                    raise InvalidCiphertextError()
                aes_key = self.private_key.decrypt(encrypted[:modulus], _oaep(self.algorithm))
                if len(aes_key) != crypto.AES_KEY_BYTES:
                    raise InvalidCiphertextError()
                return aes_key_unwrap_with_padding(aes_key, encrypted[modulus:])
            if len(encrypted) != modulus:
                raise InvalidCiphertextError()
            return self.private_key.decrypt(encrypted, _oaep(self.algorithm))
        except (ValueError, InvalidUnwrap):
            raise InvalidCiphertextError() from None


def _oaep(algorithm: int) -> padding.OAEP:
    sha1 = algorithm == keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_1
    hash_: hashes.HashAlgorithm = hashes.SHA1() if sha1 else hashes.SHA256()  # noqa: S303
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


def open_import_token(
    token_bytes: bytes,
    *,
    domain_id: str,
    key_id: str,
    domain_keys: Mapping[int, bytes],
    now: int,
) -> WrappingKey:
    """The wrapping key of an import token made for `key_id` of `domain_id`, if it opens under
    a generation this node holds (else InvalidImportTokenError) and has not expired (else
    ExpiredImportTokenError)."""
    token = keys_pb2.ImportToken()
    try:
        token.ParseFromString(token_bytes)
    except DecodeError:
        raise InvalidImportTokenError() from None
    domain_key = domain_keys.get(token.domain_key_generation)
    if (
        token.key_id != key_id
        or domain_key is None
        or token.wrapping_algorithm not in _ALGORITHMS
        or token.wrapping_key_spec not in WRAPPING_KEY_SPECS
        or len(token.salt) != _SALT_BYTES
        or len(token.nonce) != crypto.GCM_NONCE_BYTES
    ):
        raise InvalidImportTokenError()
    binding = _binding(
        domain_id,
        key_id,
        token.domain_key_generation,
        token.expires_at,
        token.wrapping_algorithm,
        token.wrapping_key_spec,
    )
    private_der = crypto.open_under_domain_key(
        domain_key,
        IMPORT_TOKEN_KEY_CONTEXT,
        binding,
        token.ciphertext,
        token.salt,
        token.nonce,
        error=InvalidImportTokenError,
    )
    if now >= token.expires_at:
        raise ExpiredImportTokenError(
            "the import token has expired (import parameters are valid for 24 hours); call "
            "GetParametersForImport again and wrap the material under its new public key"
        )
    private = serialization.load_der_private_key(private_der, None)
    if not isinstance(private, rsa.RSAPrivateKey):  # sealed by an HSA: cannot happen
        raise InvalidImportTokenError()
    return WrappingKey(token.wrapping_algorithm, private)


def wrap_material(public_key_der: bytes, algorithm: int, material: bytes) -> bytes:
    """Wrap `material` for ImportKeyMaterial as its owner does (the client side, for tools
    and tests): RSA-OAEP under the wrapping public key, or, for RSA_AES_KEY_WRAP_SHA_256,
    RSA-OAEP-SHA-256 of a fresh AES-256 key followed by that key's RFC 5649 wrap."""
    algorithm_name(algorithm)
    public = serialization.load_der_public_key(public_key_der)
    if not isinstance(public, rsa.RSAPublicKey):
        raise InvalidInputError("the wrapping public key is not an RSA key")
    if algorithm == keys_pb2.WRAPPING_ALGORITHM_RSA_AES_KEY_WRAP_SHA_256:
        aes_key = crypto.new_aes_key()
        return public.encrypt(aes_key, _oaep(algorithm)) + aes_key_wrap_with_padding(
            aes_key, material
        )
    return public.encrypt(material, _oaep(algorithm))


def material_commitment(material: bytes, key_id: str) -> bytes:
    """The commitment of imported material: HMAC-SHA-256(material, context || key id)."""
    return hmac.new(material, MATERIAL_COMMITMENT_CONTEXT + key_id.encode(), "sha256").digest()


def check_commitment(metadata: keys_pb2.KeyMetadata, material: bytes) -> None:
    """Refuse material other than the key's earlier material (`IncorrectKeyMaterialError`);
    a key that never held material accepts any."""
    if metadata.material_commitment and not crypto.constant_time_equal(
        bytes(metadata.material_commitment), material_commitment(material, metadata.key_id)
    ):
        raise IncorrectKeyMaterialError(
            f"key {metadata.key_id} held other key material before: import the same material "
            "again (a key's material cannot change), or create a new key for new material"
        )
