"""Tests for domain_edge.audit: the hash-chained audit log, its checkpoints and its verifier.

The standard log has 10 records and checkpoints after records 4, 8 and 10 (on close):
  r1 r2 r3 r4 C1 r5 r6 r7 r8 C2 r9 r10 C3
so an edit of record 6 sits between two checkpoints, and every tamper case names a record.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain_core import canonical as signing
from domain_core.contexts import AUDIT_RECORD_CONTEXT
from domain_core.errors import HsmDomainError
from domain_core.limits import MAX_AUDIT_LINE_BYTES
from domain_core.signers import InMemorySigner, SignatureAlgorithm, Signer
from domain_edge import audit
from domain_edge.audit import (
    CHECKPOINT_FIELDS,
    RECORD_FIELDS,
    AuditLog,
    AuditLogError,
    format_time,
    record_hash,
    verify_audit_log,
)
from domain_edge.audit._encoding import _record_json

pytestmark = pytest.mark.unit

HOST = "hsa-1"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def signer() -> InMemorySigner:
    return InMemorySigner.generate(SignatureAlgorithm.ED25519)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit.log"


def open_log(path: Path, signer: Signer, **kwargs: Any) -> AuditLog:
    kwargs.setdefault("checkpoint_every", 4)
    kwargs.setdefault("clock", FakeClock())
    return AuditLog(path, host_id=HOST, signer=signer, **kwargs)


def append_n(log: AuditLog, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        log.append(
            principal=f"spiffe://local/client/app-{i % 3}",
            operation="Encrypt" if i % 2 else "Decrypt",
            key_id=f"key-{i % 4}",
            encryption_context={"order": str(i), "tenant": "acme"},
            result="ok" if i % 5 else "denied",
            detail="" if i % 5 else "principal may not decrypt with this key",
        )


@pytest.fixture
def standard_log(log_path: Path, signer: InMemorySigner) -> Path:
    """r1 r2 r3 r4 C1 r5 r6 r7 r8 C2 r9 r10 C3."""
    with open_log(log_path, signer) as log:
        append_n(log, 10)
    return log_path


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def canonical(value: dict[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def line_of_record(lines: list[str], seq: int) -> int:
    for index, line in enumerate(lines):
        value = json.loads(line)
        if "type" not in value and value["seq"] == seq:
            return index
    raise AssertionError(f"no record {seq}")


def crash(log: AuditLog) -> None:
    """Drop the log as a killed process would: no final checkpoint, the lock released."""
    os.close(log._fd)
    log._closed = True


def verify(path: Path, signer: Signer, host_id: str | None = HOST) -> audit.AuditReport:
    return verify_audit_log(path, signer.public_key, host_id=host_id)


# --- the format and the round trip --------------------------------------------------------------


def test_roundtrip_with_checkpoints(standard_log: Path, signer: InMemorySigner) -> None:
    report = verify(standard_log, signer)
    assert report.ok, report.reason
    assert (report.records, report.checkpoints, report.unsigned_tail) == (10, 3, 0)
    assert report.first_bad_seq is None
    assert not report.partial_line
    assert report.reason == "10 records, 3 checkpoints, ok"

    values = [json.loads(line) for line in read_lines(standard_log)]
    kinds = ["C" if "type" in v else "r" for v in values]
    assert "".join(kinds) == "rrrrCrrrrCrrC"
    prev = "0" * 64
    for value in values:
        if "type" in value:
            assert set(value) == CHECKPOINT_FIELDS
            assert value["head"] == prev
            continue
        assert set(value) == RECORD_FIELDS
        assert value["host"] == HOST
        assert value["prev"] == prev
        assert value["hash"] == record_hash(value)
        assert value["time"] == "2026-01-01T00:00:00.000Z"
        prev = value["hash"]
    assert [v["count"] for v in values if "type" in v] == [1, 2, 3]
    assert [v["seq"] for v in values if "type" in v] == [4, 8, 10]


def test_lines_are_canonical_json(standard_log: Path) -> None:
    for line in read_lines(standard_log):
        assert canonical(json.loads(line)) == line


def test_file_is_private(standard_log: Path) -> None:
    assert stat.S_IMODE(os.stat(standard_log).st_mode) == 0o600


def test_format_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert format_time(T0 + 1.2345) == "2026-01-01T00:00:01.234Z"


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=0, max_value=2**33, allow_nan=False),
        # just below a millisecond or a second, where rounding to microseconds carries over
        st.integers(0, 2**33).map(lambda s: s + 0.9999995),
        st.integers(0, 2**33).map(lambda s: s + 0.0009995),
    )
)
def test_format_time_is_what_datetime_shows(seconds: float) -> None:
    moment = datetime.fromtimestamp(seconds, UTC)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert format_time(seconds) == expected


def sample_record() -> dict[str, Any]:
    record: dict[str, Any] = {name: "x" for name in RECORD_FIELDS}
    record.update(seq=1, context={"a": "b"})
    return record


def test_record_hash_is_domain_separated_and_covers_every_field() -> None:
    record = sample_record()
    base = record_hash(record)
    assert record_hash({**record, "hash": "anything"}) == base  # `hash` itself is not covered
    for name in RECORD_FIELDS - {"hash", "seq", "context"}:
        assert record_hash({**record, name: "y"}) != base, name
    assert record_hash({**record, "seq": 2}) != base
    assert record_hash({**record, "context": {"a": "c"}}) != base
    assert record_hash({**record, "context": {}}) != base
    without_hash = {k: v for k, v in record.items() if k != "hash"}
    plain = hashlib.sha256(canonical(without_hash).encode())
    assert base != plain.hexdigest()
    separated = hashlib.sha256(AUDIT_RECORD_CONTEXT + canonical(without_hash).encode())
    assert base == separated.hexdigest()


_TEXT = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries({name: _TEXT for name in RECORD_FIELDS - {"seq", "context"}}),
    seq=st.integers(1, 2**62),
    context=st.dictionaries(_TEXT, _TEXT, max_size=5),
)
def test_fast_record_encoding_is_the_canonical_json(
    fields: dict[str, str], seq: int, context: dict[str, str]
) -> None:
    record = {**fields, "seq": seq, "context": context}
    without_hash = {k: v for k, v in record.items() if k != "hash"}
    assert _record_json(record, with_hash=True).decode() == canonical(record)
    assert _record_json(record, with_hash=False).decode() == canonical(without_hash)


def test_append_has_no_field_for_plaintext_or_key_material() -> None:
    parameters = set(inspect.signature(AuditLog.append).parameters) - {"self"}
    assert parameters == {
        "principal",
        "operation",
        "key_id",
        "encryption_context",
        "result",
        "detail",
    }
    for name in ("plaintext", "ciphertext", "key", "data", "secret"):
        assert name not in RECORD_FIELDS


def test_append_returns_consecutive_seq_and_empty_log_verifies(
    log_path: Path, signer: InMemorySigner
) -> None:
    with open_log(log_path, signer) as log:
        assert log.seq == 0
        assert verify(log_path, signer).ok
        assert [log.append(principal="p", operation="Encrypt") for _ in range(3)] == [1, 2, 3]
        assert log.seq == 3
    assert verify(log_path, signer).records == 3


def test_close_without_new_records_adds_no_checkpoint(
    standard_log: Path, signer: InMemorySigner
) -> None:
    before = standard_log.read_bytes()
    open_log(standard_log, signer).close()
    assert standard_log.read_bytes() == before


def test_unsigned_tail_is_reported(log_path: Path, signer: InMemorySigner) -> None:
    log = open_log(log_path, signer)
    append_n(log, 6)
    report = verify(log_path, signer)
    assert report.ok
    assert (report.records, report.checkpoints, report.unsigned_tail) == (6, 1, 2)
    assert "2 records after the last checkpoint are not signed yet" in report.reason
    log.close()
    assert verify(log_path, signer).unsigned_tail == 0


def test_checkpoint_after_interval(log_path: Path, signer: InMemorySigner) -> None:
    clock = FakeClock()
    log = open_log(
        log_path, signer, checkpoint_every=1000, checkpoint_interval_seconds=10.0, clock=clock
    )
    append_n(log, 2)
    assert verify(log_path, signer).checkpoints == 0
    clock.now += 10.0
    append_n(log, 1, start=3)
    report = verify(log_path, signer)
    assert (report.checkpoints, report.unsigned_tail) == (1, 0)
    append_n(log, 1, start=4)
    assert verify(log_path, signer).unsigned_tail == 1
    log.close()


def test_explicit_checkpoint(log_path: Path, signer: InMemorySigner) -> None:
    with open_log(log_path, signer, checkpoint_every=1000) as log:
        append_n(log, 3)
        log.checkpoint()
        log.checkpoint()  # nothing new: no second checkpoint
        assert verify(log_path, signer).checkpoints == 1


def test_long_values_are_cut_and_marked_not_refused(log_path: Path, signer: InMemorySigner) -> None:
    with open_log(log_path, signer) as log:
        log.append(
            principal="p" * 10_000,
            operation="o" * 1000,
            key_id="k" * 10_000,
            encryption_context={f"k{i:03d}": "v" * 5000 for i in range(100)},
            detail="d" * 10_000,
        )
    record = json.loads(read_lines(log_path)[0])
    assert record["principal"].endswith("(truncated)")
    assert len(record["principal"]) <= 512
    assert len(record["detail"]) <= 512
    assert len(record["context"]) == 65
    assert record["context"]["...(truncated)"] == "36 more entries"
    assert verify(log_path, signer).ok


@pytest.mark.parametrize(
    "kwargs",
    [
        {"principal": b"bytes"},
        {"operation": None},
        {"encryption_context": {"a": b"b"}},
        {"encryption_context": [("a", "b")]},
    ],
)
def test_wrong_types_are_programming_errors(
    log_path: Path, signer: InMemorySigner, kwargs: dict[str, Any]
) -> None:
    with open_log(log_path, signer) as log:
        call = {"principal": "p", "operation": "Encrypt", **kwargs}
        with pytest.raises(TypeError):
            log.append(**call)
        assert log.seq == 0


# --- tampering ---------------------------------------------------------------------------------

EDITS: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("seq", lambda r: r.update(seq=60)),
    ("time", lambda r: r.update(time="2025-12-31T23:59:59.000Z")),
    ("host", lambda r: r.update(host="hsa-2")),
    ("principal", lambda r: r.update(principal="spiffe://local/client/someone-else")),
    ("operation", lambda r: r.update(operation="GenerateDataKey")),
    ("key_id", lambda r: r.update(key_id="key-other")),
    ("context value", lambda r: r["context"].update(order="600")),
    ("context entry added", lambda r: r["context"].update(extra="1")),
    ("context entry removed", lambda r: r["context"].pop("tenant")),
    ("result", lambda r: r.update(result="denied")),
    ("detail", lambda r: r.update(detail="nothing to see")),
    ("prev", lambda r: r.update(prev="1" * 64)),
    ("hash", lambda r: r.update(hash="2" * 64)),
    ("field added", lambda r: r.update(plaintext="x")),
    ("field removed", lambda r: r.pop("detail")),
    ("seq as string", lambda r: r.update(seq="6")),
    ("time malformed", lambda r: r.update(time="yesterday")),
]


@pytest.mark.parametrize(("what", "edit"), EDITS, ids=[name for name, _ in EDITS])
def test_any_edited_field_names_the_record(
    standard_log: Path,
    signer: InMemorySigner,
    what: str,
    edit: Callable[[dict[str, Any]], None],
) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    record = json.loads(lines[index])
    edit(record)
    lines[index] = canonical(record)
    write_lines(standard_log, lines)

    report = verify(standard_log, signer)
    assert not report.ok
    assert report.first_bad_seq == 6, report.reason
    assert "6" in report.reason
    assert report.records == 5  # the records before the bad one verified


def test_edit_in_hash_says_edited(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    lines[index] = lines[index].replace('"tenant":"acme"', '"tenant":"evil"')
    write_lines(standard_log, lines)
    assert verify(standard_log, signer).reason == (
        "record 6 was edited: its hash does not match its content"
    )


def test_non_canonical_line_is_an_edit(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    lines[index] = json.dumps(json.loads(lines[index]), sort_keys=True)  # spaces added
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "canonical" in report.reason


def test_duplicate_json_key_is_refused(standard_log: Path, signer: InMemorySigner) -> None:
    # A line a person reads one way ("principal": "alice") and a parser another.
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    lines[index] = lines[index][:-1] + ',"principal":"alice"}'
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)


def test_edit_with_recomputed_hashes_is_caught_by_the_next_checkpoint(
    standard_log: Path, signer: InMemorySigner
) -> None:
    lines = read_lines(standard_log)
    prev = None
    for index, line in enumerate(lines):
        value = json.loads(line)
        if "type" in value:
            continue
        if value["seq"] == 6:
            value["principal"] = "spiffe://local/client/innocent"
        if prev is not None:
            value["prev"] = prev
        value["hash"] = record_hash(value)
        prev = value["hash"]
        lines[index] = canonical(value)
    write_lines(standard_log, lines)

    report = verify(standard_log, signer)
    assert not report.ok
    assert report.first_bad_seq == 5  # somewhere in 5..8, the records C2 covers
    assert "recomputed" in report.reason
    assert "after record 8" in report.reason


def test_removed_record(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    del lines[line_of_record(lines, 6)]
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "record 6 is missing" in report.reason


def test_removed_first_record(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    write_lines(standard_log, lines[1:])
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 1)


def test_removed_record_with_renumbering_breaks_the_links(
    standard_log: Path, signer: InMemorySigner
) -> None:
    lines = read_lines(standard_log)
    del lines[line_of_record(lines, 6)]
    for index, line in enumerate(lines):
        value = json.loads(line)
        if "type" not in value and value["seq"] > 6:
            value["seq"] -= 1
            value["hash"] = record_hash(value)
            lines[index] = canonical(value)
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "prev link is broken" in report.reason


def test_swapped_records(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    a, b = line_of_record(lines, 6), line_of_record(lines, 7)
    lines[a], lines[b] = lines[b], lines[a]
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "found record 7 where record 6 should be" in report.reason


def test_duplicated_record(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    lines.insert(index + 1, lines[index])
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 7)
    assert "record 6 appears again" in report.reason


def test_inserted_record(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    forged = json.loads(lines[index])
    forged["operation"] = "Decrypt"
    forged["hash"] = record_hash(forged)
    lines.insert(index, canonical(forged))
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 7)


def test_corrupted_line_in_the_middle(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = line_of_record(lines, 6)
    lines[index] = lines[index][:40]
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "not valid JSON" in report.reason


def test_partial_last_line_is_reported(standard_log: Path, signer: InMemorySigner) -> None:
    data = standard_log.read_bytes()
    standard_log.write_bytes(data[:-30])  # cuts into C3 (the final checkpoint)
    report = verify(standard_log, signer)
    assert report.ok
    assert report.partial_line
    assert (report.records, report.checkpoints, report.unsigned_tail) == (10, 2, 2)
    assert "incomplete line" in report.reason


def test_partial_record_is_cut_off_and_recorded_on_reopen(
    standard_log: Path, signer: InMemorySigner
) -> None:
    with standard_log.open("ab") as out:
        out.write(b'{"context":{"order":"11"},"detail":"","ha')  # a crash mid-record
    assert verify(standard_log, signer).partial_line

    with open_log(standard_log, signer) as log:
        assert log.seq == 11
    report = verify(standard_log, signer)
    assert report.ok, report.reason
    assert not report.partial_line
    assert (report.records, report.unsigned_tail) == (11, 0)
    recovery = json.loads(read_lines(standard_log)[-2])
    assert recovery["operation"] == "audit.recover"
    assert "41 bytes" in recovery["detail"]


def test_forged_checkpoint_is_refused(standard_log: Path, signer: InMemorySigner) -> None:
    other = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    lines = read_lines(standard_log)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 2)
    checkpoint = json.loads(lines[index])
    checkpoint["signature"] = other.sign(
        signing.signing_input(
            signing.PayloadType.AUDIT_CHECKPOINT, audit.checkpoint_digest(checkpoint)
        )
    ).hex()
    lines[index] = canonical(checkpoint)
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "not signed by hsa-1's host key" in report.reason


def test_verifying_under_another_key_fails(standard_log: Path) -> None:
    other = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    report = verify(standard_log, other)
    assert (report.ok, report.first_bad_seq) == (False, 1)


def test_checkpoint_signature_covers_its_fields(standard_log: Path, signer: InMemorySigner) -> None:
    for field, value in (("time", "2030-01-01T00:00:00.000Z"), ("count", 7), ("host", "hsa-9")):
        lines = read_lines(standard_log)
        index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 2)
        checkpoint = json.loads(lines[index])
        checkpoint[field] = value
        edited = [*lines[:index], canonical(checkpoint), *lines[index + 1 :]]
        path = standard_log.with_name(f"edited-{field}.log")
        write_lines(path, edited)
        report = verify_audit_log(path, signer.public_key)
        assert not report.ok, field


def test_removed_checkpoint(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 2)
    del lines[index]
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert not report.ok
    assert "a checkpoint was removed" in report.reason


def test_moved_checkpoint(standard_log: Path, signer: InMemorySigner) -> None:
    lines = read_lines(standard_log)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 2)
    lines.insert(index - 1, lines.pop(index))  # C2 now before record 8
    write_lines(standard_log, lines)
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 8)


def test_other_host_is_refused(standard_log: Path, signer: InMemorySigner) -> None:
    report = verify(standard_log, signer, host_id="hsa-2")
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "hsa-2" in report.reason
    assert verify(standard_log, signer, host_id=None).ok


def test_truncation_back_to_a_checkpoint_is_a_valid_shorter_log(
    standard_log: Path, signer: InMemorySigner
) -> None:
    """A documented limit: the file alone cannot show that records were cut off its end."""
    lines = read_lines(standard_log)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 2)
    write_lines(standard_log, lines[: index + 1])
    report = verify(standard_log, signer)
    assert (report.ok, report.records) == (True, 8)


def test_overlong_line_is_reported_not_buffered(standard_log: Path, signer: InMemorySigner) -> None:
    with standard_log.open("ab") as out:
        out.write(b"x" * (MAX_AUDIT_LINE_BYTES + 10) + b"\n")
    report = verify(standard_log, signer)
    assert (report.ok, report.first_bad_seq) == (False, 11)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_flipped_bit_is_detected(
    standard_log: Path, signer: InMemorySigner, data: st.DataObject
) -> None:
    original = standard_log.read_bytes()
    position = data.draw(st.integers(0, len(original) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(original)
    flipped[position] ^= 1 << bit
    path = standard_log.with_name("flipped.log")
    path.write_bytes(bytes(flipped))
    report = verify(path, signer)
    if position == len(original) - 1:
        # The final newline: the last line becomes incomplete, which is what a crash does.
        assert report.ok
        assert report.partial_line
        assert report.checkpoints == 2
    else:
        assert not report.ok


# --- the writer: resume, concurrency, refusal ----------------------------------------------------


def test_resume_after_reopen_continues_the_chain(
    standard_log: Path, signer: InMemorySigner
) -> None:
    head = json.loads(read_lines(standard_log)[-2])["hash"]
    with open_log(standard_log, signer) as log:
        assert log.seq == 10
        assert log.append(principal="p", operation="Encrypt") == 11
    records = [json.loads(line) for line in read_lines(standard_log)]
    record_11 = next(r for r in records if r.get("seq") == 11 and "type" not in r)
    assert record_11["prev"] == head
    report = verify(standard_log, signer)
    assert report.ok, report.reason
    assert (report.records, report.checkpoints) == (11, 4)


def test_resume_without_checkpoint(log_path: Path, signer: InMemorySigner) -> None:
    log = open_log(log_path, signer, checkpoint_every=1000)
    append_n(log, 3)
    crash(log)
    with open_log(log_path, signer, checkpoint_every=1000) as again:
        assert again.seq == 3
        append_n(again, 2, start=4)
    report = verify(log_path, signer)
    assert (report.ok, report.records, report.checkpoints) == (True, 5, 1)


def test_resume_reads_only_the_tail(log_path: Path, signer: InMemorySigner) -> None:
    """Reopening does not re-verify records the last checkpoint covers (it costs the tail)."""
    with open_log(log_path, signer, checkpoint_every=100_000) as log:
        append_n(log, 3000)
    lines = read_lines(log_path)
    lines[1] = lines[1].replace("acme", "evil")  # before the last checkpoint
    write_lines(log_path, lines)
    with open_log(log_path, signer) as log:
        assert log.seq == 3000
    assert verify(log_path, signer).first_bad_seq == 2


def test_context_that_looks_like_a_checkpoint_does_not_confuse_resume(
    log_path: Path, signer: InMemorySigner
) -> None:
    with open_log(log_path, signer) as log:
        log.append(principal="p", operation="Encrypt", encryption_context={"type": "checkpoint"})
        log.append(principal="p", operation="Encrypt", encryption_context={"count": "1"})
    with open_log(log_path, signer) as log:
        assert log.seq == 2
        log.append(principal="p", operation="Decrypt")
    assert verify(log_path, signer).ok


def test_concurrent_appends_produce_a_valid_log(log_path: Path, signer: InMemorySigner) -> None:
    log = AuditLog(log_path, host_id=HOST, signer=signer, checkpoint_every=50)
    seqs: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            got = [
                log.append(principal=f"app-{n}", operation="Encrypt", key_id=str(i))
                for i in range(200)
            ]
        except BaseException as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)
            return
        with lock:
            seqs.extend(got)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    log.close()
    assert not errors
    assert sorted(seqs) == list(range(1, 1601))
    report = verify(log_path, signer)
    assert report.ok, report.reason
    assert (report.records, report.checkpoints, report.unsigned_tail) == (1600, 32, 0)


def _blocking_write(
    monkeypatch: pytest.MonkeyPatch, *, fail: bool
) -> tuple[threading.Event, threading.Event, list[bytes]]:
    """Make the next os.write of the audit module wait for `release` (after setting `entered`),
    then fail with ENOSPC if `fail`; every write's bytes are kept in the returned list."""
    entered, release = threading.Event(), threading.Event()
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        writes.append(bytes(data))
        if len(writes) == 1:
            entered.set()
            assert release.wait(30)
            if fail:
                raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return entered, release, writes


