"""Backups of a real domain, restored (issue 15, item 5): an older backup never rolls a key
back where an HSA knows a newer version, the restore lists those keys, and a store restored
behind the HSAs is repaired from them.

Real processes (`LocalCluster`) and the real command (`hsm-domain`, run as a process). The
last test moves a SQLite domain onto the real 3-member etcd cluster (`store migrate`) and runs
its coordinator there.
The attack: a backup taken before a key was disabled, another rotated and a third created
(and before a domain key rotation) is restored into the coordinator's store. The HSAs know
the newer key records (their floors); a client then asks an HSA that never read these keys
itself (its floors came from its peers), so no cached record can hide the refusal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.cluster import LocalCluster
from support.etcd import LocalEtcd, fresh_prefix
from support.tools import json_output, one_line_error, run_tool

from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore
from domain_coordinator.store_spec import open_store
from domain_core.errors import FailedPreconditionError, NotFoundError
from domain_edge.client import rotate_domain_key
from domain_edge.kms_client import KeyClient

pytestmark = pytest.mark.cluster

STORE_FILES = ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm")


def ok(*arguments: str | Path) -> Any:
    return json_output("hsm-domain", *arguments, timeout=300)


def refused(*arguments: str | Path) -> str:
    line = one_line_error(run_tool("hsm-domain", *arguments, timeout=300))
    assert line.startswith("hsm-domain: error: ")
    return line


def move_store_aside(cluster: LocalCluster, to: Path) -> None:
    to.mkdir()
    for name in STORE_FILES:
        source = cluster.layout.coordinator_dir / name
        if source.exists():
            shutil.move(source, to / name)


def client_on(cluster: LocalCluster, host: str) -> KeyClient:
    tls = cluster.client_tls()
    return KeyClient(
        [cluster.address(host)],
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=5,
    )


def apply_rotation(cluster: LocalCluster) -> int:
    with cluster.coordinator_client() as client:
        view = client.propose([rotate_domain_key()], cluster.operator_signer("alice"))
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    return view.applied_version


def head(cluster: LocalCluster) -> int:
    with cluster.coordinator_client() as client:
        return client.latest_state().version


def test_an_older_backup_never_rolls_a_key_back_and_the_restore_lists_it(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=3)
    directory = cluster.directory
    backup = tmp_path / "before.backup"
    with client_on(cluster, "hsa-1") as first:
        disabled = first.create_key(description="disabled after the backup").key_id
        rotated = first.create_key(description="rotated after the backup").key_id
        kept = first.create_key(description="unchanged").key_id
        blob = first.encrypt(kept, b"payroll")
        written = ok("backup", directory, backup)
        assert written["counts"]["keys"] == 3
        assert written["newest_version"] == 1
        first.disable_key(disabled)
        first.rotate_key(rotated)
        created = first.create_key(description="created after the backup").key_id
    assert apply_rotation(cluster) == 2
    cluster.wait_converged()
    verified = ok("backup", "verify", backup, "--genesis", cluster.layout.genesis_state)
    assert verified["verified"] is True

    # Restore while the coordinator runs: refused, nothing touched.
    assert "coordinator (pid" in refused("restore", directory, backup)
    cluster.stop_coordinator()
    # Into the store it has: refused, naming what is there.
    assert "is not empty: it holds 2 states" in refused("restore", directory, backup)
    move_store_aside(cluster, tmp_path / "newer-store")
    restored = ok("restore", directory, backup)
    assert restored["newest_version"] == 1
    assert restored["hsa_version"] == 2
    assert all(said.endswith("(asked)") for said in restored["hsas_asked"].values())
    behind = {k["key_id"]: k for k in restored["keys_behind"]}
    assert set(behind) == {disabled, rotated, created}
    assert behind[disabled]["backup_version"] == 1
    assert behind[disabled]["newest_version"] == 2
    assert behind[created]["backup_version"] is None

    # The coordinator starts on the restored store behind the HSAs and repairs it from them.
    cluster.start_coordinator()
    cluster.wait_for(lambda: head(cluster) == 2, timeout=30, what="the store repaired")
    # hsa-3 never read these keys: its floors came from its peers. It refuses every older
    # record the restored store serves, and knows nothing of the key created after it.
    with client_on(cluster, "hsa-3") as third:
        for key_id in (disabled, rotated):
            with pytest.raises(FailedPreconditionError, match="older record of key"):
                third.describe_key(key_id)
        with pytest.raises(NotFoundError):
            third.describe_key(created)
        assert third.decrypt(blob) == b"payroll"  # what the backup holds as is still serves


def test_restore_with_the_domain_down_and_a_migration(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=1)
    directory = cluster.directory
    backup = tmp_path / "one.backup"
    with client_on(cluster, "hsa-1") as client:
        key_id = client.create_key(description="before").key_id
        ok("backup", directory, backup)
        client.disable_key(key_id)
    cluster.stop_coordinator()
    cluster.stop_node("hsa-1")

    # A backup damaged in one byte is refused whole: the store stays empty.
    move_store_aside(cluster, tmp_path / "old-store")
    damaged = tmp_path / "damaged.backup"
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x20
    damaged.write_bytes(bytes(data))
    refused("backup", "verify", damaged, "--genesis", cluster.layout.genesis_state)
    refused("restore", directory, damaged)
    contents = ok("restore", directory, backup)  # the store was left empty: this one loads
    # With the HSA down, its floor file says what it knew.
    assert contents["hsas_asked"]["hsa-1"].startswith("not running; 1 floors read")
    assert [k["key_id"] for k in contents["keys_behind"]] == [key_id]

    # Migrate the restored store to a new SQLite file; the old file stays as it was.
    config = cluster.layout.coordinator_config
    old_file = cluster.layout.coordinator_dir / "coordinator.db"
    before = old_file.read_bytes()
    moved = ok("store", "migrate", directory, "--to", "sqlite:migrated/coordinator.db")
    assert moved["new_store"] == "sqlite:migrated/coordinator.db"
    assert moved["counts"]["keys"] == 1
    assert json.loads(config.read_text())["store"] == "sqlite:migrated/coordinator.db"
    assert old_file.read_bytes() == before
    # Again into the now non-empty store: refused, the config unchanged.
    message = refused("store", "migrate", directory, "--to", "sqlite:coordinator.db")
    assert "is not empty" in message
    assert json.loads(config.read_text())["store"] == "sqlite:migrated/coordinator.db"

    # The coordinator runs on the migrated store; the HSA refuses the older record.
    cluster.start_node("hsa-1", wait_for_health=False)
    cluster.start_coordinator()
    cluster.wait_converged(hosts=("hsa-1",))
    assert head(cluster) == 1
    with client_on(cluster, "hsa-1") as client:

        def refusal() -> str:
            # hsa-1 started before the coordinator: until its channel has reconnected (its
            # back-off), the key it never cached is UnavailableError, which `wait_for` retries.
            try:
                client.describe_key(key_id)
            except FailedPreconditionError as error:
                return str(error)
            return "the older record was served"

        refused_record = cluster.wait_for(refusal, timeout=30, what="hsa-1 reading the key")
        assert "older record of key" in refused_record


def snapshot_items(store: CoordinatorStore) -> list[object]:
    try:
        with store.snapshot() as snapshot:
            return list(snapshot.items())
    finally:
        store.close()


@pytest.mark.etcd
def test_a_sqlite_domain_migrates_to_etcd_and_the_coordinator_serves_it(
    local_cluster: Callable[..., LocalCluster], etcd_cluster: LocalEtcd, tmp_path: Path
) -> None:
    """`store migrate DIR --to etcd:...` from a SQLite domain onto the real 3-member cluster;
    the coordinator then starts on etcd and serves the same chain, keys and proposals, and
    goes on from them: a pending proposal approved, a key created."""
    cluster = local_cluster(nodes=2)
    directory = cluster.directory
    with client_on(cluster, "hsa-1") as first:
        kept = first.create_key(description="kept").key_id
        blob = first.encrypt(kept, b"payroll")
        for index in range(5):
            first.create_key(description=f"more {index}")
    assert apply_rotation(cluster) == 2
    with cluster.coordinator_client() as client:
        pending = client.propose([rotate_domain_key()], cluster.operator_signer("alice"))
    cluster.wait_converged()
    cluster.stop_coordinator()
    db = cluster.layout.coordinator_dir / "coordinator.db"
    before = snapshot_items(SqliteStore(db))

    # Into a prefix that holds anything: refused, the config unchanged.
    occupied = etcd_cluster.store_spec(fresh_prefix())
    squatter = open_store(occupied, directory)
    squatter.register_hsa("hsa-9", "127.0.0.1:9009", 1)
    squatter.close()
    message = refused("store", "migrate", directory, "--to", occupied)
    assert "is not empty: it holds 1 registered HSA" in message
    assert json.loads(cluster.layout.coordinator_config.read_text())["store"] == (
        "sqlite:coordinator.db"
    )

    spec = etcd_cluster.store_spec(fresh_prefix())
    moved = ok("store", "migrate", directory, "--to", spec)
    assert (moved["old_store"], moved["new_store"]) == ("sqlite:coordinator.db", spec)
    assert (moved["counts"]["states"], moved["counts"]["keys"]) == (2, 6)
    assert moved["counts"]["proposals"] == 2
    assert json.loads(cluster.layout.coordinator_config.read_text())["store"] == spec
    assert snapshot_items(open_store(spec, directory)) == before

    # The coordinator runs on etcd: the same chain, keys and proposals, and it goes on.
    cluster.start_coordinator()
    assert head(cluster) == 2
    with cluster.coordinator_client() as client:
        view = client.get_proposal(pending.proposal_id)
        assert not view.applied
        view = client.approve(pending.proposal_id, cluster.operator_signer("bob"))
    assert view.applied_version == 3, view.detail
    cluster.wait_converged()
    with client_on(cluster, "hsa-2") as second:  # hsa-2 never read these keys itself
        # Its channel to the restarted coordinator may still be in its reconnect back-off:
        # until then the key it never cached is UnavailableError, which `wait_for` retries.
        described = cluster.wait_for(
            lambda: second.describe_key(kept), timeout=30, what="hsa-2 reading a migrated key"
        )
        assert described.key_id == kept
        assert second.decrypt(blob) == b"payroll"
        created = second.create_key(description="after the migration").key_id
    etcd_store = open_store(spec, directory)
    try:
        assert etcd_store.latest_version() == 3
        assert etcd_store.get_key(created) is not None
        assert etcd_store.contents().keys == 7
    finally:
        etcd_store.close()
    old = SqliteStore(db)
    try:
        assert old.latest_version() == 2  # the old store was only read
        assert old.get_key(created) is None
    finally:
        old.close()
