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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from domain_core.ciphertext import parse_header
from domain_core.errors import HsmDomainError, InvalidCiphertextError, LimitExceededError
from domain_core.limits import Limits
from domain_edge.kms_client._core import checked_context
from domain_edge.kms_client._policies import KeyMetadata, _policy_message
from domain_proto import keys_pb2, services_pb2

T = TypeVar("T")
DEFAULT_PAGE_SIZE: Final = 100


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One call: `method` with `request`; `shape(response)` is the caller's result."""

    method: str
    request: Any
    shape: Callable[[Any], T]


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
) -> Call[KeyMetadata]:
    """CreateKey, always with an idempotency key (the given one or a fresh UUID)."""
    request = services_pb2.CreateKeyRequest(
        description=description,
        policy=_policy_message(policy),
        enable_rotation=enable_rotation,
        rotation_period_days=rotation_period_days,
        idempotency_key=idempotency_key or str(uuid.uuid4()),
    )
    return Call("CreateKey", request, _metadata)


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
    limits: Limits, key_id: str, plaintext: bytes, context: Mapping[str, str] | None
) -> Call[bytes]:
    """Encrypt at most `limits.max_plaintext_bytes`; the result is the checked blob."""
    _bytes(plaintext, "plaintext")
    if len(plaintext) > limits.max_plaintext_bytes:
        raise LimitExceededError(
            f"plaintext is {len(plaintext)} bytes; Encrypt takes at most "
            f"{limits.max_plaintext_bytes}: use envelope encryption for larger data"
        )
    request = services_pb2.EncryptRequest(
        key_id=key_id, plaintext=plaintext, encryption_context=checked_context(context, limits)
    )
    return Call("Encrypt", request, _blob_of("Encrypt", limits))


def decrypt(
    limits: Limits, blob: bytes, context: Mapping[str, str] | None, key_id: str | None
) -> Call[bytes]:
    """Decrypt a blob (with `key_id`, only a blob of that key); the result is the plaintext."""
    request = services_pb2.DecryptRequest(
        ciphertext_blob=_bytes(blob, "blob"),
        encryption_context=checked_context(context, limits),
        key_id=key_id or "",
    )
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
