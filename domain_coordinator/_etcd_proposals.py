"""Writing proposals in the etcd store: insert within the caps, sign, move between states, purge.

Invariants (on top of `_etcd_proposal_keys`):
- each write is one transaction that compares what it read: the proposal's status (its
  mod revision), and the guard whenever it changes which proposals are pending or stored, so
  the caps and the counts are checked against what holds when the write commits; a lost race
  is read again and retried (`_etcd_layout.cas`);
- an insert stores the proposal, its first approvals, its index entries, the new counts and
  the purges that make room for it in one transaction, or nothing;
- a signature is stored only if that operator has none on that proposal yet (its key absent);
- a closed proposal is never reopened or moved to another final state, except by the state
  that applies it (`applied`, as the SQLite store does);
- the sweeper's batches (closings, purges) are split into transactions of a few proposals each
  (etcd bounds the operations of one transaction): each proposal's change is atomic, a batch
  as a whole is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from domain_coordinator._etcd_layout import (
    RETRY,
    Retry,
    cas,
    encode,
    first,
    number,
    won,
    write_id,
)
from domain_coordinator._etcd_proposal_keys import (
    PENDING,
    Counts,
    Facts,
    ProposalKeys,
    index_changes,
)
from domain_coordinator.store import NewProposal, ProposalCaps, ProposalState, Signed, StateChange
from domain_core.errors import NotFoundError, ResourceExhaustedError
from domain_edge.etcd import Compare, EtcdClient, KeyValue, Operation, Put, Range, TxnResult

# Proposals per transaction in the sweeper's batches: about 10 operations each, within etcd's
# default of 128 per transaction.
_BATCH: Final = 10


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class Transition:
    """What moving stored proposals to new statuses takes: comparisons and operations."""

    compare: list[Compare]
    operations: list[Operation]


class ProposalWrites:
    """The write side of proposals in the etcd store."""

    def __init__(self, client: EtcdClient, keys: ProposalKeys, note: Callable[[int], None]):
        self.client = client
        self.keys = keys
        self._note = note  # told the revision of every write this store made

    def _txn(
        self, compare: list[Compare], success: list[Operation], failure: Sequence[Operation]
    ) -> TxnResult:
        result = self.client.txn(compare, success, failure, retry_safe=True)
        if result.succeeded:
            self._note(result.revision)
        return result

    # --- insert ---------------------------------------------------------------------------

    def insert(self, new: NewProposal, caps: ProposalCaps) -> bool:
        return cas("storing a proposal", lambda: self._insert(new, caps))

    def _insert(self, new: NewProposal, caps: ProposalCaps) -> bool | Retry:
        keys, proposer = self.keys, new.proposer
        reads = [Range(keys.rec(new.proposal_id)), Range(keys.guard)]
        if proposer:
            reads.append(Range(keys.counter(proposer)))
        found = self.client.snapshot(reads)
        if found[0].kvs:
            return False
        guard_kv = found[1].first()
        guard = Counts.of(guard_kv)
        own = Counts.of(found[2].first()) if proposer else Counts()
        _check_caps(guard, own, caps, proposer)
        doomed = self._make_room(own, caps, proposer, found[1].revision)
        w = write_id()
        seq = guard.seq + 1
        status = {"state": PENDING, "detail": "", "applied_version": 0, "closed_at": 0}
        status.update(approvals=len(new.approvals), w=w)
        facts = Facts(
            new.proposal_id,
            seq,
            proposer,
            new.expires_at,
            new.base_version,
            new.base_state_hash,
            status,
        )
        rec = {
            "created_at": new.created_at,
            "expires_at": new.expires_at,
            "proposer": proposer,
            "base_version": new.base_version,
            "base_hash": new.base_state_hash.hex(),
            "seq": seq,
            "w": w,
        }
        ops: list[Operation] = [
            Put(keys.rec(new.proposal_id), encode(rec, new.proposal)),
            Put(keys.status(new.proposal_id), encode(status)),
        ]
        ops += [
            Put(keys.signature("approval", new.proposal_id, operator), encode({"i": i}, signed))
            for i, (operator, signed) in enumerate(new.approvals)
        ]
        ops += [Put(key, value) for key, value in keys.entries(facts, status).items()]
        for old in doomed:
            ops += keys.purge(old)
        ops.append(
            Put(
                keys.guard,
                Counts(guard.pending + 1, guard.stored + 1 - len(doomed), seq).value(True),
            )
        )
        if proposer:
            ops.append(Put(keys.counter(proposer), own.plus(1, 1 - len(doomed)).value(False)))
        compare = [Compare.absent(keys.rec(new.proposal_id)), _same(keys.guard, guard_kv)]
        result = self._txn(compare, ops, [Range(keys.rec(new.proposal_id))])
        if won(result, 0, w):
            return True
        return False if first(result.results[0]) is not None else RETRY

    def _make_room(
        self, own: Counts, caps: ProposalCaps, proposer: str, revision: int
    ) -> list[Facts]:
        """The proposer's oldest closed proposals that expired before `caps.now`, as many as
        must go for one more to fit under `max_stored_per_proposer`; ResourceExhaustedError if
        too few can."""
        most = caps.max_stored_per_proposer
        excess = own.stored - most + 1 if most and proposer else 0
        if excess <= 0:
            return []
        [closed] = self.client.snapshot(
            [Range.prefix(self.keys.proposer_closed(proposer))], revision=revision
        )
        doomed = [
            facts
            for facts in (Facts.closed(kv, proposer) for kv in closed.kvs)
            if facts.expires_at < caps.now
        ][:excess]
        if len(doomed) < excess:
            raise ResourceExhaustedError(
                f"you have {own.stored} proposals at this coordinator, the most one operator "
                f"may keep ({most}), and too few of them are closed and expired to make room: "
                "wait for some to expire"
            )
        return doomed

    # --- signatures -----------------------------------------------------------------------

    def add_signed(self, kind: Signed, pid: bytes, operator_id: str, signed: bytes) -> bool:
        return cas("storing a signature", lambda: self._add_signed(kind, pid, operator_id, signed))

    def _add_signed(
        self, kind: Signed, pid: bytes, operator_id: str, signed: bytes
    ) -> bool | Retry:
        keys = self.keys
        name = "approval" if kind is Signed.APPROVAL else "vote"
        key = keys.signature(name, pid, operator_id)
        rec, status_kv, existing = self.client.snapshot(
            [Range(keys.rec(pid)), Range(keys.status(pid)), Range(key)]
        )
        if rec.first() is None or status_kv.first() is None:
            raise NotFoundError(f"no proposal {pid.hex()} in the store")
        if existing.kvs:
            return False
        status_entry = status_kv.kvs[0]
        w = write_id()
        ops: list[Operation] = [Put(key, encode({"i": 0, "w": w}, signed))]
        if kind is Signed.APPROVAL:
            facts = Facts.of(pid, rec.kvs[0], status_entry)
            after = {**facts.status, "approvals": int(facts.status["approvals"]) + 1}
            ops.append(Put(keys.status(pid), encode(after)))
            ops += index_changes(keys.entries(facts, facts.status), keys.entries(facts, after))
        compare = [Compare.absent(key), _same(keys.status(pid), status_entry)]
        result = self._txn(compare, ops, [Range(key)])
        if won(result, 0, w):
            return True
        return False if first(result.results[0]) is not None else RETRY

    # --- states -----------------------------------------------------------------------------

    def _facts(self, pids: Sequence[bytes]) -> tuple[KeyValue | None, dict[bytes, Facts], int]:
        """The guard, the stored proposals among `pids` (their facts), and the revision read."""
        reads = [Range(self.keys.guard)]
        for pid in pids:
            reads += [Range(self.keys.rec(pid)), Range(self.keys.status(pid))]
        found = self.client.snapshot(reads)
        facts: dict[bytes, Facts] = {}
        for index, pid in enumerate(pids):
            rec, status = found[1 + 2 * index].first(), found[2 + 2 * index].first()
            if rec is not None and status is not None:
                facts[pid] = Facts.of(pid, rec, status)
        return found[0].first(), facts, found[0].revision

    def transition(
        self,
        moves: Sequence[tuple[Facts, dict[str, Any]]],
        guard_kv: KeyValue | None,
        revision: int,
    ) -> Transition:
        """Move each (facts, new status): the statuses, index entries and counts, compared
        against what was read: the statuses, and the guard whenever a state or a closing time
        changes (so that an insert's purge to make room, or a purge, which read the closed
        proposals' index entries under the guard, never works on moved ones)."""
        keys = self.keys
        compare: list[Compare] = []
        ops: list[Operation] = []
        pending_delta: dict[str, int] = {}
        moved = False
        for facts, after in moves:
            before = facts.status
            compare.append(Compare.mod_revision(keys.status(facts.pid), facts.status_revision))
            ops.append(Put(keys.status(facts.pid), encode(after)))
            ops += index_changes(keys.entries(facts, before), keys.entries(facts, after))
            moved |= (before["state"], before["closed_at"]) != (after["state"], after["closed_at"])
            delta = int(after["state"] == PENDING) - int(before["state"] == PENDING)
            if delta:
                pending_delta[facts.proposer] = pending_delta.get(facts.proposer, 0) + delta
        if moved:
            compare.append(_same(keys.guard, guard_kv))
            guard = Counts.of(guard_kv)
            ops.append(Put(keys.guard, guard.plus(sum(pending_delta.values()), 0).value(True)))
            ops += self._proposer_counts(
                {p: (d, 0) for p, d in pending_delta.items() if p}, revision
            )
        return Transition(compare, ops)

    def _proposer_counts(
        self, deltas: dict[str, tuple[int, int]], revision: int
    ) -> list[Operation]:
        """Writes of the proposers' counts changed by (pending, stored) deltas, from their
        values at `revision` (the guard, compared by the caller, covers them)."""
        if not deltas:
            return []
        names = sorted(deltas)
        found = self.client.snapshot(
            [Range(self.keys.counter(p)) for p in names], revision=revision
        )
        return [
            Put(self.keys.counter(p), Counts.of(r.first()).plus(*deltas[p]).value(False))
            for p, r in zip(names, found, strict=True)
        ]

    def set_state(self, pid: bytes, change: StateChange) -> bool:
        return cas("changing a proposal", lambda: self._set_state(pid, change))

    def _set_state(self, pid: bytes, change: StateChange) -> bool | Retry:
        guard_kv, facts, revision = self._facts([pid])
        if pid not in facts:
            raise NotFoundError(f"no proposal {pid.hex()} in the store")
        current = facts[pid]
        if not current.pending:
            return False
        w = write_id()
        after = {
            **current.status,
            "state": change.state.value,
            "detail": change.detail,
            "applied_version": change.applied_version,
            "closed_at": change.closed_at,
            "w": w,
        }
        move = self.transition([(current, after)], guard_kv, revision)
        result = self._txn(move.compare, move.operations, [Range(self.keys.status(pid))])
        return True if won(result, 0, w) else RETRY

    def applied(self, pid: bytes, version: int, closed_at: int, w: str) -> Transition:
        """The move of proposal `pid` to APPLIED at `version` (from any state, as the state
        that applies it is stored in the same transaction); NotFoundError if unknown."""
        guard_kv, facts, revision = self._facts([pid])
        if pid not in facts:
            raise NotFoundError(f"no proposal {pid.hex()} in the store")
        current = facts[pid]
        after = {
            **current.status,
            "state": ProposalState.APPLIED.value,
            "detail": "",
            "applied_version": version,
            "closed_at": closed_at,
            "w": w,
        }
        return self.transition([(current, after)], guard_kv, revision)

    def close(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        closed: list[bytes] = []
        for chunk in _chunks(closings, _BATCH):
            closed += cas("closing proposals", self._closing(chunk, closed_at))
        return closed

    def _closing(
        self, chunk: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> Callable[[], list[bytes] | Retry]:
        return lambda: self._close(chunk, closed_at)

    def _close(
        self, chunk: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes] | Retry:
        wanted = {pid: (state, detail) for pid, state, detail in reversed(chunk)}
        guard_kv, facts, revision = self._facts(list(wanted))
        w = write_id()
        moves = []
        for pid, (state, detail) in wanted.items():
            current = facts.get(pid)
            if current is None or not current.pending:
                continue
            after = dict(current.status)
            after.update(state=state.value, detail=detail, closed_at=closed_at, w=w)
            moves.append((current, after))
        if not moves:
            return []
        move = self.transition(moves, guard_kv, revision)
        statuses = [Range(self.keys.status(f.pid)) for f, _ in moves]
        result = self._txn(move.compare, move.operations, statuses)
        if not result.succeeded and not (
            result.uncertain and all(won(result, i, w) for i in range(len(moves)))
        ):
            return RETRY
        done = {f.pid for f, _ in moves}
        return [pid for pid, _, _ in chunk if pid in done]

    # --- purges -----------------------------------------------------------------------------

    def purge(self, closed_before: int, expired_before: int) -> int:
        keys = self.keys
        found = self.client.range(Range(keys.closed, keys.closed + number(closed_before)))
        marks = [Facts.closed(kv, "") for kv in found.kvs]
        doomed = [m.pid for m in marks if m.expires_at < expired_before]
        purged = 0
        for chunk in _chunks(doomed, _BATCH):
            purged += cas("purging proposals", self._purging(chunk, closed_before, expired_before))
        return purged

    def _purging(
        self, chunk: Sequence[bytes], closed_before: int, expired_before: int
    ) -> Callable[[], int | Retry]:
        return lambda: self._purge(chunk, closed_before, expired_before)

    def _purge(
        self, chunk: Sequence[bytes], closed_before: int, expired_before: int
    ) -> int | Retry:
        """Purge those of `chunk` that are (still) closed before `closed_before` and expired
        before `expired_before`, as read now, with their signatures and index entries."""
        guard_kv, facts, revision = self._facts(chunk)
        present = [
            f
            for f in facts.values()
            if not f.pending
            and 0 < int(f.status["closed_at"]) < closed_before
            and f.expires_at < expired_before
        ]
        if not present:
            return 0
        compare = [_same(self.keys.guard, guard_kv)]
        ops: list[Operation] = []
        stored: dict[str, int] = {}
        for old in present:
            compare.append(Compare.mod_revision(self.keys.status(old.pid), old.status_revision))
            ops += self.keys.purge(old)
            if old.proposer:
                stored[old.proposer] = stored.get(old.proposer, 0) - 1
        ops.append(Put(self.keys.guard, Counts.of(guard_kv).plus(0, -len(present)).value(True)))
        ops += self._proposer_counts({p: (0, d) for p, d in stored.items()}, revision)
        result = self._txn(compare, ops, [Range(self.keys.status(f.pid)) for f in present])
        if result.succeeded:
            return len(present)
        if result.uncertain and all(first(r) is None for r in result.results):
            return len(present)  # gone: our lost attempt (or a concurrent purge) took them
        return RETRY


def _same(key: bytes, read: KeyValue | None) -> Compare:
    """`key` is as it was read (absent if it was absent)."""
    return Compare.mod_revision(key, read.mod_revision if read is not None else 0)


def _check_caps(guard: Counts, own: Counts, caps: ProposalCaps, proposer: str) -> None:
    if caps.max_pending and guard.pending >= caps.max_pending:
        raise ResourceExhaustedError(
            f"{guard.pending} proposals are pending already, the most this coordinator "
            f"keeps ({caps.max_pending}); approve, cancel or let some expire first"
        )
    if caps.max_pending_per_proposer and proposer and own.pending >= caps.max_pending_per_proposer:
        raise ResourceExhaustedError(
            f"you have {own.pending} pending proposals already, the most one operator may "
            f"have ({caps.max_pending_per_proposer}); cancel some of yours (or wait for "
            "them to be applied or to expire) first"
        )
