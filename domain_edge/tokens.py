"""Token references: which operator token to open, named the way securesystemslib names keys.

A reference is one string:
- a file path, or `file:PATH`: a passphrase-encrypted file token (`file_tokens.load_file_token`);
- an RFC 7512 `pkcs11:` URI: `pkcs11:token=LABEL;object=KEYLABEL;id=%01%02?module-path=/path/lib.so`
  (the module path may instead come from the environment variable `HSM_PKCS11_MODULE`).

Also the operator public key document (`hsm-domain-operator-public-key`), which an operator
hands to the others so that they can propose adding them: a name, an algorithm, a PEM public key
and the operator id, checked on reading to be the key's id.

Invariants kept here:
- secrets (passphrase, PIN) come only through a callback, never in a reference: a URI carrying
  `pin-value` or `pin-source` is refused;
- a PKCS#11 token is named by its label, never by slot; a module path must be absolute, so a
  bare library name is never searched for on the library path;
- every parse failure is an `InvalidInputError` saying which part is wrong and how it should look;
- `read_operator_public` returns a key only if the document's operator id is that key's id.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from domain_core.errors import (
    AlreadyExistsError,
    InvalidInputError,
    MalformedMessageError,
    NotFoundError,
)
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_CKA_ID_BYTES,
    MAX_KEY_LABEL_CHARS,
    MAX_OPERATOR_PUBLIC_FILE_BYTES,
    MAX_TOKEN_LABEL_BYTES,
    MAX_TOKEN_REFERENCE_CHARS,
)
from domain_core.signers import PublicKey, SignatureAlgorithm, Signer
from domain_edge.file_tokens import load_file_token
from domain_edge.files import read_limited
from domain_edge.pkcs11_signer import Pkcs11Signer, format_cka_id

__all__ = [
    "MODULE_ENV",
    "OPERATOR_PUBLIC_FORMAT",
    "OPERATOR_PUBLIC_VERSION",
    "FileTokenRef",
    "Pkcs11TokenRef",
    "TokenRef",
    "format_pkcs11_uri",
    "open_token",
    "operator_public_document",
    "parse_token_uri",
    "read_operator_public",
    "write_operator_public",
]

MODULE_ENV: Final = "HSM_PKCS11_MODULE"
OPERATOR_PUBLIC_FORMAT: Final = "hsm-domain-operator-public-key"
OPERATOR_PUBLIC_VERSION: Final = 1

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_PIN_VALUE = re.compile(r"(pin-value=)[^&;?#]*")
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")
# RFC 7512: characters a path attribute value may hold unescaped (p11-pchar).
_PATH_SAFE: Final = "-._~:[]@!$'()*+,="
_QUERY_SAFE: Final = _PATH_SAFE + "/?|"
_UNSUPPORTED_PATH_ATTRS: Final = frozenset(
    {
        "library-description",
        "library-manufacturer",
        "library-version",
        "manufacturer",
        "model",
        "serial",
        "slot-description",
        "slot-id",
        "slot-manufacturer",
    }
)
_PUBLIC_KEYS: Final = frozenset(
    {"format", "version", "name", "algorithm", "public_key", "operator_id"}
)


@dataclass(frozen=True)
class FileTokenRef:
    """A passphrase-encrypted file token at `path`."""

    path: Path

    @property
    def uri(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Pkcs11TokenRef:
    """A key on a PKCS#11 token: module, token label, and key label and/or CKA_ID."""

    module_path: str
    token_label: str
    key_label: str | None = None
    cka_id: bytes | None = None

    @property
    def uri(self) -> str:
        """The canonical `pkcs11:` URI of this reference."""
        return format_pkcs11_uri(
            self.token_label,
            key_label=self.key_label,
            cka_id=self.cka_id,
            module_path=self.module_path,
        )


TokenRef = FileTokenRef | Pkcs11TokenRef


