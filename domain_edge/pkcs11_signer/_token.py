"""Reaching a PKCS#11 token: loading its module, finding it by label, logging in.

Invariants: a token is found by its label, never by slot number; the PIN comes from a
callback asked only once the token has been found, and is never logged, kept or put in a
message; this process keeps only an HMAC of it under a random per-process key, so a second
session on a token this process already logged in to still refuses a wrong PIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11err
from pkcs11 import Mechanism, TokenFlag

from domain_core.errors import (
    InvalidInputError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.signers import SignatureAlgorithm

PinCallback = Callable[[], bytes | str]
"""Returns the user PIN of a token (bytes are decoded as UTF-8)."""

CKA_ID_SIZE: Final = 16
"""Bytes of random CKA_ID given to each generated key pair."""

# DER of the curve parameters (CKA_EC_PARAMS): P-256 as a named curve OID; Ed25519 as the
# RFC 8410 OID (PKCS#11 3.0 also allows the PrintableString "edwards25519"; both are read).
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
_ED25519_OID_PARAMS: Final = bytes.fromhex("06032b6570")
_ED25519_NAME_PARAMS: Final = b"\x13\x0c" + b"edwards25519"
_P256_POINT_SIZE: Final = 65  # uncompressed: 0x04 || X || Y
_P256_COMPRESSED_SIZE: Final = 33
_ED25519_KEY_SIZE: Final = 32
_ED25519_SIGNATURE_SIZE: Final = 64
_P256_RAW_SIGNATURE_SIZE: Final = 64

# What each algorithm needs from the token: (key-pair generation, signing) mechanisms.
_MECHANISMS: Final = {
    SignatureAlgorithm.ED25519: (Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA),
    SignatureAlgorithm.ECDSA_P256: (Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA),
}

# Per-process record of the PINs that logged this process in to a token: HMAC only.
_PIN_MAC_KEY: Final = secrets.token_bytes(32)
_logins: dict[tuple[str, str, bytes], bytes] = {}
_logins_lock = threading.Lock()


def new_cka_id() -> bytes:
    """A fresh random CKA_ID for a key pair (16 bytes: unique without coordination)."""
    return secrets.token_bytes(CKA_ID_SIZE)


def format_cka_id(cka_id: bytes) -> str:
    """A CKA_ID as RFC 7512 writes it in a `pkcs11:` URI: every byte percent-encoded."""
    return "".join(f"%{b:02x}" for b in cka_id)


# --- loading the module and finding the token ----------------------------------------------


def _load_module(module_path: str) -> Any:
    """Load (once per process) a PKCS#11 module; TokenNotFoundError naming the path if it fails.

    The path is made absolute first, so a bare name is never searched on the library path.
    """
    if not isinstance(module_path, str) or not module_path:
        raise InvalidInputError("the PKCS#11 module path is empty")
    path = os.path.abspath(module_path)
    if not os.path.isfile(path):
        raise TokenNotFoundError(
            f"no PKCS#11 module at {path}; install it (SoftHSM2: libsofthsm2.so, smart cards "
            "and YubiKeys: opensc-pkcs11.so) or give its path"
        )
    try:
        return pkcs11.lib(path)
    except p11err.PKCS11Error as exc:
        raise TokenNotFoundError(
            f"cannot load PKCS#11 module {path}: {_error_text(exc) or 'not a PKCS#11 module'}"
        ) from None


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _find_token(lib: Any, module_path: str, token_label: str) -> Any:
    if not isinstance(token_label, str) or not token_label:
        raise InvalidInputError("the token label is empty; give the label the token was made with")
    try:
        return lib.get_token(token_label=token_label)
    except p11err.NoSuchToken:
        labels = _present_labels(lib)
        present = ", ".join(repr(label) for label in labels) if labels else "none"
        raise TokenNotFoundError(
            f"no token labelled {token_label!r} in PKCS#11 module {os.path.abspath(module_path)} "
            f"(tokens present: {present}); check the label and that the device is plugged in"
        ) from None
    except p11err.MultipleTokensReturned:
        raise TokenError(
            f"more than one token is labelled {token_label!r} in PKCS#11 module "
            f"{os.path.abspath(module_path)}; give each token a unique label"
        ) from None
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"cannot list the tokens of PKCS#11 module {os.path.abspath(module_path)}: "
            f"{type(exc).__name__}"
        ) from None


def _present_labels(lib: Any) -> list[str]:
    try:
        return sorted({str(t.label) for t in lib.get_tokens() if t.label})[:20]
    except p11err.PKCS11Error:
        return []


def token_mechanisms(token: Any) -> frozenset[Any]:
    """The mechanisms a token's slot offers (empty if the token will not say)."""
    try:
        return frozenset(token.slot.get_mechanisms())
    except p11err.PKCS11Error:
        return frozenset()


