"""An HSA's audit log: one hash-chained JSON line per operation, checkpoints signed by the host.

File format (JSON lines, each line canonical JSON: sorted keys, no spaces, ASCII only):
- a record: {"seq", "time", "host", "principal", "operation", "key_id", "context", "result",
  "detail", "prev", "hash"}; `seq` counts from 1 with no gap, `prev` is the previous record's
  `hash` (64 zeros for record 1), and `hash` is `record_hash` of every other field;
- a checkpoint: {"type": "checkpoint", "host", "seq", "head", "count", "time", "signature"};
  it states that record `seq` is the last record so far and has hash `head`; `count` numbers
  the checkpoints of the file from 1; `signature` is the host's signature over
  `canonical.signing_input(PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(...))`.

Invariants kept here:
- a record holds who did what to which key, with which encryption context and with what
  result; the API has no field for plaintext or key material, and `detail` is a short status
  text (callers pass error messages, which never hold secrets);
- one function (`record_hash`) defines a record's hash for the writer and the verifier, and
  one (`checkpoint_digest`) what a checkpoint signs;
- the writer never extends a chain it cannot verify: on open it checks the last checkpoint's
  signature and every line after it, and refuses to append (`AuditLogError`) to a log that
  does not verify, is held by another process, or failed to write; the only damage it
  repairs is a torn last line (a crash while writing), which it cuts off and records;
- an `append` returns only once its line is in the file (the page cache: no fsync per
  record, so a machine crash can lose the last records, a process crash cannot); lines are
  written in chain order by group commit: whoever holds the write lock writes every line
  queued so far in one `write` on an O_APPEND descriptor, so callers arriving together share
  one system call instead of queueing behind each other's; checkpoints are fsynced before
  the `append` or `checkpoint` that wrote them returns;
- the verifier names the first sequence number at which the file departs from a valid chain,
  with a reason a person can act on. Records after the last checkpoint are chained but not
  yet signed (`unsigned_tail`): anyone can rewrite them consistently, and cutting records
  off the end of the file (back to a checkpoint) leaves a valid, shorter log.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import grpc

from domain_core import canonical
from domain_core.errors import BadSignatureError, HsmDomainError, MalformedMessageError
from domain_core.signers import PublicKey, Signer

__all__ = [
    "AUDIT_LOG_FILE",
    "AuditLog",
    "AuditLogError",
    "AuditReport",
    "checkpoint_digest",
    "format_time",
    "record_hash",
    "verify_audit_log",
]

AUDIT_LOG_FILE: Final = "audit.log"
RECORD_HASH_CONTEXT: Final = b"hsm-domain/v1 audit-record\x00"
GENESIS_PREV: Final = "0" * 64
CHECKPOINT_TYPE: Final = "checkpoint"
RECOVERY_OPERATION: Final = "audit.recover"
RECORD_FIELDS: Final = frozenset(
    {
        "seq",
        "time",
        "host",
        "principal",
        "operation",
        "key_id",
        "context",
        "result",
        "detail",
        "prev",
        "hash",
    }
)
CHECKPOINT_FIELDS: Final = frozenset({"type", "host", "seq", "head", "count", "time", "signature"})

# Longest values a record keeps (characters); longer ones are cut and marked, never refused:
# an audit record must be written whatever a caller sent.
_MAX_PRINCIPAL: Final = 512
_MAX_OPERATION: Final = 64
_MAX_KEY_ID: Final = 512
_MAX_RESULT: Final = 64
_MAX_DETAIL: Final = 512
_MAX_CONTEXT_ENTRIES: Final = 64
_MAX_CONTEXT_KEY: Final = 256
_MAX_CONTEXT_VALUE: Final = 1024
_TRUNCATED: Final = "...(truncated)"
# A line longer than this cannot come from the writer; the verifier refuses to buffer it.
MAX_LINE_BYTES: Final = 1 << 20
_TAIL_CHUNK: Final = 64 * 1024
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_HEX: Final = re.compile(r"(?:[0-9a-f]{2}){1,256}")
_TIME: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class AuditLogError(HsmDomainError):
    """The audit log cannot be appended to (broken chain, held by another process, I/O error).

    An HSA that cannot audit must not serve: the operation fails rather than go unrecorded.
    """

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


# --- the one encoding --------------------------------------------------------------------------


def _canonical_json(value: object) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


# json's own C string encoder (what json.dumps uses with ensure_ascii): the same bytes.
_encode_str: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


def _record_parts(record: Mapping[str, Any]) -> tuple[str, str]:
    """The canonical JSON of a well-formed record without `hash`, split where `hash` goes
    (after `detail`): joined, the unhashed form; with `"hash":...` between them, the line."""
    return _layout(
        record["context"],
        record["detail"],
        record["host"],
        record["key_id"],
        record["operation"],
        record["prev"],
        record["principal"],
        record["result"],
        int(record["seq"]),
        record["time"],
    )


def _layout(
    context: Mapping[str, str],
    detail: str,
    host: str,
    key_id: str,
    operation: str,
    prev: str,
    principal: str,
    result: str,
    seq: int,
    time_text: str,
) -> tuple[str, str]:
    """`_record_parts` from the field values, in key order: the one definition of the layout.

    Byte for byte what `_canonical_json` gives (sorted keys, no spaces, ASCII escapes), at a
    fraction of the cost: the writer calls it for every record, on every Encrypt and Decrypt,
    without building a dict. The verifier checks each line against the generic encoder, and a
    test checks that both agree on arbitrary strings.
    """
    e = _encode_str
    pairs = ",".join(f"{e(k)}:{e(v)}" for k, v in sorted(context.items())) if context else ""
    head = f'{{"context":{{{pairs}}},"detail":{e(detail)}'
    tail = (
        f',"host":{e(host)},"key_id":{e(key_id)},"operation":{e(operation)},"prev":{e(prev)}'
        f',"principal":{e(principal)},"result":{e(result)},"seq":{seq},"time":{e(time_text)}}}'
    )
    return head, tail


def _record_json(record: Mapping[str, Any], *, with_hash: bool) -> bytes:
    """The canonical JSON of a well-formed record, with or without its `hash` field."""
    head, tail = _record_parts(record)
    middle = f',"hash":{_encode_str(record["hash"])}' if with_hash else ""
    return (head + middle + tail).encode("ascii")


def _hash_of_unhashed(unhashed: bytes) -> str:
    return hashlib.sha256(RECORD_HASH_CONTEXT + unhashed).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of a record: a fixed context string, then the canonical JSON of every field
    but `hash`. The one definition, used by the writer to make a record and by the verifier
    (after checking the record's fields and types) to check one."""
    return _hash_of_unhashed(_record_json(record, with_hash=False))


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> bytes:
    """The 32-byte digest a checkpoint signs: every field but `signature`, canonical JSON,
    domain-separated as an AUDIT_CHECKPOINT payload."""
    fields = {k: v for k, v in checkpoint.items() if k != "signature"}
    return canonical.digest(canonical.PayloadType.AUDIT_CHECKPOINT, _canonical_json(fields))


