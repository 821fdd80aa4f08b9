"""An HSA's audit log: one hash-chained JSON line per operation, checkpoints signed by the host.

File format (JSON lines, each line canonical JSON: sorted keys, no spaces, ASCII only):
- a record: {"seq", "time", "host", "principal", "operation", "key_id", "context", "result",
  "detail", "prev", "hash"}; `seq` counts from 1 with no gap, `prev` is the previous record's
  `hash` (64 zeros for record 1), and `hash` is `record_hash` of every other field;
- a checkpoint: {"type": "checkpoint", "host", "log", "first", "seq", "head", "count",
  "time", "signature"}; it states that record `seq` of the log file named `log` (e.g.
  `audit.log`) is the last record so far and has hash `head`, in the chain whose record 1 has
  hash `first` (so a new chain started after a loss is never taken for the old one); `count`
  numbers the checkpoints of the file from 1; `signature` is the host's signature over
  `canonical.signing_input(PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(...))`. (Logs
  written before `log` and `first` existed have checkpoints without them; they still verify.)

A signed checkpoint line is also the log's *head* (`AuditHead`): the host keeps its newest
one beside the log (`<log>.head`, 0600, atomic write and fsync: `persist_head`) and
publishes it off the host (to the coordinator and to peer HSAs), so that cutting records off
the end of the log, or deleting it, is seen by comparing the log with a head.

Invariants kept here:
- a record holds who did what to which key, with which encryption context and with what
  result; the API has no field for plaintext or key material, and `detail` is a short status
  text (callers pass error messages, which never hold secrets);
- one function (`record_hash`) defines a record's hash for the writer and the verifier, and
  one (`checkpoint_digest`) what a checkpoint signs; a checkpoint names its log, so the head
  of one log is never taken for another's;
- the writer never extends a chain it cannot verify: on open it checks the last checkpoint's
  signature and every line after it, and refuses to append (`AuditLogError`) to a log that
  does not verify, is held by another process, or failed to write; the only damage it
  repairs is a torn last line (a crash while writing), which it cuts off and records;
- the writer never resumes below its persisted head: a log that is missing, shorter than the
  head in `<log>.head`, or whose record at the head's sequence number has another hash, is
  refused on open with a message naming both files, both sequence numbers and what to do; the
  head file is only ever raised, and only to a checkpoint that is on disk in the log (it is
  written after the log's fsync that made the checkpoint durable);
- an `append` returns only once its line is in the file (the page cache: no fsync per
  record, so a machine crash can lose the last records, a process crash cannot); lines are
  written in chain order by group commit: whoever holds the write lock writes every line
  queued so far in one `write` on an O_APPEND descriptor, so callers arriving together share
  one system call instead of queueing behind each other's; checkpoints are fsynced before
  the `append` or `checkpoint` that wrote them returns;
- with `background=True` (the HSA) no append signs or fsyncs: a thread of the log writes a
  checkpoint once `checkpoint_interval_seconds` (1 s) passed since the last one and records
  wait, or `checkpoint_every` records wait, so the unsigned tail is at most about a second
  of activity and the hot path costs one `write`;
- the verifier names the first sequence number at which the file departs from a valid chain,
  with a reason a person can act on. Records after the last checkpoint are chained but not
  yet signed (`unsigned_tail`): anyone can rewrite them consistently, and cutting records
  off the end of the file (back to a checkpoint) leaves a valid, shorter log that only a
  comparison with a published head (`verify_audit_log(..., published=)`) shows.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from domain_core import canonical
from domain_core.errors import BadSignatureError, HsmDomainError, MalformedMessageError, Status
from domain_core.signers import PublicKey, Signer
from domain_edge.files import replace_file

__all__ = [
    "AUDIT_LOG_FILE",
    "HEAD_FILE_SUFFIX",
    "HSA_LOG_NAME",
    "AuditHead",
    "AuditLog",
    "AuditLogError",
    "AuditReport",
    "HeadOrder",
    "checkpoint_digest",
    "compare_heads",
    "describe_refusal",
    "format_time",
    "head_file",
    "persist_head",
    "raise_persisted_head",
    "read_persisted_head",
    "record_hash",
    "verify_audit_log",
]

log = logging.getLogger(__name__)

AUDIT_LOG_FILE: Final = "audit.log"
HEAD_FILE_SUFFIX: Final = ".head"
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
CHECKPOINT_FIELDS: Final = frozenset(
    {"type", "host", "log", "first", "seq", "head", "count", "time", "signature"}
)
# Checkpoints written before they named their log and chain: still verified, never
# published as heads.
LEGACY_CHECKPOINT_FIELDS: Final = CHECKPOINT_FIELDS - {"log", "first"}

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
# A log's file name as a checkpoint names it (no directory part).
_LOG_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The names of an HSA's audit logs: its own, and each key service worker's.
HSA_LOG_NAME: Final = re.compile(r"audit(?:-worker-[1-9][0-9]{0,3})?\.log")
_MAX_HOST: Final = 256
# A published head is one checkpoint line; nothing longer comes from the writer.
MAX_HEAD_BYTES: Final = 2048


class AuditLogError(HsmDomainError):
    """The audit log cannot be appended to (broken chain, held by another process, I/O error).

    An HSA that cannot audit must not serve: the operation fails rather than go unrecorded.
    """

    status = Status.FAILED_PRECONDITION


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


# --- heads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditHead:
    """A signed checkpoint of one audit log: "record `seq` of log `log` of host `host` has hash
    `head`". Published off the host and kept beside the log (`<log>.head`).

    `raw` is the checkpoint line exactly as signed (canonical JSON, no newline): it is what
    travels and what is stored, never re-serialized. `parse` checks the shape only;
    `verify` checks the signature under the host's key, which every reader must do.
    """

    host: str
    log: str
    first: str
    seq: int
    head: str
    count: int
    time: str
    signature: str
    raw: bytes

    def __repr__(self) -> str:
        return f"AuditHead(host={self.host!r}, log={self.log!r}, seq={self.seq})"

    @classmethod
    def parse(cls, raw: bytes) -> AuditHead:
        """The head in a checkpoint line; MalformedMessageError if it is not one that names
        its log (a legacy checkpoint without `log` is not a publishable head)."""
        if not isinstance(raw, bytes):
            raise TypeError("a head is parsed from bytes")
        if len(raw) > MAX_HEAD_BYTES:
            raise MalformedMessageError(f"an audit head is longer than {MAX_HEAD_BYTES} bytes")
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise MalformedMessageError("an audit head is not valid JSON") from None
        if not isinstance(value, dict) or set(value) != CHECKPOINT_FIELDS:
            raise MalformedMessageError(
                "an audit head is not a checkpoint that names its log (fields differ)"
            )
        if _canonical_json(value) != raw:
            raise MalformedMessageError("an audit head is not in canonical form")
        if value["type"] != CHECKPOINT_TYPE:
            raise MalformedMessageError("an audit head is not a checkpoint")
        for name in ("seq", "count"):
            if not _is_int(value[name]) or value[name] < 1:
                raise MalformedMessageError(f"an audit head's {name} is not a positive integer")
        host, log_name = value["host"], value["log"]
        if not isinstance(host, str) or not 0 < len(host) <= _MAX_HOST:
            raise MalformedMessageError("an audit head's host is not a short string")
        if not isinstance(log_name, str) or not _LOG_NAME.fullmatch(log_name):
            raise MalformedMessageError("an audit head's log is not a file name")
        for name in ("head", "first"):
            if not isinstance(value[name], str) or not _HEX64.fullmatch(value[name]):
                raise MalformedMessageError(f"an audit head's {name} is not 64 hex digits")
        if not isinstance(value["time"], str) or not _TIME.fullmatch(value["time"]):
            raise MalformedMessageError("an audit head's time is not RFC 3339 UTC")
        if not isinstance(value["signature"], str) or not _HEX.fullmatch(value["signature"]):
            raise MalformedMessageError("an audit head's signature is not lower-case hex")
        return cls(
            host=host,
            log=log_name,
            first=value["first"],
            seq=value["seq"],
            head=value["head"],
            count=value["count"],
            time=value["time"],
            signature=value["signature"],
            raw=raw,
        )

    def verify(self, public_key: PublicKey) -> None:
        """BadSignatureError unless the host's key `public_key` signed this checkpoint."""
        fields = json.loads(self.raw)
        try:
            public_key.verify(
                bytes.fromhex(self.signature),
                canonical.signing_input(
                    canonical.PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(fields)
                ),
            )
        except (ValueError, BadSignatureError):
            raise BadSignatureError(
                f"{self.describe()} is not signed by {self.host}'s host key: not believed"
            ) from None

    def describe(self) -> str:
        """`hsa-1 audit.log checkpoint 3 (record 120)`, for messages."""
        return f"{self.host} {self.log} checkpoint {self.count} (record {self.seq})"

    def same_point(self, other: AuditHead) -> bool:
        """True if both heads state the same record and hash (a later checkpoint of an
        unchanged log restates them under another number and time)."""
        return self.seq == other.seq and hmac.compare_digest(self.head, other.head)


