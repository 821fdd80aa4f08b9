"""One coordinator process: config, TLS, store, verified chain, and a gRPC server per port.

Invariants:
- the servers start only on a chain verified from the pinned genesis (`load_chain`);
- `listen` requires client certificates from the domain CA (mutual TLS: HSAs); the
  `operator_listen` port is server-authenticated TLS only (operators sign what they submit);
  both serve the same `Coordinator` servicer and health, only `listen` serves reflection;
- each port has a server of its own (its own thread pools, call and stream caps), so that
  what anyone can send to the operator port without a certificate cannot take threads or
  streams from the HSAs' port;
- the bound addresses are remembered next to the store and bound again on restart when the
  configured port is 0 and the remembered port is free, so HSAs and operators keep reaching
  the coordinator; a port already in use is never shared (SO_REUSEPORT off);
- the ready file is written atomically, only once the server is serving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from domain_coordinator._chain import load_chain
from domain_coordinator._hsa import HsaConnections
from domain_coordinator.service import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_SWEEP_INTERVAL_SECONDS,
    SERVICE_NAME,
    CoordinatorService,
)
from domain_coordinator.store import CoordinatorStore
from domain_coordinator.store_spec import open_coordination, open_store, state_directory
from domain_core.errors import InvalidInputError
from domain_core.limits import Limits
from domain_edge.config import CoordinatorConfig
from domain_edge.metrics import PROCESS, Gauge
from domain_edge.transport import (
    HealthService,
    StreamLimits,
    TlsMaterial,
    add_health_and_reflection,
    make_server,
    server_credentials,
    set_serving,
)
from domain_proto import services_pb2_grpc

log = logging.getLogger(__name__)

ADDRESS_FILE = "coordinator.address.json"
MAX_CONCURRENT_RPCS = 256
# The operator port: calls from anyone (operators have no certificate), so a small server of its
# own. Its only streams are health Watch (no thread) and refused WatchStates calls.
OPERATOR_WORKERS = 16
OPERATOR_MAX_CONCURRENT_RPCS = 64
OPERATOR_STREAMS = StreamLimits(per_peer=4, total=32, blocking=2)


@dataclass(frozen=True)
class BoundAddresses:
    """Where a running coordinator listens."""

    address: str  # mutual TLS, for HSAs
    operator_address: str  # server-auth TLS, for operators
    metrics_address: str = ""  # Prometheus metrics, plain HTTP ("" when not served)


def _gauges(service: CoordinatorService, store: CoordinatorStore) -> Iterator[Gauge]:
    """The coordinator's gauges, read when its metrics are scraped."""
    yield Gauge("hsm_domain_version", "Version of the verified head", service.head.version)
    yield Gauge("hsm_coordinator_pending_proposals", "Proposals pending", store.count_proposals())
    yield Gauge(
        "hsm_coordinator_registered_hsas", "HSAs registered with the store", len(store.list_hsas())
    )


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError(f"listen address {address[:80]!r} is not HOST:PORT")
    return host, int(port)


def _bind(
    server: grpc.Server, configured: str, remembered: str | None, creds: grpc.ServerCredentials
) -> str:
    """Bind `configured`, or the remembered address when the configured port is 0 and free."""
    host, port = _split(configured)
    if port == 0 and remembered:
        try:
            remembered_host, remembered_port = _split(remembered)
        except InvalidInputError:
            remembered_host, remembered_port = "", 0
        if remembered_host == host and remembered_port:
            try:
                bound = server.add_secure_port(remembered, creds)
            except RuntimeError:
                bound = 0
            if bound:
                return f"{host}:{bound}"
            log.info("the remembered address %s is taken; binding a new port", remembered)
    try:
        bound = server.add_secure_port(configured, creds)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {configured}: the address is in use or not local")
    return f"{host}:{bound}"


def _read_remembered(path: Path) -> dict[str, str]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {k: v for k, v in document.items() if isinstance(k, str) and isinstance(v, str)}


