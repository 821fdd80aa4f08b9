"""Keeping an HSA current: the coordinator stream, the periodic pull, and gossip with peers.

Three background threads feed `DomainNode.offer`, each state in version order:
1. `WatchStates(after_version)` from the coordinator (reconnects with backoff);
2. every `pull_interval_seconds`: `RegisterHsa` (so the coordinator knows where this host
   listens, and which version and state hash it has installed), `GetStatesAfter(version)`
   and `ListHsas` (its addresses are hints for `hsa_node.peering`); the same thread
   registers again as soon as the node installs a state (the node's listener only sets an
   event), so operators waiting for a change see it reported within a round trip; a
   coordinator that answers with a lower version than this node's (its store is behind:
   restored from an old copy) is warned about;
3. every `gossip_interval_seconds` (sooner while the key service waits for key floors): a
   round of `hsa_node.peering.Peering` with the peers of the verified head (never the
   coordinator's list, whose addresses are only hints): each peer signs its head over a fresh
   nonce; a peer at a newer version is asked `GetStatesAfter(version - 1)` over mutual TLS as
   this host (works while the coordinator is down), and so is one that holds another state for
   a version this node holds (a fork: somebody told the two of them different things), which
   is recorded on the node (`DomainNode.record_fork`); the node keeps serving its own verified
   chain and says so in its status. The same round confirms the head and exchanges key
   metadata floors (see `hsa_node.peering`).
Audit heads travel on the same paths (`hsa_node.audit_heads`): `RegisterHsa` carries the
newest signed checkpoint of each of this host's audit logs (a head the coordinator refuses is
logged at ERROR), and each gossip round fetches the heads of one peer that confirmed its head
(`HsaPeer.GetAuditHeads`) and keeps the highest verified one per host and log.

Invariants: nothing a source returns is believed before `offer` verified it; every call has
a deadline except the stream, which is cancelled on shutdown; an error of one path is logged
(each distinct message at most once a minute) and never stops its thread.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import grpc

from domain_core.errors import (
    ChainGapError,
    ForkError,
    HsmDomainError,
    RollbackError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState
from domain_edge import transport
from domain_edge.throttled_log import ThrottledLog
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from hsa_node.audit_heads import AuditHeadBook
from hsa_node.node import DomainNode
from hsa_node.storage import NodeStore

if TYPE_CHECKING:
    from hsa_node.peering import Peering

__all__ = ["CALL_DEADLINE_SECONDS", "Syncer", "pull_states"]

log = logging.getLogger(__name__)

CALL_DEADLINE_SECONDS: Final = 3.0
_BACKOFF_FIRST: Final = 0.2
_BACKOFF_MAX: Final = 5.0

FetchStates = Callable[[int], Sequence[domain_pb2.SealedState]]


def _rpc_reason(error: grpc.RpcError) -> str:
    """The "CODE: details" of a failed call (errors raised by calls are also grpc.Call)."""
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else str(error)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}"


def pull_states(
    node: DomainNode,
    fetch: FetchStates,
    source: str,
    on_fork: Callable[[SealedState], None] | None = None,
) -> int:
    """Fetch states after the node's version in batches and offer them in order.

    Returns how many states were installed. Stops at the first refused state (raising its
    error, after calling `on_fork` with the state when the refusal is a ForkError) or when a
    batch brings nothing new (a source may return fewer than `limit` states per batch to stay
    under the message size limit, so a short batch is not the end).
    """
    installed = 0
    while True:
        before = node.version
        messages = fetch(before)
        for message in messages:
            state = node.parse_offered(message, source=source)
            try:
                if node.offer(state, source=source, quiet_repeats=True):
                    installed += 1
            except RollbackError:
                if node.removed_at is not None:
                    return installed
                continue  # a state we hold already; the next ones may be new
            except ForkError:
                if on_fork is not None:
                    on_fork(state)
                raise
        if node.removed_at is not None or not messages or node.version == before:
            return installed


class Syncer:
    """The background threads that keep one node current, and on-demand catch-up."""

    def __init__(
        self,
        *,
        node: DomainNode,
        store: NodeStore,
        tls: TlsMaterial,
        coordinator: str,
        pull_interval: float,
        gossip_interval: float,
        address: str,
        peering: Peering,
        limits: Limits = DEFAULT_LIMITS,
        audit_heads: AuditHeadBook | None = None,
    ) -> None:
        self._node = node
        self._audit_heads = audit_heads
        self._peering = peering
        self._store = store
        self._tls = tls
        self._coordinator_address = coordinator
        self._pull_interval = max(pull_interval, 0.05)
        self._gossip_interval = max(gossip_interval, 0.05)
        self._address = address
        self._limits = limits
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._coordinator_head = 0  # the newest version the coordinator was seen to hold
        self._coordinator_answered = 0.0  # monotonic time of its last answer to a pull
        self._threads: list[threading.Thread] = []
        self._watch_call: Any = None  # the stream call, cancelled on stop
        self._throttled = ThrottledLog(log)
        self._coordinator_channel: grpc.Channel | None = None
        self._coordinator: services_pb2_grpc.CoordinatorStub | None = None
        self._state_changed = threading.Event()  # set by the node: register again soon
        if coordinator:
            self._coordinator_channel = transport.mtls_channel(
                coordinator, tls, transport.COORDINATOR, limits
            )
            self._coordinator = services_pb2_grpc.CoordinatorStub(  # type: ignore[no-untyped-call]
                self._coordinator_channel
            )

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the threads (the coordinator ones only when a coordinator is configured)."""
        loops: list[tuple[str, Callable[[], None]]] = [("gossip", self._gossip_loop)]
        if self._coordinator is not None:
            loops += [("watch", self._watch_loop), ("pull", self._pull_loop)]
            # Called under the node's lock after every install: it must not block.
            self._node.add_listener(lambda _serving: self._state_changed.set())
        for name, target in loops:
            thread = threading.Thread(target=target, name=f"sync-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 3.0) -> None:
        """Stop every thread, cancel the stream, close the channels."""
        self._stop.set()
        self._state_changed.set()  # wakes the pull thread
        self._peering.wake()  # wakes the gossip thread
        with self._lock:
            call = self._watch_call
        if call is not None:
            call.cancel()
        for thread in self._threads:
            thread.join(timeout)
        if self._coordinator_channel is not None:
            self._coordinator_channel.close()

    # --- coordinator ---------------------------------------------------------------------

    def catch_up_from_coordinator(self) -> int:
        """Pull the states the node misses from the coordinator now; how many it installed.

        Raises UnavailableError when no coordinator is configured or it cannot be reached,
        and the verification error of a refused state.
        """
        stub = self._coordinator
        if stub is None:
            raise UnavailableError(
                "no coordinator is configured on this HSA to fetch the missing states from"
            )
        limit = self._limits.max_states_per_response

        def fetch(after: int) -> Sequence[domain_pb2.SealedState]:
            try:
                response = stub.GetStatesAfter(
                    services_pb2.StatesAfterRequest(after_version=after, limit=limit),
                    timeout=CALL_DEADLINE_SECONDS,
                )
            except grpc.RpcError as error:
                raise UnavailableError(
                    f"cannot fetch states from the coordinator at {self._coordinator_address}: "
                    f"{_rpc_reason(error)}"
                ) from None
            states = list(response.states)
            with self._lock:  # the coordinator holds at least these (pages are contiguous)
                self._coordinator_head = max(self._coordinator_head, after + len(states))
                self._coordinator_answered = time.monotonic()
            return states

        return pull_states(self._node, fetch, "coordinator")

    def coordinator_lag(self) -> tuple[int, float | None]:
        """(versions the coordinator named beyond this node's head, seconds since it last
        answered a pull, None before it ever did): what the metrics say of the sync."""
        with self._lock:
            head, answered = self._coordinator_head, self._coordinator_answered
        since = time.monotonic() - answered if answered else None
        return max(0, head - self._node.version), since

    def _report(self, path: str, message: str) -> None:
        self._throttled.warning(f"{path}: {message}")

    def _catch_up_quietly(self) -> None:
        """Catch up from the coordinator; report unreachability (offer logs refusals)."""
        try:
            self.catch_up_from_coordinator()
        except UnavailableError as error:
            self._report("pull", str(error))
        except HsmDomainError as error:
            log.debug("pull stopped at a refused state: %s", error)

    def _offer_from_stream(self, message: domain_pb2.SealedState) -> None:
        try:
            state = self._node.parse_offered(message, source="coordinator stream")
            self._node.offer(state, source="coordinator stream", quiet_repeats=True)
        except ChainGapError:
            self._catch_up_quietly()
        except HsmDomainError as error:
            log.debug("stream state not installed (offer logged why): %s", error)

    def _watch_loop(self) -> None:
        stub = self._coordinator
        assert stub is not None
        backoff = _BACKOFF_FIRST
        while not self._stop.is_set():
            if self._node.removed_at is not None:
                self._stop.wait(1.0)
                continue
            try:
                call = stub.WatchStates(
                    services_pb2.WatchStatesRequest(after_version=self._node.version)
                )
                with self._lock:
                    self._watch_call = call
                if self._stop.is_set():
                    call.cancel()
                for message in call:
                    backoff = _BACKOFF_FIRST
                    self._offer_from_stream(message)
            except grpc.RpcError as error:
                if self._stop.is_set():
                    break
                self._report("coordinator stream", _rpc_reason(error))
            except Exception:
                log.exception("coordinator stream: unexpected error")
            finally:
                with self._lock:
                    self._watch_call = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _register(self) -> None:
        """Tell the coordinator where this host listens and which state it has installed.

        Clears the state-changed event first, so an install after the head was read here
        triggers another registration.
        """
        stub = self._coordinator
        assert stub is not None
        self._state_changed.clear()
        if self._node.removed_at is not None:
            return
        head = self._node.head
        # (A host not yet, or no longer, in its verified state has no key there to verify
        # its heads under: it reports them once it is a member.)
        own = self._audit_heads.own() if self._audit_heads and self._node.member else []
        audit_heads = [services_pb2.AuditHead(checkpoint=h.raw) for h in own]
        try:
            response = stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(
                    host_id=self._node.host_id,
                    address=self._address,
                    version=head.version,
                    state_hash=head.hash,
                    audit_heads=audit_heads,
                ),
                timeout=CALL_DEADLINE_SECONDS,
            )
        except grpc.RpcError as error:
            self._report("register", _rpc_reason(error))
            return
        for refusal in response.refused_audit_heads:
            self._throttled.log(
                logging.ERROR,
                f"the coordinator refused an audit head: {refusal}",
                key=f"audit head refused: {' '.join(refusal.split()[:2]).rstrip(':')}",
            )
        if response.version < head.version:
            # Never followed (a state is only ever offered forward); said, so that operators
            # learn of a coordinator store restored from an old copy from every HSA too.
            self._report(
                "register",
                f"store behind the HSAs: the coordinator is at version {response.version}, "
                f"this HSA has verified version {head.version} (was its store restored from "
                "an old copy?); it should fetch the newer states from the HSAs: check "
                "`hsm-domain status`",
            )

    def _pull_round(self) -> None:
        stub = self._coordinator
        assert stub is not None
        if self._node.removed_at is None:
            self._register()
            self._catch_up_quietly()
        try:
            listed = stub.ListHsas(services_pb2.ListHsasRequest(), timeout=CALL_DEADLINE_SECONDS)
        except grpc.RpcError as error:
            self._report("list peers", _rpc_reason(error))
            return
        # Hints only: the peers are the hosts of the verified head, and an address counts
        # once an answer from it verifies under that host's key (hsa_node.peering).
        self._peering.add_hints((h.host_id, h.address) for h in listed.hsas if h.address)

    def _pull_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._pull_round()
            except Exception:
                log.exception("pull: unexpected error")
            next_round = time.monotonic() + self._pull_interval
            while not self._stop.is_set():
                remaining = next_round - time.monotonic()
                if remaining <= 0:
                    break
                if self._state_changed.wait(remaining) and not self._stop.is_set():
                    try:
                        self._register()  # a state was installed: report it now
                    except Exception:
                        log.exception("register: unexpected error")

    # --- gossip --------------------------------------------------------------------------

    def gossip_once(self) -> int:
        """One round with the peers of the verified head (`Peering.round`); how many states
        were installed."""
        if self._node.removed_at is not None:
            return 0
        installed = self._peering.round()
        confirmed = self._peering.confirmed_peers()
        if confirmed and self._audit_heads is not None:
            host, stub = secrets.choice(confirmed)
            self._learn_audit_heads(stub, host)
        return installed

    def _learn_audit_heads(self, stub: Any, host: str) -> None:
        """Keep the audit heads of peer `host` (its own and those it keeps); never fails
        gossip."""
        if self._audit_heads is None:
            return
        try:
            response = stub.GetAuditHeads(
                services_pb2.AuditHeadsRequest(), timeout=CALL_DEADLINE_SECONDS
            )
            self._audit_heads.learn((bytes(h.checkpoint) for h in response.heads), f"peer {host}")
        except grpc.RpcError as error:
            self._report("gossip audit heads", f"peer {host}: {_rpc_reason(error)}")
        except (HsmDomainError, OSError) as error:
            self._report("gossip audit heads", f"peer {host}: {error}")

    def _gossip_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.gossip_once()
            except UnavailableError as error:
                self._report("gossip", str(error))
            except HsmDomainError as error:
                log.debug("gossip stopped at a refused state (offer logged why): %s", error)
            except Exception:
                log.exception("gossip: unexpected error")
            self._peering.wait_before_next_round(self._gossip_interval)
