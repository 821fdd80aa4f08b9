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

from domain_core import changes, producing, quorum, sealing, transition
from domain_core.errors import (
    DuplicateHostError,
    FailedPreconditionError,
    InvalidInputError,
    InvalidKeyTokenError,
    MalformedMessageError,
    ProposalError,
    QuorumNotMetError,
    UnknownSignerError,
)
from domain_core.model import Proposal, SealedState, state_hash
from domain_core.recovery import (
    check_contribution,
    open_operator_share,
    open_package,
    seal_contribution,
    verify_keys_against_chain,
)
from domain_core.recovery_shares import (
    RecoveryAlgorithm,
    ShareDoesNotOpenError,
    check_share_words,
    x25519_agreement,
)
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


# --- the recover transition: new hosts, keys rebuilt by the session host ---------------------


def _session() -> tuple[bytes, Callable[[bytes], bytes]]:
    private = x25519.X25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return public, x25519_agreement(raw)


def _recover_proposal(sim: SimulatedDomain, session_public: bytes) -> Proposal:
    new = [sim.new_host("hsa-7"), sim.new_host("hsa-8")]
    change = changes.recover(
        [h.enrollment for h in new], session_host_id="hsa-7", session_public_key=session_public
    )
    return sim.propose([change])


def _contributing(
    sim: SimulatedDomain,
    agreements: dict[str, Callable[[bytes], bytes]],
    proposal: Proposal,
    session_public: bytes,
    indexes: list[int],
    *,
    base: SealedState | None = None,
) -> list[domain_pb2.Approval]:
    """Approvals by these operators, each with their share sealed to the session key."""
    base = base or sim.head
    approvals = []
    for index in indexes:
        operator_id = sim.operators[index].operator_id
        share = open_operator_share(
            base.manifest, base.secrets.recovery, operator_id, agreements[operator_id]
        )
        approval = quorum.approve(proposal, sim.operators[index].signer)
        approval.recovery_contribution.CopyFrom(
            seal_contribution(
                session_public,
                share,
                domain_id=sim.domain_id,
                proposal_id=proposal.id,
                operator_id=operator_id,
            )
        )
        approvals.append(approval)
    return approvals


def _seal_recovery(
    sim: SimulatedDomain,
    proposal: Proposal,
    approvals: list[domain_pb2.Approval],
    session: tuple[bytes, Callable[[bytes], bytes]],
    producer: str = "hsa-7",
) -> SealedState:
    return producing.seal_recovery(
        sim.states,
        proposal,
        approvals,
        producer_host_id=producer,
        producer=sim.hosts[producer].signer,
        session_public_key=session[0],
        agree=session[1],
        now=sim.now,
    )


def test_the_session_host_rebuilds_the_keys_and_the_new_hosts_hold_them() -> None:
    sim, agreements = _recovery_domain()
    sim.rotate(now=sim.advance(10**8))  # two generations to rebuild
    session = _session()
    proposal = _recover_proposal(sim, session[0])
    approvals = _contributing(sim, agreements, proposal, session[0], [0, 2])
    before = sim.keys_at(sim.head, "hsa-1")
    state = _seal_recovery(sim, proposal, approvals, session)
    sim.chain().update(state)  # every verifier accepts it
    assert [h.host_id for h in state.manifest.message.hosts] == [
        "hsa-1", "hsa-2", "hsa-3", "hsa-7", "hsa-8",
    ]  # fmt: skip
    assert state.message.producer_host_id == "hsa-7"
    for host in ("hsa-7", "hsa-8"):
        assert sim.keys_at(state, host) == before
    assert not any(a.HasField("recovery_contribution") for a in state.approvals)
    assert state.secrets.HasField("recovery")  # a fresh package for the recovered state


def test_fewer_contributions_than_the_recovery_threshold_rebuild_nothing() -> None:
    sim, agreements = _recovery_domain()
    sim.transition([changes.set_quorum(1)])  # the default threshold alone would be met
    session = _session()
    proposal = _recover_proposal(sim, session[0])
    one = _contributing(sim, agreements, proposal, session[0], [0])
    with pytest.raises(QuorumNotMetError):
        _seal_recovery(sim, proposal, one, session)
    # Two approvals, one share: the quorum is met but the shares are not.
    plain = quorum.approve(proposal, sim.operators[1].signer)
    with pytest.raises(FailedPreconditionError, match="1 recovery shares were contributed"):
        _seal_recovery(sim, proposal, [*one, plain], session)


def test_a_share_sealed_for_another_session_or_operator_is_refused_by_name() -> None:
    sim, agreements = _recovery_domain()
    session, other = _session(), _session()
    proposal = _recover_proposal(sim, session[0])
    approvals = _contributing(sim, agreements, proposal, session[0], [0, 1])
    replayed = _contributing(sim, agreements, proposal, other[0], [1])  # an older session's
    approvals[1].recovery_contribution.CopyFrom(replayed[0].recovery_contribution)
    with pytest.raises(ShareDoesNotOpenError, match=sim.operators[1].operator_id[:16]):
        _seal_recovery(sim, proposal, approvals, session)
    moved = _contributing(sim, agreements, proposal, session[0], [0, 1])
    moved[0].recovery_contribution.CopyFrom(moved[1].recovery_contribution)  # bob's as alice's
    with pytest.raises(ShareDoesNotOpenError, match=sim.operators[0].operator_id[:16]):
        _seal_recovery(sim, proposal, moved, session)


