"""A real `domain-coordinator` process on a domain made by `hsm-domain init`, driven through
`CoordinatorClient` on its operator port and raw stubs on both ports.

Without HSAs, a proposal that reaches quorum stays PENDING ("no HSA could apply it yet"), so
every case of the quorum flow up to the apply step is visible here; the apply step with real
HSAs is in test_coordinator_hsa.py. State 2 for the restart and tamper cases is sealed in the
test with hsa-1's own keys, exactly as an HSA would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.simulator import noncanonical_encodings

from deploy.init import DomainLayout, init_domain, read_passphrase
from deploy.localdomain import FAST_SCRYPT_N
from domain_coordinator.sqlite_store import SqliteStore
from domain_core import crypto, quorum, sealing, transition
from domain_core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    StaleProposalError,
    UnavailableError,
)
from domain_core.keytokens import RecordSigner
from domain_core.model import NONCE_BYTES, Proposal, SealedState
from domain_core.signers import InMemorySigner, SignatureAlgorithm, Signer
from domain_edge.client import (
    CoordinatorClient,
    remove_host,
    remove_operator,
    rotate_domain_key,
    set_quorum,
)
from domain_edge.config import CoordinatorConfig
from domain_edge.file_tokens import load_file_token
from domain_edge.identity_files import load_host_identity
from domain_edge.transport import (
    COORDINATOR,
    TlsMaterial,
    check_health,
    mtls_channel,
    secure_channel,
)
from domain_proto import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


# --- harness ---------------------------------------------------------------------------------


class CoordinatorProcess:
    """One coordinator process of a local domain; killed (process group) by its finalizer."""

    def __init__(self, layout: DomainLayout, log_path: Path) -> None:
        self.layout = layout
        self.log_path = log_path
        self.ready_file = layout.ready_file("coordinator")
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.operator_address = ""

    def start(self, *, expect_ready: bool = True) -> None:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "domain_coordinator",
                    "--config",
                    str(self.layout.coordinator_config),
                    "--ready-file",
                    str(self.ready_file),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
        if not expect_ready:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited: {self.log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("coordinator did not become ready")
            time.sleep(0.05)
        ready = json.loads(self.ready_file.read_text())
        assert ready["pid"] == self.proc.pid
        assert ready["name"] == "coordinator"
        self.address, self.operator_address = ready["address"], ready["operator_address"]

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL of the whole process group; the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                return proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait(10)
        return proc.returncode

    def log(self) -> str:
        return self.log_path.read_text()


@dataclasses.dataclass
class Domain:
    layout: DomainLayout
    operators: dict[str, Signer]
    ca_pem: bytes

    def tls(self, kind: str, name: str) -> TlsMaterial:
        """TLS material of an HSA, the coordinator or the demo client of this domain."""
        if kind == "hsa":
            base = self.layout.node_dir(name) / "identity"
        elif kind == "client":
            base = self.layout.client_dir
        else:
            base = self.layout.root / "coordinator"
        return TlsMaterial.from_files(self.layout.ca_cert, base / "tls.crt", base / "tls.key")


def make_domain(directory: Path) -> Domain:
    layout = init_domain(directory, nodes=3, operators=3, quorum=2, scrypt_n=FAST_SCRYPT_N)
    operators: dict[str, Signer] = {
        name: load_file_token(token, read_passphrase(passphrase))
        for name, (token, passphrase) in layout.operator_tokens.items()
    }
    return Domain(layout, operators, layout.ca_cert.read_bytes())


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Domain:
    return make_domain(tmp_path_factory.mktemp("coord") / "d")


@pytest.fixture(scope="module")
def coordinator(
    domain: Domain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(domain.layout, tmp_path_factory.mktemp("logs") / "c.log")
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(domain: Domain, coordinator: CoordinatorProcess) -> Iterator[CoordinatorClient]:
    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as c:
        yield c


def operator_stub(domain: Domain, coordinator: CoordinatorProcess) -> tuple[grpc.Channel, object]:
    channel = secure_channel(coordinator.operator_address, domain.ca_pem, COORDINATOR)
    return channel, services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]


def now() -> int:
    return int(time.time())


def quorum_change() -> domain_pb2.Change:
    """A change that needs the default 2 of 3 (lowering the default keeps the highest at 2)."""
    return set_quorum(1)


# --- the process -----------------------------------------------------------------------------


def test_ready_file_health_and_genesis(
    domain: Domain, coordinator: CoordinatorProcess, client: CoordinatorClient
) -> None:
    channel = secure_channel(coordinator.operator_address, domain.ca_pem, COORDINATOR)
    with channel:
        assert check_health(channel, "hsmdomain.v1.Coordinator")
    with mtls_channel(coordinator.address, domain.tls("hsa", "hsa-1"), COORDINATOR) as channel:
        assert check_health(channel)
    head = client.latest_state()
    assert head.version == 1
    assert head.hash == domain.layout.genesis_hash
    status = client.domain_status()
    assert (status.domain_id, status.version, status.state_hash) == (
        "local",
        1,
        domain.layout.genesis_hash,
    )
    assert [s.version for s in client.states_after(0)] == [1]
    assert client.states_after(1) == []


def test_operator_port_refuses_clients_without_the_ca(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    other = make_domain(tmp_path / "other")
    with (
        CoordinatorClient(coordinator.operator_address, other.ca_pem, timeout=2) as stranger,
        pytest.raises(UnavailableError, match="unreachable"),
    ):
        stranger.latest_state()


# --- the quorum flow -------------------------------------------------------------------------


def test_propose_then_quorum_without_hsas_stays_pending(
    domain: Domain, client: CoordinatorClient
) -> None:
    alice, bob = domain.operators["alice"], domain.operators["bob"]
    view = client.propose([quorum_change()], alice, reason="lower the quorum")
    assert view.state == "pending"
    assert view.threshold == 2
    assert view.approved_by == (alice.public_key.key_id,)
    assert view.detail == "1 of 2 approvals; 1 more needed"
    assert view.proposal.message.reason == "lower the quorum"
    assert view.proposal.base_version == 1

    view = client.approve(view.proposal_id, bob)
    # Quorum reached, but no HSA is registered: it stays pending and says why.
    assert view.state == "pending"
    assert set(view.approved_by) == {alice.public_key.key_id, bob.public_key.key_id}
    assert view.detail.startswith("no HSA could apply it yet: no HSA has registered")
    assert view.applied_version == 0

    again = client.get_proposal(view.proposal_id)
    assert again.state == "pending"
    assert again.approved_by == view.approved_by
    listed = [v.proposal_id for v in client.list_proposals()]
    assert view.proposal_id in listed


def test_a_retried_approval_is_answered_and_counted_once(
    domain: Domain, client: CoordinatorClient
) -> None:
    """An approval's idempotency key is the signed approval itself: sent again (an answer
    lost, perhaps to another replica) it gets the proposal as it stands, and counts once."""
    alice, carol = domain.operators["alice"], domain.operators["carol"]
    view = client.propose([quorum_change()], carol)
    # Carol's approval was stored with her proposal; signing again gives the same bytes
    # (Ed25519 is deterministic): a replay, answered, not stored again.
    again = client.approve(view.proposal_id, carol)
    assert again.approved_by == (carol.public_key.key_id,)
    approval = quorum.approve(view.proposal, alice)
    first = client.submit_approval(approval)
    second = client.submit_approval(approval)
    assert first.approved_by == second.approved_by
    assert sorted(second.approved_by) == sorted([carol.public_key.key_id, alice.public_key.key_id])
    assert (second.state, second.detail) == (first.state, first.detail)
    assert len(client.get_proposal(view.proposal_id).approved_by) == 2


def test_forged_approval_is_refused_with_its_reason(
    domain: Domain, client: CoordinatorClient
) -> None:
    alice, carol = domain.operators["alice"], domain.operators["carol"]
    view = client.propose([quorum_change()], alice)
    # Signed by someone else's key, claiming to be carol.
    impostor = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    forged = quorum.approve(view.proposal, impostor)
    forged.operator_id = carol.public_key.key_id
    with pytest.raises(
        PermissionDeniedError, match="does not verify under the key of operator carol"
    ):
        client.submit_approval(forged)
    # Carol's real signature over another proposal, presented for this one.
    other = client.propose([quorum_change()], alice)
    moved = quorum.approve(other.proposal, carol)
    moved.proposal_id = view.proposal_id
    with pytest.raises(PermissionDeniedError, match="does not verify"):
        client.submit_approval(moved)
    # A malformed signature field.
    empty = quorum.approve(view.proposal, carol)
    empty.signature = b""
    with pytest.raises(InvalidInputError, match="signature is empty"):
        client.submit_approval(empty)
    assert client.get_proposal(view.proposal_id).approved_by == (alice.public_key.key_id,)


def test_unknown_operator_is_refused(domain: Domain, client: CoordinatorClient) -> None:
    stranger = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256)
    view = client.propose([quorum_change()], domain.operators["bob"])
    with pytest.raises(PermissionDeniedError, match="you are not an operator of this domain"):
        client.approve(view.proposal_id, stranger)
    with pytest.raises(PermissionDeniedError, match="you are not an operator of this domain"):
        client.propose([quorum_change()], stranger)
    with pytest.raises(PermissionDeniedError, match="not an operator"):
        client.cancel(view.proposal_id, stranger)


def test_proposer_approval_must_be_the_proposers(domain: Domain, client: CoordinatorClient) -> None:
    alice, bob = domain.operators["alice"], domain.operators["bob"]
    head = client.latest_state()
    proposal = Proposal.create(
        domain_id="local",
        base_version=head.version,
        base_state_hash=head.hash,
        changes=[quorum_change()],
        proposer_id=alice.public_key.key_id,
        created_at=now(),
        expires_at=now() + 600,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )
    with pytest.raises(InvalidInputError, match="signed by the proposer"):
        client.submit_proposal(proposal, quorum.approve(proposal, bob))
    view = client.submit_proposal(proposal, quorum.approve(proposal, alice))
    assert view.state == "pending"
    # Submitted again (a retry after a lost answer): answered as it stands, stored once.
    again = client.submit_proposal(proposal, quorum.approve(proposal, alice))
    assert (again.proposal_id, again.state, again.approved_by) == (
        view.proposal_id,
        "pending",
        (alice.public_key.key_id,),
    )
    # The same proposal with another operator's approval is no replay: refused as before.
    with pytest.raises(InvalidInputError, match="signed by the proposer"):
        client.submit_proposal(proposal, quorum.approve(proposal, bob))


def _hand_made(client: CoordinatorClient, proposer: Signer, reason: str = "") -> Proposal:
    head = client.latest_state()
    return Proposal.create(
        domain_id="local",
        base_version=head.version,
        base_state_hash=head.hash,
        changes=[quorum_change()],
        proposer_id=proposer.public_key.key_id,
        created_at=now(),
        expires_at=now() + 600,
        reason=reason,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )


def _submit_raw(
    domain: Domain, coordinator: CoordinatorProcess, raw: bytes, proposer: Signer
) -> grpc.RpcError:
    """SubmitProposal of exactly `raw`, with the proposer's valid signature over its id."""
    proposal_id = crypto.sha256(raw)
    approval = domain_pb2.Approval(
        proposal_id=proposal_id,
        operator_id=proposer.public_key.key_id,
        signature=proposer.sign(quorum.approval_message(proposal_id)),
    )
    channel, stub = operator_stub(domain, coordinator)
    with channel, pytest.raises(grpc.RpcError) as refused:
        stub.SubmitProposal(  # type: ignore[attr-defined]
            services_pb2.SubmitProposalRequest(proposal=raw, proposer_approval=approval),
            timeout=10,
        )
    return refused.value


