"""`head_confirmation_seconds` and `peer_addresses` of a node config: sensible defaults, checked.

The bound must leave room for at least two gossip rounds (a peer confirms the head once per
round), and peer addresses are only hints, but a malformed one is a typo to report at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from domain_core.errors import InvalidInputError
from domain_edge.config import NodeConfig, TlsFiles

pytestmark = pytest.mark.unit


def node_config(**overrides: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "domain_id": "local",
        "genesis_hash": "ab" * 32,
        "host_id": "hsa-1",
        "identity_dir": "identity",
        "data_dir": "data",
        "genesis_state": "../../genesis.state",
        "tls": TlsFiles(ca="ca.crt", cert="tls.crt", key="tls.key"),
    }
    values.update(overrides)
    return NodeConfig(**values)


def test_the_bound_is_thirty_seconds_or_five_gossip_rounds_unless_set() -> None:
    assert node_config().head_confirmation_bound == 30.0
    assert node_config(gossip_interval_seconds=60.0).head_confirmation_bound == 300.0
    assert node_config(head_confirmation_seconds=4).head_confirmation_bound == 4.0
    assert node_config(gossip_interval_seconds=0.3, head_confirmation_seconds=0.6)


@pytest.mark.parametrize("value", [1.0, -5, 86_401, True, "30"])
def test_a_bound_below_two_rounds_or_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match="head_confirmation_seconds must be 0"):
        node_config(gossip_interval_seconds=2.0, head_confirmation_seconds=value)


def test_peer_addresses_round_trip_and_a_malformed_one_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    node_config(peer_addresses=["127.0.0.1:7001", "hsa-2.example:7000"]).save(path)
    loaded = NodeConfig.load(path)
    assert loaded.peer_addresses == ("127.0.0.1:7001", "hsa-2.example:7000")
    for bad in (["127.0.0.1"], ["host:port"], [":7000"], ["h:70000"], "127.0.0.1:1", [7000]):
        document = json.loads(path.read_text())
        document["peer_addresses"] = bad
        path.write_text(json.dumps(document))
        with pytest.raises(InvalidInputError, match="peer_addresses"):
            NodeConfig.load(path)
