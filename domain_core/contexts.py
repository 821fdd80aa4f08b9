"""Every domain-separation label in one place: what is hashed, signed or derived is prefixed
with one of these, so that bytes made for one purpose can never pass for another's.

Invariants:
- the values are part of the wire and file formats: never change one (the golden vectors in
  tests/unit pin every byte); a new purpose gets a new label;
- every context string is `hsm-domain/v1 <purpose>` and a NUL byte, so that no label is a
  prefix of another and none can run into the bytes that follow it;
- a signature is over `SIGNATURE_CONTEXT`, a length-prefixed `PayloadType` and a digest
  (`domain_core.canonical.signing_input`): the payload type names what is signed;
- no other module spells a label out; each imports it from here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "AUDIT_RECORD_CONTEXT",
    "ENCRYPT_INFO",
    "ENVELOPE_CONTEXT",
    "GRANT_TOKEN_CONTEXT",
    "GRANT_TOKEN_KEY_CONTEXT",
    "HASH_CONTEXT",
    "IMPORT_TOKEN_CONTEXT",
    "IMPORT_TOKEN_KEY_CONTEXT",
    "KEY_TOKEN_CONTEXT",
    "KEY_TOKEN_KEY_CONTEXT",
    "MATERIAL_COMMITMENT_CONTEXT",
    "RECOVERY_SHARE_INFO",
    "SIGNATURE_CONTEXT",
    "PayloadType",
]

# --- signatures and digests (domain_core.canonical) ----------------------------------------
# Prefixes every domain digest: SHA-256(HASH_CONTEXT || type || parts), each length-prefixed.
HASH_CONTEXT: Final = b"hsm-domain/v1 digest\x00"
# Prefixes every signing input: SIGNATURE_CONTEXT || type || digest.
SIGNATURE_CONTEXT: Final = b"hsm-domain/v1 signature\x00"


class PayloadType(StrEnum):
    """What a digest or signature is about, bound into both. Values are part of the wire
    format: never change."""

    MANIFEST = "manifest"
    SEALED_STATE = "sealed-state"
    PROPOSAL_APPROVAL = "proposal-approval"
    PROPOSAL_CANCEL = "proposal-cancel"
    HOST_ENROLLMENT = "host-enrollment"
    AUDIT_CHECKPOINT = "audit-checkpoint"
    KEY_RECORD = "key-record"
    HEAD_CONFIRMATION = "head-confirmation"
    KEY_FLOORS = "key-floors"
    CREATE_KEY_ID = "create-key-id"
    RECOVERY_SHARE = "recovery-share"
    RECOVERY_SECRETS = "recovery-secrets"
    RECOVERY_KEY_ENROLLMENT = "recovery-key-enrollment"
    RECOVERY_CONTRIBUTION = "recovery-contribution"


# --- key tokens (domain_core.keytokens) ----------------------------------------------------
# Prefixes a key token's binding hash (key id, generation, metadata digest, ...).
KEY_TOKEN_CONTEXT: Final = b"hsm-domain/v1 key-token\x00"
# HKDF info that derives the key wrapping a backing key, followed by the binding.
KEY_TOKEN_KEY_CONTEXT: Final = b"hsm-domain/v1 key-token-key\x00"

# --- imported key material (domain_core.importtokens) ---------------------------------------
# Prefixes an import token's binding hash (domain, key id, generation, expiry, parameters).
IMPORT_TOKEN_CONTEXT: Final = b"hsm-domain/v1 import-token\x00"
# HKDF info that derives the key sealing an import token's wrapping key, followed by the binding.
IMPORT_TOKEN_KEY_CONTEXT: Final = b"hsm-domain/v1 import-token-key\x00"
# HMAC-SHA-256 message of an imported material's commitment (key check value), followed by
# the key id: only the same material may be imported again.
MATERIAL_COMMITMENT_CONTEXT: Final = b"hsm-domain/v1 material-commitment\x00"

# --- grant tokens (domain_core.granttokens) -------------------------------------------------
# Prefixes a grant token's binding hash (domain, key id, metadata version, generation).
GRANT_TOKEN_CONTEXT: Final = b"hsm-domain/v1 grant-token\x00"
# HKDF info that derives the key sealing a grant token's grant, followed by the binding.
GRANT_TOKEN_KEY_CONTEXT: Final = b"hsm-domain/v1 grant-token-key\x00"

# --- ciphertexts (domain_core.ciphertext, domain_core.envelope) ----------------------------
# HKDF info that derives a blob's one-time key, followed by the blob's prefix.
ENCRYPT_INFO: Final = b"hsm-domain/v1 encrypt\x00"
# Prefixes an envelope's header before hashing it into every chunk's associated data.
ENVELOPE_CONTEXT: Final = b"hsm-domain/v1 envelope\x00"

# --- recovery (domain_core.recovery_shares) -------------------------------------------------
# HKDF info that derives the key sealing one recovery share, followed by the ephemeral and the
# recipient's public keys and the share's context.
RECOVERY_SHARE_INFO: Final = b"hsm-domain/v1 recovery-share\x00"

# --- audit logs (domain_edge.audit) --------------------------------------------------------
# Prefixes an audit record's canonical JSON (without its hash) in its chained hash.
AUDIT_RECORD_CONTEXT: Final = b"hsm-domain/v1 audit-record\x00"
