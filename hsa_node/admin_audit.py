"""Audit records for the administrative calls of an HSA, added as a server interceptor.

`ApplyProposal`, `RotateDomainKey` and `InstallState` (HsaAdmin, called by the coordinator)
each append one record: the caller's SPIFFE URI, the operation, the result ("ok" or the
status name) and a detail (the proposal id, the sealed or installed version, or the error).
Read-only calls (`GetStatus`, `GetStatesAfter`) are not audited.

Invariants: the interceptor sits inside the error-mapping interceptor, so it sees the domain
error a servicer raised before it becomes a status; a call whose record cannot be written
fails (the audit log refuses), and a failure is recorded before it propagates. Nothing here
reads or records secret material: proposals and states are public.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from domain_core.errors import HsmDomainError, status_for
from domain_edge import transport
from domain_proto import domain_pb2, services_pb2
from hsa_node.keycalls import AuditSink

__all__ = ["AUDITED_ADMIN_METHODS", "AdminAuditInterceptor"]

log = logging.getLogger(__name__)

_ADMIN: Final = services_pb2.DESCRIPTOR.services_by_name["HsaAdmin"].full_name
AUDITED_ADMIN_METHODS: Final = {
    f"/{_ADMIN}/ApplyProposal": "ApplyProposal",
    f"/{_ADMIN}/RotateDomainKey": "RotateDomainKey",
    f"/{_ADMIN}/InstallState": "InstallState",
}


def _state_version(state: domain_pb2.SealedState) -> str:
    try:
        return str(domain_pb2.Manifest.FromString(state.manifest).version)
    except DecodeError:
        return "?"


def _describe_request(operation: str, request: Any) -> str:
    if operation == "ApplyProposal":
        return f"proposal {hashlib.sha256(request.proposal).hexdigest()[:16]}"
    if operation == "InstallState":
        return f"state version {_state_version(request.state)}"
    return "scheduled domain key rotation"


def _describe_response(operation: str, response: Any) -> str:
    if operation == "InstallState":
        return f"at version {response.version}"
    return f"sealed version {_state_version(response)} (not installed)"


class AdminAuditInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Appends one audit record per audited HsaAdmin call (see the module docstring)."""

    def __init__(self, audit: AuditSink) -> None:
        self._audit = audit

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        operation = AUDITED_ADMIN_METHODS.get(handler_call_details.method)
        if handler is None or operation is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(operation, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, operation: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def audited(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                principal = transport.caller_spiffe(context).uri
            except HsmDomainError:
                principal = "unauthenticated"
            detail = _describe_request(operation, request)
            try:
                response = behavior(request, context)
            except Exception as error:
                message = error.message if isinstance(error, HsmDomainError) else "internal error"
                try:
                    self._audit.append(
                        principal=principal,
                        operation=operation,
                        result=status_for(error).name,
                        detail=f"{detail}; {type(error).__name__}: {message}",
                    )
                except HsmDomainError as audit_error:
                    log.error("could not audit a failed %s: %s", operation, audit_error)
                raise
            self._audit.append(
                principal=principal,
                operation=operation,
                detail=f"{detail}; {_describe_response(operation, response)}",
            )
            return response

        return audited
