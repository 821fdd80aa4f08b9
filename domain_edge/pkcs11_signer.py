"""Operator tokens on PKCS#11 devices (smart cards, YubiKeys, SoftHSM2) behind `Signer`.

Signatures are the same as the in-memory and file signers make, so one `PublicKey` verifies
every signer alike:
- Ed25519 (`CKM_EDDSA`): pure EdDSA over the message, 64 raw bytes;
- ECDSA P-256 (`CKM_ECDSA`): SHA-256 of the message computed here, the token signs the digest,
  its raw r||s is DER-encoded here (tokens rarely offer `CKM_ECDSA_SHA256`; SoftHSM2 does not).

Invariants kept here:
- a token is found by its label, never by slot number (slot numbers change between runs);
- the PIN comes from a callback, asked only once the token has been found; it is never
  logged, kept, or put in a message; this process keeps only an HMAC of it under a random
  per-process key, so that a second session on a token this process already logged in to
  (PKCS#11 login is per application and token, and the token then accepts any PIN) still
  refuses a wrong PIN;
- keys are generated ON the token, sensitive and not extractable, with a fresh random
  CKA_ID (labels are not unique); a generated key that comes out extractable is destroyed;
- the public key is read from the token's public key object and re-encoded as canonical
  SubjectPublicKeyInfo DER, so `key_id` (the operator id) is the one a file token holding
  the same key would have;
- every signature is verified against that public key before it is returned: a token whose
  public and private objects disagree, or a faulty signature, is an error, not an approval;
- one session per signer, used under a lock (PKCS#11 sessions are not thread-safe).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Final

import pkcs11
import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, TokenFlag

from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.signers import PublicKey, SignatureAlgorithm, Signer

__all__ = [
    "CKA_ID_SIZE",
    "PinCallback",
    "Pkcs11Signer",
    "format_cka_id",
    "generate_pkcs11_key",
    "new_cka_id",
    "token_mechanisms",
]

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
_MAX_LABEL_CHARS: Final = 256

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


# --- keys on the token ---------------------------------------------------------------------


def _attribute(obj: Any, attribute: Any, default: Any = None) -> Any:
    try:
        return obj[attribute]
    except (p11err.AttributeTypeInvalid, p11err.AttributeSensitive, p11err.FunctionFailed):
        return default


def _algorithm_of(key_type: Any, ec_params: bytes | None) -> SignatureAlgorithm | None:
    if key_type == KeyType.EC_EDWARDS and ec_params in (_ED25519_OID_PARAMS, _ED25519_NAME_PARAMS):
        return SignatureAlgorithm.ED25519
    if key_type == KeyType.EC and ec_params == _P256_PARAMS:
        return SignatureAlgorithm.ECDSA_P256
    return None


def _unwrap_octet_string(point: bytes, sizes: tuple[int, ...]) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING holding the point; some tokens give the point bare."""
    for size in sizes:
        if len(point) == size + 2 and point[:2] == bytes((0x04, size)):
            return point[2:]
    return point


def _spki_from_point(algorithm: SignatureAlgorithm, ec_point: bytes, where: str) -> PublicKey:
    """The canonical SubjectPublicKeyInfo of a token's EC_POINT, as the file signer makes it."""
    if not isinstance(ec_point, bytes) or not ec_point:
        raise TokenError(f"{where}: the public key object has no EC_POINT")
    try:
        if algorithm is SignatureAlgorithm.ED25519:
            point = _unwrap_octet_string(ec_point, (_ED25519_KEY_SIZE,))
            if len(point) != _ED25519_KEY_SIZE:
                raise ValueError("wrong size")
            key: Any = ed25519.Ed25519PublicKey.from_public_bytes(point)
        else:
            point = _unwrap_octet_string(ec_point, (_P256_POINT_SIZE, _P256_COMPRESSED_SIZE))
            if len(point) not in (_P256_POINT_SIZE, _P256_COMPRESSED_SIZE):
                raise ValueError("wrong size")
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return PublicKey(algorithm, der)
    except (ValueError, MalformedMessageError):
        raise TokenError(
            f"{where}: the public key object holds no valid {algorithm.value} key"
        ) from None


def _key_criteria(key_label: str | None, cka_id: bytes | None) -> str:
    parts = []
    if key_label is not None:
        parts.append(f"label {key_label!r}")
    if cka_id is not None:
        parts.append(f"id {format_cka_id(cka_id)}")
    return " and ".join(parts) if parts else "any label"


def _describe_key(token_label: str, key_label: str | None, cka_id: bytes | None) -> str:
    return f"private key with {_key_criteria(key_label, cka_id)} on token {token_label!r}"