def test_only_canonical_proposals_of_at_most_64_kib_are_taken(
    domain: Domain, coordinator: CoordinatorProcess, client: CoordinatorClient
) -> None:
    """Issue 21, item 6: unknown fields (signed but never shown), other encodings of the same
    proposal, and anything past 64 KiB are refused before anything is stored."""
    alice = domain.operators["alice"]
    proposal = _hand_made(client, alice)
    pending = {v.proposal_id for v in client.list_proposals()}
    for what, raw in noncanonical_encodings(proposal).items():
        error = _submit_raw(domain, coordinator, raw, alice)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        details = error.details() or ""
        if what == "padded past the size limit":
            assert "above the limit of 65536" in details, details
        elif what.startswith("an unknown field"):
            assert "fields unknown to hsmdomain.v1.Proposal" in details, details
        else:
            assert "not in canonical form" in details, (what, details)
    assert {v.proposal_id for v in client.list_proposals()} == pending
    assert client.submit_proposal(proposal, quorum.approve(proposal, alice)).state == "pending"


@pytest.mark.parametrize(
    "reason", ["ok\nproposal  set-quorum 1", "ok\x1b[30;40mhidden", "ok\u202ex", "ok\u200b"]
)
def test_a_reason_that_is_not_printable_text_is_refused(
    domain: Domain, coordinator: CoordinatorProcess, reason: str
) -> None:
    """Issue 21, item 5: a reason that could drive an approver's terminal."""
    alice = domain.operators["alice"]
    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as c:
        proposal = _hand_made(c, alice)
    message = domain_pb2.Proposal()
    message.CopyFrom(proposal.message)
    message.reason = reason
    error = _submit_raw(domain, coordinator, message.SerializeToString(deterministic=True), alice)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proposal reason must be printable text on one line" in (error.details() or "")


