"""Quorum rules: which approvals count, and whether a proposal may apply to a state.

Invariants:
- approvals are counted by looping over the operators of the *current* state, never over the
  approvals submitted: an unknown or removed operator, or a second approval from one
  operator, can never add to the count;
- an approval counts only if its signature verifies over the domain-separated digest of this
  proposal's id (so a signature over another proposal or another domain's proposal fails);
- a proposal applies only to the exact state it names (domain id, base version, base hash),
  only before it expires, and needs the highest threshold of the change types it carries;
- time is passed in (`now`, unix seconds); nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from domain_core.canonical import PayloadType, signing_input
from domain_core.errors import (
    BadSignatureError,
    MalformedMessageError,
    ProposalExpiredError,
    QuorumNotMetError,
    StaleProposalError,
    WrongDomainError,
)
from domain_core.model import Manifest, Proposal, change_type_name
from domain_core.pb import domain_pb2
from domain_core.signers import PublicKey, Signer


def approval_message(proposal_id: bytes) -> bytes:
    """The bytes an operator signs to approve the proposal with this id."""
    return signing_input(PayloadType.PROPOSAL_APPROVAL, proposal_id)


def cancel_message(proposal_id: bytes) -> bytes:
    """The bytes an operator signs to cancel the proposal with this id."""
    return signing_input(PayloadType.PROPOSAL_CANCEL, proposal_id)


def approve(proposal: Proposal, signer: Signer) -> domain_pb2.Approval:
    """Sign a proposal with an operator's token; the operator id is the key's id."""
    return domain_pb2.Approval(
        proposal_id=proposal.id,
        operator_id=signer.public_key.key_id,
        signature=signer.sign(approval_message(proposal.id)),
    )


def verify_approval_signature(
    approval: domain_pb2.Approval, proposal_id: bytes, key: PublicKey
) -> None:
    """Raise BadSignatureError unless `approval` is a valid signature by `key` over this id."""
    if approval.proposal_id != proposal_id:
        raise BadSignatureError("the approval is for another proposal")
    key.verify(approval.signature, approval_message(proposal_id))


def required_threshold(policy: domain_pb2.QuorumPolicy, change_types: Iterable[int]) -> int:
    """The threshold a proposal needs: the highest among its change types and the default."""
    specific: dict[int, int] = {int(t.change_type): t.threshold for t in policy.change_thresholds}
    return max([policy.threshold, *(specific.get(ct, 0) for ct in change_types)])


@dataclass(frozen=True)
class QuorumResult:
    """How a set of approvals stands against a threshold under one operator set."""

    threshold: int
    approved_by: tuple[str, ...]
    missing: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]

    @property
    def met(self) -> bool:
        """True when enough distinct current operators approved."""
        return len(self.approved_by) >= self.threshold

    @property
    def needed(self) -> int:
        """How many more approvals the proposal needs (0 when met)."""
        return max(0, self.threshold - len(self.approved_by))

    def describe(self) -> str:
        """'2 of 3 approvals' style summary."""
        return f"{len(self.approved_by)} of {self.threshold} approvals"


def count_approvals(
    operators: Sequence[domain_pb2.Operator],
    operator_keys: dict[str, PublicKey],
    proposal_id: bytes,
    approvals: Sequence[domain_pb2.Approval],
    threshold: int,
) -> QuorumResult:
    """Count valid approvals, one per current operator, by looping over the operators."""
    by_operator: dict[str, list[domain_pb2.Approval]] = {}
    known = {o.operator_id for o in operators}
    rejected: list[tuple[str, str]] = []
    for approval in approvals:
        if approval.operator_id not in known:
            rejected.append((approval.operator_id[:64], "not an operator of this domain state"))
            continue
        by_operator.setdefault(approval.operator_id, []).append(approval)

    approved: list[str] = []
    missing: list[str] = []
    for operator in operators:
        candidates = by_operator.get(operator.operator_id, [])
        key = operator_keys[operator.operator_id]
        valid = False
        for approval in candidates:
            try:
                verify_approval_signature(approval, proposal_id, key)
            except BadSignatureError as error:
                rejected.append((operator.operator_id, str(error)))
                continue
            valid = True
            break
        if valid:
            approved.append(operator.operator_id)
            if len(candidates) > 1:
                rejected.append((operator.operator_id, "duplicate approval ignored"))
        else:
            missing.append(operator.operator_id)
    return QuorumResult(
        threshold=threshold,
        approved_by=tuple(approved),
        missing=tuple(missing),
        rejected=tuple(rejected),
    )


def check_applicable(
    manifest: Manifest, state_hash: bytes, proposal: Proposal, *, now: int, max_skew: int = 300
) -> None:
    """Raise unless `proposal` targets exactly this state and is within its lifetime at `now`."""
    if proposal.domain_id != manifest.domain_id:
        raise WrongDomainError(
            f"proposal is for domain {proposal.domain_id!r}, this is {manifest.domain_id!r}"
        )
    if proposal.base_version != manifest.version or proposal.base_state_hash != state_hash:
        if proposal.base_version == manifest.version:
            raise StaleProposalError(
                f"proposal names version {proposal.base_version} with another state hash: "
                "it was made for a different history; propose again"
            )
        raise StaleProposalError(
            f"domain is at version {manifest.version}, this proposal is for "
            f"{proposal.base_version}: propose again"
        )
    lifetime = manifest.message.settings.max_proposal_lifetime_seconds
    if proposal.expires_at - proposal.created_at > lifetime:
        raise MalformedMessageError(
            f"proposal lifetime {proposal.expires_at - proposal.created_at}s is longer than the "
            f"domain allows ({lifetime}s); propose with a shorter expiry"
        )
    if proposal.created_at > now + max_skew:
        raise MalformedMessageError(
            "proposal is dated in the future; check the proposer's clock and propose again"
        )
    if now >= proposal.expires_at:
        raise ProposalExpiredError(
            f"proposal expired {now - proposal.expires_at}s ago; propose again"
        )


def evaluate(
    manifest: Manifest, proposal: Proposal, approvals: Sequence[domain_pb2.Approval]
) -> QuorumResult:
    """Count approvals of `proposal` under the manifest's operators and quorum policy."""
    threshold = required_threshold(manifest.message.quorum, proposal.change_types)
    return count_approvals(
        manifest.message.operators, manifest.operator_keys, proposal.id, approvals, threshold
    )


def verify_quorum(
    manifest: Manifest,
    state_hash: bytes,
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    now: int,
) -> QuorumResult:
    """Everything a proposal needs to apply to this state; raises with an actionable message."""
    check_applicable(manifest, state_hash, proposal, now=now)
    result = evaluate(manifest, proposal, approvals)
    if not result.met:
        kinds = ", ".join(sorted(change_type_name(t) for t in proposal.change_types))
        remaining = proposal.expires_at - now
        raise QuorumNotMetError(
            f"{result.describe()} for {kinds}; {result.needed} more needed; "
            f"proposal expires in {max(remaining, 0) // 60} min"
        )
    return result
