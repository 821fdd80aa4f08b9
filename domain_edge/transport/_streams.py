"""Server resources: the stream quota (`StreamQuota`, outermost on every server).

Invariants: a stream is admitted only within its peer's and the server's caps
(`StreamLimits`), never holds a worker of the call pool (a non-blocking handler holds no
thread; a generator runs on the quota's own pool, exactly as large as the streams it may
admit, so nothing waits in a queue), and is ended after `StreamLimits.idle_seconds` without
traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc

from domain_core.errors import ResourceExhaustedError
from domain_edge.throttled_log import ThrottledLog
from domain_edge.transport._callers import caller_spiffe
from domain_edge.transport._interceptor import _abort_for, _is_non_blocking, _mark_non_blocking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamLimits:
    """How many streams one server keeps open, and for how long without traffic.

    `per_peer`: streams one peer may keep open (the peer is its certificate's SPIFFE id, or on
    a port without client certificates its IP address); `total`: streams of the whole server;
    `blocking`: streams whose handler is a generator and so needs a thread while open
    (reflection, `WatchStates`), which is also the number of threads the quota keeps for them;
    `idle_seconds`: a stream through which nothing went for that long is ended.
    """

    per_peer: int = 4
    total: int = 32
    blocking: int = 4
    idle_seconds: float = 120.0

    def __post_init__(self) -> None:
        if min(self.per_peer, self.total, self.blocking) < 1 or not self.idle_seconds > 0:
            raise ValueError("stream limits must be positive")
        if self.per_peer > self.total or self.blocking > self.total:
            raise ValueError("per_peer and blocking cannot exceed total")


DEFAULT_STREAM_LIMITS: Final = StreamLimits()


def stream_peer(context: grpc.ServicerContext) -> str:
    """Whom a stream counts against: the SPIFFE id of the caller's certificate, or, on a port
    without client certificates, the caller's IP address (without its port: one host that
    opens many connections is still one peer)."""
    if context.peer_identities() is None:
        address = context.peer()  # "ipv4:127.0.0.1:50000", "ipv6:[::1]:50000"
        return f"address {address.rpartition(':')[0] or address}"
    return caller_spiffe(context).uri


class _Stream:
    """One admitted stream. Every response goes through `send`, so the stream knows when
    traffic last went through it and sends its final status exactly once, whoever ends it."""

    def __init__(
        self,
        context: grpc.ServicerContext,
        send_response: Callable[[Any], None],
        peer: str,
        blocking: bool,
        clock: Callable[[], float],
    ) -> None:
        self.context = context
        self.peer = peer
        self.blocking = blocking
        self._send_response = send_response
        self._clock = clock
        self._lock = threading.Lock()
        self._sending = 0
        self._finished = False
        self.last_active = clock()

    @property
    def finished(self) -> bool:
        """Whether the final status went out (or the stream was abandoned)."""
        return self._finished

    def touch(self) -> None:
        """Traffic went through the stream (a request arrived)."""
        self.last_active = self._clock()

    def send(self, response: Any) -> None:
        """The handler's `send_response_callback`: a response, or None to end the stream."""
        if response is None:
            self.finish()
            return
        with self._lock:
            if self._finished:
                return
            self._sending += 1
        try:
            self._send_response(response)
        finally:
            with self._lock:
                self._sending -= 1
                self.last_active = self._clock()

    def finish(self) -> None:
        """Send the final status (the one the handler's error set, else OK), once."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._send_response(None)

    def abandon(self) -> None:
        """The handler failed before it answered: gRPC sends that status, not this stream."""
        with self._lock:
            self._finished = True

    def end_if_idle(self, now: float, idle_seconds: float) -> bool:
        """End the stream when nothing went through it for `idle_seconds`: with status OK (the
        client may open it again), or, when a response has been stuck that long (the client
        does not read), by cancelling the call."""
        with self._lock:
            if self._finished or now - self.last_active < idle_seconds:
                return False
            stuck = self._sending > 0
            self._finished = not stuck
        if stuck:
            cast(Any, self.context).cancel()
        else:
            self._send_response(None)
        return True


class _TouchingRequests:
    """A stream's request iterator that marks the stream active at every request."""

    def __init__(self, requests: Iterator[Any], stream: _Stream) -> None:
        self._requests = requests
        self._stream = stream

    def __iter__(self) -> _TouchingRequests:
        return self

    def __next__(self) -> Any:
        request = next(self._requests)
        self._stream.touch()
        return request


