"""Every key-service call of the clients as one value (`Call`): its method, its checked
request, and what makes the caller's result of the response. `KeyClient` and `AsyncKeyClient`
build their calls here, so both check inputs and answers alike and differ only in how they
wait.

Invariants: inputs are checked before anything is sent (types, the plaintext limit, the
encryption context as the service checks it); an answer that is not what was asked for (a
blob that is no ciphertext, a key or random bytes of the wrong length) is an HsmDomainError;
no plaintext or data key is ever put in a message.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from domain_core import importtokens, keyspecs
from domain_core.ciphertext import parse_header
from domain_core.errors import (
    HsmDomainError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
)
from domain_core.limits import Limits
from domain_edge.kms_client._core import checked_context
from domain_edge.kms_client._policies import (
    Grant,
    KeyMetadata,
    _policy_message,
    conditions_from_json,
    operation_number,
)
from domain_proto import keys_pb2, services_pb2

T = TypeVar("T")
DEFAULT_PAGE_SIZE: Final = 100
_SYMMETRIC: Final = "SYMMETRIC_DEFAULT"


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One call: `method` with `request`; `shape(response)` is the caller's result."""

    method: str
    request: Any
    shape: Callable[[Any], T]


def _enum(number: int) -> Any:
    """A proto enum field's value from a number `keyspecs` checked (the stubs type the fields
    as their enum classes)."""
    return number


def _metadata(response: services_pb2.KeyMetadataResponse) -> KeyMetadata:
    return KeyMetadata.from_message(response.metadata)


def _key_call(method: str, key_id: str) -> Call[KeyMetadata]:
    return Call(method, services_pb2.KeyIdRequest(key_id=key_id), _metadata)


def _checked_blob(blob: bytes, limits: Limits, method: str) -> bytes:
    try:
        parse_header(blob, limits)
    except InvalidCiphertextError:
        raise HsmDomainError(f"{method} returned something that is not a ciphertext blob") from None
    return blob


def _blob_of(method: str, limits: Limits) -> Callable[[Any], bytes]:
    return lambda response: _checked_blob(response.ciphertext_blob, limits, method)


