"""The records a `CoordinatorStore` stores and returns, and the argument checks every backend
shares (re-exported by `domain_coordinator.store`, where they are documented with the
interface; import them from there).

Invariants: every record is frozen (a value, never shared mutable state); the checks raise
TypeError or ValueError (programming errors), never a domain error.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_STORED_INTEGER = 2**63 - 1  # what a 64-bit signed integer column holds


class ProposalState(enum.StrEnum):
    """Where a stored proposal stands. Everything but PENDING is final."""

    PENDING = "pending"
    APPLIED = "applied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    STALE = "stale"
    REJECTED = "rejected"

    @property
    def closed(self) -> bool:
        """True for every final state."""
        return self is not ProposalState.PENDING


@dataclass(frozen=True)
class ProposalRecord:
    """A stored proposal: the signed bytes, its approvals in arrival order, and its state.

    `proposer`, `base_version` and `base_state_hash` are copies of the proposal's own fields
    (taken from the parsed bytes when it was stored), kept in columns so the store can count
    and select without reading the bytes; `seq` is its place in arrival order (the listing's
    cursor) and `closed_at` when it left PENDING (0 while pending).
    """

    proposal_id: bytes
    proposal: bytes
    approvals: tuple[bytes, ...]  # serialized hsmdomain.v1.Approval messages
    state: ProposalState
    detail: str
    applied_version: int
    created_at: int
    expires_at: int
    cancel_votes: tuple[bytes, ...] = ()  # serialized hsmdomain.v1.CancelVote messages
    seq: int = 0
    proposer: str = ""
    base_version: int = 0
    base_state_hash: bytes = b""
    closed_at: int = 0


@dataclass(frozen=True)
class PendingSummary:
    """What the sweeper needs of a pending proposal, without its bytes or approvals."""

    proposal_id: bytes
    expires_at: int
    base_version: int
    base_state_hash: bytes


@dataclass(frozen=True)
class HsaRecord:
    """One registered HSA: where its services listen, when it last registered, and the
    state it last said it has installed.

    `version`, `state_hash` and `reported_at` are the HSA's own report (0, b"" and 0 until it
    made one), kept for operators to see; the coordinator relays them and nobody bases a
    trust decision on them.
    """

    host_id: str
    address: str
    registered_at: int
    version: int = 0
    state_hash: bytes = b""
    reported_at: int = 0


@dataclass(frozen=True)
class AuditHeadRecord:
    """The highest audit head stored for one log of one host: the signed checkpoint bytes as
    the HSA sent them (verified by the coordinator before storing, and by every reader), its
    record number, and when it arrived (unix seconds)."""

    host_id: str
    log: str
    seq: int
    checkpoint: bytes
    reported_at: int


@dataclass(frozen=True)
class KeyEntry:
    """A stored key record (serialized KeyRecord, as the HSA put it) and its revision."""

    key_id: str
    record: bytes
    revision: int


@dataclass(frozen=True)
class DeletedKey:
    """A tombstone: the last record of a deleted key and when (unix seconds) it was deleted."""

    entry: KeyEntry
    deleted_at: int


def iso_date(timestamp: int) -> str:
    """A unix time as an ISO 8601 UTC date and time, for messages."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class NewProposal:
    """A proposal to store as PENDING: its signed bytes, the copies of its own fields that the
    store keeps in columns, and its first approvals ((operator id, serialized Approval))."""

    proposal_id: bytes
    proposal: bytes
    created_at: int
    expires_at: int
    approvals: tuple[tuple[str, bytes], ...]
    proposer: str
    base_version: int
    base_state_hash: bytes


@dataclass(frozen=True)
class ProposalCaps:
    """The caps `put_proposal` counts in its own transaction (0: no cap), and the time (unix
    seconds) before which a closed proposal must have expired to be purged to make room."""

    max_pending: int = 0
    max_pending_per_proposer: int = 0
    max_stored_per_proposer: int = 0
    now: int = 0


@dataclass(frozen=True)
class StateChange:
    """Where `set_proposal_state` moves a PENDING proposal, with its closing time (0 while it
    stays PENDING)."""

    state: ProposalState
    detail: str
    applied_version: int
    closed_at: int


class Signed(enum.Enum):
    """What one operator signs about a stored proposal, at most once: an approval or a vote to
    cancel (kept beside the approvals)."""

    APPROVAL = "approval"
    CANCEL_VOTE = "vote"


@dataclass(frozen=True)
class FenceRecord:
    """The stored fences (the coordinator's serialized fence set, opaque to the store) and
    their revision: 1 after the first `set_fences`, +1 per change; b"" at revision 0 when
    they were never set."""

    value: bytes
    revision: int


class ChangeKind(enum.StrEnum):
    """Which part of the store another writer changed (what `subscribe` reports)."""

    STATES = "states"
    PROPOSALS = "proposals"
    KEYS = "keys"
    FENCES = "fences"


ALL_CHANGE_KINDS: frozenset[ChangeKind] = frozenset(ChangeKind)


# --- argument checks, the same for every backend (used by `store.CoordinatorStore`) ----------


def check_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes) or not value:
        raise TypeError(f"{what} must be non-empty bytes")


def check_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string")


def check_version(version: object) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("a state version is an integer of at least 1")


def check_report(version: int, state_hash: bytes, when: int) -> None:
    for value in (version, when):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("a reported version and time are integers")
        if not 0 <= value <= MAX_STORED_INTEGER:
            raise ValueError("a reported version or time is out of range")
    if not isinstance(state_hash, bytes):
        raise TypeError("a reported state hash is bytes")


def check_revision(value: object, what: str) -> None:
    """A revision to compare with: an integer, 0 (never written) or more."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} is an integer")
    if not 0 <= value <= MAX_STORED_INTEGER:
        raise ValueError(f"{what} is 0 or a stored revision")


def timestamp(value: int | None) -> int:
    """A unix time for a store column: `value`, or now when None."""
    if value is None:
        return int(time.time())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a time is a unix time in whole seconds")
    return value
