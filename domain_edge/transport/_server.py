"""Servers: construction with the quota, the error mapping and the limits; health; reflection.

Invariants: every server is made by `make_server` (stream quota outermost, then the error
mapping, message limits, no port sharing); health answers only for the fixed names it was
built with (`HealthService`): an unknown name is NOT_FOUND in Check and Watch, a health
request over `HEALTH_REQUEST_BYTES` is refused before it is parsed, and nothing a caller sends
is kept after its call ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from domain_core.errors import NotFoundError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge.transport._interceptor import (
    ErrorMappingInterceptor,
    _mark_non_blocking,
)
from domain_edge.transport._streams import DEFAULT_STREAM_LIMITS, StreamLimits, StreamQuota

_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_SHOWN_NAME_CHARS: Final = 64


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The standard health service (grpc.health.v1) for a fixed set of names.

    Unlike grpcio's reference servicer, which keeps every name a Watch ever asked for (a
    flood of calls with large invented names grows the process without bound), this one
    knows exactly "" (the whole server) and the names it was built with, each NOT_SERVING
    until `set`: any other name is NOT_FOUND, in Watch as in Check (the names never change
    while the server runs, so a watcher of an unknown name would wait forever). Watch is
    non-blocking: a watcher holds no thread, only its entry in the table of its name, removed
    when its call ends.
    """

    def __init__(self, service_names: Iterable[str]) -> None:
        self._status: dict[str, int] = {name: _NOT_SERVING for name in ["", *service_names]}
        self._watchers: dict[str, set[Callable[[Any], None]]] = {
            name: set() for name in self._status
        }
        self._lock = threading.Lock()  # the tables
        self._notify = threading.Lock()  # one status change at a time reaches the watchers
        self._shutting_down = False

    @property
    def names(self) -> tuple[str, ...]:
        """The names this service reports on ("" is the whole server)."""
        return tuple(self._status)

    def watchers(self) -> int:
        """Watch calls open now."""
        with self._lock:
            return sum(len(callbacks) for callbacks in self._watchers.values())

    def _known(self, request: health_pb2.HealthCheckRequest) -> str:
        name = str(request.service)
        if name not in self._status:
            shown = name[:_SHOWN_NAME_CHARS] + ("..." if len(name) > _SHOWN_NAME_CHARS else "")
            raise NotFoundError(
                f"no health status for service {shown!r}; this server reports on "
                + ", ".join(repr(n) for n in self._status)
            )
        return name

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        """The status of a known name; NOT_FOUND for any other."""
        name = self._known(request)
        with self._lock:
            return health_pb2.HealthCheckResponse(status=self._status[name])

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        """Send the status of a known name now and at every change (NOT_FOUND for others)."""
        if send_response_callback is None:
            raise RuntimeError("HealthService.Watch must be served non-blocking")
        name = self._known(request)
        send = send_response_callback
        with self._notify:
            with self._lock:
                status = self._status[name]
                self._watchers[name].add(send)
            send(health_pb2.HealthCheckResponse(status=status))

        def forget() -> None:
            with self._lock:
                self._watchers[name].discard(send)

        if not context.add_callback(forget):
            forget()

    _mark_non_blocking(Watch)

    def set(self, service: str, status: int) -> None:
        """Set the status of a known name and tell its watchers (ignored once shutting down)."""
        if service not in self._status:
            raise ValueError(f"{service!r} is not a name this health service reports on")
        with self._notify:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                watchers = list(self._watchers[service])
            response = health_pb2.HealthCheckResponse(status=status)
            for send in watchers:
                send(response)

    def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING, for good (the server is stopping)."""
        for name in self._status:
            self.set(name, _NOT_SERVING)
        with self._lock:
            self._shutting_down = True


# --- servers -----------------------------------------------------------------------------------


def make_server(
    *,
    limits: Limits = DEFAULT_LIMITS,
    max_workers: int = 16,
    max_concurrent_rpcs: int = 256,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    streams: StreamLimits = DEFAULT_STREAM_LIMITS,
) -> grpc.Server:
    """A gRPC server with the stream quota, the error-mapping interceptor and the limits.

    Open streams count against `max_concurrent_rpcs`, so their cap (`streams.total`) must
    leave room beside them for calls.
    """
    if streams.total >= max_concurrent_rpcs:
        raise ValueError("streams.total must be below max_concurrent_rpcs")
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[StreamQuota(streams), ErrorMappingInterceptor(), *interceptors],
        # No port sharing: a second process must not silently bind a port that is in use.
        options=[*limits.grpc_options(), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )


def add_health_and_reflection(
    server: grpc.Server, service_names: Iterable[str], *, with_reflection: bool = True
) -> HealthService:
    """Register health checking for `service_names` and, unless told not to, reflection;
    returns the health service. A port anyone may reach without a certificate gets no
    reflection (`with_reflection=False`)."""
    names = list(service_names)
    health_service = HealthService(names)
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if with_reflection:
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    return health_service


def set_serving(health_service: HealthService, names: Iterable[str], serving: bool) -> None:
    """Mark the overall server ("") and the named services SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else _NOT_SERVING
    for name in ["", *names]:
        health_service.set(name, status)
