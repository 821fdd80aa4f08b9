"""The recovery package (issue 16): a state's domain keys under a fresh KEK, split M-of-N to
the operators' recovery keys, inside the sealed secrets.

As an adversary: a package moved to another state, a share opened as another operator or at
another index, a package with a share dropped, reordered or resized, a threshold that
disagrees with the policy, M-1 shares, a tampered sealed-secrets blob. Every one is refused;
M shares of a good package rebuild exactly the manifest's keys.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from domain_core import model
from domain_core.errors import (
    FailedPreconditionError,
    InvalidKeyTokenError,
    MalformedMessageError,
)
from domain_core.model import Manifest
from domain_core.recovery import (
    build_package,
    check_package,
    open_package,
    recipients,
    sealed_share,
    share_context,
)
from domain_core.recovery_shares import (
    RecoveryAlgorithm,
    ShareDoesNotOpenError,
    open_share,
    x25519_agreement,
)
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

Agree = Callable[[bytes], bytes]


def _x25519_operator(name: str) -> tuple[domain_pb2.Operator, Agree]:
    operator = model.make_operator(
        name, InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    )
    private = x25519.X25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    operator.recovery_key.CopyFrom(
        domain_pb2.RecoveryKey(
            algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519,
            public_key=private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            ),
        )
    )
    return operator, x25519_agreement(raw)


def _p256_operator(name: str) -> tuple[domain_pb2.Operator, Agree]:
    operator = model.make_operator(
        name, InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    )
    private = ec.generate_private_key(ec.SECP256R1())
    operator.recovery_key.CopyFrom(
        domain_pb2.RecoveryKey(
            algorithm=domain_pb2.RECOVERY_ALGORITHM_P256,
            public_key=private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    )

    def agree(ephemeral: bytes) -> bytes:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
        return private.exchange(ec.ECDH(), peer)

    return operator, agree


def _manifest(
    operators: list[domain_pb2.Operator], recovery_threshold: int, version: int = 5
) -> Manifest:
    return Manifest.from_message(
        domain_pb2.Manifest(
            domain_id="local",
            version=version,
            previous_state_hash=b"\x07" * 32,
            operators=operators,
            quorum=domain_pb2.QuorumPolicy(threshold=2, recovery_threshold=recovery_threshold),
            settings=domain_pb2.DomainSettings(key_generations_retained=7),
            key_generations=[domain_pb2.KeyGeneration(generation=g) for g in (3, 4, 5)],
            created_at=1_800_000_000,
        )
    )


@pytest.fixture
def team() -> tuple[list[domain_pb2.Operator], dict[str, Agree]]:
    made = [
        _x25519_operator("alice"),
        _x25519_operator("bob"),
        _p256_operator("carol"),  # a PKCS#11 token's key
        _x25519_operator("dave"),
    ]
    plain = model.make_operator(  # no recovery key: gets no share
        "erin", InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    )
    operators = [operator for operator, _ in made] + [plain]
    return operators, {operator.operator_id: agree for operator, agree in made}


KEYS = {3: os.urandom(32), 4: os.urandom(32), 5: os.urandom(32)}


def _shares_of(
    manifest: Manifest, package: domain_pb2.RecoveryPackage, agrees: dict[str, Agree]
) -> dict[str, str]:
    words = {}
    for operator in recipients(manifest):
        index, sealed = sealed_share(package, operator.operator_id)
        algorithm = (
            RecoveryAlgorithm.X25519
            if operator.recovery_key.algorithm == domain_pb2.RECOVERY_ALGORITHM_X25519
            else RecoveryAlgorithm.P256
        )
        words[operator.operator_id] = open_share(
            algorithm,
            operator.recovery_key.public_key,
            sealed,
            share_context(manifest, operator.operator_id, index),
            agrees[operator.operator_id],
        )
    return words


def test_any_m_operators_rebuild_exactly_the_states_keys(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, agrees = team
    manifest = _manifest(operators, recovery_threshold=3)
    package = build_package(manifest, KEYS)
    assert package is not None
    check_package(manifest, domain_pb2.SealedSecrets(recovery=package))
    assert [s.operator_id for s in package.shares] == sorted(agrees)  # erin has no share
    words = _shares_of(manifest, package, agrees)
    for chosen in itertools.combinations(words.values(), 3):
        assert open_package(manifest, package, list(chosen)) == KEYS
    for chosen in itertools.combinations(words.values(), 2):
        with pytest.raises(FailedPreconditionError, match="not enough recovery shares"):
            open_package(manifest, package, list(chosen))


def test_no_threshold_no_package_and_a_threshold_above_the_keys_is_refused(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, _ = team
    manifest = _manifest(operators, recovery_threshold=0)
    assert build_package(manifest, KEYS) is None
    check_package(manifest, domain_pb2.SealedSecrets())
    with pytest.raises(ValueError, match="exceeds the 4 enrolled"):
        build_package(_manifest(operators, recovery_threshold=5), KEYS)
    with pytest.raises(ValueError, match="key generations"):
        build_package(_manifest(operators, recovery_threshold=2), {3: os.urandom(32)})


def test_a_package_moved_to_another_state_does_not_open(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, agrees = team
    manifest = _manifest(operators, recovery_threshold=2)
    package = build_package(manifest, KEYS)
    assert package is not None
    later = _manifest(operators, recovery_threshold=2, version=6)
    check_package(later, domain_pb2.SealedSecrets(recovery=package))  # shape alone passes
    with pytest.raises(ShareDoesNotOpenError):
        _shares_of(later, package, agrees)
    words = list(_shares_of(manifest, package, agrees).values())
    with pytest.raises(InvalidKeyTokenError):
        open_package(later, package, words[:2])  # the sealed secrets are bound too


def test_a_share_opened_as_another_operator_or_index_does_not_open(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, agrees = team
    manifest = _manifest(operators, recovery_threshold=2)
    package = build_package(manifest, KEYS)
    assert package is not None
    x25519_ids = sorted(
        o.operator_id
        for o in operators
        if o.recovery_key.algorithm == domain_pb2.RECOVERY_ALGORITHM_X25519
    )
    alice, bob = x25519_ids[:2]
    index, sealed = sealed_share(package, alice)
    key = next(o.recovery_key for o in operators if o.operator_id == alice)
    with pytest.raises(ShareDoesNotOpenError):
        open_share(
            RecoveryAlgorithm.X25519,
            key.public_key,
            sealed,
            share_context(manifest, bob, index),
            agrees[alice],
        )
    with pytest.raises(ShareDoesNotOpenError):
        open_share(
            RecoveryAlgorithm.X25519,
            key.public_key,
            sealed,
            share_context(manifest, alice, index + 1),
            agrees[alice],
        )


def test_packages_of_the_wrong_shape_are_refused(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, _ = team
    manifest = _manifest(operators, recovery_threshold=2)
    package = build_package(manifest, KEYS)
    assert package is not None

    def refused(changed: domain_pb2.RecoveryPackage, match: str) -> None:
        with pytest.raises(MalformedMessageError, match=match):
            check_package(manifest, domain_pb2.SealedSecrets(recovery=changed))

    fewer = domain_pb2.RecoveryPackage()
    fewer.CopyFrom(package)
    del fewer.shares[-1]
    refused(fewer, "one share for each")
    swapped = domain_pb2.RecoveryPackage()
    swapped.CopyFrom(package)
    first, second = swapped.shares[0], swapped.shares[1]
    a, b = domain_pb2.SealedRecoveryShare(), domain_pb2.SealedRecoveryShare()
    a.CopyFrom(first)
    b.CopyFrom(second)
    swapped.shares[0].CopyFrom(b)
    swapped.shares[1].CopyFrom(a)
    refused(swapped, "one share for each")
    lower = domain_pb2.RecoveryPackage()
    lower.CopyFrom(package)
    lower.threshold = 1
    refused(lower, "needs 1 shares; the policy says 2")
    cut = domain_pb2.RecoveryPackage()
    cut.CopyFrom(package)
    cut.shares[0].ephemeral_public_key = cut.shares[0].ephemeral_public_key[:-1]
    refused(cut, "share 1 of the recovery package")
    short = domain_pb2.RecoveryPackage()
    short.CopyFrom(package)
    short.sealed_secrets = b"\x00" * 20
    refused(short, "is malformed")
    with pytest.raises(MalformedMessageError, match="has no recovery package"):
        check_package(manifest, domain_pb2.SealedSecrets())
    with pytest.raises(MalformedMessageError, match="does not ask for"):
        check_package(
            _manifest(operators, recovery_threshold=0), domain_pb2.SealedSecrets(recovery=package)
        )


def test_tampered_sealed_secrets_give_no_keys(
    team: tuple[list[domain_pb2.Operator], dict[str, Agree]],
) -> None:
    operators, agrees = team
    manifest = _manifest(operators, recovery_threshold=2)
    package = build_package(manifest, KEYS)
    assert package is not None
    words = list(_shares_of(manifest, package, agrees).values())
    flipped = bytearray(package.sealed_secrets)
    flipped[10] ^= 0x40
    package.sealed_secrets = bytes(flipped)
    with pytest.raises(InvalidKeyTokenError):
        open_package(manifest, package, words[:2])


def test_a_manifest_with_a_malformed_recovery_key_does_not_parse() -> None:
    operator = model.make_operator(
        "mallory", InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    )
    operator.recovery_key.CopyFrom(
        domain_pb2.RecoveryKey(algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519, public_key=b"x")
    )
    with pytest.raises(MalformedMessageError, match=r"mallory.*32 raw bytes"):
        _manifest([operator], recovery_threshold=0)
    operator.recovery_key.algorithm = domain_pb2.RECOVERY_ALGORITHM_UNSPECIFIED
    with pytest.raises(MalformedMessageError, match="unknown recovery key algorithm"):
        _manifest([operator], recovery_threshold=0)
