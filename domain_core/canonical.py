"""Domain-separated digests and signing inputs.

Invariants:
- everything signed is a fixed context string, the length-prefixed payload type, then a
  32-byte digest of the payload bytes as they were received: never a re-serialized object;
- a digest for one purpose can never be confused with one for another (type is bound in);
- a proposal's id is the plain SHA-256 of its serialized bytes.

The context strings and payload types are `domain_core.contexts`.
"""

from __future__ import annotations

import hashlib
import struct

from domain_core.contexts import HASH_CONTEXT, SIGNATURE_CONTEXT, PayloadType

DIGEST_BYTES = 32
ZERO_HASH = bytes(DIGEST_BYTES)


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
