"""Verified customer keys on an HSA: the coordinator's key records, checked, cached and written.

The coordinator stores every customer key as a `KeyRecord` (metadata bytes and one exported
key token per backing version) and is not trusted. This module is the only way the key service
reads or writes those records:

- `KeyRecordClient` calls the coordinator's key-record RPCs (GetKey, PutKey, ListKeyRecords,
  DeleteKeyRecord) over mutual TLS as this host, each with a deadline, and maps failures to
  domain errors (`CoordinatorUnreachableError` when it cannot be reached; its subclass
  `CoordinatorNotReachedError` only when the request surely never left: no connection could
  be made, or no coordinator is configured, so the coordinator changed nothing);
- `MetadataVersionFloor` remembers, on disk, the highest `metadata_version` (and the hash of
  its metadata bytes) this HSA or its peers accepted for each key, with a change sequence
  for the peers;
- `KeyCache` verifies records (the writer's signature under the verified head's hosts,
  `keytokens.verify_key_record` with this node's domain keys, the domain id, and the version
  floor), keeps the verified keys in a bounded LRU cache, and signs what it writes.

Invariants:
- a backing key reaches the cache only from a record that verified end to end: it is signed
  by a host of this node's verified head (the signature checked under that host's key from
  the head, over the record's domain, metadata, signer and every token field), its metadata
  names the expected key and this domain, it has exactly one token per backing version and
  every token opens under a domain key this node holds, bound to the record's metadata bytes.
  A coordinator that edits a policy or a state, or swaps, drops or adds tokens, and a removed
  host that writes a record of its own (it still holds older domain-key generations), are
  refused with FAILED_PRECONDITION (and a WARNING with the reason in the log). Two cases are
  UNAVAILABLE instead, because this node may only be behind: tokens under a domain-key
  generation newer than it holds, and a signer it has never seen as a host (a host added in a
  state it has not installed yet); a signer its chain removed is always refused;
- an entry whose record is unchanged at the coordinator is kept without verifying it again,
  but only while its signer is still a host of the head: once a host is removed, no record it
  signed is served from the cache either;
- every record this cache writes is signed by this host (`keytokens.RecordSigner`);
- no rollback: a record whose `metadata_version` is below the highest one accepted for that
  key, or equal to it with other metadata bytes, is refused. The floor is persisted
  (`key_versions.db`, 0600, synchronous writes) so a restarted HSA still refuses it, and
  shared with the peers (`hsa_node.peering`): floors taken from them only ever rise
  (`raise_all`), a key this HSA holds no floor for is accepted only once its peers were asked
  (`FloorSource.learn`, UnavailableError when none answered), a refused rollback is read once
  more before it stands (a peer's push may overtake an honest read), and a change this HSA
  stores is announced to the peers before it is acknowledged (`FloorSource.announce`);
- bounded staleness: an entry is re-read from the coordinator when it is older than `ttl`
  seconds (default 2 s) at its next use. Before that, once it is older than half the TTL, one
  call at a time re-reads it while the others go on using it (still within the TTL), so the
  calls of a busy key do not all wait for the coordinator when the entry expires. While the
  coordinator cannot be reached, cached entries keep being served (the data plane survives a
  control-plane outage), so a change made through another HSA (a disabled key, a narrowed
  policy) reaches this HSA at most `ttl` seconds after the coordinator is reachable again,
  and not before. A key that is not cached cannot be served without the coordinator
  (UNAVAILABLE). A ciphertext that names a newer backing version than the cached one (a
  rotation through another HSA) makes the key be re-read at once (`get_newer`);
- writes (`store`) go to the coordinator with a compare-and-swap on the revision that was read,
  and reach the cache only once the coordinator acknowledged them (it stores durably first);
- the cache holds at most `max_entries` keys and at most `max_bytes` of them by estimate
  (`CachedKey.size`: what the record, the parsed metadata and the policy's decisions take in
  memory, about 4 KB for a key with the default policy, 1.6 MB for one with a 333 KB policy
  written before policies were capped); the least recently used are dropped first, and an
  entry larger than the whole budget is kept alone (it is in use) until the next one comes.
  It never logs or returns key material (`CachedKey.__repr__` leaves it out).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, cast

import grpc
from google.protobuf.message import DecodeError

from domain_core import keytokens, policy
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ConflictError,
    FailedPreconditionError,
    InvalidInputError,
    InvalidKeyTokenError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnknownSignerError,
)
from domain_edge import transport
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node._logging import ThrottledLog
from hsa_node.node import DomainKeys

__all__ = [
    "CALL_DEADLINE_SECONDS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TTL_SECONDS",
    "FLOOR_FILE",
    "CachedKey",
    "CoordinatorNotReachedError",
    "CoordinatorUnreachableError",
    "FloorChange",
    "FloorEntry",
    "FloorSource",
    "KeyCache",
    "KeyRecordClient",
    "KeyRollbackError",
    "MetadataVersionFloor",
    "iso_date",
    "parse_metadata",
]

log = logging.getLogger(__name__)

CALL_DEADLINE_SECONDS: Final = 3.0
# A cached key is re-read with a shorter deadline: if the coordinator is slow, serve the cache.
REFRESH_DEADLINE_SECONDS: Final = 1.0
DEFAULT_TTL_SECONDS: Final = 2.0
# Past this fraction of the TTL, one call re-reads a key while the others go on using it.
REFRESH_AHEAD_FRACTION: Final = 0.5
DEFAULT_MAX_ENTRIES: Final = 100_000
# What the cache may hold, by `CachedKey.size`: 100,000 keys with the default policy fit
# (about 4 KB each), about 2,000 with the largest policy and description allowed.
DEFAULT_MAX_BYTES: Final = 512 * 1024 * 1024
# `CachedKey.size` = ENTRY_BYTES + RECORD_BYTES_FACTOR x the record's size + PRINCIPAL_BYTES per
# principal in the policy's decisions. Fitted to the resident memory of entries built in one
# process (CPython 3.11, upb protobuf): 3.6 KB with the default policy, 20 KB with an 8 KiB
# description, 164 KB with a 32 KiB policy of 400 principals, 1.54 MB with 64 grants of 64
# principals; the estimate is within 15 % of each.
ENTRY_BYTES: Final = 3 * 1024
RECORD_BYTES_FACTOR: Final = 2  # the record's bytes, and the metadata parsed from them
PRINCIPAL_BYTES: Final = 220  # a str key of the decisions, its slot, beside its name's bytes
# After the coordinator failed to answer, cached keys are served without asking it again for
# this long, so that a paused coordinator does not add its deadline to every call.
OUTAGE_HOLD_SECONDS: Final = 2.0
FLOOR_FILE: Final = "key_versions.db"
_FETCH_LOCKS: Final = 64
_SHOWN: Final = 200


class CoordinatorUnreachableError(UnavailableError):
    """The coordinator did not answer a key-record call (down, paused, or refusing us).

    A write may still have reached it (a deadline passed, a connection was lost mid-call)."""


class CoordinatorNotReachedError(CoordinatorUnreachableError):
    """The key-record call never left this HSA (no connection, or no coordinator configured):
    the coordinator changed nothing."""


def iso_date(timestamp: int) -> str:
    """A unix time as an ISO 8601 UTC date and time, for messages."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_metadata(record: keys_pb2.KeyRecord) -> keys_pb2.KeyMetadata | None:
    """The metadata a record carries, or None if its bytes do not parse."""
    metadata = keys_pb2.KeyMetadata()
    try:
        metadata.ParseFromString(record.metadata)
    except DecodeError:
        return None
    return metadata


