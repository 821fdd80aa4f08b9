"""Request-rate quotas through real HSA processes (issue 19): each HSA enforces its share of
the domain's quota per principal; a throttled caller gets ThrottledError with a retry delay
while another principal at the same moment is served; KeyClient honours the delay."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.cluster import LocalCluster

from domain_core.errors import ThrottledError
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.kms_client import KeyClient

pytestmark = pytest.mark.cluster

# For the whole domain of two HSAs: each holds half (10 per second, bursts of 10).
QUOTA = {"crypto_requests_per_second": 20, "crypto_request_burst": 20}


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "domain", nodes=2)
    failed_before = request.session.testsfailed
    try:
        layout = cluster.init()
        for path in layout.node_configs.values():
            config = NodeConfig.load(path)
            dataclasses.replace(config, limits={**config.limits, **QUOTA}).save(path)
        cluster.start()
        yield cluster
    finally:
        cluster.close(dump_logs=request.session.testsfailed > failed_before)


def _client(cluster: LocalCluster, name: str | None = None, **kwargs: object) -> KeyClient:
    tls = cluster.client_tls()
    cert_pem, key_pem = tls.cert_pem, tls.key_pem
    if name is not None:  # another application of the domain
        ca = load_domain_ca(cluster.layout.root / "ca")
        key_pem = new_tls_key_pem()
        spiffe = SpiffeId(cluster.domain_id, "client", name)
        cert_pem = ca.issue(spiffe, tls_public_key(key_pem), now=datetime.now(UTC))
    endpoints = list(cluster.node_addresses().values())
    return KeyClient(endpoints, ca_pem=tls.ca_pem, cert_pem=cert_pem, key_pem=key_pem, **kwargs)


def test_a_throttled_principal_waits_while_another_is_served(cluster: LocalCluster) -> None:
    me = f"spiffe://{cluster.domain_id}/client/demo-app"
    other = f"spiffe://{cluster.domain_id}/client/other-app"
    with _client(cluster, attempts=1) as greedy, _client(cluster, "other-app") as polite:
        key_id = greedy.create_key(
            policy={
                "grants": [
                    {"principals": [me], "operations": ["admin"]},
                    {"principals": [me, other], "operations": ["encrypt", "decrypt"]},
                ]
            }
        ).key_id
        outcomes: Counter[str] = Counter()
        retry_delays: list[float] = []
        lock = threading.Lock()

        def flood() -> None:
            for _ in range(25):
                try:
                    greedy.encrypt(key_id, b"x")
                    outcome = "ok"
                except ThrottledError as error:
                    outcome = "throttled"
                    with lock:
                        retry_delays.append(error.retry_after)
                with lock:
                    outcomes[outcome] += 1

        threads = [threading.Thread(target=flood) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        # The same moment, another principal: a bucket of its own on each HSA.
        blobs = [polite.encrypt(key_id, f"polite {n}".encode()) for n in range(8)]
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
        assert all(polite.decrypt(b) == f"polite {n}".encode() for n, b in enumerate(blobs))
        assert outcomes["throttled"] > 0, outcomes
        # Never more than the domain's quota: its burst plus what refilled meanwhile.
        assert outcomes["ok"] <= 20 + 20 * elapsed + 2, (outcomes, elapsed)
        assert all(0 < delay <= 1.0 for delay in retry_delays), retry_delays

    # With its retries (the default), the throttled caller waits for the delay and is served.
    with _client(cluster) as patient:
        served = [patient.encrypt(key_id, b"y") for _ in range(40)]
        assert len(served) == 40
