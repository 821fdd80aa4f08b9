"""What a caller asks etcd and what it gets back, as plain values; and their etcd messages.

Requests (`Compare`, `Range`, `Put`, `Delete`) are frozen dataclasses the caller builds; they
become aetcd's generated etcd v3 messages here (aetcd's own request builders cannot express a
limit, a sort, a count or a revision, which the store needs). Responses come back as
`KeyValue`, `RangeResult`, `PutResult`, `DeleteResult` and `TxnResult`, with no aetcd or
protobuf object left in them.

Invariants: keys and values are bytes, never text; a range's end is explicit (`prefix_end`
for a prefix), so no request ever covers more keys than its caller named.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aetcd import rpc


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key above every key that starts with `prefix` (a range's end)."""
    if not prefix:
        raise ValueError("an empty prefix would cover the whole keyspace")
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        raise ValueError("a prefix of 0xff bytes only has no end")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class Target(enum.Enum):
    """What a `Compare` looks at."""

    VALUE = rpc.Compare.VALUE
    VERSION = rpc.Compare.VERSION
    CREATE = rpc.Compare.CREATE
    MOD = rpc.Compare.MOD


class Result(enum.Enum):
    """How a `Compare` compares."""

    EQUAL = rpc.Compare.EQUAL
    NOT_EQUAL = rpc.Compare.NOT_EQUAL
    LESS = rpc.Compare.LESS
    GREATER = rpc.Compare.GREATER


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction on one key, or on every key in [key, end) (etcd compares
    each key of the range; an empty range compares as one absent key, and fails a value
    comparison)."""

    key: bytes
    target: Target
    result: Result
    operand: int | bytes
    end: bytes = b""

    @classmethod
    def absent(cls, key: bytes) -> Compare:
        """The key does not exist (it was never created, or was deleted)."""
        return cls(key, Target.CREATE, Result.EQUAL, 0)

    @classmethod
    def none_under(cls, prefix: bytes) -> Compare:
        """No key starts with `prefix` (every key of the range was never created)."""
        return cls(prefix, Target.CREATE, Result.EQUAL, 0, prefix_end(prefix))

    @classmethod
    def present(cls, key: bytes) -> Compare:
        return cls(key, Target.CREATE, Result.GREATER, 0)

    @classmethod
    def mod_revision(cls, key: bytes, revision: int) -> Compare:
        """The key was last written at `revision` (0: it does not exist)."""
        return cls(key, Target.MOD, Result.EQUAL, revision)

    @classmethod
    def value(cls, key: bytes, value: bytes) -> Compare:
        """The key exists and holds exactly `value`."""
        return cls(key, Target.VALUE, Result.EQUAL, value)

    def message(self) -> Any:
        compare = rpc.Compare(
            key=self.key, range_end=self.end, target=self.target.value, result=self.result.value
        )
        if self.target is Target.VALUE:
            if not isinstance(self.operand, bytes):
                raise TypeError("a value comparison takes bytes")
            compare.value = self.operand
        else:
            if isinstance(self.operand, bytes | bool) or not isinstance(self.operand, int):
                raise TypeError("a revision or version comparison takes an int")
            setattr(compare, _REVISION_FIELDS[self.target], self.operand)
        return compare


_REVISION_FIELDS = {
    Target.VERSION: "version",
    Target.CREATE: "create_revision",
    Target.MOD: "mod_revision",
}


class SortBy(enum.Enum):
    KEY = rpc.RangeRequest.KEY
    CREATE = rpc.RangeRequest.CREATE
    MOD = rpc.RangeRequest.MOD


@dataclass(frozen=True)
class Range:
    """Read one key, or the keys in [key, end): at most `limit` (0: all), sorted, the values
    or only the keys or only their count, now or `revision` (0: the latest)."""

    key: bytes
    end: bytes = b""
    limit: int = 0
    sort_by: SortBy = SortBy.KEY
    descending: bool = False
    keys_only: bool = False
    count_only: bool = False
    revision: int = 0

    @classmethod
    def prefix(cls, prefix: bytes, **options: Any) -> Range:
        """Every key that starts with `prefix`."""
        return cls(prefix, prefix_end(prefix), **options)

    def message(self, revision: int = 0) -> Any:
        request = rpc.RangeRequest(
            key=self.key,
            range_end=self.end,
            limit=self.limit,
            keys_only=self.keys_only,
            count_only=self.count_only,
            revision=revision or self.revision,
        )
        if self.descending or self.sort_by is not SortBy.KEY:
            request.sort_target = self.sort_by.value
            request.sort_order = (
                rpc.RangeRequest.DESCEND if self.descending else rpc.RangeRequest.ASCEND
            )
        return request


@dataclass(frozen=True)
class Put:
    """Write one key (attached to a lease when `lease` is not 0)."""

    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Delete one key, or the keys in [key, end)."""

    key: bytes
    end: bytes = b""

    @classmethod
    def prefix(cls, prefix: bytes) -> Delete:
        return cls(prefix, prefix_end(prefix))


Operation = Range | Put | Delete


def request_op(operation: Operation) -> Any:
    """A transaction's request for one operation."""
    if isinstance(operation, Range):
        return rpc.RequestOp(request_range=operation.message())
    if isinstance(operation, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(
                key=operation.key, value=operation.value, lease=operation.lease
            )
        )
    if isinstance(operation, Delete):
        return rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=operation.key, range_end=operation.end)
        )
    raise TypeError(f"not an etcd operation: {type(operation).__name__}")


def txn_request(
    compare: Sequence[Compare], success: Sequence[Operation], failure: Sequence[Operation]
) -> Any:
    return rpc.TxnRequest(
        compare=[c.message() for c in compare],
        success=[request_op(o) for o in success],
        failure=[request_op(o) for o in failure],
    )


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    """What a `Range` found: the pairs (none with `count_only`), how many matched in all, whether
    `limit` left some out, and the store revision it was read at."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int

    def first(self) -> KeyValue | None:
        return self.kvs[0] if self.kvs else None


@dataclass(frozen=True)
class PutResult:
    revision: int


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    revision: int


OperationResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    """A transaction's outcome: whether its comparisons held (so `success` ran), the results
    of the branch that ran, the store revision after it, and `uncertain`: an earlier attempt of
    this (retry-safe) transaction failed without an answer, so it may have been applied then:
    a comparison that fails now may have failed because of it (the caller checks)."""

    succeeded: bool
    results: tuple[OperationResult, ...]
    revision: int
    uncertain: bool = False


def key_value(kv: Any) -> KeyValue:
    return KeyValue(
        bytes(kv.key),
        bytes(kv.value),
        int(kv.create_revision),
        int(kv.mod_revision),
        int(kv.version),
        int(kv.lease),
    )


def range_result(response: Any, header_revision: int | None = None) -> RangeResult:
    revision = header_revision if header_revision is not None else int(response.header.revision)
    return RangeResult(
        tuple(key_value(kv) for kv in response.kvs),
        int(response.count),
        bool(response.more),
        revision,
    )


def txn_result(response: Any, uncertain: bool) -> TxnResult:
    revision = int(response.header.revision)
    results: list[OperationResult] = []
    for op in response.responses:
        kind = op.WhichOneof("response")
        if kind == "response_range":
            results.append(range_result(op.response_range, revision))
        elif kind == "response_put":
            results.append(PutResult(revision))
        elif kind == "response_delete_range":
            results.append(DeleteResult(int(op.response_delete_range.deleted), revision))
        else:
            raise RuntimeError(f"unexpected etcd transaction response {kind!r}")
    return TxnResult(bool(response.succeeded), tuple(results), revision, uncertain)
