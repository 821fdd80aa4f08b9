"""How an HSA produces the next domain state for the coordinator (ApplyProposal, RotateDomainKey).

`StateProducer` runs the node's side of production; the rules are `domain_core.producing`'s:
1. a proposal for a version after this node's head makes the node catch up from the
   coordinator first (`try_catch_up`), so that a node a state behind can still apply it;
2. the successor is computed over one snapshot of the head and its domain keys
   (`producing.for_proposal`, `producing.for_scheduled_rotation`);
3. the key records the change would strand (signed by a host it removes, or sealed under a
   generation it retires) are moved first (`KeyRecordPreparer`, the key upkeep:
   `hsa_node.preparation`); until none is left, TransitionDeferredError (UNAVAILABLE) and the
   coordinator retries;
4. the successor is sealed and signed as this host (`producing.seal`) and returned.
A recover proposal is produced only by its session host, a new host with no domain key yet:
it rebuilds the keys from the shares the approvals carry, sealed to the session key it keeps
in its identity directory (`producing.seal_recovery`); once it holds the recovered keys as a
member, the session key is removed (`end_recovery_session`).

Invariants: a produced state is never installed here (a state is installed only through
`InstallState` or the sync paths, all via `DomainNode.offer`); no state that removes hosts or
retires domain-key generations is produced while a stored key record would be stranded by it;
a request with more than `Limits.max_approvals_per_proposal` approvals is refused before its
proposal is parsed; a refusal is logged once where it is decided (a deferral throttled) and
propagates as the domain error it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from domain_core import producing
from domain_core.errors import (
    FailedPreconditionError,
    HsmDomainError,
    LimitExceededError,
    TransitionDeferredError,
)
from domain_core.keylifecycle import TransitionTarget
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import Proposal, SealedState
from domain_core.recovery import recover_change
from domain_core.recovery_shares import x25519_agreement, x25519_public_key
from domain_edge.faults import unsafe_crash_point
from domain_edge.identity_files import load_recovery_session_key, remove_recovery_session_key
from domain_edge.throttled_log import ThrottledLog
from domain_proto import domain_pb2
from hsa_node.node import DomainNode

__all__ = [
    "CatchUp",
    "KeyRecordPreparer",
    "StateProducer",
    "end_recovery_session",
    "try_catch_up",
]

# These lines keep the logger name they have always had (they were the servicer's).
log = logging.getLogger("hsa_node.servicers")

CatchUp = Callable[[], int]
"""Fetch and install the states the coordinator holds after this node's head; how many."""


class KeyRecordPreparer(Protocol):
    """Moves the key records a change would strand (`hsa_node.rewrap.KeyMaintainer`)."""

    def prepare_transition(self, target: TransitionTarget, version: int, change: str) -> None:
        """Return once no stored record is stranded by `change` (a proposal id in hex, or
        "rotation") to state `version`; raise TransitionDeferredError while some are."""
        ...


def end_recovery_session(node: DomainNode, session_dir: Path) -> None:
    """Remove this host's recovery session key once it serves as a member (it holds the
    recovered domain keys: the shares sealed to the session must not open any more)."""

    def on_serving(serving: bool) -> None:
        if serving and remove_recovery_session_key(session_dir):
            log.info("recovery done: removed the recovery session key of %s", node.host_id)

    node.add_listener(on_serving)


def try_catch_up(catch_up: CatchUp, reason: str) -> None:
    """Catch up from the coordinator, logging the outcome; a failure is only logged (the
    caller goes on with what it has and fails on its own terms)."""
    try:
        installed = catch_up()
    except HsmDomainError as error:
        log.info("could not catch up (%s): %s: %s", reason, type(error).__name__, error)
    else:
        if installed:
            log.info("caught up %d state(s) from the coordinator (%s)", installed, reason)


