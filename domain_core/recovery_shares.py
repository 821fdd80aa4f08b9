"""Recovery shares: a key split M-of-N with Shamir's scheme, each share sealed to one operator.

The building blocks of a domain's recovery package (docs/disaster-recovery.md, issue 16):
- `split_key` splits a 32-byte key into N SLIP-39 shares (Shamir over GF(256), the
  `shamir-mnemonic` package), any M of which give it back (`combine_shares`); a share is its
  SLIP-39 words, so an operator who keeps theirs on paper writes down exactly what is sealed;
- `seal_share` encrypts one share to an operator's recovery public key: an ephemeral key on the
  recipient's curve (X25519, or P-256 for a key on a PKCS#11 token), ECDH, HKDF-SHA256 and
  AES-256-GCM, with `context` (which domain, state and operator the share belongs to) both in
  the key derivation and as associated data, so a share moved to another domain, state or
  operator does not open; `open_share` undoes it given the ECDH with the recipient's private
  key (`agree`), which a file token computes in memory and a PKCS#11 token on the token.

Invariants: fewer than M shares, shares of two different splits, and a share with one wrong
word are refused (SLIP-39's checksum and digest), never combined into a wrong key; errors say
what is wrong and never carry a share, a key or a shared secret.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import shamir_mnemonic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from shamir_mnemonic.share import Share

from domain_core import canonical, crypto
from domain_core.contexts import RECOVERY_SHARE_INFO, PayloadType
from domain_core.errors import FailedPreconditionError, InvalidCiphertextError, InvalidInputError
from domain_proto import domain_pb2

__all__ = [
    "KEY_BYTES",
    "MAX_SHARES",
    "RecoveryAlgorithm",
    "SealedShare",
    "ShareDoesNotOpenError",
    "algorithm_of",
    "check_recovery_key",
    "check_share_words",
    "combine_shares",
    "enrollment_signing_input",
    "open_share",
    "recipient_public_key",
    "seal_share",
    "split_key",
    "x25519_agreement",
    "x25519_public_key",
]

KEY_BYTES: Final = 32
MAX_SHARES: Final = 16  # SLIP-39's most members in a group
_P256_POINT_BYTES: Final = 65  # uncompressed SEC1 point
_X25519_BYTES: Final = 32


class ShareDoesNotOpenError(InvalidCiphertextError):
    """A sealed recovery share that does not open (no detail beyond that: no oracle)."""

    def __init__(
        self,
        message: str = "the recovery share does not open: it was sealed for another domain, "
        "state or operator, or it was changed",
    ) -> None:
        super().__init__(message)


class RecoveryAlgorithm(enum.Enum):
    """The kind of an operator's recovery key."""

    X25519 = "x25519"  # raw 32-byte public key; a file token
    P256 = "p256"  # SubjectPublicKeyInfo DER; a PKCS#11 token (ECDH derive on the token)


_FROM_PROTO: Final = {
    domain_pb2.RECOVERY_ALGORITHM_X25519: RecoveryAlgorithm.X25519,
    domain_pb2.RECOVERY_ALGORITHM_P256: RecoveryAlgorithm.P256,
}


def algorithm_of(key: domain_pb2.RecoveryKey) -> RecoveryAlgorithm:
    """The algorithm of an enrolled recovery key (InvalidInputError for an unknown one)."""
    found = _FROM_PROTO.get(key.algorithm)
    if found is None:
        raise InvalidInputError(f"unknown recovery key algorithm {key.algorithm}")
    return found


def check_recovery_key(key: domain_pb2.RecoveryKey) -> None:
    """A recovery key record names a known algorithm and a well-formed public key for it."""
    recipient_public_key(algorithm_of(key), key.public_key)


def enrollment_signing_input(domain_id: str, operator_id: str, recovery_key: bytes) -> bytes:
    """What an operator signs with their signing key to enroll `recovery_key` (a serialized
    RecoveryKey) as their own in domain `domain_id`."""
    return canonical.signing_input(
        PayloadType.RECOVERY_KEY_ENROLLMENT,
        canonical.digest(
            PayloadType.RECOVERY_KEY_ENROLLMENT,
            domain_id.encode(),
            operator_id.encode(),
            recovery_key,
        ),
    )


@dataclass(frozen=True)
class SealedShare:
    """One share encrypted to one recovery key: the ephemeral public key (raw X25519, or an
    uncompressed P-256 point), the GCM nonce and the ciphertext with its tag."""

    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes


def _check_counts(threshold: int, count: int) -> None:
    if not 1 <= count <= MAX_SHARES:
        raise InvalidInputError(f"a key is split into 1 to {MAX_SHARES} shares, not {count}")
    if not 1 <= threshold <= count:
        raise InvalidInputError(
            f"the recovery threshold must be between 1 and the number of shares ({count}), "
            f"not {threshold}"
        )


def split_key(key: bytes, threshold: int, count: int) -> list[str]:
    """Split `key` (32 bytes) into `count` SLIP-39 shares, any `threshold` of which rebuild it.

    With a threshold of 1 each share is a whole copy (SLIP-39 forbids a 1-of-N group, so each
    share is a 1-of-1 group of its own, any one group enough).
    """
    if len(key) != KEY_BYTES:
        raise InvalidInputError(f"a recovery key is {KEY_BYTES} bytes")
    _check_counts(threshold, count)
    if threshold == 1:
        groups = shamir_mnemonic.generate_mnemonics(
            1, [(1, 1)] * count, key, b"", extendable=True, iteration_exponent=0
        )
        return [group[0] for group in groups]
    (group,) = shamir_mnemonic.generate_mnemonics(
        1, [(threshold, count)], key, b"", extendable=True, iteration_exponent=0
    )
    return list(group)


