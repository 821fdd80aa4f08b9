"""What an operator reviews before signing: a proposal judged against verified states.

`review` takes a proposal whose bytes were checked against its id, the approvals the
coordinator relays, and the states this operator verified (from its trust anchor), and
works out by itself:
- the proposal's state: applied only if the verified chain holds the state it produced; stale
  if it is not for the verified head; expired by the operator's clock; the coordinator's
  word is taken only for closing states (cancelled, rejected, expired, stale), which can only
  make the operator refuse to sign;
- the diff: `transition.apply_changes` on the verified base state (never the coordinator's
  description);
- the quorum: approvals counted with `quorum.evaluate` under the base state's operators, so a
  forged or foreign approval the coordinator relays does not count; the threshold and the
  reason it applies come from the same rule every HSA applies (`quorum.required_threshold`);
- the votes to cancel, counted the same way (`quorum.evaluate_cancel`);
- each add-host enrollment, verified against the base state's domain CA at the operator's
  clock (`_enrollment.enrollment_problems`): a proposal with one that fails is shown as such
  and never signed (`Review.require_enrollments_verify`).
- whether the proposal is signed by the proposer it names: its own approval must be among
  those that verified (`QuorumResult.proposer_approved`, the rule every HSA applies); the
  review says so on the proposer line, and `require_proposer_signed` refuses to sign one
  that is not.
Rendering: every line `review_lines` returns went through `display.escape`, so text from the
proposal or the coordinator (a detail, an operator id in a relayed approval) cannot forge
lines or drive the terminal.
Pure: no I/O, time passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from domain_core import quorum, transition
from domain_core.display import escape
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    FailedPreconditionError,
    HsmDomainError,
    ProposalExpiredError,
    StaleProposalError,
    UnknownSignerError,
)
from domain_core.model import Manifest, Proposal, SealedState
from domain_proto import domain_pb2
from operator_tool._enrollment import enrollment_problems, require_enrollments_verify
from operator_tool._render import (
    ManifestDiff,
    change_json,
    change_lines,
    diff_json,
    diff_lines,
    fingerprint,
    iso,
    manifest_diff,
    relative,
)

__all__ = ["Review", "operator_names", "review", "review_json", "review_lines", "summary_json"]

CLOSING_STATES: Final = frozenset({"cancelled", "rejected", "expired", "stale"})


@dataclass(frozen=True)
class Review:
    """A proposal as this operator sees it (see the module docstring)."""

    proposal: Proposal
    state: str  # pending, applied, stale, expired, cancelled, rejected
    detail: str
    coordinator_state: str
    head: SealedState
    base: SealedState | None
    diff: ManifestDiff | None
    diff_error: str
    result: quorum.QuorumResult | None
    applied_version: int
    names: Mapping[str, str]
    now: int
    cancel_result: quorum.QuorumResult | None = None
    enrollment_problems: tuple[tuple[str, str], ...] = ()

    @property
    def proposal_id(self) -> bytes:
        return self.proposal.id

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    @property
    def voters(self) -> Manifest:
        """The operators whose approvals count: those of the base state (else the head)."""
        return self.base.manifest if self.base is not None else self.head.manifest

    @property
    def approved_by(self) -> tuple[str, ...]:
        return self.result.approved_by if self.result is not None else ()

    @property
    def can_approve(self) -> tuple[str, ...]:
        """Operators who may still approve (none once the proposal is closed)."""
        if not self.pending or self.result is None:
            return ()
        return self.result.missing

    @property
    def threshold(self) -> int:
        return self.result.threshold if self.result is not None else 0

    @property
    def threshold_reason(self) -> str:
        """Which threshold applies and why ("3: the remove-host threshold")."""
        return self.result.reason if self.result is not None else ""

    @property
    def cancel_voted_by(self) -> tuple[str, ...]:
        """Current operators whose valid votes to cancel the coordinator holds."""
        return self.cancel_result.approved_by if self.cancel_result is not None else ()

    def cancel_standing(self) -> str:
        """Where the votes to cancel stand: '1 of 3 votes to cancel; the proposer ...'."""
        if self.cancel_result is None:
            return ""
        return (
            f"{self.cancel_result.describe('votes to cancel')}; the proposer alone may cancel "
            "at once"
        )

    @property
    def needed(self) -> int:
        return self.result.needed if self.result is not None and self.pending else 0

    def name(self, operator_id: str) -> str:
        return self.names.get(operator_id) or fingerprint(operator_id, 16)

    @property
    def proposer_signed(self) -> bool:
        """True if the proposer's own approval is among those that verified here (a proposal
        without it can never apply: every HSA requires it)."""
        return self.result is not None and self.result.proposer_approved

    def require_proposer_signed(self) -> None:
        """Raise unless the proposal carries a valid approval by the proposer it names."""
        if self.proposer_signed:
            return
        proposer = self.proposal.proposer_id
        raise BadSignatureError(
            f"this proposal names {self.name(proposer)} ({fingerprint(proposer, 16)}) as its "
            "proposer, but carries no valid approval by that operator under verified version "
            f"{self.voters.version}: it was not proposed by them and can never apply; do not "
            "sign it"
        )

    def require_pending(self) -> None:
        """Raise the one-line reason why this proposal cannot be signed any more."""
        if self.pending:
            return
        if self.state == "stale":
            raise StaleProposalError(self.detail)
        if self.state == "expired":
            raise ProposalExpiredError(self.detail)
        if self.state == "rejected":
            raise FailedPreconditionError(f"the proposal was rejected: {self.detail}")
        raise FailedPreconditionError(f"the proposal was {self.detail}")

    def require_enrollments_verify(self) -> None:
        """Raise EnrollmentError unless every add-host enrollment verifies (nothing signed)."""
        require_enrollments_verify(self.enrollment_problems)

    def require_can_sign(self, operator_id: str) -> None:
        """Raise unless `operator_id` is an operator who has not approved yet."""
        if operator_id not in self.voters.operators_by_id:
            raise UnknownSignerError(
                f"you are not an operator of this domain (operator id {operator_id[:16]}... is "
                f"not in version {self.voters.version})"
            )
        if operator_id in self.approved_by:
            raise AlreadyExistsError(
                f"already approved by you (operator {self.name(operator_id)}); one approval "
                "per operator counts"
            )


def operator_names(
    states: Sequence[SealedState], proposal: Proposal | None = None
) -> dict[str, str]:
    """Operator id -> name from every state given and the operators a proposal adds."""
    names: dict[str, str] = {}
    for state in states:
        for operator in state.manifest.message.operators:
            names[operator.operator_id] = operator.name
    if proposal is not None:
        for change in proposal.changes:
            if change.HasField("add_operator"):
                operator = change.add_operator.operator
                names.setdefault(operator.operator_id, operator.name)
    return names


def _stale_detail(proposal: Proposal, head: SealedState) -> str:
    if proposal.base_version == head.version:
        return (
            f"this proposal names version {proposal.base_version} with another state hash: it "
            "was made for a different history; do not sign it, propose again"
        )
    if proposal.base_version > head.version:
        return (
            f"this proposal is for version {proposal.base_version}, past the verified version "
            f"{head.version}: the coordinator did not serve the states in between"
        )
    return (
        f"domain is at version {head.version}, this proposal is for {proposal.base_version}: "
        "propose again"
    )


def _judge(
    proposal: Proposal,
    head: SealedState,
    successor: SealedState | None,
    applied: bool,
    now: int,
    coordinator_state: str,
    coordinator_detail: str,
) -> tuple[str, str, int]:
    """(state, detail, applied version) of a proposal, judged here: applied only if the
    verified chain holds its state; the coordinator's word only ever closes it."""
    if applied:
        assert successor is not None
        return "applied", f"applied as version {successor.version}", successor.version
    if coordinator_state in ("cancelled", "rejected"):
        return coordinator_state, coordinator_detail or coordinator_state, 0
    if proposal.base_version != head.version or proposal.base_state_hash != head.hash:
        return "stale", _stale_detail(proposal, head), 0
    if now >= proposal.expires_at:
        detail = (
            f"the proposal expired at {iso(proposal.expires_at)} "
            f"({relative(proposal.expires_at, now)}): propose again"
        )
        return "expired", detail, 0
    if coordinator_state in CLOSING_STATES:
        return coordinator_state, coordinator_detail or coordinator_state, 0
    return "pending", "", 0


