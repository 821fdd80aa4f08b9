"""The parts of the etcd client that need no cluster: endpoints (loopback only unless asked),
ranges' ends, comparisons, what a failed call means, the messages callers get, the one event
loop."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from domain_core.errors import (
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from domain_edge.etcd import (
    CompactedError,
    Compare,
    Endpoint,
    EtcdUnavailableError,
    EventLoopThread,
    Range,
    Result,
    SortBy,
    Target,
    parse_endpoints,
    prefix_end,
)
from domain_edge.etcd._errors import Failure, classify, exhausted, final_error

pytestmark = pytest.mark.unit


def test_endpoints_are_parsed_in_order() -> None:
    assert parse_endpoints("127.0.0.1:2379, 127.0.0.2:22379,localhost:1,[::1]:5") == (
        Endpoint("127.0.0.1", 2379),
        Endpoint("127.0.0.2", 22379),
        Endpoint("localhost", 1),
        Endpoint("::1", 5),
    )
    assert str(Endpoint("::1", 5)) == "[::1]:5"
    assert parse_endpoints(["127.0.0.1:2379"]) == (Endpoint("127.0.0.1", 2379),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no etcd endpoint"),
        ("127.0.0.1", "not HOST:PORT"),
        ("127.0.0.1:0", "not HOST:PORT"),
        ("127.0.0.1:65536", "not HOST:PORT"),
        ("127.0.0.1:x", "not HOST:PORT"),
        (":2379", "not HOST:PORT"),
        ("127.0.0.1:1,127.0.0.1:1", "named twice"),
        (",".join(f"127.0.0.1:{p}" for p in range(1, 18)), "at most 16"),
        ("10.0.0.1:2379", "not on this host's loopback"),
        ("etcd.example:2379", "plaintext gRPC"),
        ("127.0.0.1:2379,192.168.1.5:2379", "192.168.1.5:2379 is not on this host's loopback"),
    ],
)
def test_bad_endpoints_are_refused_with_what_to_write(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_endpoints(text)


def test_a_remote_endpoint_only_when_asked_and_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match=r"UNSAFE: plaintext etcd traffic to 10\.0\.0\.1:2379"):
        parsed = parse_endpoints("10.0.0.1:2379", unsafe_remote_plaintext=True)
    assert parsed == (Endpoint("10.0.0.1", 2379),)


def test_a_prefix_range_ends_after_every_key_with_the_prefix() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"a\xff\xff") == b"b"
    for bad in (b"", b"\xff\xff"):
        with pytest.raises(ValueError, match="prefix"):
            prefix_end(bad)
    assert Range.prefix(b"p/").end == b"p0"


def test_comparisons_and_ranges_become_etcd_messages() -> None:
    absent = Compare.absent(b"k").message()
    assert (absent.key, absent.target, absent.result, absent.create_revision) == (
        b"k",
        Target.CREATE.value,
        Result.EQUAL.value,
        0,
    )
    assert Compare.value(b"k", b"v").message().value == b"v"
    assert Compare.mod_revision(b"k", 7).message().mod_revision == 7
    empty = Compare.none_under(b"p/").message()
    assert (empty.key, empty.range_end, empty.create_revision) == (b"p/", b"p0", 0)
    with pytest.raises(TypeError):
        Compare(b"k", Target.VALUE, Result.EQUAL, 3).message()
    with pytest.raises(TypeError):
        Compare(b"k", Target.MOD, Result.EQUAL, b"3").message()
    request = Range(b"a", b"b", limit=3, sort_by=SortBy.CREATE, count_only=True).message(9)
    assert (request.limit, request.count_only, request.revision) == (3, True, 9)
    assert request.sort_target == SortBy.CREATE.value


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "failure"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: ... Connection refused",
            Failure.NOT_SENT,
        ),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", Failure.UNKNOWN),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", Failure.UNKNOWN),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", Failure.UNKNOWN),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", Failure.FINAL),
        (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision", Failure.FINAL),
        # etcd's own deadline inside the cluster (seen in chaos right after a member's kill):
        # the outcome is unknown and another member may answer, never a final refusal.
        (grpc.StatusCode.UNKNOWN, "context deadline exceeded", Failure.UNKNOWN),
        (grpc.StatusCode.UNKNOWN, "etcdserver: request timed out", Failure.UNKNOWN),
        (grpc.StatusCode.UNKNOWN, "etcdserver: leader changed", Failure.UNKNOWN),
        (grpc.StatusCode.UNKNOWN, "something else", Failure.FINAL),
    ],
)
def test_what_a_failed_call_means(code: grpc.StatusCode, details: str, failure: Failure) -> None:
    assert classify(_RpcError(code, details)) is failure


def test_final_refusals_say_what_to_change() -> None:
    too_large = final_error(
        _RpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large")
    )
    assert isinstance(too_large, LimitExceededError)
    assert "--max-request-bytes" in str(too_large)
    # Larger still: etcd's gRPC server refuses it before etcd itself looks at it.
    too_large_for_grpc = final_error(
        _RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "grpc: received message larger than max (11534697 vs. 11010048)",
        )
    )
    assert isinstance(too_large_for_grpc, LimitExceededError)
    assert "--max-request-bytes" in str(too_large_for_grpc)
    compacted = final_error(
        _RpcError(
            grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"
        )
    )
    assert isinstance(compacted, CompactedError)
    assert isinstance(compacted, ConflictError)
    full = final_error(
        _RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
    )
    assert isinstance(full, ResourceExhaustedError)
    assert "defragment" in str(full)
    ops = final_error(
        _RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: too many operations in txn request"
        )
    )
    assert isinstance(ops, UnavailableError)
    assert "--max-txn-ops" in str(ops)
    ours = final_error(
        _RpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided")
    )
    assert isinstance(ours, RuntimeError)


def test_an_unreachable_cluster_names_every_endpoint_and_whether_anything_was_applied() -> None:
    refused = _RpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect ... Connection refused")
    silent = _RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    nothing = exhausted(
        "a write", [("127.0.0.1:1", refused), ("127.0.0.1:2", refused)], maybe_applied=False
    )
    assert isinstance(nothing, EtcdUnavailableError)
    assert not nothing.maybe_applied
    assert "127.0.0.1:1 (connection refused); 127.0.0.1:2 (connection refused)" in str(nothing)
    assert "nothing was changed" in str(nothing)
    assert "hsm-domain up" in str(nothing)
    maybe = exhausted("a write", [("127.0.0.1:1", silent)], maybe_applied=True)
    assert maybe.maybe_applied
    assert "may or may not have been applied" in str(maybe)
    assert "DEADLINE_EXCEEDED" in str(maybe)


def test_one_event_loop_runs_coroutines_for_every_thread() -> None:
    loop = EventLoopThread("test-loop")

    async def where() -> str:
        return threading.current_thread().name

    assert loop.run(where(), 5) == "test-loop"
    results: list[str] = []
    workers = [
        threading.Thread(target=lambda: results.append(loop.run(where(), 5))) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert results == ["test-loop"] * 4


def test_a_call_that_overruns_is_cancelled_and_reported() -> None:
    loop = EventLoopThread("test-loop-2")
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match=r"no answer within 0\.2 s"):
        loop.run(slow(), 0.2)
    assert cancelled.wait(5)

    async def nested() -> None:
        loop.run(asyncio.sleep(0), 1)  # a blocking call from the loop's own thread

    with pytest.raises(RuntimeError, match="own thread"):
        loop.run(nested(), 5)
