"""Operator tokens on PKCS#11 devices (smart cards, YubiKeys, SoftHSM2) behind `Signer`.

Signatures are the same as the in-memory and file signers make, so one `PublicKey` verifies
every signer alike:
- Ed25519 (`CKM_EDDSA`): pure EdDSA over the message, 64 raw bytes;
- ECDSA P-256 (`CKM_ECDSA`): SHA-256 of the message computed here, the token signs the digest,
  its raw r||s is DER-encoded here (tokens rarely offer `CKM_ECDSA_SHA256`; SoftHSM2 does not).

Invariants kept here:
- a token is found by its label, never by slot number (slot numbers change between runs);
- the PIN comes from a callback, asked only once the token has been found; it is never
  logged, kept, or put in a message; this process keeps only an HMAC of it under a random
  per-process key, so that a second session on a token this process already logged in to
  (PKCS#11 login is per application and token, and the token then accepts any PIN) still
  refuses a wrong PIN;
- keys are generated ON the token, sensitive and not extractable, with a fresh random
  CKA_ID (labels are not unique); a generated key that comes out extractable is destroyed;
- the public key is read from the token's public key object and re-encoded as canonical
  SubjectPublicKeyInfo DER, so `key_id` (the operator id) is the one a file token holding
  the same key would have;
- every signature is verified against that public key before it is returned: a token whose
  public and private objects disagree, or a faulty signature, is an error, not an approval;
- one session per signer, used under a lock (PKCS#11 sessions are not thread-safe).

The package's modules: `_token` (the module, the token, logging in), `_keys` (key pairs on
the token), `_signer` (`Pkcs11Signer`), `_generate` (generating a key pair) and `_recovery`
(an operator's P-256 recovery key, ECDH on the token). This module names the public API.
"""

from __future__ import annotations

from domain_edge.pkcs11_signer._generate import generate_pkcs11_key
from domain_edge.pkcs11_signer._recovery import (
    Pkcs11RecoveryKey,
    generate_pkcs11_recovery_key,
)
from domain_edge.pkcs11_signer._signer import Pkcs11Signer
from domain_edge.pkcs11_signer._token import (
    CKA_ID_SIZE,
    PinCallback,
    format_cka_id,
    new_cka_id,
    token_mechanisms,
)

__all__ = [
    "CKA_ID_SIZE",
    "PinCallback",
    "Pkcs11RecoveryKey",
    "Pkcs11Signer",
    "format_cka_id",
    "generate_pkcs11_key",
    "generate_pkcs11_recovery_key",
    "new_cka_id",
    "token_mechanisms",
]