def test_stale_proposal_is_refused(domain: Domain, client: CoordinatorClient) -> None:
    alice = domain.operators["alice"]
    head = client.latest_state()
    proposal = Proposal.create(
        domain_id="local",
        base_version=5,
        base_state_hash=head.hash,
        changes=[quorum_change()],
        proposer_id=alice.public_key.key_id,
        created_at=now(),
        expires_at=now() + 600,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )
    with pytest.raises(
        StaleProposalError, match="domain is at version 1, this proposal is for 5: propose again"
    ):
        client.submit_proposal(proposal, quorum.approve(proposal, alice))


def test_expired_proposal_is_refused(domain: Domain, client: CoordinatorClient) -> None:
    with pytest.raises(FailedPreconditionError, match=r"expired \d+s ago; propose again"):
        client.propose(
            [quorum_change()], domain.operators["alice"], now=now() - 7200, expires_in=3600
        )


def test_impossible_change_is_refused_up_front(domain: Domain, client: CoordinatorClient) -> None:
    alice = domain.operators["alice"]
    with pytest.raises(FailedPreconditionError, match="threshold 4 is above the 3 operators"):
        client.propose([set_quorum(4)], alice)
    with pytest.raises(FailedPreconditionError, match="not in the domain"):
        client.propose([remove_host("hsa-9")], alice)


