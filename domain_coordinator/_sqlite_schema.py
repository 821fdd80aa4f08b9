"""The schema of the coordinator's SQLite file, and the upgrade of files older coordinators made.

Invariants:
- every statement here is idempotent: opening a file twice, or two coordinators opening one
  file, changes nothing the first opening did not;
- a file of an older schema gains the tables, columns (each with a default) and indexes of
  this one, and the columns it gains are filled from the rows' own bytes, in one transaction
  with the new schema number; a file of a newer schema than this coordinator understands is
  refused (RuntimeError naming both numbers) and left as it is.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from google.protobuf.message import DecodeError

from domain_coordinator.store import MAX_STORED_INTEGER, ProposalState
from domain_proto import domain_pb2

# 2: key records have tombstones (`deleted_at`) and a `creator`; a schema-1 file is upgraded
# on open, and an older coordinator (which would serve tombstones as keys) refuses the file.
# 3: proposals carry their proposer, base and closing time in columns (the sweeper and the
# caps read them); an older coordinator would store proposals without them, so it refuses the
# file.
SCHEMA_VERSION = 3
_UPGRADABLE_SCHEMAS = frozenset({"1", "2"})

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
CREATE TABLE IF NOT EXISTS fences (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    value BLOB NOT NULL
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
                min(int(message.base_version), MAX_STORED_INTEGER),
                bytes(message.base_state_hash),
                proposal_id,
            ),
        )
    db.execute(
        "UPDATE proposals SET closed_at = expires_at WHERE state != ? AND closed_at = 0",
        (ProposalState.PENDING.value,),
    )


# Run first, outside a transaction (executescript commits on its own).
SCRIPTS = (_SCHEMA, _ADDED_TABLES)


def upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Add what a file of an older schema lacks and set the schema number, inside the caller's
    transaction (after `SCRIPTS` ran); RuntimeError for a file of an unknown schema."""
    for table, column, definition in _ADDED_COLUMNS:
        present = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    for statement in filter(None, (s.strip() for s in _INDEXES.split(";"))):
        db.execute(statement)
    _fill_proposal_columns(db)
    row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif row[0] in _UPGRADABLE_SCHEMAS:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION),))
    elif row[0] != str(SCHEMA_VERSION):
        raise RuntimeError(
            f"{path} has store schema {row[0]}, this coordinator understands {SCHEMA_VERSION}"
        )
