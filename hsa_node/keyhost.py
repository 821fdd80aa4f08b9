"""The key service's parts in one HSA process, opened and closed together.

`KeyServiceHost.open` opens the audit log (`data_dir/audit.log`), the version floor
(`data_dir/key_versions.db`), the HSA's peering over it (`hsa_node.peering`), a mutual-TLS
channel to the coordinator as this host, the key cache (which signs every record it writes
with this host's key), the `KeyService` servicer (with the node config's limits: the CreateKey
quota), the admin-call audit interceptor and the background key upkeep (also what prepares a
change that would strand key records, for `HsaAdmin`). `hsa_node.server` registers the
servicer and the interceptor, starts the upkeep after the server, and closes everything after
the server stopped.

Invariants: an HSA whose audit log does not verify, or is below its head file, does not start
(the audit log refuses to extend a broken chain or resume a cut one); the log checkpoints in
the background, about once a second of activity; the cache is emptied when the node stops
serving (removed from the domain), so no key outlives the membership that let it be opened;
the upkeep runs only when a coordinator is configured, and only in the main HSA process (a
key service worker opens the host with its own audit log, `audit-worker-<i>.log`, and no
upkeep, so re-wrap, rotation and deletion are never done twice on one host).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from domain_core.keytokens import RecordSigner
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge import transport
from domain_edge.audit import AUDIT_LOG_FILE, AuditLog
from domain_edge.config import NodeConfig
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2_grpc
from hsa_node.admin_audit import AdminAuditInterceptor
from hsa_node.keycache import KeyCache
from hsa_node.keycalls import PeerGate
from hsa_node.keyfloors import FLOOR_FILE, FloorSource, MetadataVersionFloor
from hsa_node.keyrecords import KeyRecordClient
from hsa_node.keyservice import KeyServiceServicer
from hsa_node.node import DomainNode
from hsa_node.quotas import Quotas
from hsa_node.rewrap import KeyMaintainer

__all__ = ["KeyPeers", "KeyServiceHost"]


class KeyPeers(FloorSource, PeerGate, Protocol):
    """The HSA's peering as the key service uses it (`hsa_node.peering.Peering` in the main
    process, `WorkerPeering` in a key service worker)."""

    def listen_floors(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Call `listener(key_ids)` when peers raised the floors of these keys."""


class KeyServiceHost:
    """The audit log, key cache, KeyService servicer and key upkeep of one HSA."""

    def __init__(
        self,
        *,
        audit: AuditLog,
        floor: MetadataVersionFloor,
        channel: grpc.Channel | None,
        cache: KeyCache,
        servicer: KeyServiceServicer,
        maintainer: KeyMaintainer | None,
    ) -> None:
        """Use `open`."""
        self.audit = audit
        self.floor = floor
        self.cache = cache
        self.servicer = servicer
        self.maintainer = maintainer
        self._channel = channel

    @classmethod
    def open(
        cls,
        *,
        config: NodeConfig,
        node: DomainNode,
        tls: TlsMaterial,
        limits: Limits = DEFAULT_LIMITS,
        peers: Callable[[MetadataVersionFloor], KeyPeers],
        audit_file: str = AUDIT_LOG_FILE,
        upkeep: bool = True,
    ) -> KeyServiceHost:
        """Open every part (AuditLogError if the audit log does not verify).

        `peers` makes the HSA's peering over the opened floor table: the key service learns
        floors through it and waits on it (readiness, head confirmation). `audit_file` names
        the audit log in the data directory (one writer per file); `upkeep` False leaves the
        background key upkeep out (worker processes).
        """
        data_dir = config.path(config.data_dir)
        # Background checkpoints: a signed, fsynced head about every second of activity, and
        # no signature or fsync on the threads that serve calls.
        audit = AuditLog(
            data_dir / audit_file,
            host_id=node.host_id,
            signer=node.identity.signer,
            background=True,
        )
        try:
            floor = MetadataVersionFloor(data_dir / FLOOR_FILE)
        except BaseException:
            audit.close()
            raise
        peering = peers(floor)
        channel = (
            transport.mtls_channel(config.coordinator, tls, transport.COORDINATOR, limits)
            if config.coordinator
            else None
        )
        cache = KeyCache(
            domain_id=node.domain_id,
            domain_keys=node.domain_keys,
            records=KeyRecordClient(channel, config.coordinator),
            floor=floor,
            signer=RecordSigner(node.domain_id, node.host_id, node.identity.signer),
            peer_floors=peering,
            max_bytes=config.key_cache_mib * 1024 * 1024,
        )

        def raised(key_ids: Sequence[str]) -> None:
            for key_id in key_ids:
                cache.mark_stale(key_id)  # re-read at the next use, not at the end of the TTL

        peering.listen_floors(raised)
        # Each key-service process of the domain enforces its share of the quotas: the
        # domain's hosts, each running this host's count of processes (docs/runtime.md).
        processes = 1 + config.key_service_workers
        quotas = Quotas(limits, lambda: len(node.head.manifest.hosts_by_id) * processes)
        servicer = KeyServiceServicer(
            node=node, cache=cache, audit=audit, limits=limits, peers=peering, quotas=quotas
        )
        maintainer = (
            KeyMaintainer(node=node, cache=cache, audit=audit, peers=peering)
            if channel and upkeep
            else None
        )

        def on_serving(serving: bool) -> None:
            if not serving:
                cache.clear()

        node.add_listener(on_serving)
        return cls(
            audit=audit,
            floor=floor,
            channel=channel,
            cache=cache,
            servicer=servicer,
            maintainer=maintainer,
        )

    def interceptors(self) -> list[grpc.ServerInterceptor]:  # type: ignore[type-arg]
        """Server interceptors to install (the admin-call audit)."""
        return [AdminAuditInterceptor(self.audit)]

    def register(self, server: grpc.Server) -> None:
        """Add the KeyService to `server`."""
        services_pb2_grpc.add_KeyServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.servicer, server
        )

    def start(self) -> None:
        """Start the background key upkeep."""
        if self.maintainer is not None:
            self.maintainer.start()

    def stop_upkeep(self) -> None:
        """Stop the background key upkeep (before the server stops)."""
        if self.maintainer is not None:
            self.maintainer.stop()

    def close(self) -> None:
        """Stop the upkeep, then close the channel, the floor and the audit log (a final
        signed checkpoint). Call after the server stopped."""
        self.stop_upkeep()
        if self._channel is not None:
            self._channel.close()
        self.servicer.close()  # the sessions' calls finish before the audit log closes
        self.floor.close()
        self.audit.close()
