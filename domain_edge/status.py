"""The one table from the core's error statuses to gRPC status codes.

The core (`domain_core.errors`) gives every error class one `Status`, named as gRPC names its
codes, and imports no grpc. Servers answer an error with `grpc_status_for(error)` (the
transport's interceptor does, in one place); nothing else turns an error into a gRPC code.

Invariants: every `Status` member has exactly one entry, the `grpc.StatusCode` of the same
name (a test checks both); anything that is not an `HsmDomainError` is INTERNAL.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import grpc

from domain_core.errors import Status, status_for

__all__ = ["GRPC_STATUS", "grpc_status_for"]

GRPC_STATUS: Final[Mapping[Status, grpc.StatusCode]] = MappingProxyType(
    {
        Status.INTERNAL: grpc.StatusCode.INTERNAL,
        Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
        Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        Status.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        Status.ABORTED: grpc.StatusCode.ABORTED,
        Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
        Status.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    }
)


def grpc_status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server answers `error` with; anything not ours is INTERNAL."""
    return GRPC_STATUS[status_for(error)]
