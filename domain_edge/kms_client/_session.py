"""One key-service session of the key client (`KeyClient`): a `KeyService.Session` stream on
one endpoint's channel that every thread of the client shares, each call matched to its answer
by request id.

A call's failure is raised as the `grpc.RpcError` its unary call would have raised (its code,
details, and the "nothing applied" mark as trailing metadata), so that the client's retry and
fail-over rules apply unchanged (`_retry`). A stream that ends fails every call still waiting
with its status (UNAVAILABLE when it simply ended): for the data-plane calls a session carries
(all idempotent) that is what a lost unary call would have said.

Calls queued by several threads while a message is on its way travel together in the next
one (`SessionRequests`), and the HSA answers in batches likewise: under load one message
carries many calls, which is where a session saves most; a lone call travels alone.

Invariants: at most one stream per session object at a time, opened on first use and again
after it ended; a call never waits past its own timeout; `close` fails whatever still waits.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from typing import Any, Final

import grpc

from domain_edge.transport import ERROR_KIND_KEY, NOTHING_APPLIED_KEY, RETRY_AFTER_KEY
from domain_proto import services_pb2, services_pb2_grpc

__all__ = [
    "CODES",
    "SESSION_FIELDS",
    "KeySession",
    "SessionCallError",
    "no_answer",
    "session_ended",
    "session_request",
    "session_result",
]

# The unary method of each call a session carries, by its field in SessionRequest.
SESSION_FIELDS: Final[dict[str, str]] = {
    "Encrypt": "encrypt",
    "Decrypt": "decrypt",
    "ReEncrypt": "re_encrypt",
    "GenerateDataKey": "generate_data_key",
    "GenerateDataKeyWithoutPlaintext": "generate_data_key_without_plaintext",
}
# gRPC status codes by number (a session's answer carries the number).
CODES: Final = {code.value[0]: code for code in grpc.StatusCode}
# Calls one message carries at most (each at most a few KiB: far below the message limit).
_MAX_CALLS_PER_MESSAGE: Final = 64
_END: Final = object()
# How long closing a session waits for its reader thread to see the stream end (it ends
# within milliseconds once cancelled; the bound keeps close from hanging on a stuck peer).
_READER_JOIN_SECONDS: Final = 2.0


class SessionCallError(grpc.RpcError):
    """A session call's error, as its unary call would have raised it."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        nothing_applied: bool = False,
        retry_after_ms: int = 0,
        kind: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self._nothing_applied = nothing_applied
        self._retry_after_ms = retry_after_ms
        self._kind = kind

    @classmethod
    def of_answer(cls, answer: Any) -> SessionCallError:
        """The error a session's answer (`SessionResponse`) carries."""
        code = CODES.get(answer.code, grpc.StatusCode.UNKNOWN)
        return cls(
            code, answer.message, answer.nothing_applied, answer.retry_after_ms, answer.error_kind
        )

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        """The "nothing applied" mark, the retry delay and the error's kind, where a unary
        call carries them."""
        marks: tuple[tuple[str, str], ...] = (
            ((NOTHING_APPLIED_KEY, "true"),) if self._nothing_applied else ()
        )
        if self._retry_after_ms:
            marks += ((RETRY_AFTER_KEY, str(self._retry_after_ms)),)
        if self._kind:
            marks += ((ERROR_KIND_KEY, self._kind),)
        return marks


def session_request(number: int, method: str, request: Any, timeout: float) -> Any:
    """The `SessionRequest` of one call: its id, its deadline in ms, its request."""
    return services_pb2.SessionRequest(
        request_id=number,
        timeout_ms=max(1, int(timeout * 1000)),
        **{SESSION_FIELDS[method]: request},
    )


def session_result(method: str, answer: Any) -> Any:
    """A call's response from its session answer, or the error it carries, raised."""
    if answer.code:
        raise SessionCallError.of_answer(answer)
    return getattr(answer, SESSION_FIELDS[method])


