"""A process's metrics (issue 17, item 3): the RPC counters, gauges read at scrape (a failing
source left out, not the scrape), the label cap, addresses, serving once per process."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from domain_core.errors import InvalidInputError
from domain_edge import metrics
from domain_edge.metrics import Gauge, ProcessMetrics, metrics_url, parse_listen

pytestmark = pytest.mark.unit


def _families(process: ProcessMetrics) -> dict[str, object]:
    text = generate_latest(process.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample(process: ProcessMetrics, name: str, **labels: str) -> float:
    text = generate_latest(process.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_calls_are_counted_by_method_and_code_with_their_latency() -> None:
    process = ProcessMetrics()
    process.rpc.observe("/svc/A", "OK", 0.002)
    process.rpc.observe("/svc/A", "OK", 0.004)
    process.rpc.observe("/svc/A", "NOT_FOUND", 0.001)
    assert _sample(process, "hsm_rpc_requests_total", method="/svc/A", code="OK") == 2
    assert _sample(process, "hsm_rpc_requests_total", method="/svc/A", code="NOT_FOUND") == 1
    assert _sample(process, "hsm_rpc_duration_seconds_count", method="/svc/A") == 3
    assert _sample(process, "hsm_rpc_duration_seconds_bucket", method="/svc/A", le="0.0025") == 2
    assert "process_cpu_seconds" in _families(process)


def test_label_sets_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_MAX_METHODS", 3)
    process = ProcessMetrics()
    for i in range(10):
        process.rpc.observe(f"/svc/M{i}", "OK", 0.001)
    assert _sample(process, "hsm_rpc_requests_total", method="other", code="OK") == 7


def test_gauges_are_read_at_scrape_and_a_failing_source_is_left_out() -> None:
    process = ProcessMetrics()
    reads = []

    def good() -> list[Gauge]:
        reads.append(1)
        return [Gauge("hsm_demo", "demo", 7.0), Gauge("hsm_labelled", "l", 1.0, (("k", "v"),))]

    def bad() -> list[Gauge]:
        raise RuntimeError("stopped")

    remove = process.add_gauges(good)
    process.add_gauges(bad)
    assert reads == []  # registering reads nothing
    assert _sample(process, "hsm_demo") == 7.0
    assert _sample(process, "hsm_labelled", k="v") == 1.0
    remove()
    remove()  # twice is harmless
    assert "hsm_demo" not in _families(process)


def test_addresses() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("", "127.0.0.1", "host:port", ":80", "h:70000"):
        with pytest.raises(InvalidInputError, match="is not host:port"):
            parse_listen(bad)
    assert metrics_url("127.0.0.1:9100") == "http://127.0.0.1:9100/metrics"
    assert metrics_url("") == ""


def test_a_process_serves_once_on_loopback() -> None:
    process = ProcessMetrics()
    try:
        address = process.serve("127.0.0.1:0")
        assert process.serve("127.0.0.1:0") == address  # a second server in this process
        process.add_gauges(lambda: [Gauge("hsm_demo", "demo", 3.0)])
        with urllib.request.urlopen(metrics_url(address), timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        assert "hsm_demo 3.0" in text
    finally:
        process.stop()
