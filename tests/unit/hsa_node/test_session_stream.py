"""The machinery of key-service sessions (`hsa_node.keysession.serve_stream`), with calls a
test controls: answers out of order, the in-flight bound and its back-pressure, duplicate ids,
deadlines, half-close and cancellation, and a request that cannot be answered."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from domain_core.errors import InvalidInputError
from domain_core.limits import DEFAULT_LIMITS
from domain_proto import services_pb2
from hsa_node.keysession import (
    SESSION_CALLS,
    KeySessions,
    SessionCall,
    SessionRules,
    serve_stream,
)

pytestmark = pytest.mark.unit

_WAIT = 5.0


class _Context:
    """The little of a servicer context the session machinery asks."""

    def __init__(self) -> None:
        self.active = True
        self.status: tuple[grpc.StatusCode, str] | None = None
        self._callbacks: list[Any] = []

    def is_active(self) -> bool:
        return self.active

    def add_callback(self, callback: Any) -> bool:
        self._callbacks.append(callback)
        return True

    def leave(self) -> None:
        """The client cancels: the call ends (its callbacks run)."""
        self.active = False
        for callback in self._callbacks:
            callback()

    def code(self) -> grpc.StatusCode | None:
        return self.status[0] if self.status else None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.status = (code, self.status[1] if self.status else "")

    def set_details(self, details: str) -> None:
        assert self.status is not None
        self.status = (self.status[0], details)


class _Requests:
    """A request stream the test feeds; it counts what the server has read."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.read = 0

    def send(self, request: Any) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(StopIteration)

    def fail(self, error: Exception) -> None:
        self._queue.put(error)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._queue.get(timeout=_WAIT)
        if item is StopIteration:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        self.read += 1
        return item


class _Calls:
    """Calls that complete when the test releases them, by id."""

    def __init__(self) -> None:
        self.release: dict[int, threading.Event] = {n: threading.Event() for n in range(16)}
        self.running: set[int] = set()
        self.most_running = 0
        self.ran: list[int] = []
        self._lock = threading.Lock()

    def admit(self, request: tuple[int, float | None]) -> SessionCall:
        number, deadline = request
        self.release.setdefault(number, threading.Event())
        return SessionCall(number, "echo", number, deadline)

    def run(self, call: SessionCall, context: Any) -> int:
        with self._lock:
            self.running.add(call.request_id)
            self.most_running = max(self.most_running, len(self.running))
        try:
            assert self.release[call.request_id].wait(_WAIT)
            self.ran.append(call.request_id)
            return call.request_id
        finally:
            with self._lock:
                self.running.discard(call.request_id)


def _one(message: Any) -> list[Any]:
    """Each test message is a batch of one request."""
    return [message]


@pytest.fixture
def pool() -> Iterator[futures.ThreadPoolExecutor]:
    executor = futures.ThreadPoolExecutor(max_workers=8)
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


def _start(
    calls: _Calls, pool: futures.ThreadPoolExecutor, in_flight: int
) -> tuple[_Requests, _Context, queue.SimpleQueue[Any]]:
    """A session whose answers (then "end") a send callback collects; the request feed,
    context, answers."""
    requests, context = _Requests(), _Context()
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    serve_stream(
        requests,
        context,
        _collector(answers),
        SessionRules(calls.admit, calls.run, in_flight, _one, list, pool),
    )
    return requests, context, answers


def _collector(answers: queue.SimpleQueue[Any]) -> Any:
    """A send callback that puts each answer, then "end", into `answers`."""

    def send(message: Any) -> None:
        if message is None:
            answers.put("end")
            return
        for answer in message:
            answers.put(answer)

    return send


