"""An HSA's peers: who they are, where they are, what they confirm, and the key floors they share.

The peers of an HSA are the hosts of its verified head other than itself, never the
coordinator's `ListHsas`. Addresses are only hints (the coordinator's list, the cached
`peers.json`, the node config's `peer_addresses`, and the address a peer gives when it calls);
every answer that matters is signed by the answering host's key from this HSA's own head
(`domain_core.peering`), so an address that leads elsewhere costs a call and nothing more.

`Peering` (main HSA process) keeps, and `WorkerPeering` (key service workers) reads:

- **Head confirmation.** Every gossip round (`Peering.round`) this HSA asks each peer, in
  parallel with a short deadline, to sign its head over a fresh nonce. The same version and
  hash confirm the head. A newer version makes this HSA fetch the states after its own from
  that peer (states verify themselves); another hash for a version this HSA holds is a fork
  (`DomainNode.record_fork`). A head that no peer confirmed for `head_confirmation_seconds` is
  *unconfirmed*: the status detail says so, it is logged at WARNING, and key administration is
  refused (`require_head_confirmed`, UNAVAILABLE) until a peer confirms it; encryption and
  decryption go on. A domain with one host confirms trivially.
- **Key metadata floors** (`keycache.MetadataVersionFloor`, shared by every process of the
  HSA). Floors are taken from peers by the max rule only (never lowered; same version with
  another hash keeps this HSA's floor and is logged at WARNING), and only from hosts of the
  verified head: from a page signed by the host, or pushed over the server side, which checks
  the caller's TLS fingerprint against the head (`HsaPeerServicer`).
  * push: a floor this host's processes set is pushed to the peers at once, in the
    background, best effort, with a short deadline;
  * exchange: each round, the floors a peer changed after this HSA's cursor on it (its table's
    epoch and change sequence, persisted) are fetched page by page, so an HSA that missed a
    push converges within a round;
  * readiness: the key service does not serve (UNAVAILABLE, health NOT_SERVING for KeyService)
    until, since the process started, this HSA took every floor change of at least one peer
    (or its head lists no other host): so a new, wiped or long-stopped HSA knows every revoked
    grant and disabled key that a peer knows before it serves one;
  * a key with no local floor is served only once at least one peer answered for it
    (`learn`, asked of every peer in parallel with a short deadline).
- Only the main process talks to peers. Workers read the shared floor table, learn a key's
  floor through the main process (`consult_peers`, honoured for this host's own identity
  only), and follow readiness and head confirmation from what the main process writes in the
  table's meta (its pid, so a value from an earlier run never counts).

What a member host could do with floors: push a floor above any record (the key becomes
unusable on HSAs that took it). Members are trusted with every key already (they hold the
domain keys and can write any record), so this gives them nothing new; a removed host, the
coordinator or the network cannot get a floor accepted. Records are not kept as evidence of a
floor: copies of key tokens would outlive the deletion of their key.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from domain_core import peering as signed
from domain_core.ciphertext import validate_key_id
from domain_core.errors import (
    HsmDomainError,
    InvalidInputError,
    LimitExceededError,
    NotAppliedError,
    PermissionDeniedError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState
from domain_edge import transport
from domain_edge.config import FLOORS_COMPLETE_FILE
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from hsa_node._logging import ThrottledLog
from hsa_node.keycache import FloorChange, MetadataVersionFloor
from hsa_node.node import DomainNode, PeerStanding
from hsa_node.storage import NodeStore, Peer

if TYPE_CHECKING:
    from hsa_node.sync import FetchStates

__all__ = [
    "AddressBook",
    "Peering",
    "WorkerPeering",
]

log = logging.getLogger(__name__)

CONFIRM_DEADLINE_SECONDS: Final = 2.0
FLOORS_DEADLINE_SECONDS: Final = 3.0
PUSH_DEADLINE_SECONDS: Final = 1.0
# How long a key change waits for a first peer to take its floor before it is acknowledged.
ANNOUNCE_DEADLINE_SECONDS: Final = 0.5
LEARN_DEADLINE_SECONDS: Final = 1.0
STATES_DEADLINE_SECONDS: Final = 3.0
PUSH_POLL_SECONDS: Final = 0.1
STANDING_SECONDS: Final = 0.5
# Rounds come this often while the key service waits for floors (not every gossip interval).
WAITING_ROUND_SECONDS: Final = 0.25
_CANDIDATES_PER_ROUND: Final = 3
_MAX_PAGES_PER_ROUND: Final = 100
_META: Final = "peering"
_WORKER_META_POLL_SECONDS: Final = 0.1
_SHOWN: Final = 160
_MAX_HINTS_PER_HOST: Final = 8


def _rpc_reason(error: grpc.RpcError) -> str:
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else str(error)
    return f"{code.name if code is not None else 'ERROR'}: {str(details)[:_SHOWN]}"


def _floor_message(floor: Any) -> services_pb2.KeyFloor:
    return services_pb2.KeyFloor(
        key_id=floor.key_id,
        metadata_version=floor.metadata_version,
        metadata_hash=floor.metadata_hash,
    )


# --- addresses -----------------------------------------------------------------------------------


class AddressBook:
    """Where each peer may listen: hints by host, and the address that last answered for it.

    An address is "verified" for a host once an answer from it verified under that host's
    key; verified addresses are tried first and kept in `peers.json` (so a restarted HSA
    reaches its peers whatever the coordinator says). Hints never replace a verified address.
    """

    def __init__(self, store: NodeStore, configured: Sequence[str] = ()) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._saving = threading.Lock()
        self._verified: dict[str, str] = {}
        self._hints: dict[str, list[str]] = {}
        self._configured = list(dict.fromkeys(configured))
        for peer in store.load_peers():
            self._add_hint_locked(peer.host_id, peer.address)

    def _add_hint_locked(self, host_id: str, address: str, *, first: bool = False) -> bool:
        hints = self._hints.setdefault(host_id, [])
        if address in hints:
            if first and hints[0] != address:
                hints.remove(address)
                hints.insert(0, address)
            return False
        hints.insert(0, address) if first else hints.append(address)
        del hints[_MAX_HINTS_PER_HOST:]
        return True

    def hint(self, host_id: str, address: str, *, first: bool = False) -> bool:
        """Note that `host_id` may listen at `address`; True if that is new."""
        if not address:
            return False
        with self._lock:
            return self._add_hint_locked(host_id, address, first=first)

    def candidates(self, host_id: str) -> list[str]:
        """Addresses to try for `host_id`, best first."""
        with self._lock:
            taken = {a for h, a in self._verified.items() if h != host_id}
            ordered = [self._verified[host_id]] if host_id in self._verified else []
            ordered += self._hints.get(host_id, [])
            ordered += self._configured
            return [a for a in dict.fromkeys(ordered) if a not in taken]

    def best(self, host_id: str) -> str | None:
        """The address to call `host_id` at now (verified first), if any."""
        found = self.candidates(host_id)
        return found[0] if found else None

    def verified(self, host_id: str, address: str) -> None:
        """An answer from `address` verified as `host_id`: try it first from now on."""
        with self._lock:
            if self._verified.get(host_id) == address:
                return
            for other in [h for h, a in self._verified.items() if a == address]:
                del self._verified[other]
            self._verified[host_id] = address
            self._add_hint_locked(host_id, address, first=True)
        log.info("peer %s answers at %s", host_id, address)
        if self._store.read_only:
            return
        with self._saving:  # the last file written holds the newest list, whatever the order
            with self._lock:
                peers = [Peer(host_id=h, address=a) for h, a in sorted(self._verified.items())]
            try:
                self._store.save_peers(peers)
            except OSError as error:
                log.warning("could not save the peer list: %s", error)

    def failed(self, host_id: str, address: str) -> None:
        """An answer from `address` did not verify as `host_id`'s: stop preferring it. (An
        address that does not answer stays: a host restarted on its address comes back.)"""
        with self._lock:
            if self._verified.get(host_id) == address:
                del self._verified[host_id]
            hints = self._hints.get(host_id, [])
            if address in hints:
                hints.remove(address)
                hints.append(address)

    def addresses(self) -> set[str]:
        """Every address known for anyone."""
        with self._lock:
            known = set(self._verified.values()) | set(self._configured)
            for hints in self._hints.values():
                known.update(hints)
            return known


# --- what a round saw ----------------------------------------------------------------------------


@dataclass
class _PeerView:
    """One peer in one round: where it answered and what it signed, or why not."""

    host_id: str
    address: str = ""
    head: signed.PeerHead | None = None
    error: str = ""

    def describe(self) -> str:
        if self.head is not None:
            partial = "" if self.head.floors_complete else " (its key floors are not complete)"
            return f"{self.host_id} is at version {self.head.version}{partial}"
        return f"{self.host_id}: {self.error or 'no answer'}"


@dataclass
class _Meta:
    """What the main process tells its key service workers (JSON in the floor table)."""

    pid: int
    ready: bool
    confirmed_at: float  # wall clock: the last confirmation (or the start)
    bound: float
    version: int
    reasons: str
    written_at: float

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> _Meta | None:
        if raw is None:
            return None
        try:
            document = json.loads(raw)
            return cls(
                pid=int(document["pid"]),
                ready=bool(document["ready"]),
                confirmed_at=float(document["confirmed_at"]),
                bound=float(document["bound"]),
                version=int(document["version"]),
                reasons=str(document["reasons"]),
                written_at=float(document["written_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _unconfirmed_message(
    host_id: str, version: int, seconds: float, bound: float, operation: str, reasons: str
) -> str:
    return (
        f"{host_id} has not confirmed its domain state (version {version}) with any other HSA "
        f"for {seconds:.0f} s (the limit is {bound:g} s: head_confirmation_seconds), so it may "
        f"be on a stale or forked state: {operation} and the other key administration calls "
        "are refused until a peer confirms it (encryption and decryption go on). Use another "
        "HSA, and check that this one reaches its peers (`hsm-domain status` shows why"
        + (f"; last seen: {reasons[:400]}" if reasons else "")
        + ")"
    )


# --- the main process ----------------------------------------------------------------------------


@dataclass
class _Sync:
    """Progress of one round's floor exchange with one peer."""

    complete: bool = False
    raised: int = 0
    error: str = ""


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
        self._tls = tls
        self._address = address
        self._bound = bound
        self._limits = limits
        self._on_floors_raised = on_floors_raised
        self._clock = clock
        self._wall_clock = wall_clock
        self._store = store
        self.book = AddressBook(store, configured_addresses)
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}  # (address, host)
        self._last_views: dict[str, _PeerView] = {}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="peers")
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
        self._last_meta: _Meta | None = None
        self._meta_written_at = float("-inf")
        self._meta_unconfirmed = False
        self._publishing = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Take the genesis marker, publish the initial standing, start pushing floor changes."""
        self._take_genesis_marker()
        found = self._peers()
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
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()

    def _take_genesis_marker(self) -> None:
        """`hsm-domain init` says this host's floor table starts complete (a host of a new
        domain, where no key exists yet): record it, and remove the marker, so a table wiped
        later is not taken for complete."""
        path = self._store.data_dir / FLOORS_COMPLETE_FILE
        try:
            text = path.read_bytes()[:200].decode("ascii", "replace").strip()
        except FileNotFoundError:
            return
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
        self._on_floors_raised = listener

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

    def _channel(self, address: str, host: str) -> grpc.Channel:
        """A reused channel to `address` whose TLS handshake accepts only the HSA `host`
        (answers are still checked by their signatures); channels to addresses no longer in
        the book are closed."""
        with self._lock:
            channel = self._channels.get((address, host))
            if channel is None:
                known = self.book.addresses()
                for stale in [key for key in self._channels if key[0] not in known]:
                    self._channels.pop(stale).close()
                channel = transport.mtls_channel(
                    address, self._tls, transport.hsa_host(host), self._limits
                )
                self._channels[(address, host)] = channel
            return channel

    def _stub(self, address: str, host: str) -> Any:
        return services_pb2_grpc.HsaPeerStub(self._channel(address, host))  # type: ignore[no-untyped-call]

    def confirmed_peers(self) -> list[tuple[str, Any]]:
        """(host id, HsaPeer stub) of each peer that signed its head in the last round."""
        return [
            (view.host_id, self._stub(view.address, view.host_id))
            for view in self._last_views.values()
            if view.head is not None and view.address
        ]

    def _peers(self) -> tuple[SealedState, list[str]] | None:
        """(head, its other hosts), or None when this HSA is not a serving member."""
        if not self._node.serving:
            return None
        head = self._node.head
        return head, sorted(h for h in head.manifest.hosts_by_id if h != self._node.host_id)

    # --- one round ---------------------------------------------------------------------------

    def round(self) -> int:
        """Confirm the head with every peer, catch up and exchange floors; how many states were
        installed. Never raises for a peer's failure (it is in the standing and the log)."""
        found = self._peers()
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
        self._exchange_floors(views)
        self._reasons = "; ".join(v.describe() for v in views.values())
        self._publish()
        return installed

    def _ask_heads(self, peers: Sequence[str], head: SealedState) -> dict[str, _PeerView]:
        futures = {host: self._pool.submit(self._ask_head, host, head) for host in peers}
        views: dict[str, _PeerView] = {}
        for host, future in futures.items():
            try:
                views[host] = future.result(timeout=CONFIRM_DEADLINE_SECONDS * 4)
            except Exception as error:  # a failure of this code, not of the peer
                views[host] = _PeerView(host, error=f"{type(error).__name__}: {error}")
        return views

    def _ask_head(self, host: str, head: SealedState) -> _PeerView:
        """Ask up to a few candidate addresses of `host` for its signed head."""
        candidates = self.book.candidates(host)[:_CANDIDATES_PER_ROUND]
        if not candidates:
            return _PeerView(
                host,
                error="no address known (not listed by the coordinator, "
                "not in peers.json or peer_addresses, and it has not called)",
            )
        errors = []
        for address in candidates:
            nonce = signed.new_nonce()
            try:
                answer = self._stub(address, host).ConfirmHead(
                    services_pb2.ConfirmHeadRequest(nonce=nonce, caller_address=self._address),
                    timeout=CONFIRM_DEADLINE_SECONDS,
                )
            except grpc.RpcError as error:
                errors.append(f"{address}: {_rpc_reason(error)}")
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
            return _PeerView(host, address=address, head=peer_head)
        return _PeerView(host, error="; ".join(errors)[: _SHOWN * 2])

    def _states_fetcher(self, host: str, address: str) -> FetchStates:
        stub = self._stub(address, host)
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
                raise UnavailableError(f"peer {host} at {address}: {_rpc_reason(error)}") from None
            return list(response.states)

        return fetch

    def _follow(self, views: dict[str, _PeerView]) -> int:
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

    # --- floors: exchange ----------------------------------------------------------------------

    def _exchange_floors(self, views: dict[str, _PeerView]) -> None:
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
        if synced and not self._ready:
            self._set_ready(f"took every key floor change of {', '.join(synced)}")

    def _sync_floors(self, view: _PeerView) -> _Sync:
        """Fetch the floors `view`'s peer changed after this HSA's cursor on it."""
        assert view.head is not None
        host, target = view.host_id, view.head
        epoch, after = self._floor.cursor(host)
        if epoch != target.floor_epoch:
            epoch, after = target.floor_epoch, 0
        result = _Sync()
        head = self._node.head
        for _ in range(_MAX_PAGES_PER_ROUND):
            if after >= target.floor_sequence:
                result.complete = True
                return result
            nonce = signed.new_nonce()
            try:
                answer = self._stub(view.address, view.host_id).GetKeyFloors(
                    services_pb2.KeyFloorsRequest(nonce=nonce, epoch=epoch, after_sequence=after),
                    timeout=FLOORS_DEADLINE_SECONDS,
                )
                page = signed.verify_key_floors(
                    answer, manifest=head.manifest, nonce=nonce, self_host_id=self._node.host_id
                )
            except grpc.RpcError as error:
                result.error = f"{view.address}: {_rpc_reason(error)}"
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

    # --- floors: push --------------------------------------------------------------------------

    def _push_loop(self) -> None:
        """Push floor changes as they come; keep the standing current between rounds (a round
        may wait for slow peers while the bound passes)."""
        pushed = self._floor.sequence()
        published = self._clock()
        while not self._stop.wait(PUSH_POLL_SECONDS):
            try:
                pushed = self.push_changes(pushed)
                if self._clock() - published >= STANDING_SECONDS:
                    published = self._clock()
                    self._publish()
            except Exception:
                log.exception("floor push: unexpected error")

    def push_changes(self, after: int) -> int:
        """Push the floors this host's processes set after change `after` to every peer (best
        effort, in parallel, short deadline); the change pushed up to."""
        current = self._floor.sequence()
        if current <= after:
            return after
        entries, more = self._floor.changes_after(
            after, signed.MAX_FLOORS_PER_PAGE, local_only=True
        )
        found = self._peers()
        if entries and found is not None:
            request = services_pb2.PushKeyFloorsRequest(floors=[_floor_message(e) for e in entries])
            futures: list[Future[bool]] = []
            for host in found[1]:
                address = self.book.best(host)
                if address is not None:
                    futures.append(self._pool.submit(self._push_to, host, address, request))
            wait(futures, timeout=PUSH_DEADLINE_SECONDS * 2)
        return entries[-1].seq if more else max(current, entries[-1].seq if entries else after)

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Push one floor this process just set to every peer and wait, at most
        `ANNOUNCE_DEADLINE_SECONDS`, until one took it; a change acknowledged to a client then
        outlives this HSA. Never raises (the background push sends it again)."""
        found = self._peers()
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
            if (address := self.book.best(host)) is not None
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
            self._stub(address, host).PushKeyFloors(request, timeout=PUSH_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            # Best effort: the exchange of the next round brings it to that peer.
            self._throttled.info(f"could not push key floors to {host}: {_rpc_reason(error)}")
            return False
        return True

    # --- floors: learning a key's floor (FloorSource) ----------------------------------------

    def learn(self, key_ids: Sequence[str]) -> None:
        """Raise this HSA's floors of `key_ids` from every peer that answers within a short
        deadline; UnavailableError when none does (a domain of one host has nothing to ask)."""
        found = self._peers()
        if found is None:
            raise UnavailableError(f"{self._node.host_id} is not serving keys: use another HSA")
        head, peers = found
        if not peers:
            return
        ids = list(dict.fromkeys(key_ids))[: signed.MAX_FLOOR_KEYS_PER_REQUEST]
        futures = {
            host: self._pool.submit(self._ask_floors, host, address, head, ids)
            for host in peers
            if (address := self.book.best(host)) is not None
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
        nonce = signed.new_nonce()
        try:
            answer = self._stub(address, host).GetKeyFloors(
                services_pb2.KeyFloorsRequest(nonce=nonce, key_ids=key_ids),
                timeout=LEARN_DEADLINE_SECONDS,
            )
        except grpc.RpcError as error:
            raise UnavailableError(_rpc_reason(error)) from None
        page = signed.verify_key_floors(
            answer, manifest=head.manifest, nonce=nonce, self_host_id=self._node.host_id
        )
        if answer.host_id != host:
            self.book.verified(answer.host_id, address)
        asked = set(key_ids)
        self._take([f for f in page.floors if f.key_id in asked], answer.host_id)

    # --- the server side (HsaPeerServicer) -----------------------------------------------------

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

    def key_floors(
        self, request: services_pb2.KeyFloorsRequest, caller_host: str
    ) -> services_pb2.KeyFloors:
        """A signed page of floors: of the keys asked for, or changed after a sequence."""
        nonce = signed.check_nonce(request.nonce)
        key_ids = list(request.key_ids)
        if len(key_ids) > signed.MAX_FLOOR_KEYS_PER_REQUEST:
            raise LimitExceededError(
                f"at most {signed.MAX_FLOOR_KEYS_PER_REQUEST} key ids per request"
            )
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
            page.floors.extend(_floor_message(e) for e in self._floor.floors_of(key_ids))
        else:
            maximum = signed.MAX_FLOORS_PER_PAGE
            limit = min(request.limit, maximum) if request.limit else maximum
            after = request.after_sequence if request.epoch == self._floor.epoch else 0
            entries, more = self._floor.changes_after(after, limit)
            page.floors.extend(_floor_message(e) for e in entries)
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
        if len(request.floors) > signed.MAX_FLOORS_PER_PAGE:
            raise LimitExceededError(f"at most {signed.MAX_FLOORS_PER_PAGE} floors per push")
        floors = [signed.check_floor(f) for f in request.floors]
        raised = self._take(floors, caller_host)
        return services_pb2.PushKeyFloorsResponse(raised=len(raised))

    # --- the key service's gate (keyservice.PeerGate) ----------------------------------------

    def require_ready(self) -> None:
        """NotAppliedError (definite: nothing was done) while the key service waits for floors
        from a peer."""
        if not self._ready:
            raise NotAppliedError(
                f"{self._node.host_id} is not serving keys yet: it has not taken the key "
                "metadata floors of any other HSA since it started (so it cannot rule out a "
                f"rolled-back key record): use another HSA, or wait ({self._reasons[:300]})"
            )

    def unconfirmed_for(self) -> float:
        """Seconds since a peer last confirmed this HSA's head (or since the start); 0 when
        the head lists no other host (it confirms itself)."""
        found = self._peers()
        if found is not None and not found[1]:
            return 0.0
        return self._clock() - max(self._confirmed_at, self._started_at)

    def require_head_confirmed(self, operation: str) -> None:
        """NotAppliedError (definite: nothing was done) when no peer confirmed this HSA's head
        within the bound."""
        seconds = self.unconfirmed_for()
        if seconds > self._bound:
            raise NotAppliedError(
                _unconfirmed_message(
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
        meta = _Meta(
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
            self._floor.set_meta({_META: meta.encode()})
        except Exception as error:
            self._throttled.warning(f"could not tell the key service workers: {error}")
            return
        self._last_meta, self._meta_written_at = meta, now
        self._meta_unconfirmed = self._unconfirmed_logged


# --- key service workers -------------------------------------------------------------------------


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
        self._tls = tls
        self._limits = limits
        self._parent = os.getppid() if parent_pid is None else parent_pid
        self._wall_clock = wall_clock
        self._clock = clock
        self._ready = False
        self._checked_at = float("-inf")
        self._meta: _Meta | None = None
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._channel_address = ""

    def listen_floors(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Nothing to listen to: peers push to the main process, whose cache is told; a
        worker's entries are re-read at the end of their TTL."""

    def announce(self, key_id: str, version: int, digest: bytes) -> None:
        """Nothing to do here: the main process pushes every change of the shared floor table
        to the peers within `PUSH_POLL_SECONDS`."""

    def close(self) -> None:
        """Close the channel to the main process."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

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

    def _read_meta(self) -> _Meta | None:
        now = self._clock()
        if now - self._checked_at >= _WORKER_META_POLL_SECONDS:
            meta = _Meta.decode(self._floor.meta(_META))
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
        raise NotAppliedError(
            f"{self._node.host_id} is not serving keys yet: it has not taken the key metadata "
            "floors of any other HSA since it started (so it cannot rule out a rolled-back key "
            "record): use another HSA, or wait"
        )

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
                _unconfirmed_message(
                    self._node.host_id, meta.version, seconds, meta.bound, operation, meta.reasons
                )
            )

    def learn(self, key_ids: Sequence[str]) -> None:
        """Ask the main process to learn these keys' floors from its peers (it writes them to
        the shared table); UnavailableError when it cannot."""
        address = self._store.load_address()
        if not address:
            raise UnavailableError(f"{self._node.host_id}'s main process address is not known")
        with self._lock:
            if self._channel is None or self._channel_address != address:
                if self._channel is not None:
                    self._channel.close()
                self._channel = transport.mtls_channel(
                    address, self._tls, transport.hsa_host(self._node.host_id), self._limits
                )
                self._channel_address = address
            stub = services_pb2_grpc.HsaPeerStub(self._channel)  # type: ignore[no-untyped-call]
        nonce = signed.new_nonce()
        ids = list(dict.fromkeys(key_ids))[: signed.MAX_FLOOR_KEYS_PER_REQUEST]
        try:
            answer = stub.GetKeyFloors(
                services_pb2.KeyFloorsRequest(nonce=nonce, key_ids=ids, consult_peers=True),
                timeout=LEARN_DEADLINE_SECONDS * 3,
            )
        except grpc.RpcError as error:
            raise UnavailableError(
                f"{self._node.host_id} could not learn the metadata floor of key "
                f"{', '.join(ids)[:200]} through its main process: {_rpc_reason(error)}"
            ) from None
        # Written to the shared table by the main process already; checked all the same.
        signed.verify_key_floors(
            answer,
            manifest=self._node.head.manifest,
            nonce=nonce,
            self_host_id=self._node.host_id,
            from_self=True,
        )
