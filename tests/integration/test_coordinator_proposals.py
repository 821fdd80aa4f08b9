"""Proposals at the coordinator are bounded, paged, purged, and cheap to sweep (issue 21, item 6).

The attacks, as the review ran them: one operator submits proposals until the coordinator
refuses everyone; anyone without a certificate loops ListProposals over a store full of
proposals; a store that only grows. What holds instead, against a real `domain-coordinator`
process where it goes over the network, and an in-process `CoordinatorServer` (real ports,
real TLS) where the test must count what the store is asked or move the clock:
- ListProposals answers a page at a time, newest first, never more than fits in one message,
  with a token for the next page;
- each operator has a cap of pending proposals, below the global one, counted in the store;
- a closed proposal is purged (approvals and votes to cancel with it) once the retention
  period has passed and it has expired, and its bytes cannot be submitted again;
- the sweeper, SubmitProposal, ListProposals and GetDomainStatus read no proposal they do not
  need: only those that may have a quorum, the one submitted, the page listed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator import CoordinatorProcess, Domain, make_domain, operator_stub

from domain_coordinator import server as server_module
from domain_coordinator.server import CoordinatorServer
from domain_coordinator.store import CoordinatorStore, ProposalRecord
from domain_core import quorum
from domain_core.errors import NotFoundError, UnavailableError
from domain_core.limits import DEFAULT_LIMITS
from domain_edge.client import CoordinatorClient, ProposalView, rotate_domain_key, set_quorum
from domain_edge.config import CoordinatorConfig
from domain_edge.transport import COORDINATOR, secure_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

DEADLINE = 10.0
REASON = "r" * 1000  # about 1.3 KiB a proposal, as a real add-host with its keys
DAY = 86_400


def _configure(domain: Domain, **limits: float) -> None:
    path = domain.layout.coordinator_config
    config = CoordinatorConfig.load(path)
    dataclasses.replace(config, limits={**config.limits, **limits}).save(path)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    stack: list[Callable[[], None]] = []
    yield stack
    for action in reversed(stack):
        action()


def _process(
    domain: Domain, tmp_path: Path, cleanup: list[Callable[[], None]]
) -> CoordinatorProcess:
    process = CoordinatorProcess(domain.layout, tmp_path / "coordinator.log")
    cleanup.append(process.stop)
    process.start()
    return process


def _ids(views: list[ProposalView]) -> list[bytes]:
    return [v.proposal_id for v in views]


# --- over a real coordinator process ---------------------------------------------------------


def test_list_proposals_pages_newest_first_within_the_message_limit(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    domain = make_domain(tmp_path / "d")
    # A small message limit, so that a page of 50 proposals of 1.3 KiB does not fit in one.
    _configure(domain, max_message_bytes=48 * 1024)
    coordinator = _process(domain, tmp_path, cleanup)
    operators = list(domain.operators.values())
    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as client:
        submitted = [
            client.propose([rotate_domain_key()], operators[i % 3], reason=REASON).proposal_id
            for i in range(45)
        ]
        cancelled = client.propose([set_quorum(1)], operators[0])
        client.cancel(cancelled.proposal_id, operators[0])
        channel, stub = operator_stub(domain, coordinator)
        with channel:
            stub_: Any = stub
            # Pages of 4, newest first, each continuing where the last stopped.
            seen: list[bytes] = []
            token = ""
            pages = 0
            while True:
                page = stub_.ListProposals(
                    services_pb2.ListProposalsRequest(limit=4, page_token=token), timeout=DEADLINE
                )
                seen.extend(p.proposal_id for p in page.proposals)
                pages += 1
                assert len(page.proposals) == 4 or not page.next_page_token
                token = page.next_page_token
                if not token:
                    break
            assert seen == submitted[::-1]
            assert pages == 12
            # The default page (50) does not fit in 48 KiB: the answer is cut short, with a
            # token, and stays under the limit the server itself enforces.
            first = stub_.ListProposals(services_pb2.ListProposalsRequest(), timeout=DEADLINE)
            assert 0 < len(first.proposals) < 45
            assert first.ByteSize() < 48 * 1024
            assert first.next_page_token
            # Closed proposals are listed only when asked for, in their place.
            everything = stub_.ListProposals(
                services_pb2.ListProposalsRequest(include_closed=True, limit=2), timeout=DEADLINE
            )
            assert [p.proposal_id for p in everything.proposals] == [
                cancelled.proposal_id,
                submitted[-1],
            ]
            # Bad paging is refused with what to do.
            for request, words in (
                (services_pb2.ListProposalsRequest(page_token="abc"), "not a page token"),
                (services_pb2.ListProposalsRequest(page_token="-1"), "not a page token"),
                (services_pb2.ListProposalsRequest(page_token="9" * 40), "not a page token"),
                (services_pb2.ListProposalsRequest(limit=201), "above the maximum of 200"),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    stub_.ListProposals(request, timeout=DEADLINE)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert words in str(refused.value.details())
        # The client pages through it all and lists oldest first (what `proposals list` shows).
        assert _ids(client.list_proposals()) == submitted
        assert _ids(client.list_proposals(limit=5)) == submitted[-5:]
        assert _ids(client.list_proposals(include_closed=True))[-1] == cancelled.proposal_id
        assert client.domain_status().pending_proposals == 45


def test_one_operator_cannot_fill_the_pending_proposals(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    """Mallory (one operator) submits until refused; the others can still propose."""
    domain = make_domain(tmp_path / "d")
    _configure(domain, max_pending_proposals=6, max_pending_proposals_per_operator=3)
    coordinator = _process(domain, tmp_path, cleanup)
    mallory, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as client:
        mine = [client.propose([rotate_domain_key()], mallory) for _ in range(3)]
        with pytest.raises(UnavailableError, match="you have 3 pending proposals already"):
            client.propose([rotate_domain_key()], mallory)
        assert client.domain_status().pending_proposals == 3
        # Bob and carol are not blocked by mallory's flood ...
        client.propose([rotate_domain_key()], bob)
        client.propose([rotate_domain_key()], carol)
        client.propose([rotate_domain_key()], carol)
        # ... up to the coordinator's global cap.
        with pytest.raises(UnavailableError, match="6 proposals are pending already"):
            client.propose([rotate_domain_key()], bob)
        # Withdrawing one of hers gives mallory one place back, and nobody else loses one.
        client.cancel(mine[0].proposal_id, mallory)
        client.propose([rotate_domain_key()], mallory)
        assert client.domain_status().pending_proposals == 6
    # The refusal is RESOURCE_EXHAUSTED on the wire.
    channel, stub = operator_stub(domain, coordinator)
    with channel:
        proposal = client_proposal(domain, coordinator)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitProposal(  # type: ignore[attr-defined]
                services_pb2.SubmitProposalRequest(
                    proposal=proposal.raw, proposer_approval=quorum.approve(proposal, mallory)
                ),
                timeout=DEADLINE,
            )
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_submitting_and_cancelling_in_a_loop_keeps_the_store_bounded(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    """Mallory cancels each of her proposals and submits another, to grow the store with
    closed proposals (kept for 30 days). She keeps at most her stored cap: her oldest closed,
    expired ones make room, and until some have expired she must wait."""
    domain = make_domain(tmp_path / "d")
    _configure(domain, max_stored_proposals_per_operator=4)
    coordinator = _process(domain, tmp_path, cleanup)
    mallory, bob = domain.operators["alice"], domain.operators["bob"]
    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as client:
        honest = client.propose([rotate_domain_key()], bob)
        first = []
        for _ in range(4):
            view = client.propose([rotate_domain_key()], mallory, expires_in=2)
            client.cancel(view.proposal_id, mallory)
            first.append(view.proposal_id)
        with pytest.raises(UnavailableError, match="too few of them are closed and expired"):
            client.propose([rotate_domain_key()], mallory, reason=REASON)
        time.sleep(3.2)  # her closed proposals expire (times are whole seconds)
        later = []
        for _ in range(6):
            view = client.propose([rotate_domain_key()], mallory, expires_in=2, reason=REASON)
            client.cancel(view.proposal_id, mallory)
            later.append(view.proposal_id)
            if len(later) >= 4:
                time.sleep(3.2)  # the first of these expire in turn
        stored = _ids(client.list_proposals(include_closed=True))
        hers = [p for p in stored if p != honest.proposal_id]
        assert len(hers) == 4
        assert not set(first) & set(hers)
        assert honest.proposal_id in stored


def client_proposal(domain: Domain, coordinator: CoordinatorProcess) -> Any:
    """A fresh rotate-domain-key proposal by alice for the coordinator's head."""
    from domain_core import crypto
    from domain_core.model import NONCE_BYTES, Proposal

    with CoordinatorClient(coordinator.operator_address, domain.ca_pem) as client:
        head = client.latest_state()
    now = int(time.time())
    return Proposal.create(
        domain_id=head.manifest.domain_id,
        base_version=head.version,
        base_state_hash=head.hash,
        changes=[rotate_domain_key()],
        proposer_id=domain.operators["alice"].public_key.key_id,
        created_at=now,
        expires_at=now + 600,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )


