"""The key clients' sessions (`KeySession` on threads, `AsyncKeySession` on asyncio) against a
scripted `KeyService.Session` server in this process: answers matched by id in any order, an
unknown id ignored, a call's own timeout, a stream that ends (waiting calls fail UNAVAILABLE,
the next call opens a new stream), an error answer as the unary status, and `close`.

The server is a test double on purpose: it answers out of order, late, with ids nobody asked
for, and ends streams mid-call, as no real HSA would on demand."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from domain_edge.kms_client import AsyncKeyClient
from domain_edge.kms_client._aio_session import AsyncKeySession
from domain_edge.kms_client._core import Endpoint
from domain_edge.kms_client._session import KeySession, SessionCallError, StreamBrokenError
from domain_edge.transport import nothing_applied
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


class ScriptedSessions(services_pb2_grpc.KeyServiceServicer):
    """Each Encrypt's plaintext says what to do: b"echo:..." answers with the plaintext as the
    blob (a message's answers go back in reverse order, after an answer for an id nobody
    asked for); b"silent" is never answered; b"end" ends the stream; b"refuse" is answered
    UNAVAILABLE with the nothing-applied mark."""

    def __init__(self) -> None:
        self.streams = 0
        self.lock = threading.Lock()

    def Session(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.streams += 1
        for message in request_iterator:
            answers = [services_pb2.SessionResponse(request_id=10**9)]  # nobody asked
            for call in message.calls:
                text = call.encrypt.plaintext
                if text == b"end":
                    yield services_pb2.SessionResponses(answers=answers)
                    return
                if text == b"refuse":
                    answers.append(
                        services_pb2.SessionResponse(
                            request_id=call.request_id,
                            code=Code.UNAVAILABLE.value[0],
                            message="catching up",
                            nothing_applied=True,
                        )
                    )
                elif text.startswith(b"echo:"):
                    answer = services_pb2.SessionResponse(request_id=call.request_id)
                    answer.encrypt.ciphertext_blob = text
                    answers.append(answer)
            yield services_pb2.SessionResponses(answers=list(reversed(answers)))


class SyncSide:
    """`KeySession` behind the interface the tests use."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.session = KeySession(self.channel)

    def calls(self, texts: list[bytes], timeout: float = 5.0) -> list[Any]:
        """Send every text at once (from threads); each call's blob, or its error."""
        with futures.ThreadPoolExecutor(len(texts)) as pool:
            done = [pool.submit(self._one, text, timeout) for text in texts]
            return [d.result() for d in done]

    def _one(self, text: bytes, timeout: float) -> Any:
        try:
            request = services_pb2.EncryptRequest(key_id="k", plaintext=text)
            return self.session.call("Encrypt", request, timeout).ciphertext_blob
        except (grpc.RpcError, ValueError) as error:
            return error

    def close(self) -> None:
        self.session.close()

    def shutdown(self) -> None:
        self.channel.close()


