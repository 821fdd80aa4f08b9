"""The audit log's writer (`AuditLog`): appends, group commit, checkpoints, head files.

Invariants: see the package docstring (the writer never extends a chain it cannot verify,
never resumes below its persisted head, returns from `append` only once its line is in the
file, and fsyncs every checkpoint before the call that wrote it returns).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from domain_core import canonical
from domain_core.contexts import PayloadType
from domain_core.errors import MalformedMessageError
from domain_core.signers import Signer
from domain_edge.audit._encoding import (
    _LOG_NAME,
    _MAX_DETAIL,
    _MAX_KEY_ID,
    _MAX_OPERATION,
    _MAX_PRINCIPAL,
    _MAX_RESULT,
    CHECKPOINT_TYPE,
    RECOVERY_OPERATION,
    AuditLogError,
    _canonical_json,
    _clip,
    _clip_context,
    _hash_of_unhashed,
    _layout,
    checkpoint_digest,
    format_time,
)
from domain_edge.audit._heads import AuditHead, head_file, persist_head, read_persisted_head
from domain_edge.audit._tail import _first_hash, _is_checkpoint_line, _read_tail, _record_hash_at
from domain_edge.audit._verify import _Broken, _ChainVerifier

log = logging.getLogger(__name__)

_WHAT_TO_DO: Final = (
    "keep both files as evidence; restore the log from a backup and restart. If it is lost "
    "for good, this host cannot resume its audit trail: remove it from the domain and enroll "
    "a replacement"
)


class AuditLog:
    """The append-only audit log of one host, resumed across restarts.

    Thread-safe. Every `append` adds one line and returns once it is written (no fsync). A
    signed checkpoint is added after `checkpoint_every` records, once
    `checkpoint_interval_seconds` passed since the last one while records wait (on the next
    append, or with `background=True` by the log's own thread, which also takes the count
    rule off the appending threads), and on `close`. After each checkpoint is fsynced, its
    head is written beside the log (`<log>.head`); on open the log must reach that head.

    Two locks: `_lock` guards the chain (sequence, head, the queue of lines not yet written)
    and is never held across a system call, so building records never waits for the disk;
    `_write_lock` is held by the one thread writing the queue. A caller whose line someone
    else's batch already wrote returns without a system call of its own.
    """

    def __init__(
        self,
        path: Path,
        *,
        host_id: str,
        signer: Signer,
        checkpoint_every: int = 1000,
        checkpoint_interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        background: bool = False,
    ) -> None:
        if not isinstance(host_id, str) or not host_id:
            raise ValueError("host_id must be a non-empty str")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if checkpoint_interval_seconds <= 0:
            raise ValueError("checkpoint_interval_seconds must be > 0")
        self._path = Path(path)
        if not _LOG_NAME.fullmatch(self._path.name):
            raise ValueError(f"{self._path.name!r} is not a usable audit log file name")
        self._host_id = host_id
        self._signer = signer
        self._every = checkpoint_every
        self._interval = checkpoint_interval_seconds
        self._clock = clock
        self._background = background
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._head_lock = threading.Lock()
        self._pending: list[bytes] = []  # lines built but not yet written, in chain order
        self._queued = 0  # lines ever queued (records and checkpoints)
        self._written = 0  # lines of those written to the file
        # Checkpoints not yet known durable: (lines queued up to and with it, its head).
        self._marks: list[tuple[int, AuditHead]] = []
        self._latest: AuditHead | None = None  # the newest durable, publishable head
        self._persisted: AuditHead | None = None  # the head in the head file
        self._first: str | None = None  # the hash of record 1
        self._failed: str | None = None
        self._closed = False
        self._due = threading.Event()  # wakes the checkpoint thread
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        persisted = read_persisted_head(self._path, signer.public_key, host_id)
        if persisted is not None and not os.path.lexists(self._path):
            raise AuditLogError(
                f"audit log {self._path} is missing, but {head_file(self._path)} holds this "
                f"host's signed checkpoint of record {persisted.seq} ({persisted.time}): the log "
                f"was deleted or moved; refusing to start a new chain at record 1: {_WHAT_TO_DO}"
            )
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self._path, flags, 0o600)
        except OSError as error:
            raise AuditLogError(
                f"cannot open audit log {self._path}: {error.strerror or error}"
            ) from None
        try:
            os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditLogError(
                    f"audit log {self._path} is in use by another process; "
                    "only one node may write it"
                ) from None
            self._fd = fd
            self._resume(persisted)
        except BaseException:
            os.close(fd)
            raise
        if background:
            self._thread = threading.Thread(
                target=self._run_checkpoints, name=f"audit-{self._path.name}", daemon=True
            )
            self._thread.start()

    def __repr__(self) -> str:
        return f"AuditLog({str(self._path)!r}, host={self._host_id!r}, seq={self._seq})"

    @property
    def path(self) -> Path:
        """Where the log lives."""
        return self._path

    @property
    def seq(self) -> int:
        """The sequence number of the last record written (0 for an empty log)."""
        return self._seq

    @property
    def latest_head(self) -> AuditHead | None:
        """The newest signed checkpoint that is durable in the file (None before the first
        checkpoint that names its log): what the host publishes."""
        with self._lock:
            return self._latest

    def _resume(self, persisted: AuditHead | None) -> None:
        """Find the position to continue from, refusing a log whose tail does not verify or
        that does not reach the persisted head."""
        size = os.fstat(self._fd).st_size
        lines, torn = _read_tail(self._fd, size)
        verifier = _ChainVerifier(self._signer.public_key, self._host_id, self._path.name)
        try:
            if lines and _is_checkpoint_line(lines[0]):
                verifier.resume(lines[0])
                lines = lines[1:]
            for line in lines:
                verifier.feed(line)
        except _Broken as broken:
            raise AuditLogError(
                f"audit log {self._path} does not verify ({broken.reason}); refusing to extend "
                "a broken chain: keep the file as evidence, move it aside, and restart"
            ) from None
        self._seq = verifier.seq
        self._head = verifier.head
        self._first = verifier.first or (_first_hash(self._fd) if verifier.seq else None)
        self._checkpoints = verifier.checkpoints
        self._since_checkpoint = verifier.seq - verifier.checkpointed_seq
        self._last_checkpoint_time = self._clock()
        if verifier.last_checkpoint is not None:
            with contextlib.suppress(MalformedMessageError):  # a legacy checkpoint: no head
                self._latest = AuditHead.parse(verifier.last_checkpoint)
        if persisted is not None:
            self._check_reaches(persisted, size)
        self._persisted = persisted
        if torn:
            # A crash tore the last line. Cut it off (the bytes never formed a record) and say
            # so in the chain, with the cut bytes' hash, so nothing disappears unrecorded.
            os.ftruncate(self._fd, size - len(torn))
            os.fsync(self._fd)
            self._append_locked(
                principal=f"host/{self._host_id}",
                operation=RECOVERY_OPERATION,
                key_id="",
                context={},
                result="recovered",
                detail=(
                    f"cut off an incomplete last line of {len(torn)} bytes "
                    f"(sha256 {hashlib.sha256(torn).hexdigest()}) left by a crash"
                ),
            )
            self._checkpoint_locked()
            self._flush(self._queued, sync=True)
        elif self._latest is not None and self._latest != persisted:
            # The head file may lag the log's last checkpoint (a crash between the log's write
            # and the head file's): make the log durable, then raise the head file to it.
            os.fsync(self._fd)
            self._persist(self._latest)

    def _check_reaches(self, persisted: AuditHead, size: int) -> None:
        """AuditLogError unless the log holds the record `persisted` names, with its hash."""
        where = (
            f"{head_file(self._path)} holds this host's signed checkpoint of record "
            f"{persisted.seq} ({persisted.time})"
        )
        if persisted.seq > self._seq:
            empty = "is empty" if self._seq == 0 else f"ends at record {self._seq}"
            raise AuditLogError(
                f"audit log {self._path} {empty}, but {where}: records {self._seq + 1} to "
                f"{persisted.seq} were cut off; refusing to resume below the persisted head: "
                f"{_WHAT_TO_DO}"
            )
        if self._first is not None and not hmac.compare_digest(self._first, persisted.first):
            found: str | None = None
        elif persisted.seq == self._seq:
            found = self._head
        else:
            found = _record_hash_at(self._fd, size, persisted.seq)
        if found is None or not hmac.compare_digest(found, persisted.head):
            raise AuditLogError(
                f"audit log {self._path} does not hold the record its head names: {where}, "
                f"and the log's record {persisted.seq} has another hash (the log was replaced "
                f"or rewritten); refusing to resume: {_WHAT_TO_DO}"
            )

    def append(
        self,
        *,
        principal: str,
        operation: str,
        key_id: str = "",
        encryption_context: Mapping[str, str] | None = None,
        result: str = "ok",
        detail: str = "",
    ) -> int:
        """Record one operation and return its sequence number.

        `detail` is a short status or error text, never secret material. Over-long values are
        cut (and marked) rather than refused. Raises AuditLogError if the log cannot be written.
        """
        # Everything that does not depend on the chain is done before taking the lock.
        record_context = _clip_context(encryption_context)
        principal = _clip(principal, _MAX_PRINCIPAL, "principal")
        operation = _clip(operation, _MAX_OPERATION, "operation")
        key_id = _clip(key_id, _MAX_KEY_ID, "key_id")
        result = _clip(result, _MAX_RESULT, "result")
        detail = _clip(detail, _MAX_DETAIL, "detail")
        with self._lock:
            self._check_writable()
            seq = self._append_locked(
                principal=principal,
                operation=operation,
                key_id=key_id,
                context=record_context,
                result=result,
                detail=detail,
            )
            if self._background:
                sync = False
                if self._since_checkpoint >= self._every:
                    self._due.set()  # the checkpoint thread signs and fsyncs, not this caller
            else:
                sync = (
                    self._since_checkpoint >= self._every
                    or self._clock() - self._last_checkpoint_time >= self._interval
                ) and self._checkpoint_locked()
            ticket = self._queued
        self._flush(ticket, sync=sync)
        return seq

    def checkpoint(self) -> None:
        """Sign the current head with the host key and fsync (nothing to do if no new record)."""
        with self._lock:
            self._check_writable()
            sync = self._checkpoint_locked()
            ticket = self._queued
        self._flush(ticket, sync=sync)

    def checkpoint_if_due(self, now: float | None = None) -> bool:
        """Checkpoint if records wait and `checkpoint_interval_seconds` passed since the last
        checkpoint at `now` (default: the clock), or `checkpoint_every` records wait; True if
        one was written. The background thread calls this; a test passes `now`."""
        with self._lock:
            self._check_writable()
            moment = self._clock() if now is None else now
            due = self._since_checkpoint >= self._every or (
                self._since_checkpoint > 0 and moment - self._last_checkpoint_time >= self._interval
            )
            sync = due and self._checkpoint_locked(moment)
            ticket = self._queued
        if sync:
            self._flush(ticket, sync=True)
        return sync

    def _run_checkpoints(self) -> None:
        """The background thread: a due checkpoint within a quarter interval (at most 0.25 s)."""
        tick = min(0.25, self._interval / 4)
        while not self._stopping.is_set():
            self._due.wait(tick)
            self._due.clear()
            if self._stopping.is_set():
                return
            try:
                self.checkpoint_if_due()
            except AuditLogError as error:
                if not self._stopping.is_set():
                    log.error("audit log %s: no more checkpoints: %s", self._path, error)
                return

    def close(self) -> None:
        """Write a final checkpoint and release the file. Idempotent."""
        self._stopping.set()
        self._due.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        durable = -1
        with self._write_lock:
            with self._lock:
                if self._closed:
                    return
                self._closed = True  # appends from now on are refused
                try:
                    if self._failed is None:
                        self._checkpoint_locked()
                finally:
                    pending = self._pending
                    self._pending = []
            try:
                if self._failed is None:
                    if pending:
                        self._write(b"".join(pending))
                        self._written = self._queued
                        self._fsync(self._fd)
                    durable = self._written
            finally:
                os.close(self._fd)
        if durable >= 0:
            self._publish_durable(durable)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- under the lock ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise AuditLogError(f"audit log {self._path} is closed")
        if self._failed is not None:
            raise AuditLogError(
                f"audit log {self._path} failed earlier ({self._failed}); restart the node"
            )

    def _append_locked(
        self,
        *,
        principal: str,
        operation: str,
        key_id: str,
        context: dict[str, str],
        result: str,
        detail: str,
    ) -> int:
        seq = self._seq + 1
        head, tail = _layout(
            context,
            detail,
            self._host_id,
            key_id,
            operation,
            self._head,
            principal,
            result,
            seq,
            format_time(self._clock()),
        )
        # record_hash of the record, and its line, from one encoding of the fields.
        digest = _hash_of_unhashed((head + tail).encode("ascii"))
        self._pending.append(f'{head},"hash":"{digest}"{tail}\n'.encode("ascii"))
        self._queued += 1
        self._seq = seq
        self._head = digest
        if seq == 1:
            self._first = digest
        self._since_checkpoint += 1
        return seq

    def _checkpoint_locked(self, now: float | None = None) -> bool:
        """Queue a signed checkpoint of the head, made at `now` (default: the clock); True if
        one was queued (it needs an fsync)."""
        if self._since_checkpoint == 0:
            return False
        if now is None:
            now = self._clock()
        checkpoint: dict[str, Any] = {
            "type": CHECKPOINT_TYPE,
            "host": self._host_id,
            "seq": self._seq,
            "head": self._head,
            "count": self._checkpoints + 1,
            "time": format_time(now),
        }
        if self._first is not None:  # (always, but for a legacy file whose start is unreadable)
            checkpoint["log"] = self._path.name
            checkpoint["first"] = self._first
        message = canonical.signing_input(
            PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(checkpoint)
        )
        checkpoint["signature"] = self._signer.sign(message).hex()
        line = _canonical_json(checkpoint)
        self._pending.append(line + b"\n")
        self._queued += 1
        self._checkpoints += 1
        self._since_checkpoint = 0
        self._last_checkpoint_time = now
        if self._first is not None:
            self._marks.append(
                (
                    self._queued,
                    AuditHead(
                        host=self._host_id,
                        log=self._path.name,
                        first=self._first,
                        seq=self._seq,
                        head=self._head,
                        count=checkpoint["count"],
                        time=checkpoint["time"],
                        signature=checkpoint["signature"],
                        raw=line,
                    ),
                )
            )
        return True

    # --- heads -----------------------------------------------------------------------------------

    def _publish_durable(self, durable: int) -> None:
        """The first `durable` lines are fsynced: their newest checkpoint becomes the latest
        head and goes to the head file."""
        with self._lock:
            done = [head for upto, head in self._marks if upto <= durable]
            if not done:
                return
            self._marks = [(upto, head) for upto, head in self._marks if upto > durable]
            head = done[-1]
            if self._latest is None or head.count > self._latest.count:
                self._latest = head
        self._persist(head)

    def _persist(self, head: AuditHead) -> None:
        """Raise the head file to `head` (never lower it); a failure stops the log."""
        with self._head_lock:
            known = self._persisted
            if known is not None and (known.seq, known.count) >= (head.seq, head.count):
                return
            try:
                persist_head(self._path, head)
            except OSError as error:
                self._failed = f"writing {head_file(self._path)} failed: {error.strerror or error}"
                raise AuditLogError(f"audit log {self._path}: {self._failed}") from None
            self._persisted = head

    # --- group commit --------------------------------------------------------------------------

    def _flush(self, ticket: int, *, sync: bool) -> None:
        """Return once the first `ticket` queued lines are in the file (and, if `sync`, on
        disk, with the head file raised to the newest checkpoint among them); raise
        AuditLogError if they cannot be, in which case the log refuses appends."""
        with self._write_lock:
            if self._written < ticket:
                if self._failed is not None or self._closed:
                    # An earlier batch holding our line failed, or close() ran and failed.
                    self._check_writable()
                with self._lock:
                    batch = self._pending
                    self._pending = []
                    upto = self._queued
                self._write(batch[0] if len(batch) == 1 else b"".join(batch))
                self._written = upto
            if not sync or self._closed:
                return  # (close() wrote and fsynced whatever was queued before it)
            # fsync a duplicate outside the write lock: writers go on meanwhile, and close()
            # cannot pull the descriptor from under the fsync.
            sync_fd = os.dup(self._fd)
            durable = self._written
        try:
            self._fsync(sync_fd)
        finally:
            os.close(sync_fd)
        self._publish_durable(durable)

    def _fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as error:
            self._failed = f"fsync failed: {error.strerror}"
            raise AuditLogError(f"audit log {self._path}: {self._failed}") from None

    def _write(self, line: bytes) -> None:
        """One write of a whole line; any failure leaves the log refusing further appends."""
        try:
            written = os.write(self._fd, line)
            if written == len(line):
                return  # the usual case: the whole line in one write
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = memoryview(line)[written:]
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[written:]
        except OSError as error:
            self._failed = f"write failed: {error.strerror or error}"
            raise AuditLogError(f"audit log {self._path}: {self._failed}") from None
