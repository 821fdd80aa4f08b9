"""Backups, restores and migrations of the coordinator's store: the store's side of
`hsm-domain backup`, `restore` and `store migrate` (run through `store_admin`).

Invariants kept here:
- a backup is written from one snapshot (one point in time, `CoordinatorStore.snapshot`),
  record by record (`domain_edge.backup_files.BackupWriter`: a private temporary file, fsynced,
  given its name only when complete, never over another file), then read back whole and
  verified against the pinned genesis before it is reported written;
- a restore loads a backup only into an empty store, and only records that verified: the
  load is one all-or-nothing write that ends normally only after the last record, the
  trailer's digest and every count verified (`VerifiedBackup`), so a backup that is damaged,
  forged, cut short or of another domain leaves the store as empty as it was;
- a migration loads a snapshot of the source into an empty target, then takes a fresh
  snapshot of the target and compares it with the source's: the counts, the newest state and
  a SHA-256 over every item must be equal; only then is the config's `store` value switched
  (one atomic replace of the file). The source store is only read, never written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from domain_coordinator.snapshots import (
    SnapshotItem,
    SnapshotKey,
    SnapshotProposal,
    SnapshotState,
    StoreCounts,
    StoreSnapshot,
    refuse_unless_empty,
)
from domain_coordinator.store import AuditHeadRecord, CoordinatorStore, HsaRecord, ProposalState
from domain_coordinator.store_spec import open_store
from domain_core.backup import BACKUP_FORMAT, BACKUP_FORMAT_VERSION, BackupSummary
from domain_core.errors import BackupError, FailedPreconditionError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState
from domain_edge.backup_files import BackupWriter, VerifiedBackup, verify_backup
from domain_edge.config import CoordinatorConfig
from domain_proto import backup_pb2, services_pb2

__all__ = [
    "BackupWritten",
    "Migrated",
    "from_record",
    "migrate_store",
    "restore_backup",
    "to_record",
    "write_backup",
]

Progress = Callable[[str], None]
_PROGRESS_EVERY = 1000

_STATE_TO_WIRE = {
    ProposalState.PENDING.value: services_pb2.PROPOSAL_STATE_PENDING,
    ProposalState.APPLIED.value: services_pb2.PROPOSAL_STATE_APPLIED,
    ProposalState.EXPIRED.value: services_pb2.PROPOSAL_STATE_EXPIRED,
    ProposalState.CANCELLED.value: services_pb2.PROPOSAL_STATE_CANCELLED,
    ProposalState.STALE.value: services_pb2.PROPOSAL_STATE_STALE,
    ProposalState.REJECTED.value: services_pb2.PROPOSAL_STATE_REJECTED,
}
_STATE_FROM_WIRE = {wire: name for name, wire in _STATE_TO_WIRE.items()}


# --- items <-> records -----------------------------------------------------------------------


def _signed(pairs: Iterable[tuple[str, bytes]]) -> list[backup_pb2.BackupSigned]:
    return [backup_pb2.BackupSigned(operator_id=o, signed=s) for o, s in pairs]


def to_record(item: SnapshotItem) -> backup_pb2.BackupRecord:
    """The backup record of one snapshot item."""
    if isinstance(item, SnapshotState):
        state = backup_pb2.BackupState(version=item.version, state=item.state)
        return backup_pb2.BackupRecord(state=state)
    if isinstance(item, SnapshotProposal):
        proposal = backup_pb2.BackupProposal(
            proposal_id=item.proposal_id,
            proposal=item.proposal,
            state=_STATE_TO_WIRE[item.state],
            detail=item.detail,
            applied_version=item.applied_version,
            created_at=item.created_at,
            expires_at=item.expires_at,
            closed_at=item.closed_at,
            seq=item.seq,
            proposer=item.proposer,
            base_version=item.base_version,
            base_state_hash=item.base_state_hash,
            approvals=_signed(item.approvals),
            cancel_votes=_signed(item.cancel_votes),
        )
        return backup_pb2.BackupRecord(proposal=proposal)
    if isinstance(item, SnapshotKey):
        key = backup_pb2.BackupKey(
            key_id=item.key_id,
            record=item.record,
            revision=item.revision,
            creator=item.creator,
            deleted_at=item.deleted_at,
        )
        return backup_pb2.BackupRecord(key=key)
    if isinstance(item, HsaRecord):
        return backup_pb2.BackupRecord(hsa=backup_pb2.BackupHsa(**dataclasses.asdict(item)))
    return backup_pb2.BackupRecord(
        audit_head=backup_pb2.BackupAuditHead(**dataclasses.asdict(item))
    )


def from_record(record: backup_pb2.BackupRecord) -> SnapshotItem:
    """The snapshot item of one (verified) backup record."""
    which = record.WhichOneof("item")
    if which == "state":
        return SnapshotState(int(record.state.version), bytes(record.state.state))
    if which == "proposal":
        p = record.proposal
        return SnapshotProposal(
            proposal_id=bytes(p.proposal_id),
            proposal=bytes(p.proposal),
            state=_STATE_FROM_WIRE[p.state],
            detail=p.detail,
            applied_version=int(p.applied_version),
            created_at=int(p.created_at),
            expires_at=int(p.expires_at),
            closed_at=int(p.closed_at),
            seq=int(p.seq),
            proposer=p.proposer,
            base_version=int(p.base_version),
            base_state_hash=bytes(p.base_state_hash),
            approvals=tuple((s.operator_id, bytes(s.signed)) for s in p.approvals),
            cancel_votes=tuple((s.operator_id, bytes(s.signed)) for s in p.cancel_votes),
        )
    if which == "key":
        k = record.key
        return SnapshotKey(k.key_id, bytes(k.record), int(k.revision), k.creator, int(k.deleted_at))
    if which == "hsa":
        h = record.hsa
        return HsaRecord(
            h.host_id,
            h.address,
            int(h.registered_at),
            int(h.version),
            bytes(h.state_hash),
            int(h.reported_at),
        )
    if which == "audit_head":
        a = record.audit_head
        checkpoint = bytes(a.checkpoint)
        return AuditHeadRecord(a.host_id, a.log, int(a.seq), checkpoint, int(a.reported_at))
    raise ValueError(f"not an item record: {which}")


def _counted(
    items: Iterable[SnapshotItem], progress: Progress | None, verb: str
) -> Iterator[SnapshotItem]:
    """`items` as they pass, with a progress line every `_PROGRESS_EVERY`."""
    for count, item in enumerate(items, start=1):
        if progress is not None and count % _PROGRESS_EVERY == 0:
            progress(f"{verb} {count} items")
        yield item


# --- backup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupWritten:
    """A backup that was written and then verified: where, its digest, what it holds."""

    path: Path
    sha256: bytes
    summary: BackupSummary


def _header(
    snapshot: StoreSnapshot, domain_id: str, genesis_hash: bytes, limits: Limits
) -> backup_pb2.BackupHeader:
    if snapshot.newest_state is None:
        raise FailedPreconditionError(
            "the store holds no state (not even the genesis): there is nothing to back up; "
            "start the coordinator once, or check the config's store"
        )
    newest = SealedState.from_bytes(snapshot.newest_state, limits)
    return backup_pb2.BackupHeader(
        format=BACKUP_FORMAT,
        format_version=BACKUP_FORMAT_VERSION,
        domain_id=domain_id,
        genesis_hash=genesis_hash,
        newest_version=newest.version,
        newest_state_hash=newest.hash,
        counts=snapshot.counts.to_message(),
        created_at=int(time.time()),
    )


def write_backup(
    store: CoordinatorStore,
    path: Path,
    genesis: bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    progress: Progress | None = None,
) -> BackupWritten:
    """Write a backup of one snapshot of `store` to `path` (a new file), then verify it
    against the pinned genesis state `genesis` (BackupError if it does not verify)."""
    pinned = SealedState.from_bytes(genesis, limits)
    with store.snapshot() as snapshot:
        header = _header(snapshot, pinned.manifest.domain_id, pinned.hash, limits)
        with BackupWriter(path, header) as writer:
            for item in _counted(snapshot.items(), progress, "wrote"):
                writer.write(to_record(item))
            digest = writer.commit()
    if progress is not None:
        progress(f"written {path}; verifying it against the pinned genesis")
    try:
        summary = verify_backup(path, genesis, limits, progress=progress)
    except BackupError as error:
        raise BackupError(
            f"the backup was written to {path} but does not verify: {error.message}; the "
            "store itself may be damaged (the coordinator refuses to start on a chain that "
            "does not verify)"
        ) from None
    return BackupWritten(path=path, sha256=digest, summary=summary)


# --- restore ---------------------------------------------------------------------------------


def restore_backup(
    store: CoordinatorStore,
    path: Path,
    genesis: bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    progress: Progress | None = None,
) -> BackupSummary:
    """Load the backup at `path` into the empty `store`, all or nothing, verifying every
    record against the pinned genesis state `genesis` as it goes (see the module invariants)."""
    refuse_unless_empty(store.contents(), "the store")
    with VerifiedBackup(path, genesis, limits, progress=progress) as backup:
        records = (from_record(record) for record in backup.records())
        store.load_snapshot(_counted(records, progress, "loaded"))
        if backup.summary is None:  # records() sets it when the file ended well
            raise RuntimeError("the backup's records ended without a summary")
        return backup.summary


# --- migration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migrated:
    """A finished migration: what moved, and the config that now names the new store."""

    counts: StoreCounts
    newest_version: int
    sha256: bytes  # over every item, in snapshot order
    config: Path
    old_store: str
    new_store: str


class _Digest:
    """A SHA-256 over the backup records of the items that pass through it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def passing(self, items: Iterable[SnapshotItem]) -> Iterator[SnapshotItem]:
        for item in items:
            data = to_record(item).SerializeToString(deterministic=True)
            self._hash.update(len(data).to_bytes(8, "big") + data)
            yield item

    def digest(self) -> bytes:
        return self._hash.digest()