def _wait_until(check: Any) -> None:
    end = time.monotonic() + _WAIT
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_calls_are_answered_as_they_complete_not_as_they_came(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    requests, _, answers = _start(calls, pool, in_flight=8)
    for number in (1, 2, 3):
        requests.send((number, None))
    _wait_until(lambda: calls.running == {1, 2, 3})
    for number in (3, 1, 2):
        calls.release[number].set()
        assert answers.get(timeout=_WAIT) == number
    requests.close()
    assert answers.get(timeout=_WAIT) == "end"


def test_no_more_than_the_bound_runs_and_the_stream_is_not_read_beyond_it(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    requests, _, answers = _start(calls, pool, in_flight=3)
    for number in range(10):
        requests.send((number, None))
    _wait_until(lambda: len(calls.running) == 3)
    time.sleep(0.1)
    assert requests.read == 4, "one request read and waiting for a slot, no more"
    assert calls.most_running == 3
    for number in range(10):
        calls.release[number].set()
    requests.close()
    got = [answers.get(timeout=_WAIT) for _ in range(11)]
    assert sorted(got[:10]) == list(range(10))
    assert got[10] == "end"
    assert calls.most_running == 3


def test_half_close_answers_every_call_in_flight_before_the_end(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    requests, _, answers = _start(calls, pool, in_flight=4)
    requests.send((7, None))
    requests.send((8, None))
    requests.close()
    _wait_until(lambda: calls.running == {7, 8})
    assert answers.empty(), "nothing ends while calls are in flight"
    calls.release[8].set()
    calls.release[7].set()
    assert {answers.get(timeout=_WAIT), answers.get(timeout=_WAIT)} == {7, 8}
    assert answers.get(timeout=_WAIT) == "end"


def test_a_request_that_cannot_be_answered_ends_the_stream_with_its_error(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()

    def admit(request: Any) -> SessionCall:
        if request == "garbage":
            raise InvalidInputError("the request does not parse")
        return calls.admit(request)

    requests, context = _Requests(), _Context()
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    requests.send((1, None))
    requests.send("garbage")
    calls.release[1].set()
    serve_stream(
        requests, context, _collector(answers), SessionRules(admit, calls.run, 4, _one, list, pool)
    )
    assert answers.get(timeout=_WAIT) == 1, "the call before it was answered first"
    assert answers.get(timeout=_WAIT) == "end"
    assert context.status == (grpc.StatusCode.INVALID_ARGUMENT, "the request does not parse")


def test_a_client_that_leaves_ends_the_stream_quietly_and_waiting_calls_are_dropped(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    requests, context, answers = _start(calls, pool, in_flight=1)
    requests.send((1, None))
    requests.send((2, None))
    _wait_until(lambda: calls.running == {1})
    context.leave()
    requests.fail(grpc.RpcError())  # what gRPC's iterator raises when the call is cancelled
    calls.release[1].set()
    calls.release[2].set()
    assert answers.get(timeout=_WAIT) == "end"
    assert 2 not in calls.ran


class _Servicer:
    """A key servicer whose Encrypt answers at once or fails as the request says."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def Encrypt(self, request: Any, context: Any) -> services_pb2.EncryptResponse:
        self.seen.append(request.plaintext)
        if request.plaintext == b"bad":
            raise InvalidInputError("bad plaintext")
        return services_pb2.EncryptResponse(key_id=request.key_id, ciphertext_blob=b"sealed")

    def __getattr__(self, name: str) -> Any:
        return self.Encrypt


def _session_request(number: int, plaintext: bytes, timeout_ms: int = 0) -> Any:
    return services_pb2.SessionRequest(
        request_id=number,
        timeout_ms=timeout_ms,
        encrypt=services_pb2.EncryptRequest(key_id="k", plaintext=plaintext),
    )


def test_each_call_gets_its_own_answer_or_status_and_the_stream_goes_on() -> None:
    servicer = _Servicer()
    sessions = KeySessions(servicer, lambda context: "spiffe://local/client/a", DEFAULT_LIMITS)
    requests = [
        _session_request(1, b"good"),
        _session_request(2, b"bad"),
        services_pb2.SessionRequest(request_id=3),  # no call at all
        _session_request(4, b"late", timeout_ms=DEFAULT_LIMITS.max_message_bytes),
        _session_request(5, b"good"),
    ]
    batch = services_pb2.SessionRequests(calls=requests)
    sent: queue.SimpleQueue[Any] = queue.SimpleQueue()
    try:
        sessions.serve(iter([batch]), _Context(), sent.put)
        messages = []
        while (message := sent.get(timeout=_WAIT)) is not None:
            messages.append(message)
    finally:
        sessions.close()
    answers = {a.request_id: a for message in messages for a in message.answers}
    assert answers[1].code == 0
    assert answers[1].encrypt.ciphertext_blob == b"sealed"
    assert (answers[2].code, answers[2].message) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "bad plaintext",
    )
    assert answers[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[3].nothing_applied
    assert answers[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "timeout_ms" in answers[4].message
    assert answers[5].code == 0
    assert servicer.seen.count(b"good") == 2
    assert b"late" not in servicer.seen


def test_a_call_past_its_deadline_before_it_runs_is_not_run() -> None:
    servicer = _Servicer()
    sessions = KeySessions(servicer, lambda context: "p", DEFAULT_LIMITS, workers=1)
    call = SessionCall(9, "encrypt", services_pb2.EncryptRequest(plaintext=b"x"), 0.0)
    try:
        answer = sessions._run(call, _Context())
    finally:
        sessions.close()
    assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert answer.nothing_applied
    assert servicer.seen == []


def test_an_id_in_flight_twice_is_refused_and_the_first_goes_on(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    requests, _, answers = _start(calls, pool, in_flight=4)
    requests.send((5, None))
    _wait_until(lambda: calls.running == {5})
    requests.send((5, None))
    refused = answers.get(timeout=_WAIT)
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "in flight" in refused.message
    calls.release[5].set()
    assert answers.get(timeout=_WAIT) == 5
    requests.send((5, None))  # free again once answered
    assert answers.get(timeout=_WAIT) == 5
    requests.close()
    assert answers.get(timeout=_WAIT) == "end"


def test_the_server_serves_every_call_a_session_request_can_carry() -> None:
    fields = {f.name for f in services_pb2.SessionRequest.DESCRIPTOR.oneofs_by_name["call"].fields}
    assert set(SESSION_CALLS) == fields
    methods = services_pb2.DESCRIPTOR.services_by_name["KeyService"].methods_by_name
    assert set(SESSION_CALLS.values()) <= set(methods)


def test_the_answers_of_a_message_of_inline_calls_travel_in_one_message(
    pool: futures.ThreadPoolExecutor,
) -> None:
    calls = _Calls()
    for number in range(6):
        calls.release[number].set()
    requests, context = _Requests(), _Context()

    def admit(request: Any) -> SessionCall:
        number = request
        return SessionCall(number, "echo", number, None, inline=True)

    requests.send([0, 1, 2])
    requests.send([3, 4, 5])
    requests.close()
    sent: queue.SimpleQueue[Any] = queue.SimpleQueue()
    serve_stream(
        requests, context, sent.put, SessionRules(admit, calls.run, 8, lambda b: b, list, pool)
    )
    assert sent.get(timeout=_WAIT) == [0, 1, 2]
    assert sent.get(timeout=_WAIT) == [3, 4, 5]
    assert sent.get(timeout=_WAIT) is None


def test_a_message_with_more_calls_than_may_be_in_flight_ends_the_stream() -> None:
    """No message makes the HSA hold an unbounded batch of answers (or run one)."""
    servicer = _Servicer()
    sessions = KeySessions(servicer, lambda context: "p", DEFAULT_LIMITS)
    limit = DEFAULT_LIMITS.max_session_calls_in_flight
    calls = [_session_request(n, b"good") for n in range(limit + 1)]
    context = _Context()
    sent: queue.SimpleQueue[Any] = queue.SimpleQueue()
    try:
        sessions.serve(iter([services_pb2.SessionRequests(calls=calls)]), context, sent.put)
        assert sent.get(timeout=_WAIT) is None
    finally:
        sessions.close()
    assert context.status is not None
    assert context.status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {limit}" in context.status[1]
    assert servicer.seen == []
