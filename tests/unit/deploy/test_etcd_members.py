"""The command line of a loopback etcd cluster: loopback URLs only, one initial cluster for
all, the same line for the first start and every restart (`deploy.etcd`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.etcd import EtcdCluster, EtcdMember
from domain_core.limits import Limits

pytestmark = pytest.mark.unit


def _cluster(tmp_path: Path) -> EtcdCluster:
    return EtcdCluster.on_ports(tmp_path, [(2379, 2380), (22379, 22380), (32379, 32380)], "tok")


def _flags(command: list[str]) -> dict[str, str]:
    return dict(zip(command[1::2], command[2::2], strict=True))


def test_every_member_listens_on_loopback_only(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    assert [m.name for m in cluster.members] == ["etcd-1", "etcd-2", "etcd-3"]
    assert cluster.members[1].data_dir == tmp_path / "etcd-2"
    for member in cluster.members:
        command = cluster.command(member, "/usr/bin/etcd")
        assert command[0] == "/usr/bin/etcd"
        flags = _flags(command)
        for flag in (
            "--listen-client-urls",
            "--advertise-client-urls",
            "--listen-peer-urls",
            "--initial-advertise-peer-urls",
        ):
            assert flags[flag].startswith("http://127.0.0.1:"), (flag, flags[flag])
        assert flags["--listen-client-urls"] == f"http://127.0.0.1:{member.client_port}"
        assert flags["--listen-peer-urls"] == f"http://127.0.0.1:{member.peer_port}"
        assert flags["--name"] == member.name
        assert flags["--data-dir"] == str(member.data_dir)
        assert flags["--initial-cluster"] == (
            "etcd-1=http://127.0.0.1:2380,etcd-2=http://127.0.0.1:22380,"
            "etcd-3=http://127.0.0.1:32380"
        )
        assert (flags["--initial-cluster-state"], flags["--initial-cluster-token"]) == (
            "new",
            "tok",
        )
        # The largest sealed state fits in one request.
        assert int(flags["--max-request-bytes"]) > 2 * Limits().max_message_bytes


def test_endpoints_and_store_spec(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path)
    assert cluster.endpoints == ["127.0.0.1:2379", "127.0.0.1:22379", "127.0.0.1:32379"]
    assert cluster.store_spec() == "etcd:127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379"
    assert cluster.store_spec("hsm/prod").endswith(",127.0.0.1:32379/hsm/prod")


@pytest.mark.parametrize(
    "members",
    [
        (),
        (("a", 1, 2), ("a", 3, 4)),  # one name twice
        (("a", 1, 2), ("b", 2, 3)),  # one port twice
        (("a", 1, 1),),
    ],
)
def test_a_cluster_needs_distinct_names_and_ports(
    tmp_path: Path, members: tuple[tuple[str, int, int], ...]
) -> None:
    with pytest.raises(ValueError, match="etcd"):
        EtcdCluster(tuple(EtcdMember(n, c, p, tmp_path / n) for n, c, p in members), "t")
