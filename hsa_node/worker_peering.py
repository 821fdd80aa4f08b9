"""A key service worker's view of its HSA's peers: through its main process, never directly.

Only the main process talks to peers (`hsa_node.peering`). A worker (`hsa_node.worker`) reads
the shared floor table (`hsa_node.keyfloors`), learns a key's floor through its main process
(`GetKeyFloors` with `consult_peers`, which the main process honours for this host's own
identity only), and follows readiness and head confirmation from the `StandingNote` the main
process writes in the table's meta (`hsa_node.peer_standing`).

Invariants: a worker serves no key call until the main process of this run (its parent's pid
is in the note) took a peer's floors; it refuses key administration unless the main process
confirmed the head within its bound, and when the note is older than the bound plus 10 s (a
main process that stopped writing); a floor page from the main process counts only if signed
by this host over this call's nonce.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Final

import grpc

from domain_core.errors import NotAppliedError, UnavailableError
from domain_core.limits import DEFAULT_LIMITS, MAX_FLOOR_KEYS_PER_REQUEST, Limits
from domain_edge.transport import TlsMaterial
from hsa_node.floor_exchange import LEARN_DEADLINE_SECONDS
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.node import DomainNode, PeerStanding
from hsa_node.peer_links import HsaLinks, get_key_floors, rpc_reason
from hsa_node.peer_standing import (
    META_NAME,
    StandingNote,
    not_ready_error,
    unconfirmed_message,
)
from hsa_node.storage import NodeStore

__all__ = ["WorkerPeering"]

_META_POLL_SECONDS: Final = 0.1


class WorkerPeering:
    """A key service worker's view of its HSA's peers: through its main process."""

    def __init__(
        self,
        *,
        node: DomainNode,
        store: NodeStore,
        floor: MetadataVersionFloor,
        tls: TlsMaterial,
        limits: Limits = DEFAULT_LIMITS,
        parent_pid: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node = node
        self._store = store
        self._floor = floor
        self._parent = os.getppid() if parent_pid is None else parent_pid
        self._wall_clock = wall_clock
        self._clock = clock
        self._ready = False
        self._checked_at = float("-inf")
        self._meta: StandingNote | None = None
        self._main_address = ""
        self._links = HsaLinks(tls, limits, keep=lambda: (self._main_address,))

    def listen_floors(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Nothing to listen to: peers push to the main process, whose cache is told; a
        worker's entries are re-read at the end of their TTL."""

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Nothing to do here: the main process pushes every change of the shared floor table
        to the peers within `peering.PUSH_POLL_SECONDS`."""

    def close(self) -> None:
        """Close the channel to the main process."""
        self._links.close()

    def refresh(self) -> None:
        """Show on the worker's node whether its key service waits (status, health)."""
        try:
            self.require_ready()
        except UnavailableError:
            waiting = "key service waiting for the main process to take a peer's key floors"
            if self._node.standing.key_service_waiting != waiting:
                self._node.set_standing(PeerStanding(key_service_waiting=waiting))
            return
        if self._node.standing.key_service_waiting:
            self._node.set_standing(PeerStanding())

    def _read_meta(self) -> StandingNote | None:
        now = self._clock()
        if now - self._checked_at >= _META_POLL_SECONDS:
            meta = StandingNote.decode(self._floor.meta(META_NAME))
            self._meta = meta if meta is not None and meta.pid == self._parent else None
            self._checked_at = now
        return self._meta

    def require_ready(self) -> None:
        """NotAppliedError (definite: nothing was done) until the main process took a peer's
        floors (this run)."""
        if self._ready:
            return
        self._checked_at = float("-inf")  # only until ready: read what the main wrote now
        meta = self._read_meta()
        if meta is not None and meta.ready:
            self._ready = True
            return
        raise not_ready_error(self._node.host_id)

    def require_head_confirmed(self, operation: str) -> None:
        """NotAppliedError (definite: nothing was done) unless the main process confirmed the
        head within its bound."""
        self._checked_at = float("-inf")  # administration is rare: read what the main wrote
        meta = self._read_meta()
        now = self._wall_clock()
        if meta is None:
            raise NotAppliedError(
                f"{self._node.host_id}'s main process has not reported whether a peer confirmed "
                f"its domain state: {operation} is refused for now; retry or use another HSA"
            )
        seconds = now - meta.confirmed_at
        stale = now - meta.written_at > meta.bound + 10
        if seconds > meta.bound or stale:
            raise NotAppliedError(
                unconfirmed_message(
                    self._node.host_id, meta.version, seconds, meta.bound, operation, meta.reasons
                )
            )

    def learn(self, key_ids: Sequence[str]) -> None:
        """Ask the main process to learn these keys' floors from its peers (it writes them to
        the shared table); UnavailableError when it cannot."""
        address = self._store.load_address()
        if not address:
            raise UnavailableError(f"{self._node.host_id}'s main process address is not known")
        self._main_address = address
        ids = list(dict.fromkeys(key_ids))[:MAX_FLOOR_KEYS_PER_REQUEST]
        try:
            # Written to the shared table by the main process already; checked all the same.
            get_key_floors(
                self._links.stub(address, self._node.host_id),
                manifest=self._node.head.manifest,
                self_host_id=self._node.host_id,
                timeout=LEARN_DEADLINE_SECONDS * 3,
                from_self=True,
                key_ids=ids,
                consult_peers=True,
            )
        except grpc.RpcError as error:
            raise UnavailableError(
                f"{self._node.host_id} could not learn the metadata floor of key "
                f"{', '.join(ids)[:200]} through its main process: {rpc_reason(error)}"
            ) from None
