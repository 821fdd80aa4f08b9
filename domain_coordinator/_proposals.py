"""The proposals stored at the coordinator: loading, closing what is due, listing, statuses.

Invariants:
- a pending proposal whose expiry passed is EXPIRED, one whose base is no longer the head is
  STALE, decided from the stored columns (`closing`); the sweeper finds those in the store's
  indexed columns and closes them in one transaction, reading no proposal;
- the threshold reported for a proposal is `quorum.evaluate`'s (`quorum.required`'s for one
  whose standing is not shown), the rule every HSA applies; a pending proposal's standing is
  remembered per proposal, head and number of approvals and votes (which only ever grow), so
  listing the same proposals again parses and verifies nothing again;
- a page of proposals is newest first, within the message limit; its cost to the caller's
  quota is charged before it is read (`_admission`);
- a closed proposal is purged after the retention period once it has expired (its bytes can
  never be stored again as new: they are refused as expired).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from domain_coordinator._checked import CheckedProposal
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalRecord, ProposalState, iso_date
from domain_core import crypto
from domain_core.errors import (
    FailedPreconditionError,
    NotFoundError,
    ProposalExpiredError,
    StaleProposalError,
)
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_proto import domain_pb2, services_pb2

log = logging.getLogger(__name__)

# How many proposals one sweep closes, or considers for applying, at most (the rest wait for
# the next sweep); both are found by the store without reading proposals.
SWEEP_BATCH = 1000
_STANDINGS_KEPT = 4096  # quorum counts of listed proposals remembered (`_standing`)

_STATE_TO_PROTO: dict[ProposalState, services_pb2.ProposalState] = {
    ProposalState.PENDING: services_pb2.PROPOSAL_STATE_PENDING,
    ProposalState.APPLIED: services_pb2.PROPOSAL_STATE_APPLIED,
    ProposalState.EXPIRED: services_pb2.PROPOSAL_STATE_EXPIRED,
    ProposalState.CANCELLED: services_pb2.PROPOSAL_STATE_CANCELLED,
    ProposalState.STALE: services_pb2.PROPOSAL_STATE_STALE,
    ProposalState.REJECTED: services_pb2.PROPOSAL_STATE_REJECTED,
}


def stale_detail(head_version: int, proposal_version: int) -> str:
    """Why a proposal for another version than the head can no longer apply."""
    return (
        f"domain is at version {head_version}, this proposal is for {proposal_version}: "
        "propose again"
    )


def closing(
    expires_at: int, base_version: int, base_state_hash: bytes, head: SealedState, now: int
) -> tuple[ProposalState, str] | None:
    """The final state (and its detail) of a pending proposal whose time or base has passed,
    from its stored columns; None while it may still apply."""
    if now >= expires_at:
        return ProposalState.EXPIRED, f"expired at {iso_date(expires_at)}"
    if base_version > head.version:
        # Made on a head this coordinator has not adopted yet (another replica stored it):
        # never stale from here; the caller adopts the stored states first.
        return None
    if base_version != head.version or not crypto.constant_time_equal(base_state_hash, head.hash):
        return ProposalState.STALE, stale_detail(head.version, base_version)
    return None


def refuse_closed(record: ProposalRecord) -> None:
    """Raise the error that explains why a closed proposal takes no more approvals."""
    state, detail = record.state, record.detail
    if state is ProposalState.APPLIED:
        raise FailedPreconditionError(
            f"the proposal was applied already (version {record.applied_version})"
        )
    if state is ProposalState.EXPIRED:
        raise ProposalExpiredError(f"the proposal {detail or 'expired'}; propose again")
    if state is ProposalState.STALE:
        raise StaleProposalError(detail or "the domain moved on: propose again")
    if state is ProposalState.CANCELLED:
        raise FailedPreconditionError(f"the proposal was {detail or 'cancelled'}")
    if state is ProposalState.REJECTED:
        raise FailedPreconditionError(
            f"the proposal was rejected: {detail}; change it and propose again"
        )


def cancel_standing(result_description: str) -> str:
    """Where the votes to cancel a pending proposal stand, in one phrase."""
    return f"{result_description}; the proposer alone may cancel at once"


@dataclass(eq=False, repr=False)
class ProposalBook:
    """The stored proposals and what operators see of them."""

    chain: VerifiedChain
    store: CoordinatorStore
    limits: Limits
    now: Callable[[], int]
    _standings: OrderedDict[tuple[bytes, bytes, int, int], tuple[int, str]] = field(
        init=False, default_factory=OrderedDict
    )
    _standings_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def load(self, proposal_id: bytes) -> ProposalRecord:
        """The stored proposal; NOT_FOUND naming it if there is none."""
        return self.found(self.store.get_proposal(proposal_id), proposal_id)

    @staticmethod
    def found(record: ProposalRecord | None, proposal_id: bytes) -> ProposalRecord:
        """`record`, the stored proposal `proposal_id`; NOT_FOUND naming it if it is None."""
        if record is None:
            raise NotFoundError(
                f"no proposal {proposal_id.hex()[:16]}... at this coordinator; check the id "
                "(list the pending proposals)"
            )
        return record

    def close_if_due(self, record: ProposalRecord, now: int) -> ProposalRecord:
        """Expire or stale a pending proposal whose time or base has passed; the new record."""
        if record.state is not ProposalState.PENDING:
            return record
        if record.base_version > self.chain.head.version:
            self.chain.refresh()  # another replica moved the chain; its notice has not come
        due = closing(
            record.expires_at, record.base_version, record.base_state_hash, self.chain.head, now
        )
        if due is None:
            return record
        state, detail = due
        if self.store.set_proposal_state(record.proposal_id, state, detail, closed_at=now):
            log.info("proposal %s is %s: %s", record.proposal_id.hex()[:16], state.value, detail)
        return self.load(record.proposal_id)

    def close_due(self) -> None:
        """Expire or stale every pending proposal the clock or the head overtook: found by
        the store from indexed columns (nothing else is read), closed in one transaction."""
        now = self.now()
        head = self.chain.head
        due = self.store.due_proposals(now, head.version, head.hash, SWEEP_BATCH)
        closings = []
        for summary in due:
            found = closing(
                summary.expires_at, summary.base_version, summary.base_state_hash, head, now
            )
            if found is not None:
                closings.append((summary.proposal_id, *found))
        if not closings:
            return
        closed = set(self.store.close_proposals(closings, now))
        for proposal_id, state, detail in closings:
            if proposal_id in closed:
                log.info("proposal %s is %s: %s", proposal_id.hex()[:16], state.value, detail)

    def quorum_candidates(self) -> list[bytes]:
        """The pending proposals that may have a quorum: those with at least as many stored
        approvals as the head's default threshold (no proposal needs fewer, and every stored
        approval verified on arrival), found by the store without reading any proposal."""
        threshold = self.chain.head.manifest.message.quorum.threshold
        return self.store.pending_with_approvals(threshold, SWEEP_BATCH)

    def status(
        self, record: ProposalRecord, view: CheckedProposal | None = None
    ) -> services_pb2.ProposalStatus:
        """The wire form of a stored proposal, with the threshold under the head's policy
        (`view`, if it matches the record, spares parsing and counting it again)."""
        if view is not None and not view.matches(record):
            view = None
        approvals: Sequence[domain_pb2.Approval] = (
            view.approvals
            if view is not None
            else [domain_pb2.Approval.FromString(a) for a in record.approvals]
        )
        detail = record.detail
        shown = record.state is ProposalState.PENDING and not detail
        threshold, standing = self._standing(record, view, shown)
        if shown:
            detail = standing
        return services_pb2.ProposalStatus(
            proposal_id=record.proposal_id,
            proposal=record.proposal,
            approvals=approvals,
            state=_STATE_TO_PROTO[record.state],
            threshold=threshold,
            applied_version=record.applied_version,
            detail=detail,
            cancel_votes=(
                view.cancel_votes
                if view is not None
                else [domain_pb2.CancelVote.FromString(v) for v in record.cancel_votes]
            ),
        )

    def _standing(
        self, record: ProposalRecord, view: CheckedProposal | None, shown: bool
    ) -> tuple[int, str]:
        """The threshold of a stored proposal under the head and, if `shown`, where its
        approvals (and votes to cancel) stand, in words: remembered per head and number of
        approvals and votes (neither is ever replaced or withdrawn)."""
        head = self.chain.head
        key = (record.proposal_id, head.hash, len(record.approvals), len(record.cancel_votes))
        with self._standings_lock:
            known = self._standings.get(key)
            if known is not None and (known[1] or not shown):
                self._standings.move_to_end(key)
                return known
        if view is None:
            view = CheckedProposal.from_record(record, self.limits)
        if not shown:
            remembered = (view.threshold_under(head), "")
        else:
            result = view.approvals_under(head)
            standing = result.describe() + (
                f"; {result.needed} more needed" if not result.met else "; quorum reached"
            )
            if record.cancel_votes:
                votes = view.cancel_votes_under(head).describe("votes to cancel")
                standing += f"; {cancel_standing(votes)}"
            remembered = (result.threshold, standing)
        with self._standings_lock:
            self._standings[key] = remembered
            while len(self._standings) > _STANDINGS_KEPT:
                self._standings.popitem(last=False)
        return remembered

    def page(
        self, include_closed: bool, limit: int, before: int
    ) -> services_pb2.ListProposalsResponse:
        """One page of proposals, newest first, within the message limit (its cost was charged
        when the call was admitted)."""
        now = self.now()
        records = self.store.list_proposals(
            include_closed=include_closed, limit=limit + 1, before=before
        )
        response = services_pb2.ListProposalsResponse()
        budget = self.limits.max_message_bytes - 1024
        for index, record in enumerate(records[:limit]):
            if record.state is ProposalState.PENDING:
                record = self.close_if_due(record, now)
            status = self.status(record)
            size = status.ByteSize() + 16
            if size > budget and response.proposals:
                break  # the rest does not fit in one answer
            budget -= size
            response.proposals.append(status)
            if index + 1 < len(records):
                response.next_page_token = str(record.seq)
            else:
                response.next_page_token = ""
        return response

    def purge_closed(self, retention_seconds: int) -> int:
        """Delete the proposals (approvals and votes to cancel with them) that were closed
        more than `retention_seconds` ago and have expired by this coordinator's clock; how
        many. An expired proposal cannot be submitted again, so a purged one stays closed."""
        now = self.now()
        purged = self.store.purge_closed_proposals(now - retention_seconds, now)
        if purged:
            log.info(
                "purged %d proposals closed more than %d days ago",
                purged,
                retention_seconds // 86_400,
            )
        return purged
