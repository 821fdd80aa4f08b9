"""A synchronous client of an etcd v3 cluster, for the coordinator's store and `hsm-domain`.

aetcd (asyncio, etcd's native gRPC API) does the protocol; this package runs it on one event
loop in one daemon thread per process (`_loop`) and gives synchronous, threaded callers what a
replicated coordinator needs:
- `EtcdClient`: every member named, one channel per member, failover to the next member when
  one is unreachable, every call bounded; reads (`range`, `get`, `snapshot` at one revision),
  transactions (`txn`: compare, success, failure), `put`, `delete`;
- `watch_prefix` / `watch_key`: changes from a revision on, delivered to a callback in a thread
  of the watch's own, resumed on another member if one fails;
- `grant_lease`: a lease kept alive in the background until revoked or lost;
- `Election` (campaign on a key with a lease, who leads, observe, resign) and `Lock`;
- `members`, `member_status`, `cluster_status`: for `hsm-domain status`.

Invariants (each module states its own): a call is sent again to another member only when that
cannot apply it twice (reads; writes no member received; transactions their caller declared
retry-safe); every failure is a `domain_core.errors` class naming the endpoints tried and what
to do (a read at a revision etcd compacted is `CompactedError`, a ConflictError); endpoints
are on loopback unless the caller opts into `unsafe_remote_plaintext` (aetcd speaks plaintext
gRPC).
"""

from __future__ import annotations

from domain_edge.etcd._client import DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_TIMEOUT, EtcdClient
from domain_edge.etcd._cluster import (
    MemberInfo,
    MemberStatus,
    cluster_status,
    member_status,
    members,
)
from domain_edge.etcd._election import (
    Election,
    LeasedKey,
    Lock,
    replica_leader_key,
    replica_lock_key,
)
from domain_edge.etcd._endpoints import Endpoint, parse_endpoints
from domain_edge.etcd._errors import CompactedError, EtcdUnavailableError
from domain_edge.etcd._lease import Lease, grant_lease
from domain_edge.etcd._loop import EventLoopThread, shared_loop
from domain_edge.etcd._types import (
    Compare,
    Delete,
    DeleteResult,
    KeyValue,
    Operation,
    OperationResult,
    Put,
    PutResult,
    Range,
    RangeResult,
    Result,
    SortBy,
    Target,
    TxnResult,
    prefix_end,
)
from domain_edge.etcd._watch import Watch, WatchBatch, WatchEvent, watch_key, watch_prefix

__all__ = [
    "DEFAULT_ATTEMPT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "CompactedError",
    "Compare",
    "Delete",
    "DeleteResult",
    "Election",
    "Endpoint",
    "EtcdClient",
    "EtcdUnavailableError",
    "EventLoopThread",
    "KeyValue",
    "Lease",
    "LeasedKey",
    "Lock",
    "MemberInfo",
    "MemberStatus",
    "Operation",
    "OperationResult",
    "Put",
    "PutResult",
    "Range",
    "RangeResult",
    "Result",
    "SortBy",
    "Target",
    "TxnResult",
    "Watch",
    "WatchBatch",
    "WatchEvent",
    "cluster_status",
    "grant_lease",
    "member_status",
    "members",
    "parse_endpoints",
    "prefix_end",
    "replica_leader_key",
    "replica_lock_key",
    "shared_loop",
    "watch_key",
    "watch_prefix",
]