class HeadOrder(enum.Enum):
    """How a head compares with the one known for the same log (`compare_heads`)."""

    NEWER = "newer"  # the same chain, further on: keep it instead
    SAME = "same"  # the same record and hash
    LOWER = "lower"  # the same chain, not as far: the log was cut, or the report is old
    CONFLICT = "conflict"  # another chain, or another hash for the same record: replaced


def compare_heads(known: AuditHead | None, new: AuditHead) -> HeadOrder:
    """Where `new` stands against `known` (both verified, of the same host and log)."""
    if known is None:
        return HeadOrder.NEWER
    if not hmac.compare_digest(known.first, new.first):
        return HeadOrder.CONFLICT
    if new.seq == known.seq:
        return HeadOrder.SAME if known.same_point(new) else HeadOrder.CONFLICT
    return HeadOrder.NEWER if new.seq > known.seq else HeadOrder.LOWER


def describe_refusal(known: AuditHead, new: AuditHead) -> str:
    """Why `new` is refused after `known` (LOWER or CONFLICT), for logs and answers."""
    order = compare_heads(known, new)
    if order is HeadOrder.LOWER:
        return (
            f"{new.host} {new.log}: a checkpoint of record {new.seq} is below the known one of "
            f"record {known.seq} ({known.time}): the log may have been cut; refused"
        )
    if order is HeadOrder.CONFLICT:
        return (
            f"{new.host} {new.log}: the checkpoint of record {new.seq} is of another chain than "
            f"the known one of record {known.seq} ({known.time}): the log was replaced or "
            "rewritten; refused"
        )
    raise ValueError("only a lower or conflicting head is refused")


