"""Domain-separated digests and signing inputs.

Invariants:
- everything signed is a fixed context string, the length-prefixed payload type, then a
  32-byte digest of the payload bytes as they were received: never a re-serialized object;
- a digest for one purpose can never be confused with one for another (type is bound in);
- a proposal's id is the plain SHA-256 of its serialized bytes.
"""

from __future__ import annotations

import hashlib
import struct
from enum import StrEnum

HASH_CONTEXT = b"hsm-domain/v1 digest\x00"
SIGNATURE_CONTEXT = b"hsm-domain/v1 signature\x00"
DIGEST_BYTES = 32
ZERO_HASH = bytes(DIGEST_BYTES)


class PayloadType(StrEnum):
    """What a digest or signature is about. Values are part of the wire format: never change."""

    MANIFEST = "manifest"
    SEALED_STATE = "sealed-state"
    PROPOSAL_APPROVAL = "proposal-approval"
    PROPOSAL_CANCEL = "proposal-cancel"
    HOST_ENROLLMENT = "host-enrollment"
    AUDIT_CHECKPOINT = "audit-checkpoint"
    KEY_RECORD = "key-record"
    HEAD_CONFIRMATION = "head-confirmation"
    KEY_FLOORS = "key-floors"


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def digest(payload_type: PayloadType, *parts: bytes) -> bytes:
    """SHA-256 over the context, the type, and each part length-prefixed (no ambiguity)."""
    h = hashlib.sha256(HASH_CONTEXT)
    h.update(_length_prefixed(payload_type.value.encode()))
    for part in parts:
        h.update(_length_prefixed(part))
    return h.digest()


def signing_input(payload_type: PayloadType, payload_digest: bytes) -> bytes:
    """The exact bytes a signer signs for a payload whose digest is `payload_digest`."""
    if len(payload_digest) != DIGEST_BYTES:
        raise ValueError("signing input takes a 32-byte digest")
    return SIGNATURE_CONTEXT + _length_prefixed(payload_type.value.encode()) + payload_digest


def proposal_id(proposal_bytes: bytes) -> bytes:
    """A proposal's id: SHA-256 of its bytes as serialized once by the proposer."""
    return hashlib.sha256(proposal_bytes).digest()
