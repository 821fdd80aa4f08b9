"""`EtcdClient`: a synchronous, failing-over client of one etcd cluster, over aetcd.

Invariants:
- every member of the cluster is named (`endpoints`); one aetcd client (one gRPC channel) per
  member, made on first use and reused; calls go to the member that answered last and move to
  the next one when it fails (down, paused, cut off from its peers, in an election);
- every call is bounded: each attempt by `attempt_timeout`, the whole call (all attempts, the
  back-off between rounds) by `timeout`; the waiting thread gives up at the same bound;
- a call is sent to another member only when that cannot apply it twice: reads always; a
  write only when no member received it (no connection), or when its caller declared it
  `retry_safe` (a transaction whose comparisons fail if an earlier attempt was applied), in
  which case the result says `uncertain` so the caller can tell its own earlier success from a
  lost race;
- failures come back as `domain_core.errors` (`_errors`): `EtcdUnavailableError` naming every
  endpoint tried and what to do, or a final refusal; a request we built wrong is a
  RuntimeError;
- reads are linearizable (etcd's default): a read never returns older data than a write
  acknowledged before it began, whichever member serves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import aetcd
import grpc
from aetcd import rpc

from domain_edge.etcd._endpoints import Endpoint, parse_endpoints
from domain_edge.etcd._errors import Failure, classify, exhausted, final_error
from domain_edge.etcd._loop import EventLoopThread, shared_loop
from domain_edge.etcd._types import (
    Compare,
    Delete,
    KeyValue,
    Operation,
    Put,
    Range,
    RangeResult,
    TxnResult,
    range_result,
    txn_request,
    txn_result,
)

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 8.0
DEFAULT_ATTEMPT_TIMEOUT: Final = 2.0
# A page of states or proposals may be large (a state may take 4 MiB).
_MESSAGE_BYTES: Final = 64 * 1024 * 1024
_CHANNEL_OPTIONS: Final = {
    "grpc.max_receive_message_length": _MESSAGE_BYTES,
    "grpc.max_send_message_length": _MESSAGE_BYTES,
    # A restarted member is found again within ~0.1-0.5 s, not after gRPC's default 1 s+.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
# Reads a snapshot of the latest makes in one read-only transaction (etcd's default limit of
# operations per transaction is 128).
_SNAPSHOT_TXN_READS: Final = 64
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MOST: Final = 0.5
ABORTABLE: Final = (grpc.aio.AioRpcError, aetcd.ClientError, TimeoutError)
# etcd's "require leader" metadata: a member cut off from its leader refuses at once (UNAVAILABLE,
# "no leader") instead of holding the request until its deadline, and ends its watches, so
# the call or the watch moves to a member of the majority.
REQUIRE_LEADER: Final = (("hasleader", "true"),)

Call = Callable[[Any, float], Awaitable[T]]


class _Member(aetcd.Client):  # type: ignore[misc]
    """aetcd's client of one member, sending `REQUIRE_LEADER` with every call and watch."""

    async def connect(self) -> None:
        await super().connect()
        self.metadata = REQUIRE_LEADER
        if self._watcher is not None:  # aetcd gives its watcher the metadata once, at connect
            self._watcher._metadata = REQUIRE_LEADER


def cause_of(error: BaseException) -> BaseException:
    """aetcd wraps gRPC errors in its own; classify the gRPC one."""
    cause = error.__cause__ if isinstance(error, aetcd.ClientError) else None
    return cause if isinstance(cause, BaseException) else error


