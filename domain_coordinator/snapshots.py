"""Snapshots of the coordinator's store: what a backup holds, what a restore or migration loads.

`CoordinatorStore.snapshot()` gives a `StoreSnapshot`; `CoordinatorStore.load_snapshot(items)`
loads the items of one (from another store, or from a backup file) into an empty store.

Invariants every backend keeps:
- a snapshot is one point in time: its counts, its newest state and every part it yields were
  read at that point (SQLite: one read transaction on a connection of its own; a key-value
  store: every range read at one revision), while writers go on; each part is streamed in
  pages, never held in memory whole;
- items come in snapshot order: states (version 1, 2, ... without a gap), proposals (by
  arrival, `seq` rising), key records (live and deleted together, by key id), registered HSAs
  (by host id), audit heads (by host id, then log). `checked_items` enforces that order and
  each item's form as the items pass to a backend's loader, so no backend loads an item out of
  order, twice, or of the wrong type;
- a load goes into an empty store only (FailedPreconditionError naming what is there
  otherwise, checked again inside the write) and is all or nothing: if the items raise (a
  backup that stops verifying, a source store that fails), nothing of them stays; revisions,
  states, closing times, tombstones and registrations are restored exactly as the items say,
  and proposals keep their arrival order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from domain_coordinator.store import MAX_STORED_INTEGER, AuditHeadRecord, HsaRecord
from domain_core.backup import StoreCounts
from domain_core.errors import FailedPreconditionError

__all__ = [
    "SnapshotItem",
    "SnapshotKey",
    "SnapshotProposal",
    "SnapshotState",
    "StoreCounts",
    "StoreSnapshot",
    "checked_items",
    "refuse_unless_empty",
]

SignedBy = tuple[tuple[str, bytes], ...]  # (operator id, serialized Approval or CancelVote)


@dataclass(frozen=True)
class SnapshotState:
    """One stored state: its version and its bytes as stored."""

    version: int
    state: bytes


@dataclass(frozen=True)
class SnapshotProposal:
    """One stored proposal with everything the store keeps of it: its signed bytes, the
    columns beside them, and its approvals and votes to cancel in arrival order."""

    proposal_id: bytes
    proposal: bytes
    state: str  # a `store.ProposalState` value
    detail: str
    applied_version: int
    created_at: int
    expires_at: int
    closed_at: int
    seq: int
    proposer: str
    base_version: int
    base_state_hash: bytes
    approvals: SignedBy = ()
    cancel_votes: SignedBy = ()


@dataclass(frozen=True)
class SnapshotKey:
    """One stored key record, live (`deleted_at` 0) or a tombstone, with its revision and the
    creator it counts for."""

    key_id: str
    record: bytes
    revision: int
    creator: str
    deleted_at: int = 0


SnapshotItem = SnapshotState | SnapshotProposal | SnapshotKey | HsaRecord | AuditHeadRecord
_ITEM_TYPES = (SnapshotState, SnapshotProposal, SnapshotKey, HsaRecord, AuditHeadRecord)


class StoreSnapshot(ABC):
    """One point in time of a store, read part by part (see the module invariants).

    Use it only inside the `with` block that `CoordinatorStore.snapshot()` opened."""

    def __init__(self, counts: StoreCounts, newest_state: bytes | None) -> None:
        self.counts = counts
        self.newest_state = newest_state

    @abstractmethod
    def states(self) -> Iterator[SnapshotState]:
        """Every state, oldest first."""

    @abstractmethod
    def proposals(self) -> Iterator[SnapshotProposal]:
        """Every proposal with its approvals and votes, in arrival order."""

    @abstractmethod
    def keys(self) -> Iterator[SnapshotKey]:
        """Every key record, live and deleted, by key id."""

    @abstractmethod
    def hsas(self) -> Iterator[HsaRecord]:
        """Every registered HSA, by host id."""

    @abstractmethod
    def audit_heads(self) -> Iterator[AuditHeadRecord]:
        """Every audit head, by host id and log."""

    def items(self) -> Iterator[SnapshotItem]:
        """Every item, in snapshot order."""
        yield from self.states()
        yield from self.proposals()
        yield from self.keys()
        yield from self.hsas()
        yield from self.audit_heads()


def refuse_unless_empty(counts: StoreCounts, where: str) -> None:
    """FailedPreconditionError naming what `where` holds, unless it holds nothing."""
    if not counts.empty:
        raise FailedPreconditionError(
            f"{where} is not empty: it holds {counts.describe()}; a snapshot is loaded only "
            "into an empty store (move the old one aside first)"
        )


def _order_key(item: SnapshotItem) -> tuple[int, int, str, str]:
    """(the item's kind in snapshot order, then its place within the kind)."""
    if isinstance(item, SnapshotState):
        return 0, item.version, "", ""
    if isinstance(item, SnapshotProposal):
        return 1, item.seq, "", ""
    if isinstance(item, SnapshotKey):
        return 2, 0, item.key_id, ""
    if isinstance(item, HsaRecord):
        return 3, 0, item.host_id, ""
    return 4, 0, item.host_id, item.log


def _check_integers(item: object, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(item, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{type(item).__name__}.{name} is not an integer: {value!r}")
        if not 0 <= value <= MAX_STORED_INTEGER:
            raise ValueError(f"{type(item).__name__}.{name} is not a stored integer: {value!r}")


def _check_form(item: SnapshotItem) -> None:
    if isinstance(item, SnapshotState):
        _check_integers(item, ("version",))
        if not isinstance(item.state, bytes) or not item.state:
            raise ValueError("a snapshot state has no bytes")
    elif isinstance(item, SnapshotProposal):
        _check_integers(
            item,
            ("applied_version", "created_at", "expires_at", "closed_at", "seq", "base_version"),
        )
        if not item.proposal_id or not item.proposal:
            raise ValueError("a snapshot proposal has no id or no bytes")
        for what in (item.approvals, item.cancel_votes):
            operators = [operator for operator, _ in what]
            if len(set(operators)) != len(operators) or not all(signed for _, signed in what):
                raise ValueError("a snapshot proposal holds two signatures of one operator")
    elif isinstance(item, SnapshotKey):
        _check_integers(item, ("revision", "deleted_at"))
        if not item.key_id or not item.record or item.revision < 1:
            raise ValueError(f"snapshot key {item.key_id[:80]!r} has no record or revision")
    elif isinstance(item, HsaRecord):
        _check_integers(item, ("registered_at", "version", "reported_at"))
    else:
        _check_integers(item, ("seq", "reported_at"))
        if not item.checkpoint:
            raise ValueError("a snapshot audit head has no checkpoint")


def checked_items(items: Iterable[object]) -> Iterator[SnapshotItem]:
    """`items` as they pass, each checked for its type, its form and its place in snapshot
    order (TypeError/ValueError: a programming error, or a source that breaks its contract)."""
    last: tuple[int, int, str, str] | None = None
    next_version = 1
    for item in items:
        if not isinstance(item, _ITEM_TYPES):
            raise TypeError(f"not a snapshot item: {type(item).__name__}")
        _check_form(item)
        key = _order_key(item)
        if isinstance(item, SnapshotState):
            if item.version != next_version:
                raise ValueError(f"snapshot state {item.version} where {next_version} was due")
            next_version += 1
        if last is not None and key <= last:
            raise ValueError(f"a {type(item).__name__} out of snapshot order (or repeated)")
        last = key
        yield item
