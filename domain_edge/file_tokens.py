"""File tokens: an operator's signing key in a passphrase-encrypted file (`signers.Signer`).

Invariants kept here:
- a file token is a JSON header plus AES-256-GCM ciphertext of the PKCS#8 private key under a
  scrypt-derived key, with every header field bound as associated data, so an edited name,
  algorithm, public key or KDF parameter is detected; a hostile file cannot make loading cost
  more than scrypt with n = 2**20;
- a token file is created 0600 with O_EXCL and fsynced, and never overwrites another file;
- the file is checked before the passphrase is asked for, and the passphrase comes as bytes or
  through a callback called once;
- no key or passphrase ever appears in a message, repr or log.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from domain_core.errors import (
    InvalidInputError,
    MalformedMessageError,
    TokenError,
    WrongPassphraseError,
)
from domain_core.limits import (
    MAX_FILE_TOKEN_NAME_CHARS,
)
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm
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

__all__ = [
    "DEFAULT_SCRYPT_N",
    "FILE_TOKEN_FORMAT",
    "FILE_TOKEN_VERSION",
    "FileTokenSigner",
    "create_file_token",
    "load_file_token",
    "read_file_token_public",
]

_PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

FILE_TOKEN_FORMAT: Final = "hsm-domain-file-token"  # noqa: S105 (a format tag, not a secret)
FILE_TOKEN_VERSION: Final = 1
# The cost of new tokens: 128 MiB and a few tenths of a second per opening. A token keeps the
# n it was made with (its header), so older tokens open as before; tests pass a cheaper n.
DEFAULT_SCRYPT_N: Final = 2**17
_HEADER_KEYS: Final = frozenset(
    {"format", "version", "name", "algorithm", "public_key", "kdf", "nonce", "ciphertext"}
)


class FileTokenSigner(InMemorySigner):
    """An opened file token: an in-memory signer that remembers its name and file."""

    __slots__ = ("name", "path")

    def __init__(self, private_key: _PrivateKey, *, name: str, path: Path) -> None:
        super().__init__(private_key)
        self.name = name
        self.path = path

    def __repr__(self) -> str:
        return f"FileTokenSigner({self.name!r}, {self.algorithm.value}, key_id={self.key_id[:16]})"


def _check_token_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError("name must be a str")
    if not 1 <= len(name) <= MAX_FILE_TOKEN_NAME_CHARS or not name.isprintable():
        raise InvalidInputError(
            f"token name must be 1 to {MAX_FILE_TOKEN_NAME_CHARS} printable characters"
        )


def _check_passphrase(passphrase: object) -> bytes:
    if not isinstance(passphrase, bytes):
        raise TypeError("the passphrase must be bytes")
    return passphrase


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
    check_scrypt_n(scrypt_n)
    signer = InMemorySigner.generate(algorithm)
    salt = secrets.token_bytes(SALT_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    header: dict[str, object] = {
        "format": FILE_TOKEN_FORMAT,
        "version": FILE_TOKEN_VERSION,
        "name": name,
        "algorithm": algorithm.value,
        "public_key": b64(signer.public_key.spki_der),
        "kdf": kdf_header(scrypt_n, salt),
        "nonce": b64(nonce),
    }
    file_key = derive_key(passphrase, salt, scrypt_n)
    ciphertext = AESGCM(file_key).encrypt(nonce, signer.private_pkcs8_der(), canonical_json(header))
    document = dict(header, ciphertext=b64(ciphertext))
    write_new_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("ascii"))
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
    data = read_key_file(path, "token file")

    def bad(what: str) -> TokenError:
        return TokenError(f"token file {path} is malformed: {what}")

    document = header_document(
        data, bad, file_format=FILE_TOKEN_FORMAT, version=FILE_TOKEN_VERSION, keys=_HEADER_KEYS
    )
    name, public_key = _token_identity(document, bad)
    n, salt = parse_kdf(document["kdf"], bad)
    nonce = b64_field(document["nonce"], "nonce", bad)
    if len(nonce) != NONCE_BYTES:
        raise bad(f"nonce is not {NONCE_BYTES} bytes")
    ciphertext = b64_field(document["ciphertext"], "ciphertext", bad)
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
        associated_data=canonical_json(header),
    )


def _token_identity(
    document: dict[str, Any], bad: Callable[[str], TokenError]
) -> tuple[str, PublicKey]:
    """The name and public key a token file's header claims (unauthenticated until the key
    is opened)."""
    name = document["name"]
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= MAX_FILE_TOKEN_NAME_CHARS
        or not name.isprintable()
    ):
        raise bad(f"name is not a string of 1 to {MAX_FILE_TOKEN_NAME_CHARS} printable characters")
    algorithm_value = document["algorithm"]
    try:
        algorithm = SignatureAlgorithm(algorithm_value)
    except ValueError:
        raise bad(f"unknown algorithm {str(algorithm_value)[:40]!r}") from None
    try:
        public_key = PublicKey(algorithm, b64_field(document["public_key"], "public_key", bad))
    except MalformedMessageError as exc:
        raise bad(f"public_key: {exc.message}") from None
    return name, public_key


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
    file_key = derive_key(secret, header.salt, header.scrypt_n)
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