class StreamQuota(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Admits, runs and ends every stream of one server, so that streams cannot starve it.

    The outermost interceptor of `make_server`. A response-streaming call is admitted only
    while its peer has fewer than `per_peer` streams open, the server fewer than `total`, and,
    for a generator handler, fewer than `blocking` generator streams (RESOURCE_EXHAUSTED at
    once otherwise: nothing waits). Admitted streams never hold a worker of the server's call
    pool: gRPC hands the call to a non-blocking dispatcher, which returns at once; a
    non-blocking handler (health Watch) then holds no thread at all, and a generator runs on
    this quota's own pool of exactly `blocking` threads. A stream through which nothing went
    for `idle_seconds` is ended by a reaper thread (alive only while streams are open).
    Unary calls pass through untouched.
    """

    def __init__(
        self,
        limits: StreamLimits = DEFAULT_STREAM_LIMITS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._open: set[_Stream] = set()
        self._blocking = 0
        self._pool = futures.ThreadPoolExecutor(
            max_workers=limits.blocking, thread_name_prefix="grpc-stream"
        )
        self._reaper: threading.Thread | None = None
        self._refusal_log = ThrottledLog(log)  # one warning a minute per peer

    def open_streams(self, peer: str | None = None) -> int:
        """Streams open now, of one peer or of the whole server."""
        with self._lock:
            return len(self._open) if peer is None else self._per_peer.get(peer, 0)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler  # (no method of ours streams requests only)
        method = handler_call_details.method
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._dispatcher(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._dispatcher(handler.stream_stream, method, touch_requests=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _dispatcher(
        self, behavior: Callable[..., Any], method: str, *, touch_requests: bool = False
    ) -> Callable[..., None]:
        blocking = not _is_non_blocking(behavior)

        def dispatch(
            argument: Any,
            context: grpc.ServicerContext,
            send_response_callback: Callable[[Any], None] | None = None,
        ) -> None:
            if send_response_callback is None:
                raise RuntimeError("gRPC did not serve a non-blocking stream as one")
            try:
                stream = self._admit(context, send_response_callback, blocking)
            except Exception as error:
                _abort_for(error, context, method)
                raise
            if blocking:
                requests = _TouchingRequests(argument, stream) if touch_requests else argument
                self._pool.submit(self._run, behavior, requests, context, stream, method)
                return
            try:
                behavior(argument, context, send_response_callback=stream.send)
            except BaseException:
                stream.abandon()
                self._release(stream)
                raise
            if not context.add_callback(lambda: self._release(stream)):
                self._release(stream)

        _mark_non_blocking(dispatch)
        return dispatch

    def _admit(
        self, context: grpc.ServicerContext, send: Callable[[Any], None], blocking: bool
    ) -> _Stream:
        peer = stream_peer(context)
        limits = self.limits
        with self._lock:
            held = self._per_peer.get(peer, 0)
            if held >= limits.per_peer:
                refusal = (
                    f"{peer} has {held} streams open, the most one caller may keep; "
                    "close one or retry later"
                )
            elif len(self._open) >= limits.total:
                refusal = f"this server has {len(self._open)} streams open already; retry later"
            elif blocking and self._blocking >= limits.blocking:
                refusal = (
                    f"this server serves {self._blocking} streams of this kind already; retry later"
                )
            else:
                stream = _Stream(context, send, peer, blocking, self._clock)
                self._per_peer[peer] = held + 1
                self._open.add(stream)
                self._blocking += blocking
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap, name="grpc-stream-reaper", daemon=True
                    )
                    self._reaper.start()
                return stream
        self._log_refusal(peer, refusal)
        raise ResourceExhaustedError(refusal)

    def _release(self, stream: _Stream) -> None:
        """Forget a stream that ended (idempotent)."""
        with self._lock:
            if stream not in self._open:
                return
            self._open.discard(stream)
            self._blocking -= stream.blocking
            left = self._per_peer[stream.peer] - 1
            if left:
                self._per_peer[stream.peer] = left
            else:
                del self._per_peer[stream.peer]

    def _run(
        self,
        behavior: Callable[..., Any],
        argument: Any,
        context: grpc.ServicerContext,
        stream: _Stream,
        method: str,
    ) -> None:
        """Serve a generator stream on the quota's pool, then send its final status."""
        try:
            responses = behavior(argument, context)
            try:
                for response in responses:
                    stream.send(response)
                    if stream.finished or not context.is_active():
                        break
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
        except Exception:
            # A servicer error was mapped already (the status is set); anything else while
            # the call is still on is a bug: INTERNAL, details in the log only.
            if context.is_active() and cast(Any, context).code() is None:
                log.exception("internal error in %s", method)
                context.set_code(grpc.StatusCode.INTERNAL)
                context.set_details("internal error; the server logged the details")
        finally:
            stream.finish()
            self._release(stream)

    def _reap(self) -> None:
        idle = self.limits.idle_seconds
        interval = min(1.0, idle / 4)
        while True:
            time.sleep(interval)
            with self._lock:
                if not self._open:
                    self._reaper = None
                    return
                streams = list(self._open)
            now = self._clock()
            for stream in streams:
                if stream.end_if_idle(now, idle):
                    log.debug("ended an idle stream of %s", stream.peer)

    def _log_refusal(self, peer: str, refusal: str) -> None:
        self._refusal_log.warning(f"refused a stream: {refusal}", key=peer)
