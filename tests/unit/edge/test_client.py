"""The pure parts of the quorum-flow client: error mapping, proposal views, change builders."""

from __future__ import annotations

import grpc
import pytest
from support.simulator import noncanonical_encodings

from domain_core import canonical, crypto, quorum
from domain_core.changes import (
    add_operator,
    remove_host,
    remove_operator,
    rotate_domain_key,
    set_quorum,
    set_settings,
)
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    FailedPreconditionError,
    HsmDomainError,
    InvalidInputError,
    LimitExceededError,
    MalformedMessageError,
    NotFoundError,
    PermissionDeniedError,
    StaleProposalError,
    UnavailableError,
)
from domain_core.model import NONCE_BYTES, Proposal, default_settings, make_operator
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.client import CoordinatorClient, ProposalView, error_from_rpc
from domain_edge.status import grpc_status_for
from domain_proto import domain_pb2, services_pb2

pytestmark = pytest.mark.unit


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.ABORTED, StaleProposalError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
    ],
)
def test_errors_keep_the_servers_message(code: grpc.StatusCode, cls: type[Exception]) -> None:
    error = error_from_rpc(FakeRpcError(code, "already approved by you"), "127.0.0.1:1")
    assert type(error) is cls
    assert str(error) == "already approved by you"
    assert grpc_status_for(error) is code


def test_unreachable_names_the_coordinator() -> None:
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed"), "h:1")
    assert isinstance(error, UnavailableError)
    assert (
        str(error) == "the coordinator at h:1 is unreachable (connect failed); check that it runs"
    )
    late = error_from_rpc(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), "h:1")
    assert isinstance(late, UnavailableError)
    assert "did not answer in time" in str(late)
    internal = error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"), "h:1")
    assert type(internal) is HsmDomainError
    assert str(internal) == "the coordinator at h:1 failed: INTERNAL: boom"


def _proposal() -> Proposal:
    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    return Proposal.create(
        domain_id="local",
        base_version=1,
        base_state_hash=b"\x01" * 32,
        changes=[rotate_domain_key()],
        proposer_id=signer.public_key.key_id,
        created_at=100,
        expires_at=200,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )


def test_proposal_view_checks_bytes_against_the_id() -> None:
    proposal = _proposal()
    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    status = services_pb2.ProposalStatus(
        proposal_id=proposal.id,
        proposal=proposal.raw,
        approvals=[quorum.approve(proposal, signer)],
        state=services_pb2.PROPOSAL_STATE_APPLIED,
        threshold=2,
        applied_version=2,
        detail="",
    )
    view = ProposalView.from_status(status)
    assert (view.state, view.threshold, view.applied_version, view.applied) == (
        "applied",
        2,
        2,
        True,
    )
    assert view.approved_by == (signer.public_key.key_id,)
    assert view.proposal.id == proposal.id == canonical.proposal_id(proposal.raw)

    swapped = services_pb2.ProposalStatus()
    swapped.CopyFrom(status)
    swapped.proposal = _proposal().raw
    with pytest.raises(BadSignatureError, match="do not match the proposal id"):
        ProposalView.from_status(swapped)


def test_the_operator_tool_refuses_a_relayed_proposal_outside_the_proposal_rules() -> None:
    """Issue 21, item 6: whatever a coordinator relays (listed, served or answered), the
    operator's side parses it with `Proposal.from_bytes`: bytes that hash to the id they come
    with, but carry unknown fields, another encoding or more than 64 KiB, are refused."""
    proposal = _proposal()
    for raw in noncanonical_encodings(proposal).values():
        status = services_pb2.ProposalStatus(
            proposal_id=canonical.proposal_id(raw),
            proposal=raw,
            state=services_pb2.PROPOSAL_STATE_PENDING,
        )
        with pytest.raises((MalformedMessageError, LimitExceededError)):
            ProposalView.from_status(status)


def test_change_builders_make_valid_proposals() -> None:
    operator = make_operator(
        "dave", InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256).public_key
    )
    changes = [
        remove_host("hsa-3"),
        add_operator(operator),
        remove_operator(operator.operator_id),
        set_quorum(2),
        set_quorum(3, "add-host"),
        set_quorum(0, domain_pb2.CHANGE_TYPE_ADD_HOST),
        set_settings(key_rotation_interval_seconds=3600),
        rotate_domain_key(),
    ]
    proposal = Proposal.create(
        domain_id="local",
        base_version=1,
        base_state_hash=b"\x01" * 32,
        changes=changes,
        proposer_id=operator.operator_id,
        created_at=100,
        expires_at=200,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )
    assert len(proposal.changes) == len(changes)
    assert changes[4].set_quorum.change_type == domain_pb2.CHANGE_TYPE_ADD_HOST


def test_set_settings_keeps_the_base_values() -> None:
    base = default_settings()
    base.key_generations_retained = 3
    change = set_settings(base=base, max_proposal_lifetime_seconds=600)
    settings = change.set_settings.settings
    assert settings.key_generations_retained == 3
    assert settings.max_proposal_lifetime_seconds == 600
    assert settings.key_rotation_interval_seconds == base.key_rotation_interval_seconds
    assert base.max_proposal_lifetime_seconds != 600  # the base is not modified


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: remove_host("Bad Host"), "not a host id"),
        (lambda: remove_operator("abc"), "not an operator id"),
        (lambda: set_quorum(0), "at least 1"),
        (lambda: set_quorum(2, "no-such-change"), "unknown change type"),
        (lambda: set_quorum(2, 99), "unknown change type"),
        (lambda: set_quorum(-1), "whole number"),
    ],
)
def test_change_builders_refuse_bad_input(build: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build()  # type: ignore[operator]


def test_client_needs_cert_and_key_together() -> None:
    with pytest.raises(ValueError, match="both cert_pem and key_pem"):
        CoordinatorClient("127.0.0.1:1", b"ca", cert_pem=b"cert")
