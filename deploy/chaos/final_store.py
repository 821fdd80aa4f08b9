"""What the store of a domain with coordinator replicas holds at the end of a chaos run.

`read_store` takes a backup of the store (`python -m domain_coordinator.store_admin backup`,
the coordinator's own store tool, as `hsm-domain backup` runs it: the launcher never imports
the coordinator) once the run settled, then reads it back with `domain_edge.backup_files`,
which verifies every record before handing it on: the chain from the pinned genesis (every
state as an HSA verifies it), every key record signed by a member host, the counts and the
file's digest. From it come the `StoreObservations` that `store_checks` compares the history
with: every state (version, hash, proposal), every proposal's state, every key record's
metadata.

Invariants: the store is read directly (a config naming the etcd members themselves, not the
run's proxies, written for the tool in DIR/chaos/ and removed afterwards); a store that cannot
be read, or whose backup does not verify, is reported as that error, never as an empty store;
the backup file (public and sealed data only) stays in DIR/chaos/ for a post-mortem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from deploy._store_admin import run_store_tool
from deploy.chaos._verdicts import ChainEntry
from deploy.chaos.store_checks import StoredKey, StoredProposal, StoreObservations
from deploy.chaos.workload import idempotency_marker
from deploy.init import DomainLayout
from domain_core.errors import HsmDomainError
from domain_core.model import SealedState
from domain_edge.backup_files import VerifiedBackup
from domain_edge.config import CoordinatorConfig, TlsFiles
from domain_proto import backup_pb2, keys_pb2, services_pb2

__all__ = ["read_store"]

_STATE_PREFIX = "PROPOSAL_STATE_"


def _direct_config(layout: DomainLayout, path: Path) -> None:
    """A config for the store tool: the first coordinator's, naming the etcd members directly
    and every file by its absolute path."""
    assert layout.etcd is not None
    config = CoordinatorConfig.load(layout.store_config)
    replace(
        config,
        store=layout.etcd.store_spec,
        genesis_state=str(config.path(config.genesis_state)),
        tls=TlsFiles(
            ca=str(config.path(config.tls.ca)),
            cert=str(config.path(config.tls.cert)),
            key=str(config.path(config.tls.key)),
        ),
    ).save(path)


def _stored_key(item: backup_pb2.BackupKey) -> StoredKey:
    metadata = keys_pb2.KeyMetadata.FromString(keys_pb2.KeyRecord.FromString(item.record).metadata)
    return StoredKey(
        description=metadata.description,
        metadata_version=metadata.metadata_version,
        backing_version=metadata.current_backing_version,
        deleted=item.deleted_at != 0,
        idempotency_key=idempotency_marker(metadata.description),
    )


def _observe(backup_file: Path, genesis: bytes) -> StoreObservations:
    """Every state, proposal and key record of a backup file, each verified first."""
    chain: list[ChainEntry] = []
    proposals: dict[str, StoredProposal] = {}
    keys: dict[str, StoredKey] = {}
    with VerifiedBackup(backup_file, genesis) as backup:
        for record in backup.records():
            kind = record.WhichOneof("item")
            if kind == "state":
                state = SealedState.from_bytes(record.state.state)
                proposal = state.proposal.id.hex() if state.proposal is not None else ""
                chain.append(ChainEntry(state.version, state.hash.hex(), proposal))
            elif kind == "proposal":
                item = record.proposal
                name = services_pb2.ProposalState.Name(item.state)
                proposals[item.proposal_id.hex()] = StoredProposal(
                    name.removeprefix(_STATE_PREFIX).lower(), item.applied_version
                )
            elif kind == "key":
                keys[record.key.key_id] = _stored_key(record.key)
        if backup.summary is None:
            return StoreObservations(error=f"{backup_file}: the backup did not end")
    return StoreObservations(chain=chain, proposals=proposals, keys=keys)


def read_store(
    layout: DomainLayout, backup_file: Path, progress: Callable[[str], None]
) -> StoreObservations:
    """Back the store up to `backup_file` (replaced if there) and read it back, verified."""
    config = backup_file.with_suffix(".config.json")
    backup_file.unlink(missing_ok=True)
    try:
        _direct_config(layout, config)
        run_store_tool(["backup", "--config", str(config), str(backup_file)], progress)
        return _observe(backup_file, layout.genesis_state.read_bytes())
    except (HsmDomainError, OSError, ValueError) as error:
        return StoreObservations(error=f"{type(error).__name__}: {error}"[:500])
    finally:
        config.unlink(missing_ok=True)
