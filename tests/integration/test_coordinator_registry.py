"""The HSA registry is not a list of trusted hosts: a removed host left in it gets no say.

A host registered before it was removed stays in the coordinator's registry. If it is
hostile, it answers `GetStatus` as a healthy host at the head and refuses every
`ApplyProposal` with FAILED_PRECONDITION, which would make the coordinator reject every
proposal it is asked to apply: a veto over the domain by a host the domain removed. The
coordinator asks only hosts of its head (`_produce`), so the proposal waits for a host of the
domain instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator_apply import start, wait_for

from domain_edge.client import remove_host, rotate_domain_key
from domain_edge.transport import COORDINATOR, mtls_channel, server_credentials
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration


class VetoingHsa(services_pb2_grpc.HsaAdminServicer):
    """A removed hsa-3 that claims to be a healthy host at the head and refuses everything."""

    def __init__(self) -> None:
        self.version = 1
        self.state_hash = b""
        self.asked = 0

    def GetStatus(self, request: Any, context: Any) -> services_pb2.HsaStatus:
        return services_pb2.HsaStatus(
            host_id="hsa-3",
            domain_id="local",
            version=self.version,
            state_hash=self.state_hash,
            healthy=True,
            member=True,
        )

    def ApplyProposal(self, request: Any, context: Any) -> domain_pb2.SealedState:
        self.asked += 1
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hsa-3 refuses every change")
        raise AssertionError("unreachable")


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    stack: list[Callable[[], None]] = []
    yield stack
    for action in reversed(stack):
        action()


def test_a_removed_host_left_in_the_registry_is_never_asked_to_apply(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup)  # an honest hsa-1, registered
    alice, bob = setup.domain.operators["alice"], setup.domain.operators["bob"]
    vetoing = VetoingHsa()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    services_pb2_grpc.add_HsaAdminServicer_to_server(vetoing, server)  # type: ignore[no-untyped-call]
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(setup.domain.tls("hsa", "hsa-3"))
    )
    server.start()
    cleanup.append(lambda: server.stop(0).wait())
    addresses = setup.coordinator.addresses
    assert addresses is not None
    with mtls_channel(addresses.address, setup.domain.tls("hsa", "hsa-3"), COORDINATOR) as channel:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        stub.RegisterHsa(
            services_pb2.RegisterHsaRequest(host_id="hsa-3", address=f"127.0.0.1:{port}"),
            timeout=5,
        )

    # hsa-3 is removed; hsa-1 seals the state that removes it (hsa-3 is never asked).
    view = setup.client.propose([remove_host("hsa-3")], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.applied, view.detail
    head = setup.client.latest_state()
    assert "hsa-3" not in head.manifest.hosts_by_id
    assert [h.host_id for h in setup.client.list_hsas()] == ["hsa-1", "hsa-3"]
    setup.hsa.head = head
    vetoing.version, vetoing.state_hash = head.version, head.hash

    # With hsa-1 busy, hsa-3 is the only registered HSA that claims it could apply the next
    # change: it is not asked, and the approved change waits for a host of the domain.
    setup.hsa.mode = "unavailable"
    view = setup.client.propose([rotate_domain_key()], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.state == "pending", view.detail
    assert view.detail.startswith("no HSA could apply it yet: hsa-1: UNAVAILABLE: busy")
    assert vetoing.asked == 0
    # Once hsa-1 answers again, the sweeper has it apply the change.
    setup.hsa.mode = "honest"
    wait_for("the sweeper to apply it", lambda: setup.client.get_proposal(view.proposal_id).applied)
    assert setup.client.latest_state().version == 3
    assert vetoing.asked == 0