def _bad(reference: str, what: str) -> InvalidInputError:
    # A PIN someone put in the URI must not reach a terminal or log through this message.
    shown = _PIN_VALUE.sub(r"\1<redacted>", reference)
    shown = shown if len(shown) <= 200 else shown[:200] + "..."
    return InvalidInputError(f"invalid token reference {shown!r}: {what}")


def _decode(reference: str, name: str, value: str) -> bytes:
    try:
        return urllib.parse.unquote_to_bytes(value)
    except (ValueError, TypeError):
        raise _bad(reference, f"{name}= is not percent-encoded correctly") from None


def _text(reference: str, name: str, value: str) -> str:
    try:
        text = _decode(reference, name, value).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(reference, f"{name}= is not UTF-8 once percent-decoded") from None
    if not text:
        raise _bad(reference, f"{name}= is empty")
    if not text.isprintable():
        raise _bad(reference, f"{name}= holds control characters")
    return text


def _split_attributes(reference: str, part: str, separator: str, where: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    if not part:
        return attributes
    for item in part.split(separator):
        if not item:
            continue
        name, equals, value = item.partition("=")
        if not equals:
            raise _bad(reference, f"{where} attribute {name[:40]!r} has no '=' and value")
        if name in attributes:
            raise _bad(reference, f"{where} attribute {name[:40]!r} is given twice")
        attributes[name] = value
    return attributes


def _parse_pkcs11(reference: str, environ: Mapping[str, str]) -> Pkcs11TokenRef:
    body = reference[len("pkcs11:") :]
    path_part, _, query_part = body.partition("?")
    if "#" in body:
        raise _bad(reference, "a pkcs11: URI has no fragment ('#' must be written %23)")
    path_attrs = _split_attributes(reference, path_part, ";", "path")
    query_attrs = _split_attributes(reference, query_part, "&", "query")

    for name in ("pin-value", "pin-source"):
        if name in query_attrs or name in path_attrs:
            raise _bad(
                reference,
                f"{name} is refused: a PIN never goes in a token reference; "
                "use --pin-file or type it when asked",
            )
    for name in path_attrs:
        if name in _UNSUPPORTED_PATH_ATTRS:
            hint = " (tokens are found by label, never by slot)" if name.startswith("slot") else ""
            raise _bad(reference, f"attribute {name!r} is not supported{hint}; use token=LABEL")
        if name not in {"token", "object", "id", "type"}:
            raise _bad(
                reference,
                f"unknown attribute {name[:40]!r}; supported: token, object, id, type "
                "(and module-path after '?')",
            )
    for name in query_attrs:
        if name == "module-name":
            raise _bad(reference, "module-name is not supported; give module-path=/absolute/path")
        if name != "module-path":
            raise _bad(reference, f"unknown query attribute {name[:40]!r}; supported: module-path")

    if "type" in path_attrs and _text(reference, "type", path_attrs["type"]) != "private":
        raise _bad(reference, "type= must be 'private' (the signing key) if given")
    if "token" not in path_attrs:
        raise _bad(reference, "token=LABEL is missing (the token's label)")
    token_label = _text(reference, "token", path_attrs["token"])
    if len(token_label.encode("utf-8")) > MAX_TOKEN_LABEL_BYTES:
        raise _bad(reference, f"token= is longer than {MAX_TOKEN_LABEL_BYTES} bytes")
    key_label = None
    if "object" in path_attrs:
        key_label = _text(reference, "object", path_attrs["object"])
        if len(key_label) > MAX_KEY_LABEL_CHARS:
            raise _bad(reference, f"object= is longer than {MAX_KEY_LABEL_CHARS} characters")
    cka_id = None
    if "id" in path_attrs:
        cka_id = _decode(reference, "id", path_attrs["id"])
        if not cka_id or len(cka_id) > MAX_CKA_ID_BYTES:
            raise _bad(reference, f"id= must be 1 to {MAX_CKA_ID_BYTES} bytes (e.g. id=%01%02)")

    if "module-path" in query_attrs:
        module_path = _text(reference, "module-path", query_attrs["module-path"])
        source = "module-path="
    else:
        module_path = environ.get(MODULE_ENV, "")
        source = f"${MODULE_ENV}"
        if not module_path:
            raise _bad(
                reference,
                f"no PKCS#11 module: add ?module-path=/path/to/module.so or set {MODULE_ENV}",
            )
    if not os.path.isabs(module_path):
        raise _bad(reference, f"{source} must be an absolute path, not {module_path[:100]!r}")
    return Pkcs11TokenRef(
        module_path=module_path, token_label=token_label, key_label=key_label, cka_id=cka_id
    )


def parse_token_uri(reference: str, *, environ: Mapping[str, str] | None = None) -> TokenRef:
    """Parse a token reference (file path, `file:PATH` or `pkcs11:` URI); InvalidInputError if bad.

    `environ` (default `os.environ`) supplies `HSM_PKCS11_MODULE` when the URI has no module-path.
    Nothing is opened or read here.
    """
    if not isinstance(reference, str):
        raise TypeError("a token reference is a str")
    if not reference.strip():
        raise InvalidInputError("the token reference is empty; give a file path or pkcs11: URI")
    if len(reference) > MAX_TOKEN_REFERENCE_CHARS:
        raise InvalidInputError(
            f"the token reference is longer than {MAX_TOKEN_REFERENCE_CHARS} chars"
        )
    if "\x00" in reference:
        raise _bad(reference, "it holds a NUL character")
    if reference.startswith("pkcs11:"):
        return _parse_pkcs11(reference, os.environ if environ is None else environ)
    if reference.startswith("file:"):
        path = reference[len("file:") :]
        if path.startswith("//"):
            # file:///abs/path (empty authority); file://host/... names another machine.
            if not path.startswith("///"):
                raise _bad(reference, "file:// URIs must have an empty host (file:///path)")
            path = urllib.parse.unquote(path[2:])
        if not path:
            raise _bad(reference, "file: has no path")
        return FileTokenRef(Path(path).expanduser())
    match = _SCHEME.match(reference)
    if match is not None:
        raise _bad(
            reference,
            f"unknown scheme {match.group(1)[:20]!r}; use a file path, file:PATH or pkcs11:...",
        )
    return FileTokenRef(Path(reference).expanduser())


def format_pkcs11_uri(
    token_label: str,
    *,
    key_label: str | None = None,
    cka_id: bytes | None = None,
    module_path: str | None = None,
) -> str:
    """The RFC 7512 URI naming a key: `pkcs11:token=..;object=..;id=%..?module-path=..`."""
    parts = [f"token={urllib.parse.quote(token_label, safe=_PATH_SAFE)}"]
    if key_label is not None:
        parts.append(f"object={urllib.parse.quote(key_label, safe=_PATH_SAFE)}")
    if cka_id is not None:
        parts.append(f"id={format_cka_id(cka_id)}")
    uri = "pkcs11:" + ";".join(parts)
    if module_path is not None:
        uri += f"?module-path={urllib.parse.quote(module_path, safe=_QUERY_SAFE)}"
    return uri


def open_token(
    reference: str | TokenRef,
    secret: Callable[[], bytes],
    *,
    environ: Mapping[str, str] | None = None,
) -> Signer:
    """Open the token a reference names; `secret` returns its passphrase or PIN when asked.

    The token is located first (file read and checked, or module loaded and token found),
    then `secret` is called once. A PKCS#11 signer holds a session: close it when done
    (`Pkcs11Signer.close`, or `with`). Raises InvalidInputError (bad reference),
    TokenNotFoundError, WrongPassphraseError or TokenError.
    """
    ref = parse_token_uri(reference, environ=environ) if isinstance(reference, str) else reference
    if isinstance(ref, FileTokenRef):
        return load_file_token(ref.path, secret)
    return Pkcs11Signer.open(
        ref.module_path, ref.token_label, ref.key_label, ref.cka_id, pin_callback=secret
    )


# --- operator public key documents ---------------------------------------------------------


def operator_public_document(name: str, public_key: PublicKey) -> dict[str, object]:
    """The JSON document other operators need to propose adding this operator."""
    _check_operator_name(name, InvalidInputError)
    return {
        "format": OPERATOR_PUBLIC_FORMAT,
        "version": OPERATOR_PUBLIC_VERSION,
        "name": name,
        "algorithm": public_key.algorithm.value,
        "public_key": public_key.to_pem().decode("ascii"),
        "operator_id": public_key.key_id,
    }


def write_operator_public(path: Path, name: str, public_key: PublicKey) -> None:
    """Write the operator public key document to a new file (never overwrites; 0644)."""
    content = (json.dumps(operator_public_document(name, public_key), indent=2) + "\n").encode()
    path = Path(path)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise AlreadyExistsError(f"a file exists already at {path}; choose another path") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _check_operator_name(name: object, error: type[InvalidInputError]) -> str:
    longest = DEFAULT_LIMITS.max_name_chars
    if not isinstance(name, str) or not (1 <= len(name) <= longest and name.isprintable()):
        raise error(f"operator name must be 1 to {longest} printable characters")
    return name


def read_operator_public(path: Path) -> tuple[str, PublicKey]:
    """Read and check an operator public key document; return (name, public key).

    Refuses (MalformedMessageError) a document whose fields are missing, unexpected or of the
    wrong type, whose algorithm is not the key's, or whose operator_id is not the key's id.
    NotFoundError if there is no such file.
    """
    path = Path(path)
    try:
        data = read_limited(
            path,
            MAX_OPERATOR_PUBLIC_FILE_BYTES,
            lambda: MalformedMessageError(
                f"{path} is larger than {MAX_OPERATOR_PUBLIC_FILE_BYTES} bytes; "
                "not an operator public key"
            ),
        )
    except FileNotFoundError:
        raise NotFoundError(f"no operator public key file at {path}") from None

    def bad(what: str) -> MalformedMessageError:
        return MalformedMessageError(f"operator public key file {path}: {what}")

    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("format") != OPERATOR_PUBLIC_FORMAT:
        raise bad(
            f"format is not {OPERATOR_PUBLIC_FORMAT!r} (made by `hsm-operator token "
            "export-public`?)"
        )
    version = document.get("version")
    if type(version) is not int or version != OPERATOR_PUBLIC_VERSION:
        raise bad(f"version is not {OPERATOR_PUBLIC_VERSION}")
    if set(document) != _PUBLIC_KEYS:
        missing = sorted(_PUBLIC_KEYS - set(document))
        extra = sorted(str(k)[:40] for k in set(document) - _PUBLIC_KEYS)
        raise bad(f"fields missing {missing}, unexpected {extra}")
    try:
        name = _check_operator_name(document["name"], MalformedMessageError)
    except MalformedMessageError as exc:
        raise bad(exc.message) from None
    algorithm_value = document["algorithm"]
    try:
        algorithm = SignatureAlgorithm(algorithm_value)
    except ValueError:
        raise bad(f"unknown algorithm {str(algorithm_value)[:40]!r}") from None
    pem = document["public_key"]
    if not isinstance(pem, str) or not pem.isascii():
        raise bad("public_key is not a PEM string")
    try:
        public_key = PublicKey.from_pem(pem.encode("ascii"))
    except MalformedMessageError as exc:
        raise bad(f"public_key: {exc.message}") from None
    if public_key.algorithm is not algorithm:
        raise bad(f"algorithm says {algorithm.value} but the key is {public_key.algorithm.value}")
    operator_id = document["operator_id"]
    if not isinstance(operator_id, str) or not _HEX_ID.match(operator_id):
        raise bad("operator_id is not 64 lowercase hex digits")
    if operator_id != public_key.key_id:
        raise bad(
            f"operator_id {operator_id[:16]}... is not the id of its public key "
            f"({public_key.key_id[:16]}...); the file was altered, ask its owner for a new one"
        )
    return name, public_key
