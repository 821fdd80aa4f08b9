"""The server side of peering (`HsaPeerServicer` over `hsa_node.peering.Peering`), in process,
called with real certificates of the domain: who may give an HSA key floors, and what its
signed answers bind.

The attacks: a host the state does not list (a CA-issued HSA certificate for an unknown name),
a host removed by quorum, the coordinator and an application push a huge floor; another host
asks an HSA to consult its peers on its behalf (amplification reserved to its own workers).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import grpc
import pytest
from support.hsa_nodes import Domain, propose, remove_host

from domain_core import peering as signed
from domain_core.errors import PermissionDeniedError, UnavailableError, UnknownSignerError
from domain_core.model import SealedState
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.transport import CertificatePeerContext
from domain_proto import services_pb2
from hsa_node.keyfloors import FLOOR_FILE, MetadataVersionFloor
from hsa_node.peering import Peering
from hsa_node.server import LoadedNode, load_node
from hsa_node.servicers import HsaAdminServicer, HsaPeerServicer

pytestmark = pytest.mark.integration

KEY = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
HASH = b"\x07" * 32


def load(domain: Domain, host: str) -> LoadedNode:
    return load_node(NodeConfig.load(domain.layout.node_configs[host]))


def caller(cert_pem: bytes) -> grpc.ServicerContext:
    context: grpc.ServicerContext = CertificatePeerContext(cert_pem)  # type: ignore[assignment]
    return context


def as_host(domain: Domain, who: str) -> grpc.ServicerContext:
    return caller(domain.tls(who).cert_pem)


def stranger(domain: Domain, name: str = "hsa-9") -> grpc.ServicerContext:
    """An HSA certificate the domain CA issued for a name no quorum added."""
    ca = load_domain_ca(domain.layout.root / "ca")
    cert = ca.issue(
        SpiffeId(domain.layout.domain_id, "hsa", name),
        tls_public_key(new_tls_key_pem()),
        now=datetime.now(UTC),
    )
    return caller(cert)


def unavailable() -> int:
    raise UnavailableError("no coordinator in this test")


class Hsa:
    """One HSA's node, floor table, peering and peer servicer, in this process."""

    def __init__(self, domain: Domain, host: str) -> None:
        self.loaded = load(domain, host)
        self.floor = MetadataVersionFloor(self.loaded.store.data_dir / FLOOR_FILE)
        self.peering = Peering(
            node=self.loaded.node,
            store=self.loaded.store,
            floor=self.floor,
            tls=self.loaded.tls,
            address="127.0.0.1:1",
            bound=30.0,
        )
        self.servicer = HsaPeerServicer(self.loaded.node, peering=self.peering)

    def push(self, context: grpc.ServicerContext, version: int, digest: bytes = HASH) -> int:
        request = services_pb2.PushKeyFloorsRequest(
            floors=[
                services_pb2.KeyFloor(key_id=KEY, metadata_version=version, metadata_hash=digest)
            ]
        )
        return int(self.servicer.PushKeyFloors(request, context).raised)

    def close(self) -> None:
        self.peering.stop()
        self.floor.close()


def test_floors_are_taken_only_from_hosts_of_the_verified_state(
    domain: Domain, caplog: pytest.LogCaptureFixture
) -> None:
    hsa = Hsa(domain, "hsa-1")
    try:
        assert hsa.push(as_host(domain, "hsa-2"), 5) == 1
        assert hsa.floor.highest(KEY) == (5, HASH)
        assert hsa.push(as_host(domain, "hsa-3"), 3) == 0  # lower: never pulls a floor down
        with caplog.at_level(logging.WARNING, logger="hsa_node.peering"):
            assert hsa.push(as_host(domain, "hsa-3"), 5, b"\x08" * 32) == 0
        assert "peer hsa-3 holds another record of key" in caplog.text
        assert hsa.floor.highest(KEY) == (5, HASH)

        # Not a host of the state, its own workers' identity, the coordinator, an application:
        # a huge floor (the key unusable everywhere) is refused before it is looked at.
        for context in (
            stranger(domain),
            stranger(domain, "hsa-2"),  # right name, certificate not the one in the state
            as_host(domain, "hsa-1"),
            as_host(domain, "coordinator"),
            as_host(domain, "demo-app"),
        ):
            with pytest.raises(PermissionDeniedError):
                hsa.push(context, 2**62)
        assert hsa.floor.highest(KEY) == (5, HASH)
    finally:
        hsa.close()