def write_json_atomically(path: Path, document: object, mode: int = 0o644) -> None:
    """Write JSON to a temp file in the same directory and rename it into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2, sort_keys=True)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CoordinatorServer:
    """A running coordinator: `start` verifies and serves, `stop` shuts down cleanly."""

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        max_streams: int = DEFAULT_MAX_STREAMS,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self.config = config
        self._limits = config.effective_limits() if limits is None else limits
        self._clock = clock
        self._max_streams = max_streams
        self._sweep_interval = sweep_interval
        self._store: CoordinatorStore | None = None
        self._hsas: HsaConnections | None = None
        self._servers: list[grpc.Server] = []
        self._service: CoordinatorService | None = None
        self._health: list[HealthService] = []
        self._remove_gauges: Callable[[], None] | None = None
        self.addresses: BoundAddresses | None = None

    @property
    def service(self) -> CoordinatorService:
        """The servicer (for in-process tests)."""
        if self._service is None:
            raise RuntimeError("the coordinator is not started")
        return self._service

    def _tls(self) -> TlsMaterial:
        files = self.config.tls
        try:
            return TlsMaterial.from_files(
                self.config.path(files.ca),
                self.config.path(files.cert),
                self.config.path(files.key),
            )
        except FileNotFoundError as error:
            raise InvalidInputError(f"missing TLS file {error.filename}") from None

    def start(self) -> BoundAddresses:
        """Open the store, verify the chain, bind both ports and serve."""
        config = self.config
        base_dir = config.base_dir or Path.cwd()
        tls = self._tls()
        genesis_path = config.path(config.genesis_state)
        try:
            genesis_raw = genesis_path.read_bytes()
        except OSError as error:
            raise InvalidInputError(
                f"cannot read the genesis state {genesis_path}: {error.strerror}"
            ) from None
        store = open_store(config.store, base_dir)
        self._store = store
        try:
            chain = load_chain(
                store,
                config.domain_id,
                bytes.fromhex(config.genesis_hash),
                genesis_raw,
                self._limits,
            )
            log.info(
                "verified the stored chain of %s up to version %d (%s)",
                config.domain_id,
                chain.version,
                chain.head.hash.hex()[:16],
            )
            self._hsas = HsaConnections(tls, config.hsa_call_timeout_seconds, self._limits)
            service = CoordinatorService(
                chain=chain,
                store=store,
                hsas=self._hsas,
                limits=self._limits,
                clock=self._clock,
                max_streams=self._max_streams,
                sweep_interval=self._sweep_interval,
                tombstone_seconds=config.key_tombstone_days * 86_400,
                proposal_retention_seconds=config.proposal_retention_days * 86_400,
                coordination=open_coordination(store, config.name),
            )
            self._service = service
            hsa_server, hsa_health = self._hsa_server(service)
            operator_server, operator_health = self._operator_server(service)
            self._servers = [hsa_server, operator_server]
            address_file = state_directory(config.store, base_dir) / ADDRESS_FILE
            remembered = _read_remembered(address_file)
            addresses = BoundAddresses(
                address=_bind(
                    hsa_server, config.listen, remembered.get("listen"), server_credentials(tls)
                ),
                operator_address=_bind(
                    operator_server,
                    config.operator_listen,
                    remembered.get("operator_listen"),
                    server_credentials(tls, server_auth_only=True),
                ),
            )
            for server in self._servers:
                server.start()
            self._health = [hsa_health, operator_health]
            for health in self._health:
                set_serving(health, [SERVICE_NAME], True)
            service.start_background()
            write_json_atomically(
                address_file,
                {"listen": addresses.address, "operator_listen": addresses.operator_address},
            )
            addresses = self._serve_metrics(addresses, service, store)
        except BaseException:
            self.stop(grace=0)
            raise
        self.addresses = addresses
        log.info(
            "serving HSAs (mutual TLS) on %s and operators (TLS) on %s",
            addresses.address,
            addresses.operator_address,
        )
        return addresses

    def _serve_metrics(
        self, addresses: BoundAddresses, service: CoordinatorService, store: CoordinatorStore
    ) -> BoundAddresses:
        """Export the coordinator's gauges with the process's metrics, on `metrics_listen`."""
        listen = self.config.metrics_listen
        if not listen:
            return addresses
        self._remove_gauges = PROCESS.add_gauges(lambda: _gauges(service, store))
        return dataclasses.replace(addresses, metrics_address=PROCESS.serve(listen))

    def _hsa_server(self, service: CoordinatorService) -> tuple[grpc.Server, HealthService]:
        """The HSAs' server (mutual TLS): room for every WatchStates stream, each on a thread
        of its own (the stream pool), and for the unary calls beside them."""
        streams = StreamLimits(
            per_peer=4, total=self._max_streams + 32, blocking=self._max_streams + 4
        )
        server = make_server(
            limits=self._limits,
            max_workers=32,
            max_concurrent_rpcs=max(MAX_CONCURRENT_RPCS, streams.total + 64),
            streams=streams,
        )
        services_pb2_grpc.add_CoordinatorServicer_to_server(  # type: ignore[no-untyped-call]
            service, server
        )
        return server, add_health_and_reflection(server, [SERVICE_NAME])

    def _operator_server(self, service: CoordinatorService) -> tuple[grpc.Server, HealthService]:
        """The operators' server (no client certificates): small, and without reflection."""
        server = make_server(
            limits=self._limits,
            max_workers=OPERATOR_WORKERS,
            max_concurrent_rpcs=OPERATOR_MAX_CONCURRENT_RPCS,
            streams=OPERATOR_STREAMS,
        )
        services_pb2_grpc.add_CoordinatorServicer_to_server(  # type: ignore[no-untyped-call]
            service, server
        )
        return server, add_health_and_reflection(server, [SERVICE_NAME], with_reflection=False)

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving (streams end), then close HSA channels and the store."""
        remove, self._remove_gauges = self._remove_gauges, None
        if remove is not None:
            remove()
        for health in self._health:
            health.enter_graceful_shutdown()
        if self._service is not None:
            self._service.stop()
        stopped = [server.stop(grace) for server in self._servers]
        for event in stopped:
            event.wait(grace + 5)
        self._servers = []
        if self._hsas is not None:
            self._hsas.close()
            self._hsas = None
        if self._store is not None:
            self._store.close()
            self._store = None


def write_ready_file(path: Path, name: str, addresses: BoundAddresses) -> None:
    """The ready file of docs/runtime.md, written atomically once the server is serving."""
    write_json_atomically(
        path,
        {
            "pid": os.getpid(),
            "address": addresses.address,
            "operator_address": addresses.operator_address,
            "metrics": addresses.metrics_address,
            "name": name,
        },
    )
