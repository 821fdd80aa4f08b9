"""The gRPC services of an HSA: thin adapters from protobuf to `DomainNode` and domain_core.

Who may call what (docs/runtime.md, "Identities and who may call what"):
- `HsaAdmin`: only the coordinator the node config pins (`CoordinatorPin`: its SPIFFE id and,
  when pinned, its certificate's fingerprint); `GetStatesAfter` (read-only) lets a coordinator
  whose store is behind fetch the states it misses; `GetStatus` also any CA-certified caller
  of this domain (it is public);
- `HsaPeer`: HSAs whose TLS certificate fingerprint is in this node's verified head (states,
  signed head confirmations, key floors: `hsa_node.peering`; signed audit heads, which every
  reader verifies); a floor push is taken only from such a caller;
- `Diagnostics`: application (`client`) identities of this domain, as `KeyService`.

Each method checks the caller, then hands the request to what owns the work: the node
(`DomainNode.offer`, `status`, `states_after`), the state producer (`hsa_node.producer`,
ApplyProposal and RotateDomainKey, under the rules of `domain_core.producing`), the peering
(`hsa_node.peering`) or the audit head book; none computes a state itself.

Invariants: servicers raise `domain_core.errors` exceptions and never abort themselves (the
`ErrorMappingInterceptor` maps errors to statuses); `ApplyProposal` and `RotateDomainKey`
return a sealed state without installing it: a state is installed only through
`InstallState` or the sync paths, all via `DomainNode.offer`; and they produce a state that
removes hosts or retires domain-key generations only once no stored key record would be
stranded by it (`StateProducer`, with the key upkeep: records signed by a removed host are
signed again, records under a retired generation re-wrapped), answering
TransitionDeferredError (UNAVAILABLE, the coordinator retries) until then.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from domain_core.errors import (
    ChainGapError,
    FailedPreconditionError,
    PermissionDeniedError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.pki import PeerIdentity, SpiffeId
from domain_edge import transport
from domain_edge.config import NodeConfig, coordinator_spiffe_id
from domain_edge.faults import warn_if_enabled
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from hsa_node.audit_heads import AuditHeadBook
from hsa_node.keysession import SessionCall, SessionRules, serve_stream
from hsa_node.node import DomainNode
from hsa_node.peering import Peering
from hsa_node.producer import (
    CatchUp,
    KeyRecordPreparer,
    StateProducer,
    end_recovery_session,
    try_catch_up,
)

__all__ = [
    "CoordinatorPin",
    "DiagnosticsServicer",
    "HsaAdminServicer",
    "HsaPeerServicer",
]

log = logging.getLogger(__name__)

_RESPONSE_OVERHEAD = 1024  # bytes kept free in a response for framing
_STATE_OVERHEAD = 16  # field tag and length of one state in a response


def _require_domain_caller(
    context: grpc.ServicerContext, domain_id: str, *kinds: str
) -> PeerIdentity:
    """The caller, if its identity is of one of `kinds` and belongs to this domain."""
    identity = transport.require_caller(context, *kinds) if kinds else transport.caller(context)
    if identity.spiffe.domain != domain_id:
        raise PermissionDeniedError(
            f"{identity.spiffe.uri} belongs to another trust domain than {domain_id}"
        )
    return identity


@dataclass(frozen=True)
class CoordinatorPin:
    """The one coordinator an HSA takes HsaAdmin calls from, as its node config pins it.

    Any certificate of kind `coordinator` from the domain CA is not enough: the caller must
    carry the pinned SPIFFE id and, when fingerprints are pinned (`hsm-domain init` pins the
    certificate it issued), present one of those very certificates. Without a pinned id no
    caller is the coordinator.
    """

    spiffe: SpiffeId | None
    fingerprints: frozenset[bytes] = frozenset()

    @classmethod
    def from_config(cls, config: NodeConfig) -> CoordinatorPin:
        """The pin of `config` (`coordinator_identity`, `coordinator_fingerprints`)."""
        spiffe = (
            coordinator_spiffe_id(config.coordinator_identity)
            if config.coordinator_identity
            else None
        )
        return cls(spiffe, frozenset(bytes.fromhex(f) for f in config.coordinator_fingerprints))

    def describe(self) -> str:
        """One line for the log: what is pinned, and how strongly."""
        if self.spiffe is None:
            return "no coordinator pinned: HsaAdmin refuses every caller (GetStatus aside)"
        if not self.fingerprints:
            return (
                f"coordinator pinned by id only ({self.spiffe.uri}): any certificate the "
                "domain CA issues for that id is accepted"
            )
        return (
            f"coordinator pinned: {self.spiffe.uri} with {len(self.fingerprints)} "
            "certificate fingerprint(s)"
        )

    def check(self, identity: PeerIdentity) -> None:
        """PermissionDeniedError unless `identity` is the pinned coordinator."""
        if self.spiffe is None:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} may not call this: this HSA has no coordinator pinned "
                "(coordinator_identity in its node config), so it takes no HsaAdmin call"
            )
        if identity.spiffe != self.spiffe:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} may not call this: it is for this HSA's coordinator, "
                f"{self.spiffe.uri}"
            )
        if self.fingerprints and identity.fingerprint not in self.fingerprints:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} presented a certificate (SHA-256 "
                f"{identity.fingerprint.hex()[:16]}...) that is not the one this HSA pins for "
                "its coordinator (coordinator_fingerprints in its node config)"
            )


def _states_after(
    node: DomainNode, request: services_pb2.StatesAfterRequest, limits: Limits
) -> services_pb2.StatesResponse:
    """The node's verified states after a version, oldest first, within the message limit."""
    maximum = limits.max_states_per_response
    limit = min(request.limit, maximum) if request.limit else maximum
    response = services_pb2.StatesResponse()
    budget = limits.max_message_bytes - _RESPONSE_OVERHEAD
    for state in node.states_after(request.after_version, limit):
        size = state.message.ByteSize() + _STATE_OVERHEAD
        if size > budget and response.states:
            break  # the caller asks again after the last state it got
        budget -= size
        response.states.append(state.message)
    return response