class StateProducer:
    """Produces sealed successors of this node's head (see the module invariants)."""

    def __init__(
        self,
        node: DomainNode,
        catch_up: CatchUp,
        *,
        key_records: KeyRecordPreparer | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        session_dir: Path | None = None,
    ) -> None:
        """`key_records` None: this HSA has no coordinator, hence no stored key records;
        `session_dir`: where a recovery session's key would be (the identity directory)."""
        self._node = node
        self._session_dir = session_dir
        self._catch_up = catch_up
        self._key_records = key_records
        self._limits = limits
        self._clock = clock
        self._throttled = ThrottledLog(log)

    def for_proposal(
        self, proposal_bytes: bytes, approvals: Sequence[domain_pb2.Approval]
    ) -> SealedState:
        """Verify a quorum-approved proposal, seal and sign the next state; do not install it."""
        try:
            return self._for_proposal(proposal_bytes, approvals)
        except TransitionDeferredError:
            raise  # logged (throttled) where it was decided
        except HsmDomainError as error:
            log.warning("refused to apply a proposal: %s: %s", type(error).__name__, error)
            raise

    def _for_proposal(
        self, proposal_bytes: bytes, approvals: Sequence[domain_pb2.Approval]
    ) -> SealedState:
        if len(approvals) > self._limits.max_approvals_per_proposal:
            raise LimitExceededError(
                f"more than {self._limits.max_approvals_per_proposal} approvals in one request"
            )
        proposal = Proposal.from_bytes(proposal_bytes, self._limits)
        if proposal.base_version > self._node.version:
            try_catch_up(self._catch_up, f"proposal for version {proposal.base_version}")
        if recover_change(proposal) is not None:
            return self._for_recovery(proposal, approvals)
        snapshot = self._node.signing_snapshot()
        successor = producing.for_proposal(
            snapshot.head,
            proposal,
            approvals,
            producer_host_id=self._node.host_id,
            now=int(self._clock()),
            limits=self._limits,
        )
        self._prepare_key_records(
            successor, proposal.id.hex(), f"proposal {proposal.id.hex()[:16]}"
        )
        sealed = self._seal(successor, snapshot.keys)
        log.info(
            "sealed version %d for proposal %s (%s); not installed",
            sealed.version,
            proposal.id.hex()[:16],
            successor.describe(),
        )
        unsafe_crash_point("hsa_apply_after_seal")
        return sealed

    def _for_recovery(
        self, proposal: Proposal, approvals: Sequence[domain_pb2.Approval]
    ) -> SealedState:
        """Rebuild the domain keys from the approvals' shares and seal the recover state, as
        this session host (see the module)."""
        private = (
            load_recovery_session_key(self._session_dir) if self._session_dir is not None else None
        )
        if private is None:
            raise FailedPreconditionError(
                f"{self._node.host_id} runs no recovery session (its session key is gone: the "
                "recovery is done, or it was abandoned); open a new one with `hsm-domain recover`"
            )
        agree = x25519_agreement(private)
        session_public = x25519_public_key(private)
        sealed = producing.seal_recovery(
            self._node.states_after(0, self._node.version),
            proposal,
            approvals,
            producer_host_id=self._node.host_id,
            producer=self._node.identity.signer,
            session_public_key=session_public,
            agree=agree,
            now=int(self._clock()),
            limits=self._limits,
        )
        log.info(
            "rebuilt the domain keys from %d recovery shares and sealed the recover state "
            "version %d for proposal %s; not installed",
            sum(1 for a in approvals if a.HasField("recovery_contribution")),
            sealed.version,
            proposal.id.hex()[:16],
        )
        return sealed

    def scheduled_rotation(self) -> SealedState:
        """Seal a scheduled domain key rotation (refused before it is due); do not install it."""
        try:
            return self._scheduled_rotation()
        except TransitionDeferredError:
            raise  # logged (throttled) where it was decided
        except HsmDomainError as error:
            log.info("refused a scheduled rotation: %s: %s", type(error).__name__, error)
            raise

    def _scheduled_rotation(self) -> SealedState:
        snapshot = self._node.signing_snapshot()
        successor = producing.for_scheduled_rotation(snapshot.head, now=int(self._clock()))
        self._prepare_key_records(successor, "rotation", "the scheduled domain key rotation")
        sealed = self._seal(successor, snapshot.keys)
        log.info(
            "sealed scheduled rotation version %d (domain key generation %d); not installed",
            sealed.version,
            sealed.manifest.current_generation,
        )
        return sealed

    def _seal(self, successor: producing.Successor, keys: Mapping[int, bytes]) -> SealedState:
        """Seal `successor` with the snapshot's domain keys, signed as this host."""
        return producing.seal(
            successor,
            keys,
            producer_host_id=self._node.host_id,
            producer=self._node.identity.signer,
        )

    def _prepare_key_records(self, successor: producing.Successor, change: str, what: str) -> None:
        """Refuse (for now) a change that would strand stored key records; see the module."""
        target = TransitionTarget(
            removed_hosts=successor.removed_hosts,
            retired_generations=successor.retired_generations,
        )
        if not target or self._key_records is None:
            return
        version = successor.head.version
        try:
            self._key_records.prepare_transition(target, version, change)
        except TransitionDeferredError as error:
            self._throttled.warning(f"deferring {what} to version {version + 1}: {error}")
            raise
