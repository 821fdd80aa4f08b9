"""Key-service sessions: many data-plane calls over one bidirectional stream
(`KeyService.Session`, docs/runtime.md "Key-service sessions").

A unary call pays gRPC's per-call cost (a new HTTP/2 stream, metadata, a worker hand-off)
before the key service does anything; a session pays it once, and gRPC's per-message cost once
per batch: a message (`SessionRequests`) carries every call the client had ready, and the
answers ready together go back in one (`SessionResponses`). Each `SessionRequest` carries
one call (Encrypt, Decrypt, ReEncrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext) and
an id the client chose; it is served by the unary method of the same name, with the stream's
context, so its caller, gates, policy checks, limits and audit record are exactly the unary
call's; its answer, or its error as the status the unary call would have ended with, comes
back tagged with the id as soon as it completes, in any order.

Invariants:
- the stream is admitted only for a `client` of this domain (PERMISSION_DENIED ends it at
  once), and then counts against the server's stream quota like any stream;
- a failed call is answered in its own response (its status, message, "nothing applied");
  the stream goes on. Only what has no id to answer ends it: a request message that does not
  parse, is over the message limit, or carries more calls than one session may have in
  flight (INVALID_ARGUMENT), so that no message can make the HSA hold an unbounded batch;
- at most `Limits.max_session_calls_in_flight` calls of one stream run or wait at once;
  beyond that the stream is not read, so HTTP/2 flow control holds the client back;
- an id already in flight on the stream, or a request without a call, is answered
  INVALID_ARGUMENT; a call whose deadline (`timeout_ms` from its arrival, within the stream's
  own) passed before it ran is answered DEADLINE_EXCEEDED and nothing was applied;
- a call whose keys are fresh in the cache runs on the stream's reader at once (no hand-off:
  the common case); any other (a key to read from the coordinator, to refresh) runs on one
  of the process's workers, so that no wait on the coordinator holds the stream up;
- a session is a non-blocking stream: it holds no thread of the server's pools, only its
  reader; responses go out one at a time (gRPC allows one send in flight per call; a lock),
  from the reader or the worker that answers; when the client half-closes, every call in
  flight is answered first; when it cancels, the calls still waiting are dropped unrun;
- every call is counted in the process's metrics as its unary method (`KeyService/<Call>`),
  with its status and latency; never a plaintext or key in a message or a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc

from domain_core import ciphertext
from domain_core.errors import HsmDomainError, InvalidInputError, ThrottledError
from domain_core.limits import MAX_SESSION_CALL_TIMEOUT_MS, Limits
from domain_edge import transport
from domain_edge.metrics import PROCESS
from domain_edge.status import grpc_status_for
from domain_proto import services_pb2
from hsa_node.keycalls import StreamCaller

__all__ = [
    "SESSION_CALLS",
    "SESSION_STREAMS",
    "SESSION_WORKERS",
    "KeySessions",
    "SessionCall",
    "SessionRules",
    "serve_stream",
]

log = logging.getLogger(__name__)

# The calls a session carries: the request field, and the unary method that serves it (the
# response field has the same name).
SESSION_CALLS: Final[dict[str, str]] = {
    "encrypt": "Encrypt",
    "decrypt": "Decrypt",
    "re_encrypt": "ReEncrypt",
    "generate_data_key": "GenerateDataKey",
    "generate_data_key_without_plaintext": "GenerateDataKeyWithoutPlaintext",
}
# Threads of one HSA process that run the calls of all its sessions.
SESSION_WORKERS: Final = 4
# The streams of an HSA's server, sessions included: each session holds one thread (its
# reader), so they are capped per caller (one SPIFFE id, however many processes share it) and
# per server; a client refused a session uses unary calls. (Sessions are non-blocking
# streams: they take none of the 4 threads the quota keeps for generator streams.)
SESSION_STREAMS: Final = transport.StreamLimits(per_peer=16, total=64, blocking=4)
# A session's call is counted as the unary call it is (an Encrypt is an Encrypt, whichever
# way it came: dashboards and alerts see every one); the stream itself as `.../Session`.
_METRIC_PREFIX: Final = "/hsmdomain.v1.KeyService/"
# Answers one response message carries at most (each is at most a few KiB: far below the
# message limit however many there are).
_MAX_ANSWERS_PER_MESSAGE: Final = 128


@dataclass
class SessionCall:
    """One call of a session, from its arrival to its answer: its id (unique among the
    stream's calls in flight), which call it is, its request, and its deadline."""

    request_id: int
    field: str
    request: Any
    deadline: float | None  # time.monotonic(); None: the stream's own
    # Run by the stream's reader itself (its key is fresh in the cache: no wait on the
    # coordinator can hold the stream up); else by a worker, and answered when done.
    inline: bool = False


def _status_response(
    request_id: int, code: grpc.StatusCode, message: str, *, nothing_applied: bool = False
) -> services_pb2.SessionResponse:
    return services_pb2.SessionResponse(
        request_id=request_id,
        code=code.value[0],
        message=message,
        nothing_applied=nothing_applied,
    )


class KeySessions:
    """Serves `KeyService.Session` with the unary methods of `servicer`.

    `principal(context)` checks the caller (the key service's frame), once per stream;
    `limits` bounds the calls in flight per stream.
    """

    def __init__(
        self,
        servicer: Any,
        principal: Callable[[grpc.ServicerContext], str],
        limits: Limits,
        workers: int = SESSION_WORKERS,
        *,
        fresh: Callable[[str], bool] = lambda key_id: False,
    ) -> None:
        self._methods: dict[str, Callable[[Any, grpc.ServicerContext], Any]] = {
            field: getattr(servicer, method) for field, method in SESSION_CALLS.items()
        }
        self._principal = principal
        self._fresh = fresh
        self._pool = futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="key-session"
        )
        self._rules = SessionRules(
            admit=self._admit,
            run=self._run,
            in_flight=limits.max_session_calls_in_flight,
            unpack=lambda message: message.calls,
            pack=lambda answers: services_pb2.SessionResponses(answers=answers),
            pool=self._pool,
        )

    def close(self) -> None:
        """Stop the workers once the calls they run are answered (after the server stopped:
        no new call comes); calls still waiting are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def serve(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        """Serve one `Session` stream (non-blocking: returns at once, answers through
        `send_response_callback`)."""
        if send_response_callback is None:
            raise RuntimeError("gRPC did not serve a session as a non-blocking stream")
        # A caller that may not call the key service gets no stream; the stream's calls are
        # the checked caller's (`StreamCaller`: one TLS connection, one identity).
        caller = StreamCaller(context, self._principal(context))
        serve_stream(
            requests, cast(grpc.ServicerContext, caller), send_response_callback, self._rules
        )

    # --- one call ------------------------------------------------------------------------

    def _run(
        self, call: SessionCall, context: grpc.ServicerContext
    ) -> services_pb2.SessionResponse:
        """Serve one call with its unary method; its response, or its error as a status."""
        method = SESSION_CALLS[call.field]
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if call.deadline is not None and time.monotonic() >= call.deadline:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                return _status_response(
                    call.request_id,
                    code,
                    f"{method} waited past its deadline in the session; it was not run",
                    nothing_applied=True,
                )
            result = self._methods[call.field](call.request, context)
            response = services_pb2.SessionResponse(request_id=call.request_id)
            getattr(response, call.field).CopyFrom(result)
            return response
        except HsmDomainError as error:
            code = grpc_status_for(error)
            answer = _status_response(
                call.request_id, code, error.message, nothing_applied=error.nothing_applied
            )
            if isinstance(error, ThrottledError):  # as the unary call's `retry-after`
                answer.retry_after_ms = transport.retry_after_ms(error)
            answer.error_kind = transport.wire_kind(error) or ""
            return answer
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("internal error in a session's %s", method)
            return _status_response(
                call.request_id, code, "internal error; the server logged the details"
            )
        finally:
            PROCESS.rpc.observe(_METRIC_PREFIX + method, code.name, time.perf_counter() - began)

    def _admit(self, request: Any) -> SessionCall | services_pb2.SessionResponse:
        """The call a request carries, or the response that refuses it at once (a request that
        did not parse never comes here: the transport ends the stream, there is no id to
        answer)."""
        request_id = int(request.request_id)
        field = request.WhichOneof("call")
        if field not in SESSION_CALLS:
            return _status_response(
                request_id,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a session request carries one call: encrypt, decrypt, re_encrypt, "
                "generate_data_key or generate_data_key_without_plaintext",
                nothing_applied=True,
            )
        timeout_ms = int(request.timeout_ms)
        if timeout_ms > MAX_SESSION_CALL_TIMEOUT_MS:
            return _status_response(
                request_id,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_ms is {timeout_ms}; at most {MAX_SESSION_CALL_TIMEOUT_MS} (0: the "
                "stream's deadline)",
                nothing_applied=True,
            )
        deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None
        call = getattr(request, field)
        return SessionCall(request_id, field, call, deadline, self._inline(field, call))

    def _inline(self, field: str, call: Any) -> bool:
        """Whether every key `call` uses is fresh in the cache, so that it runs without waiting
        on anything. The blob's key id is only peeked at (the call parses its header once,
        and refuses a bad one): a blob naming no fresh key goes to a worker, which fails it as
        fast."""
        fresh = self._fresh
        if field == "decrypt":
            return fresh(ciphertext.peek_key_id(call.ciphertext_blob))
        if field == "re_encrypt":
            source = ciphertext.peek_key_id(call.ciphertext_blob)
            return fresh(source) and fresh(call.destination_key_id)
        return fresh(call.key_id)


@dataclass(frozen=True)
class SessionRules:
    """What one kind of session does with its stream (the key service's, or the echo floor's).

    `unpack` gives a request message's requests (a batch); `admit` turns each into a call, or
    into the answer that refuses it at once (it raises to end the stream); `run` answers a
    call; at most `in_flight` calls at once; `pack` makes one response message of answers.
    A call that is not `inline` runs on `pool` (None: every call runs inline).
    """

    admit: Callable[[Any], SessionCall | Any]
    run: Callable[[SessionCall, grpc.ServicerContext], Any]
    in_flight: int
    unpack: Callable[[Any], Sequence[Any]]
    pack: Callable[[list[Any]], Any]
    pool: futures.ThreadPoolExecutor | None = None


def serve_stream(
    requests: Iterator[Any],
    context: grpc.ServicerContext,
    send: Callable[[Any], None],
    rules: SessionRules,
) -> None:
    """Serve one session stream by `rules`, from a reader thread of its own; returns at once.

    A call runs on the reader when it is `inline` (the answers of one request message go back
    together, in one message, once its batch is done), else on the rules' pool (answered alone
    when done). Every response goes through `send`, one at a time, and `send(None)` ends the
    stream. The key service's sessions and the sessions of Diagnostics (the floor) are the
    same machinery.
    """
    _Stream(requests, context, send, rules).start()


class _Stream:
    """One session: its reader thread reads, admits, runs the inline calls and sends their
    answers; workers run the others and send theirs; one lock keeps the sends one at a time."""

    def __init__(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        send: Callable[[Any], None],
        rules: SessionRules,
    ) -> None:
        self._requests = requests
        self._context = context
        self._send = send
        self._rules = rules
        self._slots = threading.BoundedSemaphore(rules.in_flight)
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._in_flight: set[int] = set()
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name="key-session", daemon=True)

    def start(self) -> None:
        if not self._context.add_callback(self._stopping.set):
            self._stopping.set()  # (the call ended already)
        self._reader.start()

    def _emit(self, answers: list[Any]) -> None:
        """Send answers (at most `_MAX_ANSWERS_PER_MESSAGE` a message), unless the client left."""
        for start in range(0, len(answers), _MAX_ANSWERS_PER_MESSAGE):
            if self._stopping.is_set():
                return
            with self._sending:
                self._send(self._rules.pack(answers[start : start + _MAX_ANSWERS_PER_MESSAGE]))

    def _read(self) -> None:
        ending: BaseException | None = None
        try:
            for message in self._requests:
                requests = self._rules.unpack(message)
                limit = self._rules.in_flight
                if len(requests) > limit:
                    raise InvalidInputError(
                        f"a session message carries {len(requests)} calls; at most "
                        f"{limit} (the calls one session may have in flight)"
                    )
                batch: list[Any] = []  # the answers of this message's inline calls
                for request in requests:
                    if self._stopping.is_set() or not self._take(request, batch):
                        break
                if batch:
                    self._emit(batch)
                if self._stopping.is_set():
                    break
        except Exception as error:  # the client left, or a request that cannot be answered
            ending = error
        finally:
            self._drain()
            self._end(ending)

    def _end(self, error: BaseException | None) -> None:
        """The final status: OK after a half-close, the error of a request that ended the
        stream, nothing for a client that left."""
        context = self._context
        if error is not None and context.is_active() and cast(Any, context).code() is None:
            if isinstance(error, HsmDomainError):
                context.set_code(grpc_status_for(error))
                context.set_details(error.message)
            else:
                log.error("a session ended on %s", type(error).__name__)
                context.set_code(grpc.StatusCode.INTERNAL)
                context.set_details("internal error; the server logged the details")
        with self._sending:
            self._send(None)

    def _take(self, request: Any, batch: list[Any]) -> bool:
        """Admit one request and run its call (inline: its answer joins `batch`) or hand it
        to a worker; False when the stream is ending."""
        admitted = self._rules.admit(request)
        if not isinstance(admitted, SessionCall):
            batch.append(admitted)
            return True
        with self._lock:
            duplicate = admitted.request_id in self._in_flight
            if not duplicate:
                self._in_flight.add(admitted.request_id)
        if duplicate:
            batch.append(
                _status_response(
                    admitted.request_id,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request id {admitted.request_id} is in flight on this session "
                    "already; give each call its own id",
                    nothing_applied=True,
                )
            )
            return True
        self._slots.acquire()  # back-pressure: no more reading until a slot frees
        if self._stopping.is_set():
            self._slots.release()
            return False
        pool = self._rules.pool
        if admitted.inline or pool is None:
            self._serve(admitted, batch.append)  # the common case: no hand-off
        else:
            pool.submit(self._serve, admitted, lambda answer: self._emit([answer]))
        return True

    def _serve(self, call: SessionCall, answer_with: Callable[[Any], None]) -> None:
        try:
            if self._stopping.is_set():
                return  # the stream ended: nobody to answer
            answer = self._rules.run(call, self._context)
            if not self._stopping.is_set():  # (a client that left gets nothing more)
                answer_with(answer)
        finally:
            with self._lock:
                self._in_flight.discard(call.request_id)
            self._slots.release()

    def _drain(self) -> None:
        """Wait until every call in flight is answered."""
        limit = self._rules.in_flight
        for _ in range(limit):
            self._slots.acquire()
        for _ in range(limit):
            self._slots.release()
