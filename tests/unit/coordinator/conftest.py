"""The store contract suite's fixtures: every backend of `CoordinatorStore`, one test each.

`backend` is parametrized over the backends; the SQLite parameter is a `unit` test, the etcd
one (a fresh key prefix on the session's real 3-member cluster) an `etcd` and `integration`
test. `store` is a store opened on it; `backend.open()` opens more (a restart, a replica).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stores import SqliteBackend, StoreBackend

from domain_coordinator.store import CoordinatorStore

BACKENDS = [pytest.param("sqlite", marks=pytest.mark.unit)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """One empty backing store of each kind."""
    made: StoreBackend = SqliteBackend(tmp_path / "coordinator.db")
    try:
        yield made
    finally:
        made.close_all()


@pytest.fixture
def store(backend: StoreBackend) -> CoordinatorStore:
    """A store opened on the backend (closed with it)."""
    return backend.open()
