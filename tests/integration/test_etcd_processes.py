"""Real etcd members (`deploy.etcd`): started healthy on loopback with private data, a paused
member is reported unhealthy and comes back, a killed one leaves a majority serving and rejoins
on restart, a member that cannot start is reported with its log, pid files are checked."""

from __future__ import annotations

import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from support.etcd import LocalEtcd, free_ports

from deploy.cluster import ProcessStartError
from deploy.etcd import EtcdCluster, member_health, pid_of, start_member, wait_healthy

pytestmark = [pytest.mark.integration, pytest.mark.etcd]


def _health(local: LocalEtcd) -> list[bool]:
    assert local.cluster is not None
    return [member_health(m, timeout=1.0).healthy for m in local.cluster.members]


def test_a_cluster_starts_healthy_and_survives_a_member(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(3)
    assert local.cluster is not None
    assert _health(local) == [True, True, True]
    for member in local.cluster.members:
        assert stat.S_IMODE(member.data_dir.stat().st_mode) == 0o700
    # Paused: silent, so unhealthy (a timeout); resumed: healthy again.
    local.pause(1)
    paused = member_health(local.cluster.members[1], timeout=0.5)
    assert (paused.healthy, paused.detail.startswith("unreachable")) == (False, True)
    local.resume(1)
    wait_healthy([local.processes[1]], timeout=20)
    # Killed: the other two still have a majority (after an election if it led).
    local.kill(2)
    assert not local.processes[2].is_running()
    wait_healthy(local.processes[:2], timeout=20)
    assert not member_health(local.cluster.members[2], timeout=0.5).healthy
    # Restarted on its data: it rejoins.
    local.restart(2)
    assert _health(local) == [True, True, True]


def test_a_member_without_its_majority_is_not_healthy(
    etcd_factory: Callable[[int], LocalEtcd],
) -> None:
    local = etcd_factory(3)
    assert local.cluster is not None
    local.kill(1)
    local.kill(2)
    with pytest.raises(ProcessStartError, match="not healthy within 2 s"):
        wait_healthy([local.processes[0]], timeout=2)


def test_a_member_that_cannot_start_is_reported_with_its_log(tmp_path: Path, etcd_bin: str) -> None:
    with socket.socket() as taken:  # its client port is someone else's
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        [peer] = free_ports(1)
        cluster = EtcdCluster.on_ports(tmp_path, [(taken.getsockname()[1], peer)], "tok")
        log = tmp_path / "etcd-1.log"
        started = start_member(cluster, cluster.members[0], log, etcd=etcd_bin)
        try:
            with pytest.raises(ProcessStartError, match="exited with status") as error:
                wait_healthy([started], timeout=20)
        finally:
            started.stop()
    assert error.value.log_file == log
    assert any("address already in use" in line for line in error.value.log_tail)


def test_a_pid_file_counts_only_for_its_own_member(
    etcd_factory: Callable[[int], LocalEtcd], tmp_path: Path
) -> None:
    local = etcd_factory(1)
    assert local.cluster is not None
    member = local.cluster.members[0]
    pid_file = tmp_path / "run" / "etcd-1.pid"
    pid_file.parent.mkdir()
    pid_file.write_text(f"{local.processes[0].pid}\n")
    assert pid_of(member, pid_file) == local.processes[0].pid
    other = EtcdCluster.on_ports(tmp_path / "other", [(5, 6)], "tok").members[0]
    assert pid_of(other, pid_file) is None  # alive, but not running that data directory
    local.kill(0)
    assert pid_of(member, pid_file) is None  # no longer alive
    pid_file.write_text("not a pid")
    assert pid_of(member, pid_file) is None