def head_file(log_path: Path) -> Path:
    """Where the writer keeps a log's newest head: `<log>.head` beside it."""
    return log_path.with_name(log_path.name + HEAD_FILE_SUFFIX)


def read_persisted_head(log_path: Path, public_key: PublicKey, host_id: str) -> AuditHead | None:
    """The head kept beside `log_path`, verified; None without one.

    AuditLogError if the file is there but is not a signed checkpoint of this log by this
    host: an edited head file is as suspicious as an edited log.
    """
    path = head_file(log_path)
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_HEAD_BYTES + 2)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise AuditLogError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        head = AuditHead.parse(raw.rstrip(b"\n"))
        if head.host != host_id or head.log != log_path.name:
            raise MalformedMessageError(f"it is the head of {head.host} {head.log}")
        head.verify(public_key)
    except (MalformedMessageError, BadSignatureError) as error:
        raise AuditLogError(
            f"{path} does not hold a signed checkpoint of {log_path.name} by {host_id} "
            f"({error}); it was edited or replaced: keep it as evidence, compare the log with "
            "the heads published at the coordinator and the peers (`hsm-domain audit verify`), "
            "then move it aside and restart"
        ) from None
    return head


def persist_head(log_path: Path, head: AuditHead) -> None:
    """Write `head` beside `log_path` (0600, temp file, fsync, rename, directory fsync).

    The caller guarantees that the checkpoint is durable in the log (or, when adopting a
    published head, that it is the host's own signed statement) and higher than the file's.
    """
    replace_file(head_file(log_path), head.raw + b"\n", 0o600)


