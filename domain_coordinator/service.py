"""The `Coordinator` gRPC service: quorum flow, chain relay, HSA registry and key records.

The coordinator is an untrusted relay, but an honest one checks everything it can so that
operators get a clear answer early. Invariants:
- it serves only states it verified itself (`TrustedChain` from the pinned genesis): the
  head it reports, the states it streams and relays;
- a proposal is stored only after it parsed, targets the current head, is within its
  lifetime, passes the transition invariants, and carries a valid approval by its proposer;
  an approval is stored only after its signature verified under a current operator's key, at
  most one per operator; both are durable before the caller gets an answer;
- a new state is stored only after it verified as the successor of the head
  (`verify_successor`), with a compare-and-swap on the version, in the same transaction that
  marks its proposal APPLIED; only then is it pushed to HSAs and streams;
- one apply or rotation runs at a time (`_apply_lock`); a lost compare-and-swap makes the
  proposal STALE and re-reads the chain from the store;
- the version and state hash listed for each HSA (`ListHsas`, `GetDomainStatus`) are that
  HSA's self-report (in `RegisterHsa`, or its answer to an `InstallState` push), relayed for
  operators to see; nothing here or anywhere else bases a trust decision on them;
- HSA-only calls need an `hsa` certificate of this domain, which only the mutual-TLS port
  carries; errors are raised as `domain_core.errors` exceptions and mapped to statuses by the
  transport's interceptor, never aborted here.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from domain_coordinator import _requests as check
from domain_coordinator._hsa import HsaConnections, describe_rpc_error, rpc_code, rpc_details
from domain_coordinator.store import CoordinatorStore, ProposalRecord, ProposalState
from domain_core import quorum, transition
from domain_core.chain import TrustedChain, verify_successor
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ConflictError,
    FailedPreconditionError,
    HsmDomainError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    ProposalExpiredError,
    ResourceExhaustedError,
    StaleProposalError,
    UnknownSignerError,
)
from domain_core.faults import unsafe_crash_point, warn_if_enabled
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import Manifest, Proposal, SealedState
from domain_core.pb import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc
from domain_core.pki import PeerIdentity, peer_identity

log = logging.getLogger(__name__)

SERVICE_NAME = services_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
DEFAULT_MAX_STREAMS = 64
DEFAULT_SWEEP_INTERVAL_SECONDS = 2.0
MAX_PENDING_PROPOSALS = 1000
MAX_LISTED_PROPOSALS = 1000  # closed ones included: the newest
_HSA_ONLY = "this call needs an HSA certificate"

_STATE_TO_PROTO: dict[ProposalState, services_pb2.ProposalState] = {
    ProposalState.PENDING: services_pb2.PROPOSAL_STATE_PENDING,
    ProposalState.APPLIED: services_pb2.PROPOSAL_STATE_APPLIED,
    ProposalState.EXPIRED: services_pb2.PROPOSAL_STATE_EXPIRED,
    ProposalState.CANCELLED: services_pb2.PROPOSAL_STATE_CANCELLED,
    ProposalState.STALE: services_pb2.PROPOSAL_STATE_STALE,
    ProposalState.REJECTED: services_pb2.PROPOSAL_STATE_REJECTED,
}
# HSA answers that mean "this proposal cannot apply", as opposed to "ask another HSA".
_REFUSALS = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


@dataclass(frozen=True)
class _Outcome:
    """What asking HSAs to produce the next state came to."""

    state: SealedState | None = None
    refused_by: str = ""
    reason: str = ""


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stale_detail(head_version: int, proposal_version: int) -> str:
    return (
        f"domain is at version {head_version}, this proposal is for {proposal_version}: "
        "propose again"
    )


class _ThrottledLog:
    """Logs a repeated message once, and again only when it changes or after a while."""

    def __init__(self, interval: float = 60.0) -> None:
        self._last: dict[str, tuple[str, float]] = {}
        self._interval = interval
        self._lock = threading.Lock()

    def warning(self, topic: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            previous = self._last.get(topic)
            if (
                previous is not None
                and previous[0] == message
                and now - previous[1] < self._interval
            ):
                return
            self._last[topic] = (message, now)
        log.warning("%s", message)


class CoordinatorService(services_pb2_grpc.CoordinatorServicer):
    """The servicer and the quorum flow behind it (see the module invariants)."""

    def __init__(
        self,
        *,
        chain: TrustedChain,
        store: CoordinatorStore,
        hsas: HsaConnections,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        max_streams: int = DEFAULT_MAX_STREAMS,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self.domain_id = chain.domain_id
        self._chain = chain
        self._store = store
        self._hsas = hsas
        self._limits = limits
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._apply_lock = threading.RLock()
        self._chain_lock = threading.Lock()
        self._state_changed = threading.Condition()
        self._streams = threading.BoundedSemaphore(max_streams)
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._throttled = _ThrottledLog()
        warn_if_enabled(log)

    # --- lifecycle -----------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the sweeper: retries, expiry, staleness, scheduled rotation, chain refresh."""
        if self._sweeper is None:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="coordinator-sweeper", daemon=True
            )
            self._sweeper.start()

    def stop(self) -> None:
        """Stop the sweeper and end every WatchStates stream."""
        self._stopping.set()
        with self._state_changed:
            self._state_changed.notify_all()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)

    @property
    def head(self) -> SealedState:
        """The newest state this coordinator verified and stored."""
        with self._chain_lock:
            return self._chain.head

    def _now(self) -> int:
        return int(self._clock())

    # --- authorisation -------------------------------------------------------------------

    def _require_hsa(self, context: grpc.ServicerContext) -> PeerIdentity:
        """The calling HSA's identity; PERMISSION_DENIED for anyone else."""
        auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
        if not auth.get("x509_pem_cert"):
            raise PermissionDeniedError(
                f"{_HSA_ONLY}; HSAs call it on the coordinator's mutual-TLS port"
            )
        identity = peer_identity(auth)
        if identity.spiffe.kind != "hsa" or identity.spiffe.domain != self.domain_id:
            raise PermissionDeniedError(f"{identity.spiffe.uri} may not call this: {_HSA_ONLY}")
        return identity

    # --- proposal records ----------------------------------------------------------------

    def _load(self, proposal_id: bytes) -> ProposalRecord:
        record = self._store.get_proposal(proposal_id)
        if record is None:
            raise NotFoundError(
                f"no proposal {proposal_id.hex()[:16]}... at this coordinator; check the id "
                "(list the pending proposals)"
            )
        return record

    def _close_if_due(self, record: ProposalRecord, now: int) -> ProposalRecord:
        """Expire or stale a pending proposal whose time or base has passed; the new record."""
        if record.state is not ProposalState.PENDING:
            return record
        head = self.head
        proposal = Proposal.from_bytes(record.proposal, self._limits)
        if now >= record.expires_at:
            state, detail = ProposalState.EXPIRED, f"expired at {_iso(record.expires_at)}"
        elif proposal.base_version != head.version or proposal.base_state_hash != head.hash:
            state, detail = ProposalState.STALE, _stale_detail(head.version, proposal.base_version)
        else:
            return record
        if self._store.set_proposal_state(record.proposal_id, state, detail):
            log.info("proposal %s is %s: %s", record.proposal_id.hex()[:16], state.value, detail)
        return self._load(record.proposal_id)

    def _status(self, record: ProposalRecord) -> services_pb2.ProposalStatus:
        """The wire form of a stored proposal, with the threshold under the head's policy."""
        head = self.head
        proposal = Proposal.from_bytes(record.proposal, self._limits)
        approvals = [domain_pb2.Approval.FromString(a) for a in record.approvals]
        result = quorum.evaluate(head.manifest, proposal, approvals)
        detail = record.detail
        if record.state is ProposalState.PENDING and not detail:
            detail = result.describe() + (
                f"; {result.needed} more needed" if not result.met else "; quorum reached"
            )
        return services_pb2.ProposalStatus(
            proposal_id=record.proposal_id,
            proposal=record.proposal,
            approvals=approvals,
            state=_STATE_TO_PROTO[record.state],
            threshold=result.threshold,
            applied_version=record.applied_version,
            detail=detail,
        )

    @staticmethod
    def _refuse_closed(record: ProposalRecord) -> None:
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

    def _operator_key(self, manifest: Manifest, operator_id: str) -> str:
        """The operator's name; UnknownSignerError if the id is not a current operator."""
        operator = manifest.operators_by_id.get(operator_id)
        if operator is None:
            raise UnknownSignerError(
                f"you are not an operator of this domain (operator id {operator_id[:16]}... is "
                f"not in version {manifest.version})"
            )
        return operator.name

    def _verify_approval(self, manifest: Manifest, approval: domain_pb2.Approval) -> str:
        """Verify an approval under the head's operators; returns the operator's name."""
        name = self._operator_key(manifest, approval.operator_id)
        key = manifest.operator_keys[approval.operator_id]
        try:
            quorum.verify_approval_signature(approval, approval.proposal_id, key)
        except BadSignatureError:
            raise BadSignatureError(
                f"the approval's signature does not verify under the key of operator {name}: "
                "sign this proposal's id with your own token"
            ) from None
        return name

    # --- quorum flow ---------------------------------------------------------------------

    def SubmitProposal(
        self, request: services_pb2.SubmitProposalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        raw = check.serialized(request.proposal, "proposal", self._limits)
        if not request.HasField("proposer_approval"):
            raise InvalidInputError(
                "proposer_approval is missing: the proposer signs the proposal first"
            )
        approval = check.approval(request.proposer_approval, "proposer_approval")
        proposal = Proposal.from_bytes(raw, self._limits)
        now = self._now()
        head = self.head
        quorum.check_applicable(
            head.manifest,
            head.hash,
            proposal,
            now=now,
            max_skew=self._limits.max_clock_skew_seconds,
        )
        # The same invariants the HSA will enforce: refuse an impossible change up front.
        transition.apply_changes(head.manifest.message, proposal, now=now, limits=self._limits)
        if approval.proposal_id != proposal.id:
            raise BadSignatureError("proposer_approval is for another proposal than the one sent")
        if approval.operator_id != proposal.proposer_id:
            raise InvalidInputError(
                "proposer_approval must be signed by the proposer named in the proposal "
                f"({proposal.proposer_id[:16]}...)"
            )
        name = self._verify_approval(head.manifest, approval)
        if len(self._store.list_proposals()) >= MAX_PENDING_PROPOSALS:
            raise LimitExceededError(
                f"{MAX_PENDING_PROPOSALS} proposals are pending already; cancel some first"
            )
        created = self._store.put_proposal(
            proposal.id,
            raw,
            proposal.created_at,
            proposal.expires_at,
            [(approval.operator_id, approval.SerializeToString(deterministic=True))],
        )
        if not created:
            raise AlreadyExistsError(
                f"proposal {proposal.id.hex()[:16]}... was submitted already; approve it by its id"
            )
        log.info(
            "proposal %s submitted by %s for version %d",
            proposal.id.hex()[:16],
            name,
            proposal.base_version,
        )
        return self._status(self._apply_if_met(proposal.id))

    def SubmitApproval(
        self, request: services_pb2.SubmitApprovalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        if not request.HasField("approval"):
            raise InvalidInputError("approval is missing")
        approval = check.approval(request.approval)
        record = self._close_if_due(self._load(approval.proposal_id), self._now())
        self._refuse_closed(record)
        name = self._verify_approval(self.head.manifest, approval)
        added = self._store.add_approval(
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
        return self._status(self._apply_if_met(approval.proposal_id))

    def GetProposal(
        self, request: services_pb2.ProposalIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        proposal_id = check.proposal_id(request.proposal_id)
        return self._status(self._close_if_due(self._load(proposal_id), self._now()))

    def ListProposals(
        self, request: services_pb2.ListProposalsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListProposalsResponse:
        now = self._now()
        records = [self._close_if_due(r, now) for r in self._store.list_proposals()]
        if request.include_closed:
            records = self._store.list_proposals(include_closed=True)[-MAX_LISTED_PROPOSALS:]
        else:
            records = [r for r in records if r.state is ProposalState.PENDING]
        response = services_pb2.ListProposalsResponse()
        budget = self._limits.max_message_bytes - 1024
        for record in reversed(records):  # newest first into the budget, listed oldest first
            status = self._status(record)
            budget -= status.ByteSize() + 16
            if budget < 0:
                break
            response.proposals.append(status)
        response.proposals.reverse()
        return response

    def CancelProposal(
        self, request: services_pb2.CancelProposalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        proposal_id = check.proposal_id(request.proposal_id)
        operator_id = check.operator_id(request.operator_id)
        signature = check.signature(request.signature)
        manifest = self.head.manifest
        name = self._operator_key(manifest, operator_id)
        try:
            manifest.operator_keys[operator_id].verify(
                signature, quorum.cancel_message(proposal_id)
            )
        except BadSignatureError:
            raise BadSignatureError(
                f"the cancel signature does not verify under the key of operator {name}: sign "
                "the cancel message of this proposal with your own token"
            ) from None
        with self._apply_lock:
            record = self._close_if_due(self._load(proposal_id), self._now())
            if record.state.closed:
                raise FailedPreconditionError(
                    f"the proposal is {record.state.value} already; there is nothing to cancel"
                )
            self._store.set_proposal_state(
                proposal_id, ProposalState.CANCELLED, f"cancelled by operator {name}"
            )
        log.info("proposal %s cancelled by %s", proposal_id.hex()[:16], name)
        return self._status(self._load(proposal_id))

    # --- applying ------------------------------------------------------------------------

    def _apply_if_met(self, proposal_id: bytes) -> ProposalRecord:
        """If the proposal has a quorum under the head, have an HSA apply it; the record."""
        with self._apply_lock:
            record = self._close_if_due(self._load(proposal_id), self._now())
            if record.state is not ProposalState.PENDING:
                return record
            head = self.head
            proposal = Proposal.from_bytes(record.proposal, self._limits)
            approvals = [domain_pb2.Approval.FromString(a) for a in record.approvals]
            result = quorum.evaluate(head.manifest, proposal, approvals)
            if not result.met:
                return record
            unsafe_crash_point("after_quorum_before_apply")
            # Send only the approvals that count, in the operators' order.
            counted = [a for a in approvals if a.operator_id in result.approved_by]
            # A host that the proposal removes must not produce the state that removes it.
            removed = {c.remove_host.host_id for c in proposal.changes if c.HasField("remove_host")}
            outcome = self._produce(
                head,
                "apply",
                lambda address, host_id: self._hsas.apply_proposal(
                    address, proposal.raw, counted, host_id=host_id
                ),
                expect_proposal=proposal.id,
                exclude=removed,
            )
            if outcome.state is not None:
                unsafe_crash_point("after_apply_before_store")
                try:
                    self._store.append_state_and_close_proposal(
                        outcome.state.version, outcome.state.to_bytes(), proposal.id
                    )
                except ConflictError as error:
                    self._store.set_proposal_state(
                        proposal.id,
                        ProposalState.STALE,
                        f"another state was stored for version {outcome.state.version} first "
                        f"({error}): propose again",
                    )
                    self._refresh_chain()
                    return self._load(proposal.id)
                log.info(
                    "proposal %s applied: version %d (%s)",
                    proposal.id.hex()[:16],
                    outcome.state.version,
                    outcome.state.hash.hex()[:16],
                )
                unsafe_crash_point("after_store_before_push")
                self._advance(outcome.state)
            elif outcome.refused_by:
                detail = f"{outcome.refused_by} refused to apply it: {outcome.reason}"
                self._store.set_proposal_state(proposal.id, ProposalState.REJECTED, detail)
                log.warning("proposal %s rejected: %s", proposal.id.hex()[:16], detail)
            else:
                detail = f"no HSA could apply it yet: {outcome.reason}; the coordinator retries"
                self._store.set_proposal_state(proposal.id, ProposalState.PENDING, detail)
                self._throttled.warning(
                    f"apply:{proposal.id.hex()}", f"proposal {proposal.id.hex()[:16]}: {detail}"
                )
            return self._load(proposal.id)

    def _produce(
        self,
        head: SealedState,
        what: str,
        call: Callable[[str, str], domain_pb2.SealedState],
        *,
        expect_proposal: bytes | None,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> _Outcome:
        """Ask registered HSAs (but `exclude`), in random order, for the successor of `head`
        (`call(address, host_id)`)."""
        hsas = [h for h in self._store.list_hsas() if h.host_id not in exclude]
        if not hsas:
            return _Outcome(reason="no HSA has registered with this coordinator")
        random.shuffle(hsas)
        reasons: list[str] = []
        for hsa in hsas:
            try:
                status = self._hsas.get_status(hsa.address, host_id=hsa.host_id)
            except grpc.RpcError as error:
                reasons.append(f"{hsa.host_id} is unreachable ({describe_rpc_error(error)})")
                continue
            if status.host_id != hsa.host_id:
                reasons.append(f"{hsa.address} now serves {status.host_id[:63]!r}")
                continue
            if not (status.healthy and status.member):
                reasons.append(f"{hsa.host_id} is not serving ({status.detail[:200]})")
                continue
            if status.version != head.version or status.state_hash != head.hash:
                reasons.append(f"{hsa.host_id} is at version {status.version}, not {head.version}")
                continue
            try:
                message = call(hsa.address, hsa.host_id)
            except grpc.RpcError as error:
                code = rpc_code(error)
                if code in _REFUSALS:
                    return _Outcome(
                        refused_by=hsa.host_id,
                        reason=rpc_details(error),
                    )
                reasons.append(f"{hsa.host_id}: {describe_rpc_error(error)}")
                continue
            try:
                state = SealedState.from_message(message, self._limits)
                verify_successor(head, state, now=self._now())
                got = state.proposal.id if state.proposal is not None else None
                if got != expect_proposal:
                    raise FailedPreconditionError("the state carries another proposal")
            except HsmDomainError as error:
                log.error(
                    "%s returned a state for %s that does not verify: %s", hsa.host_id, what, error
                )
                reasons.append(f"{hsa.host_id} returned a state that does not verify")
                continue
            return _Outcome(state=state)
        return _Outcome(reason="; ".join(reasons)[:1000])

    def _advance(self, state: SealedState) -> None:
        """Accept a stored state: update the chain, stale the proposals it overtook, push it."""
        with self._chain_lock:
            self._chain.update(state)
        with self._state_changed:
            self._state_changed.notify_all()
        for record in self._store.list_proposals():
            self._close_if_due(record, self._now())
        self._push(state)

    def _push(self, state: SealedState) -> None:
        """Send InstallState to every registered host of `state`, each in its own thread.

        Hosts the state does not list (removed, or not yet added) are not pushed to; they
        pull when they want to follow.
        """
        members = state.manifest.hosts_by_id
        for hsa in self._store.list_hsas():
            if hsa.host_id not in members:
                continue
            threading.Thread(
                target=self._push_one,
                args=(hsa.host_id, hsa.address, state),
                name=f"push-{hsa.host_id}",
                daemon=True,
            ).start()

    def _push_one(self, host_id: str, address: str, state: SealedState) -> None:
        try:
            response = self._hsas.install_state(address, state.message, host_id=host_id)
        except grpc.RpcError as error:
            log.info(
                "pushing version %d to %s failed (%s); it will pull",
                state.version,
                host_id,
                describe_rpc_error(error),
            )
        except RuntimeError:
            pass  # shutting down
        else:
            log.info("pushed version %d to %s", state.version, host_id)
            unsafe_crash_point("during_push")
            self._record_report(host_id, response.version, response.state_hash, "InstallState")

    def _record_report(self, host_id: str, version: int, state_hash: bytes, how: str) -> None:
        """Keep the version an HSA acknowledged; a malformed one is logged and dropped."""
        try:
            version, state_hash = check.reported_state(version, state_hash)
        except InvalidInputError as error:
            log.warning("%s answered %s with a malformed version: %s", host_id, how, error)
            return
        if version:
            self._warn_if_fork(host_id, version, state_hash)
            with contextlib.suppress(RuntimeError):  # the store closed: shutting down
                self._store.record_hsa_version(host_id, version, state_hash, self._now())

    def _warn_if_fork(self, host_id: str, version: int, state_hash: bytes) -> None:
        """Log an HSA that reports another state than this coordinator's for a version."""
        with self._chain_lock:
            known = self._chain.known_hash(version)
        if known is not None and known != state_hash:
            self._throttled.warning(
                f"fork:{host_id}",
                f"{host_id} reports state {state_hash.hex()[:16]} at version {version}, but "
                f"this coordinator's chain has {known.hex()[:16]} there: a fork; investigate",
            )

    def _refresh_chain(self) -> None:
        """Verify and adopt states another coordinator stored (a shared store)."""
        while True:
            head = self.head
            batch = self._store.states_after(head.version, self._limits.max_states_per_response)
            if not batch:
                return
            for raw in batch:
                try:
                    state = SealedState.from_bytes(raw, self._limits)
                    with self._chain_lock:
                        self._chain.update(state)
                except HsmDomainError as error:
                    self._throttled.warning(
                        "refresh",
                        f"the store holds a state after version {self.head.version} that does "
                        f"not verify: {error}; not serving it",
                    )
                    return
                with self._state_changed:
                    self._state_changed.notify_all()
                log.info("adopted version %d from the store", state.version)

    def _rotate_if_due(self) -> None:
        """Scheduled rotation: when due, an HSA rotates the domain key; verify, store, push."""
        now = self._now()
        if transition.rotation_due_at(self.head.manifest) > now:
            return
        with self._apply_lock:
            head = self.head
            if transition.rotation_due_at(head.manifest) > now:
                return
            outcome = self._produce(
                head,
                "rotation",
                lambda address, host_id: self._hsas.rotate_domain_key(address, host_id=host_id),
                expect_proposal=None,
            )
            if outcome.state is None:
                reason = (
                    f"{outcome.refused_by} refused: {outcome.reason}"
                    if outcome.refused_by
                    else outcome.reason
                )
                self._throttled.warning(
                    "rotation", f"scheduled domain key rotation is due but failed: {reason}"
                )
                return
            try:
                self._store.append_state(outcome.state.version, outcome.state.to_bytes())
            except ConflictError:
                self._refresh_chain()
                return
            log.info(
                "scheduled rotation stored: version %d, domain key generation %d",
                outcome.state.version,
                outcome.state.manifest.current_generation,
            )
            self._advance(outcome.state)

    def _sweep_once(self) -> None:
        """One pass: adopt stored states, close due proposals, retry quorate ones, rotate."""
        self._refresh_chain()
        now = self._now()
        for record in self._store.list_proposals():
            record = self._close_if_due(record, now)
            if record.state is ProposalState.PENDING:
                self._apply_if_met(record.proposal_id)
        self._rotate_if_due()

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self._sweep_interval):
            try:
                self._sweep_once()
            except Exception:
                log.exception("the coordinator's sweep failed; retrying")

    # --- the chain -----------------------------------------------------------------------

    def GetLatestState(
        self, request: services_pb2.LatestStateRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        return self.head.message

    def _verified_after(self, after_version: int, limit: int) -> list[bytes]:
        """Stored states after a version, but none past this coordinator's verified head."""
        head_version = self.head.version
        count = min(limit, head_version - after_version)
        if count <= 0:
            return []
        return self._store.states_after(after_version, count)

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        maximum = self._limits.max_states_per_response
        limit = check.page_size(request.limit, maximum, maximum)
        response = services_pb2.StatesResponse()
        budget = self._limits.max_message_bytes - 1024
        for raw in self._verified_after(request.after_version, limit):
            if len(raw) + 16 > budget and response.states:
                break  # the caller asks again after the last state it got
            budget -= len(raw) + 16
            response.states.append(domain_pb2.SealedState.FromString(raw))
        return response

    def WatchStates(
        self, request: services_pb2.WatchStatesRequest, context: grpc.ServicerContext
    ) -> Iterator[domain_pb2.SealedState]:
        identity = self._require_hsa(context)
        if not self._streams.acquire(blocking=False):
            raise ResourceExhaustedError(
                "too many WatchStates streams are open; poll GetStatesAfter or retry later"
            )
        try:
            log.info(
                "%s watches states after version %d", identity.spiffe.name, request.after_version
            )
            last = request.after_version
            while not self._stopping.is_set() and context.is_active():
                batch = self._verified_after(last, self._limits.max_states_per_response)
                if batch:
                    for raw in batch:
                        yield domain_pb2.SealedState.FromString(raw)
                        last += 1
                    continue
                with self._state_changed:
                    if self.head.version <= last and not self._stopping.is_set():
                        self._state_changed.wait(timeout=1.0)
        finally:
            self._streams.release()

    def GetDomainStatus(
        self, request: services_pb2.DomainStatusRequest, context: grpc.ServicerContext
    ) -> services_pb2.DomainStatusResponse:
        head = self.head
        return services_pb2.DomainStatusResponse(
            domain_id=self.domain_id,
            version=head.version,
            state_hash=head.hash,
            hsas=self._endpoints(),
            pending_proposals=len(self._store.list_proposals()),
        )

    # --- HSA registry --------------------------------------------------------------------

    def _endpoints(self) -> list[services_pb2.HsaEndpoint]:
        """Every registered HSA with the version it last reported (relayed, not verified)."""
        return [
            services_pb2.HsaEndpoint(
                host_id=h.host_id,
                address=h.address,
                version=h.version,
                state_hash=h.state_hash,
                reported_at=h.reported_at,
            )
            for h in self._store.list_hsas()
        ]

    def RegisterHsa(
        self, request: services_pb2.RegisterHsaRequest, context: grpc.ServicerContext
    ) -> services_pb2.RegisterHsaResponse:
        identity = self._require_hsa(context)
        host_id = check.host_id(request.host_id)
        address = check.address(request.address)
        if host_id != identity.spiffe.name:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} may not register as host {host_id}: the host id must "
                "match the certificate"
            )
        version, state_hash = check.reported_state(request.version, request.state_hash)
        if version:
            self._warn_if_fork(host_id, version, state_hash)
        previous = {h.host_id: h.address for h in self._store.list_hsas()}.get(host_id)
        self._store.register_hsa(host_id, address, self._now(), version, state_hash)
        if previous != address:
            log.info("%s registered at %s", host_id, address)
            if previous is not None and previous not in {
                h.address for h in self._store.list_hsas()
            }:
                self._hsas.forget(previous)
        return services_pb2.RegisterHsaResponse(version=self.head.version)

    def ListHsas(
        self, request: services_pb2.ListHsasRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListHsasResponse:
        return services_pb2.ListHsasResponse(hsas=self._endpoints())

    # --- key records ---------------------------------------------------------------------

    def GetKey(
        self, request: services_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.KeyRecord:
        self._require_hsa(context)
        key_id = check.key_id(request.key_id)
        entry = self._store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        record = keys_pb2.KeyRecord.FromString(entry.record)
        record.revision = entry.revision
        return record

    def PutKey(
        self, request: services_pb2.PutKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.PutKeyResponse:
        identity = self._require_hsa(context)
        key_id, raw = check.key_record(request.record, self.domain_id, self._limits)
        revision = self._store.put_key(key_id, raw, request.expected_revision)
        log.info("key %s stored at revision %d by %s", key_id, revision, identity.spiffe.name)
        return services_pb2.PutKeyResponse(revision=revision)

    def ListKeyRecords(
        self, request: services_pb2.ListKeyRecordsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeyRecordsResponse:
        self._require_hsa(context)
        limit = check.page_size(request.limit, check.DEFAULT_KEY_PAGE, check.MAX_KEY_PAGE)
        after = check.key_id(request.page_token, "page_token") if request.page_token else ""
        entries = self._store.list_keys(limit + 1, after)
        response = services_pb2.ListKeyRecordsResponse()
        budget = self._limits.max_message_bytes - 1024
        last_key = ""
        for entry in entries[:limit]:
            if len(entry.record) + 32 > budget and response.records:
                response.next_page_token = last_key  # the rest does not fit in one answer
                return response
            budget -= len(entry.record) + 32
            record = keys_pb2.KeyRecord.FromString(entry.record)
            record.revision = entry.revision
            response.records.append(record)
            last_key = entry.key_id
        if len(entries) > limit:
            response.next_page_token = last_key
        return response

    def DeleteKeyRecord(
        self, request: services_pb2.DeleteKeyRecordRequest, context: grpc.ServicerContext
    ) -> services_pb2.DeleteKeyRecordResponse:
        """Delete a key whose scheduled deletion date has passed (compare-and-swap).

        An honest coordinator checks what it can: the stored metadata must say PENDING_DELETION
        with a deletion date that has passed by this coordinator's clock. (It cannot verify the
        metadata: the HSAs that read the record do.)
        """
        identity = self._require_hsa(context)
        key_id = check.key_id(request.key_id)
        if request.expected_revision == 0:
            raise InvalidInputError(
                "expected_revision is missing: give the revision of the record you read"
            )
        entry = self._store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        if entry.revision != request.expected_revision:
            raise ConflictError(
                f"key {key_id} is at revision {entry.revision}, not "
                f"{request.expected_revision}: it changed meanwhile; read it again and retry"
            )
        metadata = keys_pb2.KeyMetadata()
        try:
            metadata.ParseFromString(keys_pb2.KeyRecord.FromString(entry.record).metadata)
        except DecodeError:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} does not parse; not deleting it"
            ) from None
        now = self._now()
        if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
            raise FailedPreconditionError(f"key {key_id} is not pending deletion")
        if metadata.deletion_at > now:
            raise FailedPreconditionError(
                f"key {key_id} is scheduled for deletion at {_iso(metadata.deletion_at)}, "
                "which has not passed yet"
            )
        self._store.delete_key(key_id, request.expected_revision)
        log.info(
            "key %s deleted at revision %d by %s (scheduled for %s)",
            key_id,
            request.expected_revision,
            identity.spiffe.name,
            _iso(metadata.deletion_at),
        )
        return services_pb2.DeleteKeyRecordResponse()
