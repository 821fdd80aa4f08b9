"""The `Coordinator` gRPC service: a thin servicer in front of the coordinator's parts.

The coordinator is an untrusted relay, but an honest one checks everything it can so that
operators get a clear answer early. The servicer only admits the caller, validates and adapts
the request (`_requests`), calls the part that does the work and returns its answer; errors
are raised as `domain_core.errors` exceptions and mapped to statuses by the transport's
interceptor, never aborted here. Invariants:
- every method runs `_admission.Admission.admit` under its rule in `_admission.RULES` before
  anything else: the servicer's methods are built from that table (`_serve_admitted`), so a
  method without a rule, or without a handler, cannot be served (the class refuses to be
  built);
- the coordinator serves only states it verified itself (`TrustedChain` from the pinned
  genesis, kept by `_verified_chain.VerifiedChain`): the head it reports, the states it
  streams and relays;
- the parts share state only through the objects `_wiring.build` hands them (the verified
  chain, the store, the HSA connections, the write lock, the stop event); none reaches
  another through the servicer.

The parts, each keeping the invariants its module states:
`_admission` (who may call what, quotas), `_quorum_flow` (submit, approve, cancel),
`_proposals` (stored proposals, statuses, listing), `_checked` (a proposal parsed and
counted once per call), `_applying` (apply a quorate proposal, the scheduled rotation),
`_producer` (which HSA produces the next state, back-off), `_fences` (key-record writes held
off during a change), `_publish` (adopt and push a stored state), `_reports` (what HSAs report,
fork warnings, the repair of a store behind them), `_registry` and `_audit_heads` (HSA
registration), `_streams` (pages and WatchStates), `_key_records`, `_sweeper`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import grpc

from domain_coordinator import _requests as check
from domain_coordinator._admission import RULES, Caller, Rule
from domain_coordinator._coordination import Coordination, SoleCoordination
from domain_coordinator._hsa import HsaConnections
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator._wiring import Settings, build
from domain_coordinator.store import CoordinatorStore
from domain_core.chain import TrustedChain
from domain_core.errors import InvalidInputError, UnavailableError
from domain_core.limits import DEFAULT_LIMITS, MAX_KEY_PAGE, MAX_PROPOSAL_PAGE, Limits
from domain_core.model import SealedState
from domain_edge.faults import warn_if_enabled
from domain_proto import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc

log = logging.getLogger(__name__)

_SERVICE = services_pb2.DESCRIPTOR.services_by_name["Coordinator"]
SERVICE_NAME = _SERVICE.full_name
DEFAULT_MAX_STREAMS = 64
DEFAULT_SWEEP_INTERVAL_SECONDS = 2.0
DEFAULT_TOMBSTONE_SECONDS = 30 * 86_400
DEFAULT_PROPOSAL_RETENTION_SECONDS = 30 * 86_400

_Servicer = TypeVar("_Servicer", bound=type[services_pb2_grpc.CoordinatorServicer])


def handler_name(method: str) -> str:
    """The servicer's handler of an RPC method: "SubmitProposal" -> "submit_proposal"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


def _admitted(name: str, rule: Rule, handler: Any, streaming: bool) -> Callable[..., Any]:
    """The gRPC method `name`: admit the caller by `rule`, then run `handler(request, caller)`."""
    if streaming:

        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._admission.admit(rule, request, context)
            yield from handler(self, request, caller)

        method: Callable[..., Any] = stream
    else:

        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._admission.admit(rule, request, context)
            return handler(self, request, caller)

        method = unary
    method.__name__ = name
    method.__qualname__ = f"CoordinatorService.{name}"
    method.__doc__ = f"`{handler_name(name)}`, for callers `_admission.RULES[{name!r}]` admits."
    cast(Any, method).admission_rule = rule
    return method


def _serve_admitted(cls: _Servicer) -> _Servicer:
    """Install every method of the Coordinator service on `cls`, each admitting its callers
    by its rule before its handler runs; TypeError if a method has no rule or no handler."""
    methods = {m.name: m for m in _SERVICE.methods}
    if set(methods) != set(RULES):
        raise TypeError(
            f"the admission rules do not match the Coordinator service: no rule for "
            f"{sorted(set(methods) - set(RULES))}, a rule for no method "
            f"{sorted(set(RULES) - set(methods))}"
        )
    for name, descriptor in methods.items():
        handler = cls.__dict__.get(handler_name(name))
        if not callable(handler):
            raise TypeError(f"{cls.__name__} has no handler {handler_name(name)} for {name}")
        setattr(cls, name, _admitted(name, RULES[name], handler, descriptor.server_streaming))
    return cls


