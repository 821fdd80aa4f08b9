"""Choosing the HSA that produces the next state, and believing nothing it returns.

Invariants:
- only registered hosts of the head are asked (a removed host left in the registry cannot
  veto a change by refusing it), never one the change removes, in random order (the one that
  deferred the change first); each is asked only if it answers that it is that host, serving,
  a member, and at the head; a recovery is asked of its session host alone (the one host
  holding the session key), which need only be at the head;
- a returned state is used only if it verifies as the successor of the head
  (`verify_successor`) and carries the expected proposal (none for a rotation); one that
  does not is logged at ERROR and the next HSA is asked;
- FAILED_PRECONDITION, INVALID_ARGUMENT or PERMISSION_DENIED from an HSA means the change
  cannot apply (a refusal, with the HSA's reason); UNAVAILABLE from a serving HSA means it
  prepares the change (key records must move first): the change is deferred and retried
  with a back-off (doubling up to `MAX_DEFER_SECONDS`), that HSA first.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from domain_coordinator._hsa import HsaConnections, describe_rpc_error, rpc_code, rpc_details
from domain_coordinator.store import CoordinatorStore, HsaRecord
from domain_core.chain import verify_successor
from domain_core.errors import FailedPreconditionError, HsmDomainError
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_proto import domain_pb2

log = logging.getLogger(__name__)

MAX_DEFER_SECONDS = 30.0
ROTATION = "rotation"  # the deferral key of the scheduled rotation (proposals: their id in hex)
# HSA answers that mean "this proposal cannot apply", as opposed to "ask another HSA".
_REFUSALS = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True)
class Outcome:
    """What asking HSAs to produce the next state came to."""

    state: SealedState | None = None
    refused_by: str = ""
    reason: str = ""
    deferred_by: str = ""
    """A serving HSA that answered UNAVAILABLE: it prepares the change (key records first)."""


@dataclass
class _Deferral:
    """When to ask again for a change that an HSA deferred, and whom first."""

    retry_at: float
    delay: float
    host_id: str


@dataclass(eq=False, repr=False)
class Deferrals:
    """The changes HSAs deferred, by key: when to retry each, and which HSA to ask first."""

    sweep_interval: float
    _deferrals: dict[str, _Deferral] = field(init=False, default_factory=dict)

    def preferred(self, key: str) -> str:
        """The HSA that deferred the change (ask it first: it resumes), or ""."""
        deferral = self._deferrals.get(key)
        return deferral.host_id if deferral is not None else ""

    def defer(self, key: str, outcome: Outcome) -> str:
        """Remember when to try a deferred change again (back-off); " in N s" for messages,
        "" when the outcome was not a deferral (the next sweep retries)."""
        if not outcome.deferred_by:
            self._deferrals.pop(key, None)
            return ""
        previous = self._deferrals.get(key)
        delay = (
            self.sweep_interval
            if previous is None
            else min(previous.delay * 2, max(MAX_DEFER_SECONDS, self.sweep_interval))
        )
        self._deferrals[key] = _Deferral(time.monotonic() + delay, delay, outcome.deferred_by)
        return f" in {delay:.0f} s"

    def due(self, key: str) -> bool:
        """Whether a change that may have been deferred should be tried now (the sweep)."""
        deferral = self._deferrals.get(key)
        return deferral is None or time.monotonic() >= deferral.retry_at

    def forget(self, key: str) -> None:
        """The change is done (or no longer waits): no more back-off."""
        self._deferrals.pop(key, None)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget every deferral but those of `keys` (and the rotation's)."""
        for key in set(self._deferrals) - set(keys) - {ROTATION}:
            self._deferrals.pop(key, None)


@dataclass(eq=False, repr=False)
class StateProducer:
    """Asks registered hosts of the head for its successor (see the module invariants)."""

    store: CoordinatorStore
    hsas: HsaConnections
    limits: Limits
    now: Callable[[], int]

    def produce(
        self,
        head: SealedState,
        what: str,
        call: Callable[[str, str], domain_pb2.SealedState],
        *,
        expect_proposal: bytes | None,
        exclude: frozenset[str] | set[str] = frozenset(),
        prefer: str = "",
        session_host: str = "",
    ) -> Outcome:
        """Ask registered hosts of `head` (but `exclude`), in random order (`prefer` first),
        for its successor (`call(address, host_id)`); for a recovery, its `session_host`
        alone (a new host: it need not serve, only be at the head)."""
        members = head.manifest.hosts_by_id
        hsas = [
            h
            for h in self.store.list_hsas()
            if (h.host_id == session_host if session_host else h.host_id in members)
            and h.host_id not in exclude
        ]
        if not hsas:
            if session_host:
                return Outcome(
                    reason=f"the session host {session_host} of this recovery has not "
                    "registered with this coordinator (is it running?)"
                )
            return Outcome(reason="no HSA has registered with this coordinator")
        random.shuffle(hsas)
        hsas.sort(key=lambda h: h.host_id != prefer)
        reasons: list[str] = []
        deferred_by = ""
        for hsa in hsas:
            reason = self._not_ready(hsa, head, serving=not session_host)
            if reason:
                reasons.append(reason)
                continue
            try:
                message = call(hsa.address, hsa.host_id)
            except grpc.RpcError as error:
                code = rpc_code(error)
                if code in _REFUSALS:
                    return Outcome(refused_by=hsa.host_id, reason=rpc_details(error))
                if code is grpc.StatusCode.UNAVAILABLE and not deferred_by:
                    # A serving HSA that answers UNAVAILABLE prepares the change (key records
                    # must move first): it resumes where it stopped when asked again.
                    deferred_by = hsa.host_id
                reasons.append(f"{hsa.host_id}: {describe_rpc_error(error)}")
                continue
            state = self._verified(hsa.host_id, head, message, what, expect_proposal)
            if state is None:
                reasons.append(f"{hsa.host_id} returned a state that does not verify")
                continue
            return Outcome(state=state)
        return Outcome(reason="; ".join(reasons)[:1000], deferred_by=deferred_by)

    def _not_ready(self, hsa: HsaRecord, head: SealedState, *, serving: bool = True) -> str:
        """Why this HSA cannot be asked to produce the head's successor; "" if it can (with
        `serving` False, a recovery's session host: at the head is enough)."""
        try:
            status = self.hsas.get_status(hsa.address, host_id=hsa.host_id)
        except grpc.RpcError as error:
            return f"{hsa.host_id} is unreachable ({describe_rpc_error(error)})"
        if status.host_id != hsa.host_id:
            return f"{hsa.address} now serves {status.host_id[:63]!r}"
        if serving and not (status.healthy and status.member):
            return f"{hsa.host_id} is not serving ({status.detail[:200]})"
        if status.version != head.version or status.state_hash != head.hash:
            return f"{hsa.host_id} is at version {status.version}, not {head.version}"
        return ""

    def _verified(
        self,
        host_id: str,
        head: SealedState,
        message: domain_pb2.SealedState,
        what: str,
        expect_proposal: bytes | None,
    ) -> SealedState | None:
        """The returned state, if it verifies as the head's successor carrying the expected
        proposal; None (logged) if it does not."""
        try:
            state = SealedState.from_message(message, self.limits)
            verify_successor(head, state, now=self.now())
            got = state.proposal.id if state.proposal is not None else None
            if got != expect_proposal:
                raise FailedPreconditionError("the state carries another proposal")
        except HsmDomainError as error:
            log.error("%s returned a state for %s that does not verify: %s", host_id, what, error)
            return None
        return state
