"""The SQL of proposals, approvals and votes to cancel in the coordinator's SQLite file.

Every function runs inside a transaction the caller (`SqliteStore`) opened and holds: the
counts and checks each one makes (the caps, one signature per operator, "still PENDING") are
in the same transaction as the write they guard. Nothing here reads the bytes of a proposal it
does not return: counting, paging, finding what is due or quorate-looking and purging use the
indexed columns.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from domain_coordinator.store import (
    MAX_STORED_INTEGER,
    NewProposal,
    PendingSummary,
    ProposalCaps,
    ProposalRecord,
    ProposalState,
    Signed,
    StateChange,
)
from domain_core.errors import NotFoundError, ResourceExhaustedError

_PENDING = ProposalState.PENDING.value
_COLUMNS = (
    "proposal_id, proposal, state, detail, applied_version, created_at, expires_at, seq, "
    "proposer, base_version, base_state_hash, closed_at"
)
# Where each kind of signature is kept: (table, column of the signed bytes).
_SIGNED_TABLES = {
    Signed.APPROVAL: ("approvals", "approval"),
    Signed.CANCEL_VOTE: ("cancel_votes", "vote"),
}


def require(db: sqlite3.Connection, proposal_id: bytes) -> None:
    """NotFoundError unless the proposal is stored."""
    row = db.execute("SELECT 1 FROM proposals WHERE proposal_id = ?", (proposal_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")


def _count(db: sqlite3.Connection, where: str, arguments: tuple[object, ...]) -> int:
    row = db.execute(f"SELECT COUNT(*) FROM proposals WHERE {where}", arguments).fetchone()  # noqa: S608
    return int(row[0])


def insert(db: sqlite3.Connection, new: NewProposal, caps: ProposalCaps) -> bool:
    """Store a new PENDING proposal and its first approvals, within the caps; False if it
    exists (see `CoordinatorStore.put_proposal`)."""
    exists = db.execute(
        "SELECT 1 FROM proposals WHERE proposal_id = ?", (new.proposal_id,)
    ).fetchone()
    if exists is not None:
        return False
    if caps.max_pending:
        count = _count(db, "state = ?", (_PENDING,))
        if count >= caps.max_pending:
            raise ResourceExhaustedError(
                f"{count} proposals are pending already, the most this coordinator "
                f"keeps ({caps.max_pending}); approve, cancel or let some expire first"
            )
    if caps.max_pending_per_proposer and new.proposer:
        count = _count(db, "proposer = ? AND state = ?", (new.proposer, _PENDING))
        if count >= caps.max_pending_per_proposer:
            raise ResourceExhaustedError(
                f"you have {count} pending proposals already, the most one operator may "
                f"have ({caps.max_pending_per_proposer}); cancel some of yours (or wait for "
                "them to be applied or to expire) first"
            )
    if caps.max_stored_per_proposer and new.proposer:
        _make_room(db, new.proposer, caps.max_stored_per_proposer, caps.now)
    db.execute(
        "INSERT INTO proposals (proposal_id, proposal, state, created_at, expires_at, "
        "proposer, base_version, base_state_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            new.proposal_id,
            new.proposal,
            _PENDING,
            new.created_at,
            new.expires_at,
            new.proposer,
            new.base_version,
            new.base_state_hash,
        ),
    )
    db.executemany(
        "INSERT INTO approvals (proposal_id, operator_id, approval) VALUES (?, ?, ?)",
        [(new.proposal_id, operator_id, approval) for operator_id, approval in new.approvals],
    )
    return True


def _make_room(db: sqlite3.Connection, proposer: str, most: int, now: int) -> None:
    """Purge `proposer`'s oldest closed proposals that expired before `now` until one more
    fits under `most` stored; ResourceExhaustedError when not enough of them can go."""
    stored = _count(db, "proposer = ?", (proposer,))
    excess = stored - most + 1
    if excess <= 0:
        return
    doomed = [
        bytes(r[0])
        for r in db.execute(
            "SELECT proposal_id FROM proposals WHERE proposer = ? AND state != ? "
            "AND expires_at < ? ORDER BY closed_at, seq LIMIT ?",
            (proposer, _PENDING, now, excess),
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


def add_signed(
    db: sqlite3.Connection, kind: Signed, proposal_id: bytes, operator_id: str, signed: bytes
) -> bool:
    """Add one operator's approval or vote to cancel; False if that operator gave one already."""
    require(db, proposal_id)
    table, column = _SIGNED_TABLES[kind]
    cursor = db.execute(
        f"INSERT OR IGNORE INTO {table} (proposal_id, operator_id, {column}) "  # noqa: S608
        "VALUES (?, ?, ?)",
        (proposal_id, operator_id, signed),
    )
    return cursor.rowcount == 1


def mark_applied(db: sqlite3.Connection, proposal_id: bytes, version: int, closed_at: int) -> None:
    """Mark the proposal APPLIED at `version` (the caller appends the state in the same
    transaction)."""
    db.execute(
        "UPDATE proposals SET state = ?, detail = '', applied_version = ?, closed_at = ? "
        "WHERE proposal_id = ?",
        (ProposalState.APPLIED.value, version, closed_at, proposal_id),
    )


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


