"""domain_core.peering: a peer's signed answers count only for the question asked, from a host
of the asker's own verified state.

The attacks: an answer replayed for another nonce, moved to another domain, claimed by another
host, signed by a host the state does not trust (a removed host, a certificate the CA issued
for an unknown name), signed by the asker itself, with one bit flipped anywhere, or a page of
floors that is malformed once its signature checks.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from support.simulator import SimulatedDomain, flip_bit, new_host

from domain_core import peering
from domain_core.errors import (
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    UnknownSignerError,
)
from domain_proto import services_pb2

pytestmark = pytest.mark.unit

KEY = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
OTHER_KEY = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    return SimulatedDomain.create(domain_id="local", hosts=3)


def head_of(sim: SimulatedDomain, host: str, version: int = 1) -> peering.PeerHead:
    return peering.PeerHead(
        host_id=host,
        version=version,
        state_hash=sim.genesis.hash,
        floor_epoch=bytes(range(16)),
        floor_sequence=7,
    )


def confirm(
    sim: SimulatedDomain, host: str, nonce: bytes, *, domain_id: str = "local"
) -> services_pb2.HeadConfirmation:
    return peering.sign_head_confirmation(
        sim.hosts[host].signer, domain_id=domain_id, nonce=nonce, head=head_of(sim, host)
    )


def test_a_head_confirmation_verifies_for_its_nonce_under_the_host_key(
    sim: SimulatedDomain,
) -> None:
    nonce = peering.new_nonce()
    head = peering.verify_head_confirmation(
        confirm(sim, "hsa-2", nonce),
        manifest=sim.genesis.manifest,
        nonce=nonce,
        self_host_id="hsa-1",
    )
    assert head == head_of(sim, "hsa-2")


def test_a_replayed_or_moved_head_confirmation_is_refused(sim: SimulatedDomain) -> None:
    nonce = peering.new_nonce()
    answer = confirm(sim, "hsa-2", nonce)
    manifest = sim.genesis.manifest
    # Replayed for another question.
    with pytest.raises(BadSignatureError):
        peering.verify_head_confirmation(
            answer, manifest=manifest, nonce=peering.new_nonce(), self_host_id="hsa-1"
        )
    # Signed for another domain.
    elsewhere = confirm(sim, "hsa-2", nonce, domain_id="other")
    with pytest.raises(BadSignatureError):
        peering.verify_head_confirmation(
            elsewhere, manifest=manifest, nonce=nonce, self_host_id="hsa-1"
        )
    # Claimed by another host of the domain (hsa-3's name on hsa-2's signature).
    relabelled = services_pb2.HeadConfirmation()
    relabelled.CopyFrom(answer)
    relabelled.host_id = "hsa-3"
    with pytest.raises(BadSignatureError):
        peering.verify_head_confirmation(
            relabelled, manifest=manifest, nonce=nonce, self_host_id="hsa-1"
        )
    # Another version, hash or floor position than the host signed.
    for field, value in (
        ("version", 2),
        ("state_hash", bytes(32)),
        ("floor_epoch", bytes(16)),
        ("floor_sequence", 8),
        ("floors_complete", True),
    ):
        changed = services_pb2.HeadConfirmation()
        changed.CopyFrom(answer)
        setattr(changed, field, value)
        with pytest.raises(BadSignatureError):
            peering.verify_head_confirmation(
                changed, manifest=manifest, nonce=nonce, self_host_id="hsa-1"
            )


def test_a_head_confirmation_from_outside_the_state_or_from_itself_is_refused(
    sim: SimulatedDomain,
) -> None:
    nonce = peering.new_nonce()
    manifest = sim.genesis.manifest
    # A host the state does not list (removed, or a name the CA certified but no quorum added),
    # signing with its own key under any name it likes.
    stranger = new_host("local", "hsa-9")
    for name in ("hsa-9", "hsa-2"):
        answer = peering.sign_head_confirmation(
            stranger.signer, domain_id="local", nonce=nonce, head=head_of(sim, name)
        )
        with pytest.raises((UnknownSignerError, BadSignatureError)):
            peering.verify_head_confirmation(
                answer, manifest=manifest, nonce=nonce, self_host_id="hsa-1"
            )
    # The asker's own answer (a loop back to itself) confirms nothing.
    with pytest.raises(UnknownSignerError, match="this host itself"):
        peering.verify_head_confirmation(
            confirm(sim, "hsa-1", nonce), manifest=manifest, nonce=nonce, self_host_id="hsa-1"
        )


def test_any_flipped_bit_of_a_head_confirmation_is_refused(sim: SimulatedDomain) -> None:
    nonce = peering.new_nonce()
    raw = confirm(sim, "hsa-2", nonce).SerializeToString()
    for bit in range(0, len(raw) * 8, 7):
        damaged = services_pb2.HeadConfirmation()
        try:
            damaged.ParseFromString(flip_bit(raw, bit))
        except DecodeError:
            continue  # no longer parses: refused before it reaches the verifier
        with pytest.raises((BadSignatureError, UnknownSignerError, MalformedMessageError)):
            peering.verify_head_confirmation(
                damaged, manifest=sim.genesis.manifest, nonce=nonce, self_host_id="hsa-1"
            )


def test_nonces_are_bounded() -> None:
    assert len(peering.new_nonce()) == peering.NONCE_BYTES
    assert peering.new_nonce() != peering.new_nonce()
    for size in (0, 15, 65):
        with pytest.raises(InvalidInputError, match="nonce must be 16 to 64 bytes"):
            peering.check_nonce(bytes(size))


# --- key floor pages ----------------------------------------------------------------------


def page(*floors: services_pb2.KeyFloor) -> services_pb2.KeyFloorPage:
    return services_pb2.KeyFloorPage(epoch=bytes(16), floors=floors, next_sequence=3)


def floor(
    key_id: str = KEY, version: int = 2, digest: bytes = b"\x01" * 32
) -> services_pb2.KeyFloor:
    return services_pb2.KeyFloor(key_id=key_id, metadata_version=version, metadata_hash=digest)


def test_a_floor_page_verifies_for_its_nonce_and_a_worker_may_ask_its_own_host(
    sim: SimulatedDomain,
) -> None:
    nonce = peering.new_nonce()
    signed = peering.sign_key_floors(
        sim.hosts["hsa-2"].signer,
        domain_id="local",
        nonce=nonce,
        host_id="hsa-2",
        page=page(floor()),
    )
    manifest = sim.genesis.manifest
    got = peering.verify_key_floors(signed, manifest=manifest, nonce=nonce, self_host_id="hsa-1")
    assert list(got.floors) == [floor()]
    with pytest.raises(BadSignatureError):
        peering.verify_key_floors(
            signed, manifest=manifest, nonce=peering.new_nonce(), self_host_id="hsa-1"
        )
    # From a worker's side: only its own HSA's answer counts, no other host's.
    own = peering.sign_key_floors(
        sim.hosts["hsa-1"].signer, domain_id="local", nonce=nonce, host_id="hsa-1", page=page()
    )
    peering.verify_key_floors(
        own, manifest=manifest, nonce=nonce, self_host_id="hsa-1", from_self=True
    )
    with pytest.raises(UnknownSignerError):
        peering.verify_key_floors(
            signed, manifest=manifest, nonce=nonce, self_host_id="hsa-1", from_self=True
        )
    with pytest.raises(UnknownSignerError):
        peering.verify_key_floors(own, manifest=manifest, nonce=nonce, self_host_id="hsa-1")


def test_a_floor_page_with_a_changed_byte_or_from_a_stranger_is_refused(
    sim: SimulatedDomain,
) -> None:
    nonce = peering.new_nonce()
    manifest = sim.genesis.manifest
    signed = peering.sign_key_floors(
        sim.hosts["hsa-2"].signer,
        domain_id="local",
        nonce=nonce,
        host_id="hsa-2",
        page=page(floor()),
    )
    for bit in range(0, len(signed.page) * 8, 5):
        tampered = services_pb2.KeyFloors()
        tampered.CopyFrom(signed)
        tampered.page = flip_bit(signed.page, bit)
        with pytest.raises(BadSignatureError):
            peering.verify_key_floors(
                tampered, manifest=manifest, nonce=nonce, self_host_id="hsa-1"
            )
    # A huge floor for every key, signed by a host outside the state: refused, whatever name.
    stranger = new_host("local", "hsa-9").signer
    for name in ("hsa-9", "hsa-2"):
        forged = peering.sign_key_floors(
            stranger, domain_id="local", nonce=nonce, host_id=name, page=page(floor(version=2**62))
        )
        with pytest.raises((UnknownSignerError, BadSignatureError)):
            peering.verify_key_floors(forged, manifest=manifest, nonce=nonce, self_host_id="hsa-1")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (floor(key_id="not-a-key"), "not a key id"),
        (floor(version=0), "metadata version of at least 1"),
        (floor(digest=b"\x01" * 31), "32-byte metadata hash"),
    ],
)
def test_a_signed_page_with_a_malformed_floor_is_refused(
    sim: SimulatedDomain, bad: services_pb2.KeyFloor, message: str
) -> None:
    nonce = peering.new_nonce()
    signed = peering.sign_key_floors(
        sim.hosts["hsa-2"].signer,
        domain_id="local",
        nonce=nonce,
        host_id="hsa-2",
        page=page(floor(OTHER_KEY), bad),
    )
    with pytest.raises(MalformedMessageError, match=message):
        peering.verify_key_floors(
            signed, manifest=sim.genesis.manifest, nonce=nonce, self_host_id="hsa-1"
        )
