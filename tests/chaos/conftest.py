"""Fixtures of the chaos tests: real processes, a malicious coordinator, crash points.

Every process a fixture starts is killed at teardown whatever the outcome; when a test
failed, the tail of every process's log is printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import hsa_nodes
from support.cluster import LocalCluster, close_clusters, terminal_stream
from support.hsa_nodes import Domain, Processes, copy_domain
from support.malicious_coordinator import Attack, MaliciousCoordinatorServer, forging_domain
from support.simulator import MaliciousCoordinator

from domain_edge.config import NodeConfig
from domain_edge.faults import ENVIRONMENT_VARIABLE

SYNC_INTERVAL_SECONDS = 0.3

# One 3-host, 3-operator, quorum-2 template domain per module, copied per test.
domain_template = hsa_nodes.domain_template


def _failed(request: pytest.FixtureRequest, before: int) -> bool:
    return request.session.testsfailed > before


def _dump_logs(request: pytest.FixtureRequest, domain: Domain, names: list[str]) -> None:
    stream = terminal_stream(request)
    for name in names:
        path = domain.layout.log_file(name)
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-40:]
            stream.write(f"\n----- {name}: last {len(lines)} lines of {path}\n")
            stream.write("\n".join(lines) + "\n")


@pytest.fixture
def attack(
    domain_template: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Attack]:
    """hsa-1 and hsa-2 as real processes, following a malicious coordinator at genesis."""
    failed_before = request.session.testsfailed
    domain = copy_domain(domain_template, tmp_path / "d")
    server = MaliciousCoordinatorServer(domain.layout)
    procs = Processes(domain)
    hosts = ("hsa-1", "hsa-2")
    try:
        server.start()
        sim = forging_domain(domain.layout)
        server.serve(sim.genesis)
        for path in domain.layout.node_configs.values():
            config = NodeConfig.load(path)
            dataclasses.replace(
                config,
                coordinator=server.address,
                pull_interval_seconds=SYNC_INTERVAL_SECONDS,
                gossip_interval_seconds=SYNC_INTERVAL_SECONDS,
            ).save(path)
        procs.start(*hosts)
        server.wait_registered(hosts)
        yield Attack(domain, procs, server, sim, MaliciousCoordinator(sim), hosts)
    finally:
        procs.kill_all()
        server.stop()
        if _failed(request, failed_before):
            _dump_logs(request, domain, list(hosts))


# --- crash durability ------------------------------------------------------------------------


FaultPoints = Callable[..., contextlib.AbstractContextManager[None]]


@pytest.fixture
def fault_points(monkeypatch: pytest.MonkeyPatch) -> FaultPoints:
    """`with fault_points("after_store_before_push"):` processes started inside the block
    kill themselves (SIGKILL) at those points (`domain_edge.faults`)."""

    @contextlib.contextmanager
    def enabled(*points: str) -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setenv(ENVIRONMENT_VARIABLE, ",".join(points))
            yield

    return enabled


@pytest.fixture
def crash_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalCluster]]:
    """Factory: `crash_cluster(quorum=2)` inits a 3-node domain with fast sync, not started.

    The caller starts it (`cluster.start()`), possibly inside `fault_points(...)`. Every
    cluster is killed at teardown; logs are printed when the test failed.
    """
    clusters: list[LocalCluster] = []
    failed_before = request.session.testsfailed

    def make(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"d{len(clusters)}", **kwargs)
        clusters.append(cluster)
        layout = cluster.init()
        for path in layout.node_configs.values():
            config = NodeConfig.load(path)
            dataclasses.replace(
                config,
                pull_interval_seconds=SYNC_INTERVAL_SECONDS,
                gossip_interval_seconds=SYNC_INTERVAL_SECONDS,
            ).save(path)
        return cluster

    yield make
    close_clusters(request, clusters, failed_before)
