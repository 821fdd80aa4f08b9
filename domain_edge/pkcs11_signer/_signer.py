"""`Pkcs11Signer`: a `Signer` whose private key never leaves its token.

Invariants: every signature is verified against the token's public key before it is
returned (a token whose objects disagree, or a faulty signature, is an error, not an
approval); one session per signer, used under a lock (PKCS#11 sessions are not
thread-safe).
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import suppress
from types import TracebackType
from typing import Any

import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, Mechanism

from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    TokenError,
)
from domain_core.limits import MAX_KEY_LABEL_CHARS
from domain_core.signers import PublicKey, SignatureAlgorithm, Signer
from domain_edge.pkcs11_signer._keys import (
    _attribute,
    _describe_key,
    _find_private_key,
    _find_public_key,
    _read_public_key,
)
from domain_edge.pkcs11_signer._token import (
    _ED25519_SIGNATURE_SIZE,
    _MECHANISMS,
    _P256_RAW_SIGNATURE_SIZE,
    PinCallback,
    _find_token,
    _load_module,
    _open_session,
    _supports,
    token_mechanisms,
)


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
            not isinstance(key_label, str) or not key_label or len(key_label) > MAX_KEY_LABEL_CHARS
        ):
            raise InvalidInputError(f"the key label must be 1 to {MAX_KEY_LABEL_CHARS} characters")
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
