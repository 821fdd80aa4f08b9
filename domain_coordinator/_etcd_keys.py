"""Key records in the etcd store: compare-and-swap on their revision, tombstones, creator counts,
and the fence check in the same transaction.

Invariants (on top of `_etcd_layout`):
- a record's revision is a field of its value (1 at creation, +1 per write and at deletion);
  a write compares the live key's etcd mod revision with the one it read, so it applies only to
  the revision the caller named;
- a create compares that neither the live key nor a tombstone exists, and the creator's count
  key is unchanged since it was read; it writes the count + 1 in the same transaction, so no
  two creates can both pass the creator limit; a deletion writes the count - 1 (its own
  comparison on the count key), a purge of tombstones changes no count;
- a deletion moves the record to `keys/dead/` (with its deletion time, at revision + 1) and
  indexes it by deletion time, so purging reads only the tombstones that are due;
- with `fences_revision`, the transaction also compares the fences' revision key, and the
  fence check is reported first (FencesChangedError) whatever else failed;
- creates by one creator go one at a time through this process (`_creating`, striped locks):
  they all compare the one count key, so running them at once here only makes all but one
  lose and read again; the compare, not the lock, is what keeps the count right (other
  replicas create too).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from domain_coordinator._etcd_layout import (
    RETRY,
    Layout,
    Retry,
    cas,
    decode,
    encode,
    first,
    number,
    unhexed,
    won,
    write_id,
)
from domain_coordinator.store import DeletedKey, FencesChangedError, KeyEntry, iso_date
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    ResourceExhaustedError,
)
from domain_edge.etcd import (
    Compare,
    Delete,
    DeleteResult,
    EtcdClient,
    KeyValue,
    Operation,
    Put,
    Range,
    prefix_end,
)

# Tombstones purged per transaction.
_PURGE_BATCH = 50
# Locks that creates by one creator take in turn (a creator maps to one of them).
_CREATE_STRIPES = 32


@dataclass(frozen=True)
class _Record:
    """A stored record (live or dead) as read."""

    kv: KeyValue
    revision: int
    creator: str
    deleted_at: int
    record: bytes

    @classmethod
    def of(cls, kv: KeyValue | None) -> _Record | None:
        if kv is None:
            return None
        fields, record = decode(kv.value)
        deleted_at = int(fields.get("deleted_at", 0))
        return cls(kv, int(fields["revision"]), str(fields["creator"]), deleted_at, record)


def _count(kv: KeyValue | None) -> int:
    return int(kv.value) if kv is not None else 0


def _same(key: bytes, read: KeyValue | None) -> Compare:
    return Compare.mod_revision(key, read.mod_revision if read is not None else 0)


class KeyRecords:
    """Key records of one etcd store (see the module invariants)."""

    def __init__(self, client: EtcdClient, layout: Layout, note: Callable[[int], None]) -> None:
        self.client = client
        self.layout = layout
        self._note = note
        self._creating = [threading.Lock() for _ in range(_CREATE_STRIPES)]

    def _fences(self, fences_revision: int | None) -> tuple[list[Range], list[Compare]]:
        """The read and the comparison of a fenced write (none for an unfenced one)."""
        if fences_revision is None:
            return [], []
        key = self.layout.fences_revision
        if fences_revision == 0:
            compare = Compare.absent(key)
        else:
            compare = Compare.value(key, b"%d" % fences_revision)
        return [Range(key)], [compare]

    @staticmethod
    def _check_fences(fences_revision: int | None, read: KeyValue | None) -> None:
        if fences_revision is None:
            return
        current = int(read.value) if read is not None else 0
        if current != fences_revision:
            raise FencesChangedError(
                f"the fences are at revision {current}, not {fences_revision}: a fence was set "
                "meanwhile; nothing was written: check the write against the fences again"
            )

    # --- reads ------------------------------------------------------------------------------

    def get(self, key_id: str) -> KeyEntry | None:
        found = _Record.of(self.client.get(self.layout.live_key(key_id)))
        return KeyEntry(key_id, found.record, found.revision) if found is not None else None

    def page(self, limit: int, after_key_id: str) -> list[KeyEntry]:
        live = self.layout.live
        start = self.layout.live_key(after_key_id) + b"\0" if after_key_id else live
        found = self.client.range(Range(start, prefix_end(live), limit=limit))
        entries = []
        for kv in found.kvs:
            record = _Record.of(kv)
            assert record is not None
            entries.append(KeyEntry(unhexed(kv.key[len(live) :]), record.record, record.revision))
        return entries

    def count(self, creator: str) -> int:
        return _count(self.client.get(self.layout.creator(creator)))

    def tombstone(self, key_id: str) -> DeletedKey | None:
        found = _Record.of(self.client.get(self.layout.dead_key(key_id)))
        if found is None:
            return None
        return DeletedKey(KeyEntry(key_id, found.record, found.revision), found.deleted_at)

    # --- writes -----------------------------------------------------------------------------

    def put(
        self, entry: KeyEntry, creator: str, creator_limit: int, fences_revision: int | None
    ) -> int:
        if entry.revision == 0:
            stripe = zlib.crc32(creator.encode("utf-8", "surrogatepass")) % _CREATE_STRIPES
            with self._creating[stripe]:
                return cas(
                    f"creating key {entry.key_id}",
                    lambda: self._create(entry, creator, creator_limit, fences_revision),
                )
        return cas(f"writing key {entry.key_id}", lambda: self._update(entry, fences_revision))

    def _create(
        self, entry: KeyEntry, creator: str, creator_limit: int, fences_revision: int | None
    ) -> int | Retry:
        layout, key_id = self.layout, entry.key_id
        live, dead = layout.live_key(key_id), layout.dead_key(key_id)
        counter = layout.creator(creator)
        fence_reads, fence_compare = self._fences(fences_revision)
        found = self.client.snapshot([Range(live), Range(dead), Range(counter), *fence_reads])
        self._check_fences(fences_revision, found[3].first() if fence_reads else None)
        tombstone = _Record.of(found[1].first())
        if tombstone is not None:
            raise AlreadyExistsError(
                f"key {key_id} was deleted on {iso_date(tombstone.deleted_at)}; a key id is "
                "never used again"
            )
        if found[0].kvs:
            raise AlreadyExistsError(f"key {key_id} exists already")
        counter_kv = found[2].first()
        count = _count(counter_kv)
        if creator and creator_limit and count >= creator_limit:
            raise ResourceExhaustedError(
                f"{creator[:200]} has created {count} keys, the most one principal may have "
                f"({creator_limit}); schedule the deletion of keys it no longer needs"
            )
        w = write_id()
        value = encode({"revision": 1, "creator": creator, "w": w}, entry.record)
        unchanged = [Compare.absent(live), Compare.absent(dead), _same(counter, counter_kv)]
        result = self.client.txn(
            [*unchanged, *fence_compare],
            [Put(live, value), Put(counter, b"%d" % (count + 1))],
            [Range(live), *fence_reads],
            retry_safe=True,
        )
        if won(result, 0, w):
            self._note(result.revision)
            return 1
        self._check_fences(fences_revision, first(result.results[1]) if fence_reads else None)
        return RETRY  # read again: it exists now, or the count changed

    def _update(self, entry: KeyEntry, fences_revision: int | None) -> int | Retry:
        live = self.layout.live_key(entry.key_id)
        fence_reads, fence_compare = self._fences(fences_revision)
        found = self.client.snapshot([Range(live), *fence_reads])
        self._check_fences(fences_revision, found[1].first() if fence_reads else None)
        current = self._live(found[0].first(), entry.key_id, entry.revision)
        w = write_id()
        value = encode(
            {"revision": current.revision + 1, "creator": current.creator, "w": w}, entry.record
        )
        result = self.client.txn(
            [_same(live, current.kv), *fence_compare],
            [Put(live, value)],
            [Range(live), *fence_reads],
            retry_safe=True,
        )
        if won(result, 0, w):
            self._note(result.revision)
            return current.revision + 1
        self._check_fences(fences_revision, first(result.results[1]) if fence_reads else None)
        return RETRY

    @staticmethod
    def _live(kv: KeyValue | None, key_id: str, expected: int) -> _Record:
        """The live record at `expected`; NotFoundError if none, ConflictError if another."""
        current = _Record.of(kv)
        if current is None:
            raise NotFoundError(f"key {key_id} does not exist")
        if current.revision != expected:
            raise ConflictError(
                f"key {key_id} is at revision {current.revision}, not {expected}: "
                "it changed meanwhile; read it again and retry"
            )
        return current

    def delete(
        self, key_id: str, expected_revision: int, deleted_at: int, fences_revision: int | None
    ) -> None:
        cas(
            f"deleting key {key_id}",
            lambda: self._delete(key_id, expected_revision, deleted_at, fences_revision),
        )

    def _delete(
        self, key_id: str, expected: int, deleted_at: int, fences_revision: int | None
    ) -> Retry | None:
        layout = self.layout
        live, dead = layout.live_key(key_id), layout.dead_key(key_id)
        fence_reads, fence_compare = self._fences(fences_revision)
        found = self.client.snapshot([Range(live), *fence_reads])
        self._check_fences(fences_revision, found[1].first() if fence_reads else None)
        current = self._live(found[0].first(), key_id, expected)
        counter = layout.creator(current.creator)
        [counted] = self.client.snapshot([Range(counter)], revision=found[0].revision)
        counter_kv = counted.first()
        w = write_id()
        tombstone = {
            "revision": current.revision + 1,
            "creator": current.creator,
            "deleted_at": deleted_at,
            "w": w,
        }
        success: list[Operation] = [
            Delete(live),
            Put(dead, encode(tombstone, current.record)),
            Put(layout.deleted_index(deleted_at, key_id), b""),
            Put(counter, b"%d" % max(0, _count(counter_kv) - 1)),
        ]
        result = self.client.txn(
            [_same(live, current.kv), _same(counter, counter_kv), *fence_compare],
            success,
            [Range(dead), *fence_reads],
            retry_safe=True,
        )
        if won(result, 0, w):
            self._note(result.revision)
            return None
        self._check_fences(fences_revision, first(result.results[1]) if fence_reads else None)
        return RETRY

    def purge(self, deleted_before: int) -> int:
        layout = self.layout
        end = layout.deleted + number(deleted_before)
        due = self.client.range(Range(layout.deleted, end, keys_only=True))
        purged = 0
        for start in range(0, len(due.kvs), _PURGE_BATCH):
            batch = due.kvs[start : start + _PURGE_BATCH]
            operations: list[Operation] = []
            for kv in batch:
                key_id = unhexed(kv.key.rsplit(b"/", 1)[1])
                operations += [Delete(layout.dead_key(key_id)), Delete(kv.key)]
            # Deleting is idempotent: sent again after a lost answer, it deletes nothing more.
            result = self.client.txn([], operations, retry_safe=True)
            purged += sum(r.deleted for r in result.results[0::2] if isinstance(r, DeleteResult))
        return purged