@_serve_admitted
class CoordinatorService(services_pb2_grpc.CoordinatorServicer):
    """The servicer: builds the parts, then admits, adapts and delegates every call."""

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
        tombstone_seconds: int = DEFAULT_TOMBSTONE_SECONDS,
        proposal_retention_seconds: int = DEFAULT_PROPOSAL_RETENTION_SECONDS,
        coordination: Coordination | None = None,
    ) -> None:
        """`coordination`: how this coordinator shares the store with its replicas (None: it
        is the only one, `SoleCoordination`)."""

        def now() -> int:
            return int(clock())

        self.domain_id = chain.domain_id
        self._limits = limits
        self._now = now
        self._store = store
        self._stopping = threading.Event()
        settings = Settings(
            limits, now, max_streams, sweep_interval, tombstone_seconds, proposal_retention_seconds
        )
        self.coordination = coordination or SoleCoordination("coordinator")
        parts = build(
            VerifiedChain(chain, store, limits),
            store,
            hsas,
            settings,
            self._stopping,
            self.coordination,
        )
        self._chain = parts.chain
        self._admission = parts.admission
        self._book = parts.book
        self._flow = parts.flow
        self._relay = parts.relay
        self._reports = parts.reports
        self._registry = parts.registry
        self._audit_heads = parts.audit_heads
        self._keys = parts.keys
        self._sweeper = parts.sweeper
        self._notices = parts.notices
        # The fences of changes under way (after a restart: before any key record is put).
        parts.fences.refresh(parts.book.quorum_candidates())
        warn_if_enabled(log)

    # --- lifecycle -----------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the sweeper (retries, expiry, staleness, scheduled rotation, chain refresh),
        the store's notices, and this replica's campaign for the leadership."""
        self._notices.start()
        self.coordination.start()
        self._sweeper.start()

    def stop(self) -> None:
        """Stop the sweeper and end every WatchStates stream."""
        self._stopping.set()
        self._chain.wake()
        self._sweeper.join()
        self._notices.stop()
        self.coordination.close()

    @property
    def head(self) -> SealedState:
        """The newest state this coordinator verified and stored."""
        return self._chain.head

    def sweep_once(self) -> None:
        """One pass of the sweeper (`_sweeper.Sweeper.sweep_once`)."""
        self._sweeper.sweep_once()

    def purge_closed_proposals(self) -> int:
        """Delete the proposals closed more than the retention period ago that have expired
        (with their approvals and votes to cancel); how many."""
        return self._sweeper.purge_closed_proposals()

    # --- the quorum flow -------------------------------------------------------------------

    def submit_proposal(
        self, request: services_pb2.SubmitProposalRequest, caller: Caller
    ) -> services_pb2.ProposalStatus:
        """A new proposal with its proposer's approval (`_quorum_flow.QuorumFlow.submit`)."""
        raw = check.serialized(request.proposal, "proposal", self._limits)
        if not request.HasField("proposer_approval"):
            raise InvalidInputError(
                "proposer_approval is missing: the proposer signs the proposal first"
            )
        approval = check.approval(request.proposer_approval, "proposer_approval")
        return self._flow.submit(raw, approval)

    def submit_approval(
        self, request: services_pb2.SubmitApprovalRequest, caller: Caller
    ) -> services_pb2.ProposalStatus:
        """One operator's approval (`_quorum_flow.QuorumFlow.approve`)."""
        if not request.HasField("approval"):
            raise InvalidInputError("approval is missing")
        return self._flow.approve(check.approval(request.approval))

    def get_proposal(
        self, request: services_pb2.ProposalIdRequest, caller: Caller
    ) -> services_pb2.ProposalStatus:
        """A stored proposal as it stands now (closed first if its time or base passed)."""
        proposal_id = check.proposal_id(request.proposal_id)
        return self._book.status(self._book.close_if_due(self._book.load(proposal_id), self._now()))

    def list_proposals(
        self, request: services_pb2.ListProposalsRequest, caller: Caller
    ) -> services_pb2.ListProposalsResponse:
        """One page of proposals, newest first (pending ones, or all with `include_closed`).

        At most `limit` (default `check.DEFAULT_PROPOSAL_PAGE`, at most
        `MAX_PROPOSAL_PAGE`) and never more than fits in one message; `next_page_token`
        continues after the last one listed (empty: nothing older). A page costs the caller's
        quota by the proposals it may hold.
        """
        limit = check.page_size(request.limit, check.DEFAULT_PROPOSAL_PAGE, MAX_PROPOSAL_PAGE)
        before = check.proposal_page_token(request.page_token)
        return self._book.page(request.include_closed, limit, before)

    def cancel_proposal(
        self, request: services_pb2.CancelProposalRequest, caller: Caller
    ) -> services_pb2.ProposalStatus:
        """The proposer cancels at once; any other current operator's signature is a vote
        (`_quorum_flow.QuorumFlow.cancel`)."""
        proposal_id = check.proposal_id(request.proposal_id)
        operator_id = check.operator_id(request.operator_id)
        vote = domain_pb2.CancelVote(
            proposal_id=proposal_id,
            operator_id=operator_id,
            signature=check.signature(request.signature),
        )
        return self._flow.cancel(vote)

    # --- the chain -------------------------------------------------------------------------

    def _fresh_head(self) -> SealedState:
        """The head after adopting what the store holds beyond it: a replica whose notice of
        another replica's state has not come answers with the newer head (an operator builds a
        proposal on it). The head it verified when the store cannot be read."""
        try:
            self._chain.refresh()
        except UnavailableError:
            log.warning("cannot read the store for newer states; answering with the head")
        return self._chain.head

    def get_latest_state(
        self, request: services_pb2.LatestStateRequest, caller: Caller
    ) -> domain_pb2.SealedState:
        """The verified head, with whatever another replica stored since adopted first."""
        return self._fresh_head().message

    def get_states_after(
        self, request: services_pb2.StatesAfterRequest, caller: Caller
    ) -> services_pb2.StatesResponse:
        """A page of verified states after a version (its cost was charged by its size)."""
        maximum = self._limits.max_states_per_response
        limit = check.page_size(request.limit, maximum, maximum)
        return self._relay.page(request.after_version, limit)

    def watch_states(
        self, request: services_pb2.WatchStatesRequest, caller: Caller
    ) -> Iterator[domain_pb2.SealedState]:
        """Verified states after a version, then each new one (`_streams.StateRelay.watch`)."""
        return self._relay.watch(caller.host, request.after_version, caller.context)

    def get_domain_status(
        self, request: services_pb2.DomainStatusRequest, caller: Caller
    ) -> services_pb2.DomainStatusResponse:
        """The head, the HSAs as they report themselves, the pending count, a store behind."""
        head = self._fresh_head()
        hsas = self._store.list_hsas()
        return services_pb2.DomainStatusResponse(
            domain_id=self.domain_id,
            version=head.version,
            state_hash=head.hash,
            hsas=self._registry.endpoints(hsas),
            pending_proposals=self._store.count_proposals(),
            store_behind=self._reports.store_behind(head, hsas),
        )

    # --- HSA registry and audit heads --------------------------------------------------------

    def register_hsa(
        self, request: services_pb2.RegisterHsaRequest, caller: Caller
    ) -> services_pb2.RegisterHsaResponse:
        """Where the calling HSA listens, what it reports and its audit heads."""
        host_id = check.host_id(request.host_id)
        address = check.address(request.address)
        self._registry.check_registrant(caller.host, host_id)
        reported = check.reported_state(request.version, request.state_hash)
        heads = check.audit_heads(request.audit_heads)
        return self._registry.register(host_id, address, reported, heads)

    def list_hsas(
        self, request: services_pb2.ListHsasRequest, caller: Caller
    ) -> services_pb2.ListHsasResponse:
        """Every registered HSA with what it last reported (relayed, not verified)."""
        return services_pb2.ListHsasResponse(hsas=self._registry.endpoints())

    def get_audit_heads(
        self, request: services_pb2.AuditHeadsRequest, caller: Caller
    ) -> services_pb2.AuditHeadsResponse:
        """The highest audit head stored per host and log (public: every reader verifies
        each under the host's key)."""
        host_id = check.host_id(request.host_id) if request.host_id else ""
        return self._audit_heads.listing(host_id)

    # --- key records -----------------------------------------------------------------------

    def get_key(self, request: services_pb2.GetKeyRequest, caller: Caller) -> keys_pb2.KeyRecord:
        """The stored record of a live key, with its revision."""
        return self._keys.get(check.key_id(request.key_id))

    def put_key(
        self, request: services_pb2.PutKeyRequest, caller: Caller
    ) -> services_pb2.PutKeyResponse:
        """Store a key record that verifies as far as a coordinator can tell (see
        `_key_records`), with a compare-and-swap on its revision (0: create)."""
        checked = check.key_record(request.record, self.domain_id, self._limits)
        return self._keys.put(
            caller.host.spiffe.name, request.record, checked, request.expected_revision
        )

    def list_key_records(
        self, request: services_pb2.ListKeyRecordsRequest, caller: Caller
    ) -> services_pb2.ListKeyRecordsResponse:
        """A page of live key records, by key id."""
        limit = check.page_size(request.limit, check.DEFAULT_KEY_PAGE, MAX_KEY_PAGE)
        after = check.key_id(request.page_token, "page_token") if request.page_token else ""
        return self._keys.page(limit, after)

    def delete_key_record(
        self, request: services_pb2.DeleteKeyRecordRequest, caller: Caller
    ) -> services_pb2.DeleteKeyRecordResponse:
        """Delete a key whose scheduled deletion date has passed (compare-and-swap; see
        `_key_records.KeyRecords.delete`)."""
        key_id = check.key_id(request.key_id)
        if request.expected_revision == 0:
            raise InvalidInputError(
                "expected_revision is missing: give the revision of the record you read"
            )
        return self._keys.delete(caller.host.spiffe.name, key_id, request.expected_revision)
