"""One `Signer` interface for operator tokens and host keys, and the public keys that verify them.

Signature semantics are fixed, whatever holds the private key (memory, a passphrase-encrypted
file, later a PKCS#11 token):
- Ed25519: pure EdDSA over the message, 64 raw bytes;
- ECDSA P-256: ECDSA with SHA-256 over the message, signature DER-encoded.

Invariants kept here:
- a `PublicKey` exists only for a well-formed, canonically DER-encoded SubjectPublicKeyInfo whose
  type and curve match its algorithm, so `key_id` (SHA-256 of that DER) names one key exactly;
- `PublicKey.verify` either returns or raises `BadSignatureError`, for any bytes at all;
- ECDSA signatures are malleable (s and n - s both verify): never use a signature's bytes as an
  identifier; count signers by key, not signatures;
- no key, passphrase or PIN ever appears in a message, repr or log.

Keys held elsewhere are signers of the edge: passphrase-encrypted files
(`domain_edge.file_tokens`) and PKCS#11 tokens (`domain_edge.pkcs11_signer`). This module,
`domain_core.crypto` and those two are the only ones that import `cryptography.hazmat` or
`nacl` for signing primitives.
"""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Final

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core.errors import BadSignatureError, MalformedMessageError

__all__ = [
    "InMemorySigner",
    "PublicKey",
    "SignatureAlgorithm",
    "Signer",
]


class SignatureAlgorithm(enum.StrEnum):
    """The signature algorithms an operator token or host key may use."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"


# Deterministic ECDSA (RFC 6979) gives reproducible signatures for golden vectors; verification
# is the same as for randomised ECDSA, so PKCS#11 signatures verify alike.
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_ECDSA_SHA256_VERIFY: Final = ec.ECDSA(hashes.SHA256())
_ED25519_SIGNATURE_SIZE: Final = 64
_ED25519_RAW_KEY_SIZE: Final = 32


# --- public keys -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _parse_spki(algorithm: SignatureAlgorithm, spki_der: bytes) -> tuple[Any, bytes | None]:
    """Parse and check a SubjectPublicKeyInfo once; return (verifier, raw Ed25519 key or None).

    Cached across instances because domain states carry the same operator and host keys again
    and again; the values are immutable public-key objects, safe to share.
    """
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedMessageError(
            f"public key is not a valid SubjectPublicKeyInfo DER ({len(spki_der)} bytes)"
        ) from exc
    canonical = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if canonical != spki_der:
        # One key, one encoding: otherwise two key ids could name the same key.
        raise MalformedMessageError("public key DER is not in canonical (uncompressed) form")
    if algorithm is SignatureAlgorithm.ED25519:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise MalformedMessageError("public key is not an Ed25519 key but says ed25519")
        raw = key.public_bytes_raw()
        return nacl.signing.VerifyKey(raw), raw
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MalformedMessageError("public key is not an EC P-256 key but says ecdsa-p256")
    return key, None


@dataclass(frozen=True)
class PublicKey:
    """A public signature key: an algorithm and its SubjectPublicKeyInfo DER, checked on creation.

    Equality and hashing use only (algorithm, spki_der); the parsed verifier is cached on the
    instance so repeated `verify` calls do not parse DER again.
    """

    algorithm: SignatureAlgorithm
    spki_der: bytes
    _verifier: Any = field(init=False, repr=False, compare=False)
    _raw: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.spki_der, bytes):
            raise TypeError("spki_der must be bytes")
        given: object = self.algorithm
        if not isinstance(given, SignatureAlgorithm):
            # Accept the plain string from a decoded message, but only a known one.
            try:
                object.__setattr__(self, "algorithm", SignatureAlgorithm(str(given)))
            except ValueError:
                raise MalformedMessageError(
                    f"unknown signature algorithm {str(given)[:40]!r}; "
                    f"expected one of {', '.join(a.value for a in SignatureAlgorithm)}"
                ) from None
        verifier, raw = _parse_spki(self.algorithm, self.spki_der)
        object.__setattr__(self, "_verifier", verifier)
        object.__setattr__(self, "_raw", raw)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle and copy by value; the cached verifier is rebuilt on the other side."""
        return (PublicKey, (self.algorithm, self.spki_der))

    @classmethod
    def from_der(cls, spki_der: bytes) -> PublicKey:
        """A public key from SubjectPublicKeyInfo DER, its algorithm inferred from the key type."""
        return cls(_infer_algorithm(spki_der), spki_der)

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        """A public key from a PEM `PUBLIC KEY` block, its algorithm inferred from the key type."""
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise MalformedMessageError("not a PEM SubjectPublicKeyInfo public key") from exc
        return cls._from_cryptography(key)

    @classmethod
    def _from_cryptography(cls, key: Any) -> PublicKey:
        der = key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls.from_der(der)

    @property
    def key_id(self) -> str:
        """Lowercase hex SHA-256 of the SubjectPublicKeyInfo DER: the key's stable name."""
        return hashlib.sha256(self.spki_der).hexdigest()

    def to_pem(self) -> bytes:
        """The key as a PEM `PUBLIC KEY` block."""
        body = base64.b64encode(self.spki_der)
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        return b"-----BEGIN PUBLIC KEY-----\n" + b"\n".join(lines) + b"\n-----END PUBLIC KEY-----\n"

    def raw_ed25519(self) -> bytes:
        """The raw 32-byte Ed25519 public key (for protocols that carry raw keys)."""
        if self._raw is None:
            raise ValueError(f"raw_ed25519() needs an ed25519 key, this is {self.algorithm.value}")
        return self._raw

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return if `signature` is valid over `message` under this key, else BadSignatureError.

        Any malformed signature (wrong length, bad DER, garbage) is a BadSignatureError too.
        """
        if not isinstance(signature, bytes) or not isinstance(message, bytes):
            raise TypeError("signature and message must be bytes")
        if self.algorithm is SignatureAlgorithm.ED25519:
            if len(signature) == _ED25519_SIGNATURE_SIZE:
                try:
                    self._verifier.verify(message, signature)
                except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
                    pass
                else:
                    return
        else:
            try:
                self._verifier.verify(signature, message, _ECDSA_SHA256_VERIFY)
            except (InvalidSignature, ValueError, TypeError):
                pass
            else:
                return
        raise BadSignatureError(f"signature does not verify under key {self.key_id[:16]}")


def _infer_algorithm(spki_der: bytes) -> SignatureAlgorithm:
    """The algorithm a SubjectPublicKeyInfo DER implies; MalformedMessageError if unsupported."""
    if not isinstance(spki_der, bytes):
        raise TypeError("spki_der must be bytes")
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedMessageError("public key is not a valid SubjectPublicKeyInfo DER") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        return SignatureAlgorithm.ED25519
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return SignatureAlgorithm.ECDSA_P256
    raise MalformedMessageError("public key is neither Ed25519 nor EC P-256")


# --- signers ---------------------------------------------------------------------------------


class Signer(ABC):
    """Anything that signs with one private key: in memory, a file token, a PKCS#11 token.

    `sign` follows the module's fixed semantics, so a `PublicKey` verifies every signer alike.
    """

    @property
    @abstractmethod
    def public_key(self) -> PublicKey:
        """The public key that verifies this signer's signatures."""

    @abstractmethod
    def sign(self, message: bytes) -> bytes:
        """Sign `message` (Ed25519: pure EdDSA; ECDSA P-256: SHA-256, DER signature)."""

    @property
    def algorithm(self) -> SignatureAlgorithm:
        """The signature algorithm of this signer's key."""
        return self.public_key.algorithm

    @property
    def key_id(self) -> str:
        """The key id (hex SHA-256 of the SPKI DER) of this signer's public key."""
        return self.public_key.key_id


