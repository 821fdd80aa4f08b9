"""The coordinator's durable store: the interface every backend implements.

The coordinator is an untrusted relay, so the store holds only public or self-verifying data:
the chain of sealed states (as serialized bytes), proposals and approvals (as signed bytes),
the registry of HSA addresses and the key records (EKTs and metadata) HSAs put there.

Invariants every implementation keeps:
- every write is durable (committed, synced) before the method returns, so anything the
  coordinator acknowledged survives a crash;
- states form a gap-free sequence 1, 2, 3, ...: `append_state(version, ...)` succeeds only
  when `version` is the latest version + 1 (compare-and-swap), so two writers can never store
  two states for one version;
- `append_state_and_close_proposal` stores a state and marks its proposal APPLIED in one
  transaction: "state stored" and "proposal applied" never diverge, even after a crash;
- a proposal leaves PENDING at most once: APPLIED, EXPIRED, CANCELLED, STALE and REJECTED are
  final, and `set_proposal_state` does not touch a closed proposal; the time it closed is kept
  (`closed_at`);
- proposals are never loaded in bulk: they are counted in the store (`count_proposals`),
  listed a page at a time, newest first (`list_proposals`, a bounded `limit`), and the
  sweeper's questions (which pending ones expired or are stale, which have enough approvals to
  be worth counting) are answered from indexed columns without reading a proposal's bytes;
- `put_proposal` counts the pending proposals, in all and of the proposer, and everything
  stored of the proposer, in the same transaction as the insert, and refuses
  (ResourceExhaustedError) at either pending cap, so no race between two submissions passes a
  cap; at the stored cap it first purges that proposer's oldest closed, expired proposals;
- a closed proposal is purged (with its approvals and votes to cancel) only by
  `purge_closed_proposals`, and only once it has been closed for the retention period **and**
  has expired: a purged proposal's bytes, if replayed, are refused as expired, never accepted
  again as new;
- one approval per operator per proposal; a second one is refused, not replaced; the same
  for votes to cancel (kept beside the approvals; neither can be withdrawn);
- key records are written and deleted with a compare-and-swap on their revision (0 = create);
- a deleted key record becomes a tombstone: kept (record and deletion time) until
  `purge_deleted_keys` removes it after the waiting period, never served by `get_key` or
  `list_keys`, and its key id cannot be created again while it is kept (AlreadyExistsError;
  key ids are fresh random UUIDs, so a collision after the purge is not a concern);
- a create counts the live keys of the record's creator in the same transaction and refuses
  (ResourceExhaustedError) at the creator limit;
- an HSA's reported version is what that HSA said (`register_hsa` replaces it, an InstallState
  answer only raises it): informational, never used for a trust decision;
- an audit head (a signed checkpoint, per host and log) is replaced only with a
  compare-and-swap on the stored checkpoint bytes, so a concurrent report never overwrites a
  head it did not see (the coordinator raises a head, never lowers it);
- the fences (one opaque value the coordinator writes) change only with a compare-and-swap on
  their revision, and a key write or deletion given `fences_revision` happens, in the same
  transaction, only while the fences are still at that revision (else `FencesChangedError`,
  nothing changed): a key write on one replica never slips past a fence another replica set;
- `subscribe` tells a coordinator which part of the store (`ChangeKind`) another writer
  changed, from a background thread, so that a replica re-reads instead of polling; a notice
  says "re-read", never what changed (a spurious one costs a read, a store with one writer
  sends none);
- snapshots are one point in time, loads go into empty stores only (see `snapshots`).

`CoordinatorStore` is an abstract base: its public methods check their arguments (the types
and ranges every backend needs, so a programming error is a TypeError or ValueError whatever
the backend) and call the backend's primitives, the methods whose names start with `_`. The
records it stores and returns are in `_store_records` (re-exported here).
`sqlite_store.SqliteStore` (one file) is the default backend, `etcd_store.EtcdStore` (a prefix
of an etcd cluster, shared by coordinator replicas) the other; both import this module, never
the other way round; `store_spec.open_store` opens the backend a config names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from domain_coordinator._store_records import (
    ALL_CHANGE_KINDS,
    MAX_STORED_INTEGER,
    AuditHeadRecord,
    ChangeKind,
    DeletedKey,
    FenceRecord,
    HsaRecord,
    KeyEntry,
    NewProposal,
    PendingSummary,
    ProposalCaps,
    ProposalRecord,
    ProposalState,
    Signed,
    StateChange,
    check_bytes,
    check_report,
    check_revision,
    check_text,
    check_version,
    iso_date,
    timestamp,
)
from domain_core.backup import StoreCounts
from domain_core.errors import ConflictError

if TYPE_CHECKING:
    from domain_coordinator.snapshots import SnapshotItem, StoreSnapshot

__all__ = [
    "ALL_CHANGE_KINDS",
    "MAX_STORED_INTEGER",
    "AuditHeadRecord",
    "ChangeKind",
    "CoordinatorStore",
    "DeletedKey",
    "FenceRecord",
    "FencesChangedError",
    "HsaRecord",
    "KeyEntry",
    "NewProposal",
    "PendingSummary",
    "ProposalCaps",
    "ProposalRecord",
    "ProposalState",
    "Signed",
    "StateChange",
    "iso_date",
]


class FencesChangedError(ConflictError):
    """A fenced key write or deletion found the fences at another revision than the one it was
    checked against: another replica set a fence meanwhile. Nothing changed; re-read the fences,
    check the write against them, and retry."""


class CoordinatorStore(ABC):
    """What the coordinator needs from durable storage; see the module invariants."""

    # --- the chain of sealed states --------------------------------------------------------

    @abstractmethod
    def latest_version(self) -> int:
        """The version of the newest stored state, 0 when the store is empty."""

    @abstractmethod
    def latest_state(self) -> bytes | None:
        """The newest stored state (serialized SealedState), or None when empty."""

    @abstractmethod
    def get_state(self, version: int) -> bytes | None:
        """The stored state with this version, or None."""

    @abstractmethod
    def states_after(self, version: int, limit: int) -> list[bytes]:
        """Up to `limit` states with versions above `version`, oldest first."""

    def append_state(self, version: int, state: bytes) -> None:
        """Store the state `version`; ConflictError unless it is latest + 1 (genesis: 1)."""
        check_version(version)
        check_bytes(state, "state")
        self._append_state(version, state, None, 0)

    def append_state_and_close_proposal(
        self, version: int, state: bytes, proposal_id: bytes, *, closed_at: int | None = None
    ) -> None:
        """`append_state` and mark the proposal APPLIED at `version` (closed at `closed_at`,
        None: now), in one transaction.

        ConflictError if the version is not latest + 1; NotFoundError if the proposal is
        unknown. Either both writes happen or neither does.
        """
        check_version(version)
        check_bytes(state, "state")
        check_bytes(proposal_id, "proposal_id")
        self._append_state(version, state, proposal_id, timestamp(closed_at))

    @abstractmethod
    def _append_state(
        self, version: int, state: bytes, applied: bytes | None, closed_at: int
    ) -> None:
        """Append the state (compare-and-swap on the version); with `applied`, mark that
        proposal APPLIED (closed at `closed_at`) in the same transaction, NotFoundError first
        if it is unknown."""

    # --- proposals and approvals -----------------------------------------------------------

    def put_proposal(
        self,
        proposal_id: bytes,
        proposal: bytes,
        created_at: int,
        expires_at: int,
        approvals: Sequence[tuple[str, bytes]] = (),
        *,
        proposer: str = "",
        base_version: int = 0,
        base_state_hash: bytes = b"",
        max_pending: int = 0,
        max_pending_per_proposer: int = 0,
        max_stored_per_proposer: int = 0,
        now: int = 0,
    ) -> bool:
        """Store a new PENDING proposal with its first approvals ((operator id, bytes)).

        `proposer`, `base_version` and `base_state_hash` are the proposal's own fields (the
        caller parsed it). Returns False (and changes nothing) if a proposal with this id
        exists already; ResourceExhaustedError, changing nothing, if `max_pending` proposals
        are pending already, or `max_pending_per_proposer` of `proposer`'s (0: no cap). With
        `max_stored_per_proposer`, `proposer` keeps at most that many proposals in any state:
        to make room, their oldest closed ones that expired before `now` are purged (in the
        same transaction); if none can go, ResourceExhaustedError.
        """
        check_bytes(proposal_id, "proposal_id")
        check_bytes(proposal, "proposal")
        check_report(base_version, base_state_hash, 0)
        seen: set[str] = set()
        for operator_id, approval in approvals:
            check_bytes(approval, "approval")
            if operator_id in seen:
                raise ValueError("two initial approvals from one operator")
            seen.add(operator_id)
        new = NewProposal(
            proposal_id,
            proposal,
            created_at,
            expires_at,
            tuple(approvals),
            proposer,
            base_version,
            base_state_hash,
        )
        caps = ProposalCaps(max_pending, max_pending_per_proposer, max_stored_per_proposer, now)
        return self._put_proposal(new, caps)

    def add_approval(self, proposal_id: bytes, operator_id: str, approval: bytes) -> bool:
        """Add one operator's approval; False if that operator already approved.

        NotFoundError if the proposal is unknown. Does not look at the proposal's state: the
        caller checks that it is PENDING.
        """
        check_bytes(proposal_id, "proposal_id")
        check_bytes(approval, "approval")
        check_text(operator_id, "operator_id")
        return self._add_signed(Signed.APPROVAL, proposal_id, operator_id, approval)

    def add_cancel_vote(self, proposal_id: bytes, operator_id: str, vote: bytes) -> bool:
        """Add one operator's vote to cancel; False if that operator already voted.

        NotFoundError if the proposal is unknown. Like `add_approval`, it does not look at
        the proposal's state: the caller checks that it is PENDING.
        """
        check_bytes(proposal_id, "proposal_id")
        check_bytes(vote, "vote")
        check_text(operator_id, "operator_id")
        return self._add_signed(Signed.CANCEL_VOTE, proposal_id, operator_id, vote)

    @abstractmethod
    def get_proposal(self, proposal_id: bytes) -> ProposalRecord | None:
        """The stored proposal with its approvals and cancel votes, or None."""

    @abstractmethod
    def list_proposals(
        self, include_closed: bool = False, *, limit: int, before: int = 0
    ) -> list[ProposalRecord]:
        """Up to `limit` proposals, newest first, with `seq` below `before` (0: from the
        newest); only PENDING ones unless `include_closed`."""

    @abstractmethod
    def count_proposals(self, include_closed: bool = False, proposer: str = "") -> int:
        """How many proposals are PENDING (all stored ones with `include_closed`); only
        `proposer`'s when given."""

    @abstractmethod
    def due_proposals(
        self, now: int, base_version: int, base_state_hash: bytes, limit: int
    ) -> list[PendingSummary]:
        """Up to `limit` PENDING proposals that expired by `now` or are not for this base
        (stale), oldest first: the ones the sweeper must close."""

    @abstractmethod
    def pending_with_approvals(self, at_least: int, limit: int) -> list[bytes]:
        """The ids of up to `limit` PENDING proposals with at least `at_least` approvals
        stored, oldest first: the only ones that may have a quorum."""

    def set_proposal_state(
        self,
        proposal_id: bytes,
        state: ProposalState,
        detail: str = "",
        applied_version: int = 0,
        *,
        closed_at: int | None = None,
    ) -> bool:
        """Move a PENDING proposal to `state` (or update its detail while PENDING); a final
        state records `closed_at` (unix seconds; None: now).

        Returns False, changing nothing, when the proposal is already closed (final).
        NotFoundError if the proposal is unknown.
        """
        state = ProposalState(state)
        when = timestamp(closed_at) if state.closed else 0
        return self._set_proposal_state(
            proposal_id, StateChange(state, detail, applied_version, when)
        )

    def close_proposals(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        """Move each (id, final state, detail) that is still PENDING to its state, in one
        transaction; the ids it closed (unknown or closed ones are left alone)."""
        when = timestamp(closed_at)
        if not closings:
            return []
        final = [(i, ProposalState(state), detail) for i, state, detail in closings]
        if any(not state.closed for _, state, _ in final):
            raise ValueError("close_proposals takes final states only")
        return self._close_proposals(final, when)

    @abstractmethod
    def purge_closed_proposals(self, closed_before: int, expired_before: int) -> int:
        """Delete the proposals closed before `closed_before` that also expired before
        `expired_before`, with their approvals and votes to cancel; how many."""

    @abstractmethod
    def _put_proposal(self, new: NewProposal, caps: ProposalCaps) -> bool:
        """`put_proposal` with checked arguments."""

    @abstractmethod
    def _add_signed(
        self, kind: Signed, proposal_id: bytes, operator_id: str, signed: bytes
    ) -> bool:
        """`add_approval` or `add_cancel_vote` with checked arguments."""

    @abstractmethod
    def _set_proposal_state(self, proposal_id: bytes, change: StateChange) -> bool:
        """`set_proposal_state` with its closing time decided."""

    @abstractmethod
    def _close_proposals(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        """`close_proposals` with at least one closing, every state final."""

    # --- HSA registry ----------------------------------------------------------------------

    def register_hsa(
        self,
        host_id: str,
        address: str,
        registered_at: int = 0,
        version: int = 0,
        state_hash: bytes = b"",
    ) -> None:
        """Record (or replace) where an HSA listens, when (unix seconds) it said so, and the
        version and state hash it reported with it (`reported_at` becomes `registered_at`, or
        0 with version 0: an HSA that reports no version)."""
        check_report(version, state_hash, registered_at)
        self._register_hsa(
            HsaRecord(
                host_id,
                address,
                registered_at,
                version,
                state_hash,
                registered_at if version else 0,
            )
        )

    def record_hsa_version(
        self, host_id: str, version: int, state_hash: bytes, reported_at: int
    ) -> bool:
        """Record the version an HSA acknowledged (an InstallState answer) at `reported_at`.

        Changes nothing, returning False, for an unregistered host or a version below the
        one recorded, so a late answer to an older push never hides a newer report.
        """
        check_report(version, state_hash, reported_at)
        return self._record_hsa_version(HsaRecord(host_id, "", 0, version, state_hash, reported_at))

    @abstractmethod
    def list_hsas(self) -> list[HsaRecord]:
        """Every registered HSA, by host id."""

    @abstractmethod
    def _register_hsa(self, record: HsaRecord) -> None:
        """Insert or replace the HSA's whole record."""

    @abstractmethod
    def _record_hsa_version(self, report: HsaRecord) -> bool:
        """Raise the registered HSA's version, state hash and report time to `report`'s, if
        its version is not below the recorded one (its address is not used)."""

    # --- audit heads -----------------------------------------------------------------------

    @abstractmethod
    def get_audit_head(self, host_id: str, log: str) -> AuditHeadRecord | None:
        """The stored head of one log of one host, or None."""

    def put_audit_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool:
        """Store `head` for its host and log if the stored checkpoint is still `expected`
        (None: none stored); False, changing nothing, if it changed meanwhile."""
        check_bytes(head.checkpoint, "checkpoint")
        check_report(head.seq, b"", head.reported_at)
        return self._put_audit_head(head, expected)

    @abstractmethod
    def list_audit_heads(self, host_id: str = "") -> list[AuditHeadRecord]:
        """Stored heads by host and log; only `host_id`'s when given."""

    @abstractmethod
    def _put_audit_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool:
        """`put_audit_head` with a checked head."""

    # --- fences and change notices ---------------------------------------------------------

    @abstractmethod
    def get_fences(self) -> FenceRecord:
        """The stored fences and their revision (b"" at revision 0 when never set)."""

    def set_fences(self, value: bytes, expected_revision: int) -> int:
        """Store `value` as the fences if their revision is still `expected_revision` (0: never
        set); returns the new revision. ConflictError, changing nothing, if another writer
        changed them since the caller read them."""
        if not isinstance(value, bytes):
            raise TypeError("fences are bytes")
        check_revision(expected_revision, "expected_revision")
        return self._set_fences(value, expected_revision)

    @abstractmethod
    def _set_fences(self, value: bytes, expected_revision: int) -> int:
        """`set_fences` with checked arguments."""

    @abstractmethod
    def subscribe(
        self,
        on_change: Callable[[ChangeKind], None],
        kinds: Collection[ChangeKind] = ALL_CHANGE_KINDS,
    ) -> Callable[[], None]:
        """Call `on_change(kind)` from a background thread whenever another writer changed the
        `kind` part of the store (one of `kinds`: states, proposals, keys, fences); returns a
        function that ends the subscription. A store that only this coordinator writes never
        calls back. `on_change` must return quickly (re-read later, elsewhere); what it
        raises is logged.
        """

    # --- key records -----------------------------------------------------------------------

    @abstractmethod
    def get_key(self, key_id: str) -> KeyEntry | None:
        """The stored (live) key record and its revision, or None (also for a tombstone)."""

    def put_key(
        self,
        key_id: str,
        record: bytes,
        expected_revision: int,
        *,
        creator: str = "",
        creator_limit: int = 0,
        fences_revision: int | None = None,
    ) -> int:
        """Write a key record with a compare-and-swap; returns the new revision.

        `expected_revision` 0 creates the key (AlreadyExistsError if it exists or has a
        tombstone; ResourceExhaustedError if `creator` has `creator_limit` live keys already,
        when both are given); otherwise it must equal the stored revision (ConflictError if it
        does not, NotFoundError if the key does not exist or was deleted). With
        `fences_revision`, the write happens only if the fences are still at that revision
        (FencesChangedError, checked first, otherwise).
        """
        check_text(key_id, "key_id")
        check_bytes(record, "record")
        if expected_revision < 0:
            raise ValueError("expected_revision is 0 (create) or a stored revision")
        if fences_revision is not None:
            check_revision(fences_revision, "fences_revision")
        return self._put_key(
            KeyEntry(key_id, record, expected_revision), creator, creator_limit, fences_revision
        )

    @abstractmethod
    def list_keys(self, limit: int, after_key_id: str = "") -> list[KeyEntry]:
        """Up to `limit` live key records with ids above `after_key_id`, ordered by key id."""

    @abstractmethod
    def count_keys(self, creator: str) -> int:
        """How many live keys `creator` created."""

    def delete_key(
        self,
        key_id: str,
        expected_revision: int,
        deleted_at: int,
        *,
        fences_revision: int | None = None,
    ) -> None:
        """Make a key record a tombstone (deleted at `deleted_at`, unix seconds) with a
        compare-and-swap on its revision.

        NotFoundError if the key does not exist (or is a tombstone already); ConflictError if
        the stored revision is not `expected_revision` (the record changed since the caller
        read it). With `fences_revision`, only while the fences are at that revision
        (FencesChangedError, checked first, otherwise).
        """
        check_text(key_id, "key_id")
        if expected_revision < 1:
            raise ValueError("expected_revision is the stored revision the caller read")
        if isinstance(deleted_at, bool) or not isinstance(deleted_at, int) or deleted_at < 1:
            raise ValueError("deleted_at is a unix time")
        if fences_revision is not None:
            check_revision(fences_revision, "fences_revision")
        self._delete_key(key_id, expected_revision, deleted_at, fences_revision)

    @abstractmethod
    def deleted_key(self, key_id: str) -> DeletedKey | None:
        """The tombstone of a deleted key, or None (for recovery and for tests)."""

    @abstractmethod
    def purge_deleted_keys(self, deleted_before: int) -> int:
        """Remove the tombstones of keys deleted before `deleted_before`; how many."""

    @abstractmethod
    def _put_key(
        self, entry: KeyEntry, creator: str, creator_limit: int, fences_revision: int | None
    ) -> int:
        """`put_key` with checked arguments; `entry.revision` is the expected revision."""

    @abstractmethod
    def _delete_key(
        self, key_id: str, expected_revision: int, deleted_at: int, fences_revision: int | None
    ) -> None:
        """`delete_key` with checked arguments."""

    # --- backup and restore ----------------------------------------------------------------

    @abstractmethod
    def contents(self) -> StoreCounts:
        """How many items of each kind the store holds (all zero: empty)."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[StoreSnapshot]:
        """A consistent snapshot, streamed while writers go on (`snapshots.StoreSnapshot`)."""

    def load_snapshot(self, items: Iterable[SnapshotItem]) -> StoreCounts:
        """Load a snapshot's items into this empty store, all or nothing (FailedPrecondition
        naming what is there if it is not empty); what was loaded. See `snapshots`."""
        from domain_coordinator.snapshots import checked_items  # it imports this module

        return self._load_snapshot(checked_items(items))

    @abstractmethod
    def _load_snapshot(self, items: Iterator[SnapshotItem]) -> StoreCounts:
        """`load_snapshot` with checked items: refuse a non-empty store inside the same write
        (`snapshots.refuse_unless_empty`), restore revisions, states, closing times and
        tombstones exactly, keep the arrival order of proposals; roll back if `items` raises."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources; later calls are programming errors."""