def _compare(source: StoreSnapshot, source_digest: bytes, target: CoordinatorStore) -> bytes:
    """The target's fresh snapshot must equal the source's; its digest."""
    with target.snapshot() as copied:
        check = _Digest()
        for _ in check.passing(copied.items()):
            pass
        if copied.counts != source.counts:
            raise FailedPreconditionError(
                f"the new store holds {copied.counts.describe()}, the old one "
                f"{source.counts.describe()}: the migration did not take everything"
            )
        if copied.newest_state != source.newest_state:
            raise FailedPreconditionError("the new store's newest state is not the old one's")
        if check.digest() != source_digest:
            raise FailedPreconditionError(
                "the new store's content differs from the old one's (SHA-256 over every item)"
            )
        return source_digest


def migrate_store(config_path: Path, to_spec: str, *, progress: Progress | None = None) -> Migrated:
    """Copy the store `config_path` names into the empty store `to_spec` (a `store` value,
    relative paths relative to the config's directory), compare, then switch the config."""
    config = CoordinatorConfig.load(config_path)
    base = config.base_dir or config_path.parent
    if to_spec == config.store:
        raise FailedPreconditionError(f"the coordinator already uses {to_spec}")
    source = open_store(config.store, base)
    try:
        target = open_store(to_spec, base)
        try:
            refuse_unless_empty(target.contents(), f"the new store {to_spec}")
            with source.snapshot() as snapshot:
                digest = _Digest()
                loaded = target.load_snapshot(
                    _counted(digest.passing(snapshot.items()), progress, "copied")
                )
                if progress is not None:
                    progress(f"copied {loaded.describe()}; comparing the two stores")
                sha256 = _compare(snapshot, digest.digest(), target)
                newest = snapshot.newest_state
        finally:
            target.close()
    finally:
        source.close()
    version = SealedState.from_bytes(newest).version if newest is not None else 0
    dataclasses.replace(config, store=to_spec).save(config_path)  # one atomic replace
    return Migrated(loaded, version, sha256, config_path, config.store, to_spec)
