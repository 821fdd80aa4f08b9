"""The sweeper: the coordinator's periodic pass over the chain, the proposals and the keys.

Invariants: each pass adopts states another coordinator stored; on the replica that leads
(`_coordination`) only, it then starts the repair when an HSA
reports a version above the head, closes the proposals whose expiry or base passed, recomputes
the fences, retries the proposals that may have a quorum (deferred ones after their back-off),
rotates the domain key when due, and hourly purges old tombstones and closed proposals. It
reads no proposal that is not quorate-looking: expiry and staleness come from the store's
indexed columns, and only proposals with enough approvals stored are loaded, each parsed and
counted once per pass. A failed pass is logged and the next one runs as usual.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from domain_coordinator._applying import Applier, ScheduledRotation
from domain_coordinator._fences import Fences
from domain_coordinator._key_records import KeyRecords
from domain_coordinator._producer import Deferrals
from domain_coordinator._proposals import ProposalBook
from domain_coordinator._reports import HsaReports
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore

log = logging.getLogger(__name__)

PURGE_INTERVAL_SECONDS = 3600.0


@dataclass(kw_only=True, eq=False, repr=False)
class Sweeper:
    """Runs `sweep_once` every `interval` seconds in a thread of its own, until stopped."""

    chain: VerifiedChain
    store: CoordinatorStore
    reports: HsaReports
    book: ProposalBook
    fences: Fences
    deferrals: Deferrals
    applier: Applier
    rotation: ScheduledRotation
    key_records: KeyRecords
    interval: float
    proposal_retention_seconds: int
    stopping: threading.Event
    leads: Callable[[], bool] = lambda: True
    _next_purge: float = field(init=False, default=0.0)
    _thread: threading.Thread | None = field(init=False, default=None)

    def start(self) -> None:
        """Start the sweeper thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="coordinator-sweeper", daemon=True
            )
            self._thread.start()

    def join(self) -> None:
        """Wait for the sweeper thread to end (the caller set `stopping`)."""
        if self._thread is not None:
            self._thread.join(timeout=10)

    def sweep_once(self) -> None:
        """One pass (see the module invariants); on a replica that does not lead, only the
        adoption of stored states."""
        self.chain.refresh()
        if not self.leads():
            return
        head = self.chain.head
        if any(h.version > head.version for h in self.store.list_hsas()):
            self.reports.start_repair()
        self.book.close_due()
        candidates = self.book.quorum_candidates()
        counted = self.fences.refresh(candidates)
        self.deferrals.keep_only(c.hex() for c in candidates)
        for proposal_id in candidates:
            if self.deferrals.due(proposal_id.hex()):
                self.applier.apply_if_met(proposal_id, counted.get(proposal_id))
        self.rotation.rotate_if_due()
        self._purge()

    def purge_closed_proposals(self) -> int:
        """Delete the proposals closed more than the retention period ago that have expired
        by this coordinator's clock; how many."""
        return self.book.purge_closed(self.proposal_retention_seconds)

    def _purge(self) -> None:
        """Hourly: remove the tombstones of keys deleted longer ago than their waiting period,
        and the proposals closed longer ago than the retention period that have expired."""
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
        self.purge_closed_proposals()
        self.key_records.purge_tombstones()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                self.sweep_once()
            except Exception:
                log.exception("the coordinator's sweep failed; retrying")
