"""The quorum flow at the coordinator: proposals submitted, approved and cancelled.

Each call parses what it was sent and what is stored once (`CheckedProposal`) and hands the
same object to every later step (the apply, the answer), so it verifies each signature once.

Invariants:
- a proposal is stored only after it parsed, targets the current head, is within its
  lifetime, passes the transition invariants, needs no more approvals than there are
  operators (`quorum.check_reachable`), and carries a valid approval by its proposer;
- an approval is stored only after its signature verified under a current operator's key,
  at most one per operator; both are durable before the caller gets an answer; a verdict on
  an arriving approval is `quorum.evaluate`'s, counting it with the stored ones;
- only a proposal's proposer cancels it alone; another current operator's verified cancel
  signature is stored as a vote (one per operator, durable before the answer), and the
  proposal is cancelled once the votes of distinct current operators reach its threshold
  (`quorum.evaluate_cancel`). An approval is never withdrawn. (A coordinator can always drop
  a proposal; this keeps one operator, not the coordinator, from vetoing others.)
- proposals are bounded: `Limits.max_pending_proposals` pending in all,
  `max_pending_proposals_per_operator` of one proposer, `max_stored_proposals_per_operator`
  of one proposer in any state, counted by the store with the insert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from domain_coordinator._admission import PendingAdditions
from domain_coordinator._applying import Applier
from domain_coordinator._checked import CheckedProposal
from domain_coordinator._coordination import WriteLock
from domain_coordinator._proposals import ProposalBook, cancel_standing, closing, refuse_closed
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalRecord, ProposalState
from domain_core import quorum, transition
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ConflictError,
    FailedPreconditionError,
    InvalidInputError,
    UnknownSignerError,
)
from domain_core.limits import Limits
from domain_core.model import Manifest, Proposal, SealedState
from domain_core.recovery import check_contribution
from domain_edge.faults import unsafe_crash_point
from domain_proto import domain_pb2, services_pb2

log = logging.getLogger(__name__)


def operator_name(manifest: Manifest, operator_id: str) -> str:
    """The operator's name; UnknownSignerError if the id is not a current operator."""
    operator = manifest.operators_by_id.get(operator_id)
    if operator is None:
        raise UnknownSignerError(
            f"you are not an operator of this domain (operator id {operator_id[:16]}... is "
            f"not in version {manifest.version})"
        )
    return operator.name


def _verified_approval(view: CheckedProposal, head: SealedState, operator_id: str) -> str:
    """The name of the current operator whose approval `view` counts, if its signature
    verified in the count under `head`; UnknownSignerError or BadSignatureError if not."""
    name = operator_name(head.manifest, operator_id)
    for approval in view.approvals:
        if approval.operator_id == operator_id:
            check_contribution(view.proposal, approval)
    if operator_id not in view.approvals_under(head).approved_by:
        raise BadSignatureError(
            f"the approval's signature does not verify under the key of operator {name}: "
            "sign this proposal's id with your own token"
        )
    return name


