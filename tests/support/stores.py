"""The coordinator's store backends as the shared contract suite sees them.

A `StoreBackend` is one backing (a SQLite file, or a prefix of a real etcd cluster) on which the
suite opens as many `CoordinatorStore`s as it needs: a second one is a reopen after a restart,
or a second coordinator replica sharing the store; `sibling` gives another empty backing of
the same kind (where a snapshot is loaded). `raw_signature_count` looks under the
interface, so that a test can check that a purge left no approval or vote behind.
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from pathlib import Path

from domain_coordinator.etcd_store import EtcdStore
from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore
from domain_edge.etcd import EtcdClient, Range


class StoreBackend(ABC):
    """One backing store; `open` gives another `CoordinatorStore` on it."""

    name: str
    shared: bool
    """True when other writers can change the backing (coordinator replicas)."""

    def __init__(self) -> None:
        self._opened: list[CoordinatorStore] = []
        self._siblings: list[StoreBackend] = []

    def sibling(self, name: str) -> StoreBackend:
        """Another empty backing of the same kind, named after `name` (a restore's or a
        migration's target); closed with this one."""
        made = self._sibling(name)
        self._siblings.append(made)
        return made

    @abstractmethod
    def _sibling(self, name: str) -> StoreBackend: ...

    def open(self) -> CoordinatorStore:
        """A new store on this backing (a reopen, or another replica); closed by `close_all`."""
        store = self._open()
        self._opened.append(store)
        return store

    @abstractmethod
    def _open(self) -> CoordinatorStore: ...

    @abstractmethod
    def raw_signature_count(self) -> tuple[int, int]:
        """How many approvals and votes to cancel are stored, read under the interface."""

    @abstractmethod
    def raw_proposal_rows(self) -> int:
        """How many rows (keys) of proposals, their signatures and indexes are stored, read
        under the interface (counters excepted): 0 once every proposal is purged."""

    def close_all(self) -> None:
        """Close every store `open` gave (closing twice is allowed)."""
        for store in self._opened:
            store.close()
        self._opened.clear()
        for sibling in self._siblings:
            sibling.close_all()


class SqliteBackend(StoreBackend):
    """One SQLite file."""

    name = "sqlite"
    shared = False

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _open(self) -> CoordinatorStore:
        return SqliteStore(self.path)

    def _sibling(self, name: str) -> StoreBackend:
        return SqliteBackend(self.path.with_name(f"{name}.db"))

    def raw_signature_count(self) -> tuple[int, int]:
        with sqlite3.connect(self.path) as db:
            approvals = int(db.execute("SELECT COUNT(*) FROM approvals").fetchone()[0])
            votes = int(db.execute("SELECT COUNT(*) FROM cancel_votes").fetchone()[0])
        db.close()
        return approvals, votes

    def raw_proposal_rows(self) -> int:
        with sqlite3.connect(self.path) as db:
            rows = sum(
                int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
                for table in ("proposals", "approvals", "cancel_votes")
            )
        db.close()
        return rows


class EtcdBackend(StoreBackend):
    """One key prefix of a real etcd cluster (fresh per test, so tests share a cluster)."""

    name = "etcd"
    shared = True

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        super().__init__()
        self.endpoints = endpoints
        self.prefix = prefix

    def _open(self) -> CoordinatorStore:
        return EtcdStore.open(self.endpoints, self.prefix)

    def _sibling(self, name: str) -> StoreBackend:
        # Beside the prefix, never under it (`P/` would cover `P/name/`).
        return EtcdBackend(self.endpoints, f"{self.prefix}-{name}")

    def raw_keys(self) -> list[bytes]:
        """Every key under the store's prefix, whatever wrote it."""
        with EtcdClient(self.endpoints) as client:
            found = client.range(Range.prefix(f"{self.prefix}/".encode(), keys_only=True))
        return [kv.key for kv in found.kvs]

    def raw_signature_count(self) -> tuple[int, int]:
        root = f"{self.prefix}/proposals/".encode()
        with EtcdClient(self.endpoints) as client:
            approvals = client.range(Range.prefix(root + b"approval/", count_only=True)).count
            votes = client.range(Range.prefix(root + b"vote/", count_only=True)).count
        return approvals, votes

    def raw_proposal_rows(self) -> int:
        root = f"{self.prefix}/proposals/".encode()
        with EtcdClient(self.endpoints) as client:
            found = client.range(Range.prefix(root, keys_only=True))
        return sum(
            1 for kv in found.kvs if kv.key != root + b"guard" and not kv.key.endswith(b"/count")
        )
