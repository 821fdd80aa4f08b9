"""Snapshots of the coordinator's SQLite file, and loading one into an empty file.

Invariants:
- a snapshot reads through a connection of its own, inside one read transaction whose first
  query runs before anything is yielded: in WAL mode every later query of it sees the file as
  it was then, while the coordinator's own connection goes on writing (and is never blocked
  by it); rows come through cursors a page (`_PAGE`) at a time, never all at once;
- a load runs inside the caller's one write transaction (`BEGIN IMMEDIATE`): it counts every
  table first and refuses a file that holds anything, then inserts every item with the values
  it carries (a proposal's `seq`, its signatures in arrival order, revisions, creators,
  deletion and closing times, reported versions); the caller commits only after the items
  ended, so an exception from them rolls everything back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from domain_coordinator.snapshots import (
    SnapshotItem,
    SnapshotKey,
    SnapshotProposal,
    SnapshotState,
    StoreCounts,
    StoreSnapshot,
    refuse_unless_empty,
)
from domain_coordinator.store import AuditHeadRecord, HsaRecord, ProposalState

_PAGE: Final = 200
_BUSY_TIMEOUT_MS: Final = 10_000
_PROPOSAL_COLUMNS: Final = (
    "seq, proposal_id, proposal, state, detail, applied_version, created_at, expires_at, "
    "closed_at, proposer, base_version, base_state_hash"
)


def count_contents(db: sqlite3.Connection) -> StoreCounts:
    """How many items of each kind the file holds (inside the caller's transaction)."""

    def count(sql: str) -> int:
        return int(db.execute(sql).fetchone()[0])

    return StoreCounts(
        states=count("SELECT COUNT(*) FROM states"),
        proposals=count("SELECT COUNT(*) FROM proposals"),
        approvals=count("SELECT COUNT(*) FROM approvals"),
        cancel_votes=count("SELECT COUNT(*) FROM cancel_votes"),
        keys=count("SELECT COUNT(*) FROM keys WHERE deleted_at = 0"),
        tombstones=count("SELECT COUNT(*) FROM keys WHERE deleted_at > 0"),
        hsas=count("SELECT COUNT(*) FROM hsas"),
        audit_heads=count("SELECT COUNT(*) FROM audit_heads"),
    )


def _pages(cursor: sqlite3.Cursor) -> Iterator[tuple[object, ...]]:
    while rows := cursor.fetchmany(_PAGE):
        yield from rows


class SqliteSnapshot(StoreSnapshot):
    """The file as one read transaction of its own connection sees it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT state FROM states ORDER BY version DESC LIMIT 1").fetchone()
        super().__init__(count_contents(db), bytes(row[0]) if row is not None else None)
        self._db = db

    def states(self) -> Iterator[SnapshotState]:
        cursor = self._db.execute("SELECT version, state FROM states ORDER BY version")
        for version, state in _pages(cursor):
            yield SnapshotState(int(version), bytes(state))  # type: ignore[call-overload]

    def _signed(self, table: str, column: str, proposal_id: bytes) -> tuple[tuple[str, bytes], ...]:
        rows = self._db.execute(
            f"SELECT operator_id, {column} FROM {table} WHERE proposal_id = ? "  # noqa: S608
            "ORDER BY seq",
            (proposal_id,),
        ).fetchall()
        return tuple((str(r[0]), bytes(r[1])) for r in rows)

    def proposals(self) -> Iterator[SnapshotProposal]:
        cursor = self._db.execute(f"SELECT {_PROPOSAL_COLUMNS} FROM proposals ORDER BY seq")  # noqa: S608
        for row in _pages(cursor):
            r: tuple[int, bytes, bytes, str, str, int, int, int, int, str, int, bytes] = row  # type: ignore[assignment]
            proposal_id = bytes(r[1])
            yield SnapshotProposal(
                proposal_id=proposal_id,
                proposal=bytes(r[2]),
                state=ProposalState(str(r[3])).value,
                detail=str(r[4]),
                applied_version=int(r[5]),
                created_at=int(r[6]),
                expires_at=int(r[7]),
                closed_at=int(r[8]),
                seq=int(r[0]),
                proposer=str(r[9]),
                base_version=int(r[10]),
                base_state_hash=bytes(r[11]),
                approvals=self._signed("approvals", "approval", proposal_id),
                cancel_votes=self._signed("cancel_votes", "vote", proposal_id),
            )

    def keys(self) -> Iterator[SnapshotKey]:
        cursor = self._db.execute(
            "SELECT key_id, record, revision, creator, deleted_at FROM keys ORDER BY key_id"
        )
        for row in _pages(cursor):
            r: tuple[str, bytes, int, str, int] = row  # type: ignore[assignment]
            yield SnapshotKey(str(r[0]), bytes(r[1]), int(r[2]), str(r[3]), int(r[4]))

    def hsas(self) -> Iterator[HsaRecord]:
        cursor = self._db.execute(
            "SELECT host_id, address, registered_at, version, state_hash, reported_at "
            "FROM hsas ORDER BY host_id"
        )
        for row in _pages(cursor):
            r: tuple[str, str, int, int, bytes, int] = row  # type: ignore[assignment]
            yield HsaRecord(str(r[0]), str(r[1]), int(r[2]), int(r[3]), bytes(r[4]), int(r[5]))

    def audit_heads(self) -> Iterator[AuditHeadRecord]:
        cursor = self._db.execute(
            "SELECT host_id, log, seq, checkpoint, reported_at FROM audit_heads "
            "ORDER BY host_id, log"
        )
        for row in _pages(cursor):
            r: tuple[str, str, int, bytes, int] = row  # type: ignore[assignment]
            yield AuditHeadRecord(str(r[0]), str(r[1]), int(r[2]), bytes(r[3]), int(r[4]))


@contextmanager
def open_snapshot(path: Path) -> Iterator[SqliteSnapshot]:
    """A snapshot of the file at `path`, through a connection of its own (closed after)."""
    db = sqlite3.connect(str(path), isolation_level=None, timeout=10.0, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA query_only = ON")
        db.execute("BEGIN")
        try:
            yield SqliteSnapshot(db)  # its first query fixes the point in time
        finally:
            db.execute("COMMIT")
    finally:
        db.close()


def _insert_proposal(db: sqlite3.Connection, item: SnapshotProposal) -> None:
    db.execute(
        f"INSERT INTO proposals ({_PROPOSAL_COLUMNS}) "  # noqa: S608
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            item.seq,
            item.proposal_id,
            item.proposal,
            ProposalState(item.state).value,
            item.detail,
            item.applied_version,
            item.created_at,
            item.expires_at,
            item.closed_at,
            item.proposer,
            item.base_version,
            item.base_state_hash,
        ),
    )
    for table, column, signed in (
        ("approvals", "approval", item.approvals),
        ("cancel_votes", "vote", item.cancel_votes),
    ):
        db.executemany(
            f"INSERT INTO {table} (proposal_id, operator_id, {column}) VALUES (?, ?, ?)",  # noqa: S608
            [(item.proposal_id, operator, raw) for operator, raw in signed],
        )


def _insert(db: sqlite3.Connection, item: SnapshotItem) -> None:
    if isinstance(item, SnapshotState):
        db.execute("INSERT INTO states (version, state) VALUES (?, ?)", (item.version, item.state))
    elif isinstance(item, SnapshotProposal):
        _insert_proposal(db, item)
    elif isinstance(item, SnapshotKey):
        db.execute(
            "INSERT INTO keys (key_id, record, revision, creator, deleted_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (item.key_id, item.record, item.revision, item.creator, item.deleted_at),
        )
    elif isinstance(item, HsaRecord):
        db.execute(
            "INSERT INTO hsas (host_id, address, registered_at, version, state_hash, "
            "reported_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                item.host_id,
                item.address,
                item.registered_at,
                item.version,
                item.state_hash,
                item.reported_at,
            ),
        )
    else:
        db.execute(
            "INSERT INTO audit_heads (host_id, log, seq, checkpoint, reported_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (item.host_id, item.log, item.seq, item.checkpoint, item.reported_at),
        )


def load(db: sqlite3.Connection, items: Iterator[SnapshotItem], where: str) -> StoreCounts:
    """Insert `items` into the empty file (inside the caller's write transaction); what was
    loaded. FailedPreconditionError if the file holds anything."""
    refuse_unless_empty(count_contents(db), where)
    for item in items:
        _insert(db, item)
    return count_contents(db)
