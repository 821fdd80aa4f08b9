"""Validation of request fields at the coordinator's edge: sizes, lengths and formats.

Invariant: every field a servicer uses passes one of these checks first, and a failed check
is an `InvalidInputError` (INVALID_ARGUMENT) naming the field and what it should be. Nothing
here echoes more than a short prefix of what it was given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf.message import DecodeError

from domain_core.errors import InvalidInputError, LimitExceededError, WrongDomainError
from domain_core.limits import (
    MAX_ADDRESS_CHARS,
    MAX_AUDIT_HEADS_PER_REPORT,
    MAX_HEAD_BYTES,
    MAX_KEY_RECORD_BYTES,
    MAX_PAGE_TOKEN_CHARS,
    MAX_SIGNATURE_BYTES,
    MAX_TOKENS_PER_KEY,
    Limits,
)
from domain_core.model import HOST_ID_PATTERN, OPERATOR_ID_PATTERN
from domain_proto import domain_pb2, keys_pb2, services_pb2

PROPOSAL_ID_BYTES = 32
STATE_HASH_BYTES = 32
MAX_REPORTED_VERSION = 2**63 - 1  # what the store's integer columns hold
DEFAULT_KEY_PAGE = 100
DEFAULT_PROPOSAL_PAGE = 50

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_ADDRESS_PATTERN = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252})?):(\d{1,5})$"
)


def proposal_id(value: bytes, field: str = "proposal_id") -> bytes:
    """A proposal id: exactly 32 bytes (SHA-256 of the proposal bytes)."""
    if len(value) != PROPOSAL_ID_BYTES:
        raise InvalidInputError(
            f"{field} must be the 32-byte SHA-256 of the proposal, not {len(value)} bytes"
        )
    return value


def operator_id(value: str, field: str = "operator_id") -> str:
    """An operator id: 64 lower-case hex characters."""
    if not OPERATOR_ID_PATTERN.match(value):
        raise InvalidInputError(
            f"{field} must be an operator id (64 lower-case hex characters), not {value[:70]!r}"
        )
    return value


def signature(value: bytes, field: str = "signature") -> bytes:
    """A signature: present and of a plausible size (the key decides whether it verifies)."""
    if not value:
        raise InvalidInputError(f"{field} is empty; sign with your operator token")
    if len(value) > MAX_SIGNATURE_BYTES:
        raise InvalidInputError(f"{field} is {len(value)} bytes, longer than any signature")
    return value


def approval(message: domain_pb2.Approval, field: str = "approval") -> domain_pb2.Approval:
    """An approval with well-formed fields (whether it verifies is checked later)."""
    proposal_id(message.proposal_id, f"{field}.proposal_id")
    operator_id(message.operator_id, f"{field}.operator_id")
    signature(message.signature, f"{field}.signature")
    return message


def serialized(value: bytes, field: str, limits: Limits) -> bytes:
    """Serialized message bytes: present and within the message-size limit."""
    if not value:
        raise InvalidInputError(f"{field} is empty")
    if len(value) > limits.max_message_bytes:
        raise LimitExceededError(
            f"{field} is {len(value)} bytes, above the limit of {limits.max_message_bytes}"
        )
    return value


def host_id(value: str, field: str = "host_id") -> str:
    """A host id: a lower-case DNS label of 1-63 characters."""
    if not HOST_ID_PATTERN.match(value):
        raise InvalidInputError(
            f"{field} {value[:70]!r} is not a host id: use 1-63 of [a-z0-9-], not starting or "
            "ending with '-'"
        )
    return value


def audit_heads(heads: Sequence[services_pb2.AuditHead], field: str = "audit_heads") -> list[bytes]:
    """The checkpoint bytes of reported audit heads: at most 64, each present and no longer
    than a checkpoint line (whether each parses and verifies is checked one by one later)."""
    if len(heads) > MAX_AUDIT_HEADS_PER_REPORT:
        raise LimitExceededError(
            f"{field} holds {len(heads)} heads; at most {MAX_AUDIT_HEADS_PER_REPORT} are taken"
        )
    checkpoints = []
    for index, head in enumerate(heads):
        if not head.checkpoint or len(head.checkpoint) > MAX_HEAD_BYTES:
            raise InvalidInputError(
                f"{field}[{index}].checkpoint must be one signed checkpoint line of at most "
                f"{MAX_HEAD_BYTES} bytes, not {len(head.checkpoint)} bytes"
            )
        checkpoints.append(bytes(head.checkpoint))
    return checkpoints


def address(value: str, field: str = "address") -> str:
    """A host:port address an HSA listens on."""
    match = _ADDRESS_PATTERN.match(value) if len(value) <= MAX_ADDRESS_CHARS else None
    if match is None or not 1 <= int(match.group(3)) <= 65535:
        raise InvalidInputError(f"{field} {value[:70]!r} is not a HOST:PORT address (port 1-65535)")
    return value


def reported_state(version: int, state_hash: bytes) -> tuple[int, bytes]:
    """A version and state hash an HSA reports about itself: both given, or neither (0, b"").

    Only the form is checked; what an HSA reports is relayed, never believed.
    """
    if version > MAX_REPORTED_VERSION:
        raise InvalidInputError(f"version {version} is out of range")
    if (version == 0) != (not state_hash) or len(state_hash) not in (0, STATE_HASH_BYTES):
        raise InvalidInputError(
            "version and state_hash go together: a version of at least 1 with the 32-byte "
            "hash of that state, or neither"
        )
    return version, state_hash


def key_id(value: str, field: str = "key_id") -> str:
    """A key id: 1-128 of [A-Za-z0-9._:/-], starting with a letter or digit."""
    if not KEY_ID_PATTERN.match(value):
        raise InvalidInputError(
            f"{field} {value[:70]!r} is not a key id: use 1-128 of [A-Za-z0-9._:/-]"
        )
    return value


def page_size(value: int, default: int, maximum: int) -> int:
    """A page size: 0 means `default`; larger than `maximum` is refused."""
    if value == 0:
        return default
    if value > maximum:
        raise InvalidInputError(f"limit {value} is above the maximum of {maximum}")
    return value


def proposal_page_token(value: str, field: str = "page_token") -> int:
    """A ListProposals page token: empty (0: from the newest) or what a previous answer gave
    (the decimal place of the last proposal listed)."""
    if not value:
        return 0
    if len(value) > MAX_PAGE_TOKEN_CHARS or not value.isascii() or not value.isdigit():
        raise InvalidInputError(
            f"{field} {value[:24]!r} is not a page token this coordinator gave; pass the "
            "next_page_token of the previous answer, or none for the first page"
        )
    token = int(value)
    if not 0 < token <= MAX_REPORTED_VERSION:
        raise InvalidInputError(f"{field} {value[:24]!r} is out of range")
    return token


def key_record(
    record: keys_pb2.KeyRecord, domain_id: str, limits: Limits
) -> tuple[str, bytes, keys_pb2.KeyMetadata]:
    """Check the form of a key record an HSA puts; returns (key id, bytes to store with
    revision 0, its parsed metadata). Its signature is checked by the caller."""
    if not record.metadata:
        raise InvalidInputError("record.metadata is empty: a key record carries its metadata")
    stored = keys_pb2.KeyRecord()
    stored.CopyFrom(record)
    stored.revision = 0
    raw = stored.SerializeToString(deterministic=True)
    if len(raw) > min(MAX_KEY_RECORD_BYTES, limits.max_message_bytes):
        raise LimitExceededError(
            f"the key record is {len(raw)} bytes, above the limit of "
            f"{min(MAX_KEY_RECORD_BYTES, limits.max_message_bytes)}"
        )
    if len(record.tokens) > MAX_TOKENS_PER_KEY:
        raise LimitExceededError(f"a key record holds at most {MAX_TOKENS_PER_KEY} key tokens")
    metadata = keys_pb2.KeyMetadata()
    try:
        metadata.ParseFromString(record.metadata)
    except DecodeError:
        raise InvalidInputError(
            "record.metadata does not parse as hsmdomain.v1.KeyMetadata"
        ) from None
    key_id(metadata.key_id, "record.metadata.key_id")
    if metadata.domain_id != domain_id:
        raise WrongDomainError(
            f"the key record is for domain {metadata.domain_id[:70]!r}, this is {domain_id!r}"
        )
    if metadata.metadata_version < 1:
        raise InvalidInputError("record.metadata.metadata_version must be at least 1")
    if not record.signer_host_id or not record.signature:
        raise InvalidInputError(
            "the key record is not signed: an HSA signs every record it writes "
            "(signer_host_id and signature)"
        )
    signature(record.signature, "record.signature")
    for token in record.tokens:
        if token.key_id != metadata.key_id:
            raise InvalidInputError(
                f"a key token in the record names key {token.key_id[:70]!r}, "
                f"not {metadata.key_id!r}"
            )
    return metadata.key_id, raw, metadata
