"""A coordinator whose store is behind repairs itself from the HSAs, believing none of them.

The coordinator runs in this process (`CoordinatorServer`, real ports, real TLS). A lying HSA
(hsa-1's certificate, adversarial by design) reports version 2 and serves, when the
coordinator asks `HsaAdmin.GetStatesAfter`, first a forged state 2, then a state that does not
follow the coordinator's chain, then the honest one. Only the honest one is stored, and the
proposal it carries, pending at the coordinator, is closed as APPLIED with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator import make_domain, seal_next

from domain_coordinator.server import CoordinatorServer
from domain_core import quorum
from domain_core.model import SealedState
from domain_edge.client import CoordinatorClient, rotate_domain_key
from domain_edge.config import CoordinatorConfig
from domain_edge.transport import COORDINATOR, mtls_channel, server_credentials
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


class LyingHsa(services_pb2_grpc.HsaAdminServicer):
    """Serves whatever states the test puts in `serve`; records the states pushed to it."""

    def __init__(self) -> None:
        self.serve: list[domain_pb2.SealedState] = []
        self.asked: list[int] = []
        self.installed: list[int] = []

    def GetStatesAfter(self, request: Any, context: Any) -> services_pb2.StatesResponse:
        self.asked.append(request.after_version)
        return services_pb2.StatesResponse(states=self.serve)

    def InstallState(self, request: Any, context: Any) -> services_pb2.InstallStateResponse:
        state = SealedState.from_message(request.state)
        self.installed.append(state.version)
        return services_pb2.InstallStateResponse(version=state.version, state_hash=state.hash)


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


def test_the_repair_stores_only_states_that_verify(
    tmp_path: Path, cleanup: list[Callable[[], None]], caplog: pytest.LogCaptureFixture
) -> None:
    domain = make_domain(tmp_path / "d")
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    coordinator = CoordinatorServer(config, sweep_interval=0.2)
    addresses = coordinator.start()
    cleanup.append(coordinator.stop)
    client = CoordinatorClient(addresses.operator_address, domain.ca_pem)
    cleanup.append(client.close)
    liar = LyingHsa()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    services_pb2_grpc.add_HsaAdminServicer_to_server(liar, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port("127.0.0.1:0", server_credentials(domain.tls("hsa", "hsa-1")))
    server.start()
    cleanup.append(lambda: server.stop(0).wait())

    # A proposal pending at the coordinator (alice's approval only); the domain applied it
    # elsewhere with bob's approval as version 2, which the coordinator's store lacks.
    genesis = client.latest_state()
    pending = client.propose([rotate_domain_key()], domain.operators["alice"])
    bob = quorum.approve(pending.proposal, domain.operators["bob"])
    honest = seal_next(domain, genesis, pending.proposal, [*pending.approvals, bob])
    forged = domain_pb2.SealedState()
    forged.CopyFrom(honest.message)
    forged.producer_signature = bytes(len(forged.producer_signature))
    foreign = make_domain(tmp_path / "other").layout.genesis_state.read_bytes()

    def report(version: int, state_hash: bytes) -> int:
        with mtls_channel(addresses.address, domain.tls("hsa", "hsa-1"), COORDINATOR) as channel:
            stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            answer = stub.RegisterHsa(
                services_pb2.RegisterHsaRequest(
                    host_id="hsa-1",
                    address=f"127.0.0.1:{port}",
                    version=version,
                    state_hash=state_hash,
                ),
                timeout=5,
            )
        return int(answer.version)

    def stopped_because(reason: str) -> Callable[[], bool]:
        def check() -> bool:
            said = client.domain_status().store_behind
            return said.startswith(
                "store behind the HSAs: hsa-1 reports version 2; this coordinator's store is at "
                "version 1; the repair stopped at version 1: "
            ) and said.endswith(reason)

        return check

    for served in (
        [forged],  # a bad producer signature
        [domain_pb2.SealedState.FromString(foreign)],  # another chain's version 1: a fork
    ):
        liar.serve = served
        liar.asked.clear()
        assert report(2, honest.hash) == 1
        # The status may still say so from the round before: wait for this round's fetch.
        refused = stopped_because("hsa-1 served a state that does not verify")
        wait_for("the refused repair", lambda: bool(liar.asked) and refused())  # noqa: B023
        assert set(liar.asked) == {1}
        assert [s.version for s in client.states_after(0)] == [1]
        assert client.get_proposal(pending.proposal_id).state == "pending"
    assert "hsa-1 served a state that does not verify after version 1" in caplog.text

    # A state that is not even served: the repair says so.
    liar.serve = []
    wait_for("an empty answer", stopped_because("no HSA served the newer states"))

    # The honest state: verified, stored with its proposal closed as APPLIED, pushed.
    liar.serve = [honest.message]
    wait_for("the repair", lambda: client.latest_state().version == 2)
    assert client.latest_state().hash == honest.hash
    applied = client.get_proposal(pending.proposal_id)
    assert (applied.state, applied.applied_version) == ("applied", 2)
    assert client.domain_status().store_behind == ""
    wait_for("the push of the repaired head", lambda: liar.installed == [2])
    assert report(2, honest.hash) == 2