def _supports(mechanisms: frozenset[Any], algorithm: SignatureAlgorithm, *, generate: bool) -> bool:
    generation, signing = _MECHANISMS[algorithm]
    return signing in mechanisms and (not generate or generation in mechanisms)


# --- logging in ----------------------------------------------------------------------------


def _pin_text(pin: bytes | str, token_label: str) -> str:
    if isinstance(pin, bytes):
        try:
            return pin.decode("utf-8")
        except UnicodeDecodeError:
            raise WrongPassphraseError(
                f"the PIN for token {token_label} is not valid UTF-8 text"
            ) from None
    if isinstance(pin, str):
        return pin
    raise TypeError("the PIN callback must return bytes or str")


def _login_key(module_path: str, token: Any) -> tuple[str, str, bytes]:
    serial = token.serial
    return (os.path.abspath(module_path), str(token.label), bytes(serial or b""))


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


def _open_session(
    token: Any, module_path: str, pin_source: PinCallback | bytes | str | None, *, rw: bool
) -> Any:
    """Open a session on `token` logged in as the user; map PIN failures to domain errors."""
    label = str(token.label)
    if pin_source is None:
        if not token.flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
            raise TokenError(f"token {label} needs a PIN and none was given")
        pin_value: object = pkcs11.PROTECTED_AUTH
        mac = None
    else:
        raw = pin_source() if callable(pin_source) else pin_source
        pin = _pin_text(raw, label)
        mac = _pin_mac(pin)
        pin_value = pin
        del raw, pin
    key = _login_key(module_path, token)
    try:
        session = token.open(rw=rw, user_pin=pin_value)
    except (p11err.PinIncorrect, p11err.PinInvalid, p11err.PinLenRange):
        raise WrongPassphraseError(f"wrong PIN for token {label}") from None
    except p11err.PinLocked:
        raise TokenError(
            f"the user PIN of token {label} is locked after too many wrong PINs; "
            "unblock it with the token's SO PIN or PUK"
        ) from None
    except p11err.PinExpired:
        raise TokenError(f"the user PIN of token {label} has expired; set a new one") from None
    except p11err.UserPinNotInitialized:
        raise TokenError(f"token {label} has no user PIN yet; initialise it first") from None
    except p11err.UserAlreadyLoggedIn:
        # This process holds another logged-in session on the token, which now accepts any
        # PIN: check this one against the PIN that logged in.
        with _logins_lock:
            known = _logins.get(key)
        if known is None or mac is None:
            raise TokenError(
                f"token {label} is already logged in by this process through another "
                "library, so the PIN cannot be checked; close that session first"
            ) from None
        if not hmac.compare_digest(known, mac):
            raise WrongPassphraseError(f"wrong PIN for token {label}") from None
        session = _open_unauthenticated(token, label, rw=rw)
    except p11err.PKCS11Error as exc:
        raise TokenError(f"cannot log in to token {label}: {type(exc).__name__}") from None
    if mac is not None:
        with _logins_lock:
            _logins[key] = mac
    return session


def _open_unauthenticated(token: Any, label: str, *, rw: bool) -> Any:
    try:
        return token.open(rw=rw)
    except p11err.PKCS11Error as exc:
        raise TokenError(f"cannot open a session on token {label}: {type(exc).__name__}") from None
