"""The chaos control workload's follow-up of one domain change against a coordinator that
loses answers, as replicas do when one dies mid-call.

`LossyCoordinator` keeps proposals and approvals in memory (quorum 2 of 3) and loses the
answers (UnavailableError) of the calls it is told to, either before storing what the call
carried (it never arrived) or after (only the answer was lost). It records the bytes of every
call, so a test can check that a retry sends the very bytes of the first attempt: the call's
idempotency key (docs/protocol.md, "Retries and idempotency").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.chaos.control import ControlClient, _Change
from deploy.chaos.history import History
from deploy.chaos.workload import WorkloadConfig
from domain_core import quorum
from domain_core.changes import rotate_domain_key
from domain_core.errors import NotFoundError, StaleProposalError, UnavailableError
from domain_core.model import Proposal
from domain_core.signers import InMemorySigner, SignatureAlgorithm, Signer
from domain_edge.client import ProposalView
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

SIGNERS = [
    (name, InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256))
    for name in ("alice", "bob", "carol")
]


@pytest.fixture(autouse=True)
def signed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every approval the workload signs, by operator id (a retry must not sign again: with a
    randomised signature, or a token that asks for a touch, that would be other bytes)."""
    made: list[str] = []
    approve = quorum.approve

    def counting(proposal: Proposal, signer: Signer) -> domain_pb2.Approval:
        made.append(signer.public_key.key_id)
        return approve(proposal, signer)

    monkeypatch.setattr(quorum, "approve", counting)
    return made


def _proposal() -> Proposal:
    now = int(time.time())
    return Proposal.create(
        domain_id="local",
        base_version=1,
        base_state_hash=b"\x01" * 32,
        changes=[rotate_domain_key()],
        proposer_id=SIGNERS[0][1].public_key.key_id,
        created_at=now,
        expires_at=now + 600,
        nonce=b"\x02" * 16,
    )


@dataclass
class LossyCoordinator:
    """Proposals in memory; loses the answers of the calls listed in `lose` (by call number,
    "before" or "after" storing)."""

    lose: dict[int, str] = field(default_factory=dict)
    refuse_stale: bool = False
    stale_below: int = 0  # refuse proposals on a base below this version as stale
    proposals: dict[bytes, Proposal] = field(default_factory=dict)
    approvals: dict[bytes, list[domain_pb2.Approval]] = field(default_factory=dict)
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    calls: int = 0

    def _view(self, proposal_id: bytes) -> ProposalView:
        approvals = self.approvals[proposal_id]
        applied = len(approvals) >= 2
        return ProposalView(
            proposal_id=proposal_id,
            proposal=self.proposals[proposal_id],
            state="applied" if applied else "pending",
            approvals=tuple(approvals),
            threshold=2,
            applied_version=2 if applied else 0,
            detail="",
        )

    def _maybe_lose(self, when: str) -> None:
        if self.lose.get(self.calls) == when:
            raise UnavailableError(f"call {self.calls}: the connection was lost ({when})")

    def _store(self, approval: domain_pb2.Approval) -> None:
        stored = self.approvals.setdefault(approval.proposal_id, [])
        if approval.operator_id not in [a.operator_id for a in stored]:
            stored.append(approval)

    def submit_proposal(self, proposal: Proposal, approval: domain_pb2.Approval) -> ProposalView:
        self.calls += 1
        self.sent.append(("submit", proposal.raw + approval.SerializeToString()))
        if self.refuse_stale or proposal.base_version < self.stale_below:
            raise StaleProposalError("the domain moved on")
        self._maybe_lose("before")
        self.proposals[proposal.id] = proposal
        self._store(approval)
        self._maybe_lose("after")
        return self._view(proposal.id)

    def submit_approval(self, approval: domain_pb2.Approval) -> ProposalView:
        self.calls += 1
        self.sent.append(("approve", approval.SerializeToString()))
        self._maybe_lose("before")
        self._store(approval)
        self._maybe_lose("after")
        return self._view(approval.proposal_id)

    def get_proposal(self, proposal_id: bytes) -> ProposalView:
        self.calls += 1
        if proposal_id not in self.proposals:
            raise NotFoundError("no such proposal")
        return self._view(proposal_id)


def _change(coordinator: LossyCoordinator, *, resend: bool) -> _Change:
    return _Change(
        coordinator,  # type: ignore[arg-type]
        _proposal(),
        SIGNERS,
        time.monotonic() + 10,
        resend,
    )


