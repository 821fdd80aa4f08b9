"""The status sampler of a chaos run: every process's version and state hash, periodically.

`Sampler` reads HsaAdmin.GetStatus of every member HSA and the DomainStatus of every
coordinator (each replica of a domain with replicas, by its name) every `interval` seconds,
straight to each process (not through the proxies that the faults cut), and records each
answer as an `info` event ("sampler", "status") that the checker reads (versions never go
down, no two states for one version).

Invariants: each process is sampled by its own thread, so a paused one (whose calls time out)
does not slow the sampling of the others; one thread's samples are in the order it took them;
a call that fails is counted as a miss, never recorded as a sample.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from deploy.chaos.history import History
from domain_core.errors import HsmDomainError
from domain_edge.client import CoordinatorClient
from domain_edge.transport import TlsMaterial, hsa_host, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["Sampler"]


class Sampler(threading.Thread):
    """Records every node's and every coordinator's version and state hash, periodically.

    Each process is sampled by its own thread, so a paused one (whose calls time out) does
    not slow the sampling of the others; one thread's samples are in the order it took them.
    """

    def __init__(
        self,
        addresses: Callable[[], dict[str, str]],
        coordinators: dict[str, str],
        tls: TlsMaterial,
        history: History,
        stop: threading.Event,
        interval: float = 0.5,
    ) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self._addresses = addresses
        self._coordinators = dict(coordinators)
        self._tls = tls
        self._history = history
        self._halt = stop
        self._interval = interval
        self._lock = threading.Lock()
        self.samples = 0
        self.misses = 0

    def _count(self, sampled: bool) -> None:
        with self._lock:
            if sampled:
                self.samples += 1
            else:
                self.misses += 1

    def _record(self, host: str, version: int, state_hash: bytes, healthy: bool) -> None:
        self._count(True)
        self._history.info(
            "sampler",
            "status",
            host=host,
            version=version,
            state_hash=state_hash.hex(),
            healthy=healthy,
        )

    def _sample_node(self, host: str) -> None:
        channels: dict[str, grpc.Channel] = {}
        try:
            while not self._halt.is_set():
                address = self._addresses().get(host)
                if address is not None:
                    channel = channels.get(address)
                    if channel is None:
                        channel = channels[address] = mtls_channel(
                            address, self._tls, hsa_host(host)
                        )
                    stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
                    try:
                        status: services_pb2.HsaStatus = stub.GetStatus(
                            services_pb2.HsaStatusRequest(), timeout=1.0
                        )
                    except grpc.RpcError:
                        self._count(False)
                    else:
                        self._record(host, status.version, status.state_hash, status.healthy)
                self._halt.wait(self._interval)
        finally:
            for channel in channels.values():
                channel.close()

    def _sample_coordinator(self, name: str, address: str) -> None:
        with CoordinatorClient(address, self._tls.ca_pem, timeout=1.0) as client:
            while not self._halt.is_set():
                try:
                    status = client.domain_status()
                except HsmDomainError:
                    self._count(False)
                else:
                    self._record(name, status.version, status.state_hash, True)
                self._halt.wait(self._interval)

    def run(self) -> None:
        threads = [
            threading.Thread(
                target=self._sample_node, args=(host,), name=f"chaos-sampler-{host}", daemon=True
            )
            for host in self._addresses()
        ]
        threads.extend(
            threading.Thread(
                target=self._sample_coordinator,
                args=(name, address),
                name=f"chaos-sampler-{name}",
                daemon=True,
            )
            for name, address in self._coordinators.items()
        )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