def _find_private_key(
    session: Any, token_label: str, key_label: str | None, cka_id: bytes | None
) -> Any:
    template: dict[Any, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if key_label is not None:
        template[Attribute.LABEL] = key_label
    if cka_id is not None:
        template[Attribute.ID] = cka_id
    try:
        found = [
            key
            for key in session.get_objects(template)
            if _attribute(key, Attribute.KEY_TYPE) in (KeyType.EC, KeyType.EC_EDWARDS)
        ]
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"cannot search token {token_label!r} for keys: {type(exc).__name__}"
        ) from None
    if not found:
        raise TokenNotFoundError(
            f"no EC or Ed25519 {_describe_key(token_label, key_label, cka_id)}; "
            "check the object= label and id= of the pkcs11: URI (`pkcs11-tool --list-objects "
            "--login` lists the keys)"
        )
    if len(found) > 1:
        ids = ", ".join(
            format_cka_id(bytes(_attribute(k, Attribute.ID, b"") or b"")) or "(none)"
            for k in found[:8]
        )
        if key_label is None and cka_id is None:
            raise TokenError(
                f"{len(found)} private keys are on token {token_label!r}; choose one with "
                f"object=LABEL or id=ID in the pkcs11: URI (ids: {ids})"
            )
        raise TokenError(
            f"{len(found)} private keys on token {token_label!r} match "
            f"{_key_criteria(key_label, cka_id)}; labels are not unique: choose one by its "
            f"id: add id=ID to the pkcs11: URI, ID one of {ids}"
        )
    return found[0]


def _find_public_key(session: Any, private_key: Any, token_label: str, what: str) -> Any:
    cka_id = bytes(_attribute(private_key, Attribute.ID, b"") or b"")
    template: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: _attribute(private_key, Attribute.KEY_TYPE),
    }
    if cka_id:
        template[Attribute.ID] = cka_id
    else:
        label = _attribute(private_key, Attribute.LABEL)
        if not label:
            raise TokenError(f"{what} has neither id nor label to find its public key by")
        template[Attribute.LABEL] = label
    try:
        found = list(session.get_objects(template))
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"cannot search token {token_label!r} for keys: {type(exc).__name__}"
        ) from None
    if len(found) != 1:
        raise TokenError(
            f"{what} has {'no' if not found else 'more than one'} matching public key object "
            f"(searched by {'id' if cka_id else 'label'}); this tool needs exactly one"
        )
    return found[0]


def _read_public_key(public_object: Any, what: str) -> PublicKey:
    key_type = _attribute(public_object, Attribute.KEY_TYPE)
    params = _attribute(public_object, Attribute.EC_PARAMS)
    algorithm = _algorithm_of(key_type, bytes(params) if params is not None else None)
    if algorithm is None:
        raise TokenError(
            f"{what} is neither Ed25519 nor EC P-256 (key type {key_type!r}); "
            "operator tokens must hold one of those"
        )
    point = _attribute(public_object, Attribute.EC_POINT)
    return _spki_from_point(algorithm, bytes(point) if point is not None else b"", what)


# --- the signer ----------------------------------------------------------------------------


