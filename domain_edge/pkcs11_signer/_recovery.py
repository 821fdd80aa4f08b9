"""An operator's recovery key on a PKCS#11 token: P-256 for ECDH (`CKM_ECDH1_DERIVE`).

Invariants: the key is generated on the token, sensitive and not extractable, allowed to
derive and nothing else (not to sign: it is not the operator's signing key and never signs
for them); it is found afterwards by its random CKA_ID. `agree` computes the ECDH of the key
with a sealed share's ephemeral point on the token; the shared secret comes back as a
session-only, non-sensitive secret object (the form PKCS#11 returns a derived value in),
which is read and destroyed at once. Tokens without X25519 in python-pkcs11 (no
CKK_EC_MONTGOMERY) are why this is P-256.
"""

from __future__ import annotations

import os
from contextlib import suppress
from types import TracebackType
from typing import Any, Final

import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import KDF, Attribute, KeyType, Mechanism, MechanismFlag

from domain_core.crypto import constant_time_equal
from domain_core.errors import AlreadyExistsError, InvalidInputError, TokenError
from domain_core.limits import MAX_KEY_LABEL_CHARS
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_core.signers import SignatureAlgorithm
from domain_edge.pkcs11_signer._keys import (
    _attribute,
    _describe_key,
    _find_private_key,
    _find_public_key,
    _read_public_key,
)
from domain_edge.pkcs11_signer._signer import _close_quietly
from domain_edge.pkcs11_signer._token import (
    _P256_PARAMS,
    PinCallback,
    _find_token,
    _load_module,
    _open_session,
    format_cka_id,
    new_cka_id,
    token_mechanisms,
)

__all__ = ["Pkcs11RecoveryKey", "generate_pkcs11_recovery_key"]

_POINT_BYTES: Final = 65
_SECRET_BYTES: Final = 32


def _check_label_and_id(key_label: str | None, cka_id: bytes | None) -> None:
    if key_label is not None and (
        not isinstance(key_label, str) or not key_label or len(key_label) > MAX_KEY_LABEL_CHARS
    ):
        raise InvalidInputError(f"the key label must be 1 to {MAX_KEY_LABEL_CHARS} characters")
    if cka_id is not None and (not isinstance(cka_id, bytes) or not cka_id):
        raise InvalidInputError("the key id (CKA_ID) must be non-empty bytes")


class Pkcs11RecoveryKey:
    """A P-256 recovery key on a PKCS#11 token: its public key, and ECDH on the token.

    Holds one logged-in session; `close()` it (or use `with`) when done.
    """

    algorithm = RecoveryAlgorithm.P256

    def __init__(
        self, *, session: Any, private_key: Any, public_key: bytes, token_label: str, cka_id: bytes
    ) -> None:
        """Use `open`; this constructor trusts what it is given."""
        self._session = session
        self._private_key = private_key
        self.public_key = public_key  # SubjectPublicKeyInfo DER
        self.token_label = token_label
        self.cka_id = cka_id

    @classmethod
    def open(
        cls,
        module: str,
        token_label: str,
        key_label: str | None = None,
        cka_id: bytes | None = None,
        *,
        pin_callback: PinCallback | None = None,
    ) -> Pkcs11RecoveryKey:
        """Open the recovery key named by `key_label` and/or `cka_id` on token `token_label`.

        TokenError when the key is not a P-256 key allowed to derive, or the token lacks
        CKM_ECDH1_DERIVE.
        """
        _check_label_and_id(key_label, cka_id)
        module_path = os.path.abspath(module)
        lib = _load_module(module_path)
        token = _find_token(lib, module_path, token_label)
        session = _open_session(token, module_path, pin_callback, rw=False)
        try:
            return cls._from_session(session, token, token_label, key_label, cka_id)
        except BaseException:
            _close_quietly(session)
            raise

    @classmethod
    def _from_session(
        cls,
        session: Any,
        token: Any,
        token_label: str,
        key_label: str | None,
        cka_id: bytes | None,
    ) -> Pkcs11RecoveryKey:
        what = _describe_key(token_label, key_label, cka_id)
        private_key = _find_private_key(session, token_label, key_label, cka_id)
        if not _attribute(private_key, Attribute.DERIVE, False):
            raise TokenError(
                f"the {what} is not allowed to derive (CKA_DERIVE is false): it is not a "
                "recovery key; name the key `recovery enroll --pkcs11` made"
            )
        public = _read_public_key(
            _find_public_key(session, private_key, token_label, f"the {what}"), f"the {what}"
        )
        if public.algorithm is not SignatureAlgorithm.ECDSA_P256:
            raise TokenError(f"the {what} is not a P-256 key; recovery keys on tokens are P-256")
        if Mechanism.ECDH1_DERIVE not in token_mechanisms(token):
            raise TokenError(f"token {token_label!r} does not offer CKM_ECDH1_DERIVE")
        return cls(
            session=session,
            private_key=private_key,
            public_key=public.spki_der,
            token_label=token_label,
            cka_id=bytes(_attribute(private_key, Attribute.ID, b"") or b""),
        )

    def agree(self, ephemeral_public_key: bytes) -> bytes:
        """ECDH of the token's key with `ephemeral_public_key` (an uncompressed P-256 point)."""
        if len(ephemeral_public_key) != _POINT_BYTES or ephemeral_public_key[0] != 4:
            raise InvalidInputError("a P-256 ephemeral public key is a 65-byte uncompressed point")
        try:
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral_public_key)
        except ValueError:
            raise InvalidInputError("the ephemeral public key is not a point on P-256") from None
        try:
            derived = self._private_key.derive_key(
                KeyType.GENERIC_SECRET,
                _SECRET_BYTES * 8,
                mechanism_param=(KDF.NULL, None, ephemeral_public_key),
                template={
                    Attribute.TOKEN: False,
                    Attribute.SENSITIVE: False,
                    Attribute.EXTRACTABLE: True,
                },
            )
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"token {self.token_label!r} failed to compute the key agreement: "
                f"{type(exc).__name__}"
            ) from None
        try:
            secret = bytes(derived[Attribute.VALUE])
        finally:
            with suppress(p11err.PKCS11Error):
                derived.destroy()
        if len(secret) != _SECRET_BYTES:
            raise TokenError(f"token {self.token_label!r} returned a {len(secret)}-byte secret")
        return secret

    def close(self) -> None:
        """End the session."""
        _close_quietly(self._session)

    def __enter__(self) -> Pkcs11RecoveryKey:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pkcs11RecoveryKey(token={self.token_label!r}, id={format_cka_id(self.cka_id)})"