def format_time(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. `2026-01-01T00:00:00.123Z`.

    Exactly what `datetime.fromtimestamp(seconds, UTC)` shows (microseconds rounded half to
    even, then cut to milliseconds), with the whole-second part formatted once per second.
    """
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    elif micro < 0:
        whole, micro = whole - 1, micro + 1_000_000
    return f"{_format_second(int(whole))}.{micro // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _format_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _clip(value: str, limit: int, name: str) -> str:
    if type(value) is str and len(value) <= limit:
        return value  # the common case, first
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATED)] + _TRUNCATED


def _clip_context(context: Mapping[str, str] | None) -> dict[str, str]:
    if context is None or (type(context) is dict and not context):
        return {}
    if not isinstance(context, Mapping):
        raise TypeError("encryption_context must be a mapping of str to str")
    clipped: dict[str, str] = {}
    for key in sorted(context):
        if len(clipped) == _MAX_CONTEXT_ENTRIES:
            clipped[_TRUNCATED] = f"{len(context) - _MAX_CONTEXT_ENTRIES} more entries"
            break
        clipped[_clip(key, _MAX_CONTEXT_KEY, "context key")] = _clip(
            context[key], _MAX_CONTEXT_VALUE, "context value"
        )
    return clipped


# --- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditReport:
    """What `verify_audit_log` found.

    `records` and `checkpoints` count what verified (before the first bad line, if any).
    `first_bad_seq` is the sequence number at which the file first departs from a valid chain
    (the record that was edited, or the number expected where a record was removed, moved or
    duplicated); None when `ok`. `unsigned_tail` counts the verified records after the last
    valid checkpoint; `partial_line` is True when the file ends in an incomplete line (a crash
    while writing).
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str
    unsigned_tail: int
    partial_line: bool = False

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


class _Broken(Exception):
    """The chain breaks at `seq` for `reason` (internal to the verifier)."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record_shape(record: dict[str, Any], seq: int) -> None:
    missing = sorted(RECORD_FIELDS - set(record))
    extra = sorted(set(record) - RECORD_FIELDS)
    if missing or extra:
        what = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)[:200]}" if extra else "",
            )
            if part
        )
        raise _Broken(seq, f"record {seq} is malformed ({what})")
    for name in ("host", "principal", "operation", "key_id", "result", "detail"):
        if not isinstance(record[name], str):
            raise _Broken(seq, f"record {seq} is malformed: {name} is not a string")
    context = record["context"]
    if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
        raise _Broken(seq, f"record {seq} is malformed: context is not a map of strings")
    if not isinstance(record["time"], str) or not _TIME.fullmatch(record["time"]):
        raise _Broken(seq, f"record {seq} is malformed: time is not RFC 3339 UTC")
    for name in ("prev", "hash"):
        if not isinstance(record[name], str) or not _HEX64.fullmatch(record[name]):
            raise _Broken(seq, f"record {seq} is malformed: {name} is not 64 hex digits")


class _ChainVerifier:
    """Checks lines one by one; raises `_Broken` at the first that does not extend the chain."""

    def __init__(self, public_key: PublicKey, host_id: str | None) -> None:
        self.public_key = public_key
        self.host_id = host_id
        self.seq = 0  # last record seen
        self.head = GENESIS_PREV  # its hash
        self.checkpoints = 0
        self.checkpointed_seq = 0  # last record covered by a valid checkpoint

    def resume(self, line: bytes) -> None:
        """Start at a checkpoint line (the writer's resume): verify it and take its position."""
        checkpoint = self._parse(line)
        if checkpoint.get("type") != CHECKPOINT_TYPE or not all(
            _is_int(checkpoint.get(name)) and checkpoint[name] >= 1 for name in ("seq", "count")
        ):
            raise _Broken(1, "the last checkpoint is malformed")
        self.seq = checkpoint["seq"]
        self.head = str(checkpoint.get("head"))
        self.checkpoints = checkpoint["count"] - 1
        self.checkpointed_seq = self.seq
        self._check_checkpoint(checkpoint)

    def _parse(self, line: bytes) -> dict[str, Any]:
        expected = self.seq + 1
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise _Broken(
                expected,
                f"the line after record {self.seq} is not valid JSON "
                f"(corrupted, or an edit broke it); expected record {expected}",
            ) from None
        if not isinstance(value, dict):
            raise _Broken(expected, f"the line after record {self.seq} is not a JSON object")
        if _canonical_json(value) != line:
            raise _Broken(
                expected,
                f"the line after record {self.seq} is not in canonical form "
                "(the writer never produces that: it was edited)",
            )
        return value

    def feed(self, line: bytes) -> None:
        """Check one complete line (without its newline)."""
        value = self._parse(line)
        if "type" in value:
            if value["type"] != CHECKPOINT_TYPE:
                raise _Broken(self.seq + 1, f"the line after record {self.seq} has an unknown type")
            self._check_checkpoint(value)
        else:
            self._check_record(value)

    def _check_record(self, record: dict[str, Any]) -> None:
        expected = self.seq + 1
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise _Broken(expected, f"record {expected} is malformed: seq is not an integer")
        if seq != expected:
            if seq <= self.seq:
                how = f"record {seq} appears again (duplicated or moved back)"
            else:
                how = f"record {expected} is missing (removed, or moved after record {seq})"
            raise _Broken(expected, f"found record {seq} where record {expected} should be: {how}")
        _check_record_shape(record, seq)
        if self.host_id is None:
            self.host_id = record["host"]
        elif record["host"] != self.host_id:
            raise _Broken(
                seq, f"record {seq} names host {record['host'][:80]!r}, not {self.host_id!r}"
            )
        if not hmac.compare_digest(record_hash(record), record["hash"]):
            raise _Broken(seq, f"record {seq} was edited: its hash does not match its content")
        if record["prev"] != self.head:
            raise _Broken(
                seq,
                f"record {seq} does not follow record {seq - 1} (its prev link is broken): "
                f"a record was removed, inserted or replaced before it",
            )
        self.seq = seq
        self.head = record["hash"]

    def _check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        after = self.seq
        first_unsigned = self.checkpointed_seq + 1
        where = f"the checkpoint after record {after}"
        missing = sorted(CHECKPOINT_FIELDS - set(checkpoint))
        extra = sorted(set(checkpoint) - CHECKPOINT_FIELDS)
        if missing or extra:
            raise _Broken(after + 1, f"{where} is malformed (fields differ from a checkpoint)")
        if not _is_int(checkpoint["seq"]) or not _is_int(checkpoint["count"]):
            raise _Broken(after + 1, f"{where} is malformed: seq and count must be integers")
        if not isinstance(checkpoint["host"], str) or not isinstance(checkpoint["head"], str):
            raise _Broken(after + 1, f"{where} is malformed: host and head must be strings")
        if not isinstance(checkpoint["signature"], str) or not _HEX.fullmatch(
            checkpoint["signature"]
        ):
            raise _Broken(after + 1, f"{where} is malformed: signature is not lower-case hex")
        if self.host_id is None:
            self.host_id = checkpoint["host"]
        elif checkpoint["host"] != self.host_id:
            raise _Broken(after + 1, f"{where} names another host ({checkpoint['host'][:80]!r})")
        try:
            signature = bytes.fromhex(checkpoint["signature"])
            self.public_key.verify(
                signature,
                canonical.signing_input(
                    canonical.PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(checkpoint)
                ),
            )
        except (ValueError, BadSignatureError):
            raise _Broken(
                first_unsigned,
                f"{where} is not signed by {self.host_id}'s host key (forged or edited): "
                f"records from {first_unsigned} on cannot be trusted",
            ) from None
        if checkpoint["count"] != self.checkpoints + 1:
            raise _Broken(
                after + 1,
                f"{where} is number {checkpoint['count']}, expected {self.checkpoints + 1}: "
                "a checkpoint was removed or moved",
            )
        if checkpoint["seq"] > self.seq:
            raise _Broken(
                self.seq + 1,
                f"{where} covers records up to {checkpoint['seq']}: records from "
                f"{self.seq + 1} to {checkpoint['seq']} were removed (or the checkpoint moved)",
            )
        if checkpoint["seq"] < self.seq:
            raise _Broken(
                checkpoint["seq"] + 1,
                f"{where} covers records only up to {checkpoint['seq']}: records from "
                f"{checkpoint['seq'] + 1} to {self.seq} were inserted (or the checkpoint moved)",
            )
        if checkpoint["head"] != self.head:
            raise _Broken(
                first_unsigned,
                f"{where} (signed) does not match the chain: a record from {first_unsigned} to "
                f"{after} was edited and the hashes recomputed, or records were replaced",
            )
        self.checkpoints += 1
        self.checkpointed_seq = self.seq


def _lines(stream: Any) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, complete) for every line; the last may be incomplete."""
    while True:
        line: bytes = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1], True
        elif len(line) > MAX_LINE_BYTES:
            raise MalformedMessageError(f"a line is longer than {MAX_LINE_BYTES} bytes")
        else:
            yield line, False


def verify_audit_log(
    path: Path, public_key: PublicKey, *, host_id: str | None = None
) -> AuditReport:
    """Check a whole audit log: hashes, links, sequence, and checkpoints under `public_key`.

    `host_id`, if given, must be the host every record and checkpoint names. Raises
    `FileNotFoundError` for a missing file; any damage is reported, never raised.
    """
    verifier = _ChainVerifier(public_key, host_id)
    partial = False
    try:
        with open(path, "rb") as stream:
            for line, complete in _lines(stream):
                if not complete:
                    partial = True
                    break
                verifier.feed(line)
    except _Broken as broken:
        return AuditReport(
            ok=False,
            records=verifier.seq,
            checkpoints=verifier.checkpoints,
            first_bad_seq=broken.seq,
            reason=broken.reason,
            unsigned_tail=verifier.seq - verifier.checkpointed_seq,
        )
    except MalformedMessageError as error:
        return AuditReport(
            ok=False,
            records=verifier.seq,
            checkpoints=verifier.checkpoints,
            first_bad_seq=verifier.seq + 1,
            reason=f"after record {verifier.seq}: {error.message}",
            unsigned_tail=verifier.seq - verifier.checkpointed_seq,
        )
    unsigned = verifier.seq - verifier.checkpointed_seq
    parts = [f"{verifier.seq} records, {verifier.checkpoints} checkpoints, ok"]
    if unsigned:
        parts.append(f"{unsigned} records after the last checkpoint are not signed yet")
    if partial:
        parts.append(
            f"the file ends in an incomplete line after record {verifier.seq} "
            "(a crash while writing; the node cuts it off and records that when it restarts)"
        )
    return AuditReport(
        ok=True,
        records=verifier.seq,
        checkpoints=verifier.checkpoints,
        first_bad_seq=None,
        reason="; ".join(parts),
        unsigned_tail=unsigned,
        partial_line=partial,
    )


# --- the writer --------------------------------------------------------------------------------


def _is_checkpoint_line(line: bytes) -> bool:
    """True for a line the writer wrote as a checkpoint: canonical JSON sorts keys, so a
    checkpoint starts with "count" and a record with "context" (whatever a caller put in it)."""
    return line.startswith(b'{"count":')


def _read_tail(fd: int, size: int) -> tuple[list[bytes], bytes]:
    """The complete lines from the last checkpoint line on (from the start if there is none),
    and the torn last line (b"" if the file ends with a newline).

    Reads backwards in chunks, so reopening a long log costs what its unsigned tail costs;
    chunks double in size, so a log without any checkpoint still costs linear time.
    """
    data = b""
    offset = size
    chunk = _TAIL_CHUNK
    while True:
        if offset > 0:
            step = min(chunk, offset)
            offset -= step
            chunk *= 2
            data = os.pread(fd, step, offset) + data
        last_newline = data.rfind(b"\n")
        if last_newline < 0 and offset > 0:
            continue
        torn = data[last_newline + 1 :]
        complete = data[: last_newline + 1]
        # Before offset 0, the first (possibly cut) line is not known to be whole.
        start = 0 if offset == 0 else complete.find(b"\n") + 1
        lines = complete[start:].split(b"\n")[:-1]
        for index in range(len(lines) - 1, -1, -1):
            if _is_checkpoint_line(lines[index]):
                return lines[index:], torn
        if offset == 0:
            return lines, torn


class AuditLog:
    """The append-only audit log of one host, resumed across restarts.

    Thread-safe. Every `append` adds one line and returns once it is written (no fsync); a
    signed checkpoint is added after `checkpoint_every` records or, on the next append, once
    `checkpoint_interval_seconds` passed since the last one, and on `close`.

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
        checkpoint_interval_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(host_id, str) or not host_id:
            raise ValueError("host_id must be a non-empty str")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if checkpoint_interval_seconds <= 0:
            raise ValueError("checkpoint_interval_seconds must be > 0")
        self._path = Path(path)
        self._host_id = host_id
        self._signer = signer
        self._every = checkpoint_every
        self._interval = checkpoint_interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: list[bytes] = []  # lines built but not yet written, in chain order
        self._queued = 0  # lines ever queued (records and checkpoints)
        self._written = 0  # lines of those written to the file
        self._failed: str | None = None
        self._closed = False
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            self._resume()
        except BaseException:
            os.close(fd)
            raise

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

    def _resume(self) -> None:
        """Find the position to continue from, refusing a log whose tail does not verify."""
        size = os.fstat(self._fd).st_size
        lines, torn = _read_tail(self._fd, size)
        verifier = _ChainVerifier(self._signer.public_key, self._host_id)
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
        self._checkpoints = verifier.checkpoints
        self._since_checkpoint = verifier.seq - verifier.checkpointed_seq
        self._last_checkpoint_time = self._clock()
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

    def close(self) -> None:
        """Write a final checkpoint and release the file. Idempotent."""
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
                if self._failed is None and pending:
                    self._write(b"".join(pending))
                    self._written = self._queued
                    self._fsync(self._fd)
            finally:
                os.close(self._fd)

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
        self._since_checkpoint += 1
        return seq

    def _checkpoint_locked(self) -> bool:
        """Queue a signed checkpoint of the head; True if one was queued (it needs an fsync)."""
        if self._since_checkpoint == 0:
            return False
        now = self._clock()
        checkpoint: dict[str, Any] = {
            "type": CHECKPOINT_TYPE,
            "host": self._host_id,
            "seq": self._seq,
            "head": self._head,
            "count": self._checkpoints + 1,
            "time": format_time(now),
        }
        message = canonical.signing_input(
            canonical.PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(checkpoint)
        )
        checkpoint["signature"] = self._signer.sign(message).hex()
        self._pending.append(_canonical_json(checkpoint) + b"\n")
        self._queued += 1
        self._checkpoints += 1
        self._since_checkpoint = 0
        self._last_checkpoint_time = now
        return True

    # --- group commit --------------------------------------------------------------------------

    def _flush(self, ticket: int, *, sync: bool) -> None:
        """Return once the first `ticket` queued lines are in the file (and, if `sync`, on
        disk); raise AuditLogError if they cannot be, in which case the log refuses appends."""
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
        try:
            self._fsync(sync_fd)
        finally:
            os.close(sync_fd)

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
