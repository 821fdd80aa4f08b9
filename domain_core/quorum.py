"""Quorum rules: which approvals count, and whether a proposal may apply to a state.

Invariants:
- approvals are counted by looping over the operators of the *current* state, never over the
  approvals submitted: an unknown or removed operator, or a second approval from one
  operator, can never add to the count;
- an approval counts only if its signature verifies over the domain-separated digest of this
  proposal's id (so a signature over another proposal or another domain's proposal fails);
- a proposal applies only to the exact state it names (domain id, base version, base hash),
  and only before it expires;
- the threshold a proposal needs comes from one function, `required_threshold`, used by every
  verifier (HSAs through `transition.next_manifest`), the coordinator and the operator tool:
  the default threshold and those of the change types it carries; and if it carries a change
  that alters who may approve or how many approvals are needed (set-quorum, add-operator,
  remove-operator), the highest threshold of the whole policy, in the current policy and in
  the policy the proposal produces alike. So no sequence of proposals reaches a change with
  fewer approvals than that change needs today: lowering a threshold, or adding an operator
  whose approval would make up a quorum, needs the highest threshold itself;
- a proposal counts only with a valid approval by the proposer it names, whatever the
  threshold (`QuorumResult.met` requires it; `verify_quorum` raises without it): nobody can
  put an operator's name on a change they did not sign, and a threshold of 1 means the
  proposer's own signature, not anyone's;
- a vote to cancel counts by the same rule as an approval (distinct current operators,
  signature over this proposal's cancel message, the same threshold); the proposer alone may
  cancel at once, which is decided by the coordinator, not here;
- time is passed in (`now`, unix seconds); nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from domain_core.canonical import signing_input
from domain_core.contexts import PayloadType
from domain_core.errors import (
    BadSignatureError,
    MalformedMessageError,
    ProposalExpiredError,
    QuorumNotMetError,
    QuorumUnreachableError,
    StaleProposalError,
    WrongDomainError,
)
from domain_core.model import Manifest, Proposal, change_type_name, change_type_of
from domain_core.signers import PublicKey, Signer
from domain_proto import domain_pb2


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


def cancel(proposal_id: bytes, signer: Signer) -> domain_pb2.CancelVote:
    """Sign a vote to cancel the proposal with this id with an operator's token."""
    return domain_pb2.CancelVote(
        proposal_id=proposal_id,
        operator_id=signer.public_key.key_id,
        signature=signer.sign(cancel_message(proposal_id)),
    )


def verify_cancel_signature(
    vote: domain_pb2.CancelVote, proposal_id: bytes, key: PublicKey
) -> None:
    """Raise BadSignatureError unless `vote` is a valid cancel signature by `key` for this id."""
    if vote.proposal_id != proposal_id:
        raise BadSignatureError("the cancel vote is for another proposal")
    key.verify(vote.signature, cancel_message(proposal_id))


# --- the threshold a proposal needs ----------------------------------------------------------

# Change types that alter who may approve or how many approvals are needed. A proposal that
# carries one needs the highest threshold of the policy, before and after it (see the module
# invariants): otherwise a default quorum could lower a higher threshold, or add an operator
# whose approval makes up a higher quorum, and then make the change that needed it.
GOVERNANCE_CHANGE_TYPES: Final = frozenset(
    {
        domain_pb2.CHANGE_TYPE_SET_QUORUM,
        domain_pb2.CHANGE_TYPE_ADD_OPERATOR,
        domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR,
    }
)


@dataclass(frozen=True)
class RequiredThreshold:
    """How many approvals a proposal needs, and why, in words an operator can check."""

    threshold: int
    reason: str  # e.g. "3: the highest threshold in the policy (remove-host), because ..."


def apply_set_quorum(policy: domain_pb2.QuorumPolicy, change: domain_pb2.SetQuorum) -> None:
    """Apply one set-quorum change to `policy` in place (the transition uses this too).

    Without a change type it sets the default threshold; with one it sets (or, with 0,
    removes) that type's own threshold. Type thresholds stay sorted by type. With `recovery`
    it sets the recovery threshold.
    """
    if change.recovery:
        policy.recovery_threshold = change.threshold
        return
    if change.change_type == domain_pb2.CHANGE_TYPE_UNSPECIFIED:
        policy.threshold = change.threshold
        return
    kept = [t for t in policy.change_thresholds if t.change_type != change.change_type]
    if change.threshold > 0:
        kept.append(
            domain_pb2.ChangeThreshold(change_type=change.change_type, threshold=change.threshold)
        )
    kept.sort(key=lambda t: t.change_type)
    del policy.change_thresholds[:]
    policy.change_thresholds.extend(kept)


