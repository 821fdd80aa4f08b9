"""Where the etcd store keeps what, how a value is encoded, and the compare-and-swap loop.

Every key is under the store's prefix P (from the store spec, e.g. `hsm-domain/`):

| key | value |
| --- | --- |
| `P/states/{version:020}` | the sealed state's bytes, as stored (never changed or deleted) |
| `P/fences/revision`, `P/fences/value` | the fences' revision (decimal), their bytes |
| `P/hsas/{hex host id}` | the HSA's registration and reported version |
| `P/audit/{hex host id}/{hex log}` | the highest audit head (checkpoint bytes) |
| `P/keys/live/{hex key id}` | a live key record, its revision and creator |
| `P/keys/dead/{hex key id}` | a tombstone: the last record, its revision, when deleted |
| `P/keys/deleted/{deleted_at:020}/{hex key id}` | index of tombstones by deletion time |
| `P/keys/creators/c{hex creator}` | how many live keys the creator has (decimal) |
| `P/proposals/...` | proposals, their status, signatures and indexes (`_etcd_proposals`) |
| `P/load` | only while a snapshot is being loaded: the load's id and batch (`_etcd_load`) |

Ids are hex-encoded in keys, so any text is a safe key segment and keys sort as the ids'
UTF-8 bytes do (as SQLite sorts text); numbers are zero-padded to 20 digits, so keys sort as the
numbers do. A value with fields is `canonical JSON, 0x00, blob` (`encode`): readable with
etcdctl, and the blob (a record, a proposal, a checkpoint) kept byte for byte. Key records keep
their revision in the value, never etcd's own revisions, so that a backup restores them exactly.

Every write is one etcd transaction whose comparisons hold only if what it read is unchanged
(`cas`): a lost race is read again and retried, a bounded number of times; each write puts a
random `w` (write id) into its main value, so that after an attempt whose answer was lost, a
failed comparison caused by that very attempt is told apart from another writer's (`mine`).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from domain_coordinator._store_records import AuditHeadRecord, HsaRecord
from domain_core.errors import ConflictError
from domain_edge.etcd import KeyValue, RangeResult, TxnResult, prefix_end

T = TypeVar("T")

CAS_ATTEMPTS: Final = 32
_PAUSE_FIRST: Final = 0.002
_PAUSE_MOST: Final = 0.1


def hexed(text: str) -> bytes:
    return text.encode().hex().encode()


def unhexed(segment: bytes) -> str:
    return bytes.fromhex(segment.decode()).decode()


def number(value: int) -> bytes:
    """A number as a key segment that sorts as the number does (negative ones as 0)."""
    return b"%020d" % max(0, value)


def encode(fields: dict[str, Any], blob: bytes = b"") -> bytes:
    """Fields (JSON types; bytes as hex by the caller) and a blob, in one value."""
    header = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return header.encode() + b"\0" + blob


def decode(value: bytes) -> tuple[dict[str, Any], bytes]:
    """The fields and the blob of a value `encode` made."""
    header, sep, blob = value.partition(b"\0")
    try:
        fields = json.loads(header)
    except ValueError:
        fields = None
    if not sep or not isinstance(fields, dict):
        raise RuntimeError(
            "the etcd store holds a value it did not write: is another program using its "
            "prefix? Give this store a prefix of its own (store = etcd:.../PREFIX)"
        )
    return fields, blob


def hsa_value(record: HsaRecord, w: str) -> bytes:
    """The value of an HSA's registration (`w`: the write id, "" for one loaded)."""
    return encode(
        {
            "address": record.address,
            "registered_at": record.registered_at,
            "version": record.version,
            "state_hash": record.state_hash.hex(),
            "reported_at": record.reported_at,
            "w": w,
        }
    )


def hsa_record(host_id: str, value: bytes) -> HsaRecord:
    """The registration `hsa_value` stored for `host_id`."""
    fields, _ = decode(value)
    return HsaRecord(
        host_id,
        str(fields["address"]),
        int(fields["registered_at"]),
        int(fields["version"]),
        bytes.fromhex(fields["state_hash"]),
        int(fields["reported_at"]),
    )


