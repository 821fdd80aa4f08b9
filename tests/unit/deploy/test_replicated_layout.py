"""The files of a local domain on etcd (`hsm-domain init --coordinators N`): replicas
coordinator-1..N, one SPIFFE id and a key each, every replica pinned by every node, and the
etcd cluster's file (`deploy._coordinators`, `deploy._etcd_members`, `domain_edge.layout`).

A domain on SQLite with one coordinator keeps DIR/coordinator/ exactly (test_deploy_init.py
covers that tree; here only that nothing of etcd appears in it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from deploy import cli
from deploy._coordinators import check_coordinators, coordinator_pin
from deploy._etcd_members import DomainEtcd
from deploy.init import DomainLayout, add_node, init_domain, load_layout
from deploy.localdomain import FAST_SCRYPT_N
from domain_core.errors import InvalidInputError, PermissionDeniedError
from domain_core.pki import PeerIdentity, SpiffeId, certificate_fingerprint
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import CoordinatorConfig, NodeConfig
from domain_edge.layout import DomainPaths, replica_name, replica_number
from hsa_node.servicers import CoordinatorPin

pytestmark = pytest.mark.unit

SERVICE = "spiffe://local/coordinator/coordinator"
REPLICAS = ["coordinator-1", "coordinator-2", "coordinator-3"]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    root = tmp_path_factory.mktemp("ha") / "domain"
    return init_domain(root, nodes=2, operators=1, quorum=1, coordinators=3, scrypt_n=FAST_SCRYPT_N)


@pytest.fixture
def sqlite_domain(tmp_path: Path) -> DomainLayout:
    return init_domain(tmp_path / "one", nodes=1, operators=1, quorum=1, scrypt_n=FAST_SCRYPT_N)


def test_replica_names() -> None:
    assert [replica_name(n) for n in (1, 2, 10)] == [
        "coordinator-1",
        "coordinator-2",
        "coordinator-10",
    ]
    assert [replica_number(n) for n in ("coordinator-3", "coordinator", "coordinator-0")] == [
        3,
        None,
        None,
    ]
    assert replica_number("coordinator-1/../x") is None
    with pytest.raises(ValueError, match="numbered from 1"):
        replica_name(0)


@pytest.mark.parametrize(
    ("count", "store", "expected"),
    [
        (1, None, "sqlite"),
        (1, "sqlite", "sqlite"),
        (1, "etcd", "etcd"),
        (2, None, "etcd"),
        (3, "etcd", "etcd"),
    ],
)
def test_the_store_follows_the_number_of_coordinators(
    count: int, store: str | None, expected: str
) -> None:
    assert check_coordinators(count, store) == expected


@pytest.mark.parametrize(
    ("count", "store", "message"),
    [
        (2, "sqlite", "cannot share a SQLite store"),
        (0, None, "between 1 and 9"),
        (10, "etcd", "between 1 and 9"),
        (1, "redis", "must be one of sqlite, etcd"),
        (True, None, "whole number"),
    ],
)
def test_impossible_coordinator_counts_are_refused_before_anything_is_written(
    tmp_path: Path, count: int, store: str | None, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        init_domain(tmp_path / "d", nodes=1, operators=1, quorum=1, coordinators=count, store=store)
    assert not (tmp_path / "d").exists()


def test_the_replicas_tree_and_its_modes(replicated: DomainLayout) -> None:
    root = replicated.root
    assert replicated.coordinators == tuple(REPLICAS)
    assert DomainPaths(root).configured_coordinators() == REPLICAS
    assert not (root / "coordinator").exists()
    assert replicated.replicated
    assert replicated.process_names == [
        "etcd-1", "etcd-2", "etcd-3", *REPLICAS, "hsa-1", "hsa-2",
    ]  # fmt: skip
    assert mode(root / "etcd") == 0o700
    for member in ("etcd-1", "etcd-2", "etcd-3"):
        assert mode(root / "etcd" / member) == 0o700
        assert list((root / "etcd" / member).iterdir()) == []  # etcd fills it at its first start
    for name in REPLICAS:
        assert mode(root / name) == 0o700
        assert mode(root / name / "tls.key") == 0o600
        config = CoordinatorConfig.load(root / name / "config.json")
        assert config.name == name
        assert config.path(config.tls.cert) == root / name / "tls.crt"
        assert config.path(config.genesis_state) == root / "genesis.state"
    assert replicated.store_config == root / "coordinator-1" / "config.json"


def test_every_replica_names_the_one_etcd_cluster(replicated: DomainLayout) -> None:
    etcd = replicated.etcd
    assert etcd is not None
    ports = [p for m in etcd.cluster.members for p in (m.client_port, m.peer_port)]
    assert len(set(ports)) == 6
    spec = "etcd:" + ",".join(f"127.0.0.1:{m.client_port}" for m in etcd.cluster.members)
    assert etcd.store_spec == spec + "/hsm-domain"
    for name in REPLICAS:
        assert (
            CoordinatorConfig.load(replicated.coordinator_config_of(name)).store == etcd.store_spec
        )
    assert etcd.leader_key == b"hsm-domain/coordination/leader"
    assert etcd.never_started()


def test_replicas_share_one_spiffe_id_with_keys_of_their_own(replicated: DomainLayout) -> None:
    certificates = [replicated.coordinator_cert_of(n).read_bytes() for n in REPLICAS]
    keys = {replicated.coordinator_key_of(n).read_bytes() for n in REPLICAS}
    assert len(keys) == 3
    pin = coordinator_pin(replicated.root)
    assert pin.identity == SERVICE
    assert pin.fingerprints == tuple(certificate_fingerprint(c).hex() for c in certificates)
    assert len(set(pin.fingerprints)) == 3


def _identity(cert_pem: bytes) -> PeerIdentity:
    return PeerIdentity(
        SpiffeId("local", "coordinator", "coordinator"), cert_pem, certificate_fingerprint(cert_pem)
    )


def test_every_node_takes_every_replica_and_no_other_certificate_of_the_name(
    tmp_path: Path, replicated: DomainLayout
) -> None:
    """An attacker who gets the CA to issue one more `coordinator/coordinator` certificate (or
    steals a CA-issued one of another domain tree) is not a replica: the node configs pin the
    replicas' fingerprints, also those of a node added later."""
    add_node(replicated.root, "hsa-7")
    try:
        ca = load_domain_ca(replicated.ca_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        twin = ca.issue(
            SpiffeId("local", "coordinator", "coordinator"),
            key.public_key(),
            now=datetime.now(UTC),
        )
        for host in ("hsa-1", "hsa-2", "hsa-7"):
            config = NodeConfig.load(replicated.node_config(host))
            pin = CoordinatorPin.from_config(config)
            for name in REPLICAS:
                pin.check(_identity(replicated.coordinator_cert_of(name).read_bytes()))
            with pytest.raises(PermissionDeniedError, match="not the one this HSA pins"):
                pin.check(_identity(twin))
    finally:
        shutil.rmtree(replicated.node_dir("hsa-7"))


def test_a_pin_over_certificates_of_different_ids_is_refused(
    replicated: DomainLayout, tmp_path: Path
) -> None:
    other = init_domain(
        tmp_path / "other",
        nodes=1,
        operators=1,
        quorum=1,
        domain_id="other",
        scrypt_n=FAST_SCRYPT_N,
    )
    mixed = tmp_path / "mixed"
    for source, name in ((replicated, "coordinator-1"), (other, "coordinator")):
        target = mixed / name
        target.mkdir(parents=True)
        (target / "tls.crt").write_bytes(source.coordinator_cert_of(name).read_bytes())
    with pytest.raises(InvalidInputError, match="different SPIFFE ids"):
        coordinator_pin(mixed, ["coordinator-1", "coordinator"])


def test_a_sqlite_domain_keeps_its_one_coordinator_and_has_no_etcd(
    sqlite_domain: DomainLayout,
) -> None:
    assert sqlite_domain.coordinators == ("coordinator",)
    assert sqlite_domain.etcd is None
    assert not sqlite_domain.replicated
    assert not (sqlite_domain.root / "etcd").exists()
    assert sqlite_domain.process_names == ["coordinator", "hsa-1"]
    config = CoordinatorConfig.load(sqlite_domain.coordinator_config)
    assert (config.name, config.store) == ("coordinator", "sqlite:coordinator.db")
    assert sqlite_domain.store_config == sqlite_domain.coordinator_config


def test_one_replica_on_etcd(tmp_path: Path) -> None:
    layout = init_domain(
        tmp_path / "d", nodes=1, operators=1, quorum=1, store="etcd", scrypt_n=FAST_SCRYPT_N
    )
    assert layout.coordinators == ("coordinator-1",)
    assert layout.etcd is not None
    assert len(layout.etcd.names) == 3
    assert layout.replicated


@pytest.fixture
def etcd_copy(replicated: DomainLayout, tmp_path: Path) -> DomainPaths:
    paths = DomainPaths(tmp_path / "copy")
    assert replicated.etcd is not None
    DomainEtcd(replicated.etcd.cluster, replicated.etcd.prefix).save(paths)
    return paths


def test_the_cluster_file_reads_back_under_the_domain(
    replicated: DomainLayout, etcd_copy: DomainPaths
) -> None:
    loaded = DomainEtcd.load(etcd_copy)
    assert replicated.etcd is not None
    assert [m.client_port for m in loaded.cluster.members] == [
        m.client_port for m in replicated.etcd.cluster.members
    ]
    assert [m.data_dir for m in loaded.cluster.members] == [
        etcd_copy.root / "etcd" / f"etcd-{n}" for n in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["members"][0].update(name="../../elsewhere"), "bad name or port"),
        (lambda d: d["members"][0].update(name="/tmp/x"), "bad name or port"),
        (lambda d: d["members"][1].update(client_port=0), "bad name or port"),
        (lambda d: d["members"][1].update(peer_port=d["members"][0]["peer_port"]), "distinct"),
        (lambda d: d.update(prefix="../other"), "malformed"),
        (lambda d: d.update(format="something"), "format"),
        (lambda d: d.pop("token"), "token"),
    ],
)
def test_a_tampered_cluster_file_is_refused(
    etcd_copy: DomainPaths, change: object, message: str
) -> None:
    """A member's data directory is always DIR/etcd/<its name>: a cluster file cannot point
    etcd (which creates and writes it) at another directory."""
    document = json.loads(etcd_copy.etcd_cluster_file.read_text())
    change(document)  # type: ignore[operator]
    etcd_copy.etcd_cluster_file.write_text(json.dumps(document))
    with pytest.raises(InvalidInputError, match=message):
        DomainEtcd.load(etcd_copy)


