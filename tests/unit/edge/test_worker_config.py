"""`key_service_workers` of a node config and `hsa-node --workers N`: validated, clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from deploy.cluster import read_ready_file
from domain_core.errors import InvalidInputError
from domain_core.limits import MAX_KEY_SERVICE_WORKERS
from domain_edge.config import NodeConfig, TlsFiles, check_worker_count
from hsa_node.__main__ import main

pytestmark = pytest.mark.unit

GENESIS_HASH = "ab" * 32


def node_config(**overrides: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "domain_id": "local",
        "genesis_hash": GENESIS_HASH,
        "host_id": "hsa-1",
        "identity_dir": "identity",
        "data_dir": "data",
        "genesis_state": "../../genesis.state",
        "tls": TlsFiles(ca="ca.crt", cert="tls.crt", key="tls.key"),
    }
    values.update(overrides)
    return NodeConfig(**values)


def test_default_is_no_workers_and_the_range_is_accepted() -> None:
    assert node_config().key_service_workers == 0
    assert MAX_KEY_SERVICE_WORKERS == 16
    for count in (0, 1, 2, 16):
        assert node_config(key_service_workers=count).key_service_workers == count


@pytest.mark.parametrize("value", [-1, 17, 1000])
def test_out_of_range_counts_are_refused(value: int) -> None:
    with pytest.raises(InvalidInputError, match=r"key_service_workers must be from 0 to 16"):
        node_config(key_service_workers=value)


@pytest.mark.parametrize("value", [True, "2", 2.0, None])
def test_non_integers_are_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match=r"key_service_workers must be a whole number"):
        check_worker_count(value)
    with pytest.raises(InvalidInputError, match=r"key_service_workers"):
        node_config(key_service_workers=value)


def test_a_config_file_round_trips_and_a_bad_count_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    node_config(key_service_workers=3).save(path)
    assert NodeConfig.load(path).key_service_workers == 3
    document = json.loads(path.read_text())
    document["key_service_workers"] = 40
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidInputError, match="from 0 to 16"):
        NodeConfig.load(path)
    with pytest.raises(InvalidInputError, match="from 0 to 16"):
        dataclasses.replace(node_config(), key_service_workers=17)


@pytest.mark.parametrize("value", ["17", "-1", "two"])
def test_the_workers_option_is_checked(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    node_config().save(path)
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(path), "--workers", value])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--workers" in error
    assert "0 to 16" in error or "whole number" in error


def test_the_worker_mode_needs_its_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["worker", "--config", str(tmp_path / "config.json")])
    assert exited.value.code == 2
    assert "--index" in capsys.readouterr().err
    assert main(["worker", "--config", str(tmp_path / "missing.json"), "--index", "1"]) == 1
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "config.json"
    node_config().save(path)
    for index in ("0", "17"):
        assert main(["worker", "--config", str(path), "--index", index]) == 1
        assert "a worker index is from 1 to 16" in capsys.readouterr().err


def test_ready_files_carry_the_worker_addresses(tmp_path: Path) -> None:
    path = tmp_path / "hsa-1.json"
    document = {"pid": 7, "address": "127.0.0.1:1", "name": "hsa-1"}
    path.write_text(json.dumps(document))
    info = read_ready_file(path)
    assert info is not None
    assert info.workers == ()
    path.write_text(json.dumps({**document, "workers": ["127.0.0.1:2", "127.0.0.1:3"]}))
    info = read_ready_file(path)
    assert info is not None
    assert info.workers == ("127.0.0.1:2", "127.0.0.1:3")
    path.write_text(json.dumps({**document, "workers": "127.0.0.1:2"}))
    assert read_ready_file(path) is None
