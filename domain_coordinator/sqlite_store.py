"""`CoordinatorStore` on one SQLite file: WAL journal, synchronous=FULL, one lock.

Invariants (on top of those of `domain_coordinator.store`):
- the database file is created 0600 before SQLite opens it (it holds nothing secret, but
  nothing anyone else should edit either); WAL and shared-memory files inherit its mode;
- every write runs in its own `BEGIN IMMEDIATE` transaction and is committed, with
  `synchronous=FULL`, before the method returns: an acknowledged write survives a crash or a
  power loss;
- compare-and-swap checks (state version, key revision, one approval or cancel vote per
  operator) and the per-creator key count run inside the same transaction as the write they
  guard, so they hold across threads and processes;
- a deleted key record stays in the `keys` table as a tombstone (`deleted_at` set) until it
  is purged; nothing that reads live keys sees it, and its key id cannot be created again;
- a proposal's proposer, base version and base state hash are columns beside its bytes
  (filled from the bytes for rows of older files when the file is opened), indexed with its
  state, expiry and closing time, so that counting, listing a page, finding what is due and
  purging never read the bytes of proposals they do not return;
- one connection shared by all threads, serialised by a lock.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from google.protobuf.message import DecodeError

from domain_coordinator.store import (
    AuditHeadRecord,
    DeletedKey,
    HsaRecord,
    KeyEntry,
    PendingSummary,
    ProposalRecord,
    ProposalState,
    iso_date,
)
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    ResourceExhaustedError,
)
from domain_proto import domain_pb2

# 2: key records have tombstones (`deleted_at`) and a `creator`; a schema-1 file is upgraded
# on open, and an older coordinator (which would serve tombstones as keys) refuses the file.
# 3: proposals carry their proposer, base and closing time in columns (the sweeper and the
# caps read them); an older coordinator would store proposals without them, so it refuses the
# file.
SCHEMA_VERSION = 3
_UPGRADABLE_SCHEMAS = frozenset({"1", "2"})
_BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS states (
    version INTEGER PRIMARY KEY,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS proposals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    proposal_id BLOB NOT NULL UNIQUE,
    proposal BLOB NOT NULL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    applied_version INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS proposals_by_state ON proposals (state, seq);
CREATE TABLE IF NOT EXISTS approvals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    proposal_id BLOB NOT NULL REFERENCES proposals (proposal_id),
    operator_id TEXT NOT NULL,
    approval BLOB NOT NULL,
    UNIQUE (proposal_id, operator_id)
);
CREATE TABLE IF NOT EXISTS cancel_votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    proposal_id BLOB NOT NULL REFERENCES proposals (proposal_id),
    operator_id TEXT NOT NULL,
    vote BLOB NOT NULL,
    UNIQUE (proposal_id, operator_id)
);
CREATE TABLE IF NOT EXISTS hsas (
    host_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    state_hash BLOB NOT NULL DEFAULT x'',
    reported_at INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    revision INTEGER NOT NULL
);
"""

# Tables added after schema 1 was first released (cancel_votes) are created by the
# idempotent script above when a file made by an older coordinator is opened; an older
# coordinator ignores them.
# Columns added after schema 1 was first released, each with a default, so that a file made
# by an older coordinator gains them on open (ALTER TABLE ... ADD COLUMN) and an older
# coordinator still reads and writes a file that has them: the schema number stays 1.
_ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("hsas", "version", "INTEGER NOT NULL DEFAULT 0"),
    ("hsas", "state_hash", "BLOB NOT NULL DEFAULT x''"),
    ("hsas", "reported_at", "INTEGER NOT NULL DEFAULT 0"),
    ("keys", "creator", "TEXT NOT NULL DEFAULT ''"),
    ("keys", "deleted_at", "INTEGER NOT NULL DEFAULT 0"),
    ("proposals", "proposer", "TEXT NOT NULL DEFAULT ''"),
    ("proposals", "base_version", "INTEGER NOT NULL DEFAULT 0"),
    ("proposals", "base_state_hash", "BLOB NOT NULL DEFAULT x''"),
    ("proposals", "closed_at", "INTEGER NOT NULL DEFAULT 0"),
)
# After the added columns exist.
_INDEXES = """
CREATE INDEX IF NOT EXISTS keys_by_creator ON keys (creator, deleted_at);
CREATE INDEX IF NOT EXISTS keys_by_deletion ON keys (deleted_at);
CREATE INDEX IF NOT EXISTS proposals_by_proposer ON proposals (proposer, state);
CREATE INDEX IF NOT EXISTS proposals_by_expiry ON proposals (state, expires_at);
CREATE INDEX IF NOT EXISTS proposals_by_base ON proposals (state, base_version);
CREATE INDEX IF NOT EXISTS proposals_by_closing ON proposals (closed_at);
"""
_MAX_SQLITE_INTEGER = 2**63 - 1
# Tables added after schema 1 was first released (created if missing; the number stays 1).
_ADDED_TABLES = """
CREATE TABLE IF NOT EXISTS audit_heads (
    host_id TEXT NOT NULL,
    log TEXT NOT NULL,
    seq INTEGER NOT NULL,
    checkpoint BLOB NOT NULL,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (host_id, log)
);
"""


