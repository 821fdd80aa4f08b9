"""Clients talk only to the server they mean: attacks with the domain's own certificates.

An application's KeyClient sends plaintext to the HSA it reaches, and an HSA sends key records
to the coordinator it reaches. Whoever serves an address with another certificate of the
domain (the coordinator's, a client's, another host's) or another domain's must receive
nothing: the client's TLS handshake refuses it. Each test runs real processes
(`local_cluster`) and an impostor server (`support.impostor`) that records every request.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster
from support.impostor import ImpostorServer

from deploy.init import init_domain
from deploy.localdomain import FAST_SCRYPT_N
from domain_core.errors import HsmDomainError, NotAppliedError, UnauthenticatedError
from domain_edge.config import NodeConfig
from domain_edge.kms_client import KeyClient
from domain_edge.transport import TlsMaterial

pytestmark = pytest.mark.cluster

SOME_KEY = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
PLAINTEXT = b"card 4111 1111 1111 1111, for an HSA only"


def _client(cluster: LocalCluster, endpoints: list[str]) -> KeyClient:
    tls = cluster.client_tls()
    return KeyClient(
        endpoints, ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, timeout=3
    )


def _held_certificates(cluster: LocalCluster, tmp_path: Path) -> dict[str, TlsMaterial]:
    """Certificates an attacker may hold, each presented with the domain's CA (so that the
    impostor itself accepts the application's client certificate)."""
    root, ca = cluster.layout.root, cluster.layout.ca_cert
    other = init_domain(
        tmp_path / "other-domain", nodes=1, operators=1, quorum=1, scrypt_n=FAST_SCRYPT_N
    )
    other_identity = other.node_dir("hsa-1") / "identity"
    return {
        "the coordinator": TlsMaterial.from_files(
            ca, root / "coordinator" / "tls.crt", root / "coordinator" / "tls.key"
        ),
        "an application": cluster.client_tls(),
        "hsa-1 of another domain": TlsMaterial.from_files(
            ca, other_identity / "tls.crt", other_identity / "tls.key"
        ),
    }


def test_a_key_client_sends_nothing_to_a_server_that_is_not_an_hsa(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=1)
    hsa = cluster.address("hsa-1")
    for holder, tls in _held_certificates(cluster, tmp_path).items():
        with ImpostorServer(tls) as impostor:
            with _client(cluster, [impostor.address]) as client:
                with pytest.raises(HsmDomainError) as refused:
                    client.encrypt(SOME_KEY, PLAINTEXT, {"order": "42"})
                with pytest.raises(HsmDomainError):
                    client.create_key(description="through an impostor")
            assert impostor.seen == [], holder
            message = str(refused.value)
            assert impostor.address in message
            if holder == "the coordinator":
                # Its certificate is the domain CA's: the handshake says it is not an HSA.
                assert isinstance(refused.value, UnauthenticatedError)
                assert "is not an HSA of domain local" in message
                assert "nothing was sent" in message
            # Listed beside a real HSA, the impostor still gets nothing; the HSA serves.
            with _client(cluster, [impostor.address, hsa]) as client:
                key_id = client.create_key(description=f"beside {holder}").key_id
                for _ in range(4):
                    blob = client.encrypt(key_id, PLAINTEXT)
                    assert client.decrypt(blob) == PLAINTEXT
            assert impostor.seen == [], holder


def test_an_hsa_sends_nothing_to_a_coordinator_that_is_another_host(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """A host (say, a removed one) serves the address an HSA has for its coordinator, with
    its own host certificate: the HSA registers nowhere, reads and writes no key record there,
    and CreateKey through that HSA fails definitely (nothing was created)."""
    cluster = local_cluster(nodes=2)
    identity = cluster.layout.node_dir("hsa-1") / "identity"
    host_tls = TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )
    with ImpostorServer(host_tls, service="Coordinator") as impostor:
        cluster.stop_node("hsa-2")
        path = cluster.layout.node_configs["hsa-2"]
        config = NodeConfig.load(path)
        dataclasses.replace(config, coordinator=impostor.address).save(path)
        cluster.start_node("hsa-2")
        with _client(cluster, [cluster.address("hsa-2")]) as client:
            with pytest.raises(NotAppliedError) as refused:
                client.create_key(description="while the coordinator is an impostor")
            assert "may have been applied" not in str(refused.value)
        time.sleep(2.0)  # register, watch and pull rounds: none may reach the impostor
        assert impostor.seen == []
