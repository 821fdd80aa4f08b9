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
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["AioEchoSession", "AioSession", "SessionCallError"]

# Calls one message carries at most, as `KeyClient`'s sessions send them.
_MAX_BATCH = 64


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


class _AioStream:
    """One aio stream-stream call shared by many tasks: whatever they queued while a message
    was on its way goes out together in the next one (as `KeyClient`'s sessions batch), and
    each answer in a response message resolves its caller's future."""

    def __init__(
        self,
        open_call: Callable[[], Any],
        pack: Callable[[list[Any]], Any],
        unpack: Callable[[Any], Iterable[tuple[int, Any]]],
    ) -> None:
        self._open_call = open_call
        self._pack = pack
        self._unpack = unpack
        self._call: Any = None
        self._matcher = _Matcher()
        self._pending: list[Any] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The open stream (its writer and reader stopped, the call cancelled, at the end)."""
        self._call = self._open_call()
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]
        try:
            yield
        finally:
            self._call.cancel()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _write(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._pending:
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                await self._call.write(self._pack(batch))

    async def _read(self) -> None:
        try:
            async for message in self._call:
                for number, answer in self._unpack(message):
                    self._matcher.resolve(number, answer)
            self._matcher.fail_all(SessionCallError("the session ended"))
        except BaseException as error:
            self._matcher.fail_all(SessionCallError(f"the session failed: {error}"))
            raise

    async def send(self, make: Callable[[int], Any], timeout: float) -> Any:
        """Queue the message `make(number)` and wait for the answer numbered so."""
        number, future = self._matcher.expect()
        self._pending.append(make(number))
        self._ready.set()
        return await asyncio.wait_for(future, timeout)


class AioSession:
    """`KeyService.Session` on one aio channel: `await session.call("encrypt", request)`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._stream = _AioStream(
            stub.Session,
            lambda calls: services_pb2.SessionRequests(calls=calls),
            lambda message: ((a.request_id, a) for a in message.answers),
        )

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[AioSession]:
        """The open session (closed, and its tasks stopped, at the end)."""
        async with self._stream.opened():
            yield self

    async def call(self, field: str, request: Any, timeout: float) -> Any:
        """One call of the session; its result message (SessionCallError for an error)."""
        timeout_ms = int(timeout * 1000)

        def make(number: int) -> Any:
            return services_pb2.SessionRequest(
                request_id=number, timeout_ms=timeout_ms, **{field: request}
            )

        response = await self._stream.send(make, timeout)
        if response.code:
            raise SessionCallError(f"status {response.code}: {response.message[:200]}")
        return getattr(response, field)


class AioEchoSession:
    """`Diagnostics.EchoSession` on one aio channel, matched by the payload's first 8 bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
        self._stream = _AioStream(
            stub.EchoSession,
            lambda messages: services_pb2.EchoMessages(messages=messages),
            lambda batch: ((int.from_bytes(m.payload[:8], "big"), m) for m in batch.messages),
        )

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[AioEchoSession]:
        """The open stream (closed at the end)."""
        async with self._stream.opened():
            yield self

    async def echo(self, payload: bytes, timeout: float) -> Any:
        """Send `payload` (its first 8 bytes replaced by the message's number); the echo."""
        rest = payload[8:]
        return await self._stream.send(
            lambda number: services_pb2.EchoMessage(payload=number.to_bytes(8, "big") + rest),
            timeout,
        )