def combine_shares(shares: Sequence[str]) -> bytes:
    """The key that `shares` (SLIP-39 words) rebuild; FailedPreconditionError when they are too
    few, InvalidInputError when one is damaged or they come from different splits."""
    words = [" ".join(share.split()) for share in shares]
    if len(set(words)) != len(words):
        raise InvalidInputError("the same share was given twice")
    try:
        key = shamir_mnemonic.combine_mnemonics(words)
    except shamir_mnemonic.MnemonicError as error:
        message = str(error)
        if "Wrong number of mnemonics" in message or "Insufficient number" in message:
            raise FailedPreconditionError(
                f"not enough recovery shares: {len(words)} given, and the threshold is higher "
                "(nothing about the key is learned from fewer)"
            ) from None
        raise InvalidInputError(
            "the recovery shares do not combine: one is damaged (a wrong or missing word) or "
            "they come from different recovery packages"
        ) from None
    except ValueError:
        raise InvalidInputError("a recovery share is not SLIP-39 words") from None
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise InvalidInputError("the recovery shares rebuild a secret of the wrong size")
    return key


def recipient_public_key(algorithm: RecoveryAlgorithm, public_key: bytes) -> bytes:
    """`public_key` checked for `algorithm` and in the form a share names: raw X25519, or the
    uncompressed P-256 point of a SubjectPublicKeyInfo (InvalidInputError if neither)."""
    if algorithm is RecoveryAlgorithm.X25519:
        if len(public_key) != _X25519_BYTES:
            raise InvalidInputError("an X25519 recovery key is 32 raw bytes")
        return public_key
    try:
        loaded = serialization.load_der_public_key(public_key)
    except (ValueError, TypeError):
        raise InvalidInputError("a P-256 recovery key is a SubjectPublicKeyInfo (DER)") from None
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
        raise InvalidInputError("a P-256 recovery key must be on the P-256 curve")
    return loaded.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _share_key(shared_secret: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    info = RECOVERY_SHARE_INFO + ephemeral + recipient + context
    return crypto.hkdf_sha256(shared_secret, salt=b"", info=info)


def seal_share(
    algorithm: RecoveryAlgorithm, public_key: bytes, share: str, context: bytes
) -> SealedShare:
    """Encrypt `share` to the recovery key `public_key`, bound to `context`."""
    recipient = recipient_public_key(algorithm, public_key)
    if algorithm is RecoveryAlgorithm.X25519:
        ephemeral_x = x25519.X25519PrivateKey.generate()
        ephemeral = ephemeral_x.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        shared = ephemeral_x.exchange(x25519.X25519PublicKey.from_public_bytes(recipient))
    else:
        ephemeral_ec = ec.generate_private_key(ec.SECP256R1())
        ephemeral = ephemeral_ec.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), recipient)
        shared = ephemeral_ec.exchange(ec.ECDH(), peer)
    key = _share_key(shared, ephemeral, recipient, context)
    nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    ciphertext = crypto.aes_gcm_seal(key, share.encode("ascii"), context, nonce)
    return SealedShare(ephemeral, nonce, ciphertext)


def open_share(
    algorithm: RecoveryAlgorithm,
    public_key: bytes,
    sealed: SealedShare,
    context: bytes,
    agree: Callable[[bytes], bytes],
) -> str:
    """The share in `sealed`, given `agree(ephemeral_public_key)`: the ECDH of the recipient's
    private key with it. InvalidCiphertextError when it does not open under `context` (another
    domain, state or operator, or tampered bytes)."""
    recipient = recipient_public_key(algorithm, public_key)
    expected = _X25519_BYTES if algorithm is RecoveryAlgorithm.X25519 else _P256_POINT_BYTES
    if len(sealed.ephemeral_public_key) != expected:
        raise InvalidCiphertextError("the sealed recovery share is malformed")
    shared = agree(sealed.ephemeral_public_key)
    key = _share_key(shared, sealed.ephemeral_public_key, recipient, context)
    plaintext = crypto.aes_gcm_open(
        key,
        sealed.ciphertext,
        context,
        sealed.nonce,
        error=ShareDoesNotOpenError,
    )
    try:
        return plaintext.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidCiphertextError("the recovery share is not SLIP-39 words") from None


def x25519_agreement(private_key: bytes) -> Callable[[bytes], bytes]:
    """`agree` for an X25519 recovery key held in memory (a file token, once opened)."""
    key = x25519.X25519PrivateKey.from_private_bytes(private_key)

    def agree(ephemeral: bytes) -> bytes:
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(ephemeral))

    return agree


def x25519_public_key(private_key: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return (
        x25519.X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def check_share_words(words: str) -> None:
    """`words` are one SLIP-39 share (InvalidInputError if a word is wrong, missing or extra:
    the share's checksum catches it)."""
    try:
        Share.from_mnemonic(" ".join(words.split()))
    except (shamir_mnemonic.MnemonicError, ValueError, KeyError):
        raise InvalidInputError(
            "this is not a SLIP-39 recovery share: a word is wrong, missing or extra (its "
            "checksum does not hold)"
        ) from None
