"""The store contract suite's fixtures: every backend of `CoordinatorStore`, one test each.

`backend` is parametrized over the backends; the SQLite parameter is a `unit` test, the etcd
one (a fresh key prefix on the session's real 3-member cluster) an `etcd` and `integration`
test. `store` is a store opened on it; `backend.open()` opens more (a restart, a replica).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.etcd import fresh_prefix
from support.stores import EtcdBackend, SqliteBackend, StoreBackend

from domain_coordinator.store import CoordinatorStore

BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.unit),
    pytest.param("etcd", marks=[pytest.mark.etcd, pytest.mark.integration]),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """One empty backing store of each kind (etcd: a fresh prefix on the session's cluster;
    the members' log tails are printed when the test fails)."""
    made: StoreBackend
    if request.param == "etcd":
        cluster = request.getfixturevalue("etcd_cluster")
        made = EtcdBackend(cluster.endpoints, fresh_prefix())
    else:
        made = SqliteBackend(tmp_path / "coordinator.db")
    try:
        yield made
    finally:
        made.close_all()
        report = getattr(request.node, "rep_call", None)
        if request.param == "etcd" and report is not None and report.failed:
            print(cluster.log_tails())


@pytest.fixture
def store(backend: StoreBackend) -> CoordinatorStore:
    """A store opened on the backend (closed with it)."""
    return backend.open()
