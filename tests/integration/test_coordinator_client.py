"""`CoordinatorClient` against a scripted coordinator: what it signs, and what it retries.

An operator's client must never sign what it did not check: a coordinator that answers
GetProposal with other bytes than the id asked for gets no approval. Reads are retried on
UNAVAILABLE a few times; submissions never are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from domain_core import crypto, quorum
from domain_core.errors import BadSignatureError, UnavailableError
from domain_core.model import NONCE_BYTES, Proposal
from domain_core.pki import DomainCA, SpiffeId
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.client import CoordinatorClient, rotate_domain_key
from domain_edge.transport import TlsMaterial, server_credentials
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


def make_proposal(reason: str) -> Proposal:
    return Proposal.create(
        domain_id="local",
        base_version=1,
        base_state_hash=b"\x01" * 32,
        changes=[rotate_domain_key()],
        proposer_id="ab" * 32,
        created_at=100,
        expires_at=200,
        reason=reason,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )


@dataclass
class LyingCoordinator(services_pb2_grpc.CoordinatorServicer):
    """Answers GetProposal with `served` whatever is asked; counts calls; fails on demand;
    with `hung` set, answers nothing until it is released (a paused replica)."""

    served: Proposal
    claim_id: bytes | None = None
    unavailable_reads: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    hung: threading.Event | None = None

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def GetProposal(self, request: Any, context: Any) -> services_pb2.ProposalStatus:
        self._count("GetProposal")
        if self.hung is not None:
            self.hung.wait(30)
        if self.unavailable_reads:
            self.unavailable_reads -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return services_pb2.ProposalStatus(
            proposal_id=self.claim_id if self.claim_id is not None else self.served.id,
            proposal=self.served.raw,
            state=services_pb2.PROPOSAL_STATE_PENDING,
            threshold=2,
        )

    def SubmitApproval(self, request: Any, context: Any) -> services_pb2.ProposalStatus:
        self._count("SubmitApproval")
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        raise AssertionError("unreachable")


@dataclass
class Running:
    servicer: LyingCoordinator
    client: CoordinatorClient


def coordinator_tls(ca: DomainCA) -> TlsMaterial:
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(SpiffeId("local", "coordinator", "coordinator"), key.public_key(), now=now)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return TlsMaterial(ca_pem=ca.certificate_pem, cert_pem=cert, key_pem=key_pem)


@contextmanager
def serving(ca: DomainCA, servicer: LyingCoordinator) -> Iterator[str]:
    """`servicer` on a loopback port with the coordinator's certificate; its address."""
    # Enough workers that calls parked in a hung handler never keep a new call waiting.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    services_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    credentials = server_credentials(coordinator_tls(ca), server_auth_only=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if servicer.hung is not None:
            servicer.hung.set()
        server.stop(0).wait()


@pytest.fixture
def running() -> Iterator[Running]:
    ca = DomainCA.create("local", now=datetime.now(UTC))
    servicer = LyingCoordinator(served=make_proposal("what the operator reviewed"))
    with serving(ca, servicer) as address:
        client = CoordinatorClient(address, ca.certificate_pem, timeout=5)
        try:
            yield Running(servicer, client)
        finally:
            client.close()


def test_approve_refuses_bytes_that_do_not_match_the_id(running: Running) -> None:
    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    asked = make_proposal("what the operator was told about")
    # The coordinator claims the asked id but serves other bytes.
    running.servicer.claim_id = asked.id
    with pytest.raises(BadSignatureError, match="do not match the proposal id"):
        running.client.approve(asked.id, signer)
    # Consistent bytes and id, but another proposal than the one asked for.
    running.servicer.claim_id = None
    with pytest.raises(BadSignatureError, match="another proposal"):
        running.client.approve(asked.id, signer)
    assert "SubmitApproval" not in running.servicer.calls


def test_reads_submissions_and_approvals_are_retried_on_unavailable(running: Running) -> None:
    """Submissions and approvals are idempotent (a replica answers a replay with the proposal
    as it stands), so they are retried like reads, a bounded number of times."""
    served = running.servicer.served
    running.servicer.unavailable_reads = 2
    view = running.client.get_proposal(served.id)
    assert view.proposal.message.reason == "what the operator reviewed"
    assert running.servicer.calls["GetProposal"] == 3

    running.servicer.unavailable_reads = 5
    with pytest.raises(UnavailableError, match="is unreachable"):
        running.client.get_proposal(served.id)
    assert running.servicer.calls["GetProposal"] == 6  # three more attempts, then give up

    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    with pytest.raises(UnavailableError, match="restarting"):
        running.client.submit_approval(quorum.approve(served, signer))
    assert running.servicer.calls["SubmitApproval"] == 3  # READ_ATTEMPTS, then give up


def test_a_hung_replica_is_retried_on_another_one_but_a_lone_coordinator_is_not() -> None:
    """A paused replica accepts connections and answers nothing: with several replicas, an
    idempotent call that runs out of time there is tried again (the channel sends the next
    attempt to the next replica); with one coordinator, waiting again would only double the
    wait, so the call fails after one attempt, saying the coordinator did not answer."""
    ca = DomainCA.create("local", now=datetime.now(UTC))
    proposal = make_proposal("reviewed")
    hung = LyingCoordinator(served=proposal, hung=threading.Event())
    healthy = LyingCoordinator(served=proposal)
    with serving(ca, hung) as hung_address, serving(ca, healthy) as healthy_address:
        with CoordinatorClient(
            f"{hung_address},{healthy_address}", ca.certificate_pem, timeout=0.5
        ) as client:
            for _ in range(4):  # round robin: some first attempts go to the hung replica
                assert client.get_proposal(proposal.id).proposal.id == proposal.id
        assert hung.calls.get("GetProposal", 0) >= 1
        assert healthy.calls["GetProposal"] == 4

        with CoordinatorClient(hung_address, ca.certificate_pem, timeout=0.5) as alone:
            before = hung.calls["GetProposal"]
            with pytest.raises(UnavailableError, match="did not answer in time"):
                alone.get_proposal(proposal.id)
            assert hung.calls["GetProposal"] == before + 1
