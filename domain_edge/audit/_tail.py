"""Reading an audit log backwards from its end: what the writer needs to resume cheaply.

Invariants: reading back costs what the unsigned tail costs (chunks from the end, doubling),
so reopening a long log is cheap, and a log without any checkpoint still costs linear time;
nothing here writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from domain_core.limits import MAX_AUDIT_LINE_BYTES
from domain_edge.audit._encoding import (
    _HEX64,
    _TAIL_CHUNK,
    CHECKPOINT_TYPE,
    _is_int,
)


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
    data = os.pread(fd, MAX_AUDIT_LINE_BYTES + 1, 0)
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
