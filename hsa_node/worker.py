"""A key service worker process of an HSA: more cores for the data plane of one host.

`hsa-node worker --config FILE --index I` (started only by the main HSA process, see
`hsa_node.supervisor`) loads the node exactly as the main process does (`load_node`: host
identity, TLS, the stored chain re-verified from the pinned genesis, the domain keys unsealed
with the host's agreement key, in this process's memory only), then serves `KeyService`,
`Diagnostics` and health (not `HsaAdmin` nor `HsaPeer`) with the transport's mutual TLS and
interceptors, on the host of `listen` with an OS-chosen port (the one it had before, when free).

Invariants:
- a worker never writes the node's state store: it opens it read-only and follows it
  (`StoreFollower`): every `FOLLOW_INTERVAL_SECONDS` it looks for the state after its head and
  for a new removal state, and offers them to its own `DomainNode`, which verifies them as
  any offered state; domain-key rotations, new generations and the removal of the host reach
  it within about a second, and a removed worker stops serving (its key cache is cleared);
- its audit records go to its own hash-chained log, `data_dir/audit-worker-<I>.log` (one
  writer per file), signed with the host key; it runs no key upkeep (re-wrap, rotation and
  deletion stay in the main process);
- it shares the host's `key_versions.db` (SQLite, WAL: safe for several processes), so a
  key record older than one any process of the host accepted is refused by every process;
- it never calls another HSA (`hsa_node.worker_peering.WorkerPeering`): it learns a key's floor
  through its main process, serves no key call before the main process took a peer's floors,
  and refuses key administration when the main process's head confirmation is too old (both
  read from the shared table, written by the main process under its pid);
- it writes its address to `data_dir/worker-<I>.ready` atomically once serving;
- it exits by itself when the main process goes away: its stdin is a pipe from the main
  process, and end-of-file on it (the parent died, however) stops the worker; its parent pid
  changing does too.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Final

from domain_core.errors import ChainGapError, HsmDomainError, InvalidInputError
from domain_core.limits import MAX_KEY_SERVICE_WORKERS, Limits
from domain_edge.config import NodeConfig
from domain_edge.metrics import PROCESS, Gauge, parse_listen
from domain_edge.throttled_log import ThrottledLog
from domain_proto import services_pb2
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.keyhost import KeyServiceHost
from hsa_node.metrics import key_service_gauges
from hsa_node.node import DomainNode
from hsa_node.server import (
    SHUTDOWN_GRACE_SECONDS,
    NodeGrpcServer,
    bind_server,
    load_node,
    make_node_server,
    split_address,
)
from hsa_node.storage import (
    NodeStore,
    WorkerReady,
    read_worker_ready,
    worker_audit_file,
    worker_ready_path,
    write_worker_ready,
)
from hsa_node.worker_peering import WorkerPeering

__all__ = ["FOLLOW_INTERVAL_SECONDS", "WORKER_SERVICE_NAMES", "StoreFollower", "serve_worker"]

log = logging.getLogger(__name__)

FOLLOW_INTERVAL_SECONDS: Final = 0.5
WORKER_SERVICE_NAMES: tuple[str, ...] = tuple(
    services_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in ("Diagnostics", "KeyService")
)


class StoreFollower:
    """Offers the states the main process persisted to this worker's node, in order.

    One stat per poll when nothing changed: the file of the version after the head, and the
    removal state's (mtime, size). A state that does not verify is logged (throttled) and
    tried again at the next poll; the node is unchanged by it.
    """

    def __init__(
        self,
        node: DomainNode,
        store: NodeStore,
        interval: float = FOLLOW_INTERVAL_SECONDS,
    ) -> None:
        self._node = node
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._removal_seen: tuple[int, int] | None = None
        self._throttled = ThrottledLog(log)

    def poll(self) -> int:
        """Offer every newer stored state (and a new removal state); how many were installed."""
        installed = 0
        source = "the HSA's store"
        try:
            while self._node.removed_at is None and self._store.has_state(self._node.version + 1):
                state = self._store.load_state(self._node.version + 1)
                if not self._node.offer(state, source=source, quiet_repeats=True):
                    break
                installed += 1
            stamp = self._store.removal_stamp()
            if stamp is not None and stamp != self._removal_seen and self._node.removed_at is None:
                removal = self._store.load_removal()
                try:
                    if removal is not None:
                        self._node.offer(removal, source=source, quiet_repeats=True)
                except ChainGapError:
                    return installed  # the states before it are not on disk yet: next poll
                except HsmDomainError:
                    pass  # refused for good (the node logged why): do not offer it again
                self._removal_seen = stamp
        except HsmDomainError as error:
            self._throttled.warning(
                f"could not follow the HSA's store: {type(error).__name__}: {error}; "
                f"staying at version {self._node.version}"
            )
        except OSError as error:
            self._throttled.warning(f"could not read the HSA's store: {error}")
        return installed

    def start(self) -> None:
        """Start polling in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="store-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def _watch_parent(stop: threading.Event) -> None:
    """Set `stop` when the main process is gone: end of file on stdin, or a new parent pid."""
    parent = os.getppid()

    def read_until_eof() -> None:
        try:
            # The raw descriptor, not sys.stdin: a daemon thread blocked in a buffered read
            # would hold its lock when the interpreter finalizes.
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        if not stop.is_set():
            log.warning("the main HSA process is gone (its pipe closed); stopping")
        stop.set()

    def poll_parent() -> None:
        while not stop.wait(FOLLOW_INTERVAL_SECONDS):
            if os.getppid() != parent:
                log.warning("the main HSA process is gone (new parent process); stopping")
                stop.set()

    threading.Thread(target=read_until_eof, name="parent-pipe", daemon=True).start()
    threading.Thread(target=poll_parent, name="parent-pid", daemon=True).start()