def policy_after(
    policy: domain_pb2.QuorumPolicy, changes: Iterable[domain_pb2.Change]
) -> domain_pb2.QuorumPolicy:
    """The quorum policy after `changes` apply (only set-quorum changes touch it), in order."""
    after = domain_pb2.QuorumPolicy()
    after.CopyFrom(policy)
    for change in changes:
        if change.HasField("set_quorum"):
            apply_set_quorum(after, change.set_quorum)
    return after


def _thresholds(policy: domain_pb2.QuorumPolicy) -> list[tuple[str, int]]:
    """Every threshold of a policy with its label: the default first, then by change type."""
    return [("default", policy.threshold)] + [
        (change_type_name(t.change_type), t.threshold) for t in policy.change_thresholds
    ]


def _highest(thresholds: Sequence[tuple[str, int]]) -> tuple[int, str]:
    """The highest threshold and the label(s) that carry it ("default, remove-host")."""
    top = max(value for _, value in thresholds)
    return top, ", ".join(label for label, value in thresholds if value == top)


def _names(change_types: Iterable[int]) -> str:
    names = sorted(change_type_name(t) for t in change_types)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def required_threshold(
    policy: domain_pb2.QuorumPolicy, changes: Sequence[domain_pb2.Change]
) -> RequiredThreshold:
    """The threshold a proposal with these changes needs under `policy`, and why.

    The highest of the default threshold and the thresholds of its change types (a type's
    own threshold never lowers the default); and if any change alters who may approve or how
    many are needed (`GOVERNANCE_CHANGE_TYPES`), the highest threshold in the current policy
    and in the policy the proposal produces.
    """
    types = {change_type_of(c) for c in changes}
    if domain_pb2.CHANGE_TYPE_RECOVER in types:
        top, labels = _highest(_thresholds(policy))
        recovery = policy.recovery_threshold
        if recovery > top:
            top, labels = recovery, "recovery"
        return RequiredThreshold(
            top,
            f"{top}: the highest threshold in the policy ({labels}) and at least the recovery "
            "threshold, because recover lets new hosts hold the domain keys",
        )
    governance = types & GOVERNANCE_CHANGE_TYPES
    if governance:
        now_top, now_labels = _highest(_thresholds(policy))
        new_top, new_labels = _highest(_thresholds(policy_after(policy, changes)))
        if new_top > now_top:
            where = f"the policy this proposal sets ({new_labels})"
        elif now_top > new_top:
            where = f"the current policy ({now_labels})"
        else:
            where = f"the policy ({now_labels})"
        verb = "changes" if len(governance) == 1 else "change"
        top = max(now_top, new_top)
        return RequiredThreshold(
            top,
            f"{top}: the highest threshold in {where}, because {_names(governance)} {verb} who "
            "may approve or how many approvals are needed",
        )
    specific = {int(t.change_type): t.threshold for t in policy.change_thresholds}
    candidates = [("default", policy.threshold)] + [
        (change_type_name(t), specific[t]) for t in sorted(types) if t in specific
    ]
    top, labels = _highest(candidates)
    plural = "s" if "," in labels else ""
    return RequiredThreshold(top, f"{top}: the {labels} threshold{plural}")


def required(manifest: Manifest, proposal: Proposal) -> RequiredThreshold:
    """The threshold `proposal` needs under the manifest's quorum policy, and why."""
    return required_threshold(manifest.message.quorum, proposal.changes)


def check_reachable(manifest: Manifest, proposal: Proposal) -> RequiredThreshold:
    """The threshold `proposal` needs; QuorumUnreachableError if its operators are too few.

    A proposal that adds operators and raises a threshold past the current number of
    operators in one go can never gather enough approvals: it must be split.
    """
    need = required(manifest, proposal)
    count = len(manifest.message.operators)
    if need.threshold > count:
        raise QuorumUnreachableError(
            f"this proposal needs {need.reason}, but only the {count} current operators can "
            "approve it: add the operators in one proposal, then raise the threshold in another"
        )
    return need


@dataclass(frozen=True)
class QuorumResult:
    """How a set of approvals (or cancel votes) stands against a threshold."""

    threshold: int
    approved_by: tuple[str, ...]
    missing: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]
    reason: str = ""  # why this threshold applies (RequiredThreshold.reason)
    # The operator whose own valid approval is required (a proposal's proposer); "" for
    # cancel votes and plain counts.
    proposer_id: str = ""

    @property
    def proposer_approved(self) -> bool:
        """True when the proposer's own approval is among those that verified (or none is
        required)."""
        return not self.proposer_id or self.proposer_id in self.approved_by

    @property
    def met(self) -> bool:
        """True when enough distinct current operators approved, the proposer among them."""
        return len(self.approved_by) >= self.threshold and self.proposer_approved

    @property
    def needed(self) -> int:
        """How many more approvals the proposal needs (0 when met); the proposer's own
        approval is always one of them while it is missing."""
        return max(self.threshold - len(self.approved_by), 0 if self.proposer_approved else 1)

    def describe(self, noun: str = "approvals") -> str:
        """'2 of 3 approvals' style summary ('1 of 3 votes to cancel' with that noun)."""
        return f"{len(self.approved_by)} of {self.threshold} {noun}"


