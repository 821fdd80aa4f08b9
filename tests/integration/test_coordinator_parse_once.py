"""One call at the coordinator parses its proposal once and verifies each signature once.

The coordinator runs in this process (real ports, real TLS, no HSA registered: a proposal
that reaches its quorum stays PENDING, "no HSA could apply it yet"). The core functions that
parse a proposal (`Proposal.from_bytes`), verify an approval or a vote to cancel
(`quorum.verify_approval_signature`, `quorum.verify_cancel_signature`) and count them
(`quorum.evaluate`, `quorum.evaluate_cancel`) are wrapped to count their calls made on the
coordinator's threads (the client's own parsing, on the test's thread, is left out), and
each call is measured on its own.

Measured with these tests on the coordinator before `CheckedProposal` (every test here failed
there): a submission parsed its proposal 3 times and verified the proposer's approval 3
times; an approval parsed the proposal twice, counted the quorum twice, verified itself 3
times and every other approval twice; a vote to cancel parsed the proposal 3 times, counted 3
times and verified itself 3 times; a sweep parsed, counted and verified each quorate proposal
twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_coordinator import Domain, make_domain

from domain_coordinator.server import CoordinatorServer
from domain_core import quorum
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import Proposal
from domain_edge.client import CoordinatorClient, rotate_domain_key, set_quorum
from domain_edge.config import CoordinatorConfig

pytestmark = pytest.mark.integration


@dataclass
class Calls:
    """What the coordinator's threads parsed, verified and counted, by proposal."""

    parsed: Counter[bytes] = field(default_factory=Counter)
    verified: Counter[tuple[str, bytes]] = field(default_factory=Counter)  # (operator, id)
    counted: Counter[bytes] = field(default_factory=Counter)
    sweep: bool = False  # count the test's own thread too (it runs the sweep)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, *, sweep: bool = False) -> None:
        with self.lock:
            self.parsed.clear()
            self.verified.clear()
            self.counted.clear()
            self.sweep = sweep

    def note(self, what: Counter[Any], key: Any) -> None:
        if self.sweep or threading.current_thread() is not threading.main_thread():
            with self.lock:
                what[key] += 1


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls = Calls()
    parse = Proposal.from_bytes.__func__  # type: ignore[attr-defined]

    def counting_parse(cls: type[Proposal], raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
        proposal = parse(cls, raw, limits)
        calls.note(calls.parsed, proposal.id)
        return proposal

    def counting(real: Callable[..., Any], into: str) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            if into == "verified":
                calls.note(calls.verified, (args[0].operator_id, args[1]))
            else:
                calls.note(calls.counted, args[1].id)
            return real(*args)

        return wrapper

    monkeypatch.setattr(Proposal, "from_bytes", classmethod(counting_parse))
    for name, into in (
        ("verify_approval_signature", "verified"),
        ("verify_cancel_signature", "verified"),
        ("evaluate", "counted"),
        ("evaluate_cancel", "counted"),
    ):
        monkeypatch.setattr(quorum, name, counting(getattr(quorum, name), into))
    return calls


@dataclass
class Setup:
    domain: Domain
    coordinator: CoordinatorServer
    client: CoordinatorClient


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    domain = make_domain(tmp_path / "d")  # three operators, a quorum of two
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    coordinator = CoordinatorServer(config, sweep_interval=3600.0)  # the test sweeps
    addresses = coordinator.start()
    client = CoordinatorClient(addresses.operator_address, domain.ca_pem)
    try:
        yield Setup(domain, coordinator, client)
    finally:
        client.close()
        coordinator.stop()


def _ids(domain: Domain, *names: str) -> list[str]:
    return [domain.operators[n].public_key.key_id for n in names]


def test_one_approval_parses_its_proposal_once_and_verifies_each_signature_once(
    setup: Setup, calls: Calls
) -> None:
    domain, client = setup.domain, setup.client
    alice, bob, carol = _ids(domain, "alice", "bob", "carol")

    calls.reset()
    view = client.propose([rotate_domain_key()], domain.operators["alice"])
    pid = view.proposal_id
    assert calls.parsed == {pid: 1}
    assert calls.verified == {(alice, pid): 1}
    assert calls.counted == {pid: 1}

    # Bob's approval makes the quorum: counted once, applied (no HSA yet), answered.
    approval = quorum.approve(view.proposal, domain.operators["bob"])
    calls.reset()
    status = client.submit_approval(approval)
    assert status.state == "pending"
    assert status.detail.startswith("no HSA could apply it yet")
    assert calls.parsed == {pid: 1}
    assert calls.verified == {(alice, pid): 1, (bob, pid): 1}
    assert calls.counted == {pid: 1}

    # Carol's, beyond the quorum: three signatures, each verified once.
    approval = quorum.approve(view.proposal, domain.operators["carol"])
    calls.reset()
    client.submit_approval(approval)
    assert calls.parsed == {pid: 1}
    assert calls.verified == {(alice, pid): 1, (bob, pid): 1, (carol, pid): 1}
    assert calls.counted == {pid: 1}


def test_an_approval_short_of_the_quorum_is_verified_once(setup: Setup, calls: Calls) -> None:
    domain, client = setup.domain, setup.client
    alice, bob = _ids(domain, "alice", "bob")
    view = client.propose([set_quorum(3)], domain.operators["alice"])  # needs all three
    pid = view.proposal_id
    approval = quorum.approve(view.proposal, domain.operators["bob"])
    calls.reset()
    status = client.submit_approval(approval)
    assert (status.state, status.detail) == ("pending", "2 of 3 approvals; 1 more needed")
    assert calls.parsed == {pid: 1}
    assert calls.verified == {(alice, pid): 1, (bob, pid): 1}
    assert calls.counted == {pid: 1}


def test_a_vote_to_cancel_is_verified_once(setup: Setup, calls: Calls) -> None:
    domain, client = setup.domain, setup.client
    alice, bob, carol = _ids(domain, "alice", "bob", "carol")
    view = client.propose([rotate_domain_key()], domain.operators["alice"])
    pid = view.proposal_id

    calls.reset()
    voted = client.cancel(pid, domain.operators["bob"])
    assert voted.state == "pending"
    assert "1 of 2 votes to cancel" in voted.detail
    assert calls.parsed == {pid: 1}
    # Bob's vote, and Alice's approval for the standing shown: each once.
    assert calls.verified == {(bob, pid): 1, (alice, pid): 1}
    assert calls.counted == {pid: 2}  # the approvals once, the votes once

    calls.reset()
    cancelled = client.cancel(pid, domain.operators["carol"])
    assert cancelled.state == "cancelled"
    assert calls.parsed == {pid: 1}
    assert calls.verified == {(bob, pid): 1, (carol, pid): 1}
    assert calls.counted == {pid: 1}  # the votes; a closed proposal's threshold needs no count


def test_a_sweep_parses_and_counts_each_quorate_proposal_once(setup: Setup, calls: Calls) -> None:
    domain, client = setup.domain, setup.client
    alice, bob = _ids(domain, "alice", "bob")
    pids = []
    for _ in range(2):
        view = client.propose([rotate_domain_key()], domain.operators["alice"])
        client.approve(view.proposal_id, domain.operators["bob"])
        pids.append(view.proposal_id)

    calls.reset(sweep=True)
    setup.coordinator.service.sweep_once()
    assert calls.parsed == dict.fromkeys(pids, 1)
    assert calls.verified == {(op, pid): 1 for pid in pids for op in (alice, bob)}
    assert calls.counted == dict.fromkeys(pids, 1)
