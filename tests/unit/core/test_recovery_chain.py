"""Recovery packages in the chain (issue 16): produced with every state whose policy asks for
one, checked by every verifier.

As an adversary (a trusted producing host gone bad, or a coordinator that edits what it
stores): a state that drops the package its policy asks for, one that adds a package its
policy does not ask for, one whose shares are reordered or sent to one operator twice, one
whose threshold disagrees with the policy. Each is refused by the chain with the reason; an
honest state's package gives back exactly that state's domain keys from M shares, and fewer
give nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from support.simulator import SimulatedDomain

from domain_core import changes, sealing
from domain_core.errors import (
    FailedPreconditionError,
    InvalidInputError,
    MalformedMessageError,
)
from domain_core.model import SealedState, state_hash
from domain_core.recovery import open_operator_share, open_package
from domain_core.recovery_shares import RecoveryAlgorithm, x25519_agreement
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit


def _recovery_domain() -> tuple[SimulatedDomain, dict[str, Callable[[bytes], bytes]]]:
    """A domain of three operators who all enrolled X25519 recovery keys, threshold 2."""
    sim = SimulatedDomain.create()
    agreements: dict[str, Callable[[bytes], bytes]] = {}
    enrolments = []
    for operator in sim.operators:
        private = x25519.X25519PrivateKey.generate()
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        agreements[operator.operator_id] = x25519_agreement(raw)
        enrolments.append(
            changes.set_recovery_key(
                operator.signer,
                domain_id=sim.domain_id,
                algorithm=RecoveryAlgorithm.X25519,
                public_key=private.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                ),
            )
        )
    sim.transition(enrolments)
    assert not sim.head.secrets.HasField("recovery")  # no threshold yet: no package
    sim.transition([changes.set_quorum(2, recovery=True)])
    return sim, agreements


def _shares(
    state: SealedState, agreements: dict[str, Callable[[bytes], bytes]], operator_ids: list[str]
) -> list[str]:
    return [
        open_operator_share(
            state.manifest, state.secrets.recovery, operator_id, agreements[operator_id]
        )
        for operator_id in operator_ids
    ]


def _resealed(
    sim: SimulatedDomain, state: SealedState, edit: Callable[[domain_pb2.SealedSecrets], None]
) -> SealedState:
    """`state` with its sealed secrets edited and signed again by its (trusted) producer."""
    secrets = domain_pb2.SealedSecrets()
    secrets.CopyFrom(state.secrets)
    edit(secrets)
    raw = secrets.SerializeToString(deterministic=True)
    message = domain_pb2.SealedState()
    message.CopyFrom(state.message)
    message.secrets = raw
    producer = sim.hosts[state.message.producer_host_id]
    message.producer_signature = producer.signer.sign(
        sealing.state_signing_message(state_hash(state.manifest.raw, raw))
    )
    return SealedState.from_message(message)


def test_every_state_under_a_recovery_policy_carries_a_package_of_its_own_keys() -> None:
    sim, agreements = _recovery_domain()
    sim.rotate(now=sim.advance(10**8))
    sim.transition([sim.add_host_change("hsa-9")])
    sim.chain()  # every verifier accepts them
    ids = [o.operator_id for o in sim.operators]
    for state in sim.states[2:]:  # the set-quorum state on
        keys = sim.keys_at(state, "hsa-1")
        for pair in (ids[:2], ids[1:], [ids[0], ids[2]]):
            words = _shares(state, agreements, pair)
            assert open_package(state.manifest, state.secrets.recovery, words) == keys
    packages = [s.secrets.recovery.sealed_secrets for s in sim.states[2:]]
    assert len(set(packages)) == len(packages)  # a fresh key-encryption key each time


def test_fewer_shares_than_the_threshold_give_nothing() -> None:
    sim, agreements = _recovery_domain()
    one = _shares(sim.head, agreements, [sim.operators[0].operator_id])
    with pytest.raises(FailedPreconditionError, match="not enough recovery shares"):
        open_package(sim.head.manifest, sim.head.secrets.recovery, one)


def test_a_share_of_another_state_does_not_combine_with_this_one() -> None:
    sim, agreements = _recovery_domain()
    older = sim.head
    sim.rotate(now=sim.advance(10**8))
    mixed = _shares(older, agreements, [sim.operators[0].operator_id]) + _shares(
        sim.head, agreements, [sim.operators[1].operator_id]
    )
    with pytest.raises(InvalidInputError, match="from different recovery packages"):
        open_package(sim.head.manifest, sim.head.secrets.recovery, mixed)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s.ClearField("recovery"), "has no recovery package"),
        (lambda s: s.recovery.shares.reverse(), "one share for each enrolled recovery key"),
        (lambda s: s.recovery.shares.pop(), "one share for each enrolled recovery key"),
        (
            lambda s: s.recovery.shares[1].CopyFrom(s.recovery.shares[0]),
            "one share for each enrolled recovery key",
        ),
        (lambda s: setattr(s.recovery, "threshold", 1), "the policy says 2"),
        (lambda s: setattr(s.recovery, "threshold", 3), "the policy says 2"),
        (lambda s: setattr(s.recovery, "nonce", b"\x00" * 5), "malformed"),
        (
            lambda s: setattr(s.recovery.shares[0], "ephemeral_public_key", b"\x01" * 31),
            "share 1 of the recovery package",
        ),
    ],
)
def test_a_state_with_a_wrong_package_is_refused(
    edit: Callable[[domain_pb2.SealedSecrets], None], reason: str
) -> None:
    sim, _ = _recovery_domain()
    forged = _resealed(sim, sim.head, edit)
    with pytest.raises(MalformedMessageError, match=reason):
        sim.chain(upto=len(sim.states) - 1).update(forged)


def test_a_package_the_policy_does_not_ask_for_is_refused() -> None:
    sim, _ = _recovery_domain()
    enrolled = sim.states[1]  # keys enrolled, no threshold yet
    package = sim.head.secrets.recovery
    forged = _resealed(sim, enrolled, lambda s: s.recovery.CopyFrom(package))
    with pytest.raises(MalformedMessageError, match="does not ask for"):
        sim.chain(upto=1).update(forged)


def test_lowering_the_recovery_threshold_to_zero_stops_the_packages() -> None:
    sim, _ = _recovery_domain()
    sim.transition([changes.set_quorum(0, recovery=True)])
    assert not sim.head.secrets.HasField("recovery")
    sim.chain()
