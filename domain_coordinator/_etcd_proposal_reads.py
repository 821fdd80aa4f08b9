"""Reading proposals from the etcd store: one, a page, the counts, and the sweeper's questions.

Invariants: every answer is one consistent view (the reads of one answer are made at one etcd
revision); counting reads one counter; listing a page reads `limit` index entries and then only
those proposals; "which are due" and "which may have a quorum" read index entries (a summary
each, or only keys), oldest first, never a proposal's bytes (see `_etcd_proposal_keys`).
"""

from __future__ import annotations

from collections.abc import Sequence

from domain_coordinator._etcd_layout import decode, number
from domain_coordinator._etcd_proposal_keys import Counts, ProposalKeys
from domain_coordinator.store import PendingSummary, ProposalRecord, ProposalState
from domain_edge.etcd import EtcdClient, KeyValue, Range, RangeResult, SortBy, prefix_end


def _signatures(result: RangeResult) -> tuple[bytes, ...]:
    """Signatures in arrival order: by the revision that stored them, then by their place in
    that transaction (initial approvals share one)."""
    ordered = sorted(result.kvs, key=lambda kv: (kv.create_revision, decode(kv.value)[0]["i"]))
    return tuple(decode(kv.value)[1] for kv in ordered)


class ProposalReads:
    """The read side of proposals in the etcd store."""

    def __init__(self, client: EtcdClient, keys: ProposalKeys) -> None:
        self.client = client
        self.keys = keys

    def _reads(self, pid: bytes) -> list[Range]:
        keys = self.keys
        return [
            Range(keys.rec(pid)),
            Range(keys.status(pid)),
            Range.prefix(keys.signatures("approval", pid)),
            Range.prefix(keys.signatures("vote", pid)),
        ]

    @staticmethod
    def _record(pid: bytes, found: Sequence[RangeResult]) -> ProposalRecord | None:
        rec, status = found[0].first(), found[1].first()
        if rec is None or status is None:
            return None
        fields, proposal = decode(rec.value)
        state, _ = decode(status.value)
        return ProposalRecord(
            proposal_id=pid,
            proposal=proposal,
            approvals=_signatures(found[2]),
            state=ProposalState(state["state"]),
            detail=str(state["detail"]),
            applied_version=int(state["applied_version"]),
            created_at=int(fields["created_at"]),
            expires_at=int(fields["expires_at"]),
            cancel_votes=_signatures(found[3]),
            seq=int(fields["seq"]),
            proposer=str(fields["proposer"]),
            base_version=int(fields["base_version"]),
            base_state_hash=bytes.fromhex(fields["base_hash"]),
            closed_at=int(state["closed_at"]),
        )

    def get(self, pid: bytes) -> ProposalRecord | None:
        return self._record(pid, self.client.snapshot(self._reads(pid)))

    def page(self, include_closed: bool, limit: int, before: int) -> list[ProposalRecord]:
        index = self.keys.all if include_closed else self.keys.pending
        end = index + number(before) if before > 0 else prefix_end(index)
        found = self.client.range(Range(index, end, limit=limit, descending=True))
        pids = [bytes.fromhex(kv.value.decode()) for kv in found.kvs]
        reads = [r for pid in pids for r in self._reads(pid)]
        results = self.client.snapshot(reads, revision=found.revision)
        records = (self._record(pid, results[4 * i : 4 * i + 4]) for i, pid in enumerate(pids))
        return [r for r in records if r is not None]

    def count(self, include_closed: bool, proposer: str) -> int:
        key = self.keys.counter(proposer) if proposer else self.keys.guard
        counts = Counts.of(self.client.get(key))
        return counts.stored if include_closed else counts.pending

    def due(
        self, now: int, base_version: int, base_state_hash: bytes, limit: int
    ) -> list[PendingSummary]:
        keys = self.keys
        here, this = keys.base_of(base_version), keys.base_of(base_version, base_state_hash)
        spans = [
            (keys.expiry, keys.expiry + number(now + 1)),  # expired by now
            (keys.base, keys.base + number(base_version)),  # an older base
            (keys.base + number(base_version + 1), prefix_end(keys.base)),  # a newer one
            (here, this),  # this version, another history (below this hash) ...
            (prefix_end(this), prefix_end(here)),  # ... or above it
        ]
        # Index entries are created in seq order: the `limit` oldest of each span by creation
        # are enough to find the `limit` oldest of them all.
        reads = [Range(start, end, limit=limit, sort_by=SortBy.CREATE) for start, end in spans]
        found: dict[int, PendingSummary] = {}
        for result in self.client.snapshot(reads):
            for kv in result.kvs:
                fields, _ = decode(kv.value)
                found[int(fields["seq"])] = PendingSummary(
                    bytes.fromhex(fields["id"]),
                    int(fields["expires_at"]),
                    int(fields["base_version"]),
                    bytes.fromhex(fields["base_hash"]),
                )
        return [found[seq] for seq in sorted(found)[:limit]]

    def with_approvals(self, at_least: int, limit: int) -> list[bytes]:
        start = self.keys.quorate + number(max(at_least, 0))
        found = self.client.range(Range(start, prefix_end(self.keys.quorate), keys_only=True))
        entries = sorted(_quorate_entry(kv) for kv in found.kvs)
        return [pid for _, pid in entries[:limit]]


def _quorate_entry(kv: KeyValue) -> tuple[int, bytes]:
    """(seq, pid) of a `quorate/{approvals}/{seq}/{pid}` key."""
    _, seq, pid = kv.key.rsplit(b"/", 2)
    return int(seq), bytes.fromhex(pid.decode())
