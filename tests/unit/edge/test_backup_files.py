"""domain_edge.backup_files: a backup file appears whole or not at all, and a file that is cut
short, damaged, padded or claims a huge length is refused with one clear error, without
reading more than one bounded frame into memory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.backups import BackupContent, key_record, new_key_id
from support.simulator import SimulatedDomain

from domain_core.errors import BackupError
from domain_core.limits import MAX_BACKUP_RECORD_BYTES
from domain_edge.backup_files import BACKUP_MAGIC, BackupReader, BackupWriter, verify_backup
from domain_proto import backup_pb2

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    sim = SimulatedDomain.create("local")
    sim.advance(60)
    sim.transition([sim.rotate_domain_key_change()])
    return sim


@pytest.fixture
def content(sim: SimulatedDomain) -> BackupContent:
    content = BackupContent(sim)
    for host in ("hsa-1", "hsa-2"):
        content.add_key(key_record(sim, host, new_key_id()))
    return content


@pytest.fixture
def backup(content: BackupContent, tmp_path: Path) -> Path:
    return content.write(tmp_path / "domain.backup")


def refused(path: Path, genesis: bytes, *fragments: str) -> str:
    with pytest.raises(BackupError) as info:
        verify_backup(path, genesis)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message


def test_a_written_backup_is_private_complete_and_verifies(
    backup: Path, content: BackupContent
) -> None:
    assert backup.stat().st_mode & 0o777 == 0o600
    assert backup.read_bytes().startswith(BACKUP_MAGIC)
    assert [p.name for p in backup.parent.iterdir()] == [backup.name]  # no temporary file left
    summary = verify_backup(backup, content.sim.genesis.to_bytes())
    assert summary.counts.keys == 2
    assert summary.newest_version == 2


def test_the_writer_never_replaces_a_file_and_leaves_nothing_on_failure(
    content: BackupContent, backup: Path, tmp_path: Path
) -> None:
    before = backup.read_bytes()
    with pytest.raises(FileExistsError):
        content.write(backup)
    assert backup.read_bytes() == before
    target = tmp_path / "second.backup"

    def fail_half_way() -> None:
        with BackupWriter(target, content.header()) as writer:
            writer.write(content.records()[0])
            raise RuntimeError("the store failed half way")

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [backup.name]


def test_a_file_that_appears_meanwhile_is_not_replaced(
    content: BackupContent, tmp_path: Path
) -> None:
    """Between the writer's start and its commit another file takes the name: commit fails
    and that file stays as it is (the name is linked, never renamed over)."""
    target = tmp_path / "race.backup"
    with BackupWriter(target, content.header()) as writer:
        for record in content.records():
            writer.write(record)
        target.write_bytes(b"someone else's file")
        with pytest.raises(FileExistsError):
            writer.commit()
    assert target.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.backup"]


def test_every_cut_of_the_file_is_refused(backup: Path, content: BackupContent) -> None:
    data = backup.read_bytes()
    genesis = content.sim.genesis.to_bytes()
    cuts = sorted({0, 3, len(BACKUP_MAGIC), 10, len(data) // 2, len(data) - 40, len(data) - 1})
    for cut in cuts:
        backup.write_bytes(data[:cut])
        message = refused(backup, genesis)
        assert "cut short" in message or "not a backup" in message, (cut, message)


def test_any_flipped_byte_is_refused(backup: Path, content: BackupContent) -> None:
    data = backup.read_bytes()
    genesis = content.sim.genesis.to_bytes()
    step = max(1, len(data) // 97)
    for at in range(0, len(data), step):
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        backup.write_bytes(bytes(damaged))
        with pytest.raises(BackupError):
            verify_backup(backup, genesis)


def test_a_flipped_byte_in_an_unsigned_field_is_caught_by_the_digest(
    content: BackupContent, tmp_path: Path
) -> None:
    """A registration is signed by nobody: only the trailer's SHA-256 sees it change."""
    from domain_coordinator.store import HsaRecord

    content.hsas = [HsaRecord("hsa-1", "127.0.0.1:7001", 100)]
    path = content.write(tmp_path / "with-hsa.backup")
    data = bytearray(path.read_bytes())
    at = bytes(data).index(b"127.0.0.1:7001") + 12
    data[at] ^= 0x01  # 7001 -> 7000: still a valid registration
    path.write_bytes(bytes(data))
    refused(path, content.sim.genesis.to_bytes(), "SHA-256", "does not match")