def _append_in_threads(log: AuditLog, count: int) -> tuple[list[threading.Thread], list[object]]:
    outcomes: list[object] = []

    def work(n: int) -> None:
        try:
            outcomes.append(log.append(principal=f"app-{n}", operation="Encrypt"))
        except AuditLogError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _wait_for_queue(log: AuditLog, seq: int) -> None:
    for _ in range(3000):
        if log.seq >= seq:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the log never reached seq {seq}")


def test_appends_arriving_together_share_one_write(
    log_path: Path, signer: InMemorySigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(log_path, signer, checkpoint_every=1000)
    entered, release, writes = _blocking_write(monkeypatch, fail=False)
    first, first_outcome = _append_in_threads(log, 1)
    assert entered.wait(30)  # the first caller is inside its write, holding the write lock
    others, outcomes = _append_in_threads(log, 6)
    _wait_for_queue(log, 7)  # all six records are chained and queued behind it
    assert not outcomes  # none returned before its line was written
    release.set()
    for thread in [*first, *others]:
        thread.join(30)
    assert first_outcome == [1]
    assert sorted(outcomes) == [2, 3, 4, 5, 6, 7]  # type: ignore[type-var]
    assert len(writes) == 2  # one write for the six
    assert writes[1].count(b"\n") == 6
    log.close()
    report = verify(log_path, signer)
    assert report.ok, report.reason
    assert report.records == 7


def test_every_append_returns_after_its_line_is_in_the_file(
    log_path: Path, signer: InMemorySigner
) -> None:
    log = open_log(log_path, signer, checkpoint_every=7)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            seq = log.append(principal="p", operation="Encrypt")
            records = sum(1 for line in read_lines(log_path) if '"type":"checkpoint"' not in line)
            with lock:
                seen.append((seq, records))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    log.close()
    assert len(seen) == 300
    assert all(records >= seq for seq, records in seen)
    report = verify(log_path, signer)
    assert report.ok, report.reason
    assert (report.records, report.checkpoints) == (300, 43)


def test_a_failed_batch_fails_every_caller_in_it_and_stops_the_log(
    log_path: Path, signer: InMemorySigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(log_path, signer, checkpoint_every=1000)
    log.append(principal="p", operation="Encrypt")
    entered, release, _ = _blocking_write(monkeypatch, fail=True)
    first, first_outcome = _append_in_threads(log, 1)
    assert entered.wait(30)
    others, outcomes = _append_in_threads(log, 4)
    _wait_for_queue(log, 6)
    release.set()
    for thread in [*first, *others]:
        thread.join(30)
    # Nobody whose record did not reach the file was told it succeeded.
    assert all(isinstance(o, AuditLogError) for o in [*first_outcome, *outcomes])
    assert "No space left" in str(first_outcome[0])
    monkeypatch.undo()
    with pytest.raises(AuditLogError, match="failed earlier"):
        log.append(principal="p", operation="Encrypt")
    log.close()
    assert verify(log_path, signer).records == 1


def test_refuses_to_extend_a_broken_tail(standard_log: Path, signer: InMemorySigner) -> None:
    log = open_log(standard_log, signer, checkpoint_every=1000)
    append_n(log, 3, start=11)
    crash(log)
    lines = read_lines(standard_log)
    index = line_of_record(lines, 12)
    lines[index] = lines[index].replace("acme", "evil")
    write_lines(standard_log, lines)
    before = standard_log.read_bytes()
    with pytest.raises(AuditLogError, match="record 12 was edited") as caught:
        open_log(standard_log, signer)
    assert isinstance(caught.value, HsmDomainError)
    assert caught.value.status.name == "FAILED_PRECONDITION"
    assert standard_log.read_bytes() == before  # evidence kept


def test_refuses_a_forged_last_checkpoint(standard_log: Path, signer: InMemorySigner) -> None:
    other = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    with pytest.raises(AuditLogError, match="not signed"):
        open_log(standard_log, other)


def test_refuses_a_second_writer(log_path: Path, signer: InMemorySigner) -> None:
    with (
        open_log(log_path, signer),
        pytest.raises(AuditLogError, match="in use by another process"),
    ):
        open_log(log_path, signer)
    open_log(log_path, signer).close()  # released on close


def test_write_failure_stops_the_log(
    log_path: Path, signer: InMemorySigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(log_path, signer)
    log.append(principal="p", operation="Encrypt")

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(AuditLogError, match="No space left"):
        log.append(principal="p", operation="Encrypt")
    monkeypatch.undo()
    with pytest.raises(AuditLogError, match="failed earlier"):
        log.append(principal="p", operation="Encrypt")
    log.close()
    assert verify(log_path, signer).records == 1


def test_closed_log_refuses_appends(log_path: Path, signer: InMemorySigner) -> None:
    log = open_log(log_path, signer)
    log.close()
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.append(principal="p", operation="Encrypt")


def test_missing_file_raises(tmp_path: Path, signer: InMemorySigner) -> None:
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nothing.log", signer)


def test_refuses_a_symlinked_log(tmp_path: Path, signer: InMemorySigner) -> None:
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_bytes(b"")
    link = tmp_path / "audit.log"
    link.symlink_to(elsewhere)
    with pytest.raises(AuditLogError, match="cannot open audit log"):
        AuditLog(link, host_id=HOST, signer=signer)