# --- in process: the clock moved, the store's reads counted ----------------------------------


class CountingStore:
    """A store that remembers which proposals it handed out (by id) and what was asked."""

    def __init__(self, inner: CoordinatorStore) -> None:
        self._inner = inner
        self.loaded: list[bytes] = []
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.loaded.clear()
            self.calls.clear()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            records = result if isinstance(result, list) else [result]
            with self._lock:
                self.calls.append(name)
                self.loaded.extend(r.proposal_id for r in records if isinstance(r, ProposalRecord))
            return result

        return counted


class Clock:
    """Real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _in_process(
    tmp_path: Path,
    cleanup: list[Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
    clock: Callable[[], float] = time.time,
) -> tuple[Domain, CoordinatorServer, CountingStore, CoordinatorClient]:
    domain = make_domain(tmp_path / "d")
    counting: list[CountingStore] = []
    real_open = server_module.open_store

    def open_counting(spec: str, base_dir: Path) -> Any:
        counting.append(CountingStore(real_open(spec, base_dir)))
        return counting[-1]

    monkeypatch.setattr(server_module, "open_store", open_counting)
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    # The sweeper runs only when the test says so.
    coordinator = CoordinatorServer(config, sweep_interval=3600.0, clock=clock)
    addresses = coordinator.start()
    cleanup.append(coordinator.stop)
    client = CoordinatorClient(addresses.operator_address, domain.ca_pem)
    cleanup.append(client.close)
    return domain, coordinator, counting[0], client


def test_the_sweeper_and_the_calls_read_only_the_proposals_they_need(
    tmp_path: Path, cleanup: list[Callable[[], None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    domain, coordinator, store, client = _in_process(tmp_path, cleanup, monkeypatch)
    alice, bob, carol = (domain.operators[n] for n in ("alice", "bob", "carol"))
    pending = [
        client.propose([rotate_domain_key()], (alice, bob, carol)[i % 3], reason=REASON)
        for i in range(24)
    ]
    closed = [client.propose([rotate_domain_key()], carol) for _ in range(10)]
    for view in closed:
        client.cancel(view.proposal_id, carol)
    # Two with a quorum: no HSA is registered, so they stay pending and are retried.
    quorate = [client.propose([rotate_domain_key()], alice) for _ in range(2)]
    for view in quorate:
        assert client.approve(view.proposal_id, bob).state == "pending"
    quorate_ids = {v.proposal_id for v in quorate}

    store.reset()
    coordinator.service.sweep_once()
    assert "list_proposals" not in store.calls
    assert set(store.loaded) == quorate_ids, "the sweeper read proposals that cannot apply"
    assert len(store.loaded) <= 6 * len(quorate_ids)
    assert all(client.get_proposal(v.proposal_id).state == "pending" for v in pending[:3])

    # A submission reads its own proposal back, not every pending one.
    store.reset()
    new = client.propose([rotate_domain_key()], bob)
    assert set(store.loaded) == {new.proposal_id}
    # A page reads the page (and one more, to know whether there is another page).
    store.reset()
    page, token = client.proposals_page(limit=5)
    assert len(page) == 5
    assert token
    assert len(store.loaded) <= 6
    # The status counts in the store.
    store.reset()
    assert client.domain_status().pending_proposals == 24 + 2 + 1
    assert store.loaded == []
    # Listing the same page again counts no approval again; a new approval is counted.
    evaluations: list[bytes] = []
    real_evaluate = quorum.evaluate

    def counting(manifest: Any, proposal: Any, approvals: Any) -> Any:
        evaluations.append(proposal.id)
        return real_evaluate(manifest, proposal, approvals)

    monkeypatch.setattr(quorum, "evaluate", counting)
    first = client.proposals_page(limit=5)[0]
    again = client.proposals_page(limit=5)[0]
    assert evaluations == []  # listed once above already
    assert [v.detail for v in again] == [v.detail for v in first]
    approved = client.approve(first[1].proposal_id, carol)
    after = client.proposals_page(limit=5)[0]
    assert set(approved.approved_by) == {v.operator_id for v in after[1].approvals}
    assert after[1].detail.startswith("no HSA could apply it yet") or "quorum reached" in (
        after[1].detail
    )


def test_closed_proposals_are_purged_after_the_retention_and_cannot_come_back(
    tmp_path: Path, cleanup: list[Callable[[], None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    domain, coordinator, store, client = _in_process(tmp_path, cleanup, monkeypatch, clock)
    alice, bob = domain.operators["alice"], domain.operators["bob"]
    withdrawn = client.propose([rotate_domain_key()], alice)
    vote = client.cancel(withdrawn.proposal_id, bob)  # a vote, kept beside the approval
    assert vote.state == "pending"
    client.cancel(withdrawn.proposal_id, alice)
    waiting = client.propose([set_quorum(1)], alice)
    service = coordinator.service

    # Ten days on: nothing is purged; the pending one expired (its lifetime is an hour).
    clock.offset = 10 * DAY
    service.sweep_once()
    assert service.purge_closed_proposals() == 0
    assert client.get_proposal(withdrawn.proposal_id).state == "cancelled"
    assert client.get_proposal(waiting.proposal_id).state == "expired"

    # Thirty days and a bit after the cancel: it goes, with its approval and vote; the other
    # closed ten days ago, so it stays twenty more.
    clock.offset = 30 * DAY + 60
    assert service.purge_closed_proposals() == 1
    with pytest.raises(NotFoundError):
        client.get_proposal(withdrawn.proposal_id)
    assert client.get_proposal(waiting.proposal_id).state == "expired"
    assert store.count_proposals(include_closed=True) == 1

    # The purged proposal's bytes, replayed with its proposer's signature (anyone could have
    # kept them from a listing), are refused: it expired.
    replay = services_pb2.SubmitProposalRequest(
        proposal=withdrawn.proposal.raw,
        proposer_approval=withdrawn.approvals[0],
    )
    assert coordinator.addresses is not None
    with secure_channel(
        coordinator.addresses.operator_address, domain.ca_pem, COORDINATOR
    ) as channel:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitProposal(replay, timeout=DEADLINE)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in str(refused.value.details())
    with pytest.raises(NotFoundError):
        client.get_proposal(withdrawn.proposal_id)

    clock.offset = 41 * DAY
    assert service.purge_closed_proposals() == 1
    assert client.list_proposals(include_closed=True) == []


def test_the_default_per_operator_cap_is_below_the_global_one() -> None:
    assert (
        0 < DEFAULT_LIMITS.max_pending_proposals_per_operator < DEFAULT_LIMITS.max_pending_proposals
    )
