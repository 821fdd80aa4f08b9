"""One SQLite write transaction, shared by the processes that keep a SQLite file.

`BEGIN IMMEDIATE` takes the write lock at the start, so two writers never both read and
then fail to upgrade; the transaction commits when the block ends and rolls back on any
exception (which is re-raised). Callers serialise access to the connection themselves.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run the block in one write-locking transaction on `db`: committed, or rolled back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
