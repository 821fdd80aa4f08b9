"""What only SqliteStore has: its file's mode and pragmas, the upgrade of older files, and the
`sqlite:` store spec. The invariants every backend keeps are tested once for all of them in the
store contract suite (`test_store_contract*.py`, `test_store_replicas.py`)."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store_spec import open_store
from domain_core.errors import InvalidInputError

pytestmark = pytest.mark.unit


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(db_path)
    yield s
    s.close()


def test_file_mode_and_pragmas(store: SqliteStore, db_path: Path) -> None:
    store.append_state(1, b"genesis")
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_store_file_without_the_reported_version_columns_is_migrated(db_path: Path) -> None:
    # The hsas table as the first coordinator releases made it, with a registered HSA.
    with sqlite3.connect(db_path) as old:
        old.executescript(
            """
            CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta (name, value) VALUES ('schema', '1');
            CREATE TABLE states (version INTEGER PRIMARY KEY, state BLOB NOT NULL);
            INSERT INTO states (version, state) VALUES (1, x'0102');
            CREATE TABLE hsas (
                host_id TEXT PRIMARY KEY, address TEXT NOT NULL, registered_at INTEGER NOT NULL
            );
            INSERT INTO hsas (host_id, address, registered_at) VALUES ('hsa-1', '127.0.0.1:1', 7);
            """
        )
    old.close()

    store = SqliteStore(db_path)
    try:
        assert store.latest_state() == b"\x01\x02"
        [hsa] = store.list_hsas()
        assert (hsa.host_id, hsa.address, hsa.registered_at) == ("hsa-1", "127.0.0.1:1", 7)
        assert (hsa.version, hsa.state_hash, hsa.reported_at) == (0, b"", 0)
        assert store.record_hsa_version("hsa-1", 1, b"\x11" * 32, 8)
        store.register_hsa("hsa-2", "127.0.0.1:2", 9, 1, b"\x11" * 32)
    finally:
        store.close()
    again = SqliteStore(db_path)  # finds the columns there and keeps what was written
    try:
        assert [(h.host_id, h.version, h.reported_at) for h in again.list_hsas()] == [
            ("hsa-1", 1, 8),
            ("hsa-2", 1, 9),
        ]
    finally:
        again.close()
    with sqlite3.connect(db_path) as check:
        columns = [r[1] for r in check.execute("PRAGMA table_info(hsas)")]
        schema = check.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
    check.close()
    assert columns == [
        "host_id", "address", "registered_at", "version", "state_hash", "reported_at",
    ]  # fmt: skip
    # Upgraded: an older coordinator (which would serve tombstones, and store proposals
    # without their proposer and base columns) refuses it.
    assert schema == "3"


def test_open_store(tmp_path: Path) -> None:
    store = open_store("sqlite:sub/c.db", tmp_path)
    try:
        assert isinstance(store, SqliteStore)
        assert (tmp_path / "sub" / "c.db").exists()
    finally:
        store.close()
    with pytest.raises(InvalidInputError, match="unknown scheme 'mysql'; use sqlite:PATH or etcd:"):
        open_store("mysql:x", tmp_path)
    with pytest.raises(InvalidInputError, match="SCHEME:VALUE"):
        open_store("coordinator.db", tmp_path)


def _pid(index: int) -> bytes:
    return index.to_bytes(32, "big")


BASE = b"\xb0" * 32


def test_proposals_of_an_older_store_file_get_their_columns(db_path: Path) -> None:
    from domain_proto import domain_pb2

    def proposal(proposer: str, version: int) -> bytes:
        return domain_pb2.Proposal(
            domain_id="local",
            base_version=version,
            base_state_hash=BASE,
            proposer_id=proposer,
            created_at=1,
            expires_at=900,
        ).SerializeToString()

    first = SqliteStore(db_path)
    first.close()
    # Rows as a schema-2 coordinator wrote them: no proposer, base or closing time.
    with sqlite3.connect(db_path) as old:
        old.execute("UPDATE meta SET value = '2' WHERE name = 'schema'")
        old.executemany(
            "INSERT INTO proposals (proposal_id, proposal, state, created_at, expires_at) "
            "VALUES (?, ?, ?, 1, 900)",
            [
                (_pid(1), proposal("a" * 64, 4), "pending"),
                (_pid(2), proposal("b" * 64, 3), "applied"),
                (_pid(3), b"\xff\xff not a proposal", "pending"),
            ],
        )
    old.close()
    store = SqliteStore(db_path)
    try:
        records = {r.proposal_id: r for r in store.list_proposals(True, limit=10)}
        assert (records[_pid(1)].proposer, records[_pid(1)].base_version) == ("a" * 64, 4)
        assert (records[_pid(1)].base_state_hash, records[_pid(1)].closed_at) == (BASE, 0)
        assert (records[_pid(2)].proposer, records[_pid(2)].closed_at) == ("b" * 64, 900)
        assert records[_pid(3)].base_state_hash == b""  # unparseable: stale at the next sweep
        assert store.count_proposals(proposer="a" * 64) == 1
        assert [d.proposal_id for d in store.due_proposals(100, 4, BASE, 10)] == [_pid(3)]
    finally:
        store.close()
