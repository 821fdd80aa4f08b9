"""Acting on the store's notices that another replica changed it.

Invariants: a notice only says "read again" (`CoordinatorStore.subscribe`): new states are
adopted by `VerifiedChain.refresh`, which verifies each as the successor of the head, in a
thread of this module's own (the store's notice thread is never held up by a verification);
changed fences are read before the next key write is checked (`Fences.mark_stale`). The
sweeper adopts stored states on every pass as well, so a lost notice costs at most a sweep
interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from domain_coordinator._fences import Fences
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import ChangeKind, CoordinatorStore

log = logging.getLogger(__name__)


@dataclass(eq=False, repr=False)
class StoreNotices:
    """Subscribes to the store's notices and acts on them (see the module invariants)."""

    chain: VerifiedChain
    fences: Fences
    store: CoordinatorStore
    stopping: threading.Event
    _states: threading.Event = field(init=False, default_factory=threading.Event)
    _unsubscribe: Callable[[], None] | None = field(init=False, default=None)
    _thread: threading.Thread | None = field(init=False, default=None)

    def start(self) -> None:
        """Subscribe, and start the thread that adopts new states."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._adopt_loop, name="coordinator-notices", daemon=True
        )
        self._thread.start()
        self._unsubscribe = self.store.subscribe(
            self._on_change, kinds=(ChangeKind.STATES, ChangeKind.FENCES)
        )

    def stop(self) -> None:
        """Unsubscribe and end the thread (the caller set `stopping`)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._states.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _on_change(self, kind: ChangeKind) -> None:
        if kind is ChangeKind.STATES:
            self._states.set()
        elif kind is ChangeKind.FENCES:
            self.fences.mark_stale()

    def _adopt_loop(self) -> None:
        while not self.stopping.is_set():
            self._states.wait()
            self._states.clear()
            if self.stopping.is_set():
                return
            try:
                self.chain.refresh()
            except Exception:  # the store is unreachable now: the sweeper tries again
                log.warning("could not adopt the states another replica stored", exc_info=True)
