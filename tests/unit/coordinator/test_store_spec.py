"""The `store` value of a coordinator config for etcd: `etcd:HOST:PORT[,HOST:PORT...][/PREFIX]`,
every member named, loopback only, a prefix of plain segments (default `hsm-domain`); the
state directory of an etcd store is the config's directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain_coordinator.store_spec import open_store, parse_etcd_spec, state_directory
from domain_core.errors import InvalidInputError
from domain_edge.etcd import Endpoint

pytestmark = pytest.mark.unit


def test_every_member_and_the_prefix() -> None:
    endpoints, prefix = parse_etcd_spec("127.0.0.1:2379,127.0.0.1:22379,[::1]:32379/hsm/prod-1")
    assert endpoints == (
        Endpoint("127.0.0.1", 2379),
        Endpoint("127.0.0.1", 22379),
        Endpoint("::1", 32379),
    )
    assert prefix == "hsm/prod-1"
    assert parse_etcd_spec("localhost:2379") == ((Endpoint("localhost", 2379),), "hsm-domain")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("etcd:127.0.0.1:2379/", "etcd store prefix ''"),
        ("etcd:127.0.0.1:2379/a//b", "segments of letters"),
        ("etcd:127.0.0.1:2379/a/", "segments of letters"),
        ("etcd:127.0.0.1:2379/../x", "no '.' or '..' segments"),
        ("etcd:127.0.0.1:2379/sp ace", "segments of letters"),
        ("etcd:127.0.0.1:2379/" + "a" * 129, "up to 128 characters"),
        ("etcd:127.0.0.1", "not HOST:PORT"),
        ("etcd:10.1.2.3:2379", "not on this host's loopback"),
        ("etcd:/prefix", "no etcd endpoint"),
        ("etcd:", "SCHEME:VALUE"),
    ],
)
def test_bad_etcd_specs_say_what_to_write(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        open_store(spec, tmp_path)


def test_an_etcd_store_keeps_its_local_files_beside_the_config(tmp_path: Path) -> None:
    assert state_directory("etcd:127.0.0.1:2379/x", tmp_path) == tmp_path
    assert state_directory("sqlite:db/c.db", tmp_path) == tmp_path / "db"