def _bytes(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    return value


def create_key(
    description: str,
    policy: keys_pb2.KeyPolicy | Mapping[str, Any] | None,
    enable_rotation: bool,
    rotation_period_days: int,
    idempotency_key: str | None,
    key_spec: str = "SYMMETRIC_DEFAULT",
    key_usage: str = "ENCRYPT_DECRYPT",
    origin: str = "DOMAIN",
    tags: Mapping[str, str] | None = None,
) -> Call[KeyMetadata]:
    """CreateKey, always with an idempotency key (the given one or a fresh UUID)."""
    request = services_pb2.CreateKeyRequest(
        description=description,
        policy=_policy_message(policy),
        enable_rotation=enable_rotation,
        rotation_period_days=rotation_period_days,
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        key_spec=_enum(keyspecs.spec_from_name(key_spec)),
        key_usage=_enum(keyspecs.usage_from_name(key_usage)),
        origin=_enum(_origin(origin)),
        tags=dict(tags or {}),
    )
    return Call("CreateKey", request, _metadata)


def _origin(name: str) -> int:
    if name not in ("DOMAIN", "EXTERNAL"):
        raise InvalidInputError("origin must be DOMAIN (material made in the domain) or EXTERNAL")
    return keys_pb2.KEY_ORIGIN_EXTERNAL if name == "EXTERNAL" else keys_pb2.KEY_ORIGIN_DOMAIN


def describe_key(key_id: str) -> Call[KeyMetadata]:
    return _key_call("DescribeKey", key_id)


def rotate_key(key_id: str) -> Call[KeyMetadata]:
    return _key_call("RotateKey", key_id)


def enable_key(key_id: str) -> Call[KeyMetadata]:
    return _key_call("EnableKey", key_id)


def disable_key(key_id: str) -> Call[KeyMetadata]:
    return _key_call("DisableKey", key_id)


def cancel_key_deletion(key_id: str) -> Call[KeyMetadata]:
    return _key_call("CancelKeyDeletion", key_id)


def put_key_policy(
    key_id: str, policy: keys_pb2.KeyPolicy | Mapping[str, Any]
) -> Call[KeyMetadata]:
    request = services_pb2.PutKeyPolicyRequest(key_id=key_id, policy=_policy_message(policy))
    return Call("PutKeyPolicy", request, _metadata)


def schedule_key_deletion(key_id: str, days: int) -> Call[KeyMetadata]:
    request = services_pb2.ScheduleKeyDeletionRequest(key_id=key_id, pending_window_days=days)
    return Call("ScheduleKeyDeletion", request, _metadata)


def list_keys_page(page_size: int, token: str) -> Call[tuple[list[KeyMetadata], str]]:
    """One page of ListKeys: (its keys, the next page's token, "" after the last); a server
    that returns the same token again is an HsmDomainError (it would loop forever)."""

    def shape(response: services_pb2.ListKeysResponse) -> tuple[list[KeyMetadata], str]:
        if response.next_page_token and response.next_page_token == token:
            raise HsmDomainError("the key service returned the same page token twice")
        return [KeyMetadata.from_message(m) for m in response.keys], response.next_page_token

    request = services_pb2.ListKeysRequest(limit=page_size, page_token=token)
    return Call("ListKeys", request, shape)


def encrypt(
    limits: Limits,
    key_id: str,
    plaintext: bytes,
    context: Mapping[str, str] | None,
    algorithm: str | None = None,
) -> Call[bytes]:
    """Encrypt at most `limits.max_plaintext_bytes`; the result is the checked blob (with an
    RSA `algorithm`, the bare RSA-OAEP ciphertext)."""
    _bytes(plaintext, "plaintext")
    if len(plaintext) > limits.max_plaintext_bytes:
        raise LimitExceededError(
            f"plaintext is {len(plaintext)} bytes; Encrypt takes at most "
            f"{limits.max_plaintext_bytes}: use envelope encryption for larger data"
        )
    request = services_pb2.EncryptRequest(
        key_id=key_id, plaintext=plaintext, encryption_context=checked_context(context, limits)
    )
    if algorithm is None or algorithm == _SYMMETRIC:
        return Call("Encrypt", request, _blob_of("Encrypt", limits))
    request.encryption_algorithm = _enum(keyspecs.encryption_algorithm_from_name(algorithm))
    return Call("Encrypt", request, lambda response: bytes(response.ciphertext_blob))


def decrypt(
    limits: Limits,
    blob: bytes,
    context: Mapping[str, str] | None,
    key_id: str | None,
    algorithm: str | None = None,
) -> Call[bytes]:
    """Decrypt a blob (with `key_id`, only a blob of that key; an RSA `algorithm` needs it);
    the result is the plaintext."""
    request = services_pb2.DecryptRequest(
        ciphertext_blob=_bytes(blob, "blob"),
        encryption_context=checked_context(context, limits),
        key_id=key_id or "",
    )
    if algorithm is not None:
        request.encryption_algorithm = _enum(keyspecs.encryption_algorithm_from_name(algorithm))
    return Call("Decrypt", request, lambda response: bytes(response.plaintext))


def re_encrypt(
    limits: Limits,
    blob: bytes,
    destination_key_id: str,
    source_context: Mapping[str, str] | None,
    destination_context: Mapping[str, str] | None,
) -> Call[bytes]:
    """ReEncrypt a blob under another key or context; the result is the checked new blob."""
    request = services_pb2.ReEncryptRequest(
        ciphertext_blob=_bytes(blob, "blob"),
        source_encryption_context=checked_context(source_context, limits),
        destination_key_id=destination_key_id,
        destination_encryption_context=checked_context(destination_context, limits),
    )
    return Call("ReEncrypt", request, _blob_of("ReEncrypt", limits))


def _data_key_request(
    limits: Limits, key_id: str, context: Mapping[str, str] | None, number_of_bytes: int
) -> services_pb2.GenerateDataKeyRequest:
    return services_pb2.GenerateDataKeyRequest(
        key_id=key_id,
        encryption_context=checked_context(context, limits),
        number_of_bytes=number_of_bytes,
    )


def generate_data_key(
    limits: Limits, key_id: str, context: Mapping[str, str] | None, number_of_bytes: int
) -> Call[tuple[bytes, bytes]]:
    """GenerateDataKey; the result is (plaintext key of the asked length, its checked blob)."""

    def shape(response: services_pb2.GenerateDataKeyResponse) -> tuple[bytes, bytes]:
        if len(response.plaintext) != number_of_bytes:
            raise HsmDomainError(
                f"GenerateDataKey returned a key of {len(response.plaintext)} bytes, "
                f"not {number_of_bytes}"
            )
        blob = _checked_blob(response.ciphertext_blob, limits, "GenerateDataKey")
        return bytes(response.plaintext), blob

    request = _data_key_request(limits, key_id, context, number_of_bytes)
    return Call("GenerateDataKey", request, shape)


def generate_data_key_without_plaintext(
    limits: Limits, key_id: str, context: Mapping[str, str] | None, number_of_bytes: int
) -> Call[bytes]:
    """GenerateDataKeyWithoutPlaintext; the result is the checked blob."""
    method = "GenerateDataKeyWithoutPlaintext"
    request = _data_key_request(limits, key_id, context, number_of_bytes)
    return Call(method, request, _blob_of(method, limits))


def generate_random(number_of_bytes: int) -> Call[bytes]:
    """GenerateRandom; the result is exactly `number_of_bytes` bytes."""

    def shape(response: services_pb2.GenerateRandomResponse) -> bytes:
        if len(response.random) != number_of_bytes:
            raise HsmDomainError(
                f"GenerateRandom returned {len(response.random)} bytes, not {number_of_bytes}"
            )
        return bytes(response.random)

    request = services_pb2.GenerateRandomRequest(number_of_bytes=number_of_bytes)
    return Call("GenerateRandom", request, shape)


# --- key specs other than symmetric encryption (docs/kms-client.md "Key specs") ----------


@dataclass(frozen=True)
class PublicKey:
    """An asymmetric key's public half as GetPublicKey gives it (names as AWS KMS's)."""

    key_id: str
    public_key: bytes
    """DER SubjectPublicKeyInfo (`cryptography`'s `load_der_public_key`, `openssl pkey
    -pubin -inform DER`)."""
    key_spec: str
    key_usage: str
    signing_algorithms: tuple[str, ...]
    encryption_algorithms: tuple[str, ...]


@dataclass(frozen=True)
class DataKeyPair:
    """A key pair GenerateDataKeyPair made: the private key (PKCS#8 DER; empty without
    plaintext), its blob under the symmetric key (Decrypt gives the DER back), the public key
    (DER SubjectPublicKeyInfo)."""

    key_id: str
    private_key: bytes = field(repr=False)
    private_key_blob: bytes
    public_key: bytes
    key_pair_spec: str


def _message(value: object, name: str, limits: Limits) -> bytes:
    data = _bytes(value, name)
    if not 1 <= len(data) <= limits.max_plaintext_bytes:
        raise LimitExceededError(
            f"{name} must be 1 to {limits.max_plaintext_bytes} bytes, not {len(data)}"
        )
    return data


def sign(limits: Limits, key_id: str, message: bytes, algorithm: str, digest: bool) -> Call[bytes]:
    """Sign a message (or, with `digest`, its digest); the result is the signature."""
    request = services_pb2.SignRequest(
        key_id=key_id,
        message=_message(message, "message", limits),
        message_type=keys_pb2.MESSAGE_TYPE_DIGEST if digest else keys_pb2.MESSAGE_TYPE_RAW,
        signing_algorithm=_enum(keyspecs.signing_algorithm_from_name(algorithm)),
    )
    return Call("Sign", request, lambda response: bytes(response.signature))


def verify(
    limits: Limits, key_id: str, message: bytes, signature: bytes, algorithm: str, digest: bool
) -> Call[bool]:
    """Verify a signature; the result is whether it verifies."""
    request = services_pb2.VerifyRequest(
        key_id=key_id,
        message=_message(message, "message", limits),
        message_type=keys_pb2.MESSAGE_TYPE_DIGEST if digest else keys_pb2.MESSAGE_TYPE_RAW,
        signature=_bytes(signature, "signature"),
        signing_algorithm=_enum(keyspecs.signing_algorithm_from_name(algorithm)),
    )
    return Call("Verify", request, lambda response: bool(response.signature_valid))


def get_public_key(key_id: str) -> Call[PublicKey]:
    """GetPublicKey; the result names the spec, usage and algorithms as AWS KMS does."""

    def shape(response: services_pb2.GetPublicKeyResponse) -> PublicKey:
        return PublicKey(
            key_id=response.key_id,
            public_key=bytes(response.public_key),
            key_spec=keyspecs.spec_name(response.key_spec),
            key_usage=keyspecs.usage_name(response.key_usage),
            signing_algorithms=tuple(
                keyspecs.signing_algorithm_name(a) for a in response.signing_algorithms
            ),
            encryption_algorithms=tuple(
                keyspecs.encryption_algorithm_name(a) for a in response.encryption_algorithms
            ),
        )

    return Call("GetPublicKey", services_pb2.KeyIdRequest(key_id=key_id), shape)


def generate_mac(limits: Limits, key_id: str, message: bytes, algorithm: str) -> Call[bytes]:
    """GenerateMac; the result is the MAC."""
    request = services_pb2.GenerateMacRequest(
        key_id=key_id,
        message=_message(message, "message", limits),
        mac_algorithm=_enum(keyspecs.mac_algorithm_from_name(algorithm)),
    )
    return Call("GenerateMac", request, lambda response: bytes(response.mac))


def verify_mac(
    limits: Limits, key_id: str, message: bytes, mac: bytes, algorithm: str
) -> Call[bool]:
    """VerifyMac; the result is whether the MAC matches."""
    request = services_pb2.VerifyMacRequest(
        key_id=key_id,
        message=_message(message, "message", limits),
        mac=_bytes(mac, "mac"),
        mac_algorithm=_enum(keyspecs.mac_algorithm_from_name(algorithm)),
    )
    return Call("VerifyMac", request, lambda response: bool(response.mac_valid))


def generate_data_key_pair(
    limits: Limits,
    key_id: str,
    key_pair_spec: str,
    context: Mapping[str, str] | None,
    *,
    with_plaintext: bool,
) -> Call[DataKeyPair]:
    """GenerateDataKeyPair[WithoutPlaintext]; the result is the pair, its blob checked."""
    method = "GenerateDataKeyPair" + ("" if with_plaintext else "WithoutPlaintext")

    def shape(response: services_pb2.GenerateDataKeyPairResponse) -> DataKeyPair:
        if with_plaintext == (not response.private_key_plaintext):
            raise HsmDomainError(f"{method} returned a private key where it should not, or none")
        return DataKeyPair(
            key_id=response.key_id,
            private_key=bytes(response.private_key_plaintext),
            private_key_blob=_checked_blob(response.private_key_ciphertext_blob, limits, method),
            public_key=bytes(response.public_key),
            key_pair_spec=keyspecs.spec_name(response.key_pair_spec),
        )

    request = services_pb2.GenerateDataKeyPairRequest(
        key_id=key_id,
        encryption_context=checked_context(context, limits),
        key_pair_spec=_enum(keyspecs.spec_from_name(key_pair_spec)),
    )
    return Call(method, request, shape)


# --- imported key material (docs/kms-client.md "Importing key material") ------------------


@dataclass(frozen=True)
class ImportParameters:
    """What GetParametersForImport gives: wrap the material under `public_key` (DER
    SubjectPublicKeyInfo) with `wrapping_algorithm` (`wrap_key_material` does it) and send it
    with `import_token` before `valid_to` (unix seconds)."""

    key_id: str
    import_token: bytes = field(repr=False)
    public_key: bytes
    wrapping_algorithm: str
    valid_to: int


_WRAPPING: Final = {
    name.removeprefix("WRAPPING_ALGORITHM_"): number
    for name, number in keys_pb2.WrappingAlgorithm.items()
    if number
}


def wrapping_algorithm(name: str) -> int:
    """The number of a wrapping algorithm named as AWS KMS names it."""
    number = _WRAPPING.get(name)
    if number is None:
        raise InvalidInputError(f"wrapping algorithm must be one of {', '.join(_WRAPPING)}")
    return number


def get_parameters_for_import(
    key_id: str, algorithm: str, wrapping_key_spec: str
) -> Call[ImportParameters]:
    """GetParametersForImport; the result keeps the algorithm's name beside the token."""
    request = services_pb2.GetParametersForImportRequest(
        key_id=key_id,
        wrapping_algorithm=_enum(wrapping_algorithm(algorithm)),
        wrapping_key_spec=_enum(keyspecs.spec_from_name(wrapping_key_spec)),
    )

    def shape(response: services_pb2.GetParametersForImportResponse) -> ImportParameters:
        return ImportParameters(
            key_id=response.key_id,
            import_token=bytes(response.import_token),
            public_key=bytes(response.public_key),
            wrapping_algorithm=algorithm,
            valid_to=int(response.parameters_valid_to),
        )

    return Call("GetParametersForImport", request, shape)


def import_key_material(
    key_id: str, import_token: bytes, encrypted_key_material: bytes, valid_to: int
) -> Call[KeyMetadata]:
    """ImportKeyMaterial; the result is the key's metadata (ENABLED)."""
    request = services_pb2.ImportKeyMaterialRequest(
        key_id=key_id,
        import_token=_bytes(import_token, "import_token"),
        encrypted_key_material=_bytes(encrypted_key_material, "encrypted_key_material"),
        valid_to=valid_to,
    )
    return Call("ImportKeyMaterial", request, _metadata)


def delete_imported_key_material(key_id: str) -> Call[KeyMetadata]:
    return _key_call("DeleteImportedKeyMaterial", key_id)


def wrap_key_material(parameters: ImportParameters, material: bytes) -> bytes:
    """`material` wrapped for ImportKeyMaterial under `parameters` (as its owner does it:
    never sent in the clear)."""
    return importtokens.wrap_material(
        parameters.public_key,
        wrapping_algorithm(parameters.wrapping_algorithm),
        _bytes(material, "material"),
    )


# --- grants (docs/kms-client.md "Grants") ------------------------------------------------


@dataclass(frozen=True)
class CreatedGrant:
    """What CreateGrant gives: the grant's id, and its token (pass it in `grant_tokens` of
    the grantee's calls until the grant has reached every HSA; opaque)."""

    grant_id: str
    grant_token: bytes = field(repr=False)


def create_grant(
    key_id: str,
    grantee_principal: str,
    operations: Sequence[str],
    *,
    retiring_principal: str,
    constraints: Mapping[str, Mapping[str, str]] | None,
    name: str,
    grant_tokens: Sequence[bytes],
) -> Call[CreatedGrant]:
    """CreateGrant; operations by their policy names ("encrypt", "decrypt", ...)."""
    request = services_pb2.CreateGrantRequest(
        key_id=key_id,
        grantee_principal=grantee_principal,
        operations=[_enum(operation_number(o, "operations")) for o in operations],
        retiring_principal=retiring_principal,
        constraints=conditions_from_json(constraints, "constraints"),
        name=name,
        grant_tokens=list(grant_tokens),
    )
    return Call(
        "CreateGrant",
        request,
        lambda response: CreatedGrant(response.grant_id, bytes(response.grant_token)),
    )


def list_grants_page(
    key_id: str, page_size: int, token: str, grant_id: str, grantee_principal: str
) -> Call[tuple[list[Grant], str]]:
    """One page of ListGrants: (its grants, the next page's token, "" after the last)."""

    def shape(response: services_pb2.ListGrantsResponse) -> tuple[list[Grant], str]:
        if response.next_page_token and response.next_page_token == token:
            raise HsmDomainError("the key service returned the same page token twice")
        return [Grant.from_message(g) for g in response.grants], response.next_page_token

    request = services_pb2.ListGrantsRequest(
        key_id=key_id,
        limit=page_size,
        page_token=token,
        grant_id=grant_id,
        grantee_principal=grantee_principal,
    )
    return Call("ListGrants", request, shape)


def retire_grant(key_id: str, grant_id: str, grant_token: bytes) -> Call[KeyMetadata]:
    request = services_pb2.RetireGrantRequest(
        key_id=key_id, grant_id=grant_id, grant_token=grant_token
    )
    return Call("RetireGrant", request, _metadata)


def revoke_grant(key_id: str, grant_id: str) -> Call[KeyMetadata]:
    request = services_pb2.RevokeGrantRequest(key_id=key_id, grant_id=grant_id)
    return Call("RevokeGrant", request, _metadata)


def tag_resource(key_id: str, tags: Mapping[str, str]) -> Call[KeyMetadata]:
    request = services_pb2.TagResourceRequest(key_id=key_id, tags=dict(tags))
    return Call("TagResource", request, _metadata)


def untag_resource(key_id: str, tag_keys: Sequence[str]) -> Call[KeyMetadata]:
    request = services_pb2.UntagResourceRequest(key_id=key_id, tag_keys=list(tag_keys))
    return Call("UntagResource", request, _metadata)


def list_resource_tags_page(key_id: str, token: str) -> Call[tuple[dict[str, str], str]]:
    """One page of ListResourceTags: (its tags, the next page's token, "" after the last)."""

    def shape(response: services_pb2.ListResourceTagsResponse) -> tuple[dict[str, str], str]:
        if response.next_page_token and response.next_page_token == token:
            raise HsmDomainError("the key service returned the same page token twice")
        return {t.key: t.value for t in response.tags}, response.next_page_token

    request = services_pb2.ListResourceTagsRequest(key_id=key_id, page_token=token)
    return Call("ListResourceTags", request, shape)
