"""Recovery tokens: an operator's X25519 recovery key in a passphrase-encrypted file, and
`open_recovery_key`, which opens either kind of recovery key (such a file, or a P-256 key on a
PKCS#11 token) behind one interface (`RecoveryKeyHolder`).

Separate from the operator's signing token (its own file, its own passphrase if they wish),
so that it can be kept offline; the same format machinery (`passphrase_files`): a JSON header
bound as associated data, the raw private key under AES-256-GCM with a scrypt-derived key,
created 0600 and never overwriting a file. An opened token never hands out its private key: it
computes the ECDH a sealed recovery share needs (`RecoveryToken.agree`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from domain_core.errors import InvalidInputError, TokenError, WrongPassphraseError
from domain_core.limits import MAX_FILE_TOKEN_NAME_CHARS
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_edge.file_tokens import DEFAULT_SCRYPT_N
from domain_edge.passphrase_files import (
    NONCE_BYTES,
    SALT_BYTES,
    b64,
    b64_field,
    canonical_json,
    check_scrypt_n,
    derive_key,
    header_document,
    kdf_header,
    parse_kdf,
    read_key_file,
    write_new_file,
)
from domain_edge.pkcs11_signer import Pkcs11RecoveryKey
from domain_edge.tokens import FileTokenRef, TokenRef, parse_token_uri

__all__ = [
    "RECOVERY_TOKEN_FORMAT",
    "RecoveryKeyHolder",
    "RecoveryToken",
    "create_recovery_token",
    "load_recovery_token",
    "open_recovery_key",
    "read_recovery_token_public",
]

RECOVERY_TOKEN_FORMAT: Final = "hsm-domain-recovery-token"  # noqa: S105 (a format tag)
_VERSION: Final = 1
_KEY_BYTES: Final = 32
_HEADER_KEYS: Final = frozenset(
    {"format", "version", "name", "algorithm", "public_key", "kdf", "nonce", "ciphertext"}
)
_WHAT: Final = "recovery token"


class RecoveryKeyHolder(Protocol):
    """An opened recovery key of either kind: its algorithm and public key (the bytes a
    RecoveryKey record holds), and the ECDH with its private key, which never leaves it."""

    @property
    def algorithm(self) -> RecoveryAlgorithm: ...

    @property
    def public_key(self) -> bytes: ...

    def agree(self, ephemeral_public_key: bytes) -> bytes: ...

    def close(self) -> None: ...


class RecoveryToken:
    """An opened recovery token: its public key, and the ECDH with its private key."""

    __slots__ = ("_key", "name", "path", "public_key")

    def __init__(self, key: x25519.X25519PrivateKey, *, name: str, path: Path) -> None:
        self._key = key
        self.name = name
        self.path = path
        self.public_key = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    algorithm = RecoveryAlgorithm.X25519

    def agree(self, ephemeral_public_key: bytes) -> bytes:
        """X25519 of the token's key with `ephemeral_public_key` (a sealed share's)."""
        if len(ephemeral_public_key) != _KEY_BYTES:
            raise InvalidInputError("an X25519 ephemeral public key is 32 bytes")
        peer = x25519.X25519PublicKey.from_public_bytes(ephemeral_public_key)
        return self._key.exchange(peer)

    def close(self) -> None:
        """Nothing to release (the key lives in this object until it is dropped)."""

    def __repr__(self) -> str:
        return f"RecoveryToken({self.name!r}, x25519, public_key={self.public_key.hex()[:16]})"


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= MAX_FILE_TOKEN_NAME_CHARS or not name.isprintable():
        raise InvalidInputError(
            f"token name must be 1 to {MAX_FILE_TOKEN_NAME_CHARS} printable characters"
        )


def create_recovery_token(
    path: Path, passphrase: bytes, *, name: str, scrypt_n: int = DEFAULT_SCRYPT_N
) -> bytes:
    """Create a recovery token with a fresh X25519 key at `path` (0600, never over another
    file); its raw public key, which the operator enrolls (`changes.set_recovery_key`)."""
    path = Path(path)
    _check_name(name)
    if not isinstance(passphrase, bytes):
        raise TypeError("the passphrase must be bytes")
    if not passphrase:
        raise InvalidInputError("the passphrase is empty; choose a non-empty passphrase")
    check_scrypt_n(scrypt_n)
    key = x25519.X25519PrivateKey.generate()
    public_key = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header: dict[str, object] = {
        "format": RECOVERY_TOKEN_FORMAT,
        "version": _VERSION,
        "name": name,
        "algorithm": RecoveryAlgorithm.X25519.value,
        "public_key": b64(public_key),
        "kdf": kdf_header(scrypt_n, salt),
        "nonce": b64(nonce),
    }
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    ciphertext = AESGCM(derive_key(passphrase, salt, scrypt_n)).encrypt(
        nonce, raw, canonical_json(header)
    )
    document = dict(header, ciphertext=b64(ciphertext))
    write_new_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii"))
    return public_key


@dataclass(frozen=True)
class _Header:
    name: str
    public_key: bytes
    scrypt_n: int
    salt: bytes
    nonce: bytes
    ciphertext: bytes
    associated_data: bytes


def _read_header(path: Path) -> _Header:
    data = read_key_file(path, _WHAT)

    def bad(what: str) -> TokenError:
        return TokenError(f"{_WHAT} {path} is malformed: {what}")

    document = header_document(
        data, bad, file_format=RECOVERY_TOKEN_FORMAT, version=_VERSION, keys=_HEADER_KEYS
    )
    name = document["name"]
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_FILE_TOKEN_NAME_CHARS:
        raise bad("name is not a string of printable characters")
    if document["algorithm"] != RecoveryAlgorithm.X25519.value:
        raise bad("algorithm is not x25519")
    public_key = b64_field(document["public_key"], "public_key", bad)
    if len(public_key) != _KEY_BYTES:
        raise bad("public_key is not 32 bytes")
    n, salt = parse_kdf(document["kdf"], bad)
    nonce = b64_field(document["nonce"], "nonce", bad)
    if len(nonce) != NONCE_BYTES:
        raise bad(f"nonce is not {NONCE_BYTES} bytes")
    ciphertext = b64_field(document["ciphertext"], "ciphertext", bad)
    if len(ciphertext) != _KEY_BYTES + 16:
        raise bad("ciphertext is not a 32-byte key and its tag")
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    return _Header(name, public_key, n, salt, nonce, ciphertext, canonical_json(header))


def read_recovery_token_public(path: Path) -> tuple[str, bytes]:
    """The (name, raw X25519 public key) a recovery token claims, without its passphrase
    (unauthenticated until it is opened)."""
    header = _read_header(Path(path))
    return header.name, header.public_key


def load_recovery_token(path: Path, passphrase: bytes) -> RecoveryToken:
    """Open a recovery token; TokenNotFoundError, TokenError or WrongPassphraseError."""
    path = Path(path)
    header = _read_header(path)
    if not isinstance(passphrase, bytes):
        raise TypeError("the passphrase must be bytes")
    try:
        raw = AESGCM(derive_key(passphrase, header.salt, header.scrypt_n)).decrypt(
            header.nonce, header.ciphertext, header.associated_data
        )
    except InvalidTag:
        raise WrongPassphraseError(
            f"the passphrase does not open {_WHAT} {path}; check it "
            "(if it is right, the file was altered)"
        ) from None
    token = RecoveryToken(
        x25519.X25519PrivateKey.from_private_bytes(raw), name=header.name, path=path
    )
    if token.public_key != header.public_key:
        raise TokenError(f"{_WHAT} {path} is inconsistent: its key does not match its header")
    return token


def open_recovery_key(
    reference: str | TokenRef,
    secret: Callable[[], bytes],
    *,
    environ: Mapping[str, str] | None = None,
) -> RecoveryKeyHolder:
    """Open the recovery key a reference names (a recovery token file, or a `pkcs11:` URI of a
    P-256 key made by `generate_pkcs11_recovery_key`); `secret` returns its passphrase or PIN
    once the key is located. Close it when done."""
    ref = parse_token_uri(reference, environ=environ) if isinstance(reference, str) else reference
    if isinstance(ref, FileTokenRef):
        read_recovery_token_public(ref.path)  # located and well-formed before asking
        return load_recovery_token(ref.path, secret())
    return Pkcs11RecoveryKey.open(
        ref.module_path, ref.token_label, ref.key_label, ref.cka_id, pin_callback=secret
    )