class EtcdClient:
    """A synchronous client of one etcd cluster (see the module invariants).

    Thread-safe: any thread may call; the calls run on the process's one etcd event loop.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        unsafe_remote_plaintext: bool = False,
        loop: EventLoopThread | None = None,
    ) -> None:
        if not 0 < attempt_timeout <= timeout:
            raise ValueError("0 < attempt_timeout <= timeout")
        self.endpoints: tuple[Endpoint, ...] = parse_endpoints(
            endpoints, unsafe_remote_plaintext=unsafe_remote_plaintext
        )
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.loop = loop or shared_loop()
        self._clients: dict[int, Any] = {}
        self._preferred = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"EtcdClient({','.join(map(str, self.endpoints))})"

    @property
    def closed(self) -> bool:
        """Whether `close` was called (watches and keep-alives on this client then stop)."""
        return self._closed

    # --- the loop side ----------------------------------------------------------------------

    async def member_client(self, index: int) -> Any:
        """The aetcd client of endpoint `index` (made on first use; on the loop only)."""
        if self._closed:
            raise RuntimeError("the etcd client is closed")
        client = self._clients.get(index)
        if client is None:
            endpoint = self.endpoints[index]
            client = _Member(
                f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host,
                endpoint.port,
                timeout=self.attempt_timeout,
                options=dict(_CHANNEL_OPTIONS),
            )
            await client.connect()
            self._clients[index] = client
        return client

    async def failover(self, what: str, call: Call[T], *, resend_unknown: bool) -> tuple[T, bool]:
        """Run `call(aetcd_client, attempt_timeout)` on one member after another until one
        answers; (its result, whether an earlier attempt may have been applied)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempts: list[tuple[str, BaseException]] = []
        uncertain = False
        count = len(self.endpoints)
        step = 0
        while (remaining := deadline - loop.time()) > 0:
            index = (self._preferred + step) % count
            try:
                client = await self.member_client(index)
                result = await call(client, min(self.attempt_timeout, remaining))
            except ABORTABLE as raised:
                error = cause_of(raised)
                attempts.append((str(self.endpoints[index]), error))
                failure = classify(error)
                if failure is Failure.FINAL:
                    raise final_error(error) from raised
                if failure is Failure.UNKNOWN:
                    uncertain = True
                    if not resend_unknown:
                        raise exhausted(what, attempts, maybe_applied=True) from raised
                step += 1
                if step % count == 0:  # every member failed this round: back off a little
                    delay = min(_BACKOFF_MOST, _BACKOFF_FIRST * 2 ** min(step // count, 8))
                    await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                continue
            self._preferred = index
            return result, uncertain
        raise exhausted(what, attempts, maybe_applied=uncertain and resend_unknown)

    def run(self, coroutine: Awaitable[T]) -> T:
        """Run a coroutine of this client on the loop, waiting at most a little over `timeout`
        (the coroutine's own bound)."""

        async def bounded() -> T:
            return await coroutine

        try:
            return self.loop.run(bounded(), self.timeout + 1.0)
        except TimeoutError:
            raise exhausted("no answer in time", [], maybe_applied=True) from None

    # --- reads ------------------------------------------------------------------------------

    async def range_async(self, request: Range, revision: int = 0) -> RangeResult:
        async def call(client: Any, timeout: float) -> RangeResult:
            response = await client.kvstub.Range(
                request.message(revision), timeout=timeout, metadata=REQUIRE_LEADER
            )
            return range_result(response)

        result, _ = await self.failover("a read", call, resend_unknown=True)
        return result

    def range(self, request: Range) -> RangeResult:
        """Read one key or a range (linearizable; retried on another member if need be)."""
        return self.run(self.range_async(request))

    def get(self, key: bytes) -> KeyValue | None:
        """One key, or None."""
        return self.range(Range(key)).first()

    def snapshot(self, requests: Sequence[Range], revision: int = 0) -> tuple[RangeResult, ...]:
        """Several reads of one consistent view: the latest (one read-only transaction, one
        round trip, when there are at most `_SNAPSHOT_TXN_READS` of them), or `revision`
        (concurrent reads at it). ConflictError if that revision was compacted."""
        if not requests:
            return ()
        if not revision and len(requests) <= _SNAPSHOT_TXN_READS:

            async def in_one() -> tuple[RangeResult, ...]:
                result = await self.txn_async([], requests)
                return tuple(r for r in result.results if isinstance(r, RangeResult))

            return self.run(in_one())

        async def read_all() -> tuple[RangeResult, ...]:
            at = revision
            first: tuple[RangeResult, ...] = ()
            if not at:
                first = (await self.range_async(requests[0]),)
                at = first[0].revision
            rest = await asyncio.gather(*(self.range_async(r, at) for r in requests[len(first) :]))
            return (*first, *rest)

        return self.run(read_all())

    # --- writes -----------------------------------------------------------------------------

    async def txn_async(
        self,
        compare: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
        *,
        retry_safe: bool = False,
    ) -> TxnResult:
        request = txn_request(compare, success, failure)
        read_only = not any(isinstance(o, Put | Delete) for o in (*success, *failure))

        async def call(client: Any, timeout: float) -> Any:
            return await client.kvstub.Txn(request, timeout=timeout, metadata=REQUIRE_LEADER)

        what = "a read" if read_only else "a transaction"
        response, uncertain = await self.failover(
            what, call, resend_unknown=retry_safe or read_only
        )
        return txn_result(response, uncertain and not read_only)

    def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Operation],
        failure: Sequence[Operation] = (),
        *,
        retry_safe: bool = False,
    ) -> TxnResult:
        """If every comparison holds, run `success`, else `failure`, atomically.

        `retry_safe`: the comparisons fail if an earlier attempt of this very transaction was
        applied, so it may be sent again after an attempt whose outcome is unknown (the result
        then says `uncertain`). Otherwise such an attempt ends the call with
        `EtcdUnavailableError(maybe_applied=True)`.
        """
        return self.run(self.txn_async(compare, success, failure, retry_safe=retry_safe))

    def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write one key unconditionally; the new store revision. Not sent again after an
        attempt whose outcome is unknown."""
        return self.txn([], [Put(key, value, lease)]).revision

    def delete(self, key: bytes, end: bytes = b"") -> int:
        """Delete one key (or [key, end)); how many were deleted."""

        async def call(client: Any, timeout: float) -> Any:
            request = rpc.DeleteRangeRequest(key=key, range_end=end)
            return await client.kvstub.DeleteRange(
                request, timeout=timeout, metadata=REQUIRE_LEADER
            )

        async def delete() -> int:
            response, _ = await self.failover("a delete", call, resend_unknown=False)
            return int(response.deleted)

        return self.run(delete())

    # --- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every member's channel; later calls are programming errors."""
        if self._closed:
            return
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()

        async def close_all() -> None:
            for client in clients:
                await client.close()

        if clients and not self.loop.in_loop_thread():
            self.loop.run(close_all(), self.timeout)

    def __enter__(self) -> EtcdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