def raise_persisted_head(log_path: Path, head: AuditHead, public_key: PublicKey) -> bool:
    """Adopt a head of this log published elsewhere (the coordinator, a peer) if it is above
    the one kept beside the log; True if it was. It is verified first (BadSignatureError);
    the log itself is compared with it when it is opened."""
    if head.log != log_path.name:
        raise ValueError(f"{head.describe()} is not a head of {log_path.name}")
    head.verify(public_key)
    current = read_persisted_head(log_path, public_key, head.host)
    order = compare_heads(current, head)
    if order is HeadOrder.CONFLICT and current is not None:
        raise AuditLogError(
            f"{describe_refusal(current, head)} (kept in {head_file(log_path)}): the host "
            "signed two different chains for this log; keep both as evidence and investigate"
        )
    if order is not HeadOrder.NEWER:
        return False
    persist_head(log_path, head)
    return True


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
    while writing). `published_seq` is the sequence number of the published head the log was
    compared with (None: no comparison).
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str
    unsigned_tail: int
    partial_line: bool = False
    published_seq: int | None = None

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
    """Checks lines one by one; raises `_Broken` at the first that does not extend the chain.

    `log_name`, if given, is the log every checkpoint that names one must name; the hashes of
    the records numbered in `watch` are kept in `watched` once verified.
    """

    def __init__(
        self,
        public_key: PublicKey,
        host_id: str | None,
        log_name: str | None = None,
        watch: frozenset[int] = frozenset(),
    ) -> None:
        self.public_key = public_key
        self.host_id = host_id
        self.log_name = log_name
        self.watch = watch
        self.watched: dict[int, str] = {}
        self.first: str | None = None  # the hash of record 1 (from a checkpoint on resume)
        self.seq = 0  # last record seen
        self.head = GENESIS_PREV  # its hash
        self.checkpoints = 0
        self.checkpointed_seq = 0  # last record covered by a valid checkpoint
        self.last_checkpoint: bytes | None = None  # the last valid checkpoint line

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
        first = checkpoint.get("first")
        self.first = first if isinstance(first, str) else None
        self._check_checkpoint(checkpoint)
        self.last_checkpoint = line

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
            self.last_checkpoint = line
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
        if seq == 1:
            self.first = record["hash"]
        if seq in self.watch:
            self.watched[seq] = record["hash"]

    def _check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        after = self.seq
        first_unsigned = self.checkpointed_seq + 1
        where = f"the checkpoint after record {after}"
        if set(checkpoint) not in (CHECKPOINT_FIELDS, LEGACY_CHECKPOINT_FIELDS):
            raise _Broken(after + 1, f"{where} is malformed (fields differ from a checkpoint)")
        if not _is_int(checkpoint["seq"]) or not _is_int(checkpoint["count"]):
            raise _Broken(after + 1, f"{where} is malformed: seq and count must be integers")
        if not isinstance(checkpoint["host"], str) or not isinstance(checkpoint["head"], str):
            raise _Broken(after + 1, f"{where} is malformed: host and head must be strings")
        if "log" in checkpoint and not (
            isinstance(checkpoint["log"], str) and isinstance(checkpoint["first"], str)
        ):
            raise _Broken(after + 1, f"{where} is malformed: log and first must be strings")
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
        if "log" in checkpoint and self.log_name is not None and checkpoint["log"] != self.log_name:
            raise _Broken(
                after + 1,
                f"{where} is a checkpoint of log {checkpoint['log'][:80]!r}, not of "
                f"{self.log_name!r}: a line of another log was put here",
            )
        if (
            "first" in checkpoint
            and self.first is not None
            and not hmac.compare_digest(checkpoint["first"], self.first)
        ):
            raise _Broken(
                first_unsigned,
                f"{where} (signed) belongs to another chain (its record 1 is not this file's "
                "record 1): lines of another log were put here, or the log was replaced",
            )
        if self.seq == 0 and self.checkpoints == 0 and checkpoint["seq"] > 0:
            raise _Broken(
                1,
                f"the file starts with a signed checkpoint of record {checkpoint['seq']} "
                f"(number {checkpoint['count']}): records 1 to {checkpoint['seq']} are not in "
                "this file (cut off at the front, or the log was continued after a loss)",
            )
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
    path: Path,
    public_key: PublicKey,
    *,
    host_id: str | None = None,
    log_name: str | None = None,
    published: Sequence[AuditHead] = (),
) -> AuditReport:
    """Check a whole audit log: hashes, links, sequence, and checkpoints under `public_key`.

    `host_id`, if given, must be the host every record and checkpoint names; `log_name`, if
    given, the log every checkpoint that names a log names. Every head in `published` (heads
    of this log kept off the host, each signed by `public_key`: BadSignatureError if not) must
    be covered: a log that ends before a head's record, or whose record there has another
    hash, was cut or rewritten. Raises `FileNotFoundError` for a missing file; any damage to
    the file is reported, never raised.
    """
    for head in published:
        if (host_id is not None and head.host != host_id) or (
            log_name is not None and head.log != log_name
        ):
            raise ValueError(f"{head.describe()} is not a head of this log")
        head.verify(public_key)
    verifier = _ChainVerifier(public_key, host_id, log_name, frozenset(h.seq for h in published))
    published_seq = max((h.seq for h in published), default=None)
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
            published_seq=published_seq,
        )
    except MalformedMessageError as error:
        return AuditReport(
            ok=False,
            records=verifier.seq,
            checkpoints=verifier.checkpoints,
            first_bad_seq=verifier.seq + 1,
            reason=f"after record {verifier.seq}: {error.message}",
            unsigned_tail=verifier.seq - verifier.checkpointed_seq,
            published_seq=published_seq,
        )
    unsigned = verifier.seq - verifier.checkpointed_seq
    problems = [
        problem
        for head in sorted(published, key=lambda h: h.seq)
        if (problem := _compare_with_head(verifier.seq, verifier.watched.get(head.seq), head))
    ]
    if problems:
        first_bad, reason = problems[0]
        return AuditReport(
            ok=False,
            records=verifier.seq,
            checkpoints=verifier.checkpoints,
            first_bad_seq=first_bad,
            reason=reason,
            unsigned_tail=unsigned,
            partial_line=partial,
            published_seq=published_seq,
        )
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
        published_seq=published_seq,
    )


