"""Prometheus metrics of a live domain (issue 17, item 3): every process (the coordinator,
each HSA, each key service worker) serves them on its own loopback port, `hsm-domain status
--json` lists each URL, and the text parses with prometheus-client's own parser. Calls are
counted by method and status code with their latency; gauges say where each process stands;
no metric names a key."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.cluster import LocalCluster
from support.tools import run_tool

from domain_core.errors import HsmDomainError
from domain_edge.kms_client import KeyClient

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def _scrape(url: str) -> tuple[str, dict[str, Any]]:
    assert url.startswith("http://127.0.0.1:"), url  # loopback by default
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own loopback URL
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return text, families


def _value(families: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for sample in families[name].samples:
        if sample.name in (name, f"{name}_total") and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            total += sample.value
    return total


def test_every_process_serves_metrics_that_count_calls_and_say_where_it_stands(
    local_cluster: Any, tmp_path: Path
) -> None:
    cluster: LocalCluster = local_cluster(nodes=2, workers=1)
    tls = cluster.client_tls()
    with KeyClient(
        cluster.key_endpoints("hsa-1"),
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=10,
    ) as client:
        key_id = client.create_key(description="metrics").key_id
        for i in range(4):
            assert client.decrypt(client.encrypt(key_id, f"m{i}".encode())) == f"m{i}".encode()
        with pytest.raises(HsmDomainError):
            client.decrypt(b"\x00" * 64)

    status = json.loads(run_tool("hsm-domain", "status", cluster.directory, "--json").stdout)
    urls = {}
    for process in status["processes"]:
        assert process["metrics_url"], process
        urls[process["name"]] = process["metrics_url"]
        for i, url in enumerate(process.get("worker_metrics_urls", []), start=1):
            urls[f"{process['name']}/worker-{i}"] = url
    assert set(urls) == {"coordinator", "hsa-1", "hsa-2", "hsa-1/worker-1", "hsa-2/worker-1"}
    assert len(set(urls.values())) == len(urls)  # a port of its own each

    encrypts = errors = audited = 0.0
    exported: set[str] = set()
    for name, url in urls.items():
        text, families = _scrape(url)
        exported |= set(families)
        assert key_id not in text  # no metric names a key
        for family in ("process_cpu_seconds", "process_resident_memory_bytes"):
            assert family in families, (name, family)
        assert _value(families, "hsm_domain_version") == 1, name
        assert "hsm_rpc_requests" in families, name
        assert "hsm_rpc_duration_seconds" in families, name
        if name == "coordinator":
            assert _value(families, "hsm_coordinator_registered_hsas") == 2
            assert _value(families, "hsm_coordinator_pending_proposals") == 0
            assert (
                _value(families, "hsm_rpc_requests", method="/hsmdomain.v1.Coordinator/PutKey") >= 1
            )
            continue
        assert "hsm_key_cache_entries" in families, name
        audited += _value(families, "hsm_audit_records")
        encrypts += _value(
            families, "hsm_rpc_requests", method="/hsmdomain.v1.KeyService/Encrypt", code="OK"
        )
        errors += _value(
            families,
            "hsm_rpc_requests",
            method="/hsmdomain.v1.KeyService/Decrypt",
            code="INVALID_ARGUMENT",
        )
        if "/" not in name:
            assert _value(families, "hsm_domain_member") == 1
            assert _value(families, "hsm_hsa_healthy") == 1
            assert _value(families, "hsm_sync_lag_versions") == 0
            assert "hsm_rewrap_running" in families
    assert encrypts == 4
    assert errors >= 1
    assert audited >= 10  # every key service call is audited where it is served

    # The Grafana dashboard charts only what the processes export.
    dashboard = json.loads((REPO / "deploy" / "grafana" / "hsm-domain.json").read_text())
    charted = {
        re.sub(r"_(total|bucket)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:hsm|process)_[a-z_]+", target["expr"])
    }
    assert charted
    assert charted <= exported, charted - exported
