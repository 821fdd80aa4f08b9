"""The apply step against a scripted HSA: the coordinator believes nothing an HSA returns.

The coordinator runs in this process (`CoordinatorServer`, real ports, real TLS); a scripted
`HsaAdmin` server with hsa-1's certificate answers as the test tells it to: honestly (sealing
with hsa-1's keys), by refusing, with a forged state, from behind, or while another
coordinator stores a competing state first. Covers REJECTED, the retry of a quorate pending
proposal, a lost compare-and-swap (STALE, and the other state adopted), the push, the
WatchStates stream, and its bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator import Domain, db_path, make_domain, seal_next

from domain_coordinator.server import CoordinatorServer
from domain_coordinator.sqlite_store import SqliteStore
from domain_core import quorum
from domain_core.errors import FailedPreconditionError, StaleProposalError
from domain_core.model import Proposal, SealedState
from domain_edge.client import CoordinatorClient, rotate_domain_key, set_quorum
from domain_edge.config import CoordinatorConfig
from domain_edge.transport import COORDINATOR, mtls_channel, server_credentials
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


@dataclass
class ScriptedHsa(services_pb2_grpc.HsaAdminServicer):
    """An HsaAdmin that does what `mode` says; records what it was sent."""

    domain: Domain
    head: SealedState
    mode: str = "honest"  # honest | refuse | forge | unavailable | race
    behind: bool = False
    installed: list[int] = field(default_factory=list)
    applied: int = 0
    race: Callable[[], None] | None = None

    def GetStatus(self, request: Any, context: Any) -> services_pb2.HsaStatus:
        version = self.head.version - 1 if self.behind else self.head.version
        return services_pb2.HsaStatus(
            host_id="hsa-1",
            domain_id="local",
            version=version,
            state_hash=self.head.hash,
            healthy=True,
            member=True,
        )

    def ApplyProposal(self, request: Any, context: Any) -> domain_pb2.SealedState:
        self.applied += 1
        if self.mode == "refuse":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "1 of 2 approvals here")
        if self.mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "busy")
        proposal = Proposal.from_bytes(request.proposal)
        state = seal_next(self.domain, self.head, proposal, list(request.approvals))
        message = domain_pb2.SealedState()
        message.CopyFrom(state.message)
        if self.mode == "forge":
            message.producer_signature = bytes(64)
        if self.mode == "race" and self.race is not None:
            self.race()
        return message

    def InstallState(self, request: Any, context: Any) -> services_pb2.InstallStateResponse:
        state = SealedState.from_message(request.state)
        self.installed.append(state.version)
        return services_pb2.InstallStateResponse(version=state.version, state_hash=state.hash)


@dataclass
class Setup:
    domain: Domain
    coordinator: CoordinatorServer
    hsa: ScriptedHsa
    client: CoordinatorClient


class Clock:
    """The coordinator's clock: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def start(
    tmp_path: Path,
    cleanup: list[Callable[[], None]],
    max_streams: int = 64,
    clock: Callable[[], float] = time.time,
    hsa_type: type[ScriptedHsa] = ScriptedHsa,
) -> Setup:
    domain = make_domain(tmp_path / "d")
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    coordinator = CoordinatorServer(
        config, max_streams=max_streams, sweep_interval=0.2, clock=clock
    )
    addresses = coordinator.start()
    cleanup.append(coordinator.stop)
    genesis = SealedState.from_bytes(domain.layout.genesis_state.read_bytes())
    hsa = hsa_type(domain, genesis)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    services_pb2_grpc.add_HsaAdminServicer_to_server(hsa, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", server_credentials(domain.tls("hsa", "hsa-1")))
    server.start()
    cleanup.append(lambda: server.stop(0).wait())
    with mtls_channel(addresses.address, domain.tls("hsa", "hsa-1"), COORDINATOR) as channel:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        stub.RegisterHsa(
            services_pb2.RegisterHsaRequest(host_id="hsa-1", address=f"127.0.0.1:{port}"),
            timeout=5,
        )
    client = CoordinatorClient(addresses.operator_address, domain.ca_pem)
    cleanup.append(client.close)
    return Setup(domain, coordinator, hsa, client)


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    stack: list[Callable[[], None]] = []
    yield stack
    for action in reversed(stack):
        action()


def wait_for(what: str, probe: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_refusal_rejects_with_the_hsas_reason(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup)
    alice, bob, carol = (setup.domain.operators[n] for n in ("alice", "bob", "carol"))
    setup.hsa.mode = "refuse"
    view = setup.client.propose([rotate_domain_key()], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.state == "rejected"
    assert view.detail == "hsa-1 refused to apply it: 1 of 2 approvals here"
    assert setup.client.latest_state().version == 1
    with pytest.raises(FailedPreconditionError, match="rejected: hsa-1 refused"):
        setup.client.approve(view.proposal_id, carol)


def test_forged_state_is_not_stored_and_the_sweeper_retries(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup)
    alice, bob = setup.domain.operators["alice"], setup.domain.operators["bob"]
    setup.hsa.mode = "forge"
    view = setup.client.propose([rotate_domain_key()], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.state == "pending"
    assert "hsa-1 returned a state that does not verify" in view.detail
    assert setup.client.latest_state().version == 1

    setup.hsa.behind = True
    setup.hsa.mode = "honest"
    wait_for(
        "a retry",
        lambda: (
            "hsa-1 is at version 0, not 1" in setup.client.get_proposal(view.proposal_id).detail
        ),
    )
    assert setup.client.latest_state().version == 1

    setup.hsa.behind = False
    wait_for("the sweeper to apply it", lambda: setup.client.get_proposal(view.proposal_id).applied)
    head = setup.client.latest_state()
    assert head.version == 2
    assert head.proposal is not None
    assert head.proposal.id == view.proposal_id
    wait_for("the push", lambda: setup.hsa.installed == [2])


def test_lost_compare_and_swap_makes_it_stale(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup)
    alice, bob, carol = (setup.domain.operators[n] for n in ("alice", "bob", "carol"))
    genesis = setup.client.latest_state()
    competing = setup.client.propose([set_quorum(1)], carol)
    approvals = [*competing.approvals, quorum.approve(competing.proposal, alice)]
    other_state = seal_next(setup.domain, genesis, competing.proposal, approvals)

    def another_coordinator_stores_first() -> None:
        store = SqliteStore(db_path(setup.domain))
        try:
            store.append_state_and_close_proposal(2, other_state.to_bytes(), competing.proposal_id)
        finally:
            store.close()

    setup.hsa.mode = "race"
    setup.hsa.race = another_coordinator_stores_first
    view = setup.client.propose([rotate_domain_key()], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.state == "stale"
    assert view.detail.startswith("another state was stored for version 2 first")
    # The coordinator verified and adopted the state the other one stored.
    assert setup.client.latest_state().hash == other_state.hash
    won = setup.client.get_proposal(competing.proposal_id)
    assert (won.state, won.applied_version) == ("applied", 2)


def test_watch_states_streams_new_states_and_is_bounded(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup, max_streams=1)
    alice, bob = setup.domain.operators["alice"], setup.domain.operators["bob"]
    addresses = setup.coordinator.addresses
    assert addresses is not None
    received: list[int] = []
    channel = mtls_channel(addresses.address, setup.domain.tls("hsa", "hsa-2"), COORDINATOR)
    cleanup.append(channel.close)
    stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
    stream = stub.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=30)
    cleanup.append(stream.cancel)

    def read() -> None:
        try:
            for message in stream:
                received.append(SealedState.from_message(message).version)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_for("genesis on the stream", lambda: received == [1])

    with pytest.raises(grpc.RpcError) as exhausted:
        list(stub.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=5))
    assert exhausted.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    view = setup.client.propose([rotate_domain_key()], alice)
    assert setup.client.approve(view.proposal_id, bob).applied
    wait_for("version 2 on the stream", lambda: received == [1, 2])
    # Stopping the coordinator ends the stream cleanly.
    setup.coordinator.stop()
    reader.join(timeout=10)
    assert not reader.is_alive()


def test_approvals_of_expired_and_stale_proposals_are_refused(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    clock = Clock()
    setup = start(tmp_path, cleanup, clock=clock)
    alice, bob, carol = (setup.domain.operators[n] for n in ("alice", "bob", "carol"))
    overtaken = setup.client.propose([set_quorum(3)], carol)
    view = setup.client.propose([rotate_domain_key()], alice)
    assert setup.client.approve(view.proposal_id, bob).applied
    expiring = setup.client.propose([set_quorum(3)], carol, expires_in=600)

    with pytest.raises(StaleProposalError, match="domain is at version 2, this proposal is for 1"):
        setup.client.approve(overtaken.proposal_id, alice)
    clock.offset = 700
    expired = r"the proposal expired at \S+Z; propose again"
    with pytest.raises(FailedPreconditionError, match=expired):
        setup.client.approve(expiring.proposal_id, alice)
    assert setup.client.get_proposal(expiring.proposal_id).state == "expired"
    assert setup.client.get_proposal(overtaken.proposal_id).state == "stale"
    assert setup.client.list_proposals() == []


def test_each_hsas_reported_version_is_listed_for_operators(
    tmp_path: Path, cleanup: list[Callable[[], None]], caplog: pytest.LogCaptureFixture
) -> None:
    setup = start(tmp_path, cleanup)
    alice, bob = setup.domain.operators["alice"], setup.domain.operators["bob"]
    genesis = setup.client.latest_state()
    # The scripted HSA registered without saying which version it has installed.
    [listed] = setup.client.list_hsas()
    assert listed.host_id == "hsa-1"
    assert (listed.version, listed.state_hash, listed.reported_at) == (0, b"", 0)

    # The push: the coordinator keeps the version the HSA acknowledges in InstallState.
    view = setup.client.propose([rotate_domain_key()], alice)
    assert setup.client.approve(view.proposal_id, bob).applied
    head = setup.client.latest_state()
    wait_for("the push", lambda: setup.hsa.installed == [2])
    wait_for("the acknowledged version", lambda: setup.client.list_hsas()[0].version == 2)
    [listed] = setup.client.list_hsas()
    assert listed.state_hash == head.hash
    assert abs(listed.reported_at - time.time()) < 60
    [status_entry] = setup.client.domain_status().hsas
    assert (status_entry.version, status_entry.state_hash) == (2, head.hash)

    addresses = setup.coordinator.addresses
    assert addresses is not None
    with mtls_channel(addresses.address, setup.domain.tls("hsa", "hsa-1"), COORDINATOR) as channel:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]

        def register(version: int, state_hash: bytes) -> Any:
            return stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(
                    host_id="hsa-1",
                    address=listed.address,
                    version=version,
                    state_hash=state_hash,
                ),
                timeout=5,
            )

        # A version without its hash, a hash of the wrong size, a version out of range.
        for version, state_hash in (
            (2, b""),
            (0, head.hash),
            (2, b"\x01" * 31),
            (2**63, head.hash),
        ):
            with pytest.raises(grpc.RpcError) as bad:
                register(version, state_hash)
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (version, state_hash)
        assert setup.client.list_hsas()[0].version == 2  # unchanged by the refused calls

        # RegisterHsa is the HSA's own latest word: it replaces the report.
        def reported() -> tuple[int, bytes]:
            [entry] = setup.client.list_hsas()
            return entry.version, entry.state_hash

        register(1, genesis.hash)
        assert reported() == (1, genesis.hash)

        # A report that contradicts the coordinator's chain is relayed as said, and logged.
        with caplog.at_level("WARNING", logger="domain_coordinator._reports"):
            register(2, b"\x07" * 32)
        assert reported() == (2, b"\x07" * 32)
        assert "hsa-1 reports state 0707070707070707 at version 2" in caplog.text
        assert "a fork; investigate" in caplog.text
