"""KeyClient against a real local domain: failover when an HSA dies, envelopes of large files.

Every test starts its own coordinator and HSA processes (`local_cluster`), killed at teardown
whatever the outcome.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster

from domain_core.errors import InvalidCiphertextError, NotFoundError, PermissionDeniedError
from domain_core.kms_client import KeyClient, decrypt_envelope, encrypt_envelope, read_cluster

pytestmark = pytest.mark.cluster

MIB = 1024 * 1024


def _client(cluster: LocalCluster, addresses: list[str]) -> KeyClient:
    tls = cluster.client_tls()
    return KeyClient(
        addresses, ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, timeout=5
    )


def test_a_ciphertext_made_on_one_hsa_decrypts_after_that_hsa_dies(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    addresses = cluster.node_addresses()
    assert sorted(read_cluster(cluster.directory)[0]) == sorted(addresses.values())
    with (
        _client(cluster, [addresses["hsa-1"]]) as on_first,
        KeyClient.from_cluster(cluster.directory) as everywhere,
    ):
        key = on_first.create_key(description="failover")
        context = {"order": "42"}
        blobs = [on_first.encrypt(key.key_id, f"secret {i}".encode(), context) for i in range(3)]
        data_key, data_key_blob = on_first.generate_data_key(key.key_id, context)
        # Warm every channel of the full client, then lose the HSA that made the blobs.
        for _ in range(3):
            assert everywhere.describe_key(key.key_id).description == "failover"
        cluster.kill_node("hsa-1")
        # Round-robin keeps reaching the dead endpoint first for some calls: each fails over.
        for _ in range(3):
            for i, blob in enumerate(blobs):
                assert everywhere.decrypt(blob, context) == f"secret {i}".encode()
        assert everywhere.decrypt(data_key_blob, context) == data_key
        with pytest.raises(InvalidCiphertextError):
            everywhere.decrypt(blobs[0], {"order": "43"})
        # Calls that create or change keys fail over too when the dead HSA is refused at
        # connect time (nothing was sent); they work on the survivors.
        created = [everywhere.create_key(description=f"after {i}") for i in range(3)]
        rotated = everywhere.rotate_key(created[0].key_id)
        assert rotated.current_backing_version == 2
        moved = everywhere.re_encrypt(blobs[1], created[1].key_id, context, {"order": "moved"})
        assert everywhere.decrypt(moved, {"order": "moved"}) == b"secret 1"
        ids = {m.key_id for m in everywhere.list_keys(page_size=2)}
        assert {key.key_id, *(c.key_id for c in created)} <= ids
        with pytest.raises(NotFoundError):
            everywhere.describe_key("1b4e28ba-2fa1-41d2-883f-0016d3cca427")


def test_policies_decide_who_may_do_what(local_cluster: Callable[..., LocalCluster]) -> None:
    cluster = local_cluster(nodes=2)
    with KeyClient.from_cluster(cluster.directory) as client:
        me = f"spiffe://{cluster.domain_id}/client/demo-app"
        key = client.create_key(
            policy={
                "grants": [
                    {"principals": [me], "operations": ["encrypt", "describe", "admin"]},
                ]
            }
        )
        blob = client.encrypt(key.key_id, b"x")
        with pytest.raises(PermissionDeniedError, match="may not decrypt"):
            client.decrypt(blob)
        updated = client.put_key_policy(
            key.key_id, {"grants": [{"principals": [me], "operations": ["decrypt", "admin"]}]}
        )
        assert [g.operations for g in updated.policy] == [("decrypt", "admin")]

        # Another HSA may serve from its cache for up to its TTL (2 s): the change arrives.
        def decrypts_everywhere() -> bool:
            try:
                return all(client.decrypt(blob) == b"x" for _ in range(4))
            except PermissionDeniedError:
                return False

        cluster.wait_for(decrypts_everywhere, timeout=15, what="the new policy on every HSA")
        with pytest.raises(PermissionDeniedError, match="may not encrypt"):
            client.encrypt(key.key_id, b"y")


def _write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, MIB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def test_envelope_of_a_30_mib_file_streams_and_detects_tampering(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=2)
    files = tmp_path / "files"
    files.mkdir()
    plain, sealed, back = files / "data.bin", files / "data.hsme", files / "back.bin"
    expected = _write_random_file(plain, 30 * MIB)
    context = {"file": "data.bin"}
    with KeyClient.from_cluster(cluster.directory) as client:
        key_id = client.create_key().key_id
        with plain.open("rb") as source, sealed.open("wb") as out:
            assert encrypt_envelope(client, key_id, source, out, context) == 30 * MIB
        # 64 KiB chunks, 16 bytes of tag each, plus one header.
        assert 30 * MIB + 480 * 16 < sealed.stat().st_size < 30 * MIB + 480 * 16 + 1024
        with sealed.open("rb") as source:
            assert decrypt_envelope(client, source, back, context) == 30 * MIB
        assert _sha256(back) == expected
        back.unlink()

        # One flipped bit in the middle: refused, and no output file appears.
        with sealed.open("r+b") as handle:
            handle.seek(15 * MIB)
            byte = handle.read(1)
            handle.seek(15 * MIB)
            handle.write(bytes([byte[0] ^ 0x01]))
        with sealed.open("rb") as source, pytest.raises(InvalidCiphertextError) as info:
            decrypt_envelope(client, source, back)
        assert str(info.value) == "invalid ciphertext"
        assert sorted(p.name for p in files.iterdir()) == ["data.bin", "data.hsme"]