def _diff(
    proposal: Proposal, base: SealedState | None, applied_state: SealedState | None, now: int
) -> tuple[ManifestDiff | None, str]:
    """(diff, why there is none) of a proposal on its verified base state: the state it
    produced if it applied, else `transition.apply_changes` here."""
    if base is None:
        return None, (
            f"the base state (version {proposal.base_version}) is not in the chain verified from "
            "your trust anchor, so the change cannot be shown"
        )
    try:
        if applied_state is not None:
            after = applied_state.manifest.message
        else:
            after, _ = transition.apply_changes(base.manifest.message, proposal, now=now)
        return manifest_diff(base.manifest.message, after), ""
    except HsmDomainError as error:
        return None, f"the changes do not apply to version {base.version}: {error.message}"


def review(
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    head: SealedState,
    states: Mapping[int, SealedState],
    now: int,
    coordinator_state: str = "pending",
    coordinator_detail: str = "",
    cancel_votes: Sequence[domain_pb2.CancelVote] = (),
) -> Review:
    """Judge a proposal against the verified `head` and the verified `states` by version."""
    base = states.get(proposal.base_version)
    if base is not None and base.hash != proposal.base_state_hash:
        base = None
    successor = states.get(proposal.base_version + 1)
    applied = (
        base is not None
        and successor is not None
        and successor.proposal is not None
        and successor.proposal.id == proposal.id
    )
    state, detail, applied_version = _judge(
        proposal, head, successor, applied, now, coordinator_state, coordinator_detail
    )
    diff, diff_error = _diff(proposal, base, successor if applied else None, now)
    voters = base.manifest if base is not None else head.manifest
    seen = [s for s in (base, head, successor) if s is not None]
    return Review(
        proposal=proposal,
        state=state,
        detail=detail,
        coordinator_state=coordinator_state,
        head=head,
        base=base,
        diff=diff,
        diff_error=diff_error,
        result=quorum.evaluate(voters, proposal, approvals),
        applied_version=applied_version,
        names=operator_names(seen, proposal),
        now=now,
        cancel_result=quorum.evaluate_cancel(voters, proposal, cancel_votes),
        # An applied proposal's enrollments are judged when its state was made (as every HSA
        # judges them), so a certificate that expired since does not make it look forged.
        enrollment_problems=enrollment_problems(
            base.manifest if base is not None else None,
            proposal,
            successor.manifest.created_at if applied and successor is not None else now,
        ),
    )


