"""The coordinator an HSA takes HsaAdmin calls from: the node config's pin and its check.

Issue 21 item 9: any `coordinator/<name>` certificate from the domain CA reached
RotateDomainKey and InstallState. Now a node config names the coordinator (SPIFFE id) and the
certificates it may present (fingerprints); `hsm-domain init` and `add_node` write both.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.init import add_node, coordinator_pin, init_domain
from deploy.localdomain import FAST_SCRYPT_N
from domain_core.errors import InvalidInputError, PermissionDeniedError
from domain_core.pki import DomainCA, PeerIdentity, SpiffeId, certificate_fingerprint
from domain_edge.config import NodeConfig, TlsFiles
from hsa_node.servicers import CoordinatorPin

pytestmark = pytest.mark.unit

COORDINATOR = "spiffe://local/coordinator/coordinator"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def config(**changes: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "domain_id": "local",
        "genesis_hash": "ab" * 32,
        "host_id": "hsa-1",
        "identity_dir": "identity",
        "data_dir": "data",
        "genesis_state": "genesis.state",
        "tls": TlsFiles(ca="ca.crt", cert="tls.crt", key="tls.key"),
    }
    return NodeConfig(**(values | changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"coordinator_identity": "spiffe://local/client/coordinator"}, "not a coordinator's id"),
        ({"coordinator_identity": "spiffe://other/coordinator/c"}, "another trust domain"),
        ({"coordinator_identity": "coordinator"}, "must start with spiffe://"),
        ({"coordinator_identity": COORDINATOR, "coordinator_fingerprints": "ab" * 32}, "a list"),
        ({"coordinator_identity": COORDINATOR, "coordinator_fingerprints": ["ab"]}, "64 hex"),
        ({"coordinator_identity": COORDINATOR, "coordinator_fingerprints": ["zz" * 32]}, "64 hex"),
        ({"coordinator_fingerprints": ["ab" * 32]}, "needs coordinator_identity"),
    ],
)
def test_a_malformed_pin_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        config(**changes)


def test_the_pin_survives_the_file(tmp_path: Path) -> None:
    pinned = config(coordinator_identity=COORDINATOR, coordinator_fingerprints=["AB" * 32] * 2)
    assert pinned.coordinator_fingerprints == ("ab" * 32,)  # lower case, no duplicate
    path = tmp_path / "config.json"
    pinned.save(path)
    assert json.loads(path.read_text())["coordinator_fingerprints"] == ["ab" * 32]
    assert NodeConfig.load(path) == pinned
    assert config().coordinator_identity == ""  # an old config: nothing pinned


def identity(ca: DomainCA, name: str, kind: str = "coordinator") -> PeerIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe = SpiffeId("local", kind, name)  # type: ignore[arg-type]
    cert = ca.issue(spiffe, key.public_key(), now=NOW)
    return PeerIdentity(spiffe, cert, certificate_fingerprint(cert))


def test_only_the_pinned_certificate_is_the_coordinator() -> None:
    ca = DomainCA.create("local", now=NOW)
    real = identity(ca, "coordinator")
    twin = identity(ca, "coordinator")  # same name, another certificate from the same CA
    rogue = identity(ca, "rogue")
    strict = CoordinatorPin.from_config(
        config(coordinator_identity=COORDINATOR, coordinator_fingerprints=[real.fingerprint.hex()])
    )
    by_name = CoordinatorPin.from_config(config(coordinator_identity=COORDINATOR))
    nothing = CoordinatorPin.from_config(config())
    cases = [
        (strict, real, None),
        (strict, twin, "not the one this HSA pins"),
        (strict, rogue, "it is for this HSA's coordinator"),
        (by_name, real, None),
        (by_name, twin, None),  # an id-only pin: what the operator chose to accept
        (by_name, rogue, "it is for this HSA's coordinator"),
        (nothing, real, "no coordinator pinned"),
    ]
    for pin, caller, refusal in cases:
        if refusal is None:
            pin.check(caller)
        else:
            with pytest.raises(PermissionDeniedError, match=refusal):
                pin.check(caller)
    assert "pinned by id only" in by_name.describe()
    assert "1 certificate fingerprint" in strict.describe()
    assert "refuses every caller" in nothing.describe()


def test_init_and_add_node_pin_the_coordinator_init_issued(tmp_path: Path) -> None:
    layout = init_domain(tmp_path / "d", nodes=1, operators=1, quorum=1, scrypt_n=FAST_SCRYPT_N)
    cert = (layout.root / "coordinator" / "tls.crt").read_bytes()
    expected = (COORDINATOR, (certificate_fingerprint(cert).hex(),))
    pin = coordinator_pin(layout.root)
    assert (pin.identity, pin.fingerprints) == expected
    add_node(layout.root, "hsa-9")
    for host in ("hsa-1", "hsa-9"):
        loaded = NodeConfig.load(layout.root / "nodes" / host / "config.json")
        assert (loaded.coordinator_identity, loaded.coordinator_fingerprints) == expected
