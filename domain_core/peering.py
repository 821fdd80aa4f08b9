"""Signed answers between HSAs: head confirmations and pages of key metadata floors.

An HSA asks a peer with a fresh random nonce; the peer signs its answer with its host signing
key (Ed25519) over a domain-separated digest that binds the domain id, the nonce and the
answering host's id. The caller verifies the answer under that host's key in its *own*
verified state. So an answer counts only if a host of the caller's head made it for this very
question: an address from the coordinator or a cached peer list, or a TLS server that is not
the host it claims to be, can waste a call but never change what the caller believes.

Digests (`canonical.digest`; `u64` is 8 bytes big-endian):
- head confirmation: HEAD_CONFIRMATION over (domain id, nonce, host id, u64 version, state
  hash, floor epoch, u64 floor sequence, one byte: 1 if the floor table is complete, else 0);
- key floors: KEY_FLOORS over (domain id, nonce, host id, the serialized `KeyFloorPage` as
  received). The page bytes are verified first and parsed after.

Invariants:
- an answer signed by a host that is not in the verifier's state, by the verifier's own host
  (unless asked for: a key service worker asks its own HSA), over another nonce or domain, or
  with a bad signature is refused (`UnknownSignerError` / `BadSignatureError`);
- a floor page parses, has a 16-byte epoch and at most `MAX_FLOORS_PER_PAGE` floors, each
  with a key id, a metadata version of at least 1 and a 32-byte hash (`MalformedMessageError`);
- pure: no I/O, no clock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError

from domain_core import crypto
from domain_core.canonical import DIGEST_BYTES, digest, signing_input
from domain_core.ciphertext import validate_key_id
from domain_core.contexts import PayloadType
from domain_core.errors import (
    InvalidInputError,
    MalformedMessageError,
    UnknownSignerError,
)
from domain_core.limits import MAX_FLOORS_PER_PAGE, MAX_PEERING_NONCE_BYTES, MIN_PEERING_NONCE_BYTES
from domain_core.model import Manifest
from domain_core.signers import PublicKey, Signer
from domain_proto import services_pb2

__all__ = [
    "FLOOR_EPOCH_BYTES",
    "NONCE_BYTES",
    "PeerHead",
    "check_floor",
    "check_nonce",
    "head_confirmation_digest",
    "key_floors_digest",
    "new_nonce",
    "sign_head_confirmation",
    "sign_key_floors",
    "verify_head_confirmation",
    "verify_key_floors",
]

NONCE_BYTES: Final = 32
FLOOR_EPOCH_BYTES: Final = 16


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def new_nonce() -> bytes:
    """A fresh nonce for one question to a peer."""
    return crypto.random_bytes(NONCE_BYTES)


def check_nonce(nonce: bytes) -> bytes:
    """`nonce` if it is 16 to 64 bytes long, else InvalidInputError."""
    if not MIN_PEERING_NONCE_BYTES <= len(nonce) <= MAX_PEERING_NONCE_BYTES:
        raise InvalidInputError(
            f"nonce must be {MIN_PEERING_NONCE_BYTES} to {MAX_PEERING_NONCE_BYTES} bytes, "
            f"not {len(nonce)}"
        )
    return nonce


# --- head confirmation -------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerHead:
    """What a peer signed about itself: its head and where its floor table stands."""

    host_id: str
    version: int
    state_hash: bytes
    floor_epoch: bytes
    floor_sequence: int
    floors_complete: bool = False
    """Its floor table holds the domain's whole history (see `HeadConfirmation`)."""


def head_confirmation_digest(
    domain_id: str,
    nonce: bytes,
    host_id: str,
    version: int,
    state_hash: bytes,
    floor_epoch: bytes,
    floor_sequence: int,
    floors_complete: bool,
) -> bytes:
    """The digest a host signs to confirm its head to the asker of `nonce`."""
    return digest(
        PayloadType.HEAD_CONFIRMATION,
        domain_id.encode(),
        nonce,
        host_id.encode(),
        _u64(version),
        state_hash,
        floor_epoch,
        _u64(floor_sequence),
        b"\x01" if floors_complete else b"\x00",
    )


def sign_head_confirmation(
    signer: Signer, *, domain_id: str, nonce: bytes, head: PeerHead
) -> services_pb2.HeadConfirmation:
    """The signed answer of host `head.host_id` to a ConfirmHead with `nonce`."""
    payload = head_confirmation_digest(
        domain_id,
        nonce,
        head.host_id,
        head.version,
        head.state_hash,
        head.floor_epoch,
        head.floor_sequence,
        head.floors_complete,
    )
    return services_pb2.HeadConfirmation(
        host_id=head.host_id,
        version=head.version,
        state_hash=head.state_hash,
        floor_epoch=head.floor_epoch,
        floor_sequence=head.floor_sequence,
        floors_complete=head.floors_complete,
        signature=signer.sign(signing_input(PayloadType.HEAD_CONFIRMATION, payload)),
    )


