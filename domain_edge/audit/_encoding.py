"""The audit log's one encoding: its constants, its error, canonical JSON lines, record hashes,
what a checkpoint signs, times, and the clipping of over-long values.

Invariants: one function (`record_hash`) defines a record's hash for the writer and the
verifier, and one (`checkpoint_digest`) what a checkpoint signs; every line is canonical JSON
(sorted keys, no spaces, ASCII only); over-long values are cut and marked, never refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from domain_core import canonical
from domain_core.contexts import AUDIT_RECORD_CONTEXT, PayloadType
from domain_core.errors import HsmDomainError, Status

AUDIT_LOG_FILE: Final = "audit.log"
HEAD_FILE_SUFFIX: Final = ".head"
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
_TAIL_CHUNK: Final = 64 * 1024
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_HEX: Final = re.compile(r"(?:[0-9a-f]{2}){1,256}")
_TIME: Final = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
# A log's file name as a checkpoint names it (no directory part).
_LOG_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The names of an HSA's audit logs: its own, and each key service worker's.
HSA_LOG_NAME: Final = re.compile(r"audit(?:-worker-[1-9][0-9]{0,3})?\.log")


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
    return hashlib.sha256(AUDIT_RECORD_CONTEXT + unhashed).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of a record: a fixed context string, then the canonical JSON of every field
    but `hash`. The one definition, used by the writer to make a record and by the verifier
    (after checking the record's fields and types) to check one."""
    return _hash_of_unhashed(_record_json(record, with_hash=False))


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> bytes:
    """The 32-byte digest a checkpoint signs: every field but `signature`, canonical JSON,
    domain-separated as an AUDIT_CHECKPOINT payload."""
    fields = {k: v for k, v in checkpoint.items() if k != "signature"}
    return canonical.digest(PayloadType.AUDIT_CHECKPOINT, _canonical_json(fields))


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