class Pkcs11Signer(Signer):
    """A private key on a PKCS#11 token: it signs on the token, and never leaves it.

    Holds one logged-in session for its whole life; `close()` it (or use `with`) when done.
    `sign` is safe to call from several threads.
    """

    def __init__(
        self,
        *,
        session: Any,
        private_key: Any,
        public_key: PublicKey,
        module_path: str,
        token_label: str,
        key_label: str | None,
        cka_id: bytes,
        sensitive: bool,
        extractable: bool,
    ) -> None:
        """Use `Pkcs11Signer.open`; this constructor trusts what it is given."""
        self._session = session
        self._private_key = private_key
        self._public_key = public_key
        self._lock = threading.Lock()
        self._closed = False
        self.module_path = module_path
        self.token_label = token_label
        self.key_label = key_label
        self.cka_id = cka_id
        self.sensitive = sensitive
        self.extractable = extractable

    @classmethod
    def open(
        cls,
        module: str,
        token_label: str,
        key_label: str | None = None,
        cka_id: bytes | None = None,
        *,
        pin_callback: PinCallback | None = None,
    ) -> Pkcs11Signer:
        """Open the key named by `key_label` and/or `cka_id` on the token labelled `token_label`.

        With neither, the token must hold exactly one EC/Ed25519 private key. The PIN callback
        is called once, after the token is found (None: the token's PIN pad, if it has one).
        Raises TokenNotFoundError (module, token or key not found), WrongPassphraseError (wrong
        PIN), TokenError (several keys match, unsupported key, device failure).
        """
        if key_label is not None and (
            not isinstance(key_label, str) or not key_label or len(key_label) > _MAX_LABEL_CHARS
        ):
            raise InvalidInputError(f"the key label must be 1 to {_MAX_LABEL_CHARS} characters")
        if cka_id is not None and (not isinstance(cka_id, bytes) or not cka_id):
            raise InvalidInputError("the key id (CKA_ID) must be non-empty bytes")
        module_path = os.path.abspath(module)
        lib = _load_module(module_path)
        token = _find_token(lib, module_path, token_label)
        session = _open_session(token, module_path, pin_callback, rw=False)
        try:
            what = _describe_key(token_label, key_label, cka_id)
            private_key = _find_private_key(session, token_label, key_label, cka_id)
            if not _attribute(private_key, Attribute.SIGN, False):
                raise TokenError(f"the {what} is not allowed to sign (CKA_SIGN is false)")
            public_key = _read_public_key(
                _find_public_key(session, private_key, token_label, f"the {what}"), f"the {what}"
            )
            if not _supports(token_mechanisms(token), public_key.algorithm, generate=False):
                mechanism = _MECHANISMS[public_key.algorithm][1].name
                raise TokenError(
                    f"token {token_label!r} holds an {public_key.algorithm.value} key but does "
                    f"not offer CKM_{mechanism} to sign with it"
                )
            found_label = _attribute(private_key, Attribute.LABEL)
            return cls(
                session=session,
                private_key=private_key,
                public_key=public_key,
                module_path=module_path,
                token_label=token_label,
                key_label=str(found_label) if found_label else key_label,
                cka_id=bytes(_attribute(private_key, Attribute.ID, b"") or b""),
                sensitive=bool(_attribute(private_key, Attribute.SENSITIVE, False)),
                extractable=bool(_attribute(private_key, Attribute.EXTRACTABLE, True)),
            )
        except BaseException:
            _close_quietly(session)
            raise

    def __repr__(self) -> str:
        return (
            f"Pkcs11Signer(token={self.token_label!r}, key={self.key_label!r}, "
            f"{self.algorithm.value}, key_id={self.key_id[:16]})"
        )

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def never_leaves_token(self) -> bool:
        """True if the token marks the private key sensitive and not extractable."""
        return self.sensitive and not self.extractable

    def sign(self, message: bytes) -> bytes:
        if not isinstance(message, bytes):
            raise TypeError("message must be bytes")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            signature = self._sign_locked(message)
        try:
            self._public_key.verify(signature, message)
        except BadSignatureError:
            raise TokenError(
                f"token {self.token_label!r} made a signature that does not verify under its "
                "public key object; the token is faulty or its key objects do not match"
            ) from None
        return signature

    def _sign_locked(self, message: bytes) -> bytes:
        try:
            if self._public_key.algorithm is SignatureAlgorithm.ED25519:
                signature = bytes(self._private_key.sign(message, mechanism=Mechanism.EDDSA))
                if len(signature) != _ED25519_SIGNATURE_SIZE:
                    raise TokenError(
                        f"token {self.token_label!r} returned a {len(signature)}-byte Ed25519 "
                        "signature"
                    )
                return signature
            digest = hashlib.sha256(message).digest()
            raw = bytes(self._private_key.sign(digest, mechanism=Mechanism.ECDSA))
        except (
            p11err.SessionClosed,
            p11err.SessionHandleInvalid,
            p11err.DeviceRemoved,
            p11err.TokenNotPresent,
        ) as exc:
            raise TokenError(
                f"token {self.token_label!r} is gone ({type(exc).__name__}); plug it in and "
                "open it again"
            ) from None
        except p11err.UserNotLoggedIn:
            raise TokenError(
                f"token {self.token_label!r} logged this session out; open it again"
            ) from None
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"token {self.token_label!r} failed to sign: {type(exc).__name__}"
            ) from None
        if len(raw) != _P256_RAW_SIGNATURE_SIZE:
            raise TokenError(
                f"token {self.token_label!r} returned a {len(raw)}-byte ECDSA signature, "
                f"expected raw r||s of {_P256_RAW_SIGNATURE_SIZE} bytes"
            )
        half = _P256_RAW_SIGNATURE_SIZE // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def close(self) -> None:
        """End the session (the token logs this process out when its last session ends)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _close_quietly(self._session)

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _close_quietly(session: Any) -> None:
    with suppress(p11err.PKCS11Error):
        session.close()


# --- key generation ------------------------------------------------------------------------


@contextmanager
def _session_for_generation(
    module: str, token_label: str, pin: PinCallback | bytes | str
) -> Iterator[tuple[Any, Any]]:
    module_path = os.path.abspath(module)
    lib = _load_module(module_path)
    token = _find_token(lib, module_path, token_label)
    session = _open_session(token, module_path, pin, rw=True)
    try:
        yield token, session
    finally:
        _close_quietly(session)


def generate_pkcs11_key(
    module: str,
    token_label: str,
    pin: PinCallback | bytes | str,
    key_label: str,
    algorithm: SignatureAlgorithm | str | None = None,
    *,
    cka_id: bytes | None = None,
) -> PublicKey:
    """Generate a signing key pair ON the token; return its public key.

    `algorithm` None picks Ed25519 when the token offers CKM_EDDSA, else ECDSA P-256. The
    private key is a token object, private, sensitive, never extractable, allowed only to
    sign; the pair gets `cka_id` (default: a fresh random 16-byte id; see `new_cka_id`), which
    must not be in use on the token (AlreadyExistsError). Labels are not unique on tokens:
    open the key by its id afterwards. The new key signs once, and is checked, before return.
    """
    if not isinstance(key_label, str) or not key_label or len(key_label) > _MAX_LABEL_CHARS:
        raise InvalidInputError(f"the key label must be 1 to {_MAX_LABEL_CHARS} characters")
    if cka_id is None:
        cka_id = new_cka_id()
    if not isinstance(cka_id, bytes) or not cka_id:
        raise InvalidInputError("the key id (CKA_ID) must be non-empty bytes")
    wanted = None if algorithm is None else SignatureAlgorithm(algorithm)
    with _session_for_generation(module, token_label, pin) as (token, session):
        mechanisms = token_mechanisms(token)
        if wanted is None:
            wanted = (
                SignatureAlgorithm.ED25519
                if _supports(mechanisms, SignatureAlgorithm.ED25519, generate=True)
                else SignatureAlgorithm.ECDSA_P256
            )
        if not _supports(mechanisms, wanted, generate=True):
            generation, signing = _MECHANISMS[wanted]
            raise TokenError(
                f"token {token_label!r} cannot make {wanted.value} keys (it lacks CKM_"
                f"{generation.name} or CKM_{signing.name}); choose another --algorithm"
            )
        try:
            in_use = any(True for _ in session.get_objects({Attribute.ID: cka_id}))
        except p11err.PKCS11Error as exc:
            raise TokenError(f"cannot search token {token_label!r}: {type(exc).__name__}") from None
        if in_use:
            raise AlreadyExistsError(
                f"token {token_label!r} already holds an object with id {format_cka_id(cka_id)}"
            )
        public_object, private_object = _generate_pair(
            session, wanted, token_label, key_label, cka_id
        )
        what = _describe_key(token_label, key_label, cka_id)
        try:
            if _attribute(private_object, Attribute.EXTRACTABLE, True) or not _attribute(
                private_object, Attribute.SENSITIVE, False
            ):
                raise TokenError(
                    f"token {token_label!r} made the new key extractable or not sensitive; "
                    "it was destroyed (use a token that keeps private keys inside)"
                )
            public_key = _read_public_key(public_object, f"the new {what}")
            # Prove the pair signs and verifies before anyone trusts its public key; the
            # probe shares this session, which the context manager closes.
            probe = Pkcs11Signer(
                session=session,
                private_key=private_object,
                public_key=public_key,
                module_path=os.path.abspath(module),
                token_label=token_label,
                key_label=key_label,
                cka_id=cka_id,
                sensitive=True,
                extractable=False,
            )
            probe.sign(b"hsm-domain pkcs11 key generation self-test")
        except BaseException:
            for obj in (private_object, public_object):
                with suppress(p11err.PKCS11Error):
                    obj.destroy()
            raise
    return public_key


def _generate_pair(
    session: Any,
    algorithm: SignatureAlgorithm,
    token_label: str,
    key_label: str,
    cka_id: bytes,
) -> tuple[Any, Any]:
    public_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    params_choices: tuple[bytes, ...]
    if algorithm is SignatureAlgorithm.ED25519:
        key_type = KeyType.EC_EDWARDS
        params_choices = (_ED25519_OID_PARAMS, _ED25519_NAME_PARAMS)
    else:
        key_type = KeyType.EC
        params_choices = (_P256_PARAMS,)
    last_error: p11err.PKCS11Error | None = None
    for params in params_choices:
        try:
            pair: tuple[Any, Any] = session.generate_keypair(
                key_type,
                id=cka_id,
                label=key_label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={**public_template, Attribute.EC_PARAMS: params},
                private_template=private_template,
            )
            return pair
        except (
            p11err.DomainParamsInvalid,
            p11err.AttributeValueInvalid,
            p11err.TemplateInconsistent,
        ) as exc:
            # Some tokens name Ed25519 by OID, older ones by "edwards25519": try the next.
            last_error = exc
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"token {token_label!r} failed to generate an {algorithm.value} key: "
                f"{type(exc).__name__}"
            ) from None
    assert last_error is not None
    raise TokenError(
        f"token {token_label!r} refused to generate an {algorithm.value} key: "
        f"{type(last_error).__name__}"
    )
