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
- a file token is a JSON header plus AES-256-GCM ciphertext of the PKCS#8 private key under a
  scrypt-derived key, with every header field bound as associated data, so an edited name,
  algorithm, public key or KDF parameter is detected; a hostile file cannot make loading cost
  more than scrypt with n = 2**20;
- no key, passphrase or PIN ever appears in a message, repr or log.

This module and `domain_core.crypto` are the only ones that import `cryptography.hazmat` or
`nacl` for signing primitives.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)

__all__ = [
    "DEFAULT_SCRYPT_N",
    "FILE_TOKEN_FORMAT",
    "FILE_TOKEN_VERSION",
    "MAX_SCRYPT_N",
    "MIN_SCRYPT_N",
    "FileTokenSigner",
    "InMemorySigner",
    "PublicKey",
    "SignatureAlgorithm",
    "Signer",
    "create_file_token",
    "load_file_token",
    "read_file_token_public",
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


# --- file tokens -----------------------------------------------------------------------------

FILE_TOKEN_FORMAT: Final = "hsm-domain-file-token"  # noqa: S105 (a format tag, not a secret)
FILE_TOKEN_VERSION: Final = 1
MIN_SCRYPT_N: Final = 2**14
MAX_SCRYPT_N: Final = 2**20
# The cost of new tokens: 128 MiB and a few tenths of a second per opening. A token keeps the
# n it was made with (its header), so older tokens open as before; tests pass a cheaper n.
DEFAULT_SCRYPT_N: Final = 2**17
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_SALT_SIZE: Final = 16
_NONCE_SIZE: Final = 12
_MAX_TOKEN_FILE_SIZE: Final = 64 * 1024
_MAX_NAME_LENGTH: Final = 128
_HEADER_KEYS: Final = frozenset(
    {"format", "version", "name", "algorithm", "public_key", "kdf", "nonce", "ciphertext"}
)
_KDF_KEYS: Final = frozenset({"name", "n", "r", "p", "salt"})


class FileTokenSigner(InMemorySigner):
    """An opened file token: an in-memory signer that remembers its name and file."""

    __slots__ = ("name", "path")

    def __init__(self, private_key: _PrivateKey, *, name: str, path: Path) -> None:
        super().__init__(private_key)
        self.name = name
        self.path = path

    def __repr__(self) -> str:
        return f"FileTokenSigner({self.name!r}, {self.algorithm.value}, key_id={self.key_id[:16]})"


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_token_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError("name must be a str")
    if not 1 <= len(name) <= _MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidInputError(f"token name must be 1 to {_MAX_NAME_LENGTH} printable characters")


def _check_passphrase(passphrase: object) -> bytes:
    if not isinstance(passphrase, bytes):
        raise TypeError("the passphrase must be bytes")
    return passphrase


def _derive_file_key(passphrase: bytes, salt: bytes, n: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=_SCRYPT_R, p=_SCRYPT_P).derive(passphrase)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def create_file_token(
    path: Path,
    algorithm: SignatureAlgorithm,
    passphrase: bytes,
    *,
    name: str,
    scrypt_n: int = DEFAULT_SCRYPT_N,
) -> PublicKey:
    """Create a passphrase-encrypted key file with a fresh key at `path`; return its public key.

    The file is created 0600 and never overwrites an existing one (AlreadyExistsError).
    `scrypt_n` is the key derivation's cost (a power of two, 2**14 to 2**20); anything below
    the default is for tests and throwaway demos only.
    """
    path = Path(path)
    algorithm = SignatureAlgorithm(algorithm)
    _check_token_name(name)
    _check_passphrase(passphrase)
    if not passphrase:
        raise InvalidInputError("the passphrase is empty; choose a non-empty passphrase")
    if (
        isinstance(scrypt_n, bool)
        or not isinstance(scrypt_n, int)
        or not MIN_SCRYPT_N <= scrypt_n <= MAX_SCRYPT_N
        or scrypt_n & (scrypt_n - 1)
    ):
        raise ValueError(f"scrypt_n must be a power of two in [2**14, 2**20], not {scrypt_n!r}")
    signer = InMemorySigner.generate(algorithm)
    salt = secrets.token_bytes(_SALT_SIZE)
    nonce = secrets.token_bytes(_NONCE_SIZE)
    header: dict[str, object] = {
        "format": FILE_TOKEN_FORMAT,
        "version": FILE_TOKEN_VERSION,
        "name": name,
        "algorithm": algorithm.value,
        "public_key": _b64(signer.public_key.spki_der),
        "kdf": {
            "name": "scrypt",
            "n": scrypt_n,
            "r": _SCRYPT_R,
            "p": _SCRYPT_P,
            "salt": _b64(salt),
        },
        "nonce": _b64(nonce),
    }
    file_key = _derive_file_key(passphrase, salt, scrypt_n)
    ciphertext = AESGCM(file_key).encrypt(
        nonce, signer.private_pkcs8_der(), _canonical_json(header)
    )
    document = dict(header, ciphertext=_b64(ciphertext))
    content = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise AlreadyExistsError(
            f"a file exists already at {path}; choose another path (tokens are never overwritten)"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return signer.public_key


@dataclass(frozen=True)
class _TokenHeader:
    name: str
    public_key: PublicKey
    scrypt_n: int
    salt: bytes
    nonce: bytes
    ciphertext: bytes
    associated_data: bytes


def _read_token_header(path: Path) -> _TokenHeader:
    """Read and validate a token file's header; nothing here needs the passphrase."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_TOKEN_FILE_SIZE + 1)
    except FileNotFoundError:
        raise TokenNotFoundError(
            f"no token file at {path}; check the path or create one with `hsm-operator`"
        ) from None
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(data) > _MAX_TOKEN_FILE_SIZE:
        raise TokenError(f"token file {path} is larger than {_MAX_TOKEN_FILE_SIZE} bytes")

    def bad(what: str) -> TokenError:
        return TokenError(f"token file {path} is malformed: {what}")

    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("format") != FILE_TOKEN_FORMAT:
        raise bad(f"format is not {FILE_TOKEN_FORMAT!r}")
    version = document.get("version")
    if type(version) is not int or version != FILE_TOKEN_VERSION:
        raise bad(f"version is not {FILE_TOKEN_VERSION}")
    if set(document) != _HEADER_KEYS:
        missing = sorted(_HEADER_KEYS - set(document))
        extra = sorted(str(k)[:40] for k in set(document) - _HEADER_KEYS)
        raise bad(f"fields missing {missing}, unexpected {extra}")

    def b64field(value: object, label: str) -> bytes:
        if not isinstance(value, str):
            raise bad(f"{label} is not a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{label} is not valid base64") from None

    name = document["name"]
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= _MAX_NAME_LENGTH
        or not name.isprintable()
    ):
        raise bad(f"name is not a string of 1 to {_MAX_NAME_LENGTH} printable characters")
    algorithm_value = document["algorithm"]
    try:
        algorithm = SignatureAlgorithm(algorithm_value)
    except ValueError:
        raise bad(f"unknown algorithm {str(algorithm_value)[:40]!r}") from None
    try:
        public_key = PublicKey(algorithm, b64field(document["public_key"], "public_key"))
    except MalformedMessageError as exc:
        raise bad(f"public_key: {exc.message}") from None

    kdf = document["kdf"]
    if not isinstance(kdf, dict) or set(kdf) != _KDF_KEYS:
        raise bad(f"kdf must be an object with exactly {sorted(_KDF_KEYS)}")
    if kdf["name"] != "scrypt":
        raise bad("kdf name is not 'scrypt'")
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    if type(n) is not int or not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N or n & (n - 1):
        raise bad("scrypt n must be a power of two between 2**14 and 2**20")
    if type(r) is not int or r != _SCRYPT_R or type(p) is not int or p != _SCRYPT_P:
        raise bad(f"scrypt r and p must be {_SCRYPT_R} and {_SCRYPT_P}")
    salt = b64field(kdf["salt"], "kdf salt")
    if len(salt) != _SALT_SIZE:
        raise bad(f"kdf salt is not {_SALT_SIZE} bytes")
    nonce = b64field(document["nonce"], "nonce")
    if len(nonce) != _NONCE_SIZE:
        raise bad(f"nonce is not {_NONCE_SIZE} bytes")
    ciphertext = b64field(document["ciphertext"], "ciphertext")
    if len(ciphertext) <= 16:
        raise bad("ciphertext is too short")
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    return _TokenHeader(
        name=name,
        public_key=public_key,
        scrypt_n=n,
        salt=salt,
        nonce=nonce,
        ciphertext=ciphertext,
        associated_data=_canonical_json(header),
    )


def read_file_token_public(path: Path) -> tuple[str, PublicKey]:
    """The (name, public key) a token file claims, without the passphrase.

    Unauthenticated: only `load_file_token` proves the header belongs to the encrypted key.
    """
    header = _read_token_header(path)
    return header.name, header.public_key


def load_file_token(path: Path, passphrase: bytes | Callable[[], bytes]) -> FileTokenSigner:
    """Open a file token with its passphrase (or a callback that asks for it, called once).

    The file is checked before the passphrase is asked for. Raises TokenNotFoundError,
    TokenError (malformed or inconsistent file) or WrongPassphraseError.
    """
    path = Path(path)
    header = _read_token_header(path)
    secret = _check_passphrase(passphrase() if callable(passphrase) else passphrase)
    file_key = _derive_file_key(secret, header.salt, header.scrypt_n)
    try:
        pkcs8 = AESGCM(file_key).decrypt(header.nonce, header.ciphertext, header.associated_data)
    except InvalidTag:
        raise WrongPassphraseError(
            f"the passphrase does not open token {path}; check it "
            "(if it is right, the file was altered)"
        ) from None
    try:
        key = serialization.load_der_private_key(pkcs8, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TokenError(f"token file {path} holds no valid private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise TokenError(f"token file {path} holds a key that is neither Ed25519 nor EC P-256")
    try:
        signer = FileTokenSigner(key, name=header.name, path=path)
    except ValueError:
        raise TokenError(f"token file {path} holds an EC key on a curve other than P-256") from None
    if signer.public_key != header.public_key:
        raise TokenError(
            f"token file {path} is inconsistent: its private key does not match its public key"
        )
    return signer
