"""Backups built from a `SimulatedDomain` (real states, real signed key records), for tests.

`BackupContent` is what a store would hold: the simulator's states, key records signed by its
hosts, proposals and registrations; `header()` and `records()` give the backup messages in
file order, `write(path)` a real backup file (`domain_edge.backup_files.BackupWriter`), and
`load(store)` puts the same content into a `CoordinatorStore` through its public methods.
Tests change a record or a header field to attack the verifier.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from domain_coordinator.backups import to_record
from domain_coordinator.snapshots import SnapshotKey, SnapshotProposal, SnapshotState
from domain_coordinator.store import CoordinatorStore, HsaRecord
from domain_core import crypto, keytokens, policy
from domain_core.backup import BACKUP_FORMAT, BACKUP_FORMAT_VERSION, StoreCounts
from domain_core.model import Proposal, SealedState
from domain_edge.backup_files import BackupWriter
from domain_proto import backup_pb2, domain_pb2, keys_pb2
from support.simulator import SimulatedDomain

APP = "spiffe://local/client/app"


def new_key_id() -> str:
    return str(uuid.uuid4())


def key_record(
    sim: SimulatedDomain,
    signer_host: str,
    key_id: str,
    *,
    version: int = 1,
    state: int = keys_pb2.KEY_STATE_ENABLED,
    deletion_at: int = 0,
    base: SealedState | None = None,
    sign_as: str | None = None,
    domain_id: str | None = None,
) -> keys_pb2.KeyRecord:
    """A record of `key_id` sealed under `base`'s (default: the head's) current generation as
    `signer_host` unseals it, signed with `signer_host`'s key (named `sign_as` if given)."""
    base = base or sim.head
    keys = sim.keys_at(base, signer_host)
    generation = base.manifest.current_generation
    metadata = keys_pb2.KeyMetadata(
        key_id=key_id,
        description="backup test",
        state=state,
        created_at=sim.now,
        deletion_at=deletion_at,
        policy=policy.default_policy(APP),
        current_backing_version=1,
        creator=APP,
        metadata_version=version,
        domain_id=domain_id or sim.domain_id,
    )
    signer = keytokens.RecordSigner(
        sim.domain_id, sign_as or signer_host, sim.hosts[signer_host].signer
    )
    return keytokens.seal_record(
        metadata, {1: crypto.new_aes_key()}, keys[generation], generation, signer=signer
    )


def snapshot_key(record: keys_pb2.KeyRecord, revision: int = 1, deleted_at: int = 0) -> SnapshotKey:
    metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
    return SnapshotKey(
        key_id=metadata.key_id,
        record=record.SerializeToString(deterministic=True),
        revision=revision,
        creator=metadata.creator,
        deleted_at=deleted_at,
    )


@dataclass
class BackupContent:
    """What a store of the simulated domain holds, as snapshot items."""

    sim: SimulatedDomain
    keys: list[SnapshotKey] = field(default_factory=list)
    proposals: list[SnapshotProposal] = field(default_factory=list)
    hsas: list[HsaRecord] = field(default_factory=list)

    @property
    def states(self) -> list[SnapshotState]:
        return [SnapshotState(s.version, s.to_bytes()) for s in self.sim.states]

    def add_key(self, record: keys_pb2.KeyRecord, revision: int = 1, deleted_at: int = 0) -> str:
        item = snapshot_key(record, revision, deleted_at)
        self.keys.append(item)
        self.keys.sort(key=lambda k: k.key_id)
        return item.key_id

    def items(self) -> list[object]:
        return [*self.states, *self.proposals, *self.keys, *self.hsas]

    def counts(self) -> StoreCounts:
        return StoreCounts(
            states=len(self.sim.states),
            proposals=len(self.proposals),
            approvals=sum(len(p.approvals) for p in self.proposals),
            cancel_votes=sum(len(p.cancel_votes) for p in self.proposals),
            keys=sum(1 for k in self.keys if not k.deleted_at),
            tombstones=sum(1 for k in self.keys if k.deleted_at),
            hsas=len(self.hsas),
        )

    def header(self, **changes: object) -> backup_pb2.BackupHeader:
        head = self.sim.head
        header = backup_pb2.BackupHeader(
            format=BACKUP_FORMAT,
            format_version=BACKUP_FORMAT_VERSION,
            domain_id=self.sim.domain_id,
            genesis_hash=self.sim.genesis_hash,
            newest_version=head.version,
            newest_state_hash=head.hash,
            counts=self.counts().to_message(),
            created_at=self.sim.now,
        )
        for name, value in changes.items():
            if name == "counts":
                header.counts.CopyFrom(value)  # type: ignore[arg-type]
            else:
                setattr(header, name, value)
        return header

    def records(self) -> list[backup_pb2.BackupRecord]:
        return [to_record(item) for item in self.items()]  # type: ignore[arg-type]

    def write(
        self,
        path: Path,
        header: backup_pb2.BackupHeader | None = None,
        records: list[backup_pb2.BackupRecord] | None = None,
    ) -> Path:
        with BackupWriter(path, header or self.header()) as writer:
            for record in self.records() if records is None else records:
                writer.write(record)
            writer.commit()
        return path

    def load(self, store: CoordinatorStore) -> None:
        store.load_snapshot(self.items())  # type: ignore[arg-type]


def replaced(item: object, **changes: object) -> object:
    return dataclasses.replace(item, **changes)  # type: ignore[type-var]


def proposal_item(
    proposal: Proposal, approvals: Sequence[domain_pb2.Approval], **changes: object
) -> SnapshotProposal:
    """A proposal as the store keeps it (PENDING unless `changes` say otherwise)."""
    item = SnapshotProposal(
        proposal_id=proposal.id,
        proposal=proposal.raw,
        state="pending",
        detail="",
        applied_version=0,
        created_at=proposal.created_at,
        expires_at=proposal.expires_at,
        closed_at=0,
        seq=1,
        proposer=proposal.proposer_id,
        base_version=proposal.base_version,
        base_state_hash=proposal.base_state_hash,
        approvals=tuple(
            (a.operator_id, a.SerializeToString(deterministic=True)) for a in approvals
        ),
    )
    return dataclasses.replace(item, **changes)  # type: ignore[arg-type]
