"""Files that hold one private key under a passphrase, shared by operators' signing tokens
(`file_tokens`) and their recovery keys (`recovery_tokens`).

Invariants kept here:
- the key is encrypted with AES-256-GCM under a scrypt-derived key; every header field is
  bound as associated data (its canonical JSON), so an edited header is detected;
- a hostile header cannot make opening cost more than scrypt with n = 2**20 (`parse_kdf`);
- a file is read up to `MAX_TOKEN_FILE_BYTES` only, and created 0600 with O_EXCL and fsynced,
  never overwriting another file (`write_new_file`);
- no key or passphrase ever appears in a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from domain_core.errors import AlreadyExistsError, TokenError, TokenNotFoundError
from domain_core.limits import MAX_SCRYPT_N, MAX_TOKEN_FILE_BYTES, MIN_SCRYPT_N
from domain_edge.files import read_limited

__all__ = [
    "KDF_KEYS",
    "NONCE_BYTES",
    "SALT_BYTES",
    "SCRYPT_P",
    "SCRYPT_R",
    "b64",
    "b64_field",
    "canonical_json",
    "check_scrypt_n",
    "derive_key",
    "header_document",
    "kdf_header",
    "parse_kdf",
    "read_key_file",
    "write_new_file",
]

SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
NONCE_BYTES: Final = 12
KDF_KEYS: Final = frozenset({"name", "n", "r", "p", "salt"})


def canonical_json(value: object) -> bytes:
    """The bytes a header is bound by: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def derive_key(passphrase: bytes, salt: bytes, n: int) -> bytes:
    """The file key: scrypt(passphrase, salt, n, r=8, p=1), 32 bytes."""
    return Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64_field(value: object, label: str, bad: Callable[[str], TokenError]) -> bytes:
    """A base64 field of a header; `bad(what)` makes the error."""
    if not isinstance(value, str):
        raise bad(f"{label} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{label} is not valid base64") from None


def check_scrypt_n(scrypt_n: object) -> int:
    """`scrypt_n` if it is a power of two in [2**14, 2**20], else ValueError."""
    if (
        isinstance(scrypt_n, bool)
        or not isinstance(scrypt_n, int)
        or not MIN_SCRYPT_N <= scrypt_n <= MAX_SCRYPT_N
        or scrypt_n & (scrypt_n - 1)
    ):
        raise ValueError(f"scrypt_n must be a power of two in [2**14, 2**20], not {scrypt_n!r}")
    return scrypt_n


def kdf_header(scrypt_n: int, salt: bytes) -> dict[str, object]:
    """The `kdf` object of a new file's header."""
    return {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": b64(salt)}


def parse_kdf(kdf: object, bad: Callable[[str], TokenError]) -> tuple[int, bytes]:
    """The scrypt cost `n` and salt of a header, within the bounds that keep a hostile file
    from costing more than scrypt with n = 2**20."""
    if not isinstance(kdf, dict) or set(kdf) != KDF_KEYS:
        raise bad(f"kdf must be an object with exactly {sorted(KDF_KEYS)}")
    if kdf["name"] != "scrypt":
        raise bad("kdf name is not 'scrypt'")
    n, r, p = kdf["n"], kdf["r"], kdf["p"]
    if type(n) is not int or not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N or n & (n - 1):
        raise bad("scrypt n must be a power of two between 2**14 and 2**20")
    if type(r) is not int or r != SCRYPT_R or type(p) is not int or p != SCRYPT_P:
        raise bad(f"scrypt r and p must be {SCRYPT_R} and {SCRYPT_P}")
    salt = b64_field(kdf["salt"], "kdf salt", bad)
    if len(salt) != SALT_BYTES:
        raise bad(f"kdf salt is not {SALT_BYTES} bytes")
    return n, salt


def header_document(
    data: bytes,
    bad: Callable[[str], TokenError],
    *,
    file_format: str,
    version: int,
    keys: frozenset[str],
) -> dict[str, Any]:
    """The JSON object of a key file, checked for its format tag, its version and exactly
    `keys` (`bad(what)` makes the error); its fields are the caller's to check."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("format") != file_format:
        raise bad(f"format is not {file_format!r}")
    found = document.get("version")
    if type(found) is not int or found != version:
        raise bad(f"version is not {version}")
    if set(document) != keys:
        missing = sorted(keys - set(document))
        extra = sorted(str(k)[:40] for k in set(document) - keys)
        raise bad(f"fields missing {missing}, unexpected {extra}")
    return document


def read_key_file(path: Path, what: str) -> bytes:
    """A key file's bytes, at most `MAX_TOKEN_FILE_BYTES` of them; `what` names it in errors
    ("token file", "recovery token")."""
    try:
        return read_limited(
            path,
            MAX_TOKEN_FILE_BYTES,
            lambda: TokenError(f"{what} {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes"),
        )
    except FileNotFoundError:
        raise TokenNotFoundError(
            f"no {what} at {path}; check the path or create one with `hsm-operator`"
        ) from None
    except OSError as exc:
        raise TokenError(f"cannot read {what} {path}: {exc.strerror}") from None


def write_new_file(path: Path, content: bytes) -> None:
    """Create `path` 0600 with `content`, fsynced; AlreadyExistsError if anything is there."""
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
