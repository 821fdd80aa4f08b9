"""Generating a key pair ON a token.

Invariants: keys are generated on the token, sensitive and not extractable, with a fresh
random CKA_ID (labels are not unique); a generated key that comes out extractable is
destroyed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pkcs11.exceptions as p11err
from pkcs11 import Attribute, KeyType, MechanismFlag

from domain_core.errors import (
    AlreadyExistsError,
    InvalidInputError,
    TokenError,
)
from domain_core.limits import MAX_KEY_LABEL_CHARS
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_edge.pkcs11_signer._keys import _attribute, _describe_key, _read_public_key
from domain_edge.pkcs11_signer._signer import Pkcs11Signer, _close_quietly
from domain_edge.pkcs11_signer._token import (
    _ED25519_NAME_PARAMS,
    _ED25519_OID_PARAMS,
    _MECHANISMS,
    _P256_PARAMS,
    PinCallback,
    _find_token,
    _load_module,
    _open_session,
    _supports,
    format_cka_id,
    new_cka_id,
    token_mechanisms,
)


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
    if not isinstance(key_label, str) or not key_label or len(key_label) > MAX_KEY_LABEL_CHARS:
        raise InvalidInputError(f"the key label must be 1 to {MAX_KEY_LABEL_CHARS} characters")
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
