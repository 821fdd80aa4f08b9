"""Key metadata floors: the newest version of each key's metadata this HSA accepted, on disk.

What a record's signature and tokens cannot show is a whole record replaced by an *older*
complete record (an earlier policy with its own valid tokens and signature). Every change of a
key raises its `metadata_version`, and an HSA refuses a record older than one it accepted:
`MetadataVersionFloor` remembers, per key, the highest `metadata_version` and the SHA-256 of
its metadata bytes, and a change sequence for the peers (`hsa_node.peering`).

Invariants:
- no rollback: `admit` refuses a record whose `metadata_version` is below the key's floor
  (`KeyRollbackError`), or equal to it with other metadata bytes (FailedPreconditionError);
- the floor is persisted (`key_versions.db`, 0600, WAL, synchronous=FULL) so a restarted HSA
  still refuses an older record, and every process of one HSA (the main process and its key
  service workers) opens the same file, so a floor any of them raised holds for all;
- a floor taken from a peer only ever rises (`raise_all`, the max rule): a peer's floor that
  is lower changes nothing, and one with the same version and another hash keeps this HSA's
  own (`FloorChange.CONFLICT`, for the caller to log);
- every change gets the next number of the table's change sequence, within a random epoch
  made with the file, so a peer that counted in another incarnation of the file starts again.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from domain_core.errors import FailedPreconditionError
from domain_edge.sqlite_tx import immediate_transaction
from domain_proto import keys_pb2

__all__ = [
    "FLOOR_FILE",
    "FloorChange",
    "FloorEntry",
    "FloorSource",
    "KeyRollbackError",
    "MetadataVersionFloor",
    "metadata_digest",
]

FLOOR_FILE: Final = "key_versions.db"


def metadata_digest(record: keys_pb2.KeyRecord) -> bytes:
    """What a floor holds of a record besides its version: SHA-256 of its metadata bytes."""
    return hashlib.sha256(record.metadata).digest()


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
            with immediate_transaction(self._db) as db:
                yield db

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


class FloorSource(Protocol):
    """Where an HSA learns the floors of keys it has none for: its peers
    (`hsa_node.peering`)."""

    def learn(self, key_ids: Sequence[str]) -> None:
        """Raise this HSA's floors of `key_ids` to what its peers hold; UnavailableError
        when no peer answered (then a key without a local floor must not be served)."""

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Tell the peers now of a floor this process just set (best effort, short deadline;
        never raises: the floor is pushed again in the background)."""
