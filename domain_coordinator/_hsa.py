"""Calls from the coordinator to HSAs (`HsaAdmin`), over mutual TLS as the coordinator.

Invariants: every call carries a deadline; one channel per HSA (address and host id), reused;
every channel talks only to the HSA the caller names (`transport.hsa_host`: the TLS handshake
refuses a server whose certificate is not that host's, so a registered address that now
serves another certificate gets nothing); nothing an HSA returns is believed here (the caller
verifies returned states against its own chain).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

import grpc

from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge.transport import TlsMaterial, hsa_host, mtls_channel
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

STATUS_TIMEOUT_SECONDS = 2.0


def rpc_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    """The status code of a failed call, if it has one."""
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def rpc_details(error: grpc.RpcError) -> str:
    """The server's message of a failed call (at most 500 characters)."""
    call = cast(Any, error)
    details = call.details() if hasattr(call, "details") else None
    return str(details or "")[:500]


def describe_rpc_error(error: grpc.RpcError) -> str:
    """'CODE: details' of a failed call, short enough for a log line or a proposal detail."""
    code = rpc_code(error)
    return f"{code.name if code is not None else 'UNKNOWN'}: {rpc_details(error)[:300]}"


class HsaConnections:
    """Channels to HSAs by address and host id, and the `HsaAdmin` calls with deadlines."""

    def __init__(self, tls: TlsMaterial, timeout: float, limits: Limits = DEFAULT_LIMITS) -> None:
        self._tls = tls
        self._timeout = timeout
        self._limits = limits
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}
        self._closed = False

    def _stub(self, address: str, host_id: str) -> Any:
        """A stub on the channel to `address` that accepts only the HSA `host_id`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the HSA connections are closed")
            channel = self._channels.get((address, host_id))
            if channel is None:
                channel = mtls_channel(address, self._tls, hsa_host(host_id), self._limits)
                self._channels[(address, host_id)] = channel
        return services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]

    def get_status(self, address: str, *, host_id: str) -> services_pb2.HsaStatus:
        """The HSA's own report of its version, health and membership."""
        timeout = min(STATUS_TIMEOUT_SECONDS, self._timeout)
        status: services_pb2.HsaStatus = self._stub(address, host_id).GetStatus(
            services_pb2.HsaStatusRequest(), timeout=timeout
        )
        return status

    def apply_proposal(
        self,
        address: str,
        proposal: bytes,
        approvals: Sequence[domain_pb2.Approval],
        *,
        host_id: str,
    ) -> domain_pb2.SealedState:
        """Ask the HSA to compute, seal and sign the next state (it does not install it)."""
        request = services_pb2.ApplyProposalRequest(proposal=proposal, approvals=list(approvals))
        state: domain_pb2.SealedState = self._stub(address, host_id).ApplyProposal(
            request, timeout=self._timeout
        )
        return state

    def rotate_domain_key(self, address: str, *, host_id: str) -> domain_pb2.SealedState:
        """Ask the HSA for a scheduled domain key rotation (it refuses one not yet due)."""
        state: domain_pb2.SealedState = self._stub(address, host_id).RotateDomainKey(
            services_pb2.ScheduledRotationRequest(), timeout=self._timeout
        )
        return state

    def install_state(
        self, address: str, state: domain_pb2.SealedState, *, host_id: str
    ) -> services_pb2.InstallStateResponse:
        """Push a stored state to the HSA, which verifies it before installing."""
        response: services_pb2.InstallStateResponse = self._stub(address, host_id).InstallState(
            services_pb2.InstallStateRequest(state=state), timeout=self._timeout
        )
        return response

    def get_states_after(
        self, address: str, after_version: int, *, host_id: str
    ) -> list[domain_pb2.SealedState]:
        """One page of the HSA's verified states after a version (verify each before use)."""
        response: services_pb2.StatesResponse = self._stub(address, host_id).GetStatesAfter(
            services_pb2.StatesAfterRequest(
                after_version=after_version, limit=self._limits.max_states_per_response
            ),
            timeout=self._timeout,
        )
        return list(response.states)

    def forget(self, address: str) -> None:
        """Close the channels to an address no HSA uses any more."""
        with self._lock:
            stale = [key for key in self._channels if key[0] == address]
            channels = [self._channels.pop(key) for key in stale]
        for channel in channels:
            channel.close()

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()
