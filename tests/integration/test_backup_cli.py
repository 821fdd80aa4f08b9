"""`hsm-domain backup`, `backup verify`, `restore` and `store migrate` on real domain
directories and real SQLite stores (no HSA process): what each refuses, and that a refusal
changes nothing.

The store of a domain holds its genesis as the coordinator stores it at its first start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.tools import json_output, one_line_error, run_tool

from deploy.init import DomainLayout, init_domain
from deploy.localdomain import FAST_SCRYPT_N
from domain_coordinator.sqlite_store import SqliteStore

pytestmark = pytest.mark.integration


def run(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return run_tool("hsm-domain", *arguments)


def ok(*arguments: str | Path) -> Any:
    return json_output("hsm-domain", *arguments)


def failed(status: int, *arguments: str | Path) -> str:
    return one_line_error(run(*arguments), status)


def store_of(layout: DomainLayout) -> SqliteStore:
    return SqliteStore(layout.coordinator_dir / "coordinator.db")


def new_domain(root: Path, domain_id: str = "local") -> DomainLayout:
    layout = init_domain(
        root, nodes=1, operators=1, quorum=1, scrypt_n=FAST_SCRYPT_N, domain_id=domain_id
    )
    store = store_of(layout)
    store.append_state(1, layout.genesis_state.read_bytes())
    store.register_hsa("hsa-1", "127.0.0.1:7001", 100)
    store.close()
    return layout


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    return new_domain(tmp_path_factory.mktemp("template") / "d")


@pytest.fixture
def domain(template: DomainLayout, tmp_path: Path) -> DomainLayout:
    import shutil

    from deploy.init import load_layout

    shutil.copytree(template.root, tmp_path / "d", symlinks=True)
    return load_layout(tmp_path / "d")


def empty_the_store(layout: DomainLayout) -> None:
    for suffix in ("", "-wal", "-shm"):
        (layout.coordinator_dir / f"coordinator.db{suffix}").unlink(missing_ok=True)


def test_backup_verify_and_restore_a_domain(domain: DomainLayout, tmp_path: Path) -> None:
    backup = tmp_path / "d.backup"
    written = ok("backup", domain.root, backup)
    assert written["counts"] == {
        "states": 1,
        "proposals": 0,
        "approvals": 0,
        "cancel_votes": 0,
        "keys": 0,
        "tombstones": 0,
        "hsas": 1,
        "audit_heads": 0,
    }
    text = run("backup", "verify", backup, "--genesis", domain.genesis_state)
    assert text.returncode == 0
    assert text.stdout.startswith(f"{backup} verifies: domain 'local'")
    empty_the_store(domain)
    restored = ok("restore", domain.root, backup)
    assert restored["keys_behind"] == []
    assert restored["hsas_asked"] == {"hsa-1": "not running, no floor file"}
    store = store_of(domain)
    try:
        assert store.contents().states == 1
        assert store.list_hsas()[0].address == "127.0.0.1:7001"
    finally:
        store.close()


def test_a_backup_never_replaces_a_file_and_needs_a_stored_genesis(
    domain: DomainLayout, tmp_path: Path
) -> None:
    existing = tmp_path / "taken.backup"
    existing.write_bytes(b"an older backup")
    assert "exists already" in failed(1, "backup", domain.root, existing)
    assert existing.read_bytes() == b"an older backup"
    empty_the_store(domain)
    assert "holds no state" in failed(1, "backup", domain.root, tmp_path / "new.backup")
    assert not (tmp_path / "new.backup").exists()


def test_a_backup_of_another_domain_is_refused_everywhere(
    domain: DomainLayout, tmp_path: Path
) -> None:
    other = new_domain(tmp_path / "other")  # also "local", another genesis
    theirs = tmp_path / "theirs.backup"
    ok("backup", other.root, theirs)
    message = failed(1, "backup", "verify", theirs, "--genesis", domain.genesis_state)
    assert "another domain" in message
    empty_the_store(domain)
    assert "another domain" in failed(1, "restore", domain.root, theirs)
    store = store_of(domain)
    try:
        assert store.contents().empty
    finally:
        store.close()


def test_the_store_tool_verifies_again_while_it_loads(domain: DomainLayout, tmp_path: Path) -> None:
    """The file is changed after `restore` verified it: the store tool's own verification,
    record by record during the load, refuses it and the load is rolled back."""
    backup = tmp_path / "d.backup"
    ok("backup", domain.root, backup)
    data = bytearray(backup.read_bytes())
    data[-1] ^= 0x01  # the trailer's digest: every record parses and verifies, then it fails
    backup.write_bytes(bytes(data))
    empty_the_store(domain)
    command = [
        sys.executable,
        "-m",
        "domain_coordinator.store_admin",
        "restore",
        "--config",
        str(domain.coordinator_config),
        str(backup),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False
    assert "does not match its content" in answer["error"]
    store = store_of(domain)
    try:
        assert store.contents().empty
    finally:
        store.close()


def test_usage_errors(domain: DomainLayout, tmp_path: Path) -> None:
    assert "needs --genesis" in failed(2, "backup", "verify", tmp_path / "x.backup")
    message = failed(2, "backup", domain.root, tmp_path / "x", "--genesis", "g")
    assert "--genesis goes with" in message
    help_text = run("backup", "--help")
    assert help_text.returncode == 0
    assert "backup verify demo-2026-12-01.backup --genesis" in help_text.stdout


def test_migrate_switches_the_config_only_when_the_new_store_matches(
    domain: DomainLayout, tmp_path: Path
) -> None:
    config = domain.coordinator_config
    before = config.read_text()
    assert "unknown scheme" in failed(1, "store", "migrate", domain.root, "--to", "nosuch:x")
    assert "already uses" in failed(
        1, "store", "migrate", domain.root, "--to", "sqlite:coordinator.db"
    )
    occupied = SqliteStore(domain.coordinator_dir / "occupied.db")
    occupied.register_hsa("hsa-9", "127.0.0.1:9", 1)
    occupied.close()
    message = failed(1, "store", "migrate", domain.root, "--to", "sqlite:occupied.db")
    assert "is not empty: it holds 1 registered HSA" in message
    assert config.read_text() == before
    moved = ok("store", "migrate", domain.root, "--to", f"sqlite:{tmp_path / 'new.db'}")
    assert moved["counts"]["states"] == 1
    assert json.loads(config.read_text())["store"] == f"sqlite:{tmp_path / 'new.db'}"
    copy = SqliteStore(tmp_path / "new.db")
    try:
        assert copy.contents() == store_of(domain).contents()
    finally:
        copy.close()