def no_answer(method: str, timeout: float) -> SessionCallError:
    """The error of a call that got no answer within its timeout."""
    return SessionCallError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} got no answer within {timeout:g} s"
    )


def session_ended() -> SessionCallError:
    """The error of the calls still waiting when a stream simply ended (it may have served
    them: the outcome is open, as a lost unary call's)."""
    return SessionCallError(
        grpc.StatusCode.UNAVAILABLE, "the key-service session ended; send the call again"
    )


class StreamBrokenError(SessionCallError):
    """A session stream that gRPC's core in this client broke (a write met a call the server
    had already ended) before the server answered on it: the call is sent again unary, in the
    same attempt (every call a session carries is idempotent)."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, "the key-service session broke in this client"
        )


class _Waiting:
    """One call waiting for its answer."""

    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Any = None
        self.error: grpc.RpcError | None = None


class _Stream:
    """One open Session stream: its requests' queue, the calls waiting, its reader."""

    def __init__(self, stub: Any) -> None:
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.waiting: dict[int, _Waiting] = {}
        self.lock = threading.Lock()
        self.ended: grpc.RpcError | None = None
        self.responses = stub.Session(self._outgoing())
        self.reader = threading.Thread(target=self._read, name="key-session", daemon=True)
        self.reader.start()

    def _outgoing(self) -> Iterator[services_pb2.SessionRequests]:
        """The stream's messages: every call queued by the time one goes out travels in it
        (at most `_MAX_CALLS_PER_MESSAGE`), so concurrent callers share messages."""
        while True:
            first = self.requests.get()
            if first is _END:
                return
            calls = [first]
            ending = False
            while len(calls) < _MAX_CALLS_PER_MESSAGE:
                try:
                    more = self.requests.get_nowait()
                except queue.Empty:
                    break
                if more is _END:
                    ending = True
                    break
                calls.append(more)
            yield services_pb2.SessionRequests(calls=calls)
            if ending:
                return

    def _read(self) -> None:
        error: grpc.RpcError = session_ended()
        try:
            for message in self.responses:
                for response in message.answers:
                    with self.lock:
                        waiting = self.waiting.pop(response.request_id, None)
                    if waiting is not None:
                        waiting.answer = response
                        waiting.done.set()
        except grpc.RpcError as failure:
            error = failure
        with self.lock:
            self.ended = error
            left, self.waiting = list(self.waiting.values()), {}
        for waiting in left:
            waiting.error = error
            waiting.done.set()

    def close(self) -> None:
        """End the stream and wait (briefly) for its reader to finish: a process that exits
        right after closing its client then has no stream left running in gRPC's threads."""
        self.requests.put(_END)
        self.responses.cancel()
        if self.reader is not threading.current_thread():
            self.reader.join(_READER_JOIN_SECONDS)


class KeySession:
    """The session of one endpoint: `call("Encrypt", request, timeout)` returns the
    EncryptResponse or raises the RpcError the unary Encrypt would have raised."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False

    def _open(self) -> _Stream:
        with self._lock:
            if self._closed:
                raise ValueError("the session is closed")
            stream = self._stream
            if stream is None or stream.ended is not None:
                stream = self._stream = _Stream(self._stub)
            return stream

    def call(self, method: str, request: Any, timeout: float) -> Any:
        """One call over the session (opened on first use, and again after it ended)."""
        stream = self._open()
        number = next(self._ids)
        waiting = _Waiting()
        with stream.lock:
            if stream.ended is not None:
                raise stream.ended
            stream.waiting[number] = waiting
        stream.requests.put(session_request(number, method, request, timeout))
        if not waiting.done.wait(timeout):
            with stream.lock:
                stream.waiting.pop(number, None)
            raise no_answer(method, timeout)
        if waiting.error is not None:
            raise waiting.error
        return session_result(method, waiting.answer)

    def close(self) -> None:
        """End the stream; calls still waiting fail."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()
