"""Tests for deploy.init and deploy.enrollment: the files of a local domain, and enrollments.

`init_domain` runs once per module (it is the slow part: tokens use scrypt) and tests that
change the tree work on their own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy import cli, cluster
from deploy.enrollment import read_enrollment, verify_enrollment
from deploy.init import (
    DomainLayout,
    add_node,
    init_domain,
    load_layout,
    operator_names,
    read_passphrase,
)
from domain_core import crypto
from domain_core.chain import TrustedChain
from domain_core.errors import (
    AlreadyExistsError,
    HsmDomainError,
    InvalidInputError,
    NotFoundError,
)
from domain_core.model import SealedState
from domain_core.pki import (
    SpiffeId,
    certificate_der,
    certificate_fingerprint,
    spiffe_id_from_certificate,
    verify_certificate_chain,
)
from domain_edge.config import CoordinatorConfig, NodeConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.identity_files import load_host_certificate, load_host_identity

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FAST_SCRYPT = 2**14


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    return init_domain(
        tmp_path_factory.mktemp("init") / "domain",
        nodes=3,
        operators=3,
        quorum=2,
        now=NOW,
        scrypt_n=FAST_SCRYPT,
    )


@pytest.fixture
def domain_copy(domain: DomainLayout, tmp_path: Path) -> DomainLayout:
    target = tmp_path / "copy"
    shutil.copytree(domain.root, target)
    return load_layout(target)


def test_operator_names() -> None:
    assert operator_names(3) == ["alice", "bob", "carol"]
    assert operator_names(12)[9:] == ["judy", "op-11", "op-12"]


def test_init_creates_the_documented_tree(domain: DomainLayout) -> None:
    root = domain.root
    expected = [
        "domain.json",
        "genesis.state",
        "ca/ca.crt",
        "ca/ca.key",
        "coordinator/config.json",
        "coordinator/tls.crt",
        "coordinator/tls.key",
        "clients/demo-app/tls.crt",
        "clients/demo-app/tls.key",
        "run",
        "logs",
    ]
    for host in ("hsa-1", "hsa-2", "hsa-3"):
        expected += [
            f"nodes/{host}/config.json",
            f"nodes/{host}/identity/host.json",
            f"nodes/{host}/identity/tls.crt",
            f"nodes/{host}/identity/tls.key",
            f"nodes/{host}/data",
            f"nodes/{host}/enrollment.bin",
        ]
    for name in ("alice", "bob", "carol"):
        expected += [f"operators/{name}.token", f"operators/{name}.passphrase"]
    missing = [p for p in expected if not (root / p).exists()]
    assert missing == []
    assert list(domain.node_configs) == ["hsa-1", "hsa-2", "hsa-3"]
    assert domain.genesis_nodes == ("hsa-1", "hsa-2", "hsa-3")
    assert domain.quorum == 2
    # No staging directory is left next to the domain.
    assert [p.name for p in root.parent.iterdir()] == ["domain"]


def test_every_secret_file_is_0600_and_private_dirs_0700(domain: DomainLayout) -> None:
    root = domain.root
    secrets = [p for p in root.rglob("*") if p.is_file() and p.suffix in {".key", ".token"}]
    secrets += list(root.glob("operators/*.passphrase"))
    assert len(secrets) == 1 + 1 + 1 + 3 * 3 + 3 + 3  # ca, coordinator, client, hosts, ops
    assert {str(p.relative_to(root)): mode(p) for p in secrets} == {
        str(p.relative_to(root)): 0o600 for p in secrets
    }
    for directory in ("", "ca", "operators", "coordinator", "clients/demo-app", "nodes/hsa-1"):
        assert mode(root / directory) == 0o700, directory
    assert mode(root / "genesis.state") == 0o644


def test_genesis_verifies_against_the_pinned_hash(domain: DomainLayout) -> None:
    document = json.loads((domain.root / "domain.json").read_text())
    state = SealedState.from_bytes(domain.genesis_state.read_bytes())
    assert document["genesis_hash"] == state.hash.hex() == domain.genesis_hash.hex()
    chain = TrustedChain.from_genesis("local", bytes.fromhex(document["genesis_hash"]), state)
    assert chain.version == 1
    manifest = state.manifest.message
    assert [h.host_id for h in manifest.hosts] == ["hsa-1", "hsa-2", "hsa-3"]
    assert manifest.quorum.threshold == 2
    assert state.message.producer_host_id == "hsa-1"
    # Every operator approved the ceremony, and domain.json names them by their key ids.
    assert {a.operator_id for a in state.approvals} == {o.operator_id for o in manifest.operators}
    assert document["operators"] == [
        {"name": o.name, "operator_id": o.operator_id} for o in manifest.operators
    ]
    assert [o.name for o in manifest.operators] == ["alice", "bob", "carol"]


def test_host_records_match_identities_and_certificates(domain: DomainLayout) -> None:
    state = SealedState.from_bytes(domain.genesis_state.read_bytes())
    ca_pem = domain.ca_cert.read_bytes()
    for host in state.manifest.message.hosts:
        identity_dir = domain.node_dir(host.host_id) / "identity"
        identity = load_host_identity(identity_dir)
        cert = load_host_certificate(identity, identity_dir)
        assert identity.signing_public_key.spki_der == host.signing_public_key
        assert identity.agreement_public_key == host.agreement_public_key
        assert certificate_fingerprint(cert) == host.tls_certificate_fingerprint
        assert spiffe_id_from_certificate(cert) == SpiffeId("local", "hsa", host.host_id)
        verify_certificate_chain(cert, ca_pem, NOW)


def test_configs_load_and_resolve_to_the_files(domain: DomainLayout) -> None:
    node = NodeConfig.load(domain.node_configs["hsa-2"])
    assert node.host_id == "hsa-2"
    assert node.genesis_hash == domain.genesis_hash.hex()
    assert node.coordinator == ""
    assert node.path(node.genesis_state) == domain.genesis_state
    assert node.path(node.tls.ca) == domain.ca_cert
    assert node.path(node.tls.key) == domain.node_dir("hsa-2") / "identity" / "tls.key"
    assert node.path(node.data_dir).is_dir()
    assert node.path(node.tls.cert) == domain.node_dir("hsa-2") / "identity" / "tls.crt"

    coordinator = CoordinatorConfig.load(domain.coordinator_config)
    assert coordinator.store == "sqlite:coordinator.db"
    assert coordinator.path(coordinator.genesis_state) == domain.genesis_state
    cert = coordinator.path(coordinator.tls.cert).read_bytes()
    assert spiffe_id_from_certificate(cert) == SpiffeId("local", "coordinator", "coordinator")
    client = domain.client_cert.read_bytes()
    assert spiffe_id_from_certificate(client) == SpiffeId("local", "client", "demo-app")


def test_operator_tokens_open_with_their_passphrase_files(domain: DomainLayout) -> None:
    state = SealedState.from_bytes(domain.genesis_state.read_bytes())
    ids = {o.name: o.operator_id for o in state.manifest.message.operators}
    for name, (token, passphrase_file) in domain.operator_tokens.items():
        signer = load_file_token(token, read_passphrase(passphrase_file))
        assert signer.public_key.key_id == ids[name]


def test_layout_moves_with_its_directory(domain_copy: DomainLayout) -> None:
    node = NodeConfig.load(domain_copy.node_configs["hsa-1"])
    assert node.path(node.genesis_state) == domain_copy.root / "genesis.state"
    assert domain_copy.root.name == "copy"


@pytest.mark.parametrize(
    ("nodes", "operators", "quorum", "domain_id", "message"),
    [
        (0, 3, 2, "local", "--nodes"),
        (3, 0, 1, "local", "--operators"),
        (3, 3, 0, "local", "--quorum"),
        (3, 3, 4, "local", "--quorum"),
        (3, 3, 2, "Not Valid", "domain id"),
    ],
)
def test_init_refuses_bad_arguments(
    tmp_path: Path, nodes: int, operators: int, quorum: int, domain_id: str, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        init_domain(
            tmp_path / "d", nodes=nodes, operators=operators, quorum=quorum, domain_id=domain_id
        )
    assert not (tmp_path / "d").exists()


def test_init_refuses_a_non_empty_directory(domain: DomainLayout, tmp_path: Path) -> None:
    with pytest.raises(AlreadyExistsError, match="holds a domain already"):
        init_domain(domain.root, scrypt_n=FAST_SCRYPT)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(AlreadyExistsError, match="not empty"):
        init_domain(other, scrypt_n=FAST_SCRYPT)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_init_accepts_an_empty_directory_and_one_operator(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    layout = init_domain(target, nodes=1, operators=1, quorum=1, domain_id="a.example", now=NOW)
    assert list(layout.node_configs) == ["hsa-1"]
    assert list(layout.operator_tokens) == ["alice"]
    # Without an explicit cost (as `hsm-domain init` and `up` call it), tokens are real ones.
    token, _ = layout.operator_tokens["alice"]
    assert json.loads(token.read_text())["kdf"]["n"] >= 2**17
    assert layout.domain_id == "a.example"


def test_init_writes_the_worker_count_into_every_node_and_add_node_keeps_it(
    tmp_path: Path,
) -> None:
    layout = init_domain(
        tmp_path / "w", nodes=2, operators=1, quorum=1, now=NOW, scrypt_n=FAST_SCRYPT, workers=2
    )
    assert [NodeConfig.load(p).key_service_workers for p in layout.node_configs.values()] == [2, 2]
    added = add_node(layout.root, now=NOW)
    assert NodeConfig.load(added.parent / "config.json").key_service_workers == 2


@pytest.mark.parametrize("workers", [-1, 17])
def test_init_refuses_an_impossible_worker_count(tmp_path: Path, workers: int) -> None:
    with pytest.raises(InvalidInputError, match="key_service_workers"):
        init_domain(tmp_path / "w", nodes=1, operators=1, quorum=1, workers=workers)
    assert not (tmp_path / "w").exists()


def test_load_layout_of_a_directory_without_domain(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="hsm-domain init"):
        load_layout(tmp_path)


def test_add_node_creates_an_enrollment_that_verifies(domain_copy: DomainLayout) -> None:
    path = add_node(domain_copy.root, now=NOW)
    assert path == domain_copy.node_dir("hsa-4") / "enrollment.bin"
    layout = load_layout(domain_copy.root)
    assert list(layout.node_configs) == ["hsa-1", "hsa-2", "hsa-3", "hsa-4"]
    assert layout.genesis_nodes == ("hsa-1", "hsa-2", "hsa-3")
    assert mode(layout.node_dir("hsa-4") / "identity" / "tls.key") == 0o600

    host = read_enrollment(path, layout.ca_cert.read_bytes(), "local", NOW).host
    identity = load_host_identity(layout.node_dir("hsa-4") / "identity")
    assert host.host_id == "hsa-4"
    assert host.signing_public_key == identity.signing_public_key.spki_der
    assert host.agreement_public_key == identity.agreement_public_key
    config = NodeConfig.load(layout.node_configs["hsa-4"])
    assert config.genesis_hash == layout.genesis_hash.hex()

    named = add_node(domain_copy.root, "edge-7", now=NOW)
    assert named.parent.name == "edge-7"
    assert add_node(domain_copy.root, now=NOW).parent.name == "hsa-5"
    with pytest.raises(AlreadyExistsError):
        add_node(domain_copy.root, "hsa-2", now=NOW)
    with pytest.raises(InvalidInputError, match="host id"):
        add_node(domain_copy.root, "Bad_Name", now=NOW)


def test_add_node_copies_the_coordinator_address(domain_copy: DomainLayout) -> None:
    for path in domain_copy.node_configs.values():
        replace(NodeConfig.load(path), coordinator="127.0.0.1:4321").save(path)
    path = add_node(domain_copy.root, now=NOW)
    assert NodeConfig.load(path.parent / "config.json").coordinator == "127.0.0.1:4321"


def test_every_genesis_host_enrolled_like_a_later_one(domain: DomainLayout) -> None:
    """init writes each genesis node's enrollment; the genesis proposal carries exactly those
    bytes and pins the domain CA that issued their certificates."""
    layout = domain
    genesis = SealedState.from_bytes(layout.genesis_state.read_bytes())
    assert genesis.proposal is not None
    carried = [c.add_host.enrollment for c in genesis.proposal.changes if c.HasField("add_host")]
    ca = layout.ca_cert.read_bytes()
    assert genesis.manifest.message.settings.domain_ca_certificate == certificate_der(ca)
    for host_id, raw in zip(layout.genesis_nodes, carried, strict=True):
        assert (layout.node_dir(host_id) / "enrollment.bin").read_bytes() == raw
        enrollment = verify_enrollment(raw, domain_id="local", ca_certificate=ca, now=NOW)
        assert enrollment.host == genesis.manifest.hosts_by_id[host_id]


def test_read_enrollment_refuses_a_missing_or_huge_file(
    domain: DomainLayout, tmp_path: Path
) -> None:
    ca_pem = domain.ca_cert.read_bytes()
    with pytest.raises(NotFoundError):
        read_enrollment(tmp_path / "missing.bin", ca_pem, "local", NOW)
    huge = tmp_path / "huge.bin"
    huge.write_bytes(b"\x00" * (64 * 1024 + 1))
    with pytest.raises(HsmDomainError, match="at most"):
        read_enrollment(huge, ca_pem, "local", NOW)


# --- the CLI's argument handling (no process is started here) ------------------------------


def test_cli_init_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "d"
    code = cli.main(
        ["init", str(target), "--nodes", "1", "--operators", "1", "--quorum", "1", "--json"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    created = json.loads(out.out)
    assert created["nodes"] == ["hsa-1"]
    assert created["genesis_hash"] == load_layout(target).genesis_hash.hex()
    assert Path(created["operators"]["alice"]["token"]).exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "{d}", "--quorum", "5", "--operators", "3"],
        ["init", "{d}", "--nodes", "0"],
        ["up", "{d}", "--quorum", "0"],
    ],
)
def test_cli_inconsistent_counts_are_usage_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    target = tmp_path / "d"
    code = cli.main([a.format(d=target) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"hsm-domain {argv[0]}: error: --")
    assert not target.exists()


@pytest.mark.parametrize(
    "argv", [[], ["bogus"], ["init"], ["init", "d", "--nodes", "two"], ["status", "a", "b"]]
)
def test_cli_argparse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["init", "up", "down", "status", "add-node"])
def test_cli_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert f"hsm-domain {command}" in out


def test_cli_refusals_are_one_line_and_v_adds_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("hsm-domain: error: ")
    assert f"hsm-domain init {tmp_path}" in err
    assert cli.main(["status", str(tmp_path), "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["-v", "down", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_status_and_down_when_nothing_runs(
    domain_copy: DomainLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", str(domain_copy.root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["all_healthy"] is False
    assert [p["name"] for p in report["processes"]] == ["coordinator", "hsa-1", "hsa-2", "hsa-3"]
    assert not any(p["running"] for p in report["processes"])
    assert report["coordinator"]["reachable"] is False
    assert cli.main(["status", str(domain_copy.root)]) == 1
    assert "NOT all healthy" in capsys.readouterr().out
    assert cli.main(["down", str(domain_copy.root)]) == 0
    assert "nothing is running" in capsys.readouterr().out


def test_cli_add_node_json(domain_copy: DomainLayout, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["add-node", str(domain_copy.root), "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["host_id"] == "hsa-4"
    assert added["started"] is False
    enrollment = read_enrollment(
        Path(added["enrollment"]), domain_copy.ca_cert.read_bytes(), "local", datetime.now(UTC)
    )
    assert enrollment.host_id == "hsa-4"
    # The fingerprints the host's operator reads out to the approvers.
    assert added["key_sha256"] == {
        "TLS certificate": enrollment.host.tls_certificate_fingerprint.hex(),
        "signing key (Ed25519)": crypto.sha256(enrollment.host.signing_public_key).hex(),
        "agreement key (X25519)": crypto.sha256(enrollment.host.agreement_public_key).hex(),
    }


@pytest.fixture
def impostor(domain_copy: DomainLayout) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names hsa-1's config, as a running node's would."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            str(domain_copy.node_configs["hsa-1"]),
        ],
        start_new_session=True,
    )
    yield process
    process.kill()
    process.wait()


def test_pid_files_are_trusted_only_for_live_processes_of_the_domain(
    domain_copy: DomainLayout,
    impostor: subprocess.Popen[bytes],
) -> None:
    run_dir = domain_copy.run_dir
    # A pid that is alive but not ours (this test process) and one that is dead.
    (run_dir / "coordinator.pid").write_text(f"{os.getpid()}\n")
    (run_dir / "hsa-2.pid").write_text("999999999\n")
    assert cluster.live_pids(domain_copy) == {}
    (run_dir / "hsa-1.pid").write_text(f"{impostor.pid}\n")
    assert cluster.live_pids(domain_copy) == {"hsa-1": impostor.pid}

    # Clearing run files spares the only record of a live process of the domain.
    cluster.remove_run_files(domain_copy, domain_copy.process_names)
    assert sorted(p.name for p in run_dir.iterdir()) == ["hsa-1.pid"]

    assert cli.main(["down", str(domain_copy.root)]) == 0
    assert impostor.wait(timeout=10) == -15  # SIGTERM to its group
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("exists", [True, False])
def test_a_failed_init_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool
) -> None:
    target = tmp_path / "d"
    if exists:
        target.mkdir()

    def broken_token(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("deploy._ceremony.create_file_token", broken_token)
    with pytest.raises(OSError, match="No space"):
        init_domain(target, scrypt_n=FAST_SCRYPT)
    assert [p.name for p in tmp_path.iterdir()] == (["d"] if exists else [])
    if exists:
        assert list(target.iterdir()) == []
