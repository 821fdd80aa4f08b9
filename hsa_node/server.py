"""One HSA process: load its files, verify its chain, serve gRPC, keep current, stop cleanly.

Startup order (each step refuses to continue with a one-line reason):
config -> host identity and its TLS certificate -> TLS material -> genesis pinned by the
config -> stored states replayed through the verifier -> domain keys unsealed (in memory) ->
this host's audit heads published at the coordinator and the peers fetched, and the head
files raised to them (`hsa_node.audit_heads`) -> key service (audit log verified against its
head file and opened, version floor, peering, key cache) -> server bound (the remembered
address first, when free) -> peering (the key service waits for a peer's key floors:
UNAVAILABLE, KeyService health NOT_SERVING) -> sync threads and key upkeep -> key service
worker processes (`key_service_workers`, `hsa_node.supervisor`), each ready -> ready file
(with the workers' addresses). The ready file does not wait for the peers: HSAs of a domain
that start together must reach each other's HsaPeer to become ready.

Invariants: the server requires mutual TLS from the domain CA on every call; it listens only
where the config says (127.0.0.1 by default); shutdown stops the sync threads and the key
upkeep before the server (grace 2 s) so no state arrives half-way, and closes the audit log
(a final signed checkpoint) after it; the worker processes are stopped before all of that, so
none outlives the main process's clean stop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from domain_core.errors import InvalidInputError, UnavailableError
from domain_core.identity import HostIdentity
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState
from domain_core.pki import certificate_fingerprint
from domain_edge import transport
from domain_edge.config import NodeConfig
from domain_edge.identity_files import load_host_certificate, load_host_identity
from domain_edge.metrics import PROCESS, Gauge
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc
from hsa_node.audit_heads import AuditHeadBook, fetch_own_heads, recover_own_heads
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.keyhost import KeyServiceHost
from hsa_node.keysession import SESSION_STREAMS
from hsa_node.metrics import hsa_gauges
from hsa_node.node import DomainNode
from hsa_node.peering import Peering
from hsa_node.servicers import (
    CoordinatorPin,
    DiagnosticsServicer,
    HsaAdminServicer,
    HsaPeerServicer,
)
from hsa_node.storage import NodeStore, write_atomically
from hsa_node.supervisor import WorkerSupervisor
from hsa_node.sync import Syncer

__all__ = [
    "SERVICE_NAMES",
    "HsaServer",
    "NodeGrpcServer",
    "bind_server",
    "load_node",
    "make_node_server",
    "split_address",
]

log = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = tuple(
    services_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("HsaAdmin", "HsaPeer", "Diagnostics", "KeyService")
)
SHUTDOWN_GRACE_SECONDS = 2.0
KEY_SERVICE_NAME = services_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port"; InvalidInputError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInputError(f"{address!r} is not an address of the form host:port")
    return host, int(port)


def _port_is_free(address: str) -> bool:
    """Whether a plain listening socket could bind `address` now (no SO_REUSEPORT sharing)."""
    host, port = split_address(address)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def bind_server(server: grpc.Server, listen: str, tls: TlsMaterial, remembered: str | None) -> str:
    """Bind `server` with mutual TLS where `listen` says; returns the bound "host:port".

    With port 0 in `listen`, the `remembered` address is tried first when it is on the same
    host and free (clients keep reaching a restarted process), then an OS-chosen port.
    """
    host, port = split_address(listen)
    credentials = transport.server_credentials(tls)
    candidates = []
    if port == 0 and remembered:
        try:
            same_host = split_address(remembered)[0] == host
        except InvalidInputError:
            same_host = False
        if same_host and _port_is_free(remembered):
            candidates.append(remembered)
    if port != 0 and not _port_is_free(listen):
        # gRPC binds with SO_REUSEPORT: without this check two processes could share a port.
        raise UnavailableError(f"cannot listen on {listen}: the address is in use")
    candidates.append(listen)
    for candidate in candidates:
        try:
            bound = server.add_secure_port(candidate, credentials)
        except RuntimeError:
            bound = 0
        if bound:
            return f"{host}:{bound}"
        log.info("could not bind %s", candidate)
    raise UnavailableError(f"cannot listen on {listen}: address in use or invalid")


@dataclass(frozen=True)
class NodeGrpcServer:
    """A node's gRPC server as `make_node_server` assembled it (not bound, not started), with
    its health servicer and the service names health reports on."""

    server: grpc.Server
    health: transport.HealthService
    service_names: tuple[str, ...]

    def start(self, node: DomainNode) -> None:
        """Make health follow `node` (NOT_SERVING until the node says it serves; KeyService
        also while it waits for key floors from a peer), then start serving: the listener is
        added first, so no call sees health before the node set it."""
        names, health_servicer = self.service_names, self.health

        def on_serving(serving: bool) -> None:
            transport.set_serving(health_servicer, names, serving)
            if serving and KEY_SERVICE_NAME in names and node.standing.key_service_waiting:
                health_servicer.set(KEY_SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

        node.add_listener(on_serving)
        self.server.start()


def make_node_server(
    keys: KeyServiceHost,
    service_names: Sequence[str],
    limits: Limits = DEFAULT_LIMITS,
    register: Callable[[grpc.Server], None] | None = None,
    *,
    domain_id: str,
) -> NodeGrpcServer:
    """The gRPC server of an HSA or of one of its key service workers, built the same way for
    both so the two cannot drift: the transport's interceptors and the key service's, the key
    service, `register`'s servicers (the HSA's admin and peer services), Diagnostics, then
    health and reflection for `service_names`. Bind it (`bind_server`), then `start` it."""
    server = transport.make_server(
        limits=limits, interceptors=keys.interceptors(), streams=SESSION_STREAMS
    )
    keys.register(server)
    if register is not None:
        register(server)
    services_pb2_grpc.add_DiagnosticsServicer_to_server(  # type: ignore[no-untyped-call]
        DiagnosticsServicer(domain_id, limits), server
    )
    health_servicer = transport.add_health_and_reflection(server, service_names)
    return NodeGrpcServer(server, health_servicer, tuple(service_names))


@dataclass
class LoadedNode:
    """Everything `load_node` read and verified."""

    config: NodeConfig
    identity: HostIdentity
    tls: TlsMaterial
    store: NodeStore
    node: DomainNode


def load_node(
    config: NodeConfig, limits: Limits = DEFAULT_LIMITS, *, read_only: bool = False
) -> LoadedNode:
    """Read and verify everything an HSA needs before it may serve.

    With `read_only` (a key service worker) the node's store is opened read-only: the
    stored chain is verified all the same, but nothing is written to the data directory.
    """
    identity_dir = config.path(config.identity_dir)
    identity = load_host_identity(identity_dir)
    if identity.host_id != config.host_id:
        raise InvalidInputError(
            f"{identity_dir} holds host {identity.host_id}, but the config is for {config.host_id}"
        )
    host_certificate = load_host_certificate(identity, identity_dir)
    tls = TlsMaterial.from_files(
        config.path(config.tls.ca), config.path(config.tls.cert), config.path(config.tls.key)
    )
    if certificate_fingerprint(tls.cert_pem) != certificate_fingerprint(host_certificate):
        raise InvalidInputError(
            f"the TLS certificate {config.path(config.tls.cert)} is not the host's certificate "
            f"in {identity_dir}"
        )
    genesis_path = config.path(config.genesis_state)
    try:
        genesis = SealedState.from_bytes(genesis_path.read_bytes(), limits)
    except FileNotFoundError:
        raise InvalidInputError(f"genesis state file {genesis_path} does not exist") from None
    store = NodeStore(config.path(config.data_dir), limits, read_only=read_only)
    node = DomainNode.open(
        domain_id=config.domain_id,
        genesis_hash=bytes.fromhex(config.genesis_hash),
        genesis=genesis,
        identity=identity,
        tls_certificate_pem=host_certificate,
        store=store,
    )
    return LoadedNode(config=config, identity=identity, tls=tls, store=store, node=node)


class HsaServer:
    """The gRPC server and sync threads of one loaded HSA."""

    def __init__(self, loaded: LoadedNode, limits: Limits = DEFAULT_LIMITS) -> None:
        self._loaded = loaded
        self._limits = limits
        self._server: grpc.Server | None = None
        self._syncer: Syncer | None = None
        self._health: transport.HealthService | None = None
        self._keys: KeyServiceHost | None = None
        self._peering: Peering | None = None
        self._remove_gauges: Callable[[], None] | None = None
        self.address = ""
        self.metrics_address = ""

    def _serve_metrics(self, read: Callable[[], Iterable[Gauge]]) -> None:
        """Export this HSA's gauges with the process's metrics, served on `metrics_listen`."""
        listen = self._loaded.config.metrics_listen
        if listen:
            self._remove_gauges = PROCESS.add_gauges(read)
            self.metrics_address = PROCESS.serve(listen)

    def _bind(self, server: grpc.Server) -> str:
        config, store = self._loaded.config, self._loaded.store
        return bind_server(server, config.listen, self._loaded.tls, store.load_address())

    def _audit_heads(self) -> AuditHeadBook:
        """Raise this host's head files to the heads the coordinator and peers hold of its
        logs (so a log deleted with its head file is still refused), then the book that
        publishes the heads and keeps the peers'."""
        loaded, node = self._loaded, self._loaded.node
        own_key = node.identity.signer.public_key
        peers = loaded.store.load_peers()
        published, answered = fetch_own_heads(
            host_id=node.host_id,
            coordinator=loaded.config.coordinator,
            peers=peers,
            tls=loaded.tls,
            limits=self._limits,
        )
        recover_own_heads(loaded.store.data_dir, node.host_id, own_key, published)
        if answered:
            log.info("audit heads: checked with %s", ", ".join(answered))
        elif loaded.config.coordinator or peers:
            log.warning(
                "audit heads: neither the coordinator nor a peer answered; the audit logs are "
                "checked against their local head files only"
            )
        return AuditHeadBook(
            loaded.store.data_dir,
            node.host_id,
            own_key,
            lambda host_id: node.head.manifest.host_signing_key(host_id),
        )

    def _admin_servicer(
        self, node: DomainNode, catch_up: Callable[[], int], keys: KeyServiceHost
    ) -> HsaAdminServicer:
        """The pinned coordinator's calls: apply, rotate, install (and, on the session host of
        a recovery, producing the recover state with the session key of its identity dir)."""
        config = self._loaded.config
        pin = CoordinatorPin.from_config(config)
        (log.info if pin.fingerprints else log.warning)("%s", pin.describe())
        return HsaAdminServicer(
            node,
            catch_up,
            self._limits,
            coordinator=pin,
            key_records=keys.maintainer,
            session_dir=config.path(config.identity_dir),
        )

    def start(self) -> str:
        """Bind, start serving, start the sync threads; returns the address others dial (the
        bound one, or `advertise_address`)."""
        loaded = self._loaded
        node, config = loaded.node, loaded.config
        audit_heads = self._audit_heads()
        peerings: list[Peering] = []

        def make_peering(floor: MetadataVersionFloor) -> Peering:
            peerings.append(
                Peering(
                    node=node,
                    store=loaded.store,
                    floor=floor,
                    tls=loaded.tls,
                    address="",  # told once bound
                    bound=config.head_confirmation_bound,
                    configured_addresses=config.peer_addresses,
                    limits=self._limits,
                )
            )
            return peerings[0]

        keys = KeyServiceHost.open(
            config=config, node=node, tls=loaded.tls, limits=self._limits, peers=make_peering
        )
        self._keys = keys
        peering = self._peering = peerings[0]
        syncer_ref: list[Syncer] = []

        def catch_up() -> int:
            return syncer_ref[0].catch_up_from_coordinator()

        admin = self._admin_servicer(node, catch_up, keys)
        peer = HsaPeerServicer(node, self._limits, peering, audit_heads=audit_heads)

        def register_hsa_services(server: grpc.Server) -> None:
            services_pb2_grpc.add_HsaAdminServicer_to_server(admin, server)  # type: ignore[no-untyped-call]
            services_pb2_grpc.add_HsaPeerServicer_to_server(peer, server)  # type: ignore[no-untyped-call]

        served = make_node_server(
            keys, SERVICE_NAMES, self._limits, register_hsa_services, domain_id=node.domain_id
        )
        server = served.server
        bound = self._bind(server)
        loaded.store.save_address(bound)  # rebound after a restart, when free
        self.address = config.advertise_address or bound  # where others dial this HSA
        peering.set_address(self.address)
        syncer = Syncer(
            node=node,
            store=loaded.store,
            tls=loaded.tls,
            coordinator=loaded.config.coordinator,
            pull_interval=loaded.config.pull_interval_seconds,
            gossip_interval=loaded.config.gossip_interval_seconds,
            address=self.address,
            peering=peering,
            limits=self._limits,
            audit_heads=audit_heads,
        )
        syncer_ref.append(syncer)
        peering.start()  # the key service waits for floors from the first call on
        self._serve_metrics(lambda: hsa_gauges(node, keys, peering, syncer))
        served.start(node)
        self._server, self._syncer, self._health = server, syncer, served.health
        syncer.start()
        keys.start()
        status = node.status()
        log.info(
            "serving on %s%s: domain %s version %d, member %s, healthy %s%s",
            bound,
            f" (as {self.address})" if self.address != bound else "",
            status.domain_id,
            status.version,
            status.member,
            status.healthy,
            f" ({status.detail})" if status.detail else "",
        )
        return self.address

    def stop(self) -> None:
        """Stop the background threads, then the server (grace 2 s), then the key service's
        files (the audit log gets its final checkpoint)."""
        remove, self._remove_gauges = self._remove_gauges, None
        if remove is not None:
            remove()
        if self._keys is not None:
            self._keys.stop_upkeep()
        if self._syncer is not None:
            self._syncer.stop()
        if self._peering is not None:
            self._peering.stop()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
        if self._keys is not None:
            self._keys.close()
        log.info("stopped")