def _signing_key_of(
    manifest: Manifest, host_id: str, self_host_id: str, *, from_self: bool
) -> PublicKey:
    if (host_id == self_host_id) != from_self:
        who = "this host itself" if host_id == self_host_id else f"host {host_id[:80]!r}"
        raise UnknownSignerError(f"the answer is signed by {who}, which was not asked")
    key = manifest.host_signing_key(host_id)
    if key is None:
        raise UnknownSignerError(
            f"the answer is signed by {host_id[:80]!r}, which is not a host of the domain at "
            f"version {manifest.version}"
        )
    return key


def verify_head_confirmation(
    answer: services_pb2.HeadConfirmation,
    *,
    manifest: Manifest,
    nonce: bytes,
    self_host_id: str,
) -> PeerHead:
    """The peer head `answer` states, if a host of `manifest` (not `self_host_id`) signed it
    over `nonce`; UnknownSignerError or BadSignatureError otherwise."""
    if len(answer.state_hash) != DIGEST_BYTES or len(answer.floor_epoch) != FLOOR_EPOCH_BYTES:
        raise MalformedMessageError("a head confirmation needs a 32-byte hash and 16-byte epoch")
    if answer.version < 1:
        raise MalformedMessageError("a head confirmation names version 0")
    key = _signing_key_of(manifest, answer.host_id, self_host_id, from_self=False)
    payload = head_confirmation_digest(
        manifest.domain_id,
        nonce,
        answer.host_id,
        answer.version,
        answer.state_hash,
        answer.floor_epoch,
        answer.floor_sequence,
        answer.floors_complete,
    )
    key.verify(answer.signature, signing_input(PayloadType.HEAD_CONFIRMATION, payload))
    return PeerHead(
        host_id=answer.host_id,
        version=int(answer.version),
        state_hash=bytes(answer.state_hash),
        floor_epoch=bytes(answer.floor_epoch),
        floor_sequence=int(answer.floor_sequence),
        floors_complete=bool(answer.floors_complete),
    )


# --- key floors ----------------------------------------------------------------------------------


def key_floors_digest(domain_id: str, nonce: bytes, host_id: str, page: bytes) -> bytes:
    """The digest a host signs over a page of its key floors for the asker of `nonce`."""
    return digest(PayloadType.KEY_FLOORS, domain_id.encode(), nonce, host_id.encode(), page)


def check_floor(floor: services_pb2.KeyFloor) -> services_pb2.KeyFloor:
    """`floor` if it is well formed (a key id, version >= 1, a 32-byte hash), else
    MalformedMessageError."""
    try:
        validate_key_id(floor.key_id)
    except InvalidInputError:
        raise MalformedMessageError(
            f"a key floor names {floor.key_id[:80]!r}, not a key id"
        ) from None
    if floor.metadata_version < 1 or len(floor.metadata_hash) != DIGEST_BYTES:
        raise MalformedMessageError(
            f"the key floor of {floor.key_id} needs a metadata version of at least 1 and a "
            "32-byte metadata hash"
        )
    return floor


def sign_key_floors(
    signer: Signer,
    *,
    domain_id: str,
    nonce: bytes,
    host_id: str,
    page: services_pb2.KeyFloorPage,
) -> services_pb2.KeyFloors:
    """A page of floors, serialized once and signed by `host_id` for the asker of `nonce`."""
    raw = page.SerializeToString()
    payload = key_floors_digest(domain_id, nonce, host_id, raw)
    return services_pb2.KeyFloors(
        host_id=host_id,
        page=raw,
        signature=signer.sign(signing_input(PayloadType.KEY_FLOORS, payload)),
    )


def verify_key_floors(
    answer: services_pb2.KeyFloors,
    *,
    manifest: Manifest,
    nonce: bytes,
    self_host_id: str,
    from_self: bool = False,
) -> services_pb2.KeyFloorPage:
    """The page of floors in `answer`, if a host of `manifest` signed it over `nonce`: another
    host than `self_host_id`, or (`from_self`, a worker asking its own HSA) that host.

    UnknownSignerError, BadSignatureError or MalformedMessageError otherwise.
    """
    key = _signing_key_of(manifest, answer.host_id, self_host_id, from_self=from_self)
    payload = key_floors_digest(manifest.domain_id, nonce, answer.host_id, answer.page)
    key.verify(answer.signature, signing_input(PayloadType.KEY_FLOORS, payload))
    page = services_pb2.KeyFloorPage()
    try:
        page.ParseFromString(answer.page)
    except DecodeError:
        raise MalformedMessageError("a signed key floor page does not parse") from None
    if len(page.epoch) != FLOOR_EPOCH_BYTES:
        raise MalformedMessageError("a key floor page needs a 16-byte epoch")
    if len(page.floors) > MAX_FLOORS_PER_PAGE:
        raise MalformedMessageError(f"a key floor page holds more than {MAX_FLOORS_PER_PAGE}")
    for floor in page.floors:
        check_floor(floor)
    return page
