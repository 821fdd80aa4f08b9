"""What the replicas of one coordinator share besides the store: one writer of the chain at a
time, and one leader for the periodic work.

Replicas answer every RPC. Changing the chain (an apply, the scheduled rotation, a repair, a
cancel, a fence refresh) happens under the write lock (`Coordination.writes`); the sweeper's
work (closing due proposals, recomputing the fences, retrying quorate proposals, the scheduled
rotation, repairs, purges) runs on the leader only (`Coordination.is_leader`).

Invariants:
- `writes` is re-entrant within a thread and held by one thread of one replica at a time: a
  replica takes its own lock first, then (outermost only) the shared one; a shared lock it
  cannot get within `WRITE_LOCK_WAIT_SECONDS` is UnavailableError ("retry"), never a write
  without it; having taken the shared lock, a replica first adopts the states the previous
  holder stored (`WriteLock.when_acquired`: `VerifiedChain.refresh`), so it never produces a
  state from a head that another replica has already moved past;
- a store written by one coordinator only (`SoleCoordination`, SQLite) needs no shared lock and
  that coordinator always leads;
- on etcd (`ReplicaCoordination`) the lock and the leadership are keys held under leases
  (`domain_edge.etcd.Lock`, `Election`): a replica that dies or is cut off from etcd loses both
  once its lease expires, and another takes over; a replica campaigns again after losing;
- being leader is a matter of efficiency, never of safety: every change of the chain is
  compare-and-swap in the store and under the write lock, so two replicas that both believe
  they lead (one paused past its lease) cannot store two states for one version.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Final

from domain_core.errors import UnavailableError
from domain_edge.etcd import Election as EtcdElection
from domain_edge.etcd import EtcdClient, Lock, replica_leader_key, replica_lock_key

log = logging.getLogger(__name__)

WRITE_LOCK_WAIT_SECONDS: Final = 30.0
LEASE_TTL_SECONDS: Final = 5
_CAMPAIGN_RETRY_SECONDS: Final = 1.0


class WriteLock:
    """A re-entrant lock for one thread of one replica, with an optional shared lock taken on
    the outermost entry (see the module invariants). Use as a context manager."""

    def __init__(self, shared: Lock | None = None) -> None:
        self._local = threading.RLock()
        self._shared = shared
        self._depth = 0  # changed only by the thread holding `_local`
        self._acquired: Callable[[], None] | None = None

    def when_acquired(self, catch_up: Callable[[], None]) -> None:
        """Run `catch_up` each time the shared lock is taken (the outermost entry), before
        the block runs: a replica adopts what the previous holder stored before it writes."""
        self._acquired = catch_up

    def __enter__(self) -> WriteLock:
        self._local.acquire()
        if self._depth == 0 and self._shared is not None:
            try:
                held = self._shared.acquire(WRITE_LOCK_WAIT_SECONDS)
            except BaseException:
                self._local.release()
                raise
            if not held:
                self._local.release()
                raise UnavailableError(
                    "another coordinator replica has been changing the domain for more than "
                    f"{WRITE_LOCK_WAIT_SECONDS:.0f} s; retry"
                )
            if self._acquired is not None:
                try:
                    self._acquired()
                except BaseException:
                    self._shared.release()
                    self._local.release()
                    raise
        self._depth += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._shared is not None:
                self._shared.release()
        finally:
            self._local.release()


class Coordination(ABC):
    """The write lock and the leadership of one coordinator process among its replicas."""

    def __init__(self, writes: WriteLock) -> None:
        self.writes = writes

    @property
    @abstractmethod
    def is_leader(self) -> bool:
        """Whether this replica runs the periodic work now."""

    @abstractmethod
    def leader(self) -> str:
        """The name of the replica that leads ("" when none does, or none is known)."""

    @abstractmethod
    def start(self) -> None:
        """Begin to take part (campaign for leadership)."""

    @abstractmethod
    def close(self) -> None:
        """Stop taking part (resign at once, so another replica leads without waiting)."""


class SoleCoordination(Coordination):
    """One coordinator on a store nobody else writes: a local lock, and it always leads."""

    def __init__(self, name: str) -> None:
        super().__init__(WriteLock())
        self._name = name

    @property
    def is_leader(self) -> bool:
        return True

    def leader(self) -> str:
        return self._name

    def start(self) -> None:
        """Nothing to join."""

    def close(self) -> None:
        """Nothing to leave."""


class ReplicaCoordination(Coordination):
    """A replica among others on one etcd store: a shared lock under `PREFIX/coordination/`,
    and an election there that this replica joins in a thread of its own."""

    def __init__(self, client: EtcdClient, prefix: str, name: str) -> None:
        self._lock = Lock(client, replica_lock_key(prefix), ttl=LEASE_TTL_SECONDS)
        super().__init__(WriteLock(self._lock))
        self._name = name
        self._stopping = threading.Event()
        self._lost = threading.Event()
        self._election = EtcdElection(
            client,
            replica_leader_key(prefix),
            name.encode(),
            ttl=LEASE_TTL_SECONDS,
            on_lost=self._lost.set,
        )
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._election.is_leader

    def leader(self) -> str:
        try:
            found = self._election.leader()
        except UnavailableError:
            return ""
        return found.decode(errors="replace") if found else ""

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._campaign, name="coordinator-election", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._election.is_leader:
            try:
                self._election.resign()
            except UnavailableError as error:
                log.warning("could not resign the leadership (it lapses with the lease): %s", error)
        try:
            self._lock.close()
        except UnavailableError as error:
            log.warning("could not revoke the write lock's lease (it lapses): %s", error)

    def _campaign(self) -> None:
        """Campaign until leading; after losing the lead, campaign again; until closed."""
        while not self._stopping.is_set():
            try:
                won = self._election.campaign(timeout=_CAMPAIGN_RETRY_SECONDS)
            except UnavailableError as error:
                log.warning("cannot campaign for the leadership: %s", error)
                self._stopping.wait(_CAMPAIGN_RETRY_SECONDS)
                continue
            except Exception:  # a bug must not end the campaign for good: log it, go on
                log.exception("campaigning for the leadership failed; campaigning again")
                self._stopping.wait(_CAMPAIGN_RETRY_SECONDS)
                continue
            if not won:
                continue
            log.info("%s leads the coordinator replicas", self._name)
            self._lost.clear()
            while not self._stopping.is_set() and self._election.is_leader:
                self._lost.wait(_CAMPAIGN_RETRY_SECONDS)
            if not self._stopping.is_set():
                log.warning("%s lost the leadership; campaigning again", self._name)