# --- rendering -------------------------------------------------------------------------------


def _status_line(r: Review) -> str:
    if r.pending:
        if not r.proposer_signed:
            return (
                f"pending: {len(r.approved_by)} of {r.threshold} approvals, but NOT SIGNED BY "
                "ITS PROPOSER: it cannot apply"
            )
        more = f"{r.needed} more needed" if r.needed else "quorum reached, applying"
        return f"pending: {len(r.approved_by)} of {r.threshold} approvals, {more}"
    return f"{r.state}: {r.detail}"


def _proposer_line(r: Review) -> str:
    p = r.proposal
    who = f"{r.name(p.proposer_id)} ({fingerprint(p.proposer_id, 16)})"
    if r.proposer_signed:
        return (
            f"{who}, signed: their approval verifies under their key in version {r.voters.version}"
        )
    return (
        f"{who}, NOT SIGNED: no approval by this operator verifies under version "
        f"{r.voters.version}; the proposal can never apply: do not approve it"
    )


def review_lines(r: Review, *, diff: bool = True) -> list[str]:
    """The text of `proposals show` (and what `approve` shows before asking), one escaped
    line per item."""
    p = r.proposal
    rows = [
        ("proposal", p.id.hex()),
        ("state", _status_line(r)),
        ("proposer", _proposer_line(r)),
        ("reason", p.message.reason or "(none given)"),
        ("created", iso(p.created_at)),
        ("expires", f"{iso(p.expires_at)} ({relative(p.expires_at, r.now)})"),
        (
            "base",
            f"version {p.base_version} (state {p.base_state_hash.hex()[:16]}); the verified "
            f"domain is at version {r.head.version}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += ["", "changes:"]
    lines += [f"  {line}" for line in change_lines(p.changes, r.names)]
    lines += enrollment_lines(r)
    if diff:
        lines += ["", f"what changes (computed here from verified version {p.base_version}):"]
        if r.diff is not None:
            lines += [f"  {line}" for line in diff_lines(r.diff)]
        else:
            lines.append(f"  {r.diff_error}")
    lines += [
        "",
        f"approvals: {len(r.approved_by)} of {r.threshold}"
        + (f", {r.needed} more needed" if r.needed else "")
        + f" (each signature verified here under the keys of version {r.voters.version})",
    ]
    lines.append(f"  threshold        {r.threshold_reason}")
    approved = ", ".join(r.name(i) for i in r.approved_by) or "nobody yet"
    lines.append(f"  approved by      {approved}")
    if r.pending:
        lines.append(
            f"  can approve      {', '.join(r.name(i) for i in r.can_approve) or 'nobody'}"
        )
    if r.pending and r.cancel_voted_by:
        voters = ", ".join(r.name(i) for i in r.cancel_voted_by)
        lines.append(f"  cancel votes     {r.cancel_standing()} ({voters})")
    if r.result is not None and r.result.rejected:
        ignored = ", ".join(f"{r.name(i)} ({why})" for i, why in r.result.rejected)
        lines.append(f"  not counted      {ignored}")
    return [escape(line) for line in lines]


def enrollment_lines(r: Review) -> list[str]:
    """Whether the add-host enrollments of the proposal verify ([] when it adds no host)."""
    hosts = [c for c in r.proposal.changes if c.WhichOneof("change") == "add_host"]
    if not hosts:
        return []
    if not r.enrollment_problems:
        return [
            "",
            "enrollment: verified here against the domain CA of version "
            f"{r.proposal.base_version}: the host proved it holds its signing, agreement and "
            "TLS keys",
        ]
    return [
        "",
        "enrollment: DOES NOT VERIFY, do not approve (hsm-operator refuses to sign it):",
        *(f"  {host_id}: {why}" for host_id, why in r.enrollment_problems),
    ]


def summary_json(r: Review) -> dict[str, Any]:
    """One proposal in `proposals list --json` (and the head of `proposals show --json`)."""
    p = r.proposal
    return {
        "proposal_id": p.id.hex(),
        "state": r.state,
        "detail": r.detail,
        "coordinator_state": r.coordinator_state,
        "domain_id": p.domain_id,
        "base_version": p.base_version,
        "base_state_hash": p.base_state_hash.hex(),
        "proposer_id": p.proposer_id,
        "proposer": r.names.get(p.proposer_id),
        "proposer_signed": r.proposer_signed,
        "reason": p.message.reason,
        "created_at": iso(p.created_at),
        "expires_at": iso(p.expires_at),
        "expires_in_seconds": p.expires_at - r.now,
        "changes": change_json(p.changes, r.names),
        "threshold": r.threshold,
        "threshold_reason": r.threshold_reason,
        "approvals": len(r.approved_by),
        "approved_by": [{"operator_id": i, "name": r.names.get(i)} for i in r.approved_by],
        "can_approve": [{"operator_id": i, "name": r.names.get(i)} for i in r.can_approve],
        "needed": r.needed,
        "cancel_votes": [{"operator_id": i, "name": r.names.get(i)} for i in r.cancel_voted_by],
        "applied_version": r.applied_version,
    }


def review_json(r: Review) -> dict[str, Any]:
    """`proposals show --json`: the summary plus the diff computed here."""
    document = summary_json(r)
    document["head_version"] = r.head.version
    document["diff"] = diff_json(r.diff) if r.diff is not None else None
    document["diff_error"] = r.diff_error or None
    document["enrollment_problems"] = [
        {"host_id": host_id, "reason": why} for host_id, why in r.enrollment_problems
    ]
    document["not_counted"] = (
        [{"operator_id": i, "reason": why} for i, why in r.result.rejected]
        if r.result is not None
        else []
    )
    return document
