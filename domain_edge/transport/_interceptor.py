"""The one place where a servicer's errors become gRPC statuses (`ErrorMappingInterceptor`),
and where every call is counted, with its status and latency, in the process's metrics
(`domain_edge.metrics`; a non-blocking response stream is not counted: it has no end here).

Invariants: an `HsmDomainError` is answered with its own status (`domain_edge.status`) and
message, marked "nothing applied" in the trailing metadata when its class says so; anything
else is INTERNAL with a generic message (the details go to the log, never to the peer); a
request that does not parse, or is over its method's byte limit, is refused as
INVALID_ARGUMENT before the servicer sees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc
from grpc_health.v1 import health

from domain_core.errors import HsmDomainError
from domain_core.limits import HEALTH_REQUEST_BYTES
from domain_edge.metrics import PROCESS
from domain_edge.status import grpc_status_for
from domain_edge.throttled_log import ThrottledLog
from domain_edge.transport._channels import error_metadata

log = logging.getLogger(__name__)

# The default byte limits of requests the interceptor refuses unparsed: health checks, which
# anyone may send.
HEALTH_REQUEST_LIMITS: Final[Mapping[str, int]] = {
    f"/{health.SERVICE_NAME}/Check": HEALTH_REQUEST_BYTES,
    f"/{health.SERVICE_NAME}/Watch": HEALTH_REQUEST_BYTES,
}


def _abort_for(error: Exception, context: grpc.ServicerContext, method: str) -> None:
    """Abort the call with the status `error` maps to; re-raise an abort already under way."""
    if isinstance(error, HsmDomainError):
        marks = error_metadata(error)
        if marks:
            context.set_trailing_metadata(marks)
        context.abort(grpc_status_for(error), error.message)
    if cast(Any, context).code() is not None:
        # The servicer aborted with its own status (context.abort raises a bare Exception).
        raise error
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; the server logged the details")


@dataclass(frozen=True)
class _Unparsed:
    """A request body that does not parse as the method's request message."""

    type_name: str


@dataclass(frozen=True)
class _Oversized:
    """A request body larger than its method takes (`ErrorMappingInterceptor`'s byte limits)."""

    size: int
    limit: int


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, max_bytes: int | None = None
) -> Callable[[bytes], Any] | None:
    """`deserializer`, but bytes that do not parse give an `_Unparsed` instead of raising,
    and bytes over `max_bytes` an `_Oversized` without being parsed.

    gRPC answers INTERNAL ("Exception deserializing request!") when a deserializer raises;
    a request that does not parse is bad input, INVALID_ARGUMENT.
    """
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", "the request message"))

    def parse(raw: bytes) -> Any:
        if max_bytes is not None and len(raw) > max_bytes:
            return _Oversized(len(raw), max_bytes)
        try:
            return deserializer(raw)
        except Exception:
            return _Unparsed(type_name)

    return parse


# One warning a minute per method, whatever the callers send.
_unparsed_log = ThrottledLog(log)


def _refuse_unparsed(request: Any, context: grpc.ServicerContext, method: str) -> None:
    """Refuse a request that did not parse or is over its method's byte limit:
    INVALID_ARGUMENT, logged once a minute per method."""
    if isinstance(request, _Oversized):
        message = f"the request is {request.size} bytes; {method} takes at most {request.limit}"
    elif isinstance(request, _Unparsed):
        message = f"the request does not parse as {request.type_name}"
    else:
        return
    _unparsed_log.warning(f"refused a call to {method}: {message}", key=method)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _observe(method: str, context: grpc.ServicerContext, began: float) -> None:
    """Count a finished call with the status it ended with (`metrics.PROCESS.rpc`)."""
    code = cast(Any, context).code()
    PROCESS.rpc.observe(
        method, code.name if code is not None else "OK", time.perf_counter() - began
    )


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        began = time.perf_counter()
        try:
            _refuse_unparsed(request, context, method)
            try:
                return behavior(request, context)
            except Exception as error:
                _abort_for(error, context, method)
                raise  # unreachable: abort raises
        finally:
            _observe(method, context, began)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        began = time.perf_counter()
        try:
            _refuse_unparsed(request, context, method)
            try:
                yield from behavior(request, context)
            except Exception as error:
                _abort_for(error, context, method)
                raise
        finally:
            _observe(method, context, began)

    return wrapper


