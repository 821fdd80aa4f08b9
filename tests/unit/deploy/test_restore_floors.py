"""deploy._floors.FloorCheck: which keys a restored backup lacks the newest version of, by
the HSAs' floors; and a stopped HSA's floor file read as the HSA itself writes it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from deploy._floors import FloorCheck
from deploy.init import DomainLayout
from domain_core.backup import KeyFacts
from hsa_node.keyfloors import MetadataVersionFloor

pytestmark = pytest.mark.unit

A, B, C, D = (f"00000000-0000-4000-8000-00000000000{i}" for i in range(1, 5))


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def layout(root: Path, hosts: tuple[str, ...] = ("hsa-1",)) -> DomainLayout:
    return DomainLayout(
        root=root,
        domain_id="local",
        genesis_hash=b"\0" * 32,
        node_configs={h: root / "nodes" / h / "config.json" for h in hosts},
        operator_tokens={},
    )


def test_the_keys_behind_are_older_other_or_missing(tmp_path: Path) -> None:
    check = FloorCheck(layout(tmp_path), genesis=None)  # type: ignore[arg-type]
    check.floors = {
        A: (3, digest("a3"), "hsa-1"),  # the backup holds v2: behind
        B: (2, digest("b2"), "hsa-2"),  # the backup holds v2 with other metadata: a conflict
        C: (1, digest("c1"), "hsa-1"),  # the backup holds v1, the same: fine
        D: (1, digest("d1"), "hsa-3"),  # not in the backup at all
    }
    check.compare(KeyFacts(A, 2, digest("a2"), deleted=False))
    check.compare(KeyFacts(B, 2, digest("other"), deleted=False))
    check.compare(KeyFacts(C, 1, digest("c1"), deleted=False))
    behind = check.finish()
    assert [(k.key_id, k.backup_version, k.newest_version, k.known_by) for k in behind] == [
        (A, 2, 3, "hsa-1"),
        (B, 2, 2, "hsa-2"),
        (D, 0, 1, "hsa-3"),
    ]
    assert [k.same_version_other_metadata for k in behind] == [False, True, False]
    assert behind[2].to_json()["backup_version"] is None


def test_a_stopped_hsas_floor_file_is_read_as_the_hsa_wrote_it(tmp_path: Path) -> None:
    domain = layout(tmp_path, ("hsa-1", "hsa-2"))
    floors = MetadataVersionFloor(domain.node_data_dir("hsa-1") / "key_versions.db")
    floors.admit(A, 1, digest("a1"))
    floors.admit(A, 4, digest("a4"))
    floors.admit(B, 2, digest("b2"))
    floors.close()
    check = FloorCheck(domain, genesis=None)  # type: ignore[arg-type]
    said = check._read_floor_file("hsa-1")
    assert said == "not running; 2 floors read from its file"
    assert check.floors[A] == (4, digest("a4"), "hsa-1 (its file)")
    assert check._read_floor_file("hsa-2") == "not running, no floor file"
    domain.node_data_dir("hsa-2").mkdir(parents=True)
    (domain.node_data_dir("hsa-2") / "key_versions.db").write_bytes(b"not a database" * 100)
    assert check._read_floor_file("hsa-2").startswith(
        "not running; its floor file could not be read"
    )