def _cancel_request(
    proposal_id: bytes, signer: Signer, signature: bytes | None = None
) -> services_pb2.CancelProposalRequest:
    return services_pb2.CancelProposalRequest(
        proposal_id=proposal_id,
        operator_id=signer.public_key.key_id,
        signature=signature or signer.sign(quorum.cancel_message(proposal_id)),
    )


def test_cancel_needs_an_operator_signature(domain: Domain, client: CoordinatorClient) -> None:
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    view = client.propose([rotate_domain_key()], alice)
    with grpc.secure_channel(
        client.address, grpc.ssl_channel_credentials(domain.ca_pem)
    ) as channel:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        for forged in (
            # A signature by bob's key presented as alice's (the proposer's) does not cancel.
            bob.sign(quorum.cancel_message(view.proposal_id)),
            # A signature over the approval message is not a cancel signature.
            alice.sign(quorum.approval_message(view.proposal_id)),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.CancelProposal(_cancel_request(view.proposal_id, alice, forged), timeout=5)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    pending = client.get_proposal(view.proposal_id)
    assert (pending.state, pending.cancel_votes) == ("pending", ())

    # The proposer withdraws their own proposal at once.
    cancelled = client.cancel(view.proposal_id, alice)
    assert cancelled.state == "cancelled"
    assert cancelled.detail == "cancelled by operator alice, who proposed it"
    assert view.proposal_id not in [v.proposal_id for v in client.list_proposals()]
    assert view.proposal_id in [v.proposal_id for v in client.list_proposals(include_closed=True)]
    with pytest.raises(FailedPreconditionError, match="cancelled already"):
        client.cancel(view.proposal_id, bob)
    with pytest.raises(FailedPreconditionError, match="cancelled by operator alice"):
        client.approve(view.proposal_id, carol)


def test_one_operator_cannot_cancel_anothers_proposal(
    domain: Domain, client: CoordinatorClient
) -> None:
    """Issue 13, item 10: carol alone used to cancel anything, her own removal included."""
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    view = client.propose([rotate_domain_key()], alice)
    voted = client.cancel(view.proposal_id, carol)
    assert voted.state == "pending"
    assert voted.detail == (
        "1 of 2 approvals; 1 more needed; 1 of 2 votes to cancel; the proposer alone may "
        "cancel at once"
    )
    assert [v.operator_id for v in voted.cancel_votes] == [carol.public_key.key_id]
    with pytest.raises(AlreadyExistsError, match="voted to cancel this proposal already; 1 of 2"):
        client.cancel(view.proposal_id, carol)
    assert client.get_proposal(view.proposal_id).state == "pending"
    assert view.proposal_id in [v.proposal_id for v in client.list_proposals()]
    # Her vote stands beside the approvals; bob may still approve.
    approved = client.approve(view.proposal_id, bob)
    assert approved.state == "pending"
    assert set(approved.approved_by) == {alice.public_key.key_id, bob.public_key.key_id}


def test_a_quorum_of_votes_cancels(domain: Domain, client: CoordinatorClient) -> None:
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    view = client.propose([rotate_domain_key()], alice)
    assert client.cancel(view.proposal_id, bob).state == "pending"
    cancelled = client.cancel(view.proposal_id, carol)
    assert cancelled.state == "cancelled"
    assert cancelled.detail == "cancelled by the votes of 2 of 2 operators: bob, carol"
    # The votes needed follow the threshold the proposal needs: raising the quorum to 3
    # needs 3 approvals, so cancelling it against its proposer's will needs 3 votes.
    raise_it = client.propose([set_quorum(3)], alice)
    assert raise_it.threshold == 3
    client.cancel(raise_it.proposal_id, bob)
    voted = client.cancel(raise_it.proposal_id, carol)
    assert voted.state == "pending"
    assert "2 of 3 votes to cancel" in voted.detail
    assert client.cancel(raise_it.proposal_id, alice).state == "cancelled"


def test_a_vote_for_another_proposal_does_not_count(
    domain: Domain, client: CoordinatorClient
) -> None:
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    target = client.propose([rotate_domain_key()], alice)
    other = client.propose([rotate_domain_key()], alice)
    client.cancel(other.proposal_id, carol)
    # carol's signature over the other proposal's cancel message, presented for this one.
    moved = carol.sign(quorum.cancel_message(other.proposal_id))
    with grpc.secure_channel(
        client.address, grpc.ssl_channel_credentials(domain.ca_pem)
    ) as channel:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.CancelProposal(_cancel_request(target.proposal_id, carol, moved), timeout=5)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    voted = client.cancel(target.proposal_id, bob)
    assert voted.state == "pending"
    assert "1 of 2 votes to cancel" in voted.detail
    assert [v.operator_id for v in voted.cancel_votes] == [bob.public_key.key_id]


def test_unknown_proposal_and_bad_ids(domain: Domain, client: CoordinatorClient) -> None:
    with pytest.raises(NotFoundError, match="no proposal"):
        client.get_proposal(b"\x07" * 32)
    with pytest.raises(InvalidInputError, match="32-byte SHA-256"):
        client.get_proposal(b"short")


# --- who may call what -----------------------------------------------------------------------

HSA_ONLY_CALLS = [
    ("RegisterHsa", services_pb2.RegisterHsaRequest(host_id="hsa-1", address="127.0.0.1:1")),
    ("GetKey", services_pb2.GetKeyRequest(key_id="k")),
    ("PutKey", services_pb2.PutKeyRequest()),
    ("ListKeyRecords", services_pb2.ListKeyRecordsRequest()),
]


@pytest.mark.parametrize(("method", "request_message"), HSA_ONLY_CALLS)
def test_hsa_only_calls_are_refused_on_the_operator_port(
    domain: Domain, coordinator: CoordinatorProcess, method: str, request_message: object
) -> None:
    channel, stub = operator_stub(domain, coordinator)
    with channel, pytest.raises(grpc.RpcError) as refused:
        getattr(stub, method)(request_message, timeout=5)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "this call needs an HSA certificate" in refused.value.details()


def test_watch_states_needs_an_hsa(domain: Domain, coordinator: CoordinatorProcess) -> None:
    channel, stub = operator_stub(domain, coordinator)
    with channel, pytest.raises(grpc.RpcError) as refused:
        list(stub.WatchStates(services_pb2.WatchStatesRequest(), timeout=5))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "this call needs an HSA certificate" in refused.value.details()


@pytest.mark.parametrize(("method", "request_message"), HSA_ONLY_CALLS)
def test_hsa_only_calls_refuse_other_identities(
    domain: Domain, coordinator: CoordinatorProcess, method: str, request_message: object
) -> None:
    for kind, name in (("client", "demo-app"), ("coordinator", "coordinator")):
        with mtls_channel(coordinator.address, domain.tls(kind, name), COORDINATOR) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request_message, timeout=5)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert f"spiffe://local/{kind}/{name} may not call this" in refused.value.details()


