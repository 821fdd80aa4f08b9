"""The frame of every KeyService call: who calls, whether this HSA serves keys, one audit record.

`CallFrame.run` wraps the body of each KeyService method (`hsa_node.keyservice`): it takes the
caller's SPIFFE URI from its client certificate, refuses while this HSA does not serve keys
(not a member, domain keys not unsealed, or its peering not ready), runs the body with a
`KeyCall` the body fills in as it learns the key and context, and appends the audit record.

Invariants:
- every call is from a `client` identity of this domain, else PERMISSION_DENIED, checked
  before anything else; then it takes a token of its caller's quota for its class
  (`hsa_node.quotas`), else RESOURCE_EXHAUSTED with a retry delay, nothing done;
- no key call is served while the node is not serving, or before the HSA took the key
  metadata floors of a peer (`PeerGate.require_ready`): UNAVAILABLE with the reason;
- every call appends exactly one audit record (principal, operation, key id, encryption
  context, result: "ok" or the status name, and the error's class and message) before it
  answers; a call whose success cannot be audited fails; a failure that cannot be audited
  is logged and the call's own error propagates. An unexpected error is audited by its class
  name only. The record never holds a plaintext or key: a body puts only names, ids, counts
  and versions in `KeyCall.detail`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc

from domain_core.errors import HsmDomainError, PermissionDeniedError, UnavailableError, status_for
from domain_edge import transport
from hsa_node.node import DomainNode
from hsa_node.quotas import Quotas

__all__ = ["AuditSink", "CallFrame", "KeyCall", "PeerGate", "StreamCaller"]

# The key service's lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.keyservice")

T = TypeVar("T")


class PeerGate(Protocol):
    """What the key service asks of the HSA's peering (`hsa_node.peering`) before it serves."""

    def require_ready(self) -> None:
        """UnavailableError while this HSA has not taken a peer's key metadata floors."""

    def require_head_confirmed(self, operation: str) -> None:
        """UnavailableError when no peer confirmed this HSA's head within the bound."""


class AuditSink(Protocol):
    """Where audit records go (`domain_edge.audit.AuditLog`)."""

    def append(
        self,
        *,
        principal: str,
        operation: str,
        key_id: str = "",
        encryption_context: Mapping[str, str] | None = None,
        result: str = "ok",
        detail: str = "",
    ) -> int: ...


@dataclass
class KeyCall:
    """What one call's audit record says; filled in as the call learns it."""

    operation: str
    principal: str = ""
    key_id: str = ""
    context: dict[str, str] = field(default_factory=dict)
    detail: str = ""
    grant_tokens: tuple[bytes, ...] = ()
    """The request's grant tokens (checked for count and size), for the key's authorization."""


class StreamCaller:
    """The context of the calls a key-service session carries: the stream's gRPC context
    (every attribute is the context's), with its caller's principal as checked once when the
    stream opened. One stream is one TLS connection's, whose client certificate cannot change
    for its life, so the check holds for every call on it; the frame takes it from here
    instead of reading the certificate again per call."""

    def __init__(self, context: grpc.ServicerContext, principal: str) -> None:
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class CallFrame:
    """Authenticates, gates and audits each KeyService call (see the module invariants)."""

    def __init__(
        self,
        *,
        node: DomainNode,
        audit: AuditSink | None,
        peers: PeerGate | None,
        quotas: Quotas,
    ) -> None:
        """`audit` None: no records (benchmarks); `peers` None: no peering gate (outside an
        HSA process); `quotas`: this process's request-rate buckets."""
        self._node = node
        self._domain_id = node.domain_id
        self._audit = audit
        self._peers = peers
        self._quotas = quotas

    def principal(self, context: grpc.ServicerContext | StreamCaller) -> str:
        """The caller's SPIFFE URI, if it is a client of this domain (for a session's call,
        as the session checked it when its stream opened: `StreamCaller`)."""
        if isinstance(context, StreamCaller):
            return context.principal
        spiffe = transport.require_caller_spiffe(context, "client")
        if spiffe.domain != self._domain_id:
            raise PermissionDeniedError(
                f"{spiffe.uri} belongs to another trust domain than {self._domain_id}"
            )
        return spiffe.uri

    def run(self, operation: str, context: grpc.ServicerContext, body: Callable[[KeyCall], T]) -> T:
        """Authenticate, run `body`, audit the outcome; errors propagate (mapped by the
        transport's interceptor)."""
        call = KeyCall(operation)
        try:
            call.principal = self.principal(context)
            self._quotas.admit(call.principal, operation)
            if not self._node.serving:
                raise UnavailableError(
                    f"{self._node.host_id} is not serving keys (not a member of the domain, or "
                    "its domain keys are not unsealed): use another HSA"
                )
            if self._peers is not None:
                self._peers.require_ready()
            response = body(call)
        except Exception as error:
            self._record_failure(call, context, error)
            raise
        self._record(call, "ok", call.detail)
        return response

    def require_head_confirmed(self, operation: str) -> None:
        """Key administration only on a head a peer confirmed recently (docs/runtime.md)."""
        if self._peers is not None:
            self._peers.require_head_confirmed(operation)

    def _record(self, call: KeyCall, result: str, detail: str) -> None:
        if self._audit is not None:
            self._audit.append(
                principal=call.principal,
                operation=call.operation,
                key_id=call.key_id,
                encryption_context=call.context,
                result=result,
                detail=detail,
            )

    def _record_failure(
        self, call: KeyCall, context: grpc.ServicerContext, error: Exception
    ) -> None:
        if not call.principal:
            try:
                call.principal = transport.caller_spiffe(context).uri
            except HsmDomainError:
                call.principal = "unauthenticated"
        if isinstance(error, HsmDomainError):
            detail = f"{type(error).__name__}: {error.message}"
        else:
            detail = f"internal error ({type(error).__name__})"
        try:
            self._record(call, status_for(error).name, detail)
        except HsmDomainError as audit_error:
            log.error("could not audit a failed %s: %s", call.operation, audit_error)
