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

The package's modules: `_encoding` (constants, the one encoding, record hashes, times),
`_heads` (heads and the head file), `_verify` (the verifier), `_tail` (reading back from the
end) and `_writer` (`AuditLog`). This module names the public API.
"""

from __future__ import annotations

from domain_edge.audit._encoding import (
    AUDIT_LOG_FILE,
    CHECKPOINT_FIELDS,
    HEAD_FILE_SUFFIX,
    HSA_LOG_NAME,
    RECORD_FIELDS,
    AuditLogError,
    checkpoint_digest,
    format_time,
    record_hash,
)
from domain_edge.audit._heads import (
    AuditHead,
    HeadOrder,
    compare_heads,
    describe_refusal,
    head_file,
    persist_head,
    raise_persisted_head,
    read_head_file,
    read_persisted_head,
)
from domain_edge.audit._verify import AuditReport, verify_audit_log
from domain_edge.audit._writer import AuditLog

__all__ = [
    "AUDIT_LOG_FILE",
    "CHECKPOINT_FIELDS",
    "HEAD_FILE_SUFFIX",
    "HSA_LOG_NAME",
    "RECORD_FIELDS",
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
    "read_head_file",
    "read_persisted_head",
    "record_hash",
    "verify_audit_log",
]
