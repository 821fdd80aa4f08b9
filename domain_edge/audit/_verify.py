"""Verifying an audit log: the chain, the checkpoints, and the heads published off the host.

Invariants: the verifier names the first sequence number at which the file departs from a
valid chain, with a reason a person can act on; it never buffers a line longer than
`MAX_AUDIT_LINE_BYTES`; damage is reported, never raised; a published head is believed only under
the host's key, and a log that does not reach it (cut) or holds another record there
(rewritten) fails.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from domain_core import canonical
from domain_core.contexts import PayloadType
from domain_core.errors import BadSignatureError, MalformedMessageError
from domain_core.limits import MAX_AUDIT_LINE_BYTES
from domain_core.signers import PublicKey
from domain_edge.audit._encoding import (
    _HEX,
    _HEX64,
    _TIME,
    CHECKPOINT_FIELDS,
    CHECKPOINT_TYPE,
    GENESIS_PREV,
    LEGACY_CHECKPOINT_FIELDS,
    RECORD_FIELDS,
    _canonical_json,
    _is_int,
    checkpoint_digest,
    record_hash,
)
from domain_edge.audit._heads import AuditHead


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
        """Check a checkpoint line: its shape, its signature, the chain and log it names, and
        where it stands; then count it. Each check raises `_Broken` in this order."""
        after = self.seq
        first_unsigned = self.checkpointed_seq + 1
        where = f"the checkpoint after record {after}"
        _check_checkpoint_shape(checkpoint, where, after)
        self._check_checkpoint_signature(checkpoint, where, after, first_unsigned)
        self._check_checkpoint_chain(checkpoint, where, after, first_unsigned)
        self._check_checkpoint_position(checkpoint, where, after, first_unsigned)
        self.checkpoints += 1
        self.checkpointed_seq = self.seq

    def _check_checkpoint_signature(
        self, checkpoint: dict[str, Any], where: str, after: int, first_unsigned: int
    ) -> None:
        """The checkpoint names this log's host and is signed by its key."""
        if self.host_id is None:
            self.host_id = checkpoint["host"]
        elif checkpoint["host"] != self.host_id:
            raise _Broken(after + 1, f"{where} names another host ({checkpoint['host'][:80]!r})")
        try:
            signature = bytes.fromhex(checkpoint["signature"])
            self.public_key.verify(
                signature,
                canonical.signing_input(
                    PayloadType.AUDIT_CHECKPOINT, checkpoint_digest(checkpoint)
                ),
            )
        except (ValueError, BadSignatureError):
            raise _Broken(
                first_unsigned,
                f"{where} is not signed by {self.host_id}'s host key (forged or edited): "
                f"records from {first_unsigned} on cannot be trusted",
            ) from None

    def _check_checkpoint_chain(
        self, checkpoint: dict[str, Any], where: str, after: int, first_unsigned: int
    ) -> None:
        """The (signed) checkpoint belongs to this log and to this file's chain."""
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

    def _check_checkpoint_position(
        self, checkpoint: dict[str, Any], where: str, after: int, first_unsigned: int
    ) -> None:
        """The checkpoint is the next one, covers exactly the records before it, and states
        their head."""
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


def _check_checkpoint_shape(checkpoint: dict[str, Any], where: str, after: int) -> None:
    """A checkpoint's fields and their types (before anything reads them)."""
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
    if not isinstance(checkpoint["signature"], str) or not _HEX.fullmatch(checkpoint["signature"]):
        raise _Broken(after + 1, f"{where} is malformed: signature is not lower-case hex")


def _lines(stream: Any) -> Iterator[tuple[bytes, bool]]:
    """(line without newline, complete) for every line; the last may be incomplete."""
    while True:
        line: bytes = stream.readline(MAX_AUDIT_LINE_BYTES + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line[:-1], True
        elif len(line) > MAX_AUDIT_LINE_BYTES:
            raise MalformedMessageError(f"a line is longer than {MAX_AUDIT_LINE_BYTES} bytes")
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
    _check_published(published, public_key, host_id, log_name)
    verifier = _ChainVerifier(public_key, host_id, log_name, frozenset(h.seq for h in published))
    published_seq = max((h.seq for h in published), default=None)
    try:
        partial = _feed_file(path, verifier)
    except _Broken as broken:
        return _failed(verifier, broken.seq, broken.reason, published_seq)
    except MalformedMessageError as error:
        reason = f"after record {verifier.seq}: {error.message}"
        return _failed(verifier, verifier.seq + 1, reason, published_seq)
    problems = [
        problem
        for head in sorted(published, key=lambda h: h.seq)
        if (problem := _compare_with_head(verifier.seq, verifier.watched.get(head.seq), head))
    ]
    if problems:
        first_bad, reason = problems[0]
        return _failed(verifier, first_bad, reason, published_seq, partial=partial)
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
        published_seq=published_seq,
    )


def _check_published(
    published: Sequence[AuditHead],
    public_key: PublicKey,
    host_id: str | None,
    log_name: str | None,
) -> None:
    """Every published head is of this log (ValueError) and signed by its host's key
    (BadSignatureError): a head is believed only then."""
    for head in published:
        if (host_id is not None and head.host != host_id) or (
            log_name is not None and head.log != log_name
        ):
            raise ValueError(f"{head.describe()} is not a head of this log")
        head.verify(public_key)


def _feed_file(path: Path, verifier: _ChainVerifier) -> bool:
    """Feed every complete line of the file to `verifier`; True if it ends in an incomplete
    line. Raises what the verifier raises at the first bad line."""
    with open(path, "rb") as stream:
        for line, complete in _lines(stream):
            if not complete:
                return True
            verifier.feed(line)
    return False


def _failed(
    verifier: _ChainVerifier,
    first_bad_seq: int,
    reason: str,
    published_seq: int | None,
    *,
    partial: bool = False,
) -> AuditReport:
    """The report of a log that departs from a valid chain (or from a published head) at
    `first_bad_seq`, counting what verified before it."""
    return AuditReport(
        ok=False,
        records=verifier.seq,
        checkpoints=verifier.checkpoints,
        first_bad_seq=first_bad_seq,
        reason=reason,
        unsigned_tail=verifier.seq - verifier.checkpointed_seq,
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
