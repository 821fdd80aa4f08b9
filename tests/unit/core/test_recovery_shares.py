"""Recovery shares (issue 16): Shamir M-of-N through SLIP-39, each share sealed to one
operator's recovery key and bound to where it belongs.

As an adversary: fewer than M shares, a share with one word changed, shares of two splits, a
share opened under another context or with another key, a tampered ciphertext or ephemeral
key. Each must be refused, and none may yield a wrong key.
"""

from __future__ import annotations

import itertools
import os

import pytest
import shamir_mnemonic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from domain_core.errors import FailedPreconditionError, InvalidCiphertextError, InvalidInputError
from domain_core.recovery_shares import (
    RecoveryAlgorithm,
    SealedShare,
    ShareDoesNotOpenError,
    combine_shares,
    open_share,
    recipient_public_key,
    seal_share,
    split_key,
    x25519_agreement,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("threshold", "count"), [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5)])
def test_any_threshold_of_the_shares_rebuild_the_key(threshold: int, count: int) -> None:
    key = os.urandom(32)
    shares = split_key(key, threshold, count)
    assert len(shares) == count
    assert len(set(shares)) == count
    for chosen in itertools.combinations(shares, threshold):
        assert combine_shares(list(chosen)) == key


def test_fewer_than_the_threshold_are_refused() -> None:
    key = os.urandom(32)
    shares = split_key(key, 3, 5)
    for chosen in itertools.combinations(shares, 2):
        with pytest.raises(FailedPreconditionError, match="not enough recovery shares"):
            combine_shares(list(chosen))


def test_a_damaged_share_or_a_mix_of_splits_never_gives_a_key() -> None:
    key = os.urandom(32)
    shares = split_key(key, 2, 3)
    words = shares[0].split()
    for position in (0, 5, len(words) - 1):
        changed = list(words)
        changed[position] = "academic" if words[position] != "academic" else "acid"
        with pytest.raises(InvalidInputError):
            combine_shares([" ".join(changed), shares[1]])
    other = split_key(key, 2, 3)
    with pytest.raises(InvalidInputError):
        combine_shares([shares[0], other[1]])
    with pytest.raises(InvalidInputError, match="given twice"):
        combine_shares([shares[0], shares[0]])
    with pytest.raises(InvalidInputError):
        combine_shares(["not slip39 words at all", shares[1]])


def test_bad_split_arguments_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="32 bytes"):
        split_key(b"short", 2, 3)
    with pytest.raises(InvalidInputError, match="threshold"):
        split_key(os.urandom(32), 4, 3)
    with pytest.raises(InvalidInputError, match="threshold"):
        split_key(os.urandom(32), 0, 3)
    with pytest.raises(InvalidInputError, match="1 to 16 shares"):
        split_key(os.urandom(32), 2, 17)


def test_a_share_is_slip39_words_that_the_reference_implementation_reads() -> None:
    """Paper shares: the words are SLIP-39 as the `shamir-mnemonic` reference reads them."""
    key = os.urandom(32)
    shares = split_key(key, 2, 3)
    parsed = [shamir_mnemonic.Share.from_mnemonic(share) for share in shares]
    assert {share.member_threshold for share in parsed} == {2}
    assert len({share.identifier for share in parsed}) == 1
    assert shamir_mnemonic.combine_mnemonics(shares[:2]) == key


def _x25519_recipient() -> tuple[bytes, bytes]:
    private = x25519.X25519PrivateKey.generate()
    raw_private = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return raw_private, public


def _p256_recipient() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    private = ec.generate_private_key(ec.SECP256R1())
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, spki


def _p256_agreement(private: ec.EllipticCurvePrivateKey) -> object:
    def agree(ephemeral: bytes) -> bytes:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
        return private.exchange(ec.ECDH(), peer)

    return agree


CONTEXT = b"domain local, version 7, operator alice"


def test_a_share_sealed_to_an_x25519_key_opens_only_with_it_and_its_context() -> None:
    share = split_key(os.urandom(32), 2, 3)[0]
    private, public = _x25519_recipient()
    sealed = seal_share(RecoveryAlgorithm.X25519, public, share, CONTEXT)
    agree = x25519_agreement(private)
    assert open_share(RecoveryAlgorithm.X25519, public, sealed, CONTEXT, agree) == share
    assert share.encode() not in sealed.ciphertext

    with pytest.raises(ShareDoesNotOpenError):
        open_share(RecoveryAlgorithm.X25519, public, sealed, CONTEXT + b"!", agree)
    other_private, _ = _x25519_recipient()
    with pytest.raises(ShareDoesNotOpenError):
        open_share(
            RecoveryAlgorithm.X25519, public, sealed, CONTEXT, x25519_agreement(other_private)
        )
    flipped = bytearray(sealed.ciphertext)
    flipped[3] ^= 1
    with pytest.raises(ShareDoesNotOpenError):
        open_share(
            RecoveryAlgorithm.X25519,
            public,
            SealedShare(sealed.ephemeral_public_key, sealed.nonce, bytes(flipped)),
            CONTEXT,
            agree,
        )
    _, another_ephemeral = _x25519_recipient()
    with pytest.raises(ShareDoesNotOpenError):
        open_share(
            RecoveryAlgorithm.X25519,
            public,
            SealedShare(another_ephemeral, sealed.nonce, sealed.ciphertext),
            CONTEXT,
            agree,
        )


def test_a_share_sealed_to_a_p256_key_opens_with_the_ecdh_a_token_computes() -> None:
    share = split_key(os.urandom(32), 2, 3)[1]
    private, spki = _p256_recipient()
    sealed = seal_share(RecoveryAlgorithm.P256, spki, share, CONTEXT)
    assert len(sealed.ephemeral_public_key) == 65
    agree = _p256_agreement(private)
    assert open_share(RecoveryAlgorithm.P256, spki, sealed, CONTEXT, agree) == share  # type: ignore[arg-type]
    with pytest.raises(ShareDoesNotOpenError):
        open_share(RecoveryAlgorithm.P256, spki, sealed, b"another state", agree)  # type: ignore[arg-type]
    with pytest.raises(InvalidCiphertextError, match="malformed"):
        open_share(
            RecoveryAlgorithm.P256,
            spki,
            SealedShare(b"\x04" * 10, sealed.nonce, sealed.ciphertext),
            CONTEXT,
            agree,  # type: ignore[arg-type]
        )


def test_recipient_keys_of_the_wrong_form_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="32 raw bytes"):
        recipient_public_key(RecoveryAlgorithm.X25519, b"\x01" * 31)
    with pytest.raises(InvalidInputError, match="SubjectPublicKeyInfo"):
        recipient_public_key(RecoveryAlgorithm.P256, b"\x30\x03junk")
    p384 = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(InvalidInputError, match="P-256 curve"):
        recipient_public_key(RecoveryAlgorithm.P256, p384)