def test_a_submission_that_never_arrived_is_sent_again_with_the_same_bytes(
    signed: list[str],
) -> None:
    coordinator = LossyCoordinator(lose={1: "before"})
    change = _change(coordinator, resend=True)
    phase, result = change.run()
    assert (phase, result["version"], result["resent"]) == ("ok", 2, 1)
    submits = [sent for kind, sent in coordinator.sent if kind == "submit"]
    assert len(submits) == 2
    assert submits[0] == submits[1]  # the proposal and its proposer's approval, as signed
    assert len(signed) == len(set(signed)) == 2  # the proposer's and one approver's, once each


def test_an_approval_whose_answer_was_lost_is_sent_again_with_the_same_bytes(
    signed: list[str],
) -> None:
    # The approval's answer is lost after it arrived: reading the proposal shows it stored,
    # nothing is sent again. Lost before it arrived: the same approval goes again.
    for when, approvals_sent in (("after", 1), ("before", 2)):
        coordinator = LossyCoordinator(lose={2: when})
        phase, result = _change(coordinator, resend=True).run()
        assert phase == "ok"
        approvals = [sent for kind, sent in coordinator.sent if kind == "approve"]
        assert len(approvals) == approvals_sent
        assert len(set(approvals)) == 1
        assert result["resent"] == approvals_sent - 1
    assert len(signed) == 4  # two changes, each signed once by its proposer and one approver


def test_without_resend_a_submission_that_never_arrived_is_a_failure() -> None:
    coordinator = LossyCoordinator(lose={1: "before"})
    phase, result = _change(coordinator, resend=False).run()
    assert phase == "fail"
    assert result == {"error": "NotFoundError", "detail": "never stored", "resent": 0}


def test_a_definite_refusal_ends_the_change() -> None:
    coordinator = LossyCoordinator(refuse_stale=True)
    phase, result = _change(coordinator, resend=True).run()
    assert phase == "fail"
    assert result["error"] == "StaleProposalError"
    assert len(coordinator.sent) == 1


def test_a_coordinator_that_never_answers_leaves_the_change_unknown() -> None:
    coordinator = LossyCoordinator(lose={n: "before" for n in range(1, 1000)})
    change = _change(coordinator, resend=True)
    change.deadline = time.monotonic() + 1.5
    phase, result = change.run()
    assert phase == "unknown"
    assert result["error"] == "UnavailableError"
    submits = [sent for kind, sent in coordinator.sent if kind == "submit"]
    assert 2 <= len(submits) <= 5  # sent again, half a second apart: no busy loop
    assert len(set(submits)) == 1  # however often it was sent, always the same bytes


def _head(version: int) -> SimpleNamespace:
    """What a change reads of a head: its version, hash and domain."""
    return SimpleNamespace(
        version=version,
        hash=bytes([version]) * 32,
        manifest=SimpleNamespace(domain_id="local"),
    )


@pytest.mark.parametrize("replicated", [True, False])
def test_a_proposal_refused_as_stale_is_proposed_again_on_a_newer_head_with_replicas(
    replicated: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that lags gave the head: the proposal is stale, nothing was applied. With
    replicas the change goes on, as a new proposal on a newer head, in the same operation."""
    history = History()
    control = ControlClient(
        "127.0.0.1:1",
        b"",
        SIGNERS,
        tmp_path,
        history,
        WorkloadConfig(replicated=replicated),
        seed=1,
        stop=threading.Event(),
    )
    monkeypatch.setattr(control, "_newer_head", lambda client, version: _head(version + 1))
    monkeypatch.setattr(control, "_state_hash", lambda client, version, proposal: "")
    coordinator = LossyCoordinator(stale_below=2)
    control._change(coordinator, _head(1), "rotate-domain-key", [rotate_domain_key()], {})  # type: ignore[arg-type]
    invoke, done = history.events()
    if replicated:
        assert done["phase"] == "ok"
        assert done["result"]["reproposed"] == 1
        assert done["result"]["proposal_id"] != invoke["args"]["proposal_id"]
        assert coordinator.proposals[bytes.fromhex(done["result"]["proposal_id"])].base_version == 2
    else:
        assert done["phase"] == "fail"
        assert done["result"]["error"] == "StaleProposalError"
        assert "reproposed" not in done["result"]