def test_a_removed_host_can_no_longer_push_floors(domain: Domain) -> None:
    hsa = Hsa(domain, "hsa-1")
    try:
        assert hsa.push(as_host(domain, "hsa-3"), 2) == 1
        proposal, approvals = propose(domain, domain.genesis, remove_host("hsa-3"))
        state = SealedState.from_message(
            HsaAdminServicer(
                hsa.loaded.node, unavailable, coordinator=domain.coordinator_pin()
            ).ApplyProposal(
                services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
                as_host(domain, "coordinator"),
            )
        )
        assert hsa.loaded.node.offer(state)
        with pytest.raises(PermissionDeniedError, match="not a host of the domain at version 2"):
            hsa.push(as_host(domain, "hsa-3"), 2**62)
        assert hsa.floor.highest(KEY) == (2, HASH)
        # Its signed answers do not count either: hsa-3 is not in hsa-1's state any more.
        nonce = signed.new_nonce()
        old = Hsa(domain, "hsa-3")
        try:
            answer = old.servicer.GetKeyFloors(
                services_pb2.KeyFloorsRequest(nonce=nonce), as_host(domain, "hsa-2")
            )
        finally:
            old.close()
        with pytest.raises(UnknownSignerError, match="not a host of the domain at version 2"):
            signed.verify_key_floors(
                answer, manifest=state.manifest, nonce=nonce, self_host_id="hsa-1"
            )
    finally:
        hsa.close()


def test_only_the_hsas_own_workers_may_ask_it_to_consult_its_peers(domain: Domain) -> None:
    hsa = Hsa(domain, "hsa-1")
    try:
        request = services_pb2.KeyFloorsRequest(
            nonce=signed.new_nonce(), key_ids=[KEY], consult_peers=True
        )
        with pytest.raises(PermissionDeniedError, match="own key service workers"):
            hsa.servicer.GetKeyFloors(request, as_host(domain, "hsa-2"))
        # Its own identity (a worker) may: here no peer can be reached, and it says so.
        with pytest.raises(UnavailableError, match="no other HSA answered for it"):
            hsa.servicer.GetKeyFloors(request, as_host(domain, "hsa-1"))
    finally:
        hsa.close()


def test_answers_are_signed_for_the_question_and_pages_follow_the_change_sequence(
    domain: Domain,
) -> None:
    hsa = Hsa(domain, "hsa-1")
    try:
        hsa.floor.admit(KEY, 1, HASH)
        hsa.floor.admit("1b4e28ba-2fa1-41d2-883f-0016d3cca427", 3, HASH)
        nonce = signed.new_nonce()
        head = signed.verify_head_confirmation(
            hsa.servicer.ConfirmHead(
                services_pb2.ConfirmHeadRequest(nonce=nonce, caller_address="127.0.0.1:7"),
                as_host(domain, "hsa-2"),
            ),
            manifest=domain.genesis.manifest,
            nonce=nonce,
            self_host_id="hsa-2",
        )
        assert (head.host_id, head.version, head.state_hash) == ("hsa-1", 1, domain.genesis.hash)
        assert (head.floor_epoch, head.floor_sequence) == (hsa.floor.epoch, 2)
        # The caller's address is a hint for reaching it, not more.
        assert hsa.peering.book.candidates("hsa-2")[0] == "127.0.0.1:7"

        nonce = signed.new_nonce()
        page = signed.verify_key_floors(
            hsa.servicer.GetKeyFloors(
                services_pb2.KeyFloorsRequest(nonce=nonce, epoch=hsa.floor.epoch, limit=1),
                as_host(domain, "hsa-2"),
            ),
            manifest=domain.genesis.manifest,
            nonce=nonce,
            self_host_id="hsa-2",
        )
        assert [(f.key_id, f.metadata_version) for f in page.floors] == [(KEY, 1)]
        assert (page.next_sequence, page.more) == (1, True)
        # Another epoch (the caller counted in a table since wiped): from the start again.
        nonce = signed.new_nonce()
        page = signed.verify_key_floors(
            hsa.servicer.GetKeyFloors(
                services_pb2.KeyFloorsRequest(nonce=nonce, epoch=b"x" * 16, after_sequence=2),
                as_host(domain, "hsa-2"),
            ),
            manifest=domain.genesis.manifest,
            nonce=nonce,
            self_host_id="hsa-2",
        )
        assert len(page.floors) == 2
        assert (page.next_sequence, page.more) == (2, False)
    finally:
        hsa.close()