def write_ready_file(
    path: Path,
    address: str,
    name: str,
    workers: Sequence[str] | None = None,
    *,
    metrics: str = "",
    worker_metrics: Sequence[str] = (),
) -> None:
    """The ready file of docs/runtime.md, written atomically (public content); `workers` are
    the addresses of the key service worker processes (an HSA writes the field, maybe empty),
    `metrics` where this process serves its metrics."""
    document: dict[str, object] = {
        "pid": os.getpid(),
        "address": address,
        "name": name,
        "metrics": metrics,
        "worker_metrics": list(worker_metrics),
    }
    if workers is not None:
        document["workers"] = list(workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(document, sort_keys=True) + "\n").encode(), 0o644)


def serve(
    config: NodeConfig,
    ready_file: Path | None,
    stop: threading.Event,
    *,
    config_path: Path | None = None,
    verbose: bool = False,
) -> None:
    """Load, serve (with `config.key_service_workers` worker processes, started from
    `config_path`) until `stop` is set, and shut down cleanly."""
    if config.key_service_workers and config_path is None:
        raise InvalidInputError("key service workers need the config file's path to start")
    limits = config.effective_limits()
    loaded = load_node(config, limits)
    server = HsaServer(loaded, limits)
    address = server.start()
    supervisor: WorkerSupervisor | None = None
    try:
        name = loaded.config.host_id

        def publish(workers: Sequence[str]) -> None:
            if ready_file is not None:
                write_ready_file(
                    ready_file,
                    address,
                    name,
                    workers,
                    metrics=server.metrics_address,
                    worker_metrics=supervisor.metrics_addresses() if supervisor else [],
                )

        if config.key_service_workers and config_path is not None:
            supervisor = WorkerSupervisor(
                config_path=config_path,
                config=config,
                count=config.key_service_workers,
                stopping=stop,
                on_change=publish,
                verbose=verbose,
            )
            workers = supervisor.start()
            if not stop.is_set():
                publish(workers)
        else:
            publish([])
        while not stop.wait(0.5):
            pass
    finally:
        if supervisor is not None:
            supervisor.stop()
        server.stop()
