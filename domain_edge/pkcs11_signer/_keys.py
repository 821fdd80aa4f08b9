"""Finding a key pair on a token and reading its public key as canonical SubjectPublicKeyInfo.

Invariant: the public key is read from the token's public key object and re-encoded as
canonical SubjectPublicKeyInfo DER, so `key_id` (the operator id) is the one a file token
holding the same key would have.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, ObjectClass

from domain_core.errors import (
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
)
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_edge.pkcs11_signer._token import (
    _ED25519_KEY_SIZE,
    _ED25519_NAME_PARAMS,
    _ED25519_OID_PARAMS,
    _P256_COMPRESSED_SIZE,
    _P256_PARAMS,
    _P256_POINT_SIZE,
    format_cka_id,
)


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