class AsyncSide:
    """`AsyncKeySession` behind the same interface, on an event loop of its own thread."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def opened() -> tuple[grpc.aio.Channel, AsyncKeySession]:
            channel = grpc.aio.insecure_channel(address)
            return channel, AsyncKeySession(channel)

        self.channel, self.session = self._wait(opened())

    def _wait(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def calls(self, texts: list[bytes], timeout: float = 5.0) -> list[Any]:
        async def one(text: bytes) -> Any:
            try:
                request = services_pb2.EncryptRequest(key_id="k", plaintext=text)
                return (await self.session.call("Encrypt", request, timeout)).ciphertext_blob
            except (grpc.RpcError, ValueError) as error:
                return error

        async def every() -> list[Any]:
            return list(await asyncio.gather(*(one(t) for t in texts)))

        return list(self._wait(every()))

    def close(self) -> None:
        self._wait(self.session.close())

    def shutdown(self) -> None:
        self._wait(self.channel.close(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def server() -> Iterator[tuple[ScriptedSessions, str]]:
    servicer = ScriptedSessions()
    found = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    services_pb2_grpc.add_KeyServiceServicer_to_server(servicer, found)  # type: ignore[no-untyped-call]
    port = found.add_insecure_port("127.0.0.1:0")
    found.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        found.stop(0).wait()


@pytest.fixture(params=[SyncSide, AsyncSide], ids=["threads", "asyncio"])
def side(
    request: pytest.FixtureRequest, server: tuple[ScriptedSessions, str]
) -> Iterator[SyncSide | AsyncSide]:
    make: Callable[[str], SyncSide | AsyncSide] = request.param
    made = make(server[1])
    try:
        yield made
    finally:
        made.close()
        made.shutdown()


def _code(result: Any) -> grpc.StatusCode | None:
    return result.code() if isinstance(result, grpc.RpcError) else None


def test_answers_are_matched_by_id_in_any_order(side: SyncSide | AsyncSide) -> None:
    texts = [f"echo:{n}".encode() for n in range(50)]
    assert side.calls(texts) == texts


def test_a_call_gives_up_at_its_own_timeout_and_the_session_goes_on(
    side: SyncSide | AsyncSide, server: tuple[ScriptedSessions, str]
) -> None:
    started = time.monotonic()
    silent, answered = side.calls([b"silent", b"echo:a"], timeout=0.3)
    assert _code(silent) is Code.DEADLINE_EXCEEDED
    assert "no answer within 0.3 s" in silent.details()
    assert answered == b"echo:a"
    assert time.monotonic() - started < 3
    assert side.calls([b"echo:b"]) == [b"echo:b"]
    assert server[0].streams == 1  # one stream carried all of it


def test_an_ended_stream_fails_its_waiting_calls_and_the_next_call_opens_another(
    side: SyncSide | AsyncSide, server: tuple[ScriptedSessions, str]
) -> None:
    assert side.calls([b"echo:first"]) == [b"echo:first"]
    waiting, ending = side.calls([b"silent", b"end"])
    for result in (waiting, ending):
        assert _code(result) is Code.UNAVAILABLE, result
        assert "send the call again" in result.details()
        assert not nothing_applied(result)  # it may have been served: the outcome is open
    assert side.calls([b"echo:again"]) == [b"echo:again"]
    assert server[0].streams == 2


def test_an_error_answer_reads_as_the_unary_status(side: SyncSide | AsyncSide) -> None:
    (refused,) = side.calls([b"refuse"])
    assert isinstance(refused, SessionCallError)
    assert (refused.code(), refused.details()) == (Code.UNAVAILABLE, "catching up")
    assert nothing_applied(refused)


def test_close_fails_the_waiting_calls_and_refuses_new_ones(side: SyncSide | AsyncSide) -> None:
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.extend(side.calls([b"silent"], 10.0)))
    caller.start()
    time.sleep(0.3)  # the call is waiting on the stream
    side.close()
    caller.join(5)
    assert not caller.is_alive()
    assert isinstance(results[0], grpc.RpcError)
    (after,) = side.calls([b"echo:late"])
    assert isinstance(after, ValueError)
    assert "closed" in str(after)


class _CoreBrokenCall:
    """A Session call whose stream gRPC's core broke (as when a write meets a call the server
    already ended): writes succeed, reading fails with INTERNAL "Internal error from Core"."""

    def __init__(self) -> None:
        self.cancelled = False

    async def write(self, message: Any) -> None:
        await asyncio.sleep(0)

    def __aiter__(self) -> _CoreBrokenCall:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0.01)
        raise SessionCallError(grpc.StatusCode.INTERNAL, "Internal error from Core")

    def cancel(self) -> None:
        self.cancelled = True


class _CoreBrokenStub:
    def Session(self) -> _CoreBrokenCall:
        return _CoreBrokenCall()


def test_a_stream_broken_in_the_clients_core_is_not_the_servers_answer() -> None:
    """Not the server's INTERNAL, which no client may send again: the calls get
    `StreamBrokenError` (UNAVAILABLE), which `AsyncKeyClient` sends again unary at once."""

    async def run() -> grpc.RpcError:
        session = AsyncKeySession.__new__(AsyncKeySession)
        session._stub = _CoreBrokenStub()
        session._ids = iter(range(1, 100))  # type: ignore[assignment]
        session._stream = None
        session._closed = False
        request = services_pb2.EncryptRequest(key_id="k", plaintext=b"x")
        try:
            await session.call("Encrypt", request, 2.0)
        except grpc.RpcError as error:
            return error
        finally:
            await session.close()
        raise AssertionError("the call did not fail")

    error = asyncio.run(run())
    assert isinstance(error, StreamBrokenError)
    assert error.code() is grpc.StatusCode.UNAVAILABLE


def test_a_call_whose_session_broke_in_the_client_is_sent_again_unary_at_once() -> None:
    """`AsyncKeyClient._send`: a `StreamBrokenError` from the session is not the attempt's
    outcome; the same attempt goes unary (no attempt of the call's budget is spent)."""

    class BrokenSession:
        async def call(self, method: str, request: Any, timeout: float) -> Any:
            raise StreamBrokenError()

    class Stub:
        def __init__(self) -> None:
            self.calls = 0

        async def Encrypt(self, request: Any, timeout: float) -> Any:
            self.calls += 1
            return services_pb2.EncryptResponse(key_id=request.key_id)

    stub = Stub()
    endpoint = Endpoint("127.0.0.1:1", channel=None, stub=stub, session=BrokenSession())
    client = AsyncKeyClient.__new__(AsyncKeyClient)
    request = services_pb2.EncryptRequest(key_id="k", plaintext=b"x")
    answer = asyncio.run(client._send(endpoint, "Encrypt", request, 1.0))
    assert (answer.key_id, stub.calls) == ("k", 1)