def test_mtls_port_serves_operator_calls_to_hsas(
    domain: Domain, coordinator: CoordinatorProcess
) -> None:
    with mtls_channel(coordinator.address, domain.tls("hsa", "hsa-2"), COORDINATOR) as channel:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        state = stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=5)
        assert SealedState.from_message(state).hash == domain.layout.genesis_hash
        stream = stub.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=3)
        first = next(iter(stream))
        assert SealedState.from_message(first).version == 1
        stream.cancel()


def test_key_records_for_hsas(domain: Domain, coordinator: CoordinatorProcess) -> None:
    metadata = keys_pb2.KeyMetadata(
        key_id="key-1", domain_id="local", description="test", metadata_version=1
    )
    token = keys_pb2.KeyToken(
        key_id="key-1",
        backing_version=1,
        domain_key_generation=1,
        nonce=b"n" * 12,
        ciphertext=b"c" * 48,
    )
    record = keys_pb2.KeyRecord(metadata=metadata.SerializeToString(), tokens=[token])
    host = load_host_identity(domain.layout.node_dir("hsa-1") / "identity")
    RecordSigner("local", "hsa-1", host.signer).sign(record)
    with mtls_channel(coordinator.address, domain.tls("hsa", "hsa-1"), COORDINATOR) as channel:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        put = stub.PutKey(services_pb2.PutKeyRequest(record=record), timeout=5)
        assert put.revision == 1
        # The same signed record again (a retry after a lost answer): its revision, no write.
        replay = stub.PutKey(services_pb2.PutKeyRequest(record=record), timeout=5)
        assert replay.revision == 1
        other = keys_pb2.KeyRecord()
        other.CopyFrom(record)
        other.tokens[0].nonce = b"m" * 12
        RecordSigner("local", "hsa-1", host.signer).sign(other)
        with pytest.raises(grpc.RpcError) as exists:
            stub.PutKey(services_pb2.PutKeyRequest(record=other), timeout=5)
        assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as conflict:
            stub.PutKey(services_pb2.PutKeyRequest(record=record, expected_revision=5), timeout=5)
        assert conflict.value.code() is grpc.StatusCode.ABORTED
        assert (
            stub.PutKey(
                services_pb2.PutKeyRequest(record=record, expected_revision=1), timeout=5
            ).revision
            == 2
        )
        got = stub.GetKey(services_pb2.GetKeyRequest(key_id="key-1"), timeout=5)
        assert (got.metadata, got.revision, list(got.tokens)) == (record.metadata, 2, [token])
        assert (got.signer_host_id, got.signature) == ("hsa-1", record.signature)
        listed = stub.ListKeyRecords(services_pb2.ListKeyRecordsRequest(limit=10), timeout=5)
        assert [r.revision for r in listed.records] == [2]
        assert listed.next_page_token == ""
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetKey(services_pb2.GetKeyRequest(key_id="key-2"), timeout=5)
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        foreign = keys_pb2.KeyMetadata(key_id="key-3", domain_id="elsewhere")
        with pytest.raises(grpc.RpcError) as wrong:
            stub.PutKey(
                services_pb2.PutKeyRequest(
                    record=keys_pb2.KeyRecord(metadata=foreign.SerializeToString())
                ),
                timeout=5,
            )
        assert wrong.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "domain 'elsewhere'" in wrong.value.details()
        with pytest.raises(grpc.RpcError) as bad_id:
            stub.GetKey(services_pb2.GetKeyRequest(key_id="bad key/\n"), timeout=5)
        assert bad_id.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_register_hsa_must_match_its_certificate(
    domain: Domain, coordinator: CoordinatorProcess, client: CoordinatorClient
) -> None:
    with mtls_channel(coordinator.address, domain.tls("hsa", "hsa-3"), COORDINATOR) as channel:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(host_id="hsa-1", address="127.0.0.1:9"), timeout=5
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "must match the certificate" in refused.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(host_id="hsa-3", address="nowhere"), timeout=5
            )
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # Port 9 (discard) on loopback: nothing listens there, so applying finds it unreachable.
        response = stub.RegisterHsa(
            services_pb2.RegisterHsaRequest(host_id="hsa-3", address="127.0.0.1:9"), timeout=5
        )
        assert response.version == 1
    assert [(h.host_id, h.address) for h in client.list_hsas()] == [("hsa-3", "127.0.0.1:9")]
    view = client.propose([quorum_change()], domain.operators["alice"])
    view = client.approve(view.proposal_id, domain.operators["carol"])
    assert view.state == "pending"
    assert "hsa-3 is unreachable" in view.detail


