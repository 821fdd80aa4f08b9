"""A proposal at the coordinator, parsed once, with its approvals and votes counted once.

`ProposalRecord` keeps bytes; one call (a submission, an approval, a vote to cancel, a sweep)
turns them into a `CheckedProposal` at its start and passes that object along, so the call
parses the proposal once and verifies each signature once however many steps look at it.

Invariants:
- a `CheckedProposal` is built only from a proposal that parsed and validated
  (`Proposal.from_bytes`) and approvals and votes that parsed;
- approvals and votes are counted only by `quorum.evaluate` and `quorum.evaluate_cancel`
  (the rule every HSA applies), under a given head; the result is remembered per head (its
  state hash), so asking again under the same head verifies nothing again; a count is never
  reused for other approvals or votes (`with_approval`, `with_cancel_vote` make a new object);
- `matches(record)` is true only if the record holds exactly these proposal bytes,
  approvals and votes (in the same order): only then may a later step reuse this object for
  that record;
- an object belongs to one call and is not shared between threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from domain_coordinator.store import ProposalRecord
from domain_core import quorum
from domain_core.limits import Limits
from domain_core.model import Proposal, SealedState
from domain_proto import domain_pb2

_APPROVALS = "approvals"
_CANCEL_VOTES = "cancel votes"


def _serialized(message: domain_pb2.Approval | domain_pb2.CancelVote) -> bytes:
    """The bytes the store keeps for an approval or a vote."""
    return message.SerializeToString(deterministic=True)


_Signed = TypeVar("_Signed", domain_pb2.Approval, domain_pb2.CancelVote)


def _adding(stored: Iterable[tuple[_Signed, bytes]], new: _Signed) -> list[tuple[_Signed, bytes]]:
    """The stored approvals (or votes) but the new one's operator's, then the new one."""
    kept: list[tuple[_Signed, bytes]] = [
        (signed, raw) for signed, raw in stored if signed.operator_id != new.operator_id
    ]
    kept.append((new, _serialized(new)))
    return kept


class CheckedProposal:
    """A parsed proposal with its parsed approvals and votes to cancel, and their counts."""

    def __init__(
        self,
        proposal: Proposal,
        approvals: Sequence[tuple[domain_pb2.Approval, bytes]],
        cancel_votes: Sequence[tuple[domain_pb2.CancelVote, bytes]] = (),
        counts: dict[tuple[str, bytes], quorum.QuorumResult] | None = None,
    ) -> None:
        self.proposal = proposal
        self.approvals = tuple(a for a, _ in approvals)
        self.cancel_votes = tuple(v for v, _ in cancel_votes)
        self._approval_bytes = tuple(raw for _, raw in approvals)
        self._vote_bytes = tuple(raw for _, raw in cancel_votes)
        self._counts = dict(counts or {})

    @classmethod
    def from_record(cls, record: ProposalRecord, limits: Limits) -> CheckedProposal:
        """Parse a stored proposal, its approvals and its votes (once)."""
        return cls(
            Proposal.from_bytes(record.proposal, limits),
            [(domain_pb2.Approval.FromString(raw), raw) for raw in record.approvals],
            [(domain_pb2.CancelVote.FromString(raw), raw) for raw in record.cancel_votes],
        )

    @classmethod
    def submitted(cls, proposal: Proposal, approval: domain_pb2.Approval) -> CheckedProposal:
        """A proposal as submitted, with its proposer's approval."""
        return cls(proposal, [(approval, _serialized(approval))])

    @property
    def id(self) -> bytes:
        """The proposal's id."""
        return self.proposal.id

    def with_approval(self, approval: domain_pb2.Approval) -> CheckedProposal:
        """This proposal with `approval` after the others' approvals (its operator's stored
        one, if any, left out): what the store holds once the approval is added. The votes'
        counts are kept; the approvals are counted anew."""
        return CheckedProposal(
            self.proposal,
            _adding(zip(self.approvals, self._approval_bytes, strict=True), approval),
            list(zip(self.cancel_votes, self._vote_bytes, strict=True)),
            {k: v for k, v in self._counts.items() if k[0] == _CANCEL_VOTES},
        )

    def with_cancel_vote(self, vote: domain_pb2.CancelVote) -> CheckedProposal:
        """This proposal with `vote` after the others' votes to cancel (its operator's stored
        one, if any, left out): what the store holds once the vote is added. The approvals'
        counts are kept; the votes are counted anew."""
        return CheckedProposal(
            self.proposal,
            list(zip(self.approvals, self._approval_bytes, strict=True)),
            _adding(zip(self.cancel_votes, self._vote_bytes, strict=True), vote),
            {k: v for k, v in self._counts.items() if k[0] == _APPROVALS},
        )

    def matches(self, record: ProposalRecord) -> bool:
        """Whether `record` holds exactly this proposal, these approvals and these votes."""
        return (
            record.proposal == self.proposal.raw
            and record.approvals == self._approval_bytes
            and record.cancel_votes == self._vote_bytes
        )

    def approvals_under(self, head: SealedState) -> quorum.QuorumResult:
        """How the approvals stand under the head (`quorum.evaluate`), counted once per head."""
        return self._counted(
            _APPROVALS, head, lambda: quorum.evaluate(head.manifest, self.proposal, self.approvals)
        )

    def cancel_votes_under(self, head: SealedState) -> quorum.QuorumResult:
        """How the votes to cancel stand under the head (`quorum.evaluate_cancel`), counted
        once per head."""
        return self._counted(
            _CANCEL_VOTES,
            head,
            lambda: quorum.evaluate_cancel(head.manifest, self.proposal, self.cancel_votes),
        )

    def _counted(
        self, kind: str, head: SealedState, count: Callable[[], quorum.QuorumResult]
    ) -> quorum.QuorumResult:
        """The remembered count of `kind` under the head, or `count()` remembered."""
        key = (kind, head.hash)
        result = self._counts.get(key)
        if result is None:
            result = count()
            self._counts[key] = result
        return result

    def threshold_under(self, head: SealedState) -> int:
        """The number of approvals the proposal needs under the head (no signature is checked
        unless the approvals were counted already)."""
        counted = self._counts.get((_APPROVALS, head.hash))
        if counted is not None:
            return counted.threshold
        return quorum.required(head.manifest, self.proposal).threshold
