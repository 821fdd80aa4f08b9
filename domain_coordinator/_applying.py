"""Applying a quorate proposal, and the scheduled domain key rotation.

Invariants:
- one apply or rotation runs at a time (the coordinator's write lock); a proposal is sent to
  an HSA only if `quorum.evaluate` (the rule every HSA applies) finds its quorum under the
  head, with only the approvals that count, in the operators' order;
- before any HSA is asked, the change's fences are set (`_fences`), and a host that the
  proposal removes is never asked to produce the state that removes it;
- a new state is stored only after it verified as the successor of the head
  (`_producer`), with a compare-and-swap on the version, in the same transaction that marks
  its proposal APPLIED; only then is it published (`_publish`). A lost compare-and-swap
  makes the proposal STALE and re-reads the chain from the store;
- an HSA's refusal makes the proposal REJECTED with its reason; a change an HSA defers
  (UNAVAILABLE from an HSA that is serving: key records must move first) stays PENDING with
  the HSA's reason and is retried with a back-off, preferring the HSA that deferred it; a
  deferred or failed rotation is logged (throttled) with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from domain_coordinator._checked import CheckedProposal
from domain_coordinator._coordination import WriteLock
from domain_coordinator._fences import Fences
from domain_coordinator._hsa import HsaConnections
from domain_coordinator._producer import ROTATION, Deferrals, Outcome, StateProducer
from domain_coordinator._proposals import ProposalBook
from domain_coordinator._publish import Publisher
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalRecord, ProposalState
from domain_core import transition
from domain_core.errors import ConflictError
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_core.recovery import recover_change
from domain_edge.faults import unsafe_crash_point
from domain_edge.throttled_log import ThrottledLog

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False, repr=False)
class Applier:
    """Has a proposal that reached its quorum applied by an HSA, stored and published."""

    chain: VerifiedChain
    store: CoordinatorStore
    hsas: HsaConnections
    book: ProposalBook
    fences: Fences
    producer: StateProducer
    deferrals: Deferrals
    publisher: Publisher
    limits: Limits
    now: Callable[[], int]
    writes: WriteLock
    _throttled: ThrottledLog = field(init=False, default_factory=lambda: ThrottledLog(log))

    def apply_if_met(
        self, proposal_id: bytes, view: CheckedProposal | None = None
    ) -> tuple[ProposalRecord, CheckedProposal | None]:
        """If the proposal has a quorum under the head, have an HSA apply it; the record, and
        `view` (or the proposal as parsed here) if it still matches the record.

        `view` is the caller's parsed and counted proposal: used if the stored record still
        holds exactly its approvals and votes, so nothing is parsed or verified again.
        """
        with self.writes:
            record = self.book.close_if_due(self.book.load(proposal_id), self.now())
            if view is not None and not view.matches(record):
                view = None
            if record.state is not ProposalState.PENDING:
                self.deferrals.forget(proposal_id.hex())
                return record, view
            head = self.chain.head
            if view is None:
                view = CheckedProposal.from_record(record, self.limits)
            result = view.approvals_under(head)
            if not result.met:
                return record, view
            unsafe_crash_point("after_quorum_before_apply")
            self._apply(head, view, result.approved_by)
            return self.book.load(proposal_id), view

    def _apply(self, head: SealedState, view: CheckedProposal, counting: tuple[str, ...]) -> None:
        """Ask an HSA to apply the quorate proposal; store and publish its state, or record
        why it could not."""
        proposal = view.proposal
        # Before any HSA lists the key records to prepare the change: no more writes by a
        # host it removes, nor under a generation it retires.
        self.fences.fence(head, proposal)
        # Send only the approvals that count, in the operators' order.
        counted = [a for a in view.approvals if a.operator_id in counting]
        # A host that the proposal removes must not produce the state that removes it.
        removed = {c.remove_host.host_id for c in proposal.changes if c.HasField("remove_host")}
        key = proposal.id.hex()
        recover = recover_change(proposal)
        outcome = self.producer.produce(
            head,
            "apply",
            lambda address, host_id: self.hsas.apply_proposal(
                address, proposal.raw, counted, host_id=host_id
            ),
            expect_proposal=proposal.id,
            exclude=removed,
            prefer=self.deferrals.preferred(key),
            session_host=recover.session_host_id if recover is not None else "",
        )
        if outcome.state is not None:
            self.deferrals.forget(key)
            self._store_applied(proposal.id, outcome.state)
        elif outcome.refused_by:
            self.deferrals.forget(key)
            detail = f"{outcome.refused_by} refused to apply it: {outcome.reason}"
            self.store.set_proposal_state(
                proposal.id, ProposalState.REJECTED, detail, closed_at=self.now()
            )
            log.warning("proposal %s rejected: %s", proposal.id.hex()[:16], detail)
        else:
            retry = self.deferrals.defer(key, outcome)
            detail = f"no HSA could apply it yet: {outcome.reason}; the coordinator retries{retry}"
            self.store.set_proposal_state(proposal.id, ProposalState.PENDING, detail)
            self._throttled.warning(
                f"proposal {proposal.id.hex()[:16]}: {detail}",
                key=f"apply:{proposal.id.hex()}",
                again_if_changed=True,
            )

    def _store_applied(self, proposal_id: bytes, state: SealedState) -> None:
        """Store the verified state with its proposal APPLIED, then publish it; a lost
        compare-and-swap makes the proposal STALE and adopts what was stored instead."""
        unsafe_crash_point("after_apply_before_store")
        try:
            self.store.append_state_and_close_proposal(
                state.version, state.to_bytes(), proposal_id, closed_at=self.now()
            )
        except ConflictError as error:
            self.store.set_proposal_state(
                proposal_id,
                ProposalState.STALE,
                f"another state was stored for version {state.version} first "
                f"({error}): propose again",
                closed_at=self.now(),
            )
            self.chain.refresh()
            return
        log.info(
            "proposal %s applied: version %d (%s)",
            proposal_id.hex()[:16],
            state.version,
            state.hash.hex()[:16],
        )
        unsafe_crash_point("after_store_before_push")
        self.publisher.advance(state)


@dataclass(kw_only=True, eq=False, repr=False)
class ScheduledRotation:
    """When due, an HSA rotates the domain key; the state is verified, stored and published.

    An HSA defers it while key records under the generation it retires are re-wrapped; the
    rotation then waits (logged, with the reason, and retried with a back-off).
    """

    chain: VerifiedChain
    store: CoordinatorStore
    hsas: HsaConnections
    fences: Fences
    producer: StateProducer
    deferrals: Deferrals
    publisher: Publisher
    now: Callable[[], int]
    writes: WriteLock
    _throttled: ThrottledLog = field(init=False, default_factory=lambda: ThrottledLog(log))

    def rotate_if_due(self) -> None:
        """Have an HSA rotate the domain key if the head says the rotation is due."""
        now = self.now()
        if transition.rotation_due_at(self.chain.head.manifest) > now:
            self.deferrals.forget(ROTATION)
            return
        if not self.deferrals.due(ROTATION):
            return
        with self.writes:
            head = self.chain.head
            if transition.rotation_due_at(head.manifest) > now:
                return
            self.fences.fence(head, None)
            outcome = self.producer.produce(
                head,
                "rotation",
                lambda address, host_id: self.hsas.rotate_domain_key(address, host_id=host_id),
                expect_proposal=None,
                prefer=self.deferrals.preferred(ROTATION),
            )
            if outcome.state is None:
                self._waits(outcome)
                return
            self.deferrals.forget(ROTATION)
            try:
                self.store.append_state(outcome.state.version, outcome.state.to_bytes())
            except ConflictError:
                self.chain.refresh()
                return
            log.info(
                "scheduled rotation stored: version %d, domain key generation %d",
                outcome.state.version,
                outcome.state.manifest.current_generation,
            )
            self.publisher.advance(outcome.state)

    def _waits(self, outcome: Outcome) -> None:
        """Log why the due rotation did not happen, and when it is tried again."""
        retry = self.deferrals.defer(ROTATION, outcome) if not outcome.refused_by else ""
        reason = (
            f"{outcome.refused_by} refused: {outcome.reason}"
            if outcome.refused_by
            else outcome.reason
        )
        what = "waits" if outcome.deferred_by else "failed"
        self._throttled.warning(
            f"scheduled domain key rotation is due but {what}: {reason}"
            + (f"; retrying{retry}" if retry else ""),
            key="rotation",
            again_if_changed=True,
        )