def test_states_after_limit(domain: Domain, coordinator: CoordinatorProcess) -> None:
    channel, stub = operator_stub(domain, coordinator)
    with channel:
        response = stub.GetStatesAfter(
            services_pb2.StatesAfterRequest(after_version=0, limit=100), timeout=5
        )
        assert len(response.states) == 1
        with pytest.raises(grpc.RpcError) as too_many:
            stub.GetStatesAfter(
                services_pb2.StatesAfterRequest(after_version=0, limit=101), timeout=5
            )
        assert too_many.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- restart and a tampered store ------------------------------------------------------------


def seal_next(
    domain: Domain, head: SealedState, proposal: Proposal, approvals: list[domain_pb2.Approval]
) -> SealedState:
    """What an honest hsa-1 returns for ApplyProposal: the next state, sealed and signed."""
    identity = load_host_identity(domain.layout.node_dir("hsa-1") / "identity")
    keys = sealing.unseal_state(head, "hsa-1", identity.agreement_private_key)
    manifest, _ = transition.next_manifest(
        transition.StateHead(head.manifest, head.hash), proposal, approvals, now=now()
    )
    return sealing.seal_state(
        manifest,
        sealing.next_domain_keys(keys, manifest),
        producer_host_id="hsa-1",
        producer=identity.signer,
        proposal=proposal,
        approvals=approvals,
    )


