"""Key metadata floors between the HSAs of a domain: exchanged, pushed, learned and served.

Floors (`hsa_node.keyfloors.MetadataVersionFloor`, shared by every process of the HSA) are
taken from peers by the max rule only (never lowered; the same version with another hash
keeps this HSA's floor and is logged at WARNING), and only from hosts of the verified head:
from a page signed by the host (`peer_links.get_key_floors`), or pushed over the server side,
whose servicer checked the caller's TLS fingerprint against the head
(`servicers.HsaPeerServicer`). The main process's `Peering` runs a `FloorExchange`:
- exchange: each round, the floors a peer changed after this HSA's cursor on it (its table's
  epoch and change sequence, persisted) are fetched page by page, so an HSA that missed a
  push converges within a round; a peer whose complete table was taken in full makes the key
  service ready (the peering decides);
- push: a floor this host's processes set is pushed to the peers at once, in the background,
  best effort, with a short deadline; a change a client made is announced before it is
  acknowledged (`announce`: it waits, at most 0.5 s, until one peer took it);
- learn: a key with no local floor is served only once at least one peer answered for it
  (asked of every peer in parallel, 1 s);
- serve: a signed page of this HSA's floors (of keys asked for, or changed after a sequence),
  and pushed floors taken from the calling host; `consult_peers` only for this host's own
  workers.

Invariants: a floor is never lowered; floors come only from hosts of the verified head (a
removed host, the coordinator or the network cannot get one accepted); at most
`MAX_FLOORS_PER_PAGE` floors per page or push and `MAX_FLOOR_KEYS_PER_REQUEST` keys per
request; a failure of one peer never stops the others (it is in its view and the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Final

import grpc

from domain_core import peering as signed
from domain_core.ciphertext import validate_key_id
from domain_core.errors import (
    HsmDomainError,
    LimitExceededError,
    PermissionDeniedError,
    UnavailableError,
)
from domain_core.limits import (
    MAX_FLOOR_KEYS_PER_REQUEST,
    MAX_FLOOR_PAGES_PER_ROUND,
    MAX_FLOORS_PER_PAGE,
)
from domain_core.model import SealedState
from domain_edge.throttled_log import ThrottledLog
from domain_proto import services_pb2
from hsa_node.keyfloors import FloorChange, MetadataVersionFloor
from hsa_node.node import DomainNode
from hsa_node.peer_addresses import AddressBook
from hsa_node.peer_links import (
    HsaLinks,
    PeerView,
    floor_message,
    get_key_floors,
    peers_of,
    rpc_reason,
)

__all__ = ["ANNOUNCE_DEADLINE_SECONDS", "LEARN_DEADLINE_SECONDS", "FloorExchange"]

# These lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.peering")

FLOORS_DEADLINE_SECONDS: Final = 3.0
PUSH_DEADLINE_SECONDS: Final = 1.0
# How long a key change waits for a first peer to take its floor before it is acknowledged.
ANNOUNCE_DEADLINE_SECONDS: Final = 0.5
LEARN_DEADLINE_SECONDS: Final = 1.0


@dataclass
class _Sync:
    """Progress of one round's floor exchange with one peer."""

    complete: bool = False
    raised: int = 0
    error: str = ""