def generate_pkcs11_recovery_key(
    module: str,
    token_label: str,
    pin: PinCallback | bytes | str,
    key_label: str,
    *,
    cka_id: bytes | None = None,
) -> bytes:
    """Generate a P-256 recovery key ON the token (sensitive, not extractable, derive only);
    return its SubjectPublicKeyInfo DER. The new key computes one agreement, checked against
    the same agreement done here with a throwaway key, before it is returned."""
    _check_label_and_id(key_label, None)
    if cka_id is None:
        cka_id = new_cka_id()
    _check_label_and_id(None, cka_id)
    module_path = os.path.abspath(module)
    lib = _load_module(module_path)
    token = _find_token(lib, module_path, token_label)
    session = _open_session(token, module_path, pin, rw=True)
    try:
        mechanisms = token_mechanisms(token)
        if not {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDH1_DERIVE} <= mechanisms:
            raise TokenError(
                f"token {token_label!r} cannot make P-256 recovery keys (it lacks "
                "CKM_EC_KEY_PAIR_GEN or CKM_ECDH1_DERIVE)"
            )
        try:
            in_use = any(True for _ in session.get_objects({Attribute.ID: cka_id}))
        except p11err.PKCS11Error as exc:
            raise TokenError(f"cannot search token {token_label!r}: {type(exc).__name__}") from None
        if in_use:
            raise AlreadyExistsError(
                f"token {token_label!r} already holds an object with id {format_cka_id(cka_id)}"
            )
        public_object, private_object = _generate_pair(session, token_label, key_label, cka_id)
        try:
            if _attribute(private_object, Attribute.EXTRACTABLE, True) or not _attribute(
                private_object, Attribute.SENSITIVE, False
            ):
                raise TokenError(
                    f"token {token_label!r} made the new key extractable or not sensitive; "
                    "it was destroyed (use a token that keeps private keys inside)"
                )
            probe = Pkcs11RecoveryKey._from_session(session, token, token_label, key_label, cka_id)
            _self_test(probe)
            public_key = probe.public_key
        except BaseException:
            for obj in (private_object, public_object):
                with suppress(p11err.PKCS11Error):
                    obj.destroy()
            raise
    finally:
        _close_quietly(session)
    return public_key


def _generate_pair(
    session: Any, token_label: str, key_label: str, cka_id: bytes
) -> tuple[Any, Any]:
    """A P-256 pair on the token: the private key sensitive, not extractable, derive only."""
    try:
        pair: tuple[Any, Any] = session.generate_keypair(
            KeyType.EC,
            id=cka_id,
            label=key_label,
            store=True,
            capabilities=MechanismFlag.DERIVE,
            public_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: False,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
                Attribute.EC_PARAMS: _P256_PARAMS,
            },
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: False,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: True,
            },
        )
        return pair
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"token {token_label!r} failed to generate a P-256 recovery key: {type(exc).__name__}"
        ) from None


def _self_test(key: Pkcs11RecoveryKey) -> None:
    """The token's agreement equals the one computed here from the other side."""
    ours = ec.generate_private_key(ec.SECP256R1())
    point = ours.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    loaded = serialization.load_der_public_key(key.public_key)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    if not constant_time_equal(key.agree(point), ours.exchange(ec.ECDH(), loaded)):
        raise TokenError(
            f"token {key.token_label!r} computed a key agreement that does not match its "
            "public key; the token is faulty or its key objects do not match"
        )
