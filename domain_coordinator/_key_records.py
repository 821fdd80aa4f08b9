"""Key records at the coordinator: stored, served and deleted for the HSAs of the head.

Invariants:
- a key record is stored (`put`) only if it verifies as far as a coordinator can verify
  without secrets: its metadata parses and names this domain and the key (`_requests`), it
  is signed by the calling host, that host is in the verified head and the signature
  verifies under its key from the head, and no token is under a generation the head has
  retired. It never replaces a stored record with a lower metadata version, nor with the
  same version and other metadata bytes (a re-wrap keeps the metadata and may change tokens
  and signature). A create counts the creator's live keys (`Limits.max_keys_per_principal`);
- a write is idempotent: its key is the signed record and the revision it expected. A retry
  of a write that was stored (its answer lost) finds those very bytes stored at the next
  revision and gets that revision, never a second write; anything else is a conflict as
  before;
- the fences (`_fences`) are checked with the write, which the store makes only while they
  are still at the revision checked (compare-and-swap, no lock held across the write): a host
  being removed writes nothing, nothing is stored under a generation being retired;
- `delete` deletes only a stored record whose signature verifies and whose signed metadata
  says PENDING_DELETION with a date that has passed; a deleted record stays as a tombstone
  (never served, its id never created again) for `tombstone_seconds`, then it is purged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from domain_coordinator._fences import Fences
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, FencesChangedError, iso_date
from domain_core import keytokens
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnknownSignerError,
    VerificationError,
)
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_proto import keys_pb2, services_pb2

log = logging.getLogger(__name__)

FENCE_ATTEMPTS = 8  # checks against fences another replica keeps changing, before giving up


@dataclass(kw_only=True, eq=False, repr=False)
class KeyRecords:
    """The key records HSAs put and read (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    fences: Fences
    limits: Limits
    now: Callable[[], int]
    tombstone_seconds: int

    def get(self, key_id: str) -> keys_pb2.KeyRecord:
        """The stored record of a live key, with its revision."""
        entry = self.store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        record = keys_pb2.KeyRecord.FromString(entry.record)
        record.revision = entry.revision
        return record

    def put(
        self,
        caller: str,
        record: keys_pb2.KeyRecord,
        checked: tuple[str, bytes, keys_pb2.KeyMetadata],
        expected: int,
    ) -> services_pb2.PutKeyResponse:
        """Store a record the calling host signed (`checked`: its key id, bytes to store and
        metadata, from `_requests.key_record`), with a compare-and-swap on its revision
        (0: create)."""
        key_id, _, metadata = checked
        head = self.chain.head
        self._check_signature(record, key_id, head, writer=caller)
        generations = {t.domain_key_generation for t in record.tokens}
        oldest = head.manifest.message.key_generations[0].generation
        if generations and min(generations) < oldest:
            # A lagging HSA: no HSA could open it (a newer generation than the head's may be a
            # state this coordinator has not adopted yet; the HSAs judge those).
            raise FailedPreconditionError(
                f"the record of key {key_id} is sealed under domain key generation "
                f"{min(generations)}, which the domain retired (it holds {oldest} and newer at "
                f"version {head.version}): the writing HSA is behind; it catches up, retry"
            )
        for _ in range(FENCE_ATTEMPTS):
            try:
                revision = self._put_fenced(caller, record, checked, expected, generations)
            except FencesChangedError:
                self.fences.mark_stale()  # another replica fenced meanwhile: check again
                continue
            break
        else:
            raise ConflictError(f"the fences changed on every attempt to store key {key_id}; retry")
        log.info(
            "key %s stored at revision %d (metadata version %d) by %s",
            key_id,
            revision,
            metadata.metadata_version,
            caller,
        )
        return services_pb2.PutKeyResponse(revision=revision)

    def _put_fenced(
        self,
        caller: str,
        record: keys_pb2.KeyRecord,
        checked: tuple[str, bytes, keys_pb2.KeyMetadata],
        expected: int,
        generations: set[int],
    ) -> int:
        """Check the write against the fences and store it, naming the fences' revision (the
        store refuses it with FencesChangedError if another replica changed them since); a
        replay of a stored write gets its revision."""
        key_id, raw, metadata = checked
        fences, fences_revision = self.fences.current()
        if caller in fences.hosts:
            raise PermissionDeniedError(
                f"{caller} is being removed from the domain ({fences.hosts[caller]}): it "
                "may not write key records; use another HSA"
            )
        retiring = sorted(generations & fences.generations.keys())
        if retiring:
            raise FailedPreconditionError(
                f"the record of key {key_id} is sealed under domain key generation "
                f"{retiring[0]}, which is being retired "
                f"({fences.generations[retiring[0]]}): the writing HSA is behind; it "
                "catches up, retry"
            )
        if expected:
            self._check_replacement(key_id, expected, metadata, record.metadata)
        try:
            return self.store.put_key(
                key_id,
                raw,
                expected,
                creator=metadata.creator if expected == 0 else "",
                creator_limit=self.limits.max_keys_per_principal,
                fences_revision=fences_revision,
            )
        except FencesChangedError:
            raise
        except (AlreadyExistsError, ConflictError):
            replayed = self.store.get_key(key_id)
            if (
                replayed is None
                or replayed.record != raw
                or replayed.revision != expected + 1  # the very write it asked for
            ):
                raise
            # A retry after a lost answer (perhaps to another replica): this very
            # signed record is stored; answer as the first call would have.
            log.info("key %s: a retried write, stored already", key_id)
            return replayed.revision

    def _check_signature(
        self, record: keys_pb2.KeyRecord, key_id: str, head: SealedState, *, writer: str = ""
    ) -> None:
        """The record is signed by a host of the head (by `writer`, if given), and the
        signature verifies under that host's key from the head."""
        signer = record.signer_host_id
        if writer and signer != writer:
            raise PermissionDeniedError(
                f"the record of key {key_id} is signed by {signer[:64]!r}, not by {writer}, "
                "which puts it: an HSA writes only records it signed itself"
            )
        try:
            keytokens.verify_key_record_signature(
                record, self.chain.domain_id, head.manifest.host_signing_keys
            )
        except UnknownSignerError:
            raise UnknownSignerError(
                f"the record of key {key_id} is signed by {signer[:64]!r}, which is not a host "
                f"of the domain at version {head.version}"
            ) from None
        except BadSignatureError:
            raise BadSignatureError(
                f"the signature of {signer} over the record of key {key_id} does not verify"
            ) from None

    def _check_replacement(
        self, key_id: str, expected: int, metadata: keys_pb2.KeyMetadata, metadata_bytes: bytes
    ) -> None:
        """Refuse to replace the stored record (at revision `expected`) with an older
        metadata version, or with other metadata bytes at the same version."""
        entry = self.store.get_key(key_id)
        if entry is None or entry.revision != expected:
            return  # the store's compare-and-swap answers
        try:
            stored_bytes = keys_pb2.KeyRecord.FromString(entry.record).metadata
            stored = keys_pb2.KeyMetadata.FromString(stored_bytes)
        except DecodeError:
            return  # a damaged record may be replaced by one that verifies
        new, old = metadata.metadata_version, stored.metadata_version
        if new < old:
            raise FailedPreconditionError(
                f"key {key_id} is at metadata version {old} here; a record with version {new} "
                "would roll it back: read the key again"
            )
        if new == old and metadata_bytes != stored_bytes:
            raise FailedPreconditionError(
                f"key {key_id} has other metadata at version {new} here; a change must raise "
                "the metadata version: read the key again"
            )

    def page(self, limit: int, after: str) -> services_pb2.ListKeyRecordsResponse:
        """Up to `limit` live records with ids after `after`, within the message limit."""
        entries = self.store.list_keys(limit + 1, after)
        response = services_pb2.ListKeyRecordsResponse()
        budget = self.limits.max_message_bytes - 1024
        last_key = ""
        for entry in entries[:limit]:
            if len(entry.record) + 32 > budget and response.records:
                response.next_page_token = last_key  # the rest does not fit in one answer
                return response
            budget -= len(entry.record) + 32
            record = keys_pb2.KeyRecord.FromString(entry.record)
            record.revision = entry.revision
            response.records.append(record)
            last_key = entry.key_id
        if len(entries) > limit:
            response.next_page_token = last_key
        return response

    def delete(
        self, caller: str, key_id: str, expected: int
    ) -> services_pb2.DeleteKeyRecordResponse:
        """Delete a key whose scheduled deletion date has passed (compare-and-swap).

        The stored record must be signed by a host of the head (its signature verifying under
        that host's key) and its signed metadata must say PENDING_DELETION with a deletion
        date that has passed by this coordinator's clock. The record is kept as a tombstone
        for the waiting period (`tombstone_seconds`), then purged.
        """
        entry = self.store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        if entry.revision != expected:
            raise ConflictError(
                f"key {key_id} is at revision {entry.revision}, not "
                f"{expected}: it changed meanwhile; read it again and retry"
            )
        metadata = self._deletable_metadata(key_id, entry.record)
        now = self.now()
        if metadata.deletion_at > now:
            raise FailedPreconditionError(
                f"key {key_id} is scheduled for deletion at {iso_date(metadata.deletion_at)}, "
                "which has not passed yet"
            )
        self.store.delete_key(key_id, expected, now)
        log.info(
            "key %s deleted at revision %d by %s (scheduled for %s); kept as a tombstone for "
            "%d days",
            key_id,
            expected,
            caller,
            iso_date(metadata.deletion_at),
            self.tombstone_seconds // 86_400,
        )
        return services_pb2.DeleteKeyRecordResponse()

    def _deletable_metadata(self, key_id: str, stored: bytes) -> keys_pb2.KeyMetadata:
        """The signed metadata of a stored record that may be deleted once its date passed:
        it parses, verifies under a host of the head, names this key and domain, and says
        PENDING_DELETION; FAILED_PRECONDITION otherwise."""
        metadata = keys_pb2.KeyMetadata()
        try:
            record = keys_pb2.KeyRecord.FromString(stored)
            metadata.ParseFromString(record.metadata)
        except DecodeError:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} does not parse; not deleting it"
            ) from None
        try:
            self._check_signature(record, key_id, self.chain.head)
        except VerificationError as error:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} is not signed by a host of the domain "
                f"({error.message}); not deleting it"
            ) from None
        if metadata.key_id != key_id or metadata.domain_id != self.chain.domain_id:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} names another key or domain; not deleting it"
            )
        if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
            raise FailedPreconditionError(f"key {key_id} is not pending deletion")
        return metadata

    def purge_tombstones(self) -> None:
        """Remove the tombstones of keys deleted longer ago than their waiting period."""
        purged = self.store.purge_deleted_keys(self.now() - self.tombstone_seconds)
        if purged:
            log.info(
                "purged %d deleted key records, deleted more than %d days ago",
                purged,
                self.tombstone_seconds // 86_400,
            )
