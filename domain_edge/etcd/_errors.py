"""What a failed etcd call means: sent or not, worth another member, or final; and which
`domain_core.errors` class the caller gets.

Invariants:
- a call counts as never sent only when gRPC found no connection ("failed to connect to all
  addresses", `transport.never_sent`): only then is any call, a write included, sent again;
- UNAVAILABLE and DEADLINE_EXCEEDED (a member down, paused, cut off, an election under way)
  mean "try another member", but the request may have been applied: a write is sent again only
  when its caller said that is safe;
- etcd's refusals that no other member would answer differently (a request too large, too
  many operations, a full database, authentication) are final and say what to change;
- messages name the endpoints tried and what failed at each, and what to do; nothing here
  sees a value, so nothing secret can reach a message.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, cast

import grpc

from domain_core.errors import (
    ConflictError,
    HsmDomainError,
    LimitExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from domain_edge.transport import never_sent


class Failure(enum.Enum):
    """What one failed attempt means."""

    NOT_SENT = "not sent"  # no connection: nothing reached a member
    UNKNOWN = "unknown"  # no answer: it may have been applied; another member may answer
    FINAL = "final"  # an answer no member would give differently


_TRY_ANOTHER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What etcd says, with status UNKNOWN, when a request ran out of time inside the cluster.
_TIMED_OUT = ("context deadline exceeded", "request timed out", "leader changed")


def status_of(error: BaseException) -> tuple[grpc.StatusCode | None, str]:
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else str(error)
    return (code if isinstance(code, grpc.StatusCode) else None), str(details or "")


def classify(error: BaseException) -> Failure:
    """Whether a failed attempt may be sent again, and to whom (see the module invariants)."""
    if isinstance(error, TimeoutError):
        return Failure.UNKNOWN
    code, details = status_of(error)
    if never_sent(code, details):
        return Failure.NOT_SENT
    if code in _TRY_ANOTHER:
        return Failure.UNKNOWN
    if code is grpc.StatusCode.CANCELLED and "Channel closed" in details:
        return Failure.UNKNOWN
    if code is grpc.StatusCode.UNKNOWN and any(words in details for words in _TIMED_OUT):
        # etcd's own deadline (a member that lost its leader, an election under way): the
        # outcome is unknown, another member may answer; never a final refusal.
        return Failure.UNKNOWN
    return Failure.FINAL


def short(error: BaseException) -> str:
    """One line about a failed attempt, for a message (gRPC's details, cut)."""
    if isinstance(error, TimeoutError):
        return "no answer in time"
    code, details = status_of(error)
    if "Connection refused" in details:
        return "connection refused"
    name = code.name if code is not None else type(error).__name__
    return f"{name}: {details[:160]}"


def final_error(error: BaseException) -> HsmDomainError | Exception:
    """The error a final refusal becomes (a RuntimeError for a request we built wrong)."""
    code, details = status_of(error)
    if "request is too large" in details or "grpc: received message larger than max" in details:
        return LimitExceededError(
            "etcd refused a request as too large (its --max-request-bytes): start etcd with a "
            "larger limit (hsm-domain's members take 10 MiB)"
        )
    if "too many operations in txn request" in details:
        return UnavailableError(
            "etcd refused a transaction as having too many operations (its --max-txn-ops): "
            "start etcd with --max-txn-ops 1024 or more (hsm-domain's members take 1024)"
        )
    if "database space exceeded" in details:
        return ResourceExhaustedError(
            "etcd's database is full (its NOSPACE alarm): compact and defragment it, or raise "
            "its --quota-backend-bytes, then disarm the alarm"
        )
    if "compacted" in details:
        return CompactedError(
            "etcd no longer holds the revision this read asked for (compacted): read again"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return UnavailableError(
            "etcd demands authentication, which the coordinator's etcd store does not use: "
            "give it an etcd cluster of its own, without auth, on loopback"
        )
    return RuntimeError(f"etcd refused a request: {short(error)}")


class CompactedError(ConflictError):
    """A read at a past revision that etcd compacted away meanwhile: what was at that revision
    cannot be read any more; read again at a newer one."""


def _tried(attempts: Sequence[tuple[str, BaseException]]) -> str:
    seen: dict[str, str] = {}
    for endpoint, error in attempts:
        seen[endpoint] = short(error)
    return "; ".join(f"{endpoint} ({why})" for endpoint, why in seen.items())


class EtcdUnavailableError(UnavailableError):
    """No etcd member answered in time. `maybe_applied` is False when the call surely changed
    nothing (a read, or a write that never reached a member): the caller, which knows what else
    its request did, may then answer `NotAppliedError`."""

    def __init__(self, message: str, *, maybe_applied: bool) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


def exhausted(
    what: str, attempts: Sequence[tuple[str, BaseException]], *, maybe_applied: bool
) -> EtcdUnavailableError:
    """The error when no member answered `what` (e.g. "a write", "a read")."""
    tried = _tried(attempts) or "no endpoint"
    if not maybe_applied:
        return EtcdUnavailableError(
            f"etcd is unreachable ({what}; tried {tried}): nothing was changed. Start the etcd "
            "members (hsm-domain up) or fix the endpoints of the coordinator's store, then "
            "retry",
            maybe_applied=False,
        )
    return EtcdUnavailableError(
        f"etcd did not answer ({what}; tried {tried}): it may or may not have been applied; "
        "check the etcd members (hsm-domain status), then retry the same request",
        maybe_applied=True,
    )