def _wrap_non_blocking(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """The wrapper of a non-blocking response stream (gRPC's `experimental_non_blocking`:
    the handler returns at once and answers through `send_response_callback`), still
    non-blocking: wrapping it as a generator would make every such stream hold a worker."""

    def wrapper(
        request: Any,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        _refuse_unparsed(request, context, method)
        try:
            behavior(request, context, send_response_callback=send_response_callback)
        except Exception as error:
            _abort_for(error, context, method)
            raise

    _mark_non_blocking(wrapper, getattr(behavior, "experimental_thread_pool", None))
    return wrapper


def _checked(requests: Iterator[Any], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
    """A stream's requests, each refused as a unary request would be if it did not parse or is
    over the byte limit: the stream ends with INVALID_ARGUMENT (whichever thread reads it)."""
    for request in requests:
        _refuse_unparsed(request, context, method)
        yield request


def _wrap_bidi(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    def wrapper(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        began = time.perf_counter()
        try:
            yield from behavior(_checked(requests, context, method), context)
        except Exception as error:
            if not context.is_active():
                raise  # the client left (its request iterator raised): nobody to answer
            _abort_for(error, context, method)
            raise
        finally:
            _observe(method, context, began)

    return wrapper


def _wrap_non_blocking_bidi(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """The wrapper of a non-blocking bidirectional stream (it returns at once, reads its
    requests on a thread of its own and answers through `send_response_callback`, None last):
    its requests checked as `_wrap_bidi` checks them, its end counted in the metrics."""

    def wrapper(
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        if send_response_callback is None:
            raise RuntimeError("gRPC did not serve a non-blocking stream as one")
        began = time.perf_counter()
        send = send_response_callback

        def observed(response: Any) -> None:
            if response is None:
                _observe(method, context, began)
            send(response)

        try:
            behavior(_checked(requests, context, method), context, send_response_callback=observed)
        except Exception as error:
            _abort_for(error, context, method)
            raise

    _mark_non_blocking(wrapper, getattr(behavior, "experimental_thread_pool", None))
    return wrapper


def _mark_non_blocking(
    behavior: Callable[..., Any], pool: futures.ThreadPoolExecutor | None = None
) -> None:
    """Tell gRPC that `behavior` answers through `send_response_callback` and returns at once."""
    marked = cast(Any, behavior)
    marked.experimental_non_blocking = True
    marked.experimental_thread_pool = pool


def _is_non_blocking(behavior: Callable[..., Any] | None) -> bool:
    return bool(getattr(behavior, "experimental_non_blocking", False))


_MAX_WRAPPED_METHODS: Final = 1024


class ErrorMappingInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps every error from a servicer to exactly one gRPC status, in one place.

    gRPC asks the interceptor for every call; the wrapped handler of a method is built once
    and kept with the handler it wraps (reused only while the server hands out that very
    handler object), since building it costs more than the rest of a small call's Python.
    `request_byte_limits` caps the request of the methods it names (full method name to
    bytes), refused before parsing; a non-blocking stream handler stays non-blocking.
    """

    def __init__(self, request_byte_limits: Mapping[str, int] | None = None) -> None:
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        self._byte_limits = dict(
            HEALTH_REQUEST_LIMITS if request_byte_limits is None else request_byte_limits
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < _MAX_WRAPPED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserializer = _tolerant(handler.request_deserializer, self._byte_limits.get(method))
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                _wrap_non_blocking(behavior, method)
                if _is_non_blocking(behavior)
                else _wrap_stream(behavior, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            behavior = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                _wrap_non_blocking_bidi(behavior, method)
                if _is_non_blocking(behavior)
                else _wrap_bidi(behavior, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