def _metadata_digest(record: keys_pb2.KeyRecord) -> bytes:
    return hashlib.sha256(record.metadata).digest()


# --- the coordinator's key-record RPCs -----------------------------------------------------


def _rpc_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = cast(Any, error).code() if hasattr(error, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def _rpc_details(error: grpc.RpcError) -> str:
    details = cast(Any, error).details() if hasattr(error, "details") else None
    return str(details or "")[:_SHOWN]


class KeyRecordClient:
    """The coordinator's key-record calls, as this host, each with a deadline.

    Failures become domain errors: NOT_FOUND -> NotFoundError (None for `get`), ABORTED ->
    ConflictError, ALREADY_EXISTS -> AlreadyExistsError, FAILED_PRECONDITION ->
    FailedPreconditionError, INVALID_ARGUMENT -> InvalidInputError, RESOURCE_EXHAUSTED ->
    ResourceExhaustedError (a quota), PERMISSION_DENIED -> UnavailableError (the coordinator
    refuses this host, e.g. while it is being removed: use another HSA), anything else
    (unreachable, deadline exceeded, internal) -> CoordinatorUnreachableError, or
    CoordinatorNotReachedError when gRPC says no connection was made (nothing was sent).
    Nothing is retried here: callers decide (only idempotent calls may be retried).
    """

    def __init__(
        self,
        channel: grpc.Channel | None,
        address: str,
        *,
        deadline: float = CALL_DEADLINE_SECONDS,
    ) -> None:
        """`channel` None: no coordinator is configured, and every call is unreachable."""
        self._stub = (
            services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            if channel is not None
            else None
        )
        self._address = address
        self._deadline = deadline

    @property
    def address(self) -> str:
        """The coordinator's address, for messages."""
        return self._address

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        if self._stub is None:
            raise CoordinatorNotReachedError(
                f"no coordinator is configured on this HSA to call {method}"
            )
        try:
            return getattr(self._stub, method)(
                request, timeout=self._deadline if timeout is None else timeout
            )
        except grpc.RpcError as error:
            raise self._error(method, error) from None

    def _error(self, method: str, error: grpc.RpcError) -> Exception:
        code, details = _rpc_code(error), _rpc_details(error)
        if code is grpc.StatusCode.NOT_FOUND:
            return NotFoundError(details or "not found at the coordinator")
        if code is grpc.StatusCode.ABORTED:
            return ConflictError(details or "the record changed meanwhile")
        if code is grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExistsError(details or "the key exists already")
        if code is grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPreconditionError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInputError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhaustedError(f"the coordinator refused {method}: {details}")
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return UnavailableError(
                f"the coordinator refused {method} from this HSA ({details}): use another HSA"
            )
        name = code.name if code is not None else "ERROR"
        if transport.never_sent(code, details):
            return CoordinatorNotReachedError(
                f"the coordinator at {self._address} cannot be reached to call {method} "
                f"({name}: {details})"
            )
        return CoordinatorUnreachableError(
            f"the coordinator at {self._address} did not answer {method} ({name}: {details})"
        )

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        """The stored record of `key_id` with its revision, or None if there is none."""
        try:
            record: keys_pb2.KeyRecord = self._call(
                "GetKey", services_pb2.GetKeyRequest(key_id=key_id), timeout
            )
        except NotFoundError:
            return None
        return record

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        """Store `record` if the stored revision is `expected_revision` (0: create); the new
        revision, once the coordinator committed it."""
        response: services_pb2.PutKeyResponse = self._call(
            "PutKey",
            services_pb2.PutKeyRequest(record=record, expected_revision=expected_revision),
            None,
        )
        return int(response.revision)

    def list(self, limit: int, page_token: str = "") -> tuple[list[keys_pb2.KeyRecord], str]:
        """One page of stored records (with revisions) and the token of the next page."""
        response: services_pb2.ListKeyRecordsResponse = self._call(
            "ListKeyRecords",
            services_pb2.ListKeyRecordsRequest(limit=limit, page_token=page_token),
            None,
        )
        return list(response.records), response.next_page_token

    def delete(self, key_id: str, expected_revision: int) -> None:
        """Delete a key whose deletion date has passed, if it is still at `expected_revision`."""
        self._call(
            "DeleteKeyRecord",
            services_pb2.DeleteKeyRecordRequest(key_id=key_id, expected_revision=expected_revision),
            None,
        )


# --- the version floor ---------------------------------------------------------------------


_FLOOR_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS floors (
    key_id TEXT PRIMARY KEY,
    metadata_version INTEGER NOT NULL,
    metadata_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS floor_meta (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_cursors (
    host_id TEXT PRIMARY KEY,
    epoch BLOB NOT NULL,
    seq INTEGER NOT NULL
);
"""
# Added after the first release: a file made before gains them on open, and its rows get
# sequence numbers in their insertion order. `origin` is empty for a floor this host's
# processes set, else the peer it came from.
_SEQ_COLUMN: Final = "ALTER TABLE floors ADD COLUMN seq INTEGER NOT NULL DEFAULT 0"
_ORIGIN_COLUMN: Final = "ALTER TABLE floors ADD COLUMN origin TEXT NOT NULL DEFAULT ''"
_SEQ_INDEX: Final = "CREATE INDEX IF NOT EXISTS floors_by_seq ON floors (seq)"
_EPOCH_BYTES: Final = 16
_MARK_COMPLETE: Final = (
    "INSERT INTO floor_meta (name, value) VALUES ('complete', x'01') "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


class KeyRollbackError(FailedPreconditionError):
    """A record older than the newest one this HSA accepted for the key (a rollback)."""


class FloorChange(enum.Enum):
    """What offering a peer's floor did to this HSA's floor of that key."""

    RAISED = "raised"
    """It was higher (or this HSA had none): it is the floor now."""
    SAME = "same"
    """It is this HSA's floor already."""
    LOWER = "lower"
    """This HSA's floor is higher: nothing changed."""
    CONFLICT = "conflict"
    """Same version, other metadata hash: one of the two records is not genuine; kept ours."""


@dataclass(frozen=True)
class FloorEntry:
    """One key's floor, with the change sequence that last set it in this HSA's table."""

    key_id: str
    metadata_version: int
    metadata_hash: bytes
    seq: int


class MetadataVersionFloor:
    """The highest metadata version (and its metadata hash) accepted per key, on disk.

    One SQLite file (WAL, synchronous=FULL, 0600), so that the floor survives a restart and a
    coordinator cannot roll a key back to an older record by waiting for the HSA to restart.
    Every process of one HSA (the main process and its key service workers) opens the same
    file, so a floor any of them raised holds for all.

    For peers (`hsa_node.peering`): every change gets the next number of a change sequence,
    so "the floors changed after change S" is one indexed range; the table has a random
    epoch (made when the file is), so a peer that counted in another incarnation of the file
    (deleted, restored) starts again from 0; `peer_cursors` remembers how far this HSA read
    each peer's table, and `floor_meta` carries whether the table is complete (`complete`)
    and what the main process tells its workers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._closed = False
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.executescript(_FLOOR_SCHEMA)
            with self._transaction() as db:
                columns = {row[1] for row in db.execute("PRAGMA table_info(floors)")}
                if "seq" not in columns:
                    db.execute(_SEQ_COLUMN)
                    db.execute("UPDATE floors SET seq = rowid")
                    if db.execute("SELECT 1 FROM floors LIMIT 1").fetchone() is not None:
                        # A table kept before floors were shared: this HSA's whole history.
                        db.execute(_MARK_COMPLETE)
                if "origin" not in columns:
                    db.execute(_ORIGIN_COLUMN)
                db.execute(_SEQ_INDEX)
                db.execute(
                    "INSERT OR IGNORE INTO floor_meta (name, value) VALUES ('epoch', ?)",
                    (os.urandom(_EPOCH_BYTES),),
                )
                row = db.execute("SELECT value FROM floor_meta WHERE name = 'epoch'").fetchone()
            self.epoch = bytes(row[0])
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"MetadataVersionFloor({str(self.path)!r})"

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the version floor is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the version floor is closed")
            yield self._db

    def highest(self, key_id: str) -> tuple[int, bytes] | None:
        """(metadata version, metadata hash) of the newest record accepted for `key_id`."""
        with self._reading() as db:
            row = db.execute(
                "SELECT metadata_version, metadata_hash FROM floors WHERE key_id = ?", (key_id,)
            ).fetchone()
        return (int(row[0]), bytes(row[1])) if row is not None else None

    def admit(self, key_id: str, version: int, digest: bytes, *, remember: bool = True) -> None:
        """Refuse a record older than (or forked from) the newest accepted one; else, with
        `remember`, make it the newest. KeyRollbackError (an older record) or
        FailedPreconditionError (same version, other bytes) on a refusal."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT metadata_version, metadata_hash FROM floors WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is not None:
                highest, known = int(row[0]), bytes(row[1])
                if version < highest:
                    raise KeyRollbackError(
                        f"the coordinator returned an older record of key {key_id} (metadata "
                        f"version {version}) than this HSA accepted before (version {highest}); "
                        "the coordinator may be compromised or restored from an old backup"
                    )
                if version == highest:
                    if known != digest:
                        raise FailedPreconditionError(
                            f"the coordinator returned another record of key {key_id} with the "
                            f"same metadata version {version} as one this HSA accepted; the "
                            "coordinator may be compromised"
                        )
                    return
            if remember:
                self._write(db, key_id, version, digest)

    @staticmethod
    def _write(
        db: sqlite3.Connection, key_id: str, version: int, digest: bytes, origin: str = ""
    ) -> None:
        db.execute(
            "INSERT INTO floors (key_id, metadata_version, metadata_hash, seq, origin) "
            "VALUES (?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM floors), ?) "
            "ON CONFLICT (key_id) DO UPDATE SET "
            "metadata_version = excluded.metadata_version, "
            "metadata_hash = excluded.metadata_hash, seq = excluded.seq, "
            "origin = excluded.origin",
            (key_id, version, digest, origin),
        )

    def raise_to(self, key_id: str, version: int, digest: bytes, origin: str) -> FloorChange:
        """Take peer `origin`'s floor of `key_id` by the max rule: never lower a floor, and
        keep this HSA's own on a conflict (same version, other hash: the caller logs it)."""
        return self.raise_all([(key_id, version, digest)], origin)[0]

    def raise_all(self, floors: Sequence[tuple[str, int, bytes]], origin: str) -> list[FloorChange]:
        """`raise_to` for each (key id, version, hash) of `floors`, in one transaction."""
        changes = []
        with self._transaction() as db:
            for key_id, version, digest in floors:
                row = db.execute(
                    "SELECT metadata_version, metadata_hash FROM floors WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
                if row is not None and version <= int(row[0]):
                    if version < int(row[0]):
                        changes.append(FloorChange.LOWER)
                    elif bytes(row[1]) == digest:
                        changes.append(FloorChange.SAME)
                    else:
                        changes.append(FloorChange.CONFLICT)
                    continue
                self._write(db, key_id, version, digest, origin)
                changes.append(FloorChange.RAISED)
        return changes

    # --- for peers -------------------------------------------------------------------------

    def sequence(self) -> int:
        """The number of the newest change in this table (0 when it is empty)."""
        with self._reading() as db:
            row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM floors").fetchone()
        return int(row[0])

    def changes_after(
        self, after_seq: int, limit: int, *, local_only: bool = False
    ) -> tuple[list[FloorEntry], bool]:
        """The floors changed after change `after_seq`, oldest change first, at most `limit`;
        and whether there are more. With `local_only`, only floors this host's processes set
        (not those taken from peers)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT key_id, metadata_version, metadata_hash, seq FROM floors "
                "WHERE seq > ? AND (? = 0 OR origin = '') ORDER BY seq LIMIT ?",
                (after_seq, int(local_only), limit + 1),
            ).fetchall()
        entries = [FloorEntry(str(r[0]), int(r[1]), bytes(r[2]), int(r[3])) for r in rows]
        return entries[:limit], len(entries) > limit

    def floors_of(self, key_ids: Sequence[str]) -> list[FloorEntry]:
        """The floors of those of `key_ids` that have one."""
        rows = []
        with self._reading() as db:
            for key_id in dict.fromkeys(key_ids):
                row = db.execute(
                    "SELECT key_id, metadata_version, metadata_hash, seq FROM floors "
                    "WHERE key_id = ?",
                    (key_id,),
                ).fetchone()
                if row is not None:
                    rows.append(row)
        return [FloorEntry(str(r[0]), int(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    def cursor(self, host_id: str) -> tuple[bytes, int]:
        """(epoch, sequence) up to which this HSA took peer `host_id`'s floors (empty, 0)."""
        with self._reading() as db:
            row = db.execute(
                "SELECT epoch, seq FROM peer_cursors WHERE host_id = ?", (host_id,)
            ).fetchone()
        return (bytes(row[0]), int(row[1])) if row is not None else (b"", 0)

    def set_cursor(self, host_id: str, epoch: bytes, seq: int) -> None:
        """Remember that this HSA took peer `host_id`'s floors up to change `seq` of `epoch`."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO peer_cursors (host_id, epoch, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (host_id) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
                (host_id, epoch, seq),
            )

    @property
    def complete(self) -> bool:
        """Whether this table holds the floors of the domain's whole history: it was made at
        genesis (`hsm-domain init` says so), kept from before floors were shared, or taken in
        full from a peer whose table was complete. A new or wiped table is not."""
        return self.meta("complete") == b"\x01"

    def mark_complete(self) -> None:
        """Record that this table now holds the domain's whole history (see `complete`)."""
        with self._transaction() as db:
            db.execute(_MARK_COMPLETE)

    def meta(self, name: str) -> bytes | None:
        """A value the main process left for its workers (None if unset)."""
        with self._reading() as db:
            row = db.execute("SELECT value FROM floor_meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def set_meta(self, values: Mapping[str, bytes]) -> None:
        """Set values for the workers (one transaction)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO floor_meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def close(self) -> None:
        """Release the file. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()


# --- verified keys -------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedKey:
    """A customer key whose record verified: metadata, backing keys by version, the record.

    Treat `metadata` and `record` as read-only (copy before changing them).
    """

    key_id: str
    metadata: keys_pb2.KeyMetadata
    backing_keys: Mapping[int, bytes]
    record: keys_pb2.KeyRecord
    checked_at: float
    """When (the cache's monotonic clock) the coordinator last confirmed this record."""
    grants: Mapping[str, frozenset[int]] = field(init=False, repr=False, compare=False)
    """The key policy's decisions (`policy.granted_operations`), made once per entry."""
    size: int = field(init=False, repr=False, compare=False)
    """What this entry takes in memory, estimated from the record and the decisions (bytes)."""

    def __post_init__(self) -> None:
        grants = policy.granted_operations(self.metadata.policy)
        object.__setattr__(self, "grants", grants)
        object.__setattr__(
            self,
            "size",
            ENTRY_BYTES
            + RECORD_BYTES_FACTOR * self.record.ByteSize()
            + PRINCIPAL_BYTES * len(grants),
        )

    @property
    def revision(self) -> int:
        """The coordinator's revision of the record, for compare-and-swap."""
        return int(self.record.revision)

    @property
    def current_version(self) -> int:
        """The backing-key version new ciphertexts use."""
        return int(self.metadata.current_backing_version)

    def __repr__(self) -> str:
        return (
            f"CachedKey({self.key_id}, metadata version {self.metadata.metadata_version}, "
            f"backing versions {sorted(self.backing_keys)}, revision {self.revision})"
        )


def _same_content(a: keys_pb2.KeyRecord, b: keys_pb2.KeyRecord) -> bool:
    """Whether two records carry the same metadata bytes, tokens, signer and signature
    (revisions aside)."""
    return (
        a.metadata == b.metadata
        and a.signer_host_id == b.signer_host_id
        and a.signature == b.signature
        and list(a.tokens) == list(b.tokens)
    )


def _diagnose(
    record: keys_pb2.KeyRecord,
    key_id: str,
    domain_id: str,
    keys: DomainKeys,
    signature_error: str = "",
) -> str:
    """Why a record does not verify, for the log (the caller gets no detail): the signature
    failure, if any, and what else is wrong with the record."""
    reason = _diagnose_content(record, key_id, domain_id, keys)
    if not signature_error:
        return reason
    if reason == "unknown":
        return signature_error
    return f"{reason}; and {signature_error}"


def _diagnose_content(
    record: keys_pb2.KeyRecord, key_id: str, domain_id: str, keys: DomainKeys
) -> str:
    metadata = parse_metadata(record)
    if metadata is None:
        return "its metadata does not parse"
    if metadata.key_id != key_id:
        return f"its metadata names key {metadata.key_id[:_SHOWN]!r}"
    if metadata.domain_id != domain_id:
        return f"its metadata names domain {metadata.domain_id[:_SHOWN]!r}"
    versions = sorted(t.backing_version for t in record.tokens)
    if versions != list(range(1, metadata.current_backing_version + 1)):
        return (
            f"it holds tokens for backing versions {versions[:20]}, not 1.."
            f"{metadata.current_backing_version}"
        )
    for token in record.tokens:
        if token.key_id != key_id:
            return f"a token names key {token.key_id[:_SHOWN]!r}"
        try:
            keytokens.unwrap_backing_key(token, keys.keys, record.metadata, key_id)
        except InvalidKeyTokenError:
            return (
                f"the token of backing version {token.backing_version} (domain key generation "
                f"{token.domain_key_generation}) does not open with these metadata bytes"
            )
    return "unknown"


class FloorSource(Protocol):
    """Where an HSA learns the floors of keys it has none for: its peers
    (`hsa_node.peering`)."""

    def learn(self, key_ids: Sequence[str]) -> None:
        """Raise this HSA's floors of `key_ids` to what its peers hold; UnavailableError
        when no peer answered (then a key without a local floor must not be served)."""

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Tell the peers now of a floor this process just set (best effort, short deadline;
        never raises: the floor is pushed again in the background)."""


class KeyCache:
    """Verified keys by id (LRU, bounded by entries and by bytes), read through from the
    coordinator; see the module invariants."""

    def __init__(
        self,
        *,
        domain_id: str,
        domain_keys: Callable[[], DomainKeys],
        records: KeyRecordClient,
        floor: MetadataVersionFloor,
        signer: keytokens.RecordSigner,
        peer_floors: FloorSource | None = None,
        ttl: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`peer_floors`: where to learn the floor of a key this HSA has none for before it is
        accepted (every HSA process has one; None only outside an HSA, as in benchmarks).
        `max_bytes`: the budget of the entries' estimated sizes (`CachedKey.size`)."""
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be at least 1")
        if signer.domain_id != domain_id:
            raise ValueError("the record signer is for another domain")
        self._signer = signer
        self._domain_id = domain_id
        self._domain_keys = domain_keys
        self._records = records
        self._floor = floor
        self._peer_floors = peer_floors
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, CachedKey] = OrderedDict()
        self._bytes = 0  # the sum of the entries' sizes
        self._lock = threading.Lock()
        self._fetch_locks = [threading.Lock() for _ in range(_FETCH_LOCKS)]
        self._outage_until = 0.0
        self._throttled = ThrottledLog(log)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def cached_bytes(self) -> int:
        """The estimated size of every entry held (at most `max_bytes`, unless one entry is
        larger than that on its own)."""
        with self._lock:
            return self._bytes

    @property
    def records(self) -> KeyRecordClient:
        """The coordinator's key-record calls this cache reads through."""
        return self._records

    @property
    def domain_id(self) -> str:
        """The domain whose keys this cache holds."""
        return self._domain_id

    @property
    def signer(self) -> keytokens.RecordSigner:
        """How this host signs the key records it writes (re-wrap signs with it too)."""
        return self._signer

    def domain_keys(self) -> DomainKeys:
        """The node's domain keys now (UnavailableError when it is not serving)."""
        return self._domain_keys()

    # --- the entries ---------------------------------------------------------------------

    def _peek(self, key_id: str) -> CachedKey | None:
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._entries.move_to_end(key_id)
            return entry

    def _insert(self, entry: CachedKey) -> CachedKey:
        with self._lock:
            self._put(entry)
            self._entries.move_to_end(entry.key_id)
            while len(self._entries) > 1 and (
                len(self._entries) > self._max_entries or self._bytes > self._max_bytes
            ):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size
        return entry

    def _put(self, entry: CachedKey) -> None:
        """Hold `entry` in its key's place, counting its size (the caller holds the lock)."""
        previous = self._entries.get(entry.key_id)
        if previous is not None:
            self._bytes -= previous.size
        self._entries[entry.key_id] = entry
        self._bytes += entry.size

    def cached(self, key_id: str) -> CachedKey | None:
        """The cached entry of `key_id` as it is (however old), or None."""
        return self._peek(key_id)

    def forget(self, key_id: str) -> None:
        """Drop one key (deleted, or unknown to the coordinator)."""
        with self._lock:
            dropped = self._entries.pop(key_id, None)
            if dropped is not None:
                self._bytes -= dropped.size

    def mark_stale(self, key_id: str) -> None:
        """Make the next use of `key_id` re-read it (it changed at the coordinator), while
        keeping the entry to serve if the coordinator becomes unreachable meanwhile."""
        with self._lock:
            entry = self._entries.get(key_id)
            if entry is not None:
                self._put(replace(entry, checked_at=float("-inf")))

    def clear(self) -> None:
        """Drop every key (this host stopped serving)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # --- reading -------------------------------------------------------------------------

    def get(self, key_id: str, *, fresh: bool = False) -> CachedKey:
        """The verified key `key_id`: from the cache while fresh, else from the coordinator.

        With `fresh` the coordinator is always asked (writes need the current revision) and
        CoordinatorUnreachableError is raised if it does not answer. Without it, a cached key
        is served while the coordinator is unreachable. NotFoundError for a key the
        coordinator does not hold; FailedPreconditionError for a record that does not verify.
        """
        entry = self._peek(key_id)
        if entry is not None and not fresh:
            age = self._clock() - entry.checked_at
            if age < self._ttl:
                if age < self._ttl * REFRESH_AHEAD_FRACTION:
                    return entry
                return self._refresh_ahead(key_id, entry)
        with self._fetch_locks[hash(key_id) % _FETCH_LOCKS]:
            entry = self._peek(key_id)
            now = self._clock()
            if (
                entry is not None
                and not fresh
                and (now - entry.checked_at < self._ttl or now < self._outage_until)
            ):
                return entry
            return self._read(key_id, entry, fresh=fresh)

    def _refresh_ahead(self, key_id: str, entry: CachedKey) -> CachedKey:
        """Re-read a key past half its TTL, by one caller at a time, without making the others
        wait: they go on using the entry, which is still within its TTL. So the calls of a busy
        key do not all queue for the coordinator when the entry expires."""
        lock = self._fetch_locks[hash(key_id) % _FETCH_LOCKS]
        if self._clock() < self._outage_until or not lock.acquire(blocking=False):
            return entry
        try:
            current = self._peek(key_id)
            if current is not None and current is not entry:
                return current  # re-read (or changed) by another call meanwhile
            return self._read(key_id, current, fresh=False)
        finally:
            lock.release()

    def _read(self, key_id: str, entry: CachedKey | None, *, fresh: bool) -> CachedKey:
        """Read `key_id` from the coordinator (under its fetch lock) and cache it verified;
        `entry` is what the cache holds, served if the coordinator does not answer."""
        timeout = REFRESH_DEADLINE_SECONDS if entry is not None and not fresh else None
        try:
            record = self._records.get(key_id, timeout=timeout)
        except CoordinatorUnreachableError as error:
            self._outage_until = self._clock() + OUTAGE_HOLD_SECONDS
            if fresh:
                raise
            if entry is not None:
                self._throttled.warning(f"serving cached keys: {error}")
                return entry
            raise UnavailableError(
                f"key {key_id} is not cached on this HSA and the coordinator is "
                "unreachable: retry on another HSA or later"
            ) from None
        self._outage_until = 0.0
        if record is None:
            self.forget(key_id)
            raise NotFoundError(f"key {key_id} does not exist")
        if (
            entry is not None
            and _same_content(record, entry.record)
            and record.signer_host_id in self._domain_keys().host_keys
        ):
            return self._insert(replace(entry, record=record, checked_at=self._clock()))
        try:
            metadata, backing_keys = self.verify(record, key_id)
        except KeyRollbackError:
            # A peer may have raised the floor while this read was under way (an honest
            # coordinator answered before the newer record was stored): read once more.
            record = self._records.get(key_id)
            if record is None:
                self.forget(key_id)
                raise NotFoundError(f"key {key_id} does not exist") from None
            metadata, backing_keys = self.verify(record, key_id)
        return self._insert(
            CachedKey(
                key_id=key_id,
                metadata=metadata,
                backing_keys=backing_keys,
                record=record,
                checked_at=self._clock(),
            )
        )

    def get_newer(self, key_id: str, backing_version: int) -> CachedKey:
        """The key re-read from the coordinator, for a ciphertext that names a backing version
        newer than the cached one (the key was rotated through another HSA within the TTL).

        UnavailableError when the coordinator cannot be reached (the version may exist).
        """
        if self._clock() >= self._outage_until:
            try:
                return self.get(key_id, fresh=True)
            except CoordinatorUnreachableError:
                self._outage_until = self._clock() + OUTAGE_HOLD_SECONDS
        raise UnavailableError(
            f"the ciphertext names backing version {backing_version} of key {key_id}, newer "
            "than this HSA has cached, and the coordinator is unreachable: retry on another "
            "HSA or later"
        )

    def verify(
        self, record: keys_pb2.KeyRecord, key_id: str, *, remember: bool = True
    ) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
        """Verify a record of `key_id` end to end and against the version floor.

        First the signature: the signer must be a host of this node's verified head and the
        signature must verify under that host's key from the head; then the tokens, the
        metadata and the floor. With `remember` the record becomes the key's floor when it is
        newer. Raises FailedPreconditionError for a record that does not verify (logged at
        WARNING with the reason), UnavailableError when this node may only be behind: the
        record is sealed under a domain key generation newer than it holds, or signed by a
        host it has never seen (it is catching up).
        """
        keys = self._domain_keys()
        try:
            keytokens.verify_key_record_signature(record, self._domain_id, keys.host_keys)
        except UnknownSignerError:
            raise self._unknown_signer(record, key_id, keys) from None
        except BadSignatureError as error:
            raise self._refusal(record, key_id, keys, signature_error=error.message) from None
        try:
            metadata, backing_keys = keytokens.verify_key_record(record, keys.keys, key_id)
            if metadata.domain_id != self._domain_id:
                raise InvalidKeyTokenError()
        except InvalidKeyTokenError:
            raise self._refusal(record, key_id, keys) from None
        if self._peer_floors is not None and self._floor.highest(key_id) is None:
            self._peer_floors.learn([key_id])  # no floor here yet: what do the peers hold?
        try:
            self._floor.admit(
                key_id, int(metadata.metadata_version), _metadata_digest(record), remember=remember
            )
        except FailedPreconditionError as error:
            self._throttled.warning(f"refused the stored record of key {key_id}: {error.message}")
            raise
        return metadata, backing_keys

    def _catching_up(
        self, record: keys_pb2.KeyRecord, key_id: str, keys: DomainKeys
    ) -> UnavailableError | None:
        """The error for a record sealed under a generation newer than this node holds."""
        newest = max((t.domain_key_generation for t in record.tokens), default=0)
        if newest <= keys.generation or newest in keys.keys:
            return None
        self._throttled.warning(
            f"the record of key {key_id} is sealed under domain key generation "
            f"{newest}, newer than this HSA holds ({keys.generation}); if no domain "
            "state brings that generation, the coordinator may be compromised"
        )
        return UnavailableError(
            f"key {key_id} is sealed under domain key generation {newest}, newer than "
            f"this HSA holds ({keys.generation}); it is catching up: retry"
        )

    def _unknown_signer(
        self, record: keys_pb2.KeyRecord, key_id: str, keys: DomainKeys
    ) -> UnavailableError | FailedPreconditionError:
        """The error for a record whose signer is not a host of the verified head: refused
        when the signer is a host this node's chain removed, or when there is no signature;
        UNAVAILABLE (catching up) when the record may come from a state this node lacks."""
        signer = record.signer_host_id
        if signer and record.signature and signer not in keys.former_hosts:
            behind = self._catching_up(record, key_id, keys)
            if behind is not None:
                return behind
            self._throttled.warning(
                f"the record of key {key_id} is signed by {signer[:_SHOWN]!r}, which is not a "
                "host of the domain state this HSA holds; if no domain state adds it, the "
                "coordinator may be compromised"
            )
            return UnavailableError(
                f"key {key_id} was written by host {signer[:_SHOWN]!r}, which this HSA does not "
                "know as a host yet; it is catching up: retry"
            )
        if signer in keys.former_hosts:
            why = (
                f"it is signed by {signer}, which the domain removed: no record a removed host "
                "writes is accepted"
            )
        else:
            why = "it is not signed"
        reason = _diagnose(record, key_id, self._domain_id, keys, why)
        self._throttled.warning(
            f"the stored record of key {key_id} does not verify ({reason}); the coordinator "
            "may be compromised"
        )
        return FailedPreconditionError(
            f"the stored record of key {key_id} does not verify; the coordinator may be compromised"
        )

    def _refusal(
        self,
        record: keys_pb2.KeyRecord,
        key_id: str,
        keys: DomainKeys,
        *,
        signature_error: str = "",
    ) -> UnavailableError | FailedPreconditionError:
        behind = self._catching_up(record, key_id, keys)
        if behind is not None:
            return behind
        generations = {t.domain_key_generation for t in record.tokens}
        missing = sorted(g for g in generations if g not in keys.keys)
        if missing and missing[0] < min(keys.keys):
            self._throttled.warning(
                f"the record of key {key_id} needs domain key generation {missing[0]}, which "
                "this HSA no longer holds (the domain retired it before the record was "
                "re-wrapped)"
            )
            return FailedPreconditionError(
                f"key {key_id} is sealed under domain key generation {missing[0]}, which the "
                "domain has retired; it cannot be opened"
            )
        reason = _diagnose(record, key_id, self._domain_id, keys, signature_error)
        self._throttled.warning(
            f"the stored record of key {key_id} does not verify ({reason}); the coordinator "
            "may be compromised"
        )
        return FailedPreconditionError(
            f"the stored record of key {key_id} does not verify; the coordinator may be compromised"
        )

    # --- writing -------------------------------------------------------------------------

    def store(
        self,
        metadata: keys_pb2.KeyMetadata,
        backing_keys: Mapping[int, bytes],
        expected_revision: int,
    ) -> CachedKey:
        """Seal a record under the current domain key generation, sign it as this host, and put
        it at the coordinator with a compare-and-swap on `expected_revision` (0: create); cache
        it once stored.

        Raises ConflictError (the record changed meanwhile), AlreadyExistsError,
        NotFoundError (deleted meanwhile) or CoordinatorUnreachableError; nothing is cached
        then.
        """
        keys = self._domain_keys()
        record = keytokens.seal_record(
            metadata, backing_keys, keys.keys[keys.generation], keys.generation, signer=self._signer
        )
        record.revision = self._records.put(record, expected_revision)
        stored = keys_pb2.KeyMetadata.FromString(record.metadata)
        digest = _metadata_digest(record)
        self._floor.admit(stored.key_id, int(stored.metadata_version), digest)
        if self._peer_floors is not None and expected_revision != 0:
            # A change (a grant revoked, a key disabled) must outlive this HSA: tell the peers
            # before acknowledging it (best effort, short deadline; gossip catches up later).
            self._peer_floors.announce(stored.key_id, int(stored.metadata_version), digest)
        return self._insert(
            CachedKey(
                key_id=stored.key_id,
                metadata=stored,
                backing_keys=dict(backing_keys),
                record=record,
                checked_at=self._clock(),
            )
        )
