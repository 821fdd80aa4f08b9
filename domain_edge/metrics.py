"""Prometheus metrics of one process (issue 17): every HSA, key service worker and coordinator
serves them on a port of its own (`metrics_listen` of its config, loopback by default; empty:
none), in the text format `prometheus-client` writes.

What every process exports: RPCs served by method and status code
(`hsm_rpc_requests_total`) and their latency (`hsm_rpc_duration_seconds`, per method),
recorded in the one place every call passes (`domain_edge.transport`'s error-mapping
interceptor); the process's CPU, memory and open files (`process_*`). Each process adds gauges
read when scraped (`add_gauges`: the domain version, the key cache, sync lag, pending
proposals, ...), so nothing is computed on a call's path but two counter increments.

Invariants: one registry per process (`PROCESS`); a label is a method name or a status code,
never a key id, a principal, a host's words or anything secret; the metrics port serves only
GET of the metrics text (prometheus-client's handler).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from domain_core.errors import InvalidInputError

__all__ = [
    "PROCESS",
    "Gauge",
    "ProcessMetrics",
    "RpcMetrics",
    "metrics_url",
    "parse_listen",
]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_MAX_METHODS: Final = 256  # label sets kept per process: the servers' own methods


@dataclass(frozen=True)
class Gauge:
    """One gauge read at scrape time: its name, help and value (labels optional)."""

    name: str
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


class _Gauges(Collector):
    """The gauges `read()` returns, read when the metrics are scraped."""

    def __init__(self, read: Callable[[], Iterable[Gauge]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return ()  # read at scrape only: registering must not call into the process

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        try:
            gauges = list(self._read())
        except Exception as error:  # a part stopping or failing must not break the scrape
            log.debug("a gauge source failed: %s: %s", type(error).__name__, error)
            return
        for gauge in gauges:
            family = families.get(gauge.name)
            if family is None:
                family = GaugeMetricFamily(
                    gauge.name, gauge.help, labels=[k for k, _ in gauge.labels]
                )
                families[gauge.name] = family
            family.add_metric([v for _, v in gauge.labels], gauge.value)
        yield from families.values()


class RpcMetrics:
    """Calls served, by method and status code, and their latency by method."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "hsm_rpc_requests_total",
            "RPCs served, by full method name and gRPC status code",
            ["method", "code"],
            registry=registry,
        )
        self._latency = Histogram(
            "hsm_rpc_duration_seconds",
            "Time to serve an RPC (a stream: until it ended), by full method name",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._lock = threading.Lock()

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Count one call of `method` that ended with `code` after `seconds`."""
        children = self._children.get((method, code))
        if children is None:
            with self._lock:
                if len(self._children) >= _MAX_METHODS:
                    method = "other"
                children = self._children.get((method, code))
                if children is None:
                    children = (
                        self._requests.labels(method=method, code=code),
                        self._latency.labels(method=method),
                    )
                    self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)


def parse_listen(listen: str) -> tuple[str, int]:
    """(host, port) of a `host:port` metrics address (InvalidInputError otherwise)."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError(f"metrics address {listen!r} is not host:port")
    return host, int(port)


def metrics_url(address: str) -> str:
    """The URL Prometheus scrapes for a process whose metrics port is `address`."""
    return f"http://{address}/metrics" if address else ""


class ProcessMetrics:
    """The metrics of this process: the registry, the RPC metrics, the server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.rpc = RpcMetrics(self.registry)
        self.started_at = time.time()
        self._server: object | None = None
        self._address = ""
        self._lock = threading.Lock()

    def add_gauges(self, read: Callable[[], Iterable[Gauge]]) -> Callable[[], None]:
        """Read `read()` at every scrape and export what it returns (a source that raises is
        left out of that scrape); returns what removes it again (its part stopped)."""
        collector = _Gauges(read)
        self.registry.register(collector)

        def remove() -> None:
            with contextlib.suppress(KeyError):
                self.registry.unregister(collector)

        return remove

    def serve(self, listen: str) -> str:
        """Serve the metrics on `listen` (host:port; port 0: any); the bound address. A process
        serves them once: asked again (several servers in one process, as in tests), it
        returns the address it serves on already."""
        with self._lock:
            if self._server is not None:
                return self._address
            return self._serve(listen)

    def _serve(self, listen: str) -> str:
        host, port = parse_listen(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound = server.server_address
        shown = f"[{host}]" if ":" in host else host
        self._address = f"{shown}:{bound[1]}"
        return self._address

    @property
    def address(self) -> str:
        """Where the metrics are served ("" before `serve`)."""
        return self._address

    def stop(self) -> None:
        """Stop serving the metrics."""
        server, self._server = self._server, None
        if server is not None:
            shutdown = getattr(server, "shutdown", None)
            if callable(shutdown):
                shutdown()
            close = getattr(server, "server_close", None)
            if callable(close):
                close()


PROCESS: Final = ProcessMetrics()
"""This process's metrics (one per process, as Prometheus expects)."""
