"""One key-service session of the asyncio client (`AsyncKeyClient`): a `KeyService.Session`
stream on one endpoint's `grpc.aio` channel that every task of the client shares, each call
matched to its answer by request id.

As in the threaded client's sessions (`_session`): a call's failure is raised as the
`grpc.RpcError` its unary call would have raised (`SessionCallError`), so the retry and
fail-over rules apply unchanged; a stream that ends fails every call still waiting with its
status (UNAVAILABLE when it simply ended). Calls queued by several tasks while a message is
being written travel together in the next one (at most 64 per message).

Invariants: at most one stream per session object at a time, opened on first use and again
after it ended; a call never waits past its own timeout (its answer, if one comes later, is
dropped); `close` cancels the stream and fails whatever still waits. A session belongs to the
event loop that first used it, as its channel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import grpc

from domain_edge.kms_client._session import (
    _MAX_CALLS_PER_MESSAGE,
    SessionCallError,
    StreamBrokenError,
    no_answer,
    session_ended,
    session_request,
    session_result,
)
from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["AsyncKeySession"]

# The details of a stream that failed in the client's own gRPC core (`_broken_by_core`).
_CORE_FAILURE = "Internal error from Core"


class _AioStream:
    """One open Session stream: the calls waiting (futures by id), those not yet written,
    and the writer and reader tasks."""

    def __init__(self, stub: Any) -> None:
        self.call = stub.Session()
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.pending: list[services_pb2.SessionRequest] = []
        self.ready = asyncio.Event()
        self.ended: grpc.RpcError | None = None
        self.tasks = (
            asyncio.create_task(self._write(), name="key-session-writer"),
            asyncio.create_task(self._read(), name="key-session-reader"),
        )

    async def _write(self) -> None:
        """Every call queued by the time a message goes out travels in it."""
        while self.ended is None:
            await self.ready.wait()
            self.ready.clear()
            while self.pending and self.ended is None:
                calls = self.pending[:_MAX_CALLS_PER_MESSAGE]
                del self.pending[:_MAX_CALLS_PER_MESSAGE]
                try:
                    await self.call.write(services_pb2.SessionRequests(calls=calls))
                except (grpc.RpcError, asyncio.InvalidStateError):
                    return  # the stream ended: the reader fails every waiting call

    async def _read(self) -> None:
        error: grpc.RpcError = session_ended()
        try:
            async for message in self.call:
                for response in message.answers:
                    future = self.waiting.pop(response.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(response)
        except grpc.RpcError as failure:
            # gRPC's core fails a stream whose write met a call the server had already ended
            # (e.g. UNIMPLEMENTED from an HSA without sessions) with INTERNAL "Internal error
            # from Core" instead of the server's status: that is this stream breaking, not the
            # server's answer, so the calls are sent again unary (`StreamBrokenError`).
            error = StreamBrokenError() if _broken_by_core(failure) else failure
        finally:  # (a cancelled reader ends the stream too, and stays cancelled)
            self.end(error)

    def end(self, error: grpc.RpcError) -> None:
        """Mark the stream ended and fail every call still waiting with `error`."""
        if self.ended is None:
            self.ended = error
        self.ready.set()  # let the writer see the end
        left, self.waiting = self.waiting, {}
        for future in left.values():
            if not future.done():
                future.set_exception(self.ended)

    async def close(self) -> None:
        self.call.cancel()
        self.end(SessionCallError(grpc.StatusCode.CANCELLED, "the key client was closed"))
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task


def _broken_by_core(error: grpc.RpcError) -> bool:
    """Whether a stream failed in the client's gRPC core rather than by the server's status."""
    call: Any = error
    try:
        return bool(
            call.code() is grpc.StatusCode.INTERNAL
            and str(call.details()).startswith(_CORE_FAILURE)
        )
    except Exception:
        return False


def _expire(future: asyncio.Future[Any], method: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(no_answer(method, timeout))


class AsyncKeySession:
    """The session of one endpoint: `await call("Encrypt", request, timeout)` returns the
    EncryptResponse or raises the RpcError the unary Encrypt would have raised."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._ids = itertools.count(1)
        self._stream: _AioStream | None = None
        self._closed = False

    def _open(self) -> _AioStream:
        if self._closed:
            raise ValueError("the session is closed")
        stream = self._stream
        if stream is None or stream.ended is not None:
            stream = self._stream = _AioStream(self._stub)
        return stream

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        """One call over the session (opened on first use, and again after it ended)."""
        stream = self._open()
        number = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        stream.waiting[number] = future
        stream.pending.append(session_request(number, method, request, timeout))
        stream.ready.set()
        # The call's own deadline: one timer that fails the future (cheaper per call than an
        # `asyncio.timeout` scope, which this path would pay on every call).
        expiry = loop.call_later(timeout, _expire, future, method, timeout)
        try:
            answer = await future
        finally:
            expiry.cancel()
            stream.waiting.pop(number, None)  # answered, timed out or cancelled: not waiting
        return session_result(method, answer)

    async def close(self) -> None:
        """End the stream; calls still waiting fail."""
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