def _fill_proposal_columns(db: sqlite3.Connection) -> None:
    """Fill the proposer, base and closing-time columns of rows an older coordinator stored.

    They are read from the proposal's own bytes; a row whose bytes do not parse keeps an empty
    base (the sweeper then closes it as stale, which is what it is: it can never apply). A
    closed row gets its expiry as its closing time: a proposal closes at the latest when it
    expires, so this never purges one earlier than its retention allows.
    """
    rows = db.execute(
        "SELECT proposal_id, proposal FROM proposals WHERE base_state_hash = x'' AND proposer = ''"
    ).fetchall()
    for proposal_id, raw in rows:
        try:
            message = domain_pb2.Proposal.FromString(bytes(raw))
        except DecodeError:
            continue
        db.execute(
            "UPDATE proposals SET proposer = ?, base_version = ?, base_state_hash = ? "
            "WHERE proposal_id = ?",
            (
                message.proposer_id[:128],
                min(int(message.base_version), _MAX_SQLITE_INTEGER),
                bytes(message.base_state_hash),
                proposal_id,
            ),
        )
    db.execute(
        "UPDATE proposals SET closed_at = expires_at WHERE state != ? AND closed_at = 0",
        (ProposalState.PENDING.value,),
    )


def _check_report(version: int, state_hash: bytes, when: int) -> None:
    for value in (version, when):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("a reported version and time are integers")
        if not 0 <= value <= _MAX_SQLITE_INTEGER:
            raise ValueError("a reported version or time is out of range")
    if not isinstance(state_hash, bytes):
        raise TypeError("a reported state hash is bytes")


def _timestamp(value: int | None) -> int:
    """A unix time for a store column: `value`, or now when None."""
    if value is None:
        return int(time.time())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a time is a unix time in whole seconds")
    return value


def _check_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes) or not value:
        raise TypeError(f"{what} must be non-empty bytes")


def _check_version(version: object) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("a state version is an integer of at least 1")


