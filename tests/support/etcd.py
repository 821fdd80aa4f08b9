"""Real etcd clusters for tests: members of the system's `etcd` on loopback, on free ports.

The fixtures are in tests/conftest.py (shared by every folder): `etcd_cluster` (session scope)
is one 3-member cluster that every test shares, each under a fresh key prefix
(`fresh_prefix`); tests that kill, pause or restart members make their own with `etcd_factory`
(1 member or more), so that a fault never reaches another test. Clusters
are always stopped, also when a test or the start fails; a start that fails quotes the
member's log, and `LocalEtcd.log_tails` gives every member's tail for a failure report.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.cluster import ProcessStartError
from deploy.etcd import EtcdCluster, EtcdProcess, start_member, wait_healthy

_START_ATTEMPTS = 3
_START_TIMEOUT = 30.0


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (bound to port 0, read, closed).

    Another process may take one before etcd binds it: `LocalEtcd.start` then retries on
    other ports."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalEtcd:
    """A loopback etcd cluster of `size` members under `root`, started by `start`."""

    def __init__(self, root: Path, size: int, etcd: str) -> None:
        self.root = root
        self.size = size
        self.etcd = etcd
        self.cluster: EtcdCluster | None = None
        self.processes: list[EtcdProcess] = []

    @property
    def endpoints(self) -> list[str]:
        assert self.cluster is not None, "start the cluster first"
        return self.cluster.endpoints

    def store_spec(self, prefix: str) -> str:
        """`etcd:` store spec of this cluster under `prefix`."""
        assert self.cluster is not None, "start the cluster first"
        return self.cluster.store_spec(prefix)

    def start(self) -> LocalEtcd:
        """Start every member and wait until all are healthy (new ports if one was taken)."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            ports = free_ports(2 * self.size)
            token = f"test-{uuid.uuid4().hex[:12]}"
            pairs = list(zip(ports[::2], ports[1::2], strict=True))
            self.cluster = EtcdCluster.on_ports(self.root / f"attempt-{attempt}", pairs, token)
            self.processes = [self._spawn(i) for i in range(self.size)]
            try:
                wait_healthy(self.processes, timeout=_START_TIMEOUT)
                return self
            except ProcessStartError as error:
                taken = any("address already in use" in line for line in error.log_tail)
                self.stop()
                if not taken or attempt == _START_ATTEMPTS:
                    pytest.fail(f"{error}\n" + "\n".join(error.log_tail), pytrace=False)
        raise AssertionError("unreachable")

    def _spawn(self, index: int) -> EtcdProcess:
        assert self.cluster is not None
        member = self.cluster.members[index]
        log = self.root / "logs" / f"{self.cluster.token}-{member.name}.log"
        return start_member(self.cluster, member, log, etcd=self.etcd)

    def kill(self, index: int) -> None:
        """SIGKILL member `index` (0-based)."""
        self.processes[index].kill()

    def pause(self, index: int) -> None:
        self.processes[index].pause()

    def resume(self, index: int) -> None:
        self.processes[index].resume()

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start member `index` again on its data and ports; wait until it is healthy (it
        cannot be without a majority: `wait=False` then)."""
        if self.processes[index].is_running():
            self.processes[index].stop()
        self.processes[index] = self._spawn(index)
        if wait:
            wait_healthy([self.processes[index]], timeout=_START_TIMEOUT)

    def stop(self) -> None:
        """Stop every member (paused ones too); safe to call twice."""
        for started in self.processes:
            with contextlib.suppress(OSError):
                started.stop(grace=3.0)

    def log_tails(self) -> str:
        """The last lines of every member's log, for a failure report."""
        parts = []
        for started in self.processes:
            parts.append(f"--- {started.member.name} ({started.log_file})")
            parts.extend(started.log_tail())
        return "\n".join(parts)


@contextlib.contextmanager
def local_etcd(root: Path, size: int, etcd: str) -> Iterator[LocalEtcd]:
    """A started cluster, stopped however the block ends."""
    local = LocalEtcd(root, size, etcd)
    try:
        yield local.start()
    finally:
        local.stop()


def cluster_factory(root: Path, etcd: str) -> tuple[Callable[[int], LocalEtcd], Callable[[], None]]:
    """`make(size)` starts a cluster under `root`; `stop_all()` stops every one it made."""
    made: list[LocalEtcd] = []

    def make(size: int = 3) -> LocalEtcd:
        local = LocalEtcd(root / f"etcd-{len(made)}", size, etcd)
        made.append(local)
        return local.start()

    def stop_all() -> None:
        for local in made:
            local.stop()

    return make, stop_all


def fresh_prefix() -> str:
    """A key prefix nobody used, so that tests can share one cluster."""
    return f"test/{uuid.uuid4().hex}"


def compact(endpoints: list[str], revision: int) -> None:
    """Compact the cluster's history below `revision` (what `etcdctl compact` and etcd's
    auto-compaction do): reads at an older revision fail from then on."""
    from aetcd import rpc

    from domain_edge.etcd import EtcdClient

    with EtcdClient(endpoints) as client:

        async def call() -> None:
            member = await client.member_client(0)
            request = rpc.CompactionRequest(revision=revision, physical=True)
            await member.kvstub.Compact(request, timeout=10)

        client.run(call())
