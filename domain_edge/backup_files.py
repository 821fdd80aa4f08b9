"""Backup files of the coordinator's store: written whole or not at all, read within limits.

The format (proto/hsmdomain/v1/backup.proto, docs/runtime.md "Backups"): `BACKUP_MAGIC`, then
frames of a 4-byte big-endian length and one message each: a `BackupHeader`, the records, and
a last `BackupRecord` holding only the trailer, the SHA-256 of every byte before that frame.

Invariants kept here:
- a backup appears at its name complete or not at all: it is written to a temporary file
  (0600, created exclusively) in the same directory, fsynced, then linked to its name (never
  over an existing file) and the directory fsynced; a failure removes the temporary file;
- reading never trusts a length: a frame longer than its limit (`MAX_BACKUP_HEADER_BYTES`,
  `MAX_BACKUP_RECORD_BYTES`) is refused before anything is read into memory, a frame cut
  short, a message that does not parse, a missing or wrong trailer and bytes after the trailer
  are refused, each with a `BackupError` that says what is wrong; one record is in memory at
  a time, whatever the file's size;
- `VerifiedBackup` hands a record on only after `domain_core.backup.BackupVerifier` (and, for
  an audit head, its host's signature) verified it, and its iteration ends normally only when
  the trailer's digest matched and every count was the header's: a consumer that commits only
  then (a restore) never keeps anything of a damaged or forged file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Self, TypeVar

from google.protobuf.message import DecodeError, Message

from domain_core.backup import BackupSummary, BackupVerifier, KeyFacts
from domain_core.errors import BackupError, HsmDomainError, MalformedMessageError
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_BACKUP_HEADER_BYTES,
    MAX_BACKUP_RECORD_BYTES,
    Limits,
)
from domain_core.model import SealedState
from domain_edge.audit import AuditHead
from domain_edge.files import SECRET_MODE, fsync_directory
from domain_proto import backup_pb2

__all__ = [
    "BACKUP_MAGIC",
    "BackupReader",
    "BackupWriter",
    "VerifiedBackup",
    "verify_backup",
]

BACKUP_MAGIC: Final = b"HSMDBK\x00\x01"
_LENGTH: Final = struct.Struct(">I")
_PROGRESS_EVERY: Final = 1000

Progress = Callable[[str], None]
_M = TypeVar("_M", bound=Message)


def _frame(message: Message, limit: int, what: str) -> bytes:
    data = message.SerializeToString(deterministic=True)
    if len(data) > limit:
        raise BackupError(f"{what} is {len(data)} bytes, above the backup limit of {limit}")
    return _LENGTH.pack(len(data)) + data


class BackupWriter:
    """Writes one backup file (see the module invariants); use it as a context manager and
    call `commit` once every record is written."""

    def __init__(self, path: Path, header: backup_pb2.BackupHeader) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(
                errno.EEXIST, "a file of that name exists already; choose another name", str(path)
            )
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(self._tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, SECRET_MODE)
        os.fchmod(fd, SECRET_MODE)
        self._out = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()
        self._committed = False
        self._put(BACKUP_MAGIC)
        self._put(_frame(header, MAX_BACKUP_HEADER_BYTES, "the backup header"))

    def _put(self, data: bytes) -> None:
        self._out.write(data)
        self._digest.update(data)

    def write(self, record: backup_pb2.BackupRecord) -> None:
        """Append one record (not the trailer)."""
        if record.WhichOneof("item") in (None, "trailer"):
            raise ValueError("write() takes a state, proposal, key, hsa or audit_head record")
        self._put(_frame(record, MAX_BACKUP_RECORD_BYTES, f"a {record.WhichOneof('item')}"))

    def commit(self) -> bytes:
        """Write the trailer, make the file durable and give it its name; the file's digest."""
        digest = self._digest.digest()
        trailer = backup_pb2.BackupRecord(trailer=backup_pb2.BackupTrailer(sha256=digest))
        self._out.write(_frame(trailer, MAX_BACKUP_HEADER_BYTES, "the trailer"))
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        os.link(self._tmp, self.path)  # never over an existing file
        self._tmp.unlink()
        fsync_directory(self.path.parent)
        self._committed = True
        return digest

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._out.closed:
            self._out.close()
        if not self._committed:
            self._tmp.unlink(missing_ok=True)