def test_a_huge_length_prefix_is_refused_before_it_is_read(
    backup: Path, content: BackupContent
) -> None:
    data = backup.read_bytes()
    header_length = struct.unpack(">I", data[8:12])[0]
    first_record = 12 + header_length
    huge = data[:first_record] + struct.pack(">I", 0xFFFFFFF0) + data[first_record + 4 :]
    backup.write_bytes(huge)
    message = refused(backup, content.sim.genesis.to_bytes(), "claims 4294967280 bytes")
    assert f"limit of {MAX_BACKUP_RECORD_BYTES}" in message
    header = data[:8] + struct.pack(">I", 1 << 20) + data[12:]
    backup.write_bytes(header)
    refused(backup, content.sim.genesis.to_bytes(), "the header", "above the limit")


def test_the_reader_reads_one_bounded_frame_at_a_time(backup: Path) -> None:
    """A stream that claims a huge frame is refused after reading the 4-byte length only."""

    class Counting:
        def __init__(self, data: bytes) -> None:
            self.data, self.at, self.largest = data, 0, 0

        def read(self, size: int = -1) -> bytes:
            self.largest = max(self.largest, size)
            chunk = self.data[self.at : self.at + size]
            self.at += len(chunk)
            return chunk

    data = backup.read_bytes()
    header_length = struct.unpack(">I", data[8:12])[0]
    first_record = 12 + header_length
    stream = Counting(data[:first_record] + struct.pack(">I", MAX_BACKUP_RECORD_BYTES + 1))
    reader = BackupReader(stream, "stream")  # type: ignore[arg-type]
    with pytest.raises(BackupError):
        list(reader.records())
    assert stream.largest <= max(header_length, 8)


def test_bytes_after_the_trailer_are_refused(backup: Path, content: BackupContent) -> None:
    with backup.open("ab") as out:
        out.write(b"\x00")
    refused(backup, content.sim.genesis.to_bytes(), "after its trailer")


def test_a_file_without_a_trailer_is_refused(content: BackupContent, tmp_path: Path) -> None:
    path = tmp_path / "no-trailer.backup"
    frames = [BACKUP_MAGIC]
    for message in [content.header(), *content.records()]:
        data = message.SerializeToString()
        frames.append(struct.pack(">I", len(data)) + data)
    path.write_bytes(b"".join(frames))
    refused(path, content.sim.genesis.to_bytes(), "cut short")


def test_a_recomputed_trailer_does_not_make_a_forgery_verify(
    content: BackupContent, tmp_path: Path
) -> None:
    """The digest only catches damage: a forger recomputes it, and the signatures still
    refuse the forgery."""
    sim = content.sim
    sim.new_host("hsa-9")
    records = content.records()
    forged = key_record(sim, "hsa-1", new_key_id(), sign_as="hsa-9")
    records[-1].key.record = forged.SerializeToString()
    records[-1].key.key_id = forged.tokens[0].key_id
    records[-2:] = sorted(records[-2:], key=lambda r: r.key.key_id)
    path = content.write(tmp_path / "forged.backup", records=records)
    refused(path, sim.genesis.to_bytes(), "not a host of the verified domain state")


def test_not_a_backup_and_a_future_format_are_refused(
    content: BackupContent, tmp_path: Path
) -> None:
    genesis = content.sim.genesis.to_bytes()
    other = tmp_path / "genesis.state"
    other.write_bytes(genesis)
    refused(other, genesis, "not a backup")
    future = content.write(tmp_path / "future.backup", header=content.header(format_version=2))
    refused(future, genesis, "format version 2")


def test_a_backup_checked_against_another_domains_genesis_is_refused(
    backup: Path, content: BackupContent
) -> None:
    stranger = SimulatedDomain.create("local")
    refused(backup, stranger.genesis.to_bytes(), "another domain")
    refused(backup, b"not a state", "not a valid state")


def test_an_audit_head_must_be_signed_by_its_host(content: BackupContent, tmp_path: Path) -> None:
    from domain_edge.audit import AuditLog

    sim = content.sim
    log = AuditLog(tmp_path / "audit.log", host_id="hsa-1", signer=sim.hosts["hsa-1"].signer)
    log.append(principal="spiffe://local/client/app", operation="Encrypt")
    log.checkpoint()
    head = log.latest_head
    log.close()
    assert head is not None
    records = content.records()
    item = backup_pb2.BackupAuditHead(
        host_id="hsa-1", log=head.log, seq=head.seq, checkpoint=head.raw, reported_at=1
    )
    header = content.header()
    header.counts.audit_heads = 1
    good = content.write(
        tmp_path / "heads.backup",
        header=header,
        records=[*records, backup_pb2.BackupRecord(audit_head=item)],
    )
    verify_backup(good, sim.genesis.to_bytes())
    item.host_id = "hsa-2"  # hsa-1's head kept as hsa-2's
    bad = content.write(
        tmp_path / "bad-heads.backup",
        header=header,
        records=[*records, backup_pb2.BackupRecord(audit_head=item)],
    )
    refused(bad, sim.genesis.to_bytes(), "audit head of 'hsa-2'")
