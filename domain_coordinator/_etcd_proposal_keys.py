"""The keys of proposals in the etcd store, and the indexes that answer the store's questions.

Under `P/proposals/` (P the store's prefix; `{pid}` a proposal id in hex, `{n:020}` numbers
zero-padded):

| key | value | kept while |
| --- | --- | --- |
| `rec/{pid}` | the proposal's bytes, its fields and `seq` (never changed) | stored |
| `status/{pid}` | state, detail, applied version, closing time, approvals stored | stored |
| `approval/{pid}/{hex operator}`, `vote/{pid}/{hex operator}` | one signature each | stored |
| `guard` | the last `seq`, how many are pending, how many stored | always |
| `proposer/p{hex proposer}/count` | that proposer's pending and stored counts | always |
| `all/{seq:020}` | pid | stored |
| `pending/{seq:020}` | pid | pending |
| `expiry/{expires_at:020}/{seq:020}` | summary | pending |
| `base/{base version:020}/{hex base hash}/{seq:020}` | summary | pending |
| `quorate/{approvals:020}/{seq:020}/{pid}` | empty | pending |
| `closed/{closed_at:020}/{seq:020}` | pid, expiry, proposer | closed |
| `proposer/p{hex proposer}/closed/{closed_at:020}/{seq:020}` | pid, expiry | closed |

`seq` is the order of arrival: the guard's last seq + 1, taken in the insert's transaction,
which compares the guard, so seqs are unique and grow with etcd's revisions (an index entry's
creation order is its seq order). Every transaction that changes which proposals are pending or
stored, or a count, rewrites the guard and compares its revision: the counts in the guard and in
the proposer keys are exact, and a cap checked against them holds at commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from domain_coordinator._etcd_layout import Layout, decode, encode, hexed, number
from domain_coordinator.store import ProposalState
from domain_edge.etcd import Delete, KeyValue, Operation, Put

PENDING = ProposalState.PENDING.value


@dataclass(frozen=True)
class Counts:
    """A guard's or a proposer's counts."""

    pending: int = 0
    stored: int = 0
    seq: int = 0

    @classmethod
    def of(cls, kv: KeyValue | None) -> Counts:
        if kv is None:
            return cls()
        fields, _ = decode(kv.value)
        return cls(int(fields["pending"]), int(fields["stored"]), int(fields.get("seq", 0)))

    def value(self, with_seq: bool) -> bytes:
        fields = {"pending": self.pending, "stored": self.stored}
        if with_seq:
            fields["seq"] = self.seq
        return encode(fields)

    def plus(self, pending: int, stored: int) -> Counts:
        return Counts(self.pending + pending, self.stored + stored, self.seq)


@dataclass(frozen=True)
class Facts:
    """A stored proposal's fixed fields (from `rec`) and its status fields."""

    pid: bytes
    seq: int
    proposer: str
    expires_at: int
    base_version: int
    base_hash: bytes
    status: dict[str, Any]
    status_revision: int = 0  # the status key's mod revision when read (0: not read)

    @property
    def pending(self) -> bool:
        return bool(self.status["state"] == PENDING)

    @classmethod
    def closed(cls, mark: KeyValue, proposer: str) -> Facts:
        """A closed proposal's facts from its `closed` index entry (enough to purge it)."""
        fields, _ = decode(mark.value)
        closed_at = int(mark.key.rsplit(b"/", 2)[-2])
        return cls(
            bytes.fromhex(fields["id"]),
            int(fields["seq"]),
            str(fields.get("proposer", proposer)),
            int(fields["expires_at"]),
            0,
            b"",
            {"state": "closed", "closed_at": closed_at},
        )

    @classmethod
    def of(cls, pid: bytes, rec: KeyValue, status: KeyValue) -> Facts:
        fields, _ = decode(rec.value)
        state, _ = decode(status.value)
        return cls(
            pid,
            int(fields["seq"]),
            str(fields["proposer"]),
            int(fields["expires_at"]),
            int(fields["base_version"]),
            bytes.fromhex(fields["base_hash"]),
            state,
            status.mod_revision,
        )