def _serve_metrics(config: NodeConfig, node: DomainNode, keys: KeyServiceHost) -> str:
    """Serve this worker's metrics on the host of `metrics_listen`, a port of its own; where."""
    if not config.metrics_listen:
        return ""

    def read() -> Iterator[Gauge]:
        yield Gauge("hsm_domain_version", "Version of the verified head", node.version)
        yield from key_service_gauges(keys)

    PROCESS.add_gauges(read)
    host = parse_listen(config.metrics_listen)[0]
    return PROCESS.serve(f"[{host}]:0" if ":" in host else f"{host}:0")


def serve_worker(
    config: NodeConfig,
    index: int,
    stop: threading.Event,
    limits: Limits | None = None,
    *,
    watch_parent: bool = True,
) -> None:
    """Load the node read-only, serve the key service until `stop` is set (or the main
    process is gone, with `watch_parent`), and shut down cleanly. `limits` default to the
    config's."""
    if limits is None:
        limits = config.effective_limits()
    if not 1 <= index <= MAX_KEY_SERVICE_WORKERS:
        raise InvalidInputError(
            f"a worker index is from 1 to {MAX_KEY_SERVICE_WORKERS}, not {index}"
        )
    if watch_parent:
        _watch_parent(stop)
    loaded = load_node(config, limits, read_only=True)
    node = loaded.node
    peerings: list[WorkerPeering] = []

    def make_peering(floor: MetadataVersionFloor) -> WorkerPeering:
        peerings.append(
            WorkerPeering(node=node, store=loaded.store, floor=floor, tls=loaded.tls, limits=limits)
        )
        return peerings[0]

    keys = KeyServiceHost.open(
        config=config,
        node=node,
        tls=loaded.tls,
        limits=limits,
        peers=make_peering,
        audit_file=worker_audit_file(index),
        upkeep=False,
    )
    follower = StoreFollower(node, loaded.store)
    peerings[0].refresh()  # KeyService health NOT_SERVING until the main process is ready
    served: NodeGrpcServer | None = None
    try:
        served = make_node_server(keys, WORKER_SERVICE_NAMES, limits, domain_id=node.domain_id)
        ready_path = worker_ready_path(loaded.store.data_dir, index)
        previous = read_worker_ready(ready_path)
        host = split_address(config.listen)[0]
        address = bind_server(
            served.server, f"{host}:0", loaded.tls, previous.address if previous else None
        )
        served.start(node)
        follower.poll()  # catch up with what the main process installed while this one loaded
        follower.start()
        metrics = _serve_metrics(config, node, keys)
        write_worker_ready(
            ready_path, WorkerReady(pid=os.getpid(), address=address, index=index, metrics=metrics)
        )
        status = node.status()
        log.info(
            "worker %d serving the key service on %s: domain %s version %d, healthy %s",
            index,
            address,
            status.domain_id,
            status.version,
            status.healthy,
        )
        while not stop.wait(0.5):
            peerings[0].refresh()
    finally:
        follower.stop()
        if served is not None:
            served.health.enter_graceful_shutdown()
            served.server.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
        keys.close()
        for peering in peerings:
            peering.close()
        log.info("worker %d stopped", index)
