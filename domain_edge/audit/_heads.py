"""Audit heads: a log's newest signed checkpoint, compared with others and kept beside the log.

Invariants: a head is parsed from the exact checkpoint line that was signed and never
re-serialized, and believed only once `verify` checked the host's signature; the head file
(`<log>.head`, 0600, atomic write and fsync) holds one signed checkpoint of its own log by its
own host, and is only ever raised.
"""

from __future__ import annotations

import enum
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from domain_core import canonical
from domain_core.contexts import PayloadType
from domain_core.errors import BadSignatureError, MalformedMessageError
from domain_core.limits import MAX_AUDIT_HOST_CHARS, MAX_HEAD_BYTES
from domain_core.signers import PublicKey
from domain_edge.audit._encoding import (
    _HEX,
    _HEX64,
    _LOG_NAME,
    _TIME,
    CHECKPOINT_FIELDS,
    CHECKPOINT_TYPE,
    HEAD_FILE_SUFFIX,
    AuditLogError,
    _canonical_json,
    _is_int,
    checkpoint_digest,
)
from domain_edge.files import read_limited, replace_file

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
        if not isinstance(host, str) or not 0 < len(host) <= MAX_AUDIT_HOST_CHARS:
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
                canonical.signing_input(PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(fields)),
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


def read_head_file(path: Path) -> bytes:
    """The checkpoint line a head file holds, without its newline (not parsed).

    MalformedMessageError if the file is longer than a head and its newline (at most that
    much is read); FileNotFoundError or OSError if it cannot be read.
    """
    raw = read_limited(
        path,
        MAX_HEAD_BYTES + 1,
        lambda: MalformedMessageError(f"an audit head is longer than {MAX_HEAD_BYTES} bytes"),
    )
    return raw.rstrip(b"\n")


def read_persisted_head(log_path: Path, public_key: PublicKey, host_id: str) -> AuditHead | None:
    """The head kept beside `log_path`, verified; None without one.

    AuditLogError if the file is there but is not a signed checkpoint of this log by this
    host: an edited head file is as suspicious as an edited log.
    """
    path = head_file(log_path)
    try:
        head = AuditHead.parse(read_head_file(path))
        if head.host != host_id or head.log != log_path.name:
            raise MalformedMessageError(f"it is the head of {head.host} {head.log}")
        head.verify(public_key)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise AuditLogError(f"cannot read {path}: {error.strerror or error}") from None
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