@dataclass(kw_only=True, eq=False, repr=False)
class QuorumFlow:
    """Submissions, approvals and votes to cancel (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    book: ProposalBook
    applier: Applier
    additions: PendingAdditions
    limits: Limits
    now: Callable[[], int]
    writes: WriteLock

    def submit(self, raw: bytes, approval: domain_pb2.Approval) -> services_pb2.ProposalStatus:
        """Check and store a new proposal with its proposer's approval; apply it if that is
        quorum enough."""
        proposal = Proposal.from_bytes(raw, self.limits)
        replayed = self._replayed(proposal.id, approval, raw)
        if replayed is not None:
            return replayed
        now = self.now()
        head = self.chain.head
        if proposal.base_version > head.version:
            # Made on a newer head than this replica's: another replica stored it, and its
            # notice has not come yet. Adopt the stored states before judging the proposal.
            self.chain.refresh()
            head = self.chain.head
        quorum.check_applicable(
            head.manifest,
            head.hash,
            proposal,
            now=now,
            max_skew=self.limits.max_clock_skew_seconds,
        )
        # The same invariants the HSA will enforce: refuse an impossible change up front,
        # and one that needs more approvals than there are operators to give them.
        transition.apply_changes(head.manifest.message, proposal, now=now, limits=self.limits)
        quorum.check_reachable(head.manifest, proposal)
        if approval.proposal_id != proposal.id:
            raise BadSignatureError("proposer_approval is for another proposal than the one sent")
        if approval.operator_id != proposal.proposer_id:
            raise InvalidInputError(
                "proposer_approval must be signed by the proposer named in the proposal "
                f"({proposal.proposer_id[:16]}...)"
            )
        view = CheckedProposal.submitted(proposal, approval)
        name = _verified_approval(view, head, approval.operator_id)
        # The caps are counted by the store in the insert's own transaction.
        created = self.store.put_proposal(
            proposal.id,
            raw,
            proposal.created_at,
            proposal.expires_at,
            [(approval.operator_id, approval.SerializeToString(deterministic=True))],
            proposer=proposal.proposer_id,
            base_version=proposal.base_version,
            base_state_hash=proposal.base_state_hash,
            max_pending=self.limits.max_pending_proposals,
            max_pending_per_proposer=self.limits.max_pending_proposals_per_operator,
            max_stored_per_proposer=self.limits.max_stored_proposals_per_operator,
            now=now,
        )
        if not created:
            raise AlreadyExistsError(
                f"proposal {proposal.id.hex()[:16]}... was submitted already; approve it by its id"
            )
        self.additions.forget()  # a host it adds may register and watch at once
        log.info(
            "proposal %s submitted by %s for version %d",
            proposal.id.hex()[:16],
            name,
            proposal.base_version,
        )
        return self.book.status(*self.applier.apply_if_met(proposal.id, view))

    def approve(self, approval: domain_pb2.Approval) -> services_pb2.ProposalStatus:
        """Verify and store one operator's approval of a pending proposal; apply the proposal
        if that makes its quorum."""
        replayed = self._replayed(approval.proposal_id, approval)
        if replayed is not None:
            return replayed
        record = self.book.close_if_due(self.book.load(approval.proposal_id), self.now())
        refuse_closed(record)
        # Counted with the stored approvals (its operator's own left out): one count says
        # whether it verifies and where the quorum stands once it is stored.
        view = CheckedProposal.from_record(record, self.limits).with_approval(approval)
        name = _verified_approval(view, self.chain.head, approval.operator_id)
        added = self.store.add_approval(
            approval.proposal_id,
            approval.operator_id,
            approval.SerializeToString(deterministic=True),
        )
        if not added:
            raise AlreadyExistsError(
                f"already approved by you (operator {name}); one approval per operator counts"
            )
        unsafe_crash_point("after_approval_stored")
        log.info("proposal %s approved by %s", approval.proposal_id.hex()[:16], name)
        return self.book.status(*self.applier.apply_if_met(approval.proposal_id, view))

    def _replayed(
        self, proposal_id: bytes, approval: domain_pb2.Approval, raw: bytes | None = None
    ) -> services_pb2.ProposalStatus | None:
        """The answer to a submission or approval that is stored already, byte for byte (a
        retry after a lost answer, perhaps to another replica): the proposal as it stands
        now, whatever happened to it since. None when it is not a replay.

        A submission's idempotency key is its proposal id (the hash of its bytes) and the
        proposer's signed approval; an approval's is the proposal id and the operator's
        signed approval. Both were verified when first stored, so answering changes nothing
        and tells nothing GetProposal would not.
        """
        stored = self.store.get_proposal(proposal_id)
        if stored is None or (raw is not None and stored.proposal != raw):
            return None
        if approval.SerializeToString(deterministic=True) not in stored.approvals:
            return None
        log.info(
            "proposal %s: a retried %s, stored already; answered as it stands",
            proposal_id.hex()[:16],
            "submission" if raw is not None else "approval",
        )
        return self.book.status(self.book.close_if_due(stored, self.now()))

    def cancel(self, vote: domain_pb2.CancelVote) -> services_pb2.ProposalStatus:
        """The proposer cancels at once; any other current operator's signature is a vote.

        Votes are stored like approvals (one per operator, durable before the answer) and
        cancel the proposal once those of distinct current operators reach the threshold the
        proposal needs to apply, so no single operator can veto another's proposal.
        """
        proposal_id, operator_id = vote.proposal_id, vote.operator_id
        # The operators who may vote are those of the state the proposal is for: the head,
        # checked again below once the proposal is loaded (no apply runs meanwhile).
        with self.writes:
            head = self.chain.head
            manifest = head.manifest
            name = operator_name(manifest, operator_id)
            stored = self.store.get_proposal(proposal_id)
            view = self._open(stored, head)
            voted = self._verified_vote(vote, view, head, name)
            record = self.book.close_if_due(self.book.found(stored, proposal_id), self.now())
            if record.state.closed:
                raise FailedPreconditionError(
                    f"the proposal is {record.state.value} already; there is nothing to cancel"
                )
            if view is None:  # it was due a moment ago, and is not now: the clock moved back
                view = CheckedProposal.from_record(record, self.limits)
            if view.proposal.base_state_hash != head.hash:
                raise ConflictError(
                    "the domain moved on while the cancel was checked; look at the proposal "
                    "again and retry"
                )
            if operator_id == view.proposal.proposer_id:
                detail = f"cancelled by operator {name}, who proposed it"
            else:
                record, view = self._add_vote(view, voted, vote, name)
                result = view.cancel_votes_under(head)
                if not result.met:
                    log.info(
                        "proposal %s: %s voted to cancel (%s)",
                        proposal_id.hex()[:16],
                        name,
                        result.describe("votes to cancel"),
                    )
                    return self.book.status(record, view)
                voters = ", ".join(manifest.operators_by_id[i].name for i in result.approved_by)
                detail = f"cancelled by the votes of {result.describe('operators')}: {voters}"
            self.store.set_proposal_state(
                proposal_id, ProposalState.CANCELLED, detail, closed_at=self.now()
            )
        log.info("proposal %s %s", proposal_id.hex()[:16], detail)
        return self.book.status(self.book.load(proposal_id), view)

    def _open(self, stored: ProposalRecord | None, head: SealedState) -> CheckedProposal | None:
        """The stored proposal, parsed, if it is pending and neither expired nor stale."""
        if stored is None or stored.state is not ProposalState.PENDING:
            return None
        due = closing(
            stored.expires_at, stored.base_version, stored.base_state_hash, head, self.now()
        )
        return CheckedProposal.from_record(stored, self.limits) if due is None else None

    @staticmethod
    def _verified_vote(
        vote: domain_pb2.CancelVote, view: CheckedProposal | None, head: SealedState, name: str
    ) -> CheckedProposal | None:
        """Verify a vote to cancel (BadSignatureError if it does not verify): in the count of
        the votes, with the stored ones (its operator's own left out), when it is one for an
        open proposal, which is returned with the vote; on its own otherwise (the proposer's,
        or one for a proposal that is about to be refused anyway)."""
        if view is not None and vote.operator_id != view.proposal.proposer_id:
            voted = view.with_cancel_vote(vote)
            if vote.operator_id in voted.cancel_votes_under(head).approved_by:
                return voted
            raise _bad_vote(name)
        key = head.manifest.operator_keys[vote.operator_id]
        try:
            quorum.verify_cancel_signature(vote, vote.proposal_id, key)
        except BadSignatureError:
            raise _bad_vote(name) from None
        return None

    def _add_vote(
        self,
        view: CheckedProposal,
        voted: CheckedProposal | None,
        vote: domain_pb2.CancelVote,
        name: str,
    ) -> tuple[ProposalRecord, CheckedProposal]:
        """Store another operator's verified vote to cancel (ALREADY_EXISTS with where the
        votes stand if they voted already); the record and the proposal with the vote."""
        if not self.store.add_cancel_vote(
            vote.proposal_id, vote.operator_id, vote.SerializeToString(deterministic=True)
        ):
            votes = view.cancel_votes_under(self.chain.head).describe("votes to cancel")
            raise AlreadyExistsError(
                f"you (operator {name}) voted to cancel this proposal already; "
                f"{cancel_standing(votes)}"
            )
        record = self.book.load(vote.proposal_id)
        if voted is None or not voted.matches(record):
            voted = CheckedProposal.from_record(record, self.limits)
        return record, voted


def _bad_vote(name: str) -> BadSignatureError:
    """The refusal of a vote to cancel whose signature does not verify."""
    return BadSignatureError(
        f"the cancel signature does not verify under the key of operator {name}: "
        "sign the cancel message of this proposal with your own token"
    )
