"""The gRPC services of an HSA: thin adapters from protobuf to `DomainNode` and domain_core.

Who may call what (docs/runtime.md):
- `HsaAdmin`: the coordinator identity; `GetStatus` also any CA-certified caller;
- `HsaPeer`: HSAs whose TLS certificate fingerprint is in this node's verified head (states,
  signed head confirmations, key floors: `hsa_node.peering`); a floor push is taken only
  from such a caller;
- `Diagnostics`: any CA-certified caller (mutual TLS is required by the server).

Invariants: servicers raise `domain_core.errors` exceptions and never abort themselves (the
`ErrorMappingInterceptor` maps errors to statuses); `ApplyProposal` and `RotateDomainKey`
return a sealed state without installing it: a state is installed only through
`InstallState` or the sync paths, all via `DomainNode.offer`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from domain_core import sealing, transport
from domain_core.errors import (
    ChainGapError,
    FailedPreconditionError,
    HsmDomainError,
    LimitExceededError,
    PermissionDeniedError,
    UnavailableError,
)
from domain_core.faults import unsafe_crash_point, warn_if_enabled
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import Proposal
from domain_core.pb import domain_pb2, services_pb2, services_pb2_grpc
from domain_core.pki import PeerIdentity
from domain_core.transition import StateHead, next_manifest, scheduled_rotation_manifest
from hsa_node.node import DomainNode
from hsa_node.peering import Peering

__all__ = ["DiagnosticsServicer", "HsaAdminServicer", "HsaPeerServicer"]

log = logging.getLogger(__name__)

CatchUp = Callable[[], int]
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


class HsaAdminServicer(services_pb2_grpc.HsaAdminServicer):
    """Apply, rotate and install states; called by the coordinator."""

    def __init__(
        self,
        node: DomainNode,
        catch_up: CatchUp,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._node = node
        self._catch_up = catch_up
        self._limits = limits
        self._clock = clock
        warn_if_enabled(log)

    def _coordinator(self, context: grpc.ServicerContext) -> PeerIdentity:
        return _require_domain_caller(context, self._node.domain_id, "coordinator")

    def _try_catch_up(self, reason: str) -> None:
        try:
            installed = self._catch_up()
        except HsmDomainError as error:
            log.info("could not catch up (%s): %s: %s", reason, type(error).__name__, error)
        else:
            if installed:
                log.info("caught up %d state(s) from the coordinator (%s)", installed, reason)

    def ApplyProposal(
        self, request: services_pb2.ApplyProposalRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        """Verify a quorum-approved proposal, seal and sign the next state; do not install it."""
        self._coordinator(context)
        try:
            return self._apply(request)
        except HsmDomainError as error:
            log.warning("refused to apply a proposal: %s: %s", type(error).__name__, error)
            raise

    def _apply(self, request: services_pb2.ApplyProposalRequest) -> domain_pb2.SealedState:
        if len(request.approvals) > self._limits.max_approvals_per_proposal:
            raise LimitExceededError(
                f"more than {self._limits.max_approvals_per_proposal} approvals in one request"
            )
        proposal = Proposal.from_bytes(request.proposal, self._limits)
        if proposal.base_version > self._node.version:
            self._try_catch_up(f"proposal for version {proposal.base_version}")
        snapshot = self._node.signing_snapshot()
        head = snapshot.head
        approvals = list(request.approvals)
        manifest, result = next_manifest(
            StateHead(head.manifest, head.hash),
            proposal,
            approvals,
            now=int(self._clock()),
            limits=self._limits,
        )
        host_id = self._node.host_id
        if all(h.host_id != host_id for h in manifest.hosts):
            raise FailedPreconditionError(
                f"this proposal removes {host_id}, which therefore cannot seal the next state; "
                "ask another HSA to apply it"
            )
        sealed = sealing.seal_state(
            manifest,
            sealing.next_domain_keys(snapshot.keys, manifest),
            producer_host_id=host_id,
            producer=self._node.identity.signer,
            proposal=proposal,
            approvals=approvals,
        )
        log.info(
            "sealed version %d for proposal %s (%s); not installed",
            sealed.version,
            proposal.id.hex()[:16],
            result.describe(),
        )
        unsafe_crash_point("hsa_apply_after_seal")
        return sealed.message

    def RotateDomainKey(
        self, request: services_pb2.ScheduledRotationRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        """Seal a scheduled domain key rotation (refused before it is due); do not install it."""
        self._coordinator(context)
        try:
            return self._rotate()
        except HsmDomainError as error:
            log.info("refused a scheduled rotation: %s: %s", type(error).__name__, error)
            raise

    def _rotate(self) -> domain_pb2.SealedState:
        snapshot = self._node.signing_snapshot()
        head = snapshot.head
        manifest = scheduled_rotation_manifest(
            StateHead(head.manifest, head.hash), now=int(self._clock())
        )
        sealed = sealing.seal_state(
            manifest,
            sealing.next_domain_keys(snapshot.keys, manifest),
            producer_host_id=self._node.host_id,
            producer=self._node.identity.signer,
            proposal=None,
        )
        log.info(
            "sealed scheduled rotation version %d (domain key generation %d); not installed",
            sealed.version,
            sealed.manifest.current_generation,
        )
        return sealed.message

    def InstallState(
        self, request: services_pb2.InstallStateRequest, context: grpc.ServicerContext
    ) -> services_pb2.InstallStateResponse:
        """Verify, persist and install a state the coordinator stored; catch up on a gap."""
        self._coordinator(context)
        state = self._node.parse_offered(request.state, source="InstallState", limits=self._limits)
        try:
            self._node.offer(state, source="InstallState")
        except ChainGapError:
            self._try_catch_up(f"InstallState of version {state.version}")
            self._node.offer(state, source="InstallState")
        removed_at = self._node.removed_at
        if removed_at is not None:
            raise FailedPreconditionError(
                f"{self._node.host_id} was removed from the domain at version {removed_at}; "
                f"it no longer installs states (it stays at version {self._node.version})"
            )
        head = self._node.head
        return services_pb2.InstallStateResponse(version=head.version, state_hash=head.hash)

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
        self, node: DomainNode, limits: Limits = DEFAULT_LIMITS, peering: Peering | None = None
    ) -> None:
        """`peering` answers ConfirmHead and the key floor calls (None: they are UNAVAILABLE)."""
        self._node = node
        self._limits = limits
        self._peering = peering

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
        maximum = self._limits.max_states_per_response
        limit = min(request.limit, maximum) if request.limit else maximum
        response = services_pb2.StatesResponse()
        budget = self._limits.max_message_bytes - _RESPONSE_OVERHEAD
        for state in self._node.states_after(request.after_version, limit):
            size = state.message.ByteSize() + _STATE_OVERHEAD
            if size > budget and response.states:
                break  # the caller asks again after the last state it got
            budget -= size
            response.states.append(state.message)
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
    """The transport floor for benchmarks: same server stack, no work."""

    def Echo(
        self, request: services_pb2.EchoMessage, context: grpc.ServicerContext
    ) -> services_pb2.EchoMessage:
        """Return the payload (the caller is CA-certified: the server requires mutual TLS)."""
        return services_pb2.EchoMessage(payload=request.payload)