class BackupReader:
    """Reads the frames of one backup stream within their limits (see the module invariants)."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self._in = stream
        self._name = name
        self._digest = hashlib.sha256()
        self._offset = 0
        magic = self._read(len(BACKUP_MAGIC), "the file's first bytes")
        if magic != BACKUP_MAGIC:
            raise BackupError(f"{name} is not a backup of an HSM domain (it does not start as one)")
        self.header = self._message(backup_pb2.BackupHeader, MAX_BACKUP_HEADER_BYTES, "the header")

    def _read(self, size: int, what: str) -> bytes:
        data = self._in.read(size)
        if len(data) != size:
            raise BackupError(
                f"{self._name} ends at byte {self._offset + len(data)}, inside {what}: the file "
                "is cut short (an incomplete copy?)"
            )
        self._digest.update(data)
        self._offset += size
        return data

    def _message(self, message_type: type[_M], limit: int, what: str) -> _M:
        at = self._offset
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size, f"the length of {what}"))
        if length > limit:
            raise BackupError(
                f"{self._name}: {what} at byte {at} claims {length} bytes, above the limit of "
                f"{limit}: the file is damaged or not a backup"
            )
        data = self._read(length, what)
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError:
            raise BackupError(f"{self._name}: {what} at byte {at} does not parse") from None
        return message

    def records(self) -> Iterator[backup_pb2.BackupRecord]:
        """Every record up to the trailer; the trailer and the end of the file are checked."""
        index = 0
        while True:
            index += 1
            expected = self._digest.digest()
            record = self._message(
                backup_pb2.BackupRecord, MAX_BACKUP_RECORD_BYTES, f"record {index}"
            )
            if record.WhichOneof("item") == "trailer":
                if record.trailer.sha256 != expected:
                    raise BackupError(
                        f"{self._name}: the SHA-256 in its trailer does not match its content: "
                        "the file was damaged or changed"
                    )
                if self._in.read(1):
                    raise BackupError(f"{self._name} holds bytes after its trailer")
                return
            yield record


class VerifiedBackup:
    """One backup file read once, every record verified before it is handed on.

    `records()` yields the records in file order; it ends normally only after the trailer and
    the counts checked out, and then `summary` is set. `on_key` receives the facts of every
    key record that verified; `progress` a line now and then.
    """

    def __init__(
        self,
        path: Path,
        genesis: bytes,
        limits: Limits = DEFAULT_LIMITS,
        *,
        on_key: Callable[[KeyFacts], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.path = Path(path)
        try:
            pinned = SealedState.from_bytes(genesis, limits)
        except HsmDomainError as error:
            raise BackupError(f"the genesis state given is not a valid state: {error}") from None
        self._verifier = BackupVerifier(pinned, limits, on_key=on_key)
        self._progress = progress
        self._stream: BinaryIO | None = None
        self.summary: BackupSummary | None = None
        self.digest = b""

    def __enter__(self) -> Self:
        self._stream = self.path.open("rb")
        try:
            self._reader = BackupReader(self._stream, str(self.path))
            self._verifier.header(self._reader.header)
        except BaseException:
            self._stream.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            self._stream.close()

    @property
    def header(self) -> backup_pb2.BackupHeader:
        """The header (checked against the pinned genesis)."""
        return self._reader.header

    def records(self) -> Iterator[backup_pb2.BackupRecord]:
        """The verified records (see the class docstring)."""
        for count, record in enumerate(self._reader.records(), start=1):
            self._verifier.record(record)
            if record.WhichOneof("item") == "audit_head":
                self._check_audit_head(record.audit_head)
            if self._progress is not None and count % _PROGRESS_EVERY == 0:
                self._progress(f"verified {count} records of {self.path.name}")
            yield record
        self.summary = self._verifier.finish()

    def _check_audit_head(self, item: backup_pb2.BackupAuditHead) -> None:
        """The checkpoint is the head it is kept as, signed by its host (under a key a
        verified state listed for it)."""
        where = f"audit head of {item.host_id!r} {item.log[:64]!r}"
        try:
            head = AuditHead.parse(item.checkpoint)
        except MalformedMessageError as error:
            raise BackupError(f"{where}: not a signed checkpoint ({error})") from None
        if (head.host, head.log, head.seq) != (item.host_id, item.log, item.seq):
            raise BackupError(f"{where}: its checkpoint is {head.describe()[:160]}")
        for key in self._verifier.host_keys_ever(item.host_id):
            try:
                head.verify(key)
            except HsmDomainError:
                continue
            return
        raise BackupError(f"{where}: its signature does not verify under the host's key")


def verify_backup(
    path: Path,
    genesis: bytes,
    limits: Limits = DEFAULT_LIMITS,
    *,
    on_key: Callable[[KeyFacts], None] | None = None,
    progress: Progress | None = None,
) -> BackupSummary:
    """Verify a whole backup file against the pinned genesis state `genesis` (its bytes);
    BackupError (or OSError) if it does not verify."""
    with VerifiedBackup(path, genesis, limits, on_key=on_key, progress=progress) as backup:
        for _ in backup.records():
            pass
        if backup.summary is None:  # records() sets it when the file ends well
            raise BackupError(f"{path}: the backup did not end")
        return backup.summary
