"""`CheckedProposal`: a proposal parsed once per call, its approvals and votes counted once per
head by the quorum rule every HSA applies, and reused only for a record that holds exactly
what it counted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.simulator import SimulatedDomain

from domain_coordinator._checked import CheckedProposal
from domain_coordinator.store import ProposalRecord, ProposalState
from domain_core import quorum
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import Proposal
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

SIM = SimulatedDomain.create(operators=3, threshold=2)
OPS = SIM.operators


def _bytes(message: domain_pb2.Approval | domain_pb2.CancelVote) -> bytes:
    return message.SerializeToString(deterministic=True)


def _record(
    proposal: Proposal,
    approvals: list[domain_pb2.Approval],
    votes: tuple[domain_pb2.CancelVote, ...] = (),
) -> ProposalRecord:
    return ProposalRecord(
        proposal_id=proposal.id,
        proposal=proposal.raw,
        approvals=tuple(_bytes(a) for a in approvals),
        state=ProposalState.PENDING,
        detail="",
        applied_version=0,
        created_at=proposal.created_at,
        expires_at=proposal.expires_at,
        cancel_votes=tuple(_bytes(v) for v in votes),
    )


def _forged(approval: domain_pb2.Approval) -> domain_pb2.Approval:
    forged = domain_pb2.Approval()
    forged.CopyFrom(approval)
    forged.signature = bytes(len(approval.signature))
    return forged


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counted = {"verify_approval_signature": 0, "evaluate": 0, "evaluate_cancel": 0}

    def counting(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            counted[name] += 1
            return real(*args)

        return wrapper

    for name in counted:
        monkeypatch.setattr(quorum, name, counting(name, getattr(quorum, name)))
    return counted


def test_counts_are_made_once_per_head_and_verify_each_signature_once(
    calls: dict[str, int],
) -> None:
    proposal = SIM.propose([SIM.rotate_domain_key_change()])
    approvals = [quorum.approve(proposal, OPS[i].signer) for i in (0, 1)]
    view = CheckedProposal.from_record(_record(proposal, approvals), DEFAULT_LIMITS)
    assert view.threshold_under(SIM.head) == 2  # the threshold alone verifies nothing
    assert calls == {"verify_approval_signature": 0, "evaluate": 0, "evaluate_cancel": 0}
    first = view.approvals_under(SIM.head)
    assert view.approvals_under(SIM.head) is first
    assert first.met
    assert first.approved_by == (OPS[0].operator_id, OPS[1].operator_id)
    assert view.threshold_under(SIM.head) == 2
    assert calls == {"verify_approval_signature": 2, "evaluate": 1, "evaluate_cancel": 0}


def test_an_arriving_approval_is_judged_in_the_count_without_the_stored_one_of_its_operator(
    calls: dict[str, int],
) -> None:
    proposal = SIM.propose([SIM.rotate_domain_key_change()])
    alice = quorum.approve(proposal, OPS[0].signer)
    bob = quorum.approve(proposal, OPS[1].signer)
    stored = CheckedProposal.from_record(_record(proposal, [alice, bob]), DEFAULT_LIMITS)

    # Bob again, but forged: his valid stored approval does not vouch for it.
    forged = stored.with_approval(_forged(bob))
    assert OPS[1].operator_id not in forged.approvals_under(SIM.head).approved_by
    # The same approval again is judged on its own signature.
    again = stored.with_approval(bob)
    assert again.approvals_under(SIM.head).approved_by == (OPS[0].operator_id, OPS[1].operator_id)

    carol = quorum.approve(proposal, OPS[2].signer)
    added = stored.with_approval(carol)
    assert added.matches(_record(proposal, [alice, bob, carol]))
    assert not added.matches(_record(proposal, [alice, bob]))
    assert not added.matches(_record(proposal, [alice, carol, bob]))  # order is what is stored
    assert not stored.matches(_record(SIM.propose([SIM.rotate_domain_key_change()]), [alice, bob]))


def test_a_vote_keeps_the_counted_approvals_and_is_counted_with_the_other_votes(
    calls: dict[str, int],
) -> None:
    proposal = SIM.propose([SIM.rotate_domain_key_change()])
    alice = quorum.approve(proposal, OPS[0].signer)
    view = CheckedProposal.from_record(_record(proposal, [alice]), DEFAULT_LIMITS)
    view.approvals_under(SIM.head)
    bob_votes = quorum.cancel(proposal.id, OPS[1].signer)
    voted = view.with_cancel_vote(bob_votes)
    assert voted.approvals_under(SIM.head).approved_by == (OPS[0].operator_id,)
    assert calls["evaluate"] == 1  # the approvals' count came along
    result = voted.cancel_votes_under(SIM.head)
    assert (result.approved_by, result.threshold) == ((OPS[1].operator_id,), 2)
    assert voted.matches(_record(proposal, [alice], (bob_votes,)))
    forged = domain_pb2.CancelVote()
    forged.CopyFrom(bob_votes)
    forged.signature = bytes(len(bob_votes.signature))
    refused = voted.with_cancel_vote(forged).cancel_votes_under(SIM.head)
    assert refused.approved_by == ()
