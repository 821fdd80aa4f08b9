"""What TLS every port of a real local domain negotiates, probed with Python's `ssl` module.

grpcio 1.85 has no minimum TLS version (docs/threat-model.md, "Known limits"), so TLS 1.2 is
still accepted; what it accepts is pinned (`domain_edge.grpc_env`) to ECDHE-ECDSA with AES-GCM,
even when the processes inherit a wider `GRPC_SSL_CIPHER_SUITES` (here `HIGH+ECDSA`, which
would add ChaCha20). A client that lets the server choose gets TLS 1.3.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster

from domain_edge.grpc_env import TLS12_CIPHER_SUITES

pytestmark = pytest.mark.cluster

ALLOWED_TLS12 = set(TLS12_CIPHER_SUITES.split(":"))


def _client_tls12_suites() -> list[str]:
    """Every TLS 1.2 suite this OpenSSL can offer, the weak ones included."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    return sorted({c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"})


def _handshake(
    address: str, ca: Path, client: tuple[Path, Path], *, tls12: str | None = None
) -> tuple[str, str] | None:
    """(version, suite) of a completed handshake, or None if the server refused it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    context.check_hostname = False  # SPIFFE ids, not host names; the CA is checked
    context.load_cert_chain(*client)
    context.set_alpn_protocols(["h2"])
    if tls12 is not None:
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(f"{tls12}:@SECLEVEL=0")
    host, port = address.rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            suite, version = tls.cipher(), tls.version()
            if suite is None or version is None:
                raise AssertionError("a completed handshake without a version or suite")
            return version, suite[0]
    except (ssl.SSLError, ConnectionError):
        return None


def test_every_port_negotiates_tls13_and_only_ecdhe_ecdsa_aes_gcm_under_tls12(
    local_cluster: Callable[..., LocalCluster],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # The processes inherit a wider setting, as from an operator's shell profile.
    monkeypatch.setenv("GRPC_SSL_CIPHER_SUITES", "HIGH+ECDSA")
    cluster = local_cluster(nodes=2, operators=3, quorum=2)
    tls = cluster.client_tls()
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_bytes(tls.cert_pem)
    key.write_bytes(tls.key_pem)
    key.chmod(0o600)
    ports = {
        "coordinator (mutual TLS)": cluster.coordinator_address,
        "coordinator (operators)": cluster.coordinator_operator_address,
        **{f"{host}": address for host, address in cluster.node_addresses().items()},
    }
    offered = _client_tls12_suites()
    assert set(offered) >= ALLOWED_TLS12
    assert "ECDHE-ECDSA-CHACHA20-POLY1305" in offered  # what HIGH+ECDSA would have added
    for name, address in ports.items():
        default = _handshake(address, cluster.layout.ca_cert, (cert, key))
        assert default is not None, name
        assert default[0] == "TLSv1.3", (name, default)
        accepted = {
            suite
            for suite in offered
            if _handshake(address, cluster.layout.ca_cert, (cert, key), tls12=suite) is not None
        }
        assert accepted == ALLOWED_TLS12, (name, sorted(accepted))