def get(db: sqlite3.Connection, proposal_id: bytes) -> ProposalRecord | None:
    """The stored proposal with its approvals and votes to cancel, or None."""
    row = db.execute(
        f"SELECT {_COLUMNS} FROM proposals WHERE proposal_id = ?",  # noqa: S608
        (proposal_id,),
    ).fetchone()
    return _record(db, row) if row is not None else None


def page(
    db: sqlite3.Connection, include_closed: bool, limit: int, before: int
) -> list[ProposalRecord]:
    """Up to `limit` proposals with `seq` below `before` (0: any), newest first."""
    before = before if before > 0 else MAX_STORED_INTEGER
    if include_closed:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM proposals WHERE seq < ? "  # noqa: S608
            "ORDER BY seq DESC LIMIT ?",
            (before, limit),
        ).fetchall()
    else:
        rows = db.execute(
            f"SELECT {_COLUMNS} FROM proposals WHERE state = ? "  # noqa: S608
            "AND seq < ? ORDER BY seq DESC LIMIT ?",
            (_PENDING, before, limit),
        ).fetchall()
    return [_record(db, row) for row in rows]


def count(db: sqlite3.Connection, include_closed: bool, proposer: str) -> int:
    """How many proposals are PENDING (all with `include_closed`); only `proposer`'s if given."""
    where, arguments = [], []
    if not include_closed:
        where.append("state = ?")
        arguments.append(_PENDING)
    if proposer:
        where.append("proposer = ?")
        arguments.append(proposer)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    row = db.execute(
        f"SELECT COUNT(*) FROM proposals{clause}",  # noqa: S608
        arguments,
    ).fetchone()
    return int(row[0])


def due(
    db: sqlite3.Connection, now: int, base_version: int, base_state_hash: bytes, limit: int
) -> list[PendingSummary]:
    """PENDING proposals that expired by `now` or are not for this base, oldest first."""
    # Two indexed selections (by expiry, by base), merged: an OR across two indexes would
    # make SQLite scan every pending proposal.
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
            _PENDING,
            now,
            _PENDING,
            base_version,
            _PENDING,
            base_version,
            _PENDING,
            base_version,
            base_state_hash,
            limit,
        ),
    ).fetchall()
    return [PendingSummary(bytes(r[1]), int(r[2]), int(r[3]), bytes(r[4])) for r in rows]


def with_approvals(db: sqlite3.Connection, at_least: int, limit: int) -> list[bytes]:
    """Ids of PENDING proposals with at least `at_least` approvals stored, oldest first."""
    rows = db.execute(
        "SELECT p.proposal_id FROM proposals AS p WHERE p.state = ? AND "
        "(SELECT COUNT(*) FROM approvals AS a WHERE a.proposal_id = p.proposal_id) >= ? "
        "ORDER BY p.seq LIMIT ?",
        (_PENDING, max(at_least, 0), limit),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def set_state(db: sqlite3.Connection, proposal_id: bytes, change: StateChange) -> bool:
    """Move a PENDING proposal to `state` (or change its detail); False if it is closed."""
    row = db.execute("SELECT state FROM proposals WHERE proposal_id = ?", (proposal_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no proposal {proposal_id.hex()} in the store")
    if ProposalState(str(row[0])).closed:
        return False
    db.execute(
        "UPDATE proposals SET state = ?, detail = ?, applied_version = ?, closed_at = ? "
        "WHERE proposal_id = ?",
        (
            change.state.value,
            change.detail,
            change.applied_version,
            change.closed_at,
            proposal_id,
        ),
    )
    return True


def close(
    db: sqlite3.Connection, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
) -> list[bytes]:
    """Close each (id, final state, detail) that is still PENDING; the ids it closed."""
    closed: list[bytes] = []
    for proposal_id, state, detail in closings:
        cursor = db.execute(
            "UPDATE proposals SET state = ?, detail = ?, closed_at = ? "
            "WHERE proposal_id = ? AND state = ?",
            (state.value, detail, closed_at, proposal_id, _PENDING),
        )
        if cursor.rowcount == 1:
            closed.append(proposal_id)
    return closed


def purge(db: sqlite3.Connection, closed_before: int, expired_before: int) -> int:
    """Delete the closed proposals (and their signatures) that closed before `closed_before`
    and expired before `expired_before`; how many."""
    doomed = (
        "SELECT proposal_id FROM proposals WHERE closed_at > 0 AND closed_at < ? "
        "AND expires_at < ? AND state != ?"
    )
    arguments = (closed_before, expired_before, _PENDING)
    for table in ("approvals", "cancel_votes"):
        db.execute(
            f"DELETE FROM {table} WHERE proposal_id IN ({doomed})",  # noqa: S608
            arguments,
        )
    cursor = db.execute(
        f"DELETE FROM proposals WHERE proposal_id IN ({doomed})",  # noqa: S608
        arguments,
    )
    return int(cursor.rowcount)
