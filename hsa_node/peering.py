"""An HSA's peers: who they are, where they are, what they confirm, and the key floors they share.

The peers of an HSA are the hosts of its verified head other than itself, never the
coordinator's `ListHsas` (`peer_links.peers_of`). Addresses are only hints
(`peer_addresses.AddressBook`); every answer that matters is signed by the answering host's
key from this HSA's own head (`domain_core.peering`), so an address that leads elsewhere costs
a call and nothing more.

`Peering` (main HSA process) keeps, and `WorkerPeering` (key service workers,
`hsa_node.worker_peering`) reads:

- **Head confirmation.** Every gossip round (`Peering.round`) this HSA asks each peer, in
  parallel with a short deadline, to sign its head over a fresh nonce. The same version and
  hash confirm the head. A newer version makes this HSA fetch the states after its own from
  that peer (states verify themselves); another hash for a version this HSA holds is a fork
  (`DomainNode.record_fork`). A head that no peer confirmed for `head_confirmation_seconds` is
  *unconfirmed*: the status detail says so, it is logged at WARNING, and key administration is
  refused (`require_head_confirmed`, UNAVAILABLE) until a peer confirms it; encryption and
  decryption go on. A domain with one host confirms trivially.
- **Key metadata floors** (`keyfloors.MetadataVersionFloor`, shared by every process of the
  HSA), exchanged each round, pushed, learned and served by `floor_exchange.FloorExchange`
  (see there): taken from peers by the max rule only, and only from hosts of the verified
  head.
- **Readiness.** The key service does not serve (UNAVAILABLE, health NOT_SERVING for
  KeyService) until, since the process started, this HSA took every floor change of at least
  one peer whose table is complete (or its head lists no other host): so a new, wiped or
  long-stopped HSA knows every revoked grant and disabled key that a peer knows before it
  serves one.
- Only the main process talks to peers. Workers read the shared floor table, learn a key's
  floor through the main process (`consult_peers`, honoured for this host's own identity
  only), and follow readiness and head confirmation from what the main process writes in the
  table's meta (`peer_standing.StandingNote`: its pid, so a value from an earlier run never
  counts).

What a member host could do with floors: push a floor above any record (the key becomes
unusable on HSAs that took it). Members are trusted with every key already (they hold the
domain keys and can write any record), so this gives them nothing new; a removed host, the
coordinator or the network cannot get a floor accepted. Records are not kept as evidence of a
floor: copies of key tokens would outlive the deletion of their key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

import grpc

from domain_core import peering as signed
from domain_core.errors import (
    HsmDomainError,
    InvalidInputError,
    LimitExceededError,
    NotAppliedError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, MAX_GENESIS_MARKER_FILE_BYTES, Limits
from domain_core.model import SealedState
from domain_edge.config import FLOORS_COMPLETE_FILE
from domain_edge.files import read_limited
from domain_edge.throttled_log import ThrottledLog
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2
from hsa_node.floor_exchange import FloorExchange
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.node import DomainNode, PeerStanding
from hsa_node.peer_addresses import AddressBook
from hsa_node.peer_links import HsaLinks, PeerView, peers_of, rpc_reason
from hsa_node.peer_standing import (
    META_NAME,
    StandingNote,
    not_ready_error,
    unconfirmed_message,
)
from hsa_node.storage import NodeStore

if TYPE_CHECKING:
    from hsa_node.sync import FetchStates

__all__ = ["PUSH_POLL_SECONDS", "Peering"]

log = logging.getLogger(__name__)

CONFIRM_DEADLINE_SECONDS: Final = 2.0
STATES_DEADLINE_SECONDS: Final = 3.0
PUSH_POLL_SECONDS: Final = 0.1
STANDING_SECONDS: Final = 0.5
# Rounds come this often while the key service waits for floors (not every gossip interval).
WAITING_ROUND_SECONDS: Final = 0.25
_CANDIDATES_PER_ROUND: Final = 3
_SHOWN: Final = 160


# --- the main process ----------------------------------------------------------------------------


class Peering:
    """The peers of the main HSA process (see the module docstring)."""

    def __init__(
        self,
        *,
        node: DomainNode,
        store: NodeStore,
        floor: MetadataVersionFloor,
        tls: TlsMaterial,
        address: str,
        bound: float,
        configured_addresses: Sequence[str] = (),
        limits: Limits = DEFAULT_LIMITS,
        on_floors_raised: Callable[[Sequence[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._node = node
        self._floor = floor
        self._address = address
        self._bound = bound
        self._limits = limits
        self._clock = clock
        self._wall_clock = wall_clock
        self._store = store
        self.book = AddressBook(store, configured_addresses)
        self._links = HsaLinks(tls, limits, keep=self.book.addresses)
        self._last_views: dict[str, PeerView] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="peers")
        self._floors = FloorExchange(
            node=node,
            floor=floor,
            links=self._links,
            book=self.book,
            pool=self._pool,
            on_floors_raised=on_floors_raised,
            clock=clock,
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pusher: threading.Thread | None = None
        self._throttled = ThrottledLog(log)
        self._started_at = clock()
        self._confirmed_at = float("-inf")
        self._confirmed_wall = wall_clock()
        self._ready = False
        self._unconfirmed_logged = False
        self._reasons = "no round yet"
        self._last_meta: StandingNote | None = None
        self._meta_written_at = float("-inf")
        self._meta_unconfirmed = False
        self._publishing = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the genesis marker, publish the initial standing, start pushing floor changes."""
        self._take_genesis_marker()
        found = peers_of(self._node)
        if found is not None and not found[1]:
            self._set_ready("its domain state lists no other host")
            self._reasons = ""
        self._publish()
        self._node.report_standing_with(self._publish)
        self._pusher = threading.Thread(target=self._push_loop, name="floor-push", daemon=True)
        self._pusher.start()

    def stop(self) -> None:
        """Stop the pusher, the pool and the channels."""
        self._stop.set()
        self._wake.set()
        if self._pusher is not None:
            self._pusher.join(3.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._links.close()

    def _take_genesis_marker(self) -> None:
        """`hsm-domain init` says this host's floor table starts complete (a host of a new
        domain, where no key exists yet): record it, and remove the marker, so a table wiped
        later is not taken for complete."""
        path = self._store.data_dir / FLOORS_COMPLETE_FILE
        try:
            text = (
                read_limited(path, MAX_GENESIS_MARKER_FILE_BYTES).decode("ascii", "replace").strip()
            )
        except FileNotFoundError:
            return
        except LimitExceededError:
            text = ""  # names no genesis: ignored and removed below
        genesis = self._node.states_after(0, 1)[0].hash.hex()
        if text == genesis:
            if not self._floor.complete:
                self._floor.mark_complete()
                log.info("key floor table starts complete: this is a host of a new domain")
        else:
            log.warning("ignoring %s: it names another genesis than this domain's", path)
        path.unlink(missing_ok=True)

    @property
    def ready(self) -> bool:
        """Whether the key service may serve (floors synced with a peer this run)."""
        return self._ready

    def listen_floors(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Call `listener(key_ids)` when peers raised the floors of these keys (the cache
        re-reads them at their next use)."""
        self._floors.listen(listener)

    def set_address(self, address: str) -> None:
        """Where this HSA serves HsaPeer (told to the peers it calls)."""
        self._address = address

    def wake(self) -> None:
        """End `wait_before_next_round` now."""
        self._wake.set()

    def wait_before_next_round(self, interval: float) -> None:
        """Sleep until the next round is due: after `interval`, sooner while the key service
        waits for floors, at once when a peer that could not be reached called (`wake`)."""
        timeout = interval if self._ready else min(interval, WAITING_ROUND_SECONDS)
        self._wake.wait(timeout)
        self._wake.clear()

    # --- addresses ---------------------------------------------------------------------------

    def add_hints(self, hints: Iterable[tuple[str, str]]) -> None:
        """Addresses of HSAs, e.g. from the coordinator's ListHsas (hints only)."""
        new = False
        for host_id, address in hints:
            if host_id != self._node.host_id and address != self._address:
                new = self.book.hint(host_id, address) or new
        if new and not self._ready:
            self._wake.set()  # the key service waits for a peer: try the new addresses now

    def confirmed_peers(self) -> list[tuple[str, Any]]:
        """(host id, HsaPeer stub) of each peer that signed its head in the last round."""
        return [
            (view.host_id, self._links.stub(view.address, view.host_id))
            for view in self._last_views.values()
            if view.head is not None and view.address
        ]

    # --- one round ---------------------------------------------------------------------------

    def round(self) -> int:
        """Confirm the head with every peer, catch up and exchange floors; how many states were
        installed. Never raises for a peer's failure (it is in the standing and the log)."""
        found = peers_of(self._node)
        if found is None:
            self._publish()
            return 0
        head, peers = found
        if not peers:
            self._confirmed_at = self._clock()
            self._confirmed_wall = self._wall_clock()
            self._set_ready("its domain state lists no other host")
            self._reasons = ""
            self._publish()
            return 0
        views = self._ask_heads(peers, head)
        self._last_views = views
        installed = self._follow(views)
        head = self._node.head
        if any(
            v.head is not None and (v.head.version, v.head.state_hash) == (head.version, head.hash)
            for v in views.values()
        ):
            self._confirmed_at = self._clock()
            self._confirmed_wall = self._wall_clock()
        synced = self._floors.exchange(views)
        if synced and not self._ready:
            self._set_ready(f"took every key floor change of {', '.join(synced)}")
        self._reasons = "; ".join(v.describe() for v in views.values())
        self._publish()
        return installed

    def _ask_heads(self, peers: Sequence[str], head: SealedState) -> dict[str, PeerView]:
        futures = {host: self._pool.submit(self._ask_head, host, head) for host in peers}
        views: dict[str, PeerView] = {}
        for host, future in futures.items():
            try:
                views[host] = future.result(timeout=CONFIRM_DEADLINE_SECONDS * 4)
            except Exception as error:  # a failure of this code, not of the peer
                views[host] = PeerView(host, error=f"{type(error).__name__}: {error}")
        return views

    def _ask_head(self, host: str, head: SealedState) -> PeerView:
        """Ask up to a few candidate addresses of `host` for its signed head."""
        candidates = self.book.candidates(host)[:_CANDIDATES_PER_ROUND]
        if not candidates:
            return PeerView(
                host,
                error="no address known (not listed by the coordinator, "
                "not in peers.json or peer_addresses, and it has not called)",
            )
        errors = []
        for address in candidates:
            nonce = signed.new_nonce()
            try:
                answer = self._links.stub(address, host).ConfirmHead(
                    services_pb2.ConfirmHeadRequest(nonce=nonce, caller_address=self._address),
                    timeout=CONFIRM_DEADLINE_SECONDS,
                )
            except grpc.RpcError as error:
                errors.append(f"{address}: {rpc_reason(error)}")
                continue
            try:
                peer_head = signed.verify_head_confirmation(
                    answer, manifest=head.manifest, nonce=nonce, self_host_id=self._node.host_id
                )
            except HsmDomainError as error:
                errors.append(f"{address}: answer does not verify ({error})")
                self.book.failed(host, address)
                self._throttled.warning(
                    f"the head confirmation from {address} (listed for {host}) does not verify: "
                    f"{type(error).__name__}: {error}; the address is wrong or something "
                    f"impersonates {host}"
                )
                continue
            self.book.verified(peer_head.host_id, address)
            if peer_head.host_id != host:
                errors.append(f"{address} answered as {peer_head.host_id}")
                continue
            return PeerView(host, address=address, head=peer_head)
        return PeerView(host, error="; ".join(errors)[: _SHOWN * 2])

    def _states_fetcher(self, host: str, address: str) -> FetchStates:
        stub = self._links.stub(address, host)
        limit = self._limits.max_states_per_response

        def fetch(after: int) -> Sequence[domain_pb2.SealedState]:
            # From the peer's copy of our own head on: a different state for the version we
            # hold is a fork (a coordinator that told the two of us different things).
            try:
                response = stub.GetStatesAfter(
                    services_pb2.StatesAfterRequest(after_version=max(after - 1, 0), limit=limit),
                    timeout=STATES_DEADLINE_SECONDS,
                )
            except grpc.RpcError as error:
                raise UnavailableError(f"peer {host} at {address}: {rpc_reason(error)}") from None
            return list(response.states)

        return fetch

    def _follow(self, views: dict[str, PeerView]) -> int:
        """Fetch newer states from the peer with the newest head; look into disagreements."""
        from hsa_node.sync import pull_states  # sync imports this module

        installed = 0
        answered = [(v, v.head) for v in views.values() if v.head is not None]
        for view, peer_head in sorted(answered, key=lambda pair: -pair[1].version):
            ours = self._node.head
            if peer_head.version < ours.version:
                held = self._node.states_after(peer_head.version - 1, 1)
                if held and held[0].hash != peer_head.state_hash:
                    self._node.record_fork(peer_head.version, view.host_id)
                continue
            if (peer_head.version, peer_head.state_hash) == (ours.version, ours.hash):
                continue
            # Newer, or another state for our version: its states tell which (and verify).
            host = view.host_id

            def on_fork(state: SealedState, host: str = host) -> None:
                self._node.record_fork(state.version, host)

            try:
                installed += pull_states(
                    self._node,
                    self._states_fetcher(host, view.address),
                    f"peer {host}",
                    on_fork,
                )
            except UnavailableError as error:
                self._throttled.warning(f"gossip: {error}")
            except HsmDomainError as error:
                log.debug("gossip stopped at a refused state (offer logged why): %s", error)
        return installed

    # --- floors (FloorSource, and HsaPeerServicer's floor calls) -------------------------------

    def _push_loop(self) -> None:
        """Push floor changes as they come; keep the standing current between rounds (a round
        may wait for slow peers while the bound passes)."""
        pushed = self._floor.sequence()
        published = self._clock()
        while not self._stop.wait(PUSH_POLL_SECONDS):
            try:
                pushed = self._floors.push_changes(pushed)
                if self._clock() - published >= STANDING_SECONDS:
                    published = self._clock()
                    self._publish()
            except Exception:
                log.exception("floor push: unexpected error")

    def learn(self, key_ids: Sequence[str]) -> None:
        """Raise this HSA's floors of `key_ids` from its peers (`FloorExchange.learn`);
        UnavailableError when none answered."""
        self._floors.learn(key_ids)

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Push one floor this process just set to the peers (`FloorExchange.announce`);
        never raises."""
        self._floors.announce(key_id, version, digest)

    def key_floors(
        self, request: services_pb2.KeyFloorsRequest, caller_host: str
    ) -> services_pb2.KeyFloors:
        """A signed page of floors: of the keys asked for, or changed after a sequence."""
        return self._floors.key_floors(request, caller_host)

    def accept_pushed(
        self, request: services_pb2.PushKeyFloorsRequest, caller_host: str
    ) -> services_pb2.PushKeyFloorsResponse:
        """Take floors a host of the head pushed (the servicer checked its fingerprint)."""
        return self._floors.accept_pushed(request, caller_host)

    # --- the server side of head confirmation (HsaPeerServicer) --------------------------------

    def confirm_head(
        self, request: services_pb2.ConfirmHeadRequest, caller_host: str
    ) -> services_pb2.HeadConfirmation:
        """This HSA's head and floor table position, signed over the caller's nonce."""
        nonce = signed.check_nonce(request.nonce)
        if request.caller_address and caller_host != self._node.host_id:
            if len(request.caller_address) > 256:
                raise InvalidInputError("caller_address is longer than 256 characters")
            if self.book.hint(caller_host, request.caller_address, first=True) and not self._ready:
                self._wake.set()  # a peer we could not reach called: try it now
        head = self._node.head
        return signed.sign_head_confirmation(
            self._node.identity.signer,
            domain_id=self._node.domain_id,
            nonce=nonce,
            head=signed.PeerHead(
                host_id=self._node.host_id,
                version=head.version,
                state_hash=head.hash,
                floor_epoch=self._floor.epoch,
                floor_sequence=self._floor.sequence(),
                floors_complete=self._floor.complete,
            ),
        )

    # --- the key service's gate (keycalls.PeerGate) ----------------------------------------

    def require_ready(self) -> None:
        """NotAppliedError (definite: nothing was done) while the key service waits for floors
        from a peer."""
        if not self._ready:
            raise not_ready_error(self._node.host_id, self._reasons)

    def unconfirmed_for(self) -> float:
        """Seconds since a peer last confirmed this HSA's head (or since the start); 0 when
        the head lists no other host (it confirms itself)."""
        found = peers_of(self._node)
        if found is not None and not found[1]:
            return 0.0
        return self._clock() - max(self._confirmed_at, self._started_at)

    def require_head_confirmed(self, operation: str) -> None:
        """NotAppliedError (definite: nothing was done) when no peer confirmed this HSA's head
        within the bound."""
        seconds = self.unconfirmed_for()
        if seconds > self._bound:
            raise NotAppliedError(
                unconfirmed_message(
                    self._node.host_id,
                    self._node.version,
                    seconds,
                    self._bound,
                    operation,
                    self._reasons,
                )
            )

    # --- standing ------------------------------------------------------------------------------

    def _set_ready(self, why: str) -> None:
        """The key service serves from now on; the floor table holds the domain's history."""
        if not self._ready:
            self._ready = True
            log.info("key service ready: %s", why)
        if not self._floor.complete:
            self._floor.mark_complete()

    def _publish(self) -> None:
        """Report the standing on the node (status, health) and to the workers (meta)."""
        with self._publishing:
            self._publish_locked()

    def _publish_locked(self) -> None:
        if self._node.removed_at is not None:
            return
        seconds = self.unconfirmed_for()
        unconfirmed = seconds > self._bound
        version = self._node.version
        if unconfirmed and not self._unconfirmed_logged:
            self._unconfirmed_logged = True
            log.warning(
                "head version %d not confirmed by any peer for %.0f s (limit %g s): %s; "
                "refusing key administration until a peer confirms it",
                version,
                seconds,
                self._bound,
                self._reasons,
            )
        elif not unconfirmed and self._unconfirmed_logged:
            self._unconfirmed_logged = False
            log.info(
                "head version %d confirmed by a peer again; key administration allowed", version
            )
        standing = PeerStanding(
            key_service_waiting=""
            if self._ready
            else f"key service waiting for key metadata floors from a peer ({self._reasons})",
            head_unconfirmed=(
                f"head not confirmed by any peer for {seconds:.0f} s (limit {self._bound:g} s; "
                f"{self._reasons}): key administration refused"
                if unconfirmed
                else ""
            ),
        )
        # The workers' copy first: once the status says ready, every process of the host is.
        self._write_meta(version)
        self._node.set_standing(standing)

    def _write_meta(self, version: int) -> None:
        """Tell the workers when something they act on changed, and every quarter of the
        bound (so the confirmation time they judge by is never far behind)."""
        now = self._clock()
        meta = StandingNote(
            pid=os.getpid(),
            ready=self._ready,
            confirmed_at=self._confirmed_wall,
            bound=self._bound,
            version=version,
            reasons=self._reasons[:500],
            written_at=self._wall_clock(),
        )
        last = self._last_meta
        if (
            last is not None
            and (last.ready, last.version) == (meta.ready, meta.version)
            and (self._unconfirmed_logged == self._meta_unconfirmed)
            and now - self._meta_written_at < self._bound / 4
        ):
            return
        try:
            self._floor.set_meta({META_NAME: meta.encode()})
        except Exception as error:
            self._throttled.warning(f"could not tell the key service workers: {error}")
            return
        self._last_meta, self._meta_written_at = meta, now
        self._meta_unconfirmed = self._unconfirmed_logged
