"""Building the coordinator's parts and handing each the shared objects it needs.

Invariant: the parts share state only through the objects built here and passed to their
constructors: the verified chain, the store, the HSA connections, the limits and clock, the
write lock (one apply, rotation, repair, cancel or fence refresh at a time) and the stop
event. No part reaches another through the servicer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from domain_coordinator._admission import Admission, PendingAdditions
from domain_coordinator._applying import Applier, ScheduledRotation
from domain_coordinator._audit_heads import AuditHeadBook
from domain_coordinator._coordination import Coordination, WriteLock
from domain_coordinator._fences import Fences
from domain_coordinator._hsa import HsaConnections
from domain_coordinator._key_records import KeyRecords
from domain_coordinator._notices import StoreNotices
from domain_coordinator._producer import Deferrals, StateProducer
from domain_coordinator._proposals import ProposalBook
from domain_coordinator._publish import Publisher, Pusher
from domain_coordinator._quorum_flow import QuorumFlow
from domain_coordinator._registry import HsaRegistry
from domain_coordinator._reports import HsaReports
from domain_coordinator._streams import StateRelay
from domain_coordinator._sweeper import Sweeper
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore
from domain_core.limits import Limits


@dataclass(frozen=True)
class Settings:
    """How the coordinator runs: its limits, clock and the periods it keeps things for."""

    limits: Limits
    now: Callable[[], int]
    max_streams: int
    sweep_interval: float
    tombstone_seconds: int
    proposal_retention_seconds: int


@dataclass(frozen=True)
class _Shared:
    """What every part may be handed."""

    chain: VerifiedChain
    store: CoordinatorStore
    hsas: HsaConnections
    settings: Settings
    writes: WriteLock
    stopping: threading.Event


@dataclass(frozen=True)
class CoordinatorParts:
    """The parts the servicer calls."""

    chain: VerifiedChain
    admission: Admission
    book: ProposalBook
    flow: QuorumFlow
    relay: StateRelay
    reports: HsaReports
    registry: HsaRegistry
    audit_heads: AuditHeadBook
    keys: KeyRecords
    fences: Fences
    sweeper: Sweeper
    notices: StoreNotices


@dataclass(frozen=True)
class _Changes:
    """The parts that change the chain, and those they report to."""

    fences: Fences
    deferrals: Deferrals
    reports: HsaReports
    applier: Applier
    rotation: ScheduledRotation


def build(
    chain: VerifiedChain,
    store: CoordinatorStore,
    hsas: HsaConnections,
    settings: Settings,
    stopping: threading.Event,
    coordination: Coordination,
) -> CoordinatorParts:
    """Every part of one coordinator, sharing the objects named in the module invariant."""
    coordination.writes.when_acquired(chain.refresh)
    shared = _Shared(chain, store, hsas, settings, coordination.writes, stopping)
    limits, now = settings.limits, settings.now
    additions = PendingAdditions(chain, store, limits, now)
    admission = Admission(chain, store, additions, limits, stopping)
    book = ProposalBook(chain, store, limits, now)
    changes = _changes(shared, book)
    flow = QuorumFlow(
        chain=chain,
        store=store,
        book=book,
        applier=changes.applier,
        additions=additions,
        limits=limits,
        now=now,
        writes=shared.writes,
    )
    audit_heads = AuditHeadBook(chain, store, limits, now)
    registry = HsaRegistry(
        chain=chain,
        store=store,
        hsas=hsas,
        reports=changes.reports,
        audit_heads=audit_heads,
        now=now,
    )
    relay = StateRelay(
        chain=chain,
        admission=admission,
        limits=limits,
        max_streams=settings.max_streams,
        stopping=stopping,
    )
    keys = KeyRecords(
        chain=chain,
        store=store,
        fences=changes.fences,
        limits=limits,
        now=now,
        tombstone_seconds=settings.tombstone_seconds,
    )
    sweeper = Sweeper(
        chain=chain,
        store=store,
        reports=changes.reports,
        book=book,
        fences=changes.fences,
        deferrals=changes.deferrals,
        applier=changes.applier,
        rotation=changes.rotation,
        key_records=keys,
        interval=settings.sweep_interval,
        proposal_retention_seconds=settings.proposal_retention_seconds,
        stopping=stopping,
        leads=lambda: coordination.is_leader,
    )
    return CoordinatorParts(
        chain,
        admission,
        book,
        flow,
        relay,
        changes.reports,
        registry,
        audit_heads,
        keys,
        changes.fences,
        sweeper,
        StoreNotices(chain, changes.fences, store, stopping),
    )


def _changes(shared: _Shared, book: ProposalBook) -> _Changes:
    """The parts that produce, store and publish new states, and repair the store."""
    chain, store, hsas, writes = shared.chain, shared.store, shared.hsas, shared.writes
    limits, now = shared.settings.limits, shared.settings.now
    fences = Fences(chain, store, limits, now, writes)
    producer = StateProducer(store, hsas, limits, now)
    deferrals = Deferrals(shared.settings.sweep_interval)
    pusher = Pusher(store, hsas)
    reports = HsaReports(
        chain=chain,
        store=store,
        hsas=hsas,
        book=book,
        pusher=pusher,
        limits=limits,
        now=now,
        writes=writes,
        stopping=shared.stopping,
    )
    publisher = Publisher(chain, book, pusher, reports.record_report)
    applier = Applier(
        chain=chain,
        store=store,
        hsas=hsas,
        book=book,
        fences=fences,
        producer=producer,
        deferrals=deferrals,
        publisher=publisher,
        limits=limits,
        now=now,
        writes=writes,
    )
    rotation = ScheduledRotation(
        chain=chain,
        store=store,
        hsas=hsas,
        fences=fences,
        producer=producer,
        deferrals=deferrals,
        publisher=publisher,
        now=now,
        writes=writes,
    )
    return _Changes(fences, deferrals, reports, applier, rotation)
