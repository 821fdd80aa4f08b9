"""Cryptographic primitives the domain uses, in one place.

The symmetric primitives (AES-GCM, HKDF, hashes, randomness) live here; the asymmetric ones
where they are used: `signers` (the domain's own signatures), `pki` (certificates),
`keyspecs` (customer keys of AWS KMS's key specs). Every failure to open sealed data raises
one exception type with no detail, so callers cannot build an oracle.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import nacl.bindings
import nacl.exceptions
import nacl.public
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from domain_core.errors import InvalidKeyTokenError

AES_KEY_BYTES = 32
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
X25519_KEY_BYTES = 32


def random_bytes(n: int) -> bytes:
    """Bytes from the OS CSPRNG."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return os.urandom(n)


def new_aes_key() -> bytes:
    """A fresh 256-bit AES key."""
    return os.urandom(AES_KEY_BYTES)


def sha256(data: bytes) -> bytes:
    """SHA-256 digest."""
    return hashlib.sha256(data).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare two byte strings without leaking where they differ."""
    return hmac.compare_digest(a, b)


def aes_gcm_seal(key: bytes, plaintext: bytes, associated_data: bytes, nonce: bytes) -> bytes:
    """AES-256-GCM encrypt; returns ciphertext || tag. The caller supplies a unique nonce."""
    if len(key) != AES_KEY_BYTES:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    if len(nonce) != GCM_NONCE_BYTES:
        raise ValueError("AES-256-GCM needs a 12-byte nonce")
    return AESGCM(key).encrypt(nonce, plaintext, associated_data)


def aes_gcm_open(
    key: bytes,
    ciphertext_and_tag: bytes,
    associated_data: bytes,
    nonce: bytes,
    error: type[Exception] = InvalidKeyTokenError,
) -> bytes:
    """AES-256-GCM decrypt; any failure raises `error()` with its fixed, detail-free message."""
    if (
        len(key) != AES_KEY_BYTES
        or len(nonce) != GCM_NONCE_BYTES
        or len(ciphertext_and_tag) < GCM_TAG_BYTES
    ):
        raise error()
    try:
        return AESGCM(key).decrypt(nonce, ciphertext_and_tag, associated_data)
    except InvalidTag:
        raise error() from None


_SHA256_BYTES = 32


def hkdf_sha256(key: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), written out over the standard library's HMAC because it runs
    once per Encrypt and Decrypt: two HMAC calls cost ~4 us where building a `cryptography`
    HKDF object cost ~10. `hmac.new(..., hashlib.sha256)`, not the one-shot `hmac.digest`,
    which releases the GIL on every call (a GIL hand-off per HMAC in a busy server); tests
    check it against `cryptography`'s HKDF and the RFC's vectors."""
    if not 1 <= length <= 255 * _SHA256_BYTES:
        raise ValueError(f"HKDF-SHA256 output must be 1..{255 * _SHA256_BYTES} bytes")
    # An empty salt is HashLen zero bytes (RFC 5869 2.2); HMAC pads keys with zeros anyway.
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    block = hmac.new(prk, info + b"\x01", hashlib.sha256).digest()
    if length <= _SHA256_BYTES:
        return block[:length]
    blocks = [block]
    for counter in range(2, -(-length // _SHA256_BYTES) + 1):
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        blocks.append(block)
    return b"".join(blocks)[:length]


def x25519_generate() -> tuple[bytes, bytes]:
    """A new X25519 keypair as (private, public) raw 32-byte strings."""
    private = nacl.public.PrivateKey.generate()
    return bytes(private), bytes(private.public_key)


def x25519_public_from_private(private_key: bytes) -> bytes:
    """The public half of a raw X25519 private key."""
    if len(private_key) != X25519_KEY_BYTES:
        raise ValueError("X25519 private keys are 32 bytes")
    return bytes(nacl.public.PrivateKey(private_key).public_key)


ED25519_SEED_BYTES = 32


def x25519_private_from_ed25519_seed(seed: bytes) -> bytes:
    """The X25519 private key that belongs to an Ed25519 key (its clamped secret scalar).

    libsodium's `crypto_sign_ed25519_sk_to_curve25519`: the scalar is the one Ed25519 signs
    with, so the X25519 public key is the Montgomery form of the Ed25519 public key
    (`x25519_public_from_ed25519`) and whoever can sign with the Ed25519 key can open what is
    sealed to it. SECRET, like the seed.
    """
    if not isinstance(seed, bytes) or len(seed) != ED25519_SEED_BYTES:
        raise ValueError("an Ed25519 seed is 32 bytes")
    _, secret_key = nacl.bindings.crypto_sign_seed_keypair(seed)
    return bytes(nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(secret_key))


def x25519_public_from_ed25519(ed25519_public_key: bytes) -> bytes:
    """The Montgomery form (X25519 public key) of a raw 32-byte Ed25519 public key.

    Raises ValueError for bytes that are not a point of the prime-order subgroup (libsodium
    refuses small-order and non-canonical points), so no key can be paired with one.
    """
    if not isinstance(ed25519_public_key, bytes) or len(ed25519_public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    try:
        return bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public_key))
    except nacl.exceptions.CryptoError:
        raise ValueError("not a valid Ed25519 public key (not in the main subgroup)") from None


def seal_to_host(recipient_public_key: bytes, plaintext: bytes) -> bytes:
    """Anonymous sealed box (X25519 + XSalsa20-Poly1305) that only the recipient opens."""
    if len(recipient_public_key) != X25519_KEY_BYTES:
        raise ValueError("X25519 public keys are 32 bytes")
    return bytes(
        nacl.public.SealedBox(nacl.public.PublicKey(recipient_public_key)).encrypt(plaintext)
    )


def open_sealed_box(private_key: bytes, sealed: bytes) -> bytes:
    """Open a sealed box addressed to `private_key`; any failure is InvalidKeyTokenError."""
    if len(private_key) != X25519_KEY_BYTES:
        raise ValueError("X25519 private keys are 32 bytes")
    try:
        return bytes(nacl.public.SealedBox(nacl.public.PrivateKey(private_key)).decrypt(sealed))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidKeyTokenError() from None


def seal_under_domain_key(
    domain_key: bytes, key_info: bytes, binding: bytes, plaintext: bytes, salt: bytes, nonce: bytes
) -> bytes:
    """AES-256-GCM of `plaintext` under a one-time key derived from a domain key (HKDF-SHA256:
    `salt`, info = `key_info` || `binding`), with `binding` as associated data: how import and
    grant tokens seal what they carry, as key tokens do."""
    token_key = hkdf_sha256(domain_key, salt=salt, info=key_info + binding)
    return aes_gcm_seal(token_key, plaintext, binding, nonce)


def open_under_domain_key(
    domain_key: bytes,
    key_info: bytes,
    binding: bytes,
    sealed: bytes,
    salt: bytes,
    nonce: bytes,
    error: type[Exception],
) -> bytes:
    """Open what `seal_under_domain_key` sealed; any failure raises `error()`."""
    token_key = hkdf_sha256(domain_key, salt=salt, info=key_info + binding)
    return aes_gcm_open(token_key, sealed, binding, nonce, error=error)