def test_ports_are_chosen_again_only_for_a_cluster_that_never_started(
    etcd_copy: DomainPaths,
) -> None:
    chosen = DomainEtcd.load(etcd_copy)
    first = chosen.cluster.members[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", first.client_port))
        squatter.listen()
        assert first.client_port in chosen.ports_taken()
        moved = chosen.with_free_ports(etcd_copy)
    assert first.client_port not in [m.client_port for m in moved.cluster.members]
    assert DomainEtcd.load(etcd_copy) == moved
    assert moved.cluster.token == chosen.cluster.token
    (moved.cluster.members[1].data_dir / "member").mkdir()  # as etcd's first start leaves it
    assert not moved.never_started()
    with pytest.raises(InvalidInputError, match="has started before"):
        moved.with_free_ports(etcd_copy)


def test_cli_init_coordinators_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ha"
    code = cli.main(["init", str(target), "--nodes", "1", "--operators", "1", "--quorum", "1",
                     "--coordinators", "2", "--json"])  # fmt: skip
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert document["store"] == "etcd"
    assert list(document["coordinators"]) == ["coordinator-1", "coordinator-2"]
    assert sorted(document["etcd"]["members"]) == ["etcd-1", "etcd-2", "etcd-3"]
    assert load_layout(target).coordinators == ("coordinator-1", "coordinator-2")


@pytest.mark.parametrize(
    "extra", [["--coordinators", "2", "--store", "sqlite"], ["--coordinators", "0"]]
)
def test_cli_impossible_coordinators_are_usage_errors(
    tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["init", str(tmp_path / "x"), *extra]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