_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class InMemorySigner(Signer):
    """A signer whose private key lives in this process: host keys, and opened file tokens."""

    __slots__ = ("_key", "_nacl_key", "_public_key")

    def __init__(self, private_key: _PrivateKey) -> None:
        self._nacl_key: Any = None
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            # pynacl signs about twice as fast as cryptography; same key, same signatures.
            self._nacl_key = nacl.signing.SigningKey(private_key.private_bytes_raw())
        elif isinstance(private_key, ec.EllipticCurvePrivateKey):
            if not isinstance(private_key.curve, ec.SECP256R1):
                raise ValueError(f"EC signing keys must be P-256, not {private_key.curve.name}")
        else:
            raise TypeError("private_key must be an Ed25519 or EC P-256 private key")
        self._key = private_key
        self._public_key = PublicKey._from_cryptography(private_key.public_key())

    def __repr__(self) -> str:
        return f"InMemorySigner({self.algorithm.value}, key_id={self.key_id[:16]})"

    @classmethod
    def generate(cls, algorithm: SignatureAlgorithm) -> InMemorySigner:
        """A signer with a fresh random key of `algorithm`."""
        algorithm = SignatureAlgorithm(algorithm)
        if algorithm is SignatureAlgorithm.ED25519:
            return cls(ed25519.Ed25519PrivateKey.generate())
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pkcs8(cls, data: bytes) -> InMemorySigner:
        """A signer from an unencrypted PKCS#8 private key, PEM or DER.

        Raises MalformedMessageError (without echoing any of the input) if it does not parse.
        """
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_private_key(data, password=None)
            else:
                key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise MalformedMessageError("not an unencrypted PKCS#8 private key") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise MalformedMessageError("private key is neither Ed25519 nor EC P-256")
        try:
            return cls(key)
        except ValueError as exc:
            raise MalformedMessageError(str(exc)) from None

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, message: bytes) -> bytes:
        if not isinstance(message, bytes):
            raise TypeError("message must be bytes")
        if self._nacl_key is not None:
            signature: bytes = self._nacl_key.sign(message).signature
            return signature
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        return self._key.sign(message, _ECDSA_SHA256)

    def private_pkcs8_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER. SECRET: store only in 0600 files."""
        return self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def private_pkcs8_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM. SECRET: store only in 0600 files."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