# An approval or a cancel vote: who signed which proposal, and the signature.
_Signed = TypeVar("_Signed", domain_pb2.Approval, domain_pb2.CancelVote)


def _count(
    operators: Sequence[domain_pb2.Operator],
    operator_keys: dict[str, PublicKey],
    proposal_id: bytes,
    signed: Sequence[_Signed],
    threshold: int,
    reason: str,
    verify: Callable[[_Signed, bytes, PublicKey], None],
    noun: str,
    proposer_id: str = "",
) -> QuorumResult:
    """Count valid signatures, one per current operator, by looping over the operators."""
    by_operator: dict[str, list[_Signed]] = {}
    known = {o.operator_id for o in operators}
    rejected: list[tuple[str, str]] = []
    for item in signed:
        if item.operator_id not in known:
            rejected.append((item.operator_id[:64], "not an operator of this domain state"))
            continue
        by_operator.setdefault(item.operator_id, []).append(item)

    approved: list[str] = []
    missing: list[str] = []
    for operator in operators:
        candidates = by_operator.get(operator.operator_id, [])
        key = operator_keys[operator.operator_id]
        valid = False
        for item in candidates:
            try:
                verify(item, proposal_id, key)
            except BadSignatureError as error:
                rejected.append((operator.operator_id, str(error)))
                continue
            valid = True
            break
        if valid:
            approved.append(operator.operator_id)
            if len(candidates) > 1:
                rejected.append((operator.operator_id, f"duplicate {noun} ignored"))
        else:
            missing.append(operator.operator_id)
    return QuorumResult(
        threshold=threshold,
        approved_by=tuple(approved),
        missing=tuple(missing),
        rejected=tuple(rejected),
        reason=reason or f"{threshold}: the threshold given",
        proposer_id=proposer_id,
    )


def count_approvals(
    operators: Sequence[domain_pb2.Operator],
    operator_keys: dict[str, PublicKey],
    proposal_id: bytes,
    approvals: Sequence[domain_pb2.Approval],
    threshold: int,
    reason: str = "",
    *,
    proposer_id: str = "",
) -> QuorumResult:
    """Count valid approvals, one per current operator, by looping over the operators.

    With `proposer_id`, the result is met only if that operator's approval is among them.
    """
    return _count(
        operators,
        operator_keys,
        proposal_id,
        approvals,
        threshold,
        reason,
        verify_approval_signature,
        "approval",
        proposer_id,
    )


def count_cancel_votes(
    operators: Sequence[domain_pb2.Operator],
    operator_keys: dict[str, PublicKey],
    proposal_id: bytes,
    votes: Sequence[domain_pb2.CancelVote],
    threshold: int,
    reason: str = "",
) -> QuorumResult:
    """Count valid cancel votes, one per current operator, by looping over the operators."""
    return _count(
        operators,
        operator_keys,
        proposal_id,
        votes,
        threshold,
        reason,
        verify_cancel_signature,
        "cancel vote",
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
    """Count approvals of `proposal` under the manifest's operators and quorum policy; met
    only with its proposer's own valid approval among them."""
    need = required(manifest, proposal)
    return count_approvals(
        manifest.message.operators,
        manifest.operator_keys,
        proposal.id,
        approvals,
        need.threshold,
        need.reason,
        proposer_id=proposal.proposer_id,
    )


def evaluate_cancel(
    manifest: Manifest, proposal: Proposal, votes: Sequence[domain_pb2.CancelVote]
) -> QuorumResult:
    """Count votes to cancel `proposal`: the same operators and threshold as its approvals."""
    need = required(manifest, proposal)
    return count_cancel_votes(
        manifest.message.operators,
        manifest.operator_keys,
        proposal.id,
        votes,
        need.threshold,
        need.reason,
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
    check_reachable(manifest, proposal)
    result = evaluate(manifest, proposal, approvals)
    if not result.met:
        kinds = ", ".join(sorted(change_type_name(t) for t in proposal.change_types))
        remaining = proposal.expires_at - now
        unsigned = (
            ""
            if result.proposer_approved
            else f"; it is not signed by the proposer it names ({proposal.proposer_id[:16]}...), "
            "and a proposal counts only with its proposer's own valid approval"
        )
        raise QuorumNotMetError(
            f"{result.describe()} for {kinds} (needs {result.reason}){unsigned}; "
            f"{result.needed} more needed; proposal expires in {max(remaining, 0) // 60} min"
        )
    return result
