"""`CoordinatorStore` on one SQLite file: WAL journal, synchronous=FULL, one lock.

Invariants (on top of those of `domain_coordinator.store`):
- the database file is created 0600 before SQLite opens it (it holds nothing secret, but
  nothing anyone else should edit either); WAL and shared-memory files inherit its mode;
- every write runs in its own `BEGIN IMMEDIATE` transaction and is committed, with
  `synchronous=FULL`, before the method returns: an acknowledged write survives a crash or a
  power loss;
- compare-and-swap checks (state version, key revision, fences revision, one approval or
  cancel vote per operator) and the per-creator key count run inside the same transaction as
  the write they guard, so they hold across threads and processes;
- the fences are one row (`fences`); a fenced key write checks their revision first, in its
  own transaction; `subscribe` never calls back (a file has one coordinator);
- a deleted key record stays in the `keys` table as a tombstone (`deleted_at` set) until it
  is purged; nothing that reads live keys sees it, and its key id cannot be created again;
- a proposal's proposer, base version and base state hash are columns beside its bytes
  (filled from the bytes for rows of older files when the file is opened), indexed with its
  state, expiry and closing time, so that counting, listing a page, finding what is due and
  purging never read the bytes of proposals they do not return;
- one connection shared by all threads, serialised by a lock; a snapshot reads through a
  connection of its own (one read transaction), so it never holds the lock or blocks writers,
  and a load runs in one write transaction (`_sqlite_snapshot`).

The schema and its upgrades are in `_sqlite_schema`, the SQL of proposals in
`_sqlite_proposals`; the arguments are checked by the interface (`store.CoordinatorStore`)
before any primitive here runs.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from domain_coordinator import _sqlite_proposals as proposals
from domain_coordinator import _sqlite_schema as schema
from domain_coordinator import _sqlite_snapshot as snapshot_sql
from domain_coordinator.snapshots import SnapshotItem, StoreCounts, StoreSnapshot
from domain_coordinator.store import (
    ALL_CHANGE_KINDS,
    AuditHeadRecord,
    ChangeKind,
    CoordinatorStore,
    DeletedKey,
    FenceRecord,
    FencesChangedError,
    HsaRecord,
    KeyEntry,
    NewProposal,
    PendingSummary,
    ProposalCaps,
    ProposalRecord,
    ProposalState,
    Signed,
    StateChange,
    iso_date,
)
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    ResourceExhaustedError,
)
from domain_edge.sqlite_tx import immediate_transaction

SCHEMA_VERSION = schema.SCHEMA_VERSION
_BUSY_TIMEOUT_MS = 10_000


class SqliteStore(CoordinatorStore):
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
            for script in schema.SCRIPTS:  # each commits on its own; all are idempotent
                self._db.executescript(script)
            with self._tx_unlocked() as db:
                schema.upgrade(db, self.path)

    @contextmanager
    def _tx_unlocked(self) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locking) transaction; the caller holds `_lock`."""
        if self._closed:
            raise RuntimeError("the store is closed")
        with immediate_transaction(self._db) as db:
            yield db

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

    def _append_state(
        self, version: int, state: bytes, applied: bytes | None, closed_at: int
    ) -> None:
        with self._transaction() as db:
            if applied is not None:
                proposals.require(db, applied)
            latest = self._latest_version(db)
            if version != latest + 1:
                raise ConflictError(
                    f"cannot store state version {version}: the store is at version {latest}"
                )
            db.execute("INSERT INTO states (version, state) VALUES (?, ?)", (version, state))
            if applied is not None:
                proposals.mark_applied(db, applied, version, closed_at)

    # --- proposals and approvals (the SQL is in `_sqlite_proposals`) -----------------------

    def _put_proposal(self, new: NewProposal, caps: ProposalCaps) -> bool:
        with self._transaction() as db:
            return proposals.insert(db, new, caps)

    def _add_signed(
        self, kind: Signed, proposal_id: bytes, operator_id: str, signed: bytes
    ) -> bool:
        with self._transaction() as db:
            return proposals.add_signed(db, kind, proposal_id, operator_id, signed)

    def get_proposal(self, proposal_id: bytes) -> ProposalRecord | None:
        with self._read() as db:
            return proposals.get(db, proposal_id)

    def list_proposals(
        self, include_closed: bool = False, *, limit: int, before: int = 0
    ) -> list[ProposalRecord]:
        if limit < 1:
            return []
        with self._read() as db:
            return proposals.page(db, include_closed, limit, before)

    def count_proposals(self, include_closed: bool = False, proposer: str = "") -> int:
        with self._read() as db:
            return proposals.count(db, include_closed, proposer)

    def due_proposals(
        self, now: int, base_version: int, base_state_hash: bytes, limit: int
    ) -> list[PendingSummary]:
        if limit < 1:
            return []
        with self._read() as db:
            return proposals.due(db, now, base_version, base_state_hash, limit)

    def pending_with_approvals(self, at_least: int, limit: int) -> list[bytes]:
        if limit < 1:
            return []
        with self._read() as db:
            return proposals.with_approvals(db, at_least, limit)

    def _set_proposal_state(self, proposal_id: bytes, change: StateChange) -> bool:
        with self._transaction() as db:
            return proposals.set_state(db, proposal_id, change)

    def _close_proposals(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        with self._transaction() as db:
            return proposals.close(db, closings, closed_at)

    def purge_closed_proposals(self, closed_before: int, expired_before: int) -> int:
        with self._transaction() as db:
            return proposals.purge(db, closed_before, expired_before)

    # --- HSA registry ----------------------------------------------------------------------

    def _register_hsa(self, record: HsaRecord) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO hsas (host_id, address, registered_at, version, state_hash, "
                "reported_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (host_id) DO UPDATE SET address = excluded.address, "
                "registered_at = excluded.registered_at, version = excluded.version, "
                "state_hash = excluded.state_hash, reported_at = excluded.reported_at",
                (
                    record.host_id,
                    record.address,
                    record.registered_at,
                    record.version,
                    record.state_hash,
                    record.reported_at,
                ),
            )

    def _record_hsa_version(self, report: HsaRecord) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE hsas SET version = ?, state_hash = ?, reported_at = ? "
                "WHERE host_id = ? AND version <= ?",
                (
                    report.version,
                    report.state_hash,
                    report.reported_at,
                    report.host_id,
                    report.version,
                ),
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

    def _put_audit_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool:
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

    # --- fences and change notices ---------------------------------------------------------

    def get_fences(self) -> FenceRecord:
        with self._read() as db:
            return self._fences(db)

    @staticmethod
    def _fences(db: sqlite3.Connection) -> FenceRecord:
        row = db.execute("SELECT value, revision FROM fences WHERE id = 1").fetchone()
        return FenceRecord(bytes(row[0]), int(row[1])) if row is not None else FenceRecord(b"", 0)

    def _set_fences(self, value: bytes, expected_revision: int) -> int:
        with self._transaction() as db:
            current = self._fences(db).revision
            if current != expected_revision:
                raise ConflictError(
                    f"the fences are at revision {current}, not {expected_revision}: another "
                    "coordinator set them meanwhile; read them again and retry"
                )
            db.execute(
                "INSERT INTO fences (id, revision, value) VALUES (1, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET revision = excluded.revision, value = excluded.value",
                (current + 1, value),
            )
            return current + 1

    def _check_fences(self, db: sqlite3.Connection, fences_revision: int | None) -> None:
        """FencesChangedError unless the fences are at `fences_revision` (None: no check)."""
        if fences_revision is None:
            return
        current = self._fences(db).revision
        if current != fences_revision:
            raise FencesChangedError(
                f"the fences are at revision {current}, not {fences_revision}: a fence was set "
                "meanwhile; nothing was written: check the write against the fences again"
            )

    def subscribe(
        self,
        on_change: Callable[[ChangeKind], None],
        kinds: Collection[ChangeKind] = ALL_CHANGE_KINDS,
    ) -> Callable[[], None]:
        """A store file has one coordinator: nobody else changes it, so this never calls back."""

        def unsubscribe() -> None:
            """Nothing to end."""

        return unsubscribe

    # --- key records -----------------------------------------------------------------------

    def get_key(self, key_id: str) -> KeyEntry | None:
        with self._read() as db:
            row = db.execute(
                "SELECT record, revision FROM keys WHERE key_id = ? AND deleted_at = 0", (key_id,)
            ).fetchone()
        return KeyEntry(key_id, bytes(row[0]), int(row[1])) if row is not None else None

    def _put_key(
        self, entry: KeyEntry, creator: str, creator_limit: int, fences_revision: int | None
    ) -> int:
        key_id, expected_revision = entry.key_id, entry.revision
        with self._transaction() as db:
            self._check_fences(db, fences_revision)
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
                    self._check_creator_limit(db, creator, creator_limit)
                db.execute(
                    "INSERT INTO keys (key_id, record, revision, creator) VALUES (?, ?, 1, ?)",
                    (key_id, entry.record, creator),
                )
                return 1
            current = self._live_revision(row, key_id, expected_revision)
            db.execute(
                "UPDATE keys SET record = ?, revision = ? WHERE key_id = ?",
                (entry.record, current + 1, key_id),
            )
            return current + 1

    @staticmethod
    def _check_creator_limit(db: sqlite3.Connection, creator: str, creator_limit: int) -> None:
        count = db.execute(
            "SELECT COUNT(*) FROM keys WHERE creator = ? AND deleted_at = 0", (creator,)
        ).fetchone()
        if int(count[0]) >= creator_limit:
            raise ResourceExhaustedError(
                f"{creator[:200]} has created {int(count[0])} keys, the most one "
                f"principal may have ({creator_limit}); schedule the deletion of "
                "keys it no longer needs"
            )

    @staticmethod
    def _live_revision(row: tuple[int, int] | None, key_id: str, expected: int) -> int:
        """The revision of a live key row (revision, deleted_at); NotFoundError for none or a
        tombstone, ConflictError unless it is `expected`."""
        if row is None or int(row[1]):
            raise NotFoundError(f"key {key_id} does not exist")
        current = int(row[0])
        if current != expected:
            raise ConflictError(
                f"key {key_id} is at revision {current}, not {expected}: "
                "it changed meanwhile; read it again and retry"
            )
        return current

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

    def _delete_key(
        self, key_id: str, expected_revision: int, deleted_at: int, fences_revision: int | None
    ) -> None:
        with self._transaction() as db:
            self._check_fences(db, fences_revision)
            row = db.execute(
                "SELECT revision, deleted_at FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            current = self._live_revision(row, key_id, expected_revision)
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

    # --- backup and restore (the SQL is in `_sqlite_snapshot`) -----------------------------

    def contents(self) -> StoreCounts:
        with self._read() as db:
            return snapshot_sql.count_contents(db)

    @contextmanager
    def snapshot(self) -> Iterator[StoreSnapshot]:
        if self._closed:
            raise RuntimeError("the store is closed")
        with snapshot_sql.open_snapshot(self.path) as snapshot:
            yield snapshot

    def _load_snapshot(self, items: Iterator[SnapshotItem]) -> StoreCounts:
        with self._transaction() as db:
            return snapshot_sql.load(db, items, f"the store {self.path}")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
