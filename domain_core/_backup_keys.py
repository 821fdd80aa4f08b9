"""The checks a backup's key records get, without any domain key (`domain_core.backup`).

Invariants: a record is well formed only as an HSA would read it (see `key_record_form`); a
live record verifies only under the key of a host of the newest state and with every token
under a generation that state keeps; a tombstone only under a key some verified state listed
for its signer, with signed metadata saying its deletion was due. Every failure is a
`BackupError` naming the record and what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from google.protobuf.message import DecodeError

from domain_core import crypto
from domain_core.errors import BackupError, HsmDomainError
from domain_core.keytokens import TOKEN_SALT_BYTES, verify_key_record_signature
from domain_core.limits import MAX_KEY_RECORD_BYTES, MAX_TOKENS_PER_KEY
from domain_core.model import Manifest
from domain_core.signers import PublicKey
from domain_proto import backup_pb2, keys_pb2

__all__ = ["check_live", "check_tombstone", "fail", "key_record_form"]

_SEALED_TOKEN_BYTES: Final = crypto.AES_KEY_BYTES + crypto.GCM_TAG_BYTES
_SHOWN: Final = 80


def fail(where: str, why: str) -> BackupError:
    """The error for a backup item (`where`) that does not verify (`why`)."""
    return BackupError(f"{where}: {why}")


def key_record_form(
    item: backup_pb2.BackupKey, domain_id: str, where: str
) -> tuple[keys_pb2.KeyRecord, keys_pb2.KeyMetadata]:
    """The record and its metadata, if well formed (as an HSA would read it)."""
    if len(item.record) > MAX_KEY_RECORD_BYTES:
        raise fail(where, f"its record is larger than {MAX_KEY_RECORD_BYTES} bytes")
    record = keys_pb2.KeyRecord()
    metadata = keys_pb2.KeyMetadata()
    try:
        record.ParseFromString(item.record)
        metadata.ParseFromString(record.metadata)
    except DecodeError:
        raise fail(where, "its record or metadata does not parse") from None
    if metadata.key_id != item.key_id or metadata.domain_id != domain_id:
        raise fail(where, "its metadata names another key or domain")
    if metadata.metadata_version < 1:
        raise fail(where, "its metadata version is 0")
    current = metadata.current_backing_version
    versions = sorted(t.backing_version for t in record.tokens)
    if not 1 <= current <= MAX_TOKENS_PER_KEY or versions != list(range(1, current + 1)):
        raise fail(where, f"it holds tokens for backing versions {versions[:10]}, not 1..{current}")
    for token in record.tokens:
        if (
            token.key_id != item.key_id
            or token.domain_key_generation < 1
            or len(token.nonce) != crypto.GCM_NONCE_BYTES
            or len(token.salt) != TOKEN_SALT_BYTES
            or len(token.ciphertext) != _SEALED_TOKEN_BYTES
        ):
            raise fail(where, f"its token of backing version {token.backing_version} is malformed")
    return record, metadata


def check_live(record: keys_pb2.KeyRecord, manifest: Manifest, where: str) -> None:
    """Signed by a host of the newest state (`manifest`); tokens under generations it keeps."""
    try:
        verify_key_record_signature(record, manifest.domain_id, manifest.host_signing_keys)
    except HsmDomainError as error:
        raise fail(where, f"{error.message} (version {manifest.version})") from None
    kept = {g.generation for g in manifest.message.key_generations}
    retired = sorted({t.domain_key_generation for t in record.tokens} - kept)
    if retired:
        raise fail(
            where,
            f"it is sealed under domain key generation {retired[0]}, which version "
            f"{manifest.version} does not keep: no HSA can open it",
        )


def check_tombstone(
    record: keys_pb2.KeyRecord,
    metadata: keys_pb2.KeyMetadata,
    deleted_at: int,
    host_keys: Mapping[str, Mapping[bytes, PublicKey]],
    where: str,
) -> None:
    """Signed by a host of some verified state (`host_keys`: every key each host had); its
    signed metadata says the deletion was due by `deleted_at`."""
    keys = host_keys.get(record.signer_host_id, {})
    if not any(_signed_by(record, metadata.domain_id, key) for key in keys.values()):
        shown = record.signer_host_id[:_SHOWN] or "no host"
        raise fail(where, f"not signed by {shown!r} under a key of a host of any verified state")
    if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
        raise fail(where, "deleted, but its signed metadata does not say PENDING_DELETION")
    if metadata.deletion_at > deleted_at:
        raise fail(where, "deleted before the deletion date its signed metadata names")


def _signed_by(record: keys_pb2.KeyRecord, domain_id: str, key: PublicKey) -> bool:
    """Whether `record`'s signature verifies under `key` as its signer's."""
    try:
        verify_key_record_signature(record, domain_id, {record.signer_host_id: key})
    except HsmDomainError:
        return False
    return True
