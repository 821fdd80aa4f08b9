"""domain_edge.layout: the one spelling of a local domain's tree, and what `init` writes by it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.init import DomainLayout, init_domain, load_layout
from domain_edge.kms_client import read_cluster
from domain_edge.layout import COORDINATOR_NAME, DomainPaths

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    return init_domain(
        tmp_path_factory.mktemp("layout") / "domain",
        nodes=2,
        operators=2,
        quorum=1,
        now=NOW,
        scrypt_n=2**14,
    )


def test_paths_are_arithmetic_only(tmp_path: Path) -> None:
    paths = DomainPaths(Path("relative") / "dir")
    assert paths.ca_cert == Path("relative/dir/ca/ca.crt")
    assert paths.node_config("hsa-7") == Path("relative/dir/nodes/hsa-7/config.json")
    assert paths.ready_file(COORDINATOR_NAME) == Path("relative/dir/run/coordinator.json")
    assert paths.operator_passphrase("bob") == Path("relative/dir/operators/bob.passphrase")
    # Nothing is created or required on disk.
    missing = DomainPaths(tmp_path / "absent")
    assert missing.configured_hosts() == []
    assert not (tmp_path / "absent").exists()


def test_every_path_of_a_new_domain_exists(domain: DomainLayout) -> None:
    paths = DomainPaths(domain.root)
    files = [
        paths.domain_file,
        paths.genesis_state,
        paths.ca_cert,
        paths.coordinator_config,
        paths.coordinator_cert,
        paths.client_cert,
        paths.client_key,
    ]
    for host in ("hsa-1", "hsa-2"):
        files += [paths.node_config(host), paths.enrollment_file(host)]
    for name in ("alice", "bob"):
        files += [paths.operator_token(name), paths.operator_passphrase(name)]
    directories = [paths.run_dir, paths.log_dir, paths.node_identity_dir("hsa-1")]
    directories.append(paths.node_data_dir("hsa-2"))
    assert [p for p in files if not p.is_file()] == []
    assert [p for p in directories if not p.is_dir()] == []
    assert paths.configured_hosts() == ["hsa-1", "hsa-2"]


def test_the_loaded_layout_is_the_same_tree(domain: DomainLayout) -> None:
    layout = load_layout(domain.root)
    paths = DomainPaths(domain.root)
    assert layout.coordinator_config == paths.coordinator_config
    assert layout.node_configs == {h: paths.node_config(h) for h in ("hsa-1", "hsa-2")}
    assert layout.operator_tokens["bob"] == (
        paths.operator_token("bob"),
        paths.operator_passphrase("bob"),
    )


def test_configs_name_their_files_relative_to_themselves(domain: DomainLayout) -> None:
    """The configs `init` writes hold these exact relative paths (a domain directory can be
    moved, and a domain made before the layout module reads the same)."""
    node = json.loads(domain.node_configs["hsa-2"].read_text())
    assert (node["identity_dir"], node["data_dir"], node["genesis_state"]) == (
        "identity",
        "data",
        "../../genesis.state",
    )
    assert node["tls"] == {
        "ca": "../../ca/ca.crt",
        "cert": "identity/tls.crt",
        "key": "identity/tls.key",
    }
    coordinator = json.loads(domain.coordinator_config.read_text())
    assert coordinator["genesis_state"] == "../genesis.state"
    assert coordinator["tls"] == {"ca": "../ca/ca.crt", "cert": "tls.crt", "key": "tls.key"}


def test_the_key_client_finds_running_nodes_by_the_layout(domain: DomainLayout) -> None:
    paths = DomainPaths(domain.root)
    paths.ready_file("hsa-2").write_text(
        json.dumps({"address": "127.0.0.1:4002", "workers": ["127.0.0.1:4003"]})
    )
    try:
        endpoints, tls = read_cluster(domain.root)
    finally:
        paths.ready_file("hsa-2").unlink()
    assert endpoints == ["127.0.0.1:4002", "127.0.0.1:4003"]
    assert tls.ca_pem == paths.ca_cert.read_bytes()
    assert tls.cert_pem == paths.client_cert.read_bytes()
