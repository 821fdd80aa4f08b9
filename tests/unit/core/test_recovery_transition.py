"""Enrolling recovery keys and setting the recovery threshold (issue 16) as transitions.

As an adversary: a proposer who enrolls a key of their own choosing for another operator, a
proof made for another domain or for another key, a recovery threshold above the enrolled
keys, removing an operator so that fewer keys than the threshold remain, a key that is not
canonically encoded. Each is refused; an operator's own enrolment applies.
"""

from __future__ import annotations

import pytest
from support.simulator import SimulatedDomain

from domain_core import changes, transition
from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    QuorumUnreachableError,
    ThresholdOutOfRangeError,
    UnknownOperatorError,
)
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

KEY_A = b"\x11" * 32
KEY_B = b"\x22" * 32


def _apply(sim: SimulatedDomain, *made: domain_pb2.Change) -> domain_pb2.Manifest:
    manifest, _ = transition.apply_changes(
        sim.head.manifest.message, sim.propose(list(made)), now=sim.now
    )
    return manifest


def _enroll(sim: SimulatedDomain, index: int, key: bytes = KEY_A) -> domain_pb2.Change:
    return changes.set_recovery_key(
        sim.operators[index].signer,
        domain_id=sim.domain_id,
        algorithm=RecoveryAlgorithm.X25519,
        public_key=key,
    )


def test_an_operator_enrolls_their_own_recovery_key() -> None:
    sim = SimulatedDomain.create()
    manifest = _apply(sim, _enroll(sim, 0), _enroll(sim, 1, KEY_B))
    keys = {o.operator_id: o.recovery_key for o in manifest.operators if o.HasField("recovery_key")}
    assert keys == {
        sim.operators[0].operator_id: domain_pb2.RecoveryKey(
            algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519, public_key=KEY_A
        ),
        sim.operators[1].operator_id: domain_pb2.RecoveryKey(
            algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519, public_key=KEY_B
        ),
    }


def test_nobody_enrolls_a_key_for_someone_else() -> None:
    sim = SimulatedDomain.create()
    forged = _enroll(sim, 1)  # bob signs ...
    forged.set_recovery_key.operator_id = sim.operators[0].operator_id  # ... for alice's slot
    with pytest.raises(BadSignatureError):
        _apply(sim, forged)
    swapped = _enroll(sim, 0)  # alice's proof, another key put in
    swapped.set_recovery_key.recovery_key = domain_pb2.RecoveryKey(
        algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519, public_key=KEY_B
    ).SerializeToString(deterministic=True)
    with pytest.raises(BadSignatureError):
        _apply(sim, swapped)
    other_domain = changes.set_recovery_key(
        sim.operators[0].signer,
        domain_id="elsewhere",
        algorithm=RecoveryAlgorithm.X25519,
        public_key=KEY_A,
    )
    with pytest.raises(BadSignatureError):
        _apply(sim, other_domain)
    stranger = changes.set_recovery_key(
        InMemorySigner.generate(SignatureAlgorithm.ED25519),
        domain_id=sim.domain_id,
        algorithm=RecoveryAlgorithm.X25519,
        public_key=KEY_A,
    )
    with pytest.raises(UnknownOperatorError):
        _apply(sim, stranger)


def test_the_recovery_threshold_needs_that_many_enrolled_keys() -> None:
    sim = SimulatedDomain.create()
    with pytest.raises(ThresholdOutOfRangeError, match="above the 1 enrolled recovery keys"):
        _apply(sim, _enroll(sim, 0), changes.set_quorum(2, recovery=True))
    manifest = _apply(
        sim, _enroll(sim, 0), _enroll(sim, 1, KEY_B), changes.set_quorum(2, recovery=True)
    )
    assert manifest.quorum.recovery_threshold == 2
    assert manifest.quorum.threshold == sim.head.manifest.message.quorum.threshold
    off = _apply(sim, changes.set_quorum(0, recovery=True))
    assert off.quorum.recovery_threshold == 0


def test_removing_an_operator_below_the_recovery_threshold_is_refused() -> None:
    sim = SimulatedDomain.create()
    with pytest.raises(QuorumUnreachableError, match="lower the recovery threshold first"):
        _apply(
            sim,
            _enroll(sim, 0),
            _enroll(sim, 1, KEY_B),
            changes.set_quorum(2, recovery=True),
            changes.remove_operator(sim.operators[1].operator_id),
        )


def test_a_recovery_key_that_is_not_canonical_does_not_parse() -> None:
    sim = SimulatedDomain.create()
    change = _enroll(sim, 0)
    change.set_recovery_key.recovery_key += b"\x18\x01"  # an unknown field appended
    with pytest.raises(MalformedMessageError, match="is not canonical"):
        sim.propose([change])  # the proposal's own parse refuses it
    with pytest.raises(InvalidInputError, match="no change type"):
        changes.set_quorum(2, "add-host", recovery=True)