class ProposalKeys:
    """The keys of proposals under one store prefix."""

    def __init__(self, layout: Layout) -> None:
        root = layout.proposals
        self.root = root
        self.guard = root + b"guard"
        self.records = root + b"rec/"
        self.statuses = root + b"status/"
        self.approvals = root + b"approval/"
        self.votes = root + b"vote/"
        self.all = root + b"all/"
        self.pending = root + b"pending/"
        self.expiry = root + b"expiry/"
        self.base = root + b"base/"
        self.quorate = root + b"quorate/"
        self.closed = root + b"closed/"
        self._proposer = root + b"proposer/"

    def rec(self, pid: bytes) -> bytes:
        return self.records + pid.hex().encode()

    def status(self, pid: bytes) -> bytes:
        return self.statuses + pid.hex().encode()

    def signatures(self, kind: str, pid: bytes) -> bytes:
        """The prefix of a proposal's approvals (`kind` "approval") or votes ("vote")."""
        return (self.approvals if kind == "approval" else self.votes) + pid.hex().encode() + b"/"

    def signature(self, kind: str, pid: bytes, operator_id: str) -> bytes:
        return self.signatures(kind, pid) + hexed(operator_id)

    def counter(self, proposer: str) -> bytes:
        return self.proposer_root(proposer) + b"count"

    def proposer_root(self, proposer: str) -> bytes:
        return self._proposer + b"p" + hexed(proposer) + b"/"

    def proposer_closed(self, proposer: str) -> bytes:
        return self.proposer_root(proposer) + b"closed/"

    def base_of(self, version: int, state_hash: bytes | None = None) -> bytes:
        """The base index's prefix of one version (and one hash)."""
        prefix = self.base + number(version) + b"/"
        return prefix if state_hash is None else prefix + state_hash.hex().encode() + b"/"

    def entries(self, facts: Facts, status: dict[str, Any]) -> dict[bytes, bytes]:
        """The index entries of a proposal with these facts, in this status."""
        pid, seq = facts.pid.hex(), number(facts.seq)
        found = {self.all + seq: pid.encode()}
        if status["state"] == PENDING:
            summary = encode(
                {
                    "id": pid,
                    "seq": facts.seq,
                    "expires_at": facts.expires_at,
                    "base_version": facts.base_version,
                    "base_hash": facts.base_hash.hex(),
                }
            )
            found[self.pending + seq] = pid.encode()
            found[self.expiry + number(facts.expires_at) + b"/" + seq] = summary
            found[self.base_of(facts.base_version, facts.base_hash) + seq] = summary
            found[self.quorate + number(status["approvals"]) + b"/" + seq + b"/" + pid.encode()] = (
                b""
            )
        else:
            closed_at = number(status["closed_at"]) + b"/" + seq
            mark = {"id": pid, "seq": facts.seq, "expires_at": facts.expires_at}
            found[self.closed + closed_at] = encode({**mark, "proposer": facts.proposer})
            if facts.proposer:
                found[self.proposer_closed(facts.proposer) + closed_at] = encode(mark)
        return found

    def purge(self, facts: Facts) -> list[Operation]:
        """Delete a closed proposal: its record, status, signatures and index entries."""
        operations: list[Operation] = [
            Delete(self.rec(facts.pid)),
            Delete(self.status(facts.pid)),
            Delete.prefix(self.signatures("approval", facts.pid)),
            Delete.prefix(self.signatures("vote", facts.pid)),
        ]
        operations += [Delete(key) for key in self.entries(facts, facts.status)]
        return operations


def index_changes(before: dict[bytes, bytes], after: dict[bytes, bytes]) -> list[Operation]:
    """The deletions and writes that turn the entries `before` into `after`."""
    changes: list[Operation] = [Delete(key) for key in before if key not in after]
    changes += [Put(key, value) for key, value in after.items() if before.get(key) != value]
    return changes
