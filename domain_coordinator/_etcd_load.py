"""Loading a snapshot into an empty prefix of etcd: batched transactions, every derived key
rebuilt, and nothing left behind by a load that fails.

Invariants:
- a load starts only on an empty prefix (no item, no key at all), and its first transaction
  checks that again: it compares that no key exists under the prefix (etcd compares the whole
  range) and creates the load marker `P/load`; every later transaction compares the marker's
  mod revision with the revision of the load's previous one and moves the marker on, so a
  second load, or anyone who emptied the prefix meanwhile, stops it, and after a lost answer
  the marker tells whether that very transaction was applied;
- every item is written as the store's own writes leave it (the values of `_etcd_layout`,
  `_etcd_keys` and `_etcd_proposal_keys`), with the revisions, states, seqs, signatures and
  closing, deletion and report times the item carries; the derived keys are rebuilt from the
  items: each creator's count of live keys, the tombstones' deletion-time index, every
  proposal index, the guard (pending and stored counts, and the highest seq, so new proposals
  come after the loaded ones) and each proposer's counts;
- a transaction holds at most `TXN_OPS` operations (etcd's default limit is 128) and, unless
  one item alone is larger, about `TXN_BYTES` of keys and values (etcd's default request limit
  is 1.5 MiB); an item with more operations than one transaction takes is split, in order;
- the index entries of each pending proposal are created in a transaction of their own,
  pending proposals in `seq` order (the sweeper reads the oldest of them by creation revision,
  `_etcd_proposal_reads.due`); a proposal's signatures keep their arrival order (transaction,
  then place `i`);
- if the items raise, or a write fails, every key that one of the load's transactions created
  (its create revision is one of theirs) is deleted, the marker last: a failed load leaves the
  prefix empty, and keys that another writer created meanwhile alone; if that cleanup fails
  too, the error says so and how to empty the prefix by hand;
- a load does not hide what it has written so far: it is an offline operation (`restore` and
  `store migrate` run with the coordinators stopped).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from domain_coordinator._etcd_layout import (
    Layout,
    decode,
    encode,
    first,
    head_value,
    hsa_value,
    write_id,
)
from domain_coordinator._etcd_proposal_keys import PENDING, Counts, Facts, ProposalKeys
from domain_coordinator._etcd_snapshot import count_contents
from domain_coordinator.snapshots import (
    SnapshotItem,
    SnapshotKey,
    SnapshotProposal,
    SnapshotState,
    refuse_unless_empty,
)
from domain_coordinator.store import HsaRecord
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    HsmDomainError,
    UnavailableError,
)
from domain_edge.etcd import Compare, Delete, EtcdClient, Put, Range, prefix_end

# Operations per transaction besides the marker's, within etcd's default of 128.
TXN_OPS: Final = 120
# Bytes of keys and values per transaction, within etcd's default request limit (1.5 MiB).
TXN_BYTES: Final = 1024 * 1024
# Keys read per page when a failed load removes what it wrote.
_UNDO_PAGE: Final = 1000


def _size(operations: Sequence[Put]) -> int:
    return sum(len(op.key) + len(op.value) for op in operations)


def _said(error: BaseException) -> str:
    """One line about what stopped a load (no item's content is in any of these errors)."""
    text = error.message if isinstance(error, HsmDomainError) else str(error)
    return f"{type(error).__name__}: {text[:300]}"


class Loader:
    """One load of snapshot items into one empty prefix (see the module invariants)."""

    def __init__(self, client: EtcdClient, layout: Layout, note: Callable[[int], None]) -> None:
        self.client = client
        self.layout = layout
        self.keys = ProposalKeys(layout)
        self._note = note
        self._id = write_id()
        self._revisions: list[int] = []  # of the load's transactions, in order
        self._batch: list[Put] = []
        self._bytes = 0
        self._holds_pending = False
        self._creators: Counter[str] = Counter()  # live keys per creator
        self._proposers: dict[str, Counts] = {}
        self._guard = Counts()

    # --- the load ---------------------------------------------------------------------------

    def load(self, items: Iterator[SnapshotItem], where: str) -> None:
        """Write `items` into the empty prefix, or nothing (see the module invariants)."""
        self._refuse_unless_empty(where)
        try:
            for item in items:
                self._add(item)
            self._add_derived()
            self._flush()
            self._finish()
        except BaseException as error:
            try:
                self._undo()
            except Exception as cleanup:
                root = self.layout.root.decode()
                raise UnavailableError(
                    f"loading into {where} failed ({_said(error)}), and what it had written "
                    f"could not be removed ({_said(cleanup)}): the prefix {root} holds part of "
                    f"a load (marked by the key {self.layout.load_marker.decode()}); delete "
                    f"every key under it (etcdctl del --prefix {root}) before loading again"
                ) from error
            raise

    def _refuse_unless_empty(self, where: str) -> None:
        refuse_unless_empty(count_contents(self.client, self.layout, self.keys), where)
        layout = self.layout
        found = self.client.snapshot(
            [Range.prefix(layout.root, count_only=True), Range(layout.load_marker)]
        )
        if found[1].kvs:
            raise FailedPreconditionError(
                f"{where} holds part of a load that did not finish (its marker "
                f"{layout.load_marker.decode()} is there): delete every key under "
                f"{layout.root.decode()} (etcdctl del --prefix {layout.root.decode()}), then "
                "load again"
            )
        if found[0].count:
            raise FailedPreconditionError(
                f"{where} holds no item but {found[0].count} keys of the store's own "
                f"bookkeeping under {layout.root.decode()} (fences or counters): a snapshot is "
                "loaded only into an empty prefix; give the store a new prefix, or delete the "
                "old one's keys first"
            )

    # --- items ------------------------------------------------------------------------------

    def _add(self, item: SnapshotItem) -> None:
        layout = self.layout
        if isinstance(item, SnapshotState):
            self._append([Put(layout.state(item.version), item.state)])
        elif isinstance(item, SnapshotProposal):
            self._append(self._proposal(item), pending=item.state == PENDING)
        elif isinstance(item, SnapshotKey):
            self._append(self._key(item))
        elif isinstance(item, HsaRecord):
            self._append([Put(layout.hsa(item.host_id), hsa_value(item, ""))])
        else:
            key = layout.audit_head(item.host_id, item.log)
            self._append([Put(key, head_value(item, ""))])

    def _proposal(self, item: SnapshotProposal) -> list[Put]:
        keys, pid = self.keys, item.proposal_id
        status = {
            "state": item.state,
            "detail": item.detail,
            "applied_version": item.applied_version,
            "closed_at": item.closed_at,
            "approvals": len(item.approvals),
            "w": "",
        }
        rec = {
            "created_at": item.created_at,
            "expires_at": item.expires_at,
            "proposer": item.proposer,
            "base_version": item.base_version,
            "base_hash": item.base_state_hash.hex(),
            "seq": item.seq,
            "w": "",
        }
        facts = Facts(
            pid,
            item.seq,
            item.proposer,
            item.expires_at,
            item.base_version,
            item.base_state_hash,
            status,
        )
        ops = [
            Put(keys.rec(pid), encode(rec, item.proposal)),
            Put(keys.status(pid), encode(status)),
        ]
        for kind, signed in (("approval", item.approvals), ("vote", item.cancel_votes)):
            ops += [
                Put(keys.signature(kind, pid, operator), encode({"i": i}, signature))
                for i, (operator, signature) in enumerate(signed)
            ]
        ops += [Put(key, value) for key, value in keys.entries(facts, status).items()]
        pending = int(item.state == PENDING)
        self._guard = Counts(self._guard.pending + pending, self._guard.stored + 1, item.seq)
        if item.proposer:
            counts = self._proposers.get(item.proposer, Counts())
            self._proposers[item.proposer] = counts.plus(pending, 1)
        return ops

    def _key(self, item: SnapshotKey) -> list[Put]:
        layout = self.layout
        fields: dict[str, object] = {"revision": item.revision, "creator": item.creator, "w": ""}
        if not item.deleted_at:
            self._creators[item.creator] += 1
            return [Put(layout.live_key(item.key_id), encode(fields, item.record))]
        fields["deleted_at"] = item.deleted_at
        return [
            Put(layout.dead_key(item.key_id), encode(fields, item.record)),
            Put(layout.deleted_index(item.deleted_at, item.key_id), b""),
        ]

    def _add_derived(self) -> None:
        """The counts the items imply: the guard, each proposer's, each creator's."""
        keys = self.keys
        if self._guard.stored:
            self._append([Put(keys.guard, self._guard.value(True))])
        for proposer in sorted(self._proposers):
            self._append([Put(keys.counter(proposer), self._proposers[proposer].value(False))])
        for creator in sorted(self._creators):
            self._append([Put(self.layout.creator(creator), b"%d" % self._creators[creator])])

    # --- transactions -----------------------------------------------------------------------

    def _append(self, operations: list[Put], *, pending: bool = False) -> None:
        """Add one item's writes to the batch, sending the batch first if they do not fit (or
        if both hold a pending proposal)."""
        size = _size(operations)
        if self._batch and (
            (pending and self._holds_pending)
            or len(self._batch) + len(operations) > TXN_OPS
            or self._bytes + size > TXN_BYTES
        ):
            self._flush()
        self._batch += operations
        self._bytes += size
        self._holds_pending |= pending
        while len(self._batch) > TXN_OPS:  # one item with more writes than a transaction takes
            rest = self._batch[TXN_OPS:]
            del self._batch[TXN_OPS:]
            self._flush()
            self._batch, self._bytes, self._holds_pending = rest, _size(rest), pending

    def _marker(self, batch: int) -> bytes:
        return encode({"load": self._id, "batch": batch})

    def _flush(self) -> None:
        """Send the batch: one transaction, compared as the module invariants say."""
        if not self._batch:
            return
        layout = self.layout
        number = len(self._revisions)
        if number == 0:
            compare = [Compare.none_under(layout.root)]
        else:
            compare = [Compare.mod_revision(layout.load_marker, self._revisions[-1])]
        marker = self._marker(number)
        result = self.client.txn(
            compare,
            [*self._batch, Put(layout.load_marker, marker)],
            [Range(layout.load_marker)],
            retry_safe=True,
        )
        if result.succeeded:
            revision = result.revision
        else:
            found = first(result.results[0])
            if not (result.uncertain and found is not None and found.value == marker):
                raise self._lost(number)
            revision = found.mod_revision  # our earlier attempt was applied
        self._revisions.append(revision)
        self._note(revision)
        self._batch, self._bytes, self._holds_pending = [], 0, False

    def _lost(self, number: int) -> HsmDomainError:
        root = self.layout.root.decode()
        if number == 0:
            return FailedPreconditionError(
                f"another writer put keys under {root} after the load checked that it was "
                "empty: nothing was loaded; stop whatever writes there (a coordinator on this "
                "store?) and load again"
            )
        return ConflictError(
            f"another writer changed the load's marker under {root} while the load ran "
            "(another load, or the prefix emptied): the load stopped; stop whatever writes "
            "there and load again"
        )

    def _finish(self) -> None:
        """Remove the marker: the load is complete."""
        if not self._revisions:
            return  # nothing was written
        marker = self.layout.load_marker
        result = self.client.txn(
            [Compare.mod_revision(marker, self._revisions[-1])],
            [Delete(marker)],
            [Range(marker)],
            retry_safe=True,
        )
        if not result.succeeded and not (result.uncertain and first(result.results[0]) is None):
            raise self._lost(len(self._revisions))
        self._note(result.revision)

    # --- a failed load ----------------------------------------------------------------------

    def _undo(self) -> None:
        """Delete every key that one of the load's transactions created, the marker last."""
        ours = set(self._revisions)
        marker = self.client.get(self.layout.load_marker)
        if marker is not None and decode(marker.value)[0].get("load") == self._id:
            ours.add(marker.mod_revision)  # a transaction whose answer was lost, applied
            ours.add(marker.create_revision)
        if not ours:
            return
        start, end = self.layout.root, prefix_end(self.layout.root)
        while True:
            found = self.client.range(Range(start, end, limit=_UNDO_PAGE, keys_only=True))
            doomed = [
                kv.key
                for kv in found.kvs
                if kv.create_revision in ours and kv.key != self.layout.load_marker
            ]
            for at in range(0, len(doomed), TXN_OPS):
                deletes = [Delete(key) for key in doomed[at : at + TXN_OPS]]
                self.client.txn([], deletes, retry_safe=True)  # deleting twice deletes nothing
            if not found.more or not found.kvs:
                break
            start = found.kvs[-1].key + b"\0"
        if marker is not None and marker.create_revision in ours:
            self.client.txn(
                [Compare.mod_revision(self.layout.load_marker, marker.mod_revision)],
                [Delete(self.layout.load_marker)],
                retry_safe=True,
            )