class FloorExchange:
    """The floors of the main HSA process with its peers (see the module docstring)."""

    def __init__(
        self,
        *,
        node: DomainNode,
        floor: MetadataVersionFloor,
        links: HsaLinks,
        book: AddressBook,
        pool: ThreadPoolExecutor,
        on_floors_raised: Callable[[Sequence[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`pool` runs the calls to peers; `on_floors_raised(key_ids)` is told of floors a peer
        raised."""
        self._node = node
        self._floor = floor
        self._links = links
        self._book = book
        self._pool = pool
        self._on_floors_raised = on_floors_raised
        self._clock = clock
        self._throttled = ThrottledLog(log)

    def listen(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Call `listener(key_ids)` when peers raised the floors of these keys."""
        self._on_floors_raised = listener

    # --- exchange, each round -----------------------------------------------------------------

    def exchange(self, views: dict[str, PeerView]) -> list[str]:
        """Take, from every peer that signed its head this round, the floors it changed after
        this HSA's cursor on it (a peer's failure goes into its view and the log); the peers
        whose complete table this HSA now took in full."""
        heads = {h: v for h, v in views.items() if v.head is not None}
        futures = {h: self._pool.submit(self._sync_floors, v) for h, v in heads.items()}
        synced = []
        for host, future in futures.items():
            try:
                result = future.result(timeout=FLOORS_DEADLINE_SECONDS * 4)
            except Exception as error:
                result = _Sync(error=f"{type(error).__name__}: {error}")
            if result.error:
                views[host].error = result.error
                self._throttled.warning(f"key floors from peer {host}: {result.error}")
            if result.raised:
                log.info("raised %d key floor(s) from peer %s", result.raised, host)
            # Only a complete table makes this HSA ready: two new or wiped HSAs must not
            # vouch for each other's empty tables.
            head = views[host].head
            if result.complete and head is not None and head.floors_complete:
                synced.append(host)
        return synced

    def _sync_floors(self, view: PeerView) -> _Sync:
        """Fetch the floors `view`'s peer changed after this HSA's cursor on it."""
        assert view.head is not None
        host, target = view.host_id, view.head
        epoch, after = self._floor.cursor(host)
        if epoch != target.floor_epoch:
            epoch, after = target.floor_epoch, 0
        result = _Sync()
        head = self._node.head
        for _ in range(MAX_FLOOR_PAGES_PER_ROUND):
            if after >= target.floor_sequence:
                result.complete = True
                return result
            try:
                answer, page = get_key_floors(
                    self._links.stub(view.address, view.host_id),
                    manifest=head.manifest,
                    self_host_id=self._node.host_id,
                    timeout=FLOORS_DEADLINE_SECONDS,
                    epoch=epoch,
                    after_sequence=after,
                )
            except grpc.RpcError as error:
                result.error = f"{view.address}: {rpc_reason(error)}"
                return result
            except HsmDomainError as error:
                result.error = f"{view.address}: a page that does not verify ({error})"
                return result
            if answer.host_id != host or page.epoch != epoch:
                result.error = f"{view.address}: a page of another host or table"
                return result
            result.raised += len(self._take(page.floors, host))
            if page.next_sequence <= after and page.more:
                result.error = f"{view.address}: a page that does not advance"
                return result
            after = max(after, page.next_sequence)
            self._floor.set_cursor(host, epoch, after)
            if not page.more:
                result.complete = after >= target.floor_sequence or not page.floors
                if not result.complete:
                    result.error = f"{view.address}: its floors end before the change it signed"
                return result
        return result

    def _take(self, floors: Iterable[services_pb2.KeyFloor], host: str) -> list[str]:
        """Raise this HSA's floors to `host`'s (verified as a host of the head); the key ids
        whose floor went up."""
        floors = list(floors)
        changes = self._floor.raise_all(
            [(f.key_id, int(f.metadata_version), bytes(f.metadata_hash)) for f in floors], host
        )
        raised = []
        for floor, change in zip(floors, changes, strict=True):
            if change is FloorChange.RAISED:
                raised.append(floor.key_id)
            elif change is FloorChange.CONFLICT:
                self._throttled.warning(
                    f"peer {host} holds another record of key {floor.key_id} with metadata "
                    f"version {floor.metadata_version} than this HSA accepted: one of the two is "
                    "not genuine; keeping this HSA's floor: investigate"
                )
        if raised and self._on_floors_raised is not None:
            self._on_floors_raised(raised)
        return raised

    # --- push --------------------------------------------------------------------------------

    def push_changes(self, after: int) -> int:
        """Push the floors this host's processes set after change `after` to every peer (best
        effort, in parallel, short deadline); the change pushed up to."""
        current = self._floor.sequence()
        if current <= after:
            return after
        entries, more = self._floor.changes_after(after, MAX_FLOORS_PER_PAGE, local_only=True)
        found = peers_of(self._node)
        if entries and found is not None:
            request = services_pb2.PushKeyFloorsRequest(floors=[floor_message(e) for e in entries])
            futures: list[Future[bool]] = []
            for host in found[1]:
                address = self._book.best(host)
                if address is not None:
                    futures.append(self._pool.submit(self._push_to, host, address, request))
            wait(futures, timeout=PUSH_DEADLINE_SECONDS * 2)
        return entries[-1].seq if more else max(current, entries[-1].seq if entries else after)

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Push one floor this process just set to every peer and wait, at most
        `ANNOUNCE_DEADLINE_SECONDS`, until one took it; a change acknowledged to a client then
        outlives this HSA. Never raises (the background push sends it again)."""
        found = peers_of(self._node)
        if found is None or not found[1]:
            return
        request = services_pb2.PushKeyFloorsRequest(
            floors=[
                services_pb2.KeyFloor(key_id=key_id, metadata_version=version, metadata_hash=digest)
            ]
        )
        futures = [
            self._pool.submit(self._push_to, host, address, request)
            for host in found[1]
            if (address := self._book.best(host)) is not None
        ]
        deadline = self._clock() + ANNOUNCE_DEADLINE_SECONDS
        pending = set(futures)
        while pending:
            done, pending = wait(
                pending, timeout=max(deadline - self._clock(), 0), return_when=FIRST_COMPLETED
            )
            if any(f.exception() is None and f.result() for f in done):
                return
            if not done:
                break
        self._throttled.warning(
            f"no other HSA took the new key floor of {key_id} (metadata version {version}) "
            f"within {ANNOUNCE_DEADLINE_SECONDS:g} s: until one does (the background push "
            "retries), only this HSA can refuse an older record of it"
        )

    def _push_to(self, host: str, address: str, request: services_pb2.PushKeyFloorsRequest) -> bool:
        try:
            self._links.stub(address, host).PushKeyFloors(request, timeout=PUSH_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            # Best effort: the exchange of the next round brings it to that peer.
            self._throttled.info(f"could not push key floors to {host}: {rpc_reason(error)}")
            return False
        return True

    # --- learning a key's floor (FloorSource) ------------------------------------------------

    def learn(self, key_ids: Sequence[str]) -> None:
        """Raise this HSA's floors of `key_ids` from every peer that answers within a short
        deadline; UnavailableError when none does (a domain of one host has nothing to ask)."""
        found = peers_of(self._node)
        if found is None:
            raise UnavailableError(f"{self._node.host_id} is not serving keys: use another HSA")
        head, peers = found
        if not peers:
            return
        ids = list(dict.fromkeys(key_ids))[:MAX_FLOOR_KEYS_PER_REQUEST]
        futures = {
            host: self._pool.submit(self._ask_floors, host, address, head, ids)
            for host in peers
            if (address := self._book.best(host)) is not None
        }
        done, _ = wait(futures.values(), timeout=LEARN_DEADLINE_SECONDS)
        errors = [f"{h}: no address known" for h in peers if h not in futures]
        answered = False
        for host, future in futures.items():
            if future not in done:
                errors.append(f"{host}: no answer within {LEARN_DEADLINE_SECONDS:g} s")
                continue
            error = future.exception()
            if error is None:
                answered = True
            else:
                errors.append(f"{host}: {error}")
        if not answered:
            raise UnavailableError(
                f"{self._node.host_id} holds no metadata floor for key {', '.join(ids)[:200]} "
                "yet and no other HSA answered for it, so it cannot rule out an older record "
                f"from the coordinator ({'; '.join(errors)[:400]}): retry, or check that the "
                "HSAs reach each other"
            )

    def _ask_floors(self, host: str, address: str, head: SealedState, key_ids: list[str]) -> None:
        try:
            answer, page = get_key_floors(
                self._links.stub(address, host),
                manifest=head.manifest,
                self_host_id=self._node.host_id,
                timeout=LEARN_DEADLINE_SECONDS,
                key_ids=key_ids,
            )
        except grpc.RpcError as error:
            raise UnavailableError(rpc_reason(error)) from None
        if answer.host_id != host:
            self._book.verified(answer.host_id, address)
        asked = set(key_ids)
        self._take([f for f in page.floors if f.key_id in asked], answer.host_id)

    # --- the server side (HsaPeerServicer) ---------------------------------------------------

    def key_floors(
        self, request: services_pb2.KeyFloorsRequest, caller_host: str
    ) -> services_pb2.KeyFloors:
        """A signed page of floors: of the keys asked for, or changed after a sequence."""
        nonce = signed.check_nonce(request.nonce)
        key_ids = list(request.key_ids)
        if len(key_ids) > MAX_FLOOR_KEYS_PER_REQUEST:
            raise LimitExceededError(f"at most {MAX_FLOOR_KEYS_PER_REQUEST} key ids per request")
        for key_id in key_ids:
            validate_key_id(key_id)
        if request.consult_peers:
            if caller_host != self._node.host_id:
                raise PermissionDeniedError(
                    "consult_peers is for this HSA's own key service workers"
                )
            self.learn(key_ids)
        page = services_pb2.KeyFloorPage(epoch=self._floor.epoch)
        if key_ids:
            page.floors.extend(floor_message(e) for e in self._floor.floors_of(key_ids))
        else:
            maximum = MAX_FLOORS_PER_PAGE
            limit = min(request.limit, maximum) if request.limit else maximum
            after = request.after_sequence if request.epoch == self._floor.epoch else 0
            entries, more = self._floor.changes_after(after, limit)
            page.floors.extend(floor_message(e) for e in entries)
            page.next_sequence = entries[-1].seq if entries else after
            page.more = more
        return signed.sign_key_floors(
            self._node.identity.signer,
            domain_id=self._node.domain_id,
            nonce=nonce,
            host_id=self._node.host_id,
            page=page,
        )

    def accept_pushed(
        self, request: services_pb2.PushKeyFloorsRequest, caller_host: str
    ) -> services_pb2.PushKeyFloorsResponse:
        """Take floors a host of the head pushed (the servicer checked its fingerprint)."""
        if caller_host == self._node.host_id:
            raise PermissionDeniedError("an HSA does not push key floors to itself")
        if len(request.floors) > MAX_FLOORS_PER_PAGE:
            raise LimitExceededError(f"at most {MAX_FLOORS_PER_PAGE} floors per push")
        floors = [signed.check_floor(f) for f in request.floors]
        raised = self._take(floors, caller_host)
        return services_pb2.PushKeyFloorsResponse(raised=len(raised))
