"""Where audit heads are kept off the log: an HSA's book of its own and its peers' heads
(`hsa_node.audit_heads`), its recovery of its own heads at start, and the coordinator's
store of the highest head per host and log (a compare-and-swap).

The attacks: a peer (or a coordinator) serves a lower head, a forged one, a head of another
chain, one of a host not in the verified state, or a head of this host that would lower its
head file; none of them is kept, and none lowers anything.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import AuditHeadRecord
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm
from domain_edge.audit import AuditHead, AuditLog, AuditLogError, head_file
from hsa_node.audit_heads import PEER_HEADS_FILE, AuditHeadBook, recover_own_heads

pytestmark = pytest.mark.unit

T0 = 1_767_225_600.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict[str, InMemorySigner]:
    return {h: InMemorySigner.generate(SignatureAlgorithm.ED25519) for h in ("hsa-1", "hsa-2")}


def heads_of(
    directory: Path, host: str, signer: InMemorySigner, counts: list[int], start: float = T0
) -> list[AuditHead]:
    """The successive heads of one log of `host` after `counts[i]` more records each."""
    path = directory / "audit.log"
    heads = []
    clock = Clock(start)
    log = AuditLog(path, host_id=host, signer=signer, checkpoint_every=1000, clock=clock)
    for count in counts:
        for _ in range(count):
            clock.now += 0.001
            log.append(principal="spiffe://local/client/app", operation="Encrypt")
        log.checkpoint()
        heads.append(AuditHead.parse(head_file(path).read_bytes().rstrip(b"\n")))
    log.close()
    return heads


@pytest.fixture
def book(tmp_path: Path, keys: dict[str, InMemorySigner]) -> AuditHeadBook:
    data = tmp_path / "hsa-1-data"
    data.mkdir()
    return book_at(data, keys)


def book_at(data: Path, keys: dict[str, InMemorySigner]) -> AuditHeadBook:
    members: dict[str, PublicKey] = {h: s.public_key for h, s in keys.items()}
    return AuditHeadBook(data, "hsa-1", keys["hsa-1"].public_key, members.get)


def test_the_book_keeps_the_highest_verified_head_of_each_peer_log(
    book: AuditHeadBook, tmp_path: Path, keys: dict[str, InMemorySigner]
) -> None:
    low, high = heads_of(tmp_path / "hsa-2", "hsa-2", keys["hsa-2"], [3, 4])
    assert book.learn([low.raw], "peer hsa-2") == 1
    assert book.learn([high.raw, low.raw], "peer hsa-2") == 1
    assert [h.seq for h in book.kept("hsa-2")] == [7]
    assert book.learn([high.raw], "peer hsa-3") == 0  # the same again: nothing to write
    path = tmp_path / "hsa-1-data" / PEER_HEADS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"heads": [high.raw.decode()]}
    # A restart reads them back.
    again = book_at(tmp_path / "hsa-1-data", keys)
    assert again.kept() == [high]


def test_the_book_refuses_lower_forged_foreign_and_other_chain_heads(
    book: AuditHeadBook,
    tmp_path: Path,
    keys: dict[str, InMemorySigner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    low, high = heads_of(tmp_path / "hsa-2", "hsa-2", keys["hsa-2"], [3, 4])
    book.learn([high.raw], "peer hsa-2")
    caplog.set_level(logging.WARNING)

    value: dict[str, Any] = json.loads(high.raw)
    value["seq"] += 100  # a higher head with the old signature
    forged = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    stranger = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    [foreign] = heads_of(tmp_path / "hsa-9", "hsa-9", stranger, [50])  # not in the state
    [longer_other_chain] = heads_of(tmp_path / "other", "hsa-2", keys["hsa-2"], [40], T0 + 99)
    assert book.learn([low.raw], "peer hsa-2") == 0
    assert book.learn([forged], "peer hsa-2") == 0
    assert book.learn([foreign.raw], "peer hsa-2") == 0
    assert book.learn([longer_other_chain.raw], "the coordinator") == 0
    assert book.learn([b"{not json"], "peer hsa-2") == 0
    assert book.kept() == [high]
    text = caplog.text
    assert "the log may have been cut; refused" in text
    assert "forged audit head" in text
    assert "another chain" in text
    assert "does not parse" in text


def test_own_heads_come_from_the_head_files_and_only_verified_ones(
    book: AuditHeadBook, tmp_path: Path, keys: dict[str, InMemorySigner]
) -> None:
    data = tmp_path / "hsa-1-data"
    [main] = heads_of(data, "hsa-1", keys["hsa-1"], [5])
    worker_log = data / "audit-worker-2.log"
    with AuditLog(worker_log, host_id="hsa-1", signer=keys["hsa-1"], clock=Clock(T0)) as log:
        log.append(principal="p", operation="Encrypt")
    assert {(h.log, h.seq) for h in book.own()} == {("audit.log", 5), ("audit-worker-2.log", 1)}
    # An edited head file is not published (the log's writer refuses it on open).
    value = json.loads(head_file(worker_log).read_bytes())
    value["seq"] = 9
    head_file(worker_log).write_text(json.dumps(value, sort_keys=True, separators=(",", ":")))
    assert book.own() == [main]
    # What a peer is served: this host's heads, then those it keeps of others.
    low, _ = heads_of(tmp_path / "hsa-2", "hsa-2", keys["hsa-2"], [3, 4])
    book.learn([low.raw], "peer hsa-2")
    assert book.served() == [main, low]
    assert book.served("hsa-2") == [low]
    assert book.served("hsa-1") == [main]


def test_recovery_raises_the_head_files_and_never_lowers_them(
    tmp_path: Path, keys: dict[str, InMemorySigner], caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    low, high = heads_of(data, "hsa-1", keys["hsa-1"], [3, 4])
    own = keys["hsa-1"].public_key
    # The attacker cut the log and the head file back to the first checkpoint.
    lines = (data / "audit.log").read_text().splitlines()
    cut = lines[: lines.index(low.raw.decode()) + 1]
    (data / "audit.log").write_text("".join(line + "\n" for line in cut))
    head_file(data / "audit.log").write_bytes(low.raw + b"\n")
    caplog.set_level(logging.WARNING)
    adopted = recover_own_heads(
        data, "hsa-1", own, [("peer hsa-2", low.raw), ("the coordinator", high.raw)]
    )
    assert adopted == [high]
    assert head_file(data / "audit.log").read_bytes().rstrip(b"\n") == high.raw
    assert "the coordinator holds" in caplog.text
    assert recover_own_heads(data, "hsa-1", own, [("peer hsa-2", low.raw)]) == []
    assert head_file(data / "audit.log").read_bytes().rstrip(b"\n") == high.raw
    with pytest.raises(AuditLogError, match="were cut off"):
        AuditLog(data / "audit.log", host_id="hsa-1", signer=keys["hsa-1"])
    # A head of another host, or not signed by this one, changes nothing.
    [other] = heads_of(tmp_path / "hsa-2", "hsa-2", keys["hsa-2"], [50])
    stranger = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    [unsigned] = heads_of(tmp_path / "x", "hsa-1", stranger, [50])
    assert recover_own_heads(data, "hsa-1", own, [("c", other.raw), ("c", unsigned.raw)]) == []
    assert head_file(data / "audit.log").read_bytes().rstrip(b"\n") == high.raw


def test_recovery_refuses_a_second_chain_of_its_own_log(
    tmp_path: Path, keys: dict[str, InMemorySigner]
) -> None:
    data = tmp_path / "data"
    [mine] = heads_of(data, "hsa-1", keys["hsa-1"], [6])
    [replaced] = heads_of(tmp_path / "old", "hsa-1", keys["hsa-1"], [6], T0 + 77)
    with pytest.raises(AuditLogError, match="two different chains"):
        recover_own_heads(data, "hsa-1", keys["hsa-1"].public_key, [("c", replaced.raw)])
    assert head_file(data / "audit.log").read_bytes().rstrip(b"\n") == mine.raw


def test_the_coordinator_store_swaps_heads_only_from_what_it_read(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "coordinator.db")
    try:
        first = AuditHeadRecord("hsa-1", "audit.log", 5, b"five", 100)
        second = AuditHeadRecord("hsa-1", "audit.log", 9, b"nine", 101)
        assert store.get_audit_head("hsa-1", "audit.log") is None
        assert store.put_audit_head(first, None) is True
        assert store.put_audit_head(second, None) is False  # someone stored one meanwhile
        assert store.put_audit_head(second, b"other") is False
        assert store.put_audit_head(second, b"five") is True
        assert store.get_audit_head("hsa-1", "audit.log") == second
        worker = AuditHeadRecord("hsa-1", "audit-worker-1.log", 2, b"two", 102)
        other = AuditHeadRecord("hsa-2", "audit.log", 3, b"three", 103)
        assert store.put_audit_head(worker, None)
        assert store.put_audit_head(other, None)
        assert store.list_audit_heads() == [worker, second, other]
        assert store.list_audit_heads("hsa-2") == [other]
    finally:
        store.close()
    reopened = SqliteStore(tmp_path / "coordinator.db")
    try:
        assert reopened.get_audit_head("hsa-1", "audit.log") == second
    finally:
        reopened.close()
