"""Raw streaming stubs for the benchmarks: one `grpc.aio` session stream that many asyncio
callers share, each call matched to its answer by request id (`AioSession`), and the same for
Diagnostics.EchoSession, the floor of sessions (`AioEchoSession`, matched by a number in the
first 8 bytes of the payload).

No retry layer, no fail-over: what the servers give, as `bench._load` measures unary stubs.
A call whose answer carries an error raises `SessionCallError` (counted as a failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["AioEchoSession", "AioSession", "SessionCallError"]


class SessionCallError(Exception):
    """A session call answered with an error status."""


class _Matcher:
    """Futures by id, resolved by the one task that reads the stream."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)

    def expect(self) -> tuple[int, asyncio.Future[Any]]:
        number = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[number] = future
        return number, future

    def resolve(self, number: int, value: Any) -> None:
        future = self.waiting.pop(number, None)
        if future is not None and not future.done():
            future.set_result(value)

    def fail_all(self, error: BaseException) -> None:
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(error)
        self.waiting.clear()


class AioSession:
    """`KeyService.Session` on one aio channel: `await session.call("encrypt", request)`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._call: Any = None
        self._matcher = _Matcher()
        self._reader: asyncio.Task[None] | None = None
        self._write = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[AioSession]:
        """The open session (closed, and its reader stopped, at the end)."""
        self._call = self._stub.Session()
        self._reader = asyncio.create_task(self._read())
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            self._call.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._matcher.resolve(response.request_id, response)
            self._matcher.fail_all(SessionCallError("the session ended"))
        except BaseException as error:
            self._matcher.fail_all(SessionCallError(f"the session failed: {error}"))
            raise

    async def call(self, field: str, request: Any, timeout: float) -> Any:
        """One call of the session; its result message (SessionCallError for an error)."""
        number, future = self._matcher.expect()
        message = services_pb2.SessionRequest(
            request_id=number, timeout_ms=int(timeout * 1000), **{field: request}
        )
        async with self._write:  # one write at a time on a stream
            await self._call.write(message)
        response = await asyncio.wait_for(future, timeout)
        if response.code:
            raise SessionCallError(f"status {response.code}: {response.message[:200]}")
        return getattr(response, field)


class AioEchoSession:
    """`Diagnostics.EchoSession` on one aio channel, matched by the payload's first 8 bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
        self._call: Any = None
        self._matcher = _Matcher()
        self._reader: asyncio.Task[None] | None = None
        self._write = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[AioEchoSession]:
        """The open stream (closed at the end)."""
        self._call = self._stub.EchoSession()
        self._reader = asyncio.create_task(self._read())
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            self._call.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._matcher.resolve(int.from_bytes(response.payload[:8], "big"), response)
            self._matcher.fail_all(SessionCallError("the echo session ended"))
        except BaseException as error:
            self._matcher.fail_all(SessionCallError(f"the echo session failed: {error}"))
            raise

    async def echo(self, payload: bytes, timeout: float) -> Any:
        """Send `payload` (its first 8 bytes replaced by the message's number); the echo."""
        number, future = self._matcher.expect()
        message = services_pb2.EchoMessage(payload=number.to_bytes(8, "big") + payload[8:])
        async with self._write:
            await self._call.write(message)
        return await asyncio.wait_for(future, timeout)