def db_path(domain: Domain) -> Path:
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    return config.path(config.store.removeprefix("sqlite:"))


def test_restart_keeps_everything_and_tampering_is_refused(tmp_path: Path) -> None:
    domain = make_domain(tmp_path / "d")
    alice, bob = domain.operators["alice"], domain.operators["bob"]
    process = CoordinatorProcess(domain.layout, tmp_path / "c.log")
    try:
        process.start()
        first_addresses = (process.address, process.operator_address)
        with CoordinatorClient(process.operator_address, domain.ca_pem) as client:
            pending = client.propose([quorum_change()], alice, reason="keep me")
            pending = client.approve(pending.proposal_id, bob)
            cancelled = client.cancel(client.propose([quorum_change()], bob).proposal_id, bob)
            genesis = client.latest_state()
        assert process.stop() == 0

        # State 2, sealed by hsa-1 for the pending proposal, stored as the coordinator would.
        approvals = list(pending.approvals)
        state2 = seal_next(domain, genesis, pending.proposal, approvals)
        store = SqliteStore(db_path(domain))
        try:
            store.append_state_and_close_proposal(2, state2.to_bytes(), pending.proposal_id)
        finally:
            store.close()

        process.start()
        assert (process.address, process.operator_address) == first_addresses
        with CoordinatorClient(process.operator_address, domain.ca_pem) as client:
            assert client.latest_state().hash == state2.hash
            assert [s.version for s in client.states_after(0)] == [1, 2]
            applied = client.get_proposal(pending.proposal_id)
            assert (applied.state, applied.applied_version) == ("applied", 2)
            assert applied.approved_by == pending.approved_by
            assert applied.proposal.message.reason == "keep me"
            assert client.get_proposal(cancelled.proposal_id).state == "cancelled"
            # The cancelled proposal sent again is a replay: answered as it stands.
            replay = client.submit_proposal(
                cancelled.proposal, quorum.approve(cancelled.proposal, bob)
            )
            assert replay.state == "cancelled"
            # A new proposal made for version 1 is now stale.
            old = Proposal.create(
                domain_id="local",
                base_version=1,
                base_state_hash=genesis.hash,
                changes=[quorum_change()],
                proposer_id=bob.public_key.key_id,
                created_at=now(),
                expires_at=now() + 600,
                nonce=crypto.random_bytes(NONCE_BYTES),
            )
            with pytest.raises(
                StaleProposalError,
                match="domain is at version 2, this proposal is for 1: propose again",
            ):
                client.submit_proposal(old, quorum.approve(old, bob))
        assert process.stop() == 0

        # Tamper with state 2 in the database: the coordinator refuses to start.
        tampered = domain_pb2.SealedState.FromString(state2.to_bytes())
        tampered.producer_signature = bytes([tampered.producer_signature[0] ^ 1]) + bytes(
            tampered.producer_signature[1:]
        )
        with sqlite3.connect(db_path(domain)) as db:
            db.execute(
                "UPDATE states SET state = ? WHERE version = 2",
                (tampered.SerializeToString(deterministic=True),),
            )
        process.start(expect_ready=False)
        assert process.wait_exit() == 1
        assert not process.ready_file.exists()
        refusal = [line for line in process.log().splitlines() if "refusing to start" in line]
        assert refusal == [
            "domain-coordinator: refusing to start: stored state version 2 does not verify "
            "after version 1: state version 2: the signature of host hsa-1 does not verify"
        ]

        # A store whose genesis is another domain's is refused too.
        other = make_domain(tmp_path / "other")
        with sqlite3.connect(db_path(domain)) as db:
            db.execute("DELETE FROM states WHERE version = 2")
            db.execute(
                "UPDATE states SET state = ? WHERE version = 1",
                (other.layout.genesis_state.read_bytes(),),
            )
        process.start(expect_ready=False)
        assert process.wait_exit() == 1
        assert (
            "refusing to start: stored state version 1 is not the pinned genesis state"
            in process.log()
        )
    finally:
        process.stop()


