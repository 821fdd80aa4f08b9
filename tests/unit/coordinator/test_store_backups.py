"""Backups written from, and restored into, every backend (`conftest.backend`: SQLite, and a
prefix of the real etcd cluster), with real content: the states of a simulated domain and key
records signed by its hosts, so that the backup verifies against the pinned genesis.

The attack: a backup file damaged in its last bytes (its trailer). Every record before it
parses and verifies, so the store has taken all of them when the damage shows: the load must
still leave the store empty (on etcd, after every batch was committed), and the store must
take the good backup afterwards (no marker or bookkeeping left behind).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.backups import BackupContent, key_record, new_key_id
from support.simulator import SimulatedDomain
from support.stores import EtcdBackend, StoreBackend

from domain_coordinator.backups import restore_backup, write_backup
from domain_coordinator.store import CoordinatorStore, HsaRecord
from domain_core.errors import BackupError, FailedPreconditionError


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    """A domain at version 3 (a domain key rotation, then hsa-3 removed)."""
    sim = SimulatedDomain.create("local")
    sim.advance(60)
    sim.transition([sim.rotate_domain_key_change()])
    sim.advance(60)
    sim.transition([sim.remove_host_change("hsa-3")])
    return sim


@pytest.fixture
def source(backend: StoreBackend, sim: SimulatedDomain) -> CoordinatorStore:
    content = BackupContent(sim)
    for index in range(300):  # several transactions of the etcd load
        content.add_key(key_record(sim, f"hsa-{1 + index % 2}", new_key_id()), revision=1 + index)
    content.hsas.append(HsaRecord("hsa-1", "127.0.0.1:7001", 10, 3, sim.head.hash, 10))
    store = backend.open()
    content.load(store)
    return store


def genesis(sim: SimulatedDomain) -> bytes:
    return sim.genesis.to_bytes()


def items(store: CoordinatorStore) -> list[object]:
    with store.snapshot() as snapshot:
        return list(snapshot.items())


def test_a_backup_restores_into_an_empty_store_exactly(
    backend: StoreBackend, source: CoordinatorStore, sim: SimulatedDomain, tmp_path: Path
) -> None:
    written = write_backup(source, tmp_path / "b.backup", genesis(sim))
    assert written.summary.counts == source.contents()
    target = backend.sibling("restored").open()
    summary = restore_backup(target, written.path, genesis(sim))
    assert summary.counts == source.contents() == target.contents()
    assert items(target) == items(source)
    with pytest.raises(FailedPreconditionError, match="is not empty"):
        restore_backup(target, written.path, genesis(sim))


def test_a_backup_damaged_in_its_trailer_leaves_the_store_empty(
    backend: StoreBackend, source: CoordinatorStore, sim: SimulatedDomain, tmp_path: Path
) -> None:
    good = write_backup(source, tmp_path / "b.backup", genesis(sim)).path
    damaged = tmp_path / "damaged.backup"
    data = bytearray(good.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))
    restored = backend.sibling("restored")
    target = restored.open()
    with pytest.raises(BackupError, match="does not match its content"):
        restore_backup(target, damaged, genesis(sim))
    assert target.contents().empty
    if isinstance(restored, EtcdBackend):
        assert restored.raw_keys() == []  # not one key under the prefix
    restore_backup(target, good, genesis(sim))  # nothing was left behind to refuse it
    assert items(target) == items(source)
