"""Snapshots of the etcd store: what it holds, counted, and every part of it read at one etcd
revision, a page at a time.

Invariants:
- a snapshot fixes one etcd revision R with its first read (every count and the newest state,
  in one read-only transaction), and reads every later page at R (`Range.revision`): what
  other writers (coordinator replicas) commit meanwhile is not in it, and no part of it comes
  from another revision;
- every part is read in pages (a range at R with a `limit`, the next one starting after the
  last key read), each holding at most as many items as the largest item of its kind fits in
  about `PAGE_BYTES`: a prefix is never held in memory whole;
- items come in snapshot order (`snapshots`): states by version (their keys sort as the
  numbers do), proposals by `seq` (the `all/{seq}` index), key records by key id with the live
  and the deleted ones merged as their pages come (both sorted by the hex of the id, which
  sorts as the id's UTF-8 bytes do), HSAs by host id, audit heads by host id, then log;
  a proposal's approvals and votes come in arrival order (by the revision that stored them,
  then by their place `i` in that transaction, as `_etcd_proposal_reads` orders them);
- if etcd compacts R away before the snapshot was read whole, the next read fails with a
  ConflictError saying to take the snapshot again: a snapshot never goes on at another
  revision, so it never mixes two points in time.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Final

from domain_coordinator._etcd_layout import Layout, decode, head_record, hsa_record, unhexed
from domain_coordinator._etcd_proposal_keys import ProposalKeys
from domain_coordinator.snapshots import (
    SnapshotKey,
    SnapshotProposal,
    SnapshotState,
    StoreCounts,
    StoreSnapshot,
)
from domain_coordinator.store import AuditHeadRecord, HsaRecord, ProposalState
from domain_core.errors import ConflictError
from domain_core.limits import MAX_KEY_RECORD_BYTES, Limits
from domain_edge.etcd import CompactedError, EtcdClient, KeyValue, Range, RangeResult, prefix_end

# About how much one page of a snapshot may hold, at worst.
PAGE_BYTES: Final = 16 * 1024 * 1024
# Items per page, by the largest item of each kind: a state (up to the message limit), a key
# record, a proposal (its bytes, its status and its signatures: four reads each), the small
# registrations and audit heads.
STATE_PAGE: Final = max(1, PAGE_BYTES // Limits().max_message_bytes)
KEY_PAGE: Final = max(1, PAGE_BYTES // MAX_KEY_RECORD_BYTES)
PROPOSAL_PAGE: Final = 32
SMALL_PAGE: Final = 256


def _counted(layout: Layout, keys: ProposalKeys) -> list[Range]:
    """The count-only reads of every kind, in `StoreCounts` order."""
    return [
        Range.prefix(prefix, count_only=True)
        for prefix in (
            layout.states,
            keys.all,
            keys.approvals,
            keys.votes,
            layout.live,
            layout.dead,
            layout.hsas,
            layout.audit,
        )
    ]


def _counts(found: Sequence[RangeResult]) -> StoreCounts:
    return StoreCounts(*(result.count for result in found))


def count_contents(client: EtcdClient, layout: Layout, keys: ProposalKeys) -> StoreCounts:
    """How many items of each kind the store holds (read at one revision)."""
    return _counts(client.snapshot(_counted(layout, keys)))


class EtcdSnapshot(StoreSnapshot):
    """The store as it was at one etcd revision (see the module invariants)."""

    def __init__(self, client: EtcdClient, layout: Layout, keys: ProposalKeys) -> None:
        self._client = client
        self._layout = layout
        self._keys = keys
        states = layout.states
        newest = Range(states, prefix_end(states), limit=1, descending=True)
        found = client.snapshot([*_counted(layout, keys), newest])  # one transaction
        self.revision = found[0].revision
        last = found[-1].first()
        super().__init__(_counts(found[:-1]), last.value if last is not None else None)

    def _read(self, reads: Sequence[Range]) -> tuple[RangeResult, ...]:
        """`reads` at the snapshot's revision; ConflictError if etcd compacted it meanwhile."""
        try:
            return self._client.snapshot(reads, revision=self.revision)
        except CompactedError:
            raise ConflictError(
                f"etcd compacted its history past revision {self.revision}, the point in time "
                "of this snapshot, before the snapshot was read whole (etcd keeps old revisions "
                "only until its next compaction): nothing was kept of it; take the backup (or "
                "the migration) again, and if this repeats, make etcd's "
                "--auto-compaction-retention longer than a backup takes"
            ) from None

    def _pages(self, prefix: bytes, page: int) -> Iterator[tuple[KeyValue, ...]]:
        """The keys under `prefix` at the snapshot's revision, `page` at a time."""
        start, end = prefix, prefix_end(prefix)
        while True:
            [found] = self._read([Range(start, end, limit=page)])
            if found.kvs:
                yield found.kvs
            if not found.more or not found.kvs:
                return
            start = found.kvs[-1].key + b"\0"

    def _each(self, prefix: bytes, page: int) -> Iterator[KeyValue]:
        for kvs in self._pages(prefix, page):
            yield from kvs

    def states(self) -> Iterator[SnapshotState]:
        states = self._layout.states
        for kv in self._each(states, STATE_PAGE):
            yield SnapshotState(int(kv.key[len(states) :]), kv.value)

    def proposals(self) -> Iterator[SnapshotProposal]:
        for entries in self._pages(self._keys.all, PROPOSAL_PAGE):
            pids = [bytes.fromhex(kv.value.decode()) for kv in entries]
            reads = [read for pid in pids for read in self._proposal_reads(pid)]
            found = self._read(reads)
            for index, pid in enumerate(pids):
                yield self._proposal(pid, found[4 * index : 4 * index + 4])

    def _proposal_reads(self, pid: bytes) -> list[Range]:
        keys = self._keys
        return [
            Range(keys.rec(pid)),
            Range(keys.status(pid)),
            Range.prefix(keys.signatures("approval", pid)),
            Range.prefix(keys.signatures("vote", pid)),
        ]

    def _proposal(self, pid: bytes, found: Sequence[RangeResult]) -> SnapshotProposal:
        rec, status = found[0].first(), found[1].first()
        if rec is None or status is None:
            raise RuntimeError(
                f"the etcd store indexes proposal {pid.hex()} but does not hold it: the store "
                "is damaged (was its prefix changed by another program?)"
            )
        fields, proposal = decode(rec.value)
        state, _ = decode(status.value)
        return SnapshotProposal(
            proposal_id=pid,
            proposal=proposal,
            state=ProposalState(state["state"]).value,
            detail=str(state["detail"]),
            applied_version=int(state["applied_version"]),
            created_at=int(fields["created_at"]),
            expires_at=int(fields["expires_at"]),
            closed_at=int(state["closed_at"]),
            seq=int(fields["seq"]),
            proposer=str(fields["proposer"]),
            base_version=int(fields["base_version"]),
            base_state_hash=bytes.fromhex(fields["base_hash"]),
            approvals=self._signed(self._keys.signatures("approval", pid), found[2]),
            cancel_votes=self._signed(self._keys.signatures("vote", pid), found[3]),
        )

    @staticmethod
    def _signed(prefix: bytes, found: RangeResult) -> tuple[tuple[str, bytes], ...]:
        """(operator id, signature) in arrival order."""
        decoded = [(kv, *decode(kv.value)) for kv in found.kvs]
        decoded.sort(key=lambda one: (one[0].create_revision, int(one[1]["i"])))
        return tuple((unhexed(kv.key[len(prefix) :]), signed) for kv, _, signed in decoded)

    def keys(self) -> Iterator[SnapshotKey]:
        layout = self._layout
        live = ((kv.key[len(layout.live) :], kv, False) for kv in self._each(layout.live, KEY_PAGE))
        dead = ((kv.key[len(layout.dead) :], kv, True) for kv in self._each(layout.dead, KEY_PAGE))
        for hex_id, kv, deleted in heapq.merge(live, dead, key=lambda entry: entry[0]):
            fields, record = decode(kv.value)
            yield SnapshotKey(
                key_id=unhexed(hex_id),
                record=record,
                revision=int(fields["revision"]),
                creator=str(fields["creator"]),
                deleted_at=int(fields["deleted_at"]) if deleted else 0,
            )

    def hsas(self) -> Iterator[HsaRecord]:
        hsas = self._layout.hsas
        for kv in self._each(hsas, SMALL_PAGE):
            yield hsa_record(unhexed(kv.key[len(hsas) :]), kv.value)

    def audit_heads(self) -> Iterator[AuditHeadRecord]:
        audit = self._layout.audit
        for kv in self._each(audit, SMALL_PAGE):
            host, log = kv.key[len(audit) :].split(b"/", 1)
            yield head_record(unhexed(host), unhexed(log), kv.value)