def _compare_with_head(
    seq: int, hash_at_head: str | None, head: AuditHead
) -> tuple[int, str] | None:
    """(first bad seq, reason) if a log whose last record is `seq`, and whose record at
    `head.seq` has hash `hash_at_head`, does not hold the signed `head`; None if it does."""
    if seq < head.seq:
        return (
            seq + 1,
            f"the log ends at record {seq}, but its host signed a checkpoint of record "
            f"{head.seq} (number {head.count}, at {head.time}): records {seq + 1} to "
            f"{head.seq} were cut off",
        )
    if hash_at_head is None or not hmac.compare_digest(hash_at_head, head.head):
        return (
            head.seq,
            f"record {head.seq} is not the record its host signed a checkpoint of "
            f"(number {head.count}, at {head.time}): the log was rewritten from record "
            f"{head.seq} or before",
        )
    return None


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


def _lines_backward(fd: int, size: int) -> Iterator[bytes]:
    """The lines of the file from its end to its start (a torn last line first, if any)."""
    offset = size
    rest = b""
    while offset > 0:
        step = min(_TAIL_CHUNK, offset)
        offset -= step
        parts = (os.pread(fd, step, offset) + rest).split(b"\n")
        rest = parts[0]
        for line in reversed(parts[1:]):
            if line:
                yield line
    if rest:
        yield rest


def _record_hash_at(fd: int, size: int, seq: int) -> str | None:
    """The `hash` field of record `seq`, searched from the end of the file (the record a head
    names is normally among the last lines); None if the file holds no such record."""
    for line in _lines_backward(fd, size):
        if _is_checkpoint_line(line):
            continue
        try:
            value = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(value, dict) or not _is_int(value.get("seq")):
            continue
        if value["seq"] == seq:
            found = value.get("hash")
            return found if isinstance(found, str) else None
        if value["seq"] < seq:
            return None
    return None


def _first_hash(fd: int) -> str | None:
    """The hash of record 1 from the file's first line (a record, or a checkpoint naming it)."""
    data = os.pread(fd, MAX_LINE_BYTES + 1, 0)
    end = data.find(b"\n")
    if end < 0:
        return None
    try:
        value = json.loads(data[:end])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    if value.get("type") == CHECKPOINT_TYPE:
        first = value.get("first")
    elif value.get("seq") == 1:
        first = value.get("hash")
    else:
        return None
    return first if isinstance(first, str) and _HEX64.fullmatch(first) else None


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
            canonical.PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(checkpoint)
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
