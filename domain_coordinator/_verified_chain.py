"""The chain this coordinator verified, shared by every part of the coordinator.

Invariants:
- the head only moves forward, and only to a state that verified as the successor of the head
  (`TrustedChain.update`), whoever adopts it: a state this coordinator stored, or one another
  coordinator stored in a shared store (`refresh`), which is verified the same way and, if it
  does not verify, is logged (throttled) and not served;
- what is served from the store (`stored_after`) never goes past the verified head;
- every adopted state wakes the WatchStates streams waiting for one (`wait_for_more`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from domain_coordinator.store import CoordinatorStore
from domain_core.chain import TrustedChain
from domain_core.errors import HsmDomainError
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_edge.throttled_log import ThrottledLog

log = logging.getLogger(__name__)


class VerifiedChain:
    """The verified head and the states before it, with the lock and the wake-ups around it."""

    def __init__(self, chain: TrustedChain, store: CoordinatorStore, limits: Limits) -> None:
        self.domain_id = chain.domain_id
        self._chain = chain
        self._store = store
        self._limits = limits
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._throttled = ThrottledLog(log)

    @property
    def head(self) -> SealedState:
        """The newest state this coordinator verified and stored."""
        with self._lock:
            return self._chain.head

    def known_hash(self, version: int) -> bytes | None:
        """The hash of the verified state `version`, if the chain holds it."""
        with self._lock:
            return self._chain.known_hash(version)

    def adopt(self, state: SealedState) -> None:
        """Move the head to `state` if it verifies as its successor (raises otherwise), and
        wake the streams."""
        with self._lock:
            self._chain.update(state)
        self.wake()

    def refresh(self) -> None:
        """Verify and adopt states another coordinator stored (a shared store)."""
        while True:
            head = self.head
            batch = self._store.states_after(head.version, self._limits.max_states_per_response)
            if not batch:
                return
            for raw in batch:
                try:
                    state = SealedState.from_bytes(raw, self._limits)
                    with self._lock:
                        self._chain.update(state)
                except HsmDomainError as error:
                    self._throttled.warning(
                        f"the store holds a state after version {self.head.version} that does "
                        f"not verify: {error}; not serving it",
                        key="refresh",
                        again_if_changed=True,
                    )
                    return
                self.wake()
                log.info("adopted version %d from the store", state.version)

    def stored_after(self, after_version: int, limit: int) -> list[bytes]:
        """Stored states after a version, but none past this coordinator's verified head."""
        head_version = self.head.version
        count = min(limit, head_version - after_version)
        if count <= 0:
            return []
        return self._store.states_after(after_version, count)

    def wake(self) -> None:
        """Wake every stream waiting for a new state (it looks again, or sees it must end)."""
        with self._changed:
            self._changed.notify_all()

    def wait_for_more(self, last: int, keep_waiting: Callable[[], bool], timeout: float) -> None:
        """Wait up to `timeout` for a state after version `last`, unless there is one already
        or `keep_waiting` says no."""
        with self._changed:
            if self.head.version <= last and keep_waiting():
                self._changed.wait(timeout=timeout)