def test_only_the_session_host_with_the_named_key_produces_a_recovery() -> None:
    sim, agreements = _recovery_domain()
    session = _session()
    proposal = _recover_proposal(sim, session[0])
    approvals = _contributing(sim, agreements, proposal, session[0], [0, 1])
    with pytest.raises(FailedPreconditionError, match="session host of this recovery is hsa-7"):
        _seal_recovery(sim, proposal, approvals, session, producer="hsa-8")
    with pytest.raises(FailedPreconditionError, match="another recovery session key"):
        _seal_recovery(sim, proposal, approvals, _session())
    # A state another host signs for it (a new host, or an old one still trusted) is refused.
    honest = _seal_recovery(sim, proposal, approvals, session)
    for signer in ("hsa-8", "hsa-1"):
        forged = _resigned_by(sim, honest, signer)
        with pytest.raises(UnknownSignerError, match="session host hsa-7"):
            sim.chain().update(forged)
    # The honest state with a contribution put back into one of its approvals.
    message = domain_pb2.SealedState()
    message.CopyFrom(honest.message)
    message.approvals[0].recovery_contribution.CopyFrom(approvals[0].recovery_contribution)
    with pytest.raises(MalformedMessageError, match="keeps a recovery share"):
        sim.chain().update(SealedState.from_message(message))


def test_recover_needs_a_recovery_policy_and_stands_alone() -> None:
    sim = SimulatedDomain.create()
    session = _session()
    proposal = _recover_proposal(sim, session[0])
    with pytest.raises(ProposalError, match="recovery threshold is 0"):
        transition.apply_changes(sim.head.manifest.message, proposal, now=sim.now)
    sim, _ = _recovery_domain()
    change = changes.recover(
        [sim.new_host("hsa-7").enrollment], session_host_id="hsa-7", session_public_key=session[0]
    )
    mixed = sim.propose([change, changes.rotate_domain_key()])
    with pytest.raises(ProposalError, match="alone in its proposal"):
        transition.apply_changes(sim.head.manifest.message, mixed, now=sim.now)
    taken = changes.recover(
        [sim.hosts["hsa-1"].enrollment], session_host_id="hsa-1", session_public_key=session[0]
    )
    with pytest.raises(DuplicateHostError):
        transition.apply_changes(sim.head.manifest.message, sim.propose([taken]), now=sim.now)


def test_recover_needs_the_highest_threshold_and_at_least_the_recovery_one() -> None:
    sim, _ = _recovery_domain()
    proposal = _recover_proposal(sim, _session()[0])
    assert quorum.required(sim.head.manifest, proposal).threshold == 2
    sim.transition([changes.set_quorum(3, "add-host")])
    proposal = _recover_proposal(sim, _session()[0])
    need = quorum.required(sim.head.manifest, proposal)
    assert need.threshold == 3
    assert "at least the recovery threshold" in need.reason


def test_rebuilt_keys_that_do_not_open_the_chain_are_refused() -> None:
    sim, _ = _recovery_domain()
    keys = sim.keys_at(sim.head, "hsa-1")
    verify_keys_against_chain(sim.states, keys)
    wrong = {g: bytes(32) for g in keys}
    with pytest.raises(InvalidKeyTokenError):
        verify_keys_against_chain(sim.states, wrong)


def _resigned_by(sim: SimulatedDomain, state: SealedState, host_id: str) -> SealedState:
    message = domain_pb2.SealedState()
    message.CopyFrom(state.message)
    message.producer_host_id = host_id
    message.producer_signature = sim.hosts[host_id].signer.sign(
        sealing.state_signing_message(state.hash)
    )
    return SealedState.from_message(message)


def test_a_share_rides_only_on_an_approval_of_a_recovery_and_has_its_size() -> None:
    sim, agreements = _recovery_domain()
    session = _session()
    recover = _recover_proposal(sim, session[0])
    (approval,) = _contributing(sim, agreements, recover, session[0], [0])
    check_contribution(recover, approval)
    other = sim.propose([changes.rotate_domain_key()])
    with pytest.raises(InvalidInputError, match="the proposal recovers nothing"):
        check_contribution(other, approval)
    for field, value in (
        ("ephemeral_public_key", b"\x01" * 31),
        ("nonce", b"\x02" * 11),
        ("ciphertext", b"\x03" * 16),
        ("ciphertext", b"\x03" * 1025),
    ):
        bad = domain_pb2.Approval()
        bad.CopyFrom(approval)
        setattr(bad.recovery_contribution, field, value)
        with pytest.raises(InvalidInputError, match="is malformed"):
            check_contribution(recover, bad)


def test_paper_words_are_checked_before_use() -> None:
    sim, agreements = _recovery_domain()
    words = _shares(sim.head, agreements, [sim.operators[0].operator_id])[0]
    check_share_words(words)
    check_share_words("  " + words.replace(" ", "\n") + "\n")  # any whitespace
    listed = words.split()
    listed[5] = "academic" if listed[5] != "academic" else "acid"
    with pytest.raises(InvalidInputError, match="a word is wrong, missing or extra"):
        check_share_words(" ".join(listed))
    with pytest.raises(InvalidInputError, match="a word is wrong, missing or extra"):
        check_share_words(" ".join(words.split()[:-1]))