class SqliteStore:
    """A `CoordinatorStore` in one SQLite file (see the module invariants)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._closed = False
        self._db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0
        )
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused the WAL journal mode")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._create_schema()
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _create_schema(self) -> None:
        with self._lock:
            # executescript commits on its own; every statement is idempotent.
            self._db.executescript(_SCHEMA)
            self._db.executescript(_ADDED_TABLES)
            with self._tx_unlocked() as db:
                for table, column, definition in _ADDED_COLUMNS:
                    present = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
                    if column not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                for statement in filter(None, (s.strip() for s in _INDEXES.split(";"))):
                    db.execute(statement)
                _fill_proposal_columns(db)
                row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO meta (name, value) VALUES ('schema', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                elif row[0] in _UPGRADABLE_SCHEMAS:
                    db.execute(
                        "UPDATE meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION),)
                    )
                elif row[0] != str(SCHEMA_VERSION):
                    raise RuntimeError(
                        f"{self.path} has store schema {row[0]}, this coordinator "
                        f"understands {SCHEMA_VERSION}"
                    )

    @contextmanager
    def _tx_unlocked(self) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locking) transaction; the caller holds `_lock`."""
        if self._closed:
            raise RuntimeError("the store is closed")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock, committed (durably) on success."""
        with self._lock, self._tx_unlocked() as db:
            yield db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: a deferred transaction under the lock."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # --- the chain of sealed states --------------------------------------------------------

    def latest_version(self) -> int:
        with self._read() as db:
            return self._latest_version(db)

    @staticmethod
    def _latest_version(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT MAX(version) FROM states").fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def latest_state(self) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT state FROM states ORDER BY version DESC LIMIT 1").fetchone()
        return bytes(row[0]) if row is not None else None

    def get_state(self, version: int) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT state FROM states WHERE version = ?", (version,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def states_after(self, version: int, limit: int) -> list[bytes]:
        if limit < 1:
            return []
        with self._read() as db:
            rows = db.execute(
                "SELECT state FROM states WHERE version > ? ORDER BY version LIMIT ?",
                (max(version, 0), limit),
            ).fetchall()
        return [bytes(row[0]) for row in rows]

    @staticmethod
    def _append(db: sqlite3.Connection, version: int, state: bytes) -> None:
        latest = SqliteStore._latest_version(db)
        if version != latest + 1:
            raise ConflictError(
                f"cannot store state version {version}: the store is at version {latest}"
            )
        db.execute("INSERT INTO states (version, state) VALUES (?, ?)", (version, state))

    def append_state(self, version: int, state: bytes) -> None:
        _check_version(version)
        _check_bytes(state, "state")
        with self._transaction() as db:
            self._append(db, version, state)

    def append_state_and_close_proposal(
        self, version: int, state: bytes, proposal_id: bytes, *, closed_at: int | None = None
    ) -> None:
        _check_version(version)
        _check_bytes(state, "state")
        _check_bytes(proposal_id, "proposal_id")
        when = _timestamp(closed_at)
        with self._transaction() as db:
            row = db.execute(
                "SELECT 1 FROM proposals WHERE proposal_id = ?", (proposal_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")
            self._append(db, version, state)
            db.execute(
                "UPDATE proposals SET state = ?, detail = '', applied_version = ?, closed_at = ? "
                "WHERE proposal_id = ?",
                (ProposalState.APPLIED.value, version, when, proposal_id),
            )

    # --- proposals and approvals -----------------------------------------------------------

    def put_proposal(
        self,
        proposal_id: bytes,
        proposal: bytes,
        created_at: int,
        expires_at: int,
        approvals: Sequence[tuple[str, bytes]] = (),
        *,
        proposer: str = "",
        base_version: int = 0,
        base_state_hash: bytes = b"",
        max_pending: int = 0,
        max_pending_per_proposer: int = 0,
        max_stored_per_proposer: int = 0,
        now: int = 0,
    ) -> bool:
        _check_bytes(proposal_id, "proposal_id")
        _check_bytes(proposal, "proposal")
        _check_report(base_version, base_state_hash, 0)
        pending = ProposalState.PENDING.value
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM proposals WHERE proposal_id = ?", (proposal_id,)
            ).fetchone()
            if exists is not None:
                return False
            if max_pending:
                count = int(
                    db.execute(
                        "SELECT COUNT(*) FROM proposals WHERE state = ?", (pending,)
                    ).fetchone()[0]
                )
                if count >= max_pending:
                    raise ResourceExhaustedError(
                        f"{count} proposals are pending already, the most this coordinator "
                        f"keeps ({max_pending}); approve, cancel or let some expire first"
                    )
            if max_pending_per_proposer and proposer:
                count = int(
                    db.execute(
                        "SELECT COUNT(*) FROM proposals WHERE proposer = ? AND state = ?",
                        (proposer, pending),
                    ).fetchone()[0]
                )
                if count >= max_pending_per_proposer:
                    raise ResourceExhaustedError(
                        f"you have {count} pending proposals already, the most one operator may "
                        f"have ({max_pending_per_proposer}); cancel some of yours (or wait for "
                        "them to be applied or to expire) first"
                    )
            if max_stored_per_proposer and proposer:
                self._make_room(db, proposer, max_stored_per_proposer, now)
            db.execute(
                "INSERT INTO proposals (proposal_id, proposal, state, created_at, expires_at, "
                "proposer, base_version, base_state_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    proposal_id,
                    proposal,
                    pending,
                    created_at,
                    expires_at,
                    proposer,
                    base_version,
                    base_state_hash,
                ),
            )
            seen: set[str] = set()
            for operator_id, approval in approvals:
                _check_bytes(approval, "approval")
                if operator_id in seen:
                    raise ValueError("two initial approvals from one operator")
                seen.add(operator_id)
                db.execute(
                    "INSERT INTO approvals (proposal_id, operator_id, approval) VALUES (?, ?, ?)",
                    (proposal_id, operator_id, approval),
                )
        return True

    def add_approval(self, proposal_id: bytes, operator_id: str, approval: bytes) -> bool:
        _check_bytes(proposal_id, "proposal_id")
        _check_bytes(approval, "approval")
        if not isinstance(operator_id, str) or not operator_id:
            raise TypeError("operator_id must be a non-empty string")
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM proposals WHERE proposal_id = ?", (proposal_id,)
            ).fetchone()
            if exists is None:
                raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")
            cursor = db.execute(
                "INSERT OR IGNORE INTO approvals (proposal_id, operator_id, approval) "
                "VALUES (?, ?, ?)",
                (proposal_id, operator_id, approval),
            )
            return cursor.rowcount == 1

    def add_cancel_vote(self, proposal_id: bytes, operator_id: str, vote: bytes) -> bool:
        _check_bytes(proposal_id, "proposal_id")
        _check_bytes(vote, "vote")
        if not isinstance(operator_id, str) or not operator_id:
            raise TypeError("operator_id must be a non-empty string")
        with self._transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM proposals WHERE proposal_id = ?", (proposal_id,)
            ).fetchone()
            if exists is None:
                raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")
            cursor = db.execute(
                "INSERT OR IGNORE INTO cancel_votes (proposal_id, operator_id, vote) "
                "VALUES (?, ?, ?)",
                (proposal_id, operator_id, vote),
            )
            return cursor.rowcount == 1

    @staticmethod
    def _make_room(db: sqlite3.Connection, proposer: str, most: int, now: int) -> None:
        """Purge `proposer`'s oldest closed proposals that expired before `now` until one more
        fits under `most` stored; ResourceExhaustedError when not enough of them can go."""
        stored = int(
            db.execute("SELECT COUNT(*) FROM proposals WHERE proposer = ?", (proposer,)).fetchone()[
                0
            ]
        )
        excess = stored - most + 1
        if excess <= 0:
            return
        doomed = [
            bytes(r[0])
            for r in db.execute(
                "SELECT proposal_id FROM proposals WHERE proposer = ? AND state != ? "
                "AND expires_at < ? ORDER BY closed_at, seq LIMIT ?",
                (proposer, ProposalState.PENDING.value, now, excess),
            )
        ]
        if len(doomed) < excess:
            raise ResourceExhaustedError(
                f"you have {stored} proposals at this coordinator, the most one operator may keep "
                f"({most}), and too few of them are closed and expired to make room: wait for "
                "some to expire"
            )
        for table in ("approvals", "cancel_votes", "proposals"):
            db.executemany(
                f"DELETE FROM {table} WHERE proposal_id = ?",  # noqa: S608
                [(proposal_id,) for proposal_id in doomed],
            )

    @staticmethod
    def _record(db: sqlite3.Connection, row: tuple[object, ...]) -> ProposalRecord:
        proposal_id = bytes(row[0])  # type: ignore[call-overload]
        approvals = db.execute(
            "SELECT approval FROM approvals WHERE proposal_id = ? ORDER BY seq", (proposal_id,)
        ).fetchall()
        votes = db.execute(
            "SELECT vote FROM cancel_votes WHERE proposal_id = ? ORDER BY seq", (proposal_id,)
        ).fetchall()
        return ProposalRecord(
            proposal_id=proposal_id,
            proposal=bytes(row[1]),  # type: ignore[call-overload]
            approvals=tuple(bytes(a[0]) for a in approvals),
            state=ProposalState(str(row[2])),
            detail=str(row[3]),
            applied_version=int(row[4]),  # type: ignore[call-overload]
            created_at=int(row[5]),  # type: ignore[call-overload]
            expires_at=int(row[6]),  # type: ignore[call-overload]
            cancel_votes=tuple(bytes(v[0]) for v in votes),
            seq=int(row[7]),  # type: ignore[call-overload]
            proposer=str(row[8]),
            base_version=int(row[9]),  # type: ignore[call-overload]
            base_state_hash=bytes(row[10]),  # type: ignore[call-overload]
            closed_at=int(row[11]),  # type: ignore[call-overload]
        )

    _COLUMNS = (
        "proposal_id, proposal, state, detail, applied_version, created_at, expires_at, seq, "
        "proposer, base_version, base_state_hash, closed_at"
    )

    def get_proposal(self, proposal_id: bytes) -> ProposalRecord | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM proposals WHERE proposal_id = ?",  # noqa: S608
                (proposal_id,),
            ).fetchone()
            return self._record(db, row) if row is not None else None

    def list_proposals(
        self, include_closed: bool = False, *, limit: int, before: int = 0
    ) -> list[ProposalRecord]:
        if limit < 1:
            return []
        before = before if before > 0 else _MAX_SQLITE_INTEGER
        with self._read() as db:
            if include_closed:
                rows = db.execute(
                    f"SELECT {self._COLUMNS} FROM proposals WHERE seq < ? "  # noqa: S608
                    "ORDER BY seq DESC LIMIT ?",
                    (before, limit),
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {self._COLUMNS} FROM proposals WHERE state = ? "  # noqa: S608
                    "AND seq < ? ORDER BY seq DESC LIMIT ?",
                    (ProposalState.PENDING.value, before, limit),
                ).fetchall()
            return [self._record(db, row) for row in rows]

    def count_proposals(self, include_closed: bool = False, proposer: str = "") -> int:
        where, arguments = [], []
        if not include_closed:
            where.append("state = ?")
            arguments.append(ProposalState.PENDING.value)
        if proposer:
            where.append("proposer = ?")
            arguments.append(proposer)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._read() as db:
            row = db.execute(
                f"SELECT COUNT(*) FROM proposals{clause}",  # noqa: S608
                arguments,
            ).fetchone()
        return int(row[0])

    def due_proposals(
        self, now: int, base_version: int, base_state_hash: bytes, limit: int
    ) -> list[PendingSummary]:
        if limit < 1:
            return []
        pending = ProposalState.PENDING.value
        with self._read() as db:
            # Two indexed selections (by expiry, by base), merged: an OR across two indexes
            # would make SQLite scan every pending proposal.
            rows = db.execute(
                "SELECT seq, proposal_id, expires_at, base_version, base_state_hash "
                "FROM proposals WHERE state = ? AND expires_at <= ? "
                "UNION "
                "SELECT seq, proposal_id, expires_at, base_version, base_state_hash "
                "FROM proposals WHERE state = ? AND base_version < ? "
                "UNION "
                "SELECT seq, proposal_id, expires_at, base_version, base_state_hash "
                "FROM proposals WHERE state = ? AND base_version > ? "
                "UNION "
                "SELECT seq, proposal_id, expires_at, base_version, base_state_hash "
                "FROM proposals WHERE state = ? AND base_version = ? AND base_state_hash != ? "
                "ORDER BY seq LIMIT ?",
                (
                    pending,
                    now,
                    pending,
                    base_version,
                    pending,
                    base_version,
                    pending,
                    base_version,
                    base_state_hash,
                    limit,
                ),
            ).fetchall()
        return [PendingSummary(bytes(r[1]), int(r[2]), int(r[3]), bytes(r[4])) for r in rows]

    def pending_with_approvals(self, at_least: int, limit: int) -> list[bytes]:
        if limit < 1:
            return []
        with self._read() as db:
            rows = db.execute(
                "SELECT p.proposal_id FROM proposals AS p WHERE p.state = ? AND "
                "(SELECT COUNT(*) FROM approvals AS a WHERE a.proposal_id = p.proposal_id) >= ? "
                "ORDER BY p.seq LIMIT ?",
                (ProposalState.PENDING.value, max(at_least, 0), limit),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def set_proposal_state(
        self,
        proposal_id: bytes,
        state: ProposalState,
        detail: str = "",
        applied_version: int = 0,
        *,
        closed_at: int | None = None,
    ) -> bool:
        state = ProposalState(state)
        when = _timestamp(closed_at) if state.closed else 0
        with self._transaction() as db:
            row = db.execute(
                "SELECT state FROM proposals WHERE proposal_id = ?", (proposal_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")
            if ProposalState(str(row[0])).closed:
                return False
            db.execute(
                "UPDATE proposals SET state = ?, detail = ?, applied_version = ?, closed_at = ? "
                "WHERE proposal_id = ?",
                (state.value, detail, applied_version, when, proposal_id),
            )
        return True

    def close_proposals(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        when = _timestamp(closed_at)
        closed: list[bytes] = []
        if not closings:
            return closed
        with self._transaction() as db:
            for proposal_id, state, detail in closings:
                if not ProposalState(state).closed:
                    raise ValueError("close_proposals takes final states only")
                cursor = db.execute(
                    "UPDATE proposals SET state = ?, detail = ?, closed_at = ? "
                    "WHERE proposal_id = ? AND state = ?",
                    (
                        ProposalState(state).value,
                        detail,
                        when,
                        proposal_id,
                        ProposalState.PENDING.value,
                    ),
                )
                if cursor.rowcount == 1:
                    closed.append(proposal_id)
        return closed

    def purge_closed_proposals(self, closed_before: int, expired_before: int) -> int:
        with self._transaction() as db:
            doomed = (
                "SELECT proposal_id FROM proposals WHERE closed_at > 0 AND closed_at < ? "
                "AND expires_at < ? AND state != ?"
            )
            arguments = (closed_before, expired_before, ProposalState.PENDING.value)
            db.execute(
                f"DELETE FROM approvals WHERE proposal_id IN ({doomed})",  # noqa: S608
                arguments,
            )
            db.execute(
                f"DELETE FROM cancel_votes WHERE proposal_id IN ({doomed})",  # noqa: S608
                arguments,
            )
            cursor = db.execute(
                f"DELETE FROM proposals WHERE proposal_id IN ({doomed})",  # noqa: S608
                arguments,
            )
            return int(cursor.rowcount)

    # --- HSA registry ----------------------------------------------------------------------

    def register_hsa(
        self,
        host_id: str,
        address: str,
        registered_at: int = 0,
        version: int = 0,
        state_hash: bytes = b"",
    ) -> None:
        _check_report(version, state_hash, registered_at)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO hsas (host_id, address, registered_at, version, state_hash, "
                "reported_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host_id) DO UPDATE SET address = excluded.address, "
                "registered_at = excluded.registered_at, version = excluded.version, "
                "state_hash = excluded.state_hash, reported_at = excluded.reported_at",
                (
                    host_id,
                    address,
                    registered_at,
                    version,
                    state_hash,
                    registered_at if version else 0,
                ),
            )

    def record_hsa_version(
        self, host_id: str, version: int, state_hash: bytes, reported_at: int
    ) -> bool:
        _check_report(version, state_hash, reported_at)
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE hsas SET version = ?, state_hash = ?, reported_at = ? "
                "WHERE host_id = ? AND version <= ?",
                (version, state_hash, reported_at, host_id, version),
            )
            return cursor.rowcount > 0

    def list_hsas(self) -> list[HsaRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT host_id, address, registered_at, version, state_hash, reported_at "
                "FROM hsas ORDER BY host_id"
            ).fetchall()
        return [
            HsaRecord(str(r[0]), str(r[1]), int(r[2]), int(r[3]), bytes(r[4]), int(r[5]))
            for r in rows
        ]

    # --- audit heads -----------------------------------------------------------------------

    def get_audit_head(self, host_id: str, log: str) -> AuditHeadRecord | None:
        with self._read() as db:
            row = db.execute(
                "SELECT seq, checkpoint, reported_at FROM audit_heads "
                "WHERE host_id = ? AND log = ?",
                (host_id, log),
            ).fetchone()
        if row is None:
            return None
        return AuditHeadRecord(host_id, log, int(row[0]), bytes(row[1]), int(row[2]))

    def put_audit_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool:
        _check_bytes(head.checkpoint, "checkpoint")
        _check_report(head.seq, b"", head.reported_at)
        with self._transaction() as db:
            row = db.execute(
                "SELECT checkpoint FROM audit_heads WHERE host_id = ? AND log = ?",
                (head.host_id, head.log),
            ).fetchone()
            current = bytes(row[0]) if row is not None else None
            if current != expected:
                return False
            db.execute(
                "INSERT INTO audit_heads (host_id, log, seq, checkpoint, reported_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (host_id, log) DO UPDATE SET "
                "seq = excluded.seq, checkpoint = excluded.checkpoint, "
                "reported_at = excluded.reported_at",
                (head.host_id, head.log, head.seq, head.checkpoint, head.reported_at),
            )
            return True

    def list_audit_heads(self, host_id: str = "") -> list[AuditHeadRecord]:
        with self._read() as db:
            rows = db.execute(
                "SELECT host_id, log, seq, checkpoint, reported_at FROM audit_heads "
                "WHERE ? = '' OR host_id = ? ORDER BY host_id, log",
                (host_id, host_id),
            ).fetchall()
        return [
            AuditHeadRecord(str(r[0]), str(r[1]), int(r[2]), bytes(r[3]), int(r[4])) for r in rows
        ]

    # --- key records -----------------------------------------------------------------------

    def get_key(self, key_id: str) -> KeyEntry | None:
        with self._read() as db:
            row = db.execute(
                "SELECT record, revision FROM keys WHERE key_id = ? AND deleted_at = 0", (key_id,)
            ).fetchone()
        return KeyEntry(key_id, bytes(row[0]), int(row[1])) if row is not None else None

    def put_key(
        self,
        key_id: str,
        record: bytes,
        expected_revision: int,
        *,
        creator: str = "",
        creator_limit: int = 0,
    ) -> int:
        if not isinstance(key_id, str) or not key_id:
            raise TypeError("key_id must be a non-empty string")
        _check_bytes(record, "record")
        if expected_revision < 0:
            raise ValueError("expected_revision is 0 (create) or a stored revision")
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision, deleted_at FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if expected_revision == 0:
                if row is not None and int(row[1]):
                    raise AlreadyExistsError(
                        f"key {key_id} was deleted on {iso_date(int(row[1]))}; a key id is "
                        "never used again"
                    )
                if row is not None:
                    raise AlreadyExistsError(f"key {key_id} exists already")
                if creator and creator_limit:
                    count = db.execute(
                        "SELECT COUNT(*) FROM keys WHERE creator = ? AND deleted_at = 0",
                        (creator,),
                    ).fetchone()
                    if int(count[0]) >= creator_limit:
                        raise ResourceExhaustedError(
                            f"{creator[:200]} has created {int(count[0])} keys, the most one "
                            f"principal may have ({creator_limit}); schedule the deletion of "
                            "keys it no longer needs"
                        )
                db.execute(
                    "INSERT INTO keys (key_id, record, revision, creator) VALUES (?, ?, 1, ?)",
                    (key_id, record, creator),
                )
                return 1
            if row is None or int(row[1]):
                raise NotFoundError(f"key {key_id} does not exist")
            current = int(row[0])
            if current != expected_revision:
                raise ConflictError(
                    f"key {key_id} is at revision {current}, not {expected_revision}: "
                    "it changed meanwhile; read it again and retry"
                )
            db.execute(
                "UPDATE keys SET record = ?, revision = ? WHERE key_id = ?",
                (record, current + 1, key_id),
            )
            return current + 1

    def list_keys(self, limit: int, after_key_id: str = "") -> list[KeyEntry]:
        if limit < 1:
            return []
        with self._read() as db:
            rows = db.execute(
                "SELECT key_id, record, revision FROM keys WHERE key_id > ? AND deleted_at = 0 "
                "ORDER BY key_id LIMIT ?",
                (after_key_id, limit),
            ).fetchall()
        return [KeyEntry(str(r[0]), bytes(r[1]), int(r[2])) for r in rows]

    def count_keys(self, creator: str) -> int:
        with self._read() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM keys WHERE creator = ? AND deleted_at = 0", (creator,)
            ).fetchone()
        return int(row[0])

    def delete_key(self, key_id: str, expected_revision: int, deleted_at: int) -> None:
        if not isinstance(key_id, str) or not key_id:
            raise TypeError("key_id must be a non-empty string")
        if expected_revision < 1:
            raise ValueError("expected_revision is the stored revision the caller read")
        if isinstance(deleted_at, bool) or not isinstance(deleted_at, int) or deleted_at < 1:
            raise ValueError("deleted_at is a unix time")
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision, deleted_at FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None or int(row[1]):
                raise NotFoundError(f"key {key_id} does not exist")
            current = int(row[0])
            if current != expected_revision:
                raise ConflictError(
                    f"key {key_id} is at revision {current}, not {expected_revision}: "
                    "it changed meanwhile; read it again and retry"
                )
            db.execute(
                "UPDATE keys SET deleted_at = ?, revision = ? WHERE key_id = ?",
                (deleted_at, current + 1, key_id),
            )

    def deleted_key(self, key_id: str) -> DeletedKey | None:
        with self._read() as db:
            row = db.execute(
                "SELECT record, revision, deleted_at FROM keys WHERE key_id = ? AND deleted_at > 0",
                (key_id,),
            ).fetchone()
        if row is None:
            return None
        return DeletedKey(KeyEntry(key_id, bytes(row[0]), int(row[1])), int(row[2]))

    def purge_deleted_keys(self, deleted_before: int) -> int:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM keys WHERE deleted_at > 0 AND deleted_at < ?", (deleted_before,)
            )
            return int(cursor.rowcount)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