def test_a_removed_operators_cancel_vote_does_not_count(tmp_path: Path) -> None:
    domain = make_domain(tmp_path / "d")
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    process = CoordinatorProcess(domain.layout, tmp_path / "c.log")
    try:
        process.start()
        with CoordinatorClient(process.operator_address, domain.ca_pem) as client:
            removal = client.propose([remove_operator(carol.public_key.key_id)], alice)
            # carol alone cannot stop her own removal: her signature is one vote of two.
            assert client.cancel(removal.proposal_id, carol).state == "pending"
            removal = client.approve(removal.proposal_id, bob)
            genesis = client.latest_state()
        assert process.stop() == 0
        # hsa-1 applies the removal (state 2), stored as the coordinator would.
        state2 = seal_next(domain, genesis, removal.proposal, list(removal.approvals))
        store = SqliteStore(db_path(domain))
        try:
            store.append_state_and_close_proposal(2, state2.to_bytes(), removal.proposal_id)
        finally:
            store.close()

        process.start()
        with CoordinatorClient(process.operator_address, domain.ca_pem) as client:
            assert client.latest_state().version == 2
            target = client.propose([rotate_domain_key()], alice)
            with pytest.raises(PermissionDeniedError, match="not an operator of this domain"):
                client.cancel(target.proposal_id, carol)
        assert process.stop() == 0
        # A store that holds carol's (validly signed) vote anyway: a hostile or restored
        # store, or a vote from before her removal.
        vote = quorum.cancel(target.proposal_id, carol)
        with sqlite3.connect(db_path(domain)) as db:
            db.execute(
                "INSERT INTO cancel_votes (proposal_id, operator_id, vote) VALUES (?, ?, ?)",
                (target.proposal_id, vote.operator_id, vote.SerializeToString()),
            )
        process.start()
        with CoordinatorClient(process.operator_address, domain.ca_pem) as client:
            voted = client.cancel(target.proposal_id, bob)
            assert voted.state == "pending"
            assert "1 of 2 votes to cancel" in voted.detail
            assert len(voted.cancel_votes) == 2  # relayed as stored; counted: bob only
    finally:
        process.stop()


def test_a_bad_config_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"domain_id": "local", "nope": 1}))
    result = subprocess.run(
        [sys.executable, "-m", "domain_coordinator", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"domain-coordinator: refusing to start: config file {bad}: unknown keys nope"
    )
