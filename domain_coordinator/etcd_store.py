"""`CoordinatorStore` on an etcd v3 cluster, under one key prefix: what coordinator replicas share.

Invariants (on top of those of `domain_coordinator.store`):
- every write is one etcd transaction, acknowledged only once etcd committed it (a majority of
  the members wrote it to disk); its comparisons make it a compare-and-swap on what it read, so
  a write by another replica between the read and the write makes it fail, and it is read
  again and retried (bounded), never applied over the other's (`_etcd_layout.cas`);
- the chain: state N is stored only if key N is absent and key N-1 present (genesis: none
  present), so versions are gap-free and one writer wins each; states are never deleted;
- the caps: a proposal's insert compares the guard that every change of the pending or stored
  proposals rewrites, and checks the counts it read there; a key's create compares its creator's
  count key: no race between two replicas passes a cap (`_etcd_proposals`, `_etcd_keys`);
- the fences: a revision key and a value key, changed together with a compare on the revision;
  a fenced key write compares the revision key in its own transaction;
- reads are linearizable and each answer is read at one etcd revision;
- `subscribe` watches the prefix and maps each changed key to its part of the store; changes
  this store made itself are skipped when their revision is known in time (a notice may still
  come for one: a notice means "re-read", never what changed);
- a snapshot reads every part at one etcd revision, in pages (`_etcd_snapshot`); a load goes
  into an empty prefix only, in batched transactions, rebuilds every derived key, and removes
  what it wrote if it fails (`_etcd_load`);
- nothing here makes a decision on what it stores: states, proposals and records are relayed
  as the coordinator checked them; the layout is in `_etcd_layout`.

Failover, timeouts and retries are the client's (`domain_edge.etcd.EtcdClient`): any member
serves any call; an unreachable cluster is `EtcdUnavailableError` naming the endpoints tried.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager

from domain_coordinator._etcd_keys import KeyRecords
from domain_coordinator._etcd_layout import (
    RETRY,
    Layout,
    Retry,
    cas,
    decode,
    encode,
    first,
    head_record,
    head_value,
    hsa_record,
    hsa_value,
    unhexed,
    won,
    write_id,
)
from domain_coordinator._etcd_load import Loader
from domain_coordinator._etcd_proposal_keys import ProposalKeys
from domain_coordinator._etcd_proposal_reads import ProposalReads
from domain_coordinator._etcd_proposals import ProposalWrites
from domain_coordinator._etcd_snapshot import EtcdSnapshot, count_contents
from domain_coordinator.snapshots import SnapshotItem, StoreCounts, StoreSnapshot
from domain_coordinator.store import (
    ALL_CHANGE_KINDS,
    AuditHeadRecord,
    ChangeKind,
    CoordinatorStore,
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
)
from domain_core.errors import ConflictError
from domain_edge.etcd import (
    DEFAULT_ATTEMPT_TIMEOUT,
    DEFAULT_TIMEOUT,
    Compare,
    EtcdClient,
    Operation,
    Put,
    Range,
    WatchBatch,
    prefix_end,
    watch_prefix,
)

DEFAULT_PREFIX = "hsm-domain"
# Revisions of this store's own recent writes, to skip their watch events.
_OWN_WRITES_KEPT = 4096


class EtcdStore(CoordinatorStore):
    """A `CoordinatorStore` under one prefix of an etcd cluster (see the module invariants)."""

    def __init__(self, client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self.layout = Layout(prefix.encode() + b"/")
        keys = ProposalKeys(self.layout)
        self._proposal_keys = keys
        self._reads = ProposalReads(client, keys)
        self._writes = ProposalWrites(client, keys, self._note)
        self._keys = KeyRecords(client, self.layout, self._note)
        self._own: collections.deque[int] = collections.deque(maxlen=_OWN_WRITES_KEPT)
        self._own_lock = threading.Lock()
        self._unsubscribes: list[Callable[[], None]] = []
        self._closed = False

    @classmethod
    def open(
        cls,
        endpoints: str | Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
    ) -> EtcdStore:
        """A store on the cluster at `endpoints` ("HOST:PORT,..."), under `prefix`."""
        client = EtcdClient(endpoints, timeout=timeout, attempt_timeout=attempt_timeout)
        return cls(client, prefix)

    def __repr__(self) -> str:
        return f"EtcdStore({self.client!r}, prefix={self.prefix!r})"

    def _note(self, revision: int) -> None:
        with self._own_lock:
            self._own.append(revision)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    # --- the chain of sealed states ---------------------------------------------------------

    def _latest(self, keys_only: bool) -> Range:
        states = self.layout.states
        return Range(states, prefix_end(states), limit=1, descending=True, keys_only=keys_only)

    def latest_version(self) -> int:
        self._check_open()
        found = self.client.range(self._latest(keys_only=True)).first()
        return int(found.key[len(self.layout.states) :]) if found is not None else 0

    def latest_state(self) -> bytes | None:
        self._check_open()
        found = self.client.range(self._latest(keys_only=False)).first()
        return found.value if found is not None else None

    def get_state(self, version: int) -> bytes | None:
        self._check_open()
        found = self.client.get(self.layout.state(version))
        return found.value if found is not None else None

    def states_after(self, version: int, limit: int) -> list[bytes]:
        self._check_open()
        if limit < 1:
            return []
        start = self.layout.state(max(version, 0) + 1)
        found = self.client.range(Range(start, prefix_end(self.layout.states), limit=limit))
        return [kv.value for kv in found.kvs]

    def _append_state(
        self, version: int, state: bytes, applied: bytes | None, closed_at: int
    ) -> None:
        self._check_open()
        cas(
            f"storing state version {version}",
            lambda: self._append(version, state, applied, closed_at),
        )

    def _append(
        self, version: int, state: bytes, applied: bytes | None, closed_at: int
    ) -> Retry | None:
        key = self.layout.state(version)
        compare = [Compare.absent(key)]
        if version > 1:
            compare.append(Compare.present(self.layout.state(version - 1)))
        success: list[Operation] = [Put(key, state)]
        if applied is not None:
            move = self._writes.applied(applied, version, closed_at, write_id())
            compare += move.compare
            success += move.operations
        failure = [self._latest(keys_only=True), Range(key)]
        result = self.client.txn(compare, success, failure, retry_safe=True)
        if result.succeeded:
            self._note(result.revision)
            return None
        stored = first(result.results[1])
        if result.uncertain and stored is not None and stored.value == state:
            return None  # our earlier attempt stored it (or another replica, the same bytes)
        latest = first(result.results[0])
        at = int(latest.key[len(self.layout.states) :]) if latest is not None else 0
        if version != at + 1:
            raise ConflictError(
                f"cannot store state version {version}: the store is at version {at}"
            )
        return RETRY  # the proposal changed meanwhile

    # --- proposals and approvals (in `_etcd_proposals` and `_etcd_proposal_reads`) ----------

    def _put_proposal(self, new: NewProposal, caps: ProposalCaps) -> bool:
        self._check_open()
        return self._writes.insert(new, caps)

    def _add_signed(
        self, kind: Signed, proposal_id: bytes, operator_id: str, signed: bytes
    ) -> bool:
        self._check_open()
        return self._writes.add_signed(kind, proposal_id, operator_id, signed)

    def get_proposal(self, proposal_id: bytes) -> ProposalRecord | None:
        self._check_open()
        return self._reads.get(proposal_id)

    def list_proposals(
        self, include_closed: bool = False, *, limit: int, before: int = 0
    ) -> list[ProposalRecord]:
        self._check_open()
        return self._reads.page(include_closed, limit, before) if limit >= 1 else []

    def count_proposals(self, include_closed: bool = False, proposer: str = "") -> int:
        self._check_open()
        return self._reads.count(include_closed, proposer)

    def due_proposals(
        self, now: int, base_version: int, base_state_hash: bytes, limit: int
    ) -> list[PendingSummary]:
        self._check_open()
        if limit < 1:
            return []
        return self._reads.due(now, base_version, base_state_hash, limit)

    def pending_with_approvals(self, at_least: int, limit: int) -> list[bytes]:
        self._check_open()
        return self._reads.with_approvals(at_least, limit) if limit >= 1 else []

    def _set_proposal_state(self, proposal_id: bytes, change: StateChange) -> bool:
        self._check_open()
        return self._writes.set_state(proposal_id, change)

    def _close_proposals(
        self, closings: Sequence[tuple[bytes, ProposalState, str]], closed_at: int
    ) -> list[bytes]:
        self._check_open()
        return self._writes.close(closings, closed_at)

    def purge_closed_proposals(self, closed_before: int, expired_before: int) -> int:
        self._check_open()
        return self._writes.purge(closed_before, expired_before)

    # --- HSA registry -----------------------------------------------------------------------

    def _register_hsa(self, record: HsaRecord) -> None:
        self._check_open()
        # The HSA's own word replaces whatever is stored: sending it again is harmless.
        value = hsa_value(record, "")
        self.client.txn([], [Put(self.layout.hsa(record.host_id), value)], retry_safe=True)

    def _record_hsa_version(self, report: HsaRecord) -> bool:
        self._check_open()
        return cas(f"recording {report.host_id}'s version", lambda: self._raise_version(report))

    def _raise_version(self, report: HsaRecord) -> bool | Retry:
        key = self.layout.hsa(report.host_id)
        current = self.client.get(key)
        if current is None:
            return False
        fields, _ = decode(current.value)
        if int(fields["version"]) > report.version:
            return False
        w = write_id()
        raised = HsaRecord(
            report.host_id, str(fields["address"]), int(fields["registered_at"]),
            report.version, report.state_hash, report.reported_at,
        )  # fmt: skip
        result = self.client.txn(
            [Compare.mod_revision(key, current.mod_revision)],
            [Put(key, hsa_value(raised, w))],
            [Range(key)],
            retry_safe=True,
        )
        return True if won(result, 0, w) else RETRY

    def list_hsas(self) -> list[HsaRecord]:
        self._check_open()
        hsas = self.layout.hsas
        found = self.client.range(Range.prefix(hsas))
        return [hsa_record(unhexed(kv.key[len(hsas) :]), kv.value) for kv in found.kvs]

    # --- audit heads ------------------------------------------------------------------------

    def get_audit_head(self, host_id: str, log: str) -> AuditHeadRecord | None:
        self._check_open()
        found = self.client.get(self.layout.audit_head(host_id, log))
        return head_record(host_id, log, found.value) if found is not None else None

    def _put_audit_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool:
        self._check_open()
        return cas("storing an audit head", lambda: self._swap_head(head, expected))

    def _swap_head(self, head: AuditHeadRecord, expected: bytes | None) -> bool | Retry:
        key = self.layout.audit_head(head.host_id, head.log)
        current = self.client.get(key)
        stored = decode(current.value)[1] if current is not None else None
        if stored != expected:
            return False
        w = write_id()
        value = head_value(head, w)
        read = Compare.mod_revision(key, current.mod_revision if current is not None else 0)
        result = self.client.txn([read], [Put(key, value)], [Range(key)], retry_safe=True)
        return True if won(result, 0, w) else RETRY

    def list_audit_heads(self, host_id: str = "") -> list[AuditHeadRecord]:
        self._check_open()
        prefix = self.layout.audit_host(host_id) if host_id else self.layout.audit
        heads = []
        for kv in self.client.range(Range.prefix(prefix)).kvs:
            host, log = kv.key[len(self.layout.audit) :].split(b"/", 1)
            heads.append(head_record(unhexed(host), unhexed(log), kv.value))
        return heads

    # --- fences and change notices ----------------------------------------------------------

    def get_fences(self) -> FenceRecord:
        self._check_open()
        revision, value = self.client.snapshot(
            [Range(self.layout.fences_revision), Range(self.layout.fences_value)]
        )
        if revision.first() is None or value.first() is None:
            return FenceRecord(b"", 0)
        return FenceRecord(decode(value.kvs[0].value)[1], int(revision.kvs[0].value))

    def _set_fences(self, value: bytes, expected_revision: int) -> int:
        self._check_open()
        layout = self.layout
        compare = (
            Compare.absent(layout.fences_revision)
            if expected_revision == 0
            else Compare.value(layout.fences_revision, b"%d" % expected_revision)
        )
        w = write_id()
        result = self.client.txn(
            [compare],
            [
                Put(layout.fences_revision, b"%d" % (expected_revision + 1)),
                Put(layout.fences_value, encode({"w": w}, value)),
            ],
            [Range(layout.fences_value), Range(layout.fences_revision)],
            retry_safe=True,
        )
        if won(result, 0, w):
            self._note(result.revision)
            return expected_revision + 1
        current = first(result.results[1])
        raise ConflictError(
            f"the fences are at revision {int(current.value) if current else 0}, not "
            f"{expected_revision}: another coordinator set them meanwhile; read them again "
            "and retry"
        )

    def subscribe(
        self,
        on_change: Callable[[ChangeKind], None],
        kinds: Collection[ChangeKind] = ALL_CHANGE_KINDS,
    ) -> Callable[[], None]:
        self._check_open()
        layout = self.layout
        prefixes = {
            ChangeKind.STATES: layout.states,
            ChangeKind.PROPOSALS: layout.proposals,
            ChangeKind.KEYS: layout.keys,
            ChangeKind.FENCES: layout.fences,
        }
        start = self.client.range(Range(layout.fences_revision)).revision + 1
        cancels: list[Callable[[], None]] = []

        def watcher(kind: ChangeKind) -> Callable[[WatchBatch], None]:
            def changed(batch: WatchBatch) -> None:
                with self._own_lock:
                    own = set(self._own)
                if batch.compacted or any(e.mod_revision not in own for e in batch.events):
                    on_change(kind)

            return changed

        # One watch per part asked for: a part nobody asks for (key records, for the replicas)
        # sends no event to anyone.
        for kind in sorted(set(kinds)):
            cancels.append(watch_prefix(self.client, prefixes[kind], start, watcher(kind)).cancel)

        def unsubscribe() -> None:
            for cancel in cancels:
                cancel()

        self._unsubscribes.append(unsubscribe)
        return unsubscribe

    # --- key records (in `_etcd_keys`) ------------------------------------------------------

    def get_key(self, key_id: str) -> KeyEntry | None:
        self._check_open()
        return self._keys.get(key_id)

    def _put_key(
        self, entry: KeyEntry, creator: str, creator_limit: int, fences_revision: int | None
    ) -> int:
        self._check_open()
        return self._keys.put(entry, creator, creator_limit, fences_revision)

    def list_keys(self, limit: int, after_key_id: str = "") -> list[KeyEntry]:
        self._check_open()
        return self._keys.page(limit, after_key_id) if limit >= 1 else []

    def count_keys(self, creator: str) -> int:
        self._check_open()
        return self._keys.count(creator)

    def _delete_key(
        self, key_id: str, expected_revision: int, deleted_at: int, fences_revision: int | None
    ) -> None:
        self._check_open()
        self._keys.delete(key_id, expected_revision, deleted_at, fences_revision)

    def deleted_key(self, key_id: str) -> DeletedKey | None:
        self._check_open()
        return self._keys.tombstone(key_id)

    def purge_deleted_keys(self, deleted_before: int) -> int:
        self._check_open()
        return self._keys.purge(deleted_before)

    # --- backup and restore (in `_etcd_snapshot` and `_etcd_load`) ---------------------------

    def contents(self) -> StoreCounts:
        self._check_open()
        return count_contents(self.client, self.layout, self._proposal_keys)

    @contextmanager
    def snapshot(self) -> Iterator[StoreSnapshot]:
        self._check_open()
        yield EtcdSnapshot(self.client, self.layout, self._proposal_keys)

    def _load_snapshot(self, items: Iterator[SnapshotItem]) -> StoreCounts:
        self._check_open()
        where = f"the etcd store {self.prefix}/ on {','.join(map(str, self.client.endpoints))}"
        Loader(self.client, self.layout, self._note).load(items, where)
        return self.contents()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for unsubscribe in self._unsubscribes:
            unsubscribe()
        self.client.close()