class HsaAdminServicer(services_pb2_grpc.HsaAdminServicer):
    """Apply, rotate and install states; called by the pinned coordinator only."""

    def __init__(
        self,
        node: DomainNode,
        catch_up: CatchUp,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        *,
        coordinator: CoordinatorPin,
        key_records: KeyRecordPreparer | None = None,
        session_dir: Path | None = None,
    ) -> None:
        """`key_records` None: this HSA has no coordinator, hence no stored key records;
        `session_dir`: where this host keeps a recovery session's key (its identity dir)."""
        self._node = node
        self._catch_up = catch_up
        self._limits = limits
        self._pin = coordinator
        self._producer = StateProducer(
            node,
            catch_up,
            key_records=key_records,
            limits=limits,
            clock=clock,
            session_dir=session_dir,
        )
        if session_dir is not None:
            end_recovery_session(node, session_dir)
        warn_if_enabled(log)

    def _coordinator(self, context: grpc.ServicerContext) -> PeerIdentity:
        identity = _require_domain_caller(context, self._node.domain_id, "coordinator")
        self._pin.check(identity)
        return identity

    def ApplyProposal(
        self, request: services_pb2.ApplyProposalRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        """Verify a quorum-approved proposal, seal and sign the next state; do not install it
        (`StateProducer.for_proposal`)."""
        self._coordinator(context)
        return self._producer.for_proposal(request.proposal, request.approvals).message

    def RotateDomainKey(
        self, request: services_pb2.ScheduledRotationRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        """Seal a scheduled domain key rotation (refused before it is due); do not install it
        (`StateProducer.scheduled_rotation`)."""
        self._coordinator(context)
        return self._producer.scheduled_rotation().message

    def InstallState(
        self, request: services_pb2.InstallStateRequest, context: grpc.ServicerContext
    ) -> services_pb2.InstallStateResponse:
        """Verify, persist and install a state the coordinator stored; catch up on a gap."""
        self._coordinator(context)
        state = self._node.parse_offered(request.state, source="InstallState", limits=self._limits)
        try:
            self._node.offer(state, source="InstallState")
        except ChainGapError:
            try_catch_up(self._catch_up, f"InstallState of version {state.version}")
            self._node.offer(state, source="InstallState")
        removed_at = self._node.removed_at
        if removed_at is not None:
            raise FailedPreconditionError(
                f"{self._node.host_id} was removed from the domain at version {removed_at}; "
                f"it no longer installs states (it stays at version {self._node.version})"
            )
        head = self._node.head
        return services_pb2.InstallStateResponse(version=head.version, state_hash=head.hash)

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        """This HSA's verified states after a version, for a coordinator whose store is behind.

        Read-only: the coordinator verifies every state against its own chain before it
        stores one (a restored old store repairs itself this way).
        """
        self._coordinator(context)
        return _states_after(self._node, request, self._limits)

    def GetStatus(
        self, request: services_pb2.HsaStatusRequest, context: grpc.ServicerContext
    ) -> services_pb2.HsaStatus:
        """Public status of this HSA (any CA-certified caller)."""
        _require_domain_caller(context, self._node.domain_id)
        status = self._node.status()
        return services_pb2.HsaStatus(
            host_id=status.host_id,
            domain_id=status.domain_id,
            version=status.version,
            state_hash=status.state_hash,
            healthy=status.healthy,
            domain_key_generation=status.domain_key_generation,
            member=status.member,
            detail=status.detail,
            key_service_waiting=status.key_service_waiting,
            head_unconfirmed=status.head_unconfirmed,
        )


class HsaPeerServicer(services_pb2_grpc.HsaPeerServicer):
    """Verified states, signed head confirmations and key floors for the other HSAs of the
    domain (gossip, `hsa_node.peering`)."""

    def __init__(
        self,
        node: DomainNode,
        limits: Limits = DEFAULT_LIMITS,
        peering: Peering | None = None,
        *,
        audit_heads: AuditHeadBook | None = None,
    ) -> None:
        """`peering` answers ConfirmHead and the key floor calls (None: they are UNAVAILABLE);
        `audit_heads` serves GetAuditHeads (None: an empty answer)."""
        self._node = node
        self._limits = limits
        self._peering = peering
        self._audit_heads = audit_heads

    def _peering_of(self, context: grpc.ServicerContext) -> tuple[Peering, str]:
        """The peering and the calling host, a host of the verified head."""
        caller = self._peer(context).spiffe.name
        if self._peering is None:
            raise UnavailableError(f"{self._node.host_id} does not answer peers' key calls")
        return self._peering, caller

    def _peer(self, context: grpc.ServicerContext) -> PeerIdentity:
        identity = _require_domain_caller(context, self._node.domain_id, "hsa")
        if not self._node.is_peer(identity.fingerprint, identity.spiffe.name):
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} is not a host of the domain at version "
                f"{self._node.version} (its TLS certificate is not in the verified state)"
            )
        return identity

    def GetLatestState(
        self, request: services_pb2.LatestStateRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        """The newest verified state of this HSA."""
        self._peer(context)
        return self._node.head.message

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        """Verified states after a version, oldest first, at most `limit` (default 100)."""
        self._peer(context)
        return _states_after(self._node, request, self._limits)

    def GetAuditHeads(
        self, request: services_pb2.AuditHeadsRequest, context: grpc.ServicerContext
    ) -> services_pb2.AuditHeadsResponse:
        """This HSA's audit heads and the highest it keeps of its peers' (only `host_id`'s
        when given)."""
        self._peer(context)
        response = services_pb2.AuditHeadsResponse()
        if self._audit_heads is None:
            return response
        budget = self._limits.max_message_bytes - _RESPONSE_OVERHEAD
        for head in self._audit_heads.served(request.host_id[:64]):
            budget -= len(head.raw) + _STATE_OVERHEAD
            if budget < 0:
                break
            response.heads.append(services_pb2.AuditHead(checkpoint=head.raw))
        return response

    def ConfirmHead(
        self, request: services_pb2.ConfirmHeadRequest, context: grpc.ServicerContext
    ) -> services_pb2.HeadConfirmation:
        """This HSA's head and floor table position, signed over the caller's nonce."""
        peering, caller = self._peering_of(context)
        return peering.confirm_head(request, caller)

    def GetKeyFloors(
        self, request: services_pb2.KeyFloorsRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyFloors:
        """A signed page of this HSA's key metadata floors."""
        peering, caller = self._peering_of(context)
        return peering.key_floors(request, caller)

    def PushKeyFloors(
        self, request: services_pb2.PushKeyFloorsRequest, context: grpc.ServicerContext
    ) -> services_pb2.PushKeyFloorsResponse:
        """Raise this HSA's floors to those the calling host (of the verified head) pushed."""
        peering, caller = self._peering_of(context)
        return peering.accept_pushed(request, caller)


class DiagnosticsServicer(services_pb2_grpc.DiagnosticsServicer):
    """The transport floor for benchmarks: same server stack, no work; for the applications
    of this domain, as the key service (the same identity check, so the floor stays fair).
    `EchoSession` is the floor of key-service sessions: the same session machinery
    (`keysession.serve_stream`: reader, batches, in-flight bound), each message answered on
    the reader as a key-service call whose key is cached is."""

    def __init__(self, domain_id: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self._domain_id = domain_id
        self._limits = limits

    def _check(self, context: grpc.ServicerContext) -> None:
        spiffe = transport.require_caller_spiffe(context, "client")
        if spiffe.domain != self._domain_id:
            raise PermissionDeniedError(
                f"{spiffe.uri} belongs to another trust domain than {self._domain_id}"
            )

    def Echo(
        self, request: services_pb2.EchoMessage, context: grpc.ServicerContext
    ) -> services_pb2.EchoMessage:
        """Return the payload to an application of this domain."""
        self._check(context)
        return services_pb2.EchoMessage(payload=request.payload)

    def EchoSession(
        self,
        request_iterator: Iterator[services_pb2.EchoMessages],
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        """Return every payload, through the machinery of key-service sessions (non-blocking,
        as `KeyService.Session`)."""
        if send_response_callback is None:
            raise RuntimeError("gRPC did not serve EchoSession as a non-blocking stream")
        self._check(context)
        numbers = itertools.count()

        def admit(request: Any) -> SessionCall:
            return SessionCall(next(numbers), "echo", request, None)  # no pool: all inline

        def run(call: SessionCall, context: grpc.ServicerContext) -> services_pb2.EchoMessage:
            self._check(context)  # per message, as a key-service call checks its caller
            return services_pb2.EchoMessage(payload=call.request.payload)

        rules = SessionRules(
            admit=admit,
            run=run,
            in_flight=self._limits.max_session_calls_in_flight,
            unpack=lambda batch: batch.messages,
            pack=lambda answers: services_pb2.EchoMessages(messages=answers),
        )
        serve_stream(request_iterator, context, send_response_callback, rules)

    EchoSession.experimental_non_blocking = True  # type: ignore[attr-defined]
    EchoSession.experimental_thread_pool = None  # type: ignore[attr-defined]
