"""Tests for the heads of domain_edge.audit: the head file beside the log, the checkpoint
timing, published heads and how heads compare.

The attacks: cut the log back to an earlier checkpoint, delete it, empty it, replace it by a
new chain, edit the head file, pass one log's head off as another's. Each is refused when the
log is opened and reported by the verifier given the published head.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from domain_core import canonical
from domain_core.contexts import PayloadType
from domain_core.errors import BadSignatureError, MalformedMessageError
from domain_core.limits import MAX_HEAD_BYTES
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm
from domain_edge import audit
from domain_edge.audit import (
    AuditHead,
    AuditLog,
    AuditLogError,
    HeadOrder,
    compare_heads,
    describe_refusal,
    head_file,
    raise_persisted_head,
    read_persisted_head,
    verify_audit_log,
)

pytestmark = pytest.mark.unit

HOST = "hsa-1"
T0 = 1_767_225_600.0


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class CountingSigner:
    """A host signer that records which threads signed."""

    def __init__(self, inner: InMemorySigner) -> None:
        self._inner = inner
        self.threads: list[str] = []

    @property
    def public_key(self) -> PublicKey:
        return self._inner.public_key

    def sign(self, message: bytes) -> bytes:
        self.threads.append(threading.current_thread().name)
        return self._inner.sign(message)


@pytest.fixture(scope="module")
def signer() -> InMemorySigner:
    return InMemorySigner.generate(SignatureAlgorithm.ED25519)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit.log"


def open_log(path: Path, signer: Any, **kwargs: Any) -> AuditLog:
    kwargs.setdefault("checkpoint_every", 4)
    kwargs.setdefault("clock", FakeClock())
    return AuditLog(path, host_id=HOST, signer=signer, **kwargs)


def append_n(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(principal="spiffe://local/client/app", operation="Encrypt", key_id=f"k{i}")


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def checkpoints_of(path: Path) -> list[dict[str, Any]]:
    return [v for v in map(json.loads, lines_of(path)) if v.get("type") == "checkpoint"]


def cut_after_checkpoint(path: Path, count: int) -> None:
    """The attack of issue 13: cut the log back to its checkpoint number `count`."""
    lines = lines_of(path)
    index = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == count)
    path.write_text("".join(line + "\n" for line in lines[: index + 1]))


def head_of(path: Path) -> AuditHead:
    return AuditHead.parse(head_file(path).read_bytes().rstrip(b"\n"))


@pytest.fixture
def ten_records(log_path: Path, signer: InMemorySigner) -> Path:
    """r1..r4 C1 r5..r8 C2 r9 r10 C3, head file at C3 (record 10)."""
    with open_log(log_path, signer) as log:
        append_n(log, 10)
    return log_path


# --- the head file ------------------------------------------------------------------------------


def test_every_checkpoint_raises_the_head_file(log_path: Path, signer: InMemorySigner) -> None:
    log = open_log(log_path, signer)
    append_n(log, 3)
    assert not head_file(log_path).exists()
    append_n(log, 1)  # checkpoint 1 (record 4)
    assert head_of(log_path).seq == 4
    assert stat.S_IMODE(head_file(log_path).stat().st_mode) == 0o600
    append_n(log, 4)
    assert (head_of(log_path).seq, head_of(log_path).count) == (8, 2)
    assert log.latest_head == head_of(log_path)
    log.close()
    head = head_of(log_path)
    assert (head.seq, head.count, head.host, head.log) == (8, 2, HOST, "audit.log")
    # The head file holds the log's last checkpoint line, byte for byte.
    assert head_file(log_path).read_text().rstrip("\n") == lines_of(log_path)[-1]
    head.verify(signer.public_key)


def test_cut_back_to_a_checkpoint_is_refused_on_open(
    ten_records: Path, signer: InMemorySigner
) -> None:
    cut_after_checkpoint(ten_records, 2)  # records 9 and 10 and checkpoint 3 gone
    assert verify_audit_log(ten_records, signer.public_key).ok  # the file alone looks fine
    with pytest.raises(AuditLogError) as refused:
        open_log(ten_records, signer)
    message = refused.value.message
    assert str(ten_records) in message
    assert str(head_file(ten_records)) in message
    assert "ends at record 8" in message
    assert "record 10" in message
    assert "records 9 to 10 were cut off" in message
    assert "restore the log from a backup" in message
    # Refusing changed nothing: the evidence is as the attacker left it.
    assert len(checkpoints_of(ten_records)) == 2


def test_deleted_log_is_refused_and_not_recreated(
    ten_records: Path, signer: InMemorySigner
) -> None:
    ten_records.unlink()
    with pytest.raises(AuditLogError, match=r"is missing, but .*record 10.*deleted or moved"):
        open_log(ten_records, signer)
    assert not ten_records.exists()


def test_emptied_log_is_refused(ten_records: Path, signer: InMemorySigner) -> None:
    ten_records.write_bytes(b"")
    with pytest.raises(AuditLogError, match=r"is empty, but .*records 1 to 10 were cut off"):
        open_log(ten_records, signer)


def test_a_new_chain_in_place_of_the_log_is_refused(
    ten_records: Path, signer: InMemorySigner, tmp_path: Path
) -> None:
    """Replace the log by a fresh one of the same host that is even longer: still refused."""
    other = tmp_path / "other" / "audit.log"
    with open_log(other, signer, clock=FakeClock(T0 + 100)) as log:
        append_n(log, 12)
    shutil.copy(other, ten_records)
    with pytest.raises(AuditLogError, match=r"record 10 has another hash .*replaced or rewritten"):
        open_log(ten_records, signer)


def test_an_edited_head_file_is_refused(ten_records: Path, signer: InMemorySigner) -> None:
    value = json.loads(head_file(ten_records).read_bytes())
    value["seq"] = 4  # lower the head to make room for a cut: the signature breaks
    head_file(ten_records).write_text(
        json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n"
    )
    with pytest.raises(AuditLogError, match=r"does not hold a signed checkpoint .*edited"):
        open_log(ten_records, signer)


def test_the_head_of_another_log_is_not_taken(
    ten_records: Path, signer: InMemorySigner, tmp_path: Path
) -> None:
    worker = tmp_path / "data" / "audit-worker-1.log"
    with open_log(worker, signer) as log:
        append_n(log, 20)
    shutil.copy(head_file(worker), head_file(ten_records))
    with pytest.raises(AuditLogError, match=r"it is the head of hsa-1 audit-worker-1.log"):
        open_log(ten_records, signer)


def test_a_lagging_or_missing_head_file_is_raised_on_open(
    ten_records: Path, signer: InMemorySigner
) -> None:
    """A crash between the log's fsync and the head file's leaves the head file behind (or
    absent): the log is ahead of it, which is fine, and the open raises it."""
    head_file(ten_records).unlink()
    with open_log(ten_records, signer) as log:
        assert log.seq == 10
        assert head_of(ten_records).seq == 10
        append_n(log, 4)
    assert head_of(ten_records).seq == 14


def test_a_head_file_below_the_log_still_checks_its_record(
    ten_records: Path, signer: InMemorySigner
) -> None:
    head_8 = AuditHead.parse(canonical_line(checkpoints_of(ten_records)[1]))
    audit.persist_head(ten_records, head_8)  # an older head: the log goes past it
    with open_log(ten_records, signer) as log:
        assert log.seq == 10
    # Record 8 edited: the head file's record no longer matches.
    audit.persist_head(ten_records, head_8)
    lines = lines_of(ten_records)
    index = next(i for i, line in enumerate(lines) if '"seq":8,' in line and "context" in line)
    value = json.loads(lines[index])
    value["hash"] = "ab" * 32
    lines[index] = canonical_line(value).decode()
    ten_records.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(AuditLogError, match="record 8 has another hash"):
        open_log(ten_records, signer)


def canonical_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def test_raise_persisted_head_adopts_only_a_higher_head_of_the_same_chain(
    ten_records: Path, signer: InMemorySigner, tmp_path: Path
) -> None:
    heads = [AuditHead.parse(canonical_line(c)) for c in checkpoints_of(ten_records)]
    head_file(ten_records).unlink()
    assert raise_persisted_head(ten_records, heads[1], signer.public_key) is True
    assert raise_persisted_head(ten_records, heads[0], signer.public_key) is False
    assert raise_persisted_head(ten_records, heads[1], signer.public_key) is False
    assert head_of(ten_records) == heads[1]
    assert raise_persisted_head(ten_records, heads[2], signer.public_key) is True
    other = tmp_path / "other" / "audit.log"
    with open_log(other, signer, clock=FakeClock(T0 + 100)) as log:
        append_n(log, 10)
    conflicting = head_of(other)  # record 10 of another chain of the same host and log
    with pytest.raises(AuditLogError, match=r"another chain .*two different chains"):
        raise_persisted_head(ten_records, conflicting, signer.public_key)
    stranger = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    with pytest.raises(BadSignatureError, match="not believed"):
        raise_persisted_head(ten_records, heads[2], stranger.public_key)


# --- checkpoint timing --------------------------------------------------------------------------


def test_checkpoint_if_due_follows_the_interval(log_path: Path, signer: InMemorySigner) -> None:
    clock = FakeClock()
    log = open_log(log_path, signer, checkpoint_every=1000, clock=clock)
    assert log.checkpoint_if_due(T0 + 5) is False  # nothing to sign
    append_n(log, 3)
    assert log.checkpoint_if_due(T0 + 0.5) is False  # within the second
    assert checkpoints_of(log_path) == []
    assert log.checkpoint_if_due(T0 + 1.0) is True
    assert [c["seq"] for c in checkpoints_of(log_path)] == [3]
    assert head_of(log_path).seq == 3
    clock.now = T0 + 1.0
    append_n(log, 1)
    assert log.checkpoint_if_due(T0 + 1.9) is False
    assert log.checkpoint_if_due(T0 + 2.0) is True
    assert log.checkpoint_if_due(T0 + 9.0) is False  # nothing new since
    log.close()


def test_default_interval_is_one_second(log_path: Path, signer: InMemorySigner) -> None:
    clock = FakeClock()
    log = AuditLog(log_path, host_id=HOST, signer=signer, clock=clock)
    append_n(log, 1)
    assert log.checkpoint_if_due(T0 + 0.99) is False
    assert log.checkpoint_if_due(T0 + 1.0) is True
    log.close()


def test_checkpoint_if_due_also_follows_the_count(log_path: Path, signer: InMemorySigner) -> None:
    log = open_log(log_path, signer, checkpoint_every=5, background=True)
    try:
        append_n(log, 5)
        # The count, whatever the (fake) time: checkpointed by this call or, first, by the
        # log's own thread, which the fifth record woke.
        log.checkpoint_if_due(T0)
        deadline = time.monotonic() + 5
        while not [c["seq"] for c in checkpoints_of(log_path)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [c["seq"] for c in checkpoints_of(log_path)] == [5]
        assert log.checkpoint_if_due(T0) is False  # nothing waits any more
    finally:
        log.close()


def test_background_checkpoints_keep_signing_and_fsync_off_the_appending_threads(
    log_path: Path, signer: InMemorySigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingSigner(signer)
    fsyncs: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsyncs.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = AuditLog(
        log_path,
        host_id=HOST,
        signer=counting,
        checkpoint_every=50,
        checkpoint_interval_seconds=0.05,
        background=True,
    )
    append_n(log, 120)  # past the count twice, from this thread
    assert "MainThread" not in counting.threads
    assert "MainThread" not in fsyncs
    deadline = time.monotonic() + 5
    while (head := log.latest_head) is None or head.seq < 120:
        assert time.monotonic() < deadline, "no checkpoint within 5 s"
        time.sleep(0.01)

    # The head file is written by the log's thread right after the checkpoint it names is
    # durable, which may be a moment after `latest_head` moved (the first one: the file is
    # not there yet): wait for it too (bounded).
    def written() -> int:
        try:
            return head_of(log_path).seq
        except FileNotFoundError:
            return 0

    while written() < 120:
        assert time.monotonic() < deadline, "the head file did not reach the checkpoint in 5 s"
        time.sleep(0.01)
    assert head_of(log_path).seq == 120
    assert counting.threads
    assert set(counting.threads) == {"audit-audit.log"}
    log.close()
    report = verify_audit_log(log_path, signer.public_key, host_id=HOST, log_name="audit.log")
    assert report.ok
    assert report.unsigned_tail == 0


# --- published heads and the verifier -----------------------------------------------------------


def test_verify_against_published_heads(ten_records: Path, signer: InMemorySigner) -> None:
    published = head_of(ten_records)
    report = verify_audit_log(
        ten_records, signer.public_key, host_id=HOST, log_name="audit.log", published=[published]
    )
    assert report.ok
    assert report.published_seq == 10
    cut_after_checkpoint(ten_records, 2)
    report = verify_audit_log(
        ten_records, signer.public_key, host_id=HOST, log_name="audit.log", published=[published]
    )
    assert (report.ok, report.first_bad_seq, report.published_seq) == (False, 9, 10)
    assert "the log ends at record 8" in report.reason
    assert "records 9 to 10 were cut off" in report.reason


def test_verify_finds_a_replaced_chain_by_a_lower_head(
    ten_records: Path, signer: InMemorySigner, tmp_path: Path
) -> None:
    old_head_8 = AuditHead.parse(canonical_line(checkpoints_of(ten_records)[1]))
    other = tmp_path / "other" / "audit.log"
    with open_log(other, signer, clock=FakeClock(T0 + 100)) as log:
        append_n(log, 30)
    report = verify_audit_log(
        other, signer.public_key, host_id=HOST, log_name="audit.log", published=[old_head_8]
    )
    assert (report.ok, report.first_bad_seq) == (False, 8)
    assert "record 8 is not the record its host signed" in report.reason


def test_published_heads_must_be_this_logs_and_signed(
    ten_records: Path, signer: InMemorySigner
) -> None:
    head = head_of(ten_records)
    with pytest.raises(ValueError, match="not a head of this log"):
        verify_audit_log(
            ten_records, signer.public_key, log_name="audit-worker-1.log", published=[head]
        )
    stranger = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    with pytest.raises(BadSignatureError):
        verify_audit_log(ten_records, stranger.public_key, published=[head])


def test_a_checkpoint_of_another_log_in_the_file_is_named(
    ten_records: Path, signer: InMemorySigner
) -> None:
    report = verify_audit_log(ten_records, signer.public_key, log_name="audit-worker-3.log")
    assert not report.ok
    assert "a checkpoint of log 'audit.log', not of 'audit-worker-3.log'" in report.reason


def test_a_file_cut_at_the_front_is_named(ten_records: Path, signer: InMemorySigner) -> None:
    lines = lines_of(ten_records)
    start = next(i for i, line in enumerate(lines) if json.loads(line).get("count") == 1)
    ten_records.write_text("".join(line + "\n" for line in lines[start:]))
    report = verify_audit_log(ten_records, signer.public_key)
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "starts with a signed checkpoint of record 4" in report.reason
    assert "records 1 to 4 are not in this file" in report.reason


# --- parsing and comparing heads ----------------------------------------------------------------


def test_head_parse_refuses_what_the_writer_never_writes(ten_records: Path) -> None:
    raw = head_file(ten_records).read_bytes().rstrip(b"\n")
    value = json.loads(raw)
    AuditHead.parse(raw)
    legacy = {k: v for k, v in value.items() if k not in ("log", "first")}
    cases = {
        "legacy (no log, no first)": canonical_line(legacy),
        "not canonical": json.dumps(value).encode(),
        "too long": raw + b" " * MAX_HEAD_BYTES,
        "a record": canonical_line({**value, "type": "record"}),
        "seq zero": canonical_line({**value, "seq": 0}),
        "log with a path": canonical_line({**value, "log": "../audit.log"}),
        "not json": b"\xff",
    }
    for name, bad in cases.items():
        try:
            AuditHead.parse(bad)
        except MalformedMessageError:
            continue
        pytest.fail(f"accepted a head that is {name}")


def make_head(signer: InMemorySigner, *, seq: int, head: str, first: str, count: int) -> AuditHead:
    fields: dict[str, Any] = {
        "type": "checkpoint",
        "host": HOST,
        "log": "audit.log",
        "first": first,
        "seq": seq,
        "head": head,
        "count": count,
        "time": "2026-01-01T00:00:00.000Z",
    }
    message = canonical.signing_input(PayloadType.AUDIT_CHECKPOINT, audit.checkpoint_digest(fields))
    fields["signature"] = signer.sign(message).hex()
    return AuditHead.parse(canonical_line(fields))


@pytest.mark.parametrize(
    ("known", "new", "order"),
    [
        (None, (5, "a", "f"), HeadOrder.NEWER),
        ((5, "a", "f"), (9, "b", "f"), HeadOrder.NEWER),
        ((5, "a", "f"), (5, "a", "f"), HeadOrder.SAME),
        ((9, "b", "f"), (5, "a", "f"), HeadOrder.LOWER),
        ((5, "a", "f"), (5, "c", "f"), HeadOrder.CONFLICT),
        ((5, "a", "f"), (9, "b", "e"), HeadOrder.CONFLICT),  # a longer, other chain
        ((9, "b", "f"), (5, "a", "e"), HeadOrder.CONFLICT),
    ],
)
def test_compare_heads(
    signer: InMemorySigner,
    known: tuple[int, str, str] | None,
    new: tuple[int, str, str],
    order: HeadOrder,
) -> None:
    def build(spec: tuple[int, str, str], count: int) -> AuditHead:
        seq, head, first = spec
        return make_head(signer, seq=seq, head=head * 64, first=first * 64, count=count)

    known_head = build(known, 1) if known is not None else None
    new_head = build(new, 2)
    assert compare_heads(known_head, new_head) is order
    if known_head is not None and order in (HeadOrder.LOWER, HeadOrder.CONFLICT):
        text = describe_refusal(known_head, new_head)
        assert "refused" in text
        assert f"record {new_head.seq}" in text


def test_read_persisted_head_without_a_file(log_path: Path, signer: InMemorySigner) -> None:
    assert read_persisted_head(log_path, signer.public_key, HOST) is None