def head_value(head: AuditHeadRecord, w: str) -> bytes:
    """The value of an audit head (`w`: the write id, "" for one loaded)."""
    return encode({"seq": head.seq, "reported_at": head.reported_at, "w": w}, head.checkpoint)


def head_record(host_id: str, log: str, value: bytes) -> AuditHeadRecord:
    """The audit head `head_value` stored for `host_id`'s `log`."""
    fields, checkpoint = decode(value)
    return AuditHeadRecord(host_id, log, int(fields["seq"]), checkpoint, int(fields["reported_at"]))


def write_id() -> str:
    """A fresh id for one write (`w`), to recognise it after a lost answer."""
    return os.urandom(8).hex()


def mine(kv: KeyValue | None, write: str) -> bool:
    """Whether `kv` is the value the write with id `write` put."""
    return kv is not None and decode(kv.value)[0].get("w") == write


def first(result: object) -> KeyValue | None:
    """The first pair of a range result in a transaction's results (None otherwise)."""
    return result.first() if isinstance(result, RangeResult) else None


class Retry:
    """Returned by an attempt of `cas` that lost a race: read again and retry."""


RETRY: Final = Retry()


def cas(what: str, attempt: Callable[[], T | Retry]) -> T:
    """Run `attempt` (read, then one conditional transaction) until it does not lose a race,
    at most `CAS_ATTEMPTS` times; ConflictError after that."""
    for tries in range(CAS_ATTEMPTS):
        outcome = attempt()
        if not isinstance(outcome, Retry):
            return outcome
        pause = min(_PAUSE_MOST, _PAUSE_FIRST * 2 ** min(tries, 8))
        time.sleep(random.uniform(0, pause))  # noqa: S311 - jitter, not a secret
    raise ConflictError(
        f"{what}: other coordinators changed the store {CAS_ATTEMPTS} times in a row while this "
        "one tried; retry"
    )


def won(result: TxnResult, main: int, write: str) -> bool:
    """Whether a transaction applied: it succeeded, or an earlier attempt of it (same write id
    `write`) did, as the failure branch's read number `main` shows."""
    return result.succeeded or (result.uncertain and mine(first(result.results[main]), write))


class Layout:
    """The keys of one store, under one prefix."""

    def __init__(self, prefix: bytes) -> None:
        if not prefix.endswith(b"/"):
            raise ValueError("an etcd store prefix ends with /")
        self.root = prefix
        self.states = prefix + b"states/"
        self.fences_revision = prefix + b"fences/revision"
        self.fences_value = prefix + b"fences/value"
        self.fences = prefix + b"fences/"
        self.hsas = prefix + b"hsas/"
        self.audit = prefix + b"audit/"
        self.keys = prefix + b"keys/"
        self.live = prefix + b"keys/live/"
        self.dead = prefix + b"keys/dead/"
        self.deleted = prefix + b"keys/deleted/"
        self.creators = prefix + b"keys/creators/"
        self.proposals = prefix + b"proposals/"
        self.load_marker = prefix + b"load"

    def state(self, version: int) -> bytes:
        return self.states + number(version)

    def hsa(self, host_id: str) -> bytes:
        return self.hsas + hexed(host_id)

    def audit_head(self, host_id: str, log: str) -> bytes:
        return self.audit_host(host_id) + hexed(log)

    def audit_host(self, host_id: str) -> bytes:
        return self.audit + hexed(host_id) + b"/"

    def live_key(self, key_id: str) -> bytes:
        return self.live + hexed(key_id)

    def dead_key(self, key_id: str) -> bytes:
        return self.dead + hexed(key_id)

    def deleted_index(self, deleted_at: int, key_id: str) -> bytes:
        return self.deleted + number(deleted_at) + b"/" + hexed(key_id)

    def creator(self, creator: str) -> bytes:
        return self.creators + b"c" + hexed(creator)

    @staticmethod
    def end(prefix: bytes) -> bytes:
        return prefix_end(prefix)
