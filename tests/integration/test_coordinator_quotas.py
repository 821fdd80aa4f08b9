"""The coordinator's quotas against a real `domain-coordinator` process.

Two attacks on the coordinator's capacity, and what holds instead:
- a loop of reads on the unauthenticated operator port (anyone who reaches it): after a burst
  every call from that address is RESOURCE_EXHAUSTED "retry in N s", on any connection,
  while the HSAs' calls on the mutual-TLS port go on unaffected;
- one host opening WatchStates streams until the global cap is used up, so that no other HSA
  can follow the chain: a host holds at most two, a new one replacing its oldest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator import CoordinatorProcess, Domain, make_domain, operator_stub

from domain_coordinator._admission import _REFUSAL_HOLD_SECONDS
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import SealedState
from domain_edge.transport import COORDINATOR, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

DEADLINE = 5.0
RETRY = re.compile(
    r"too many calls to the coordinator from 127\.0\.0\.1: at most \d+ a second "
    r"\(bursts of \d+\); retry in (\d+) s"
)


@pytest.fixture
def domain(tmp_path: Path) -> Domain:
    return make_domain(tmp_path / "d")


@pytest.fixture
def coordinator(domain: Domain, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    process = CoordinatorProcess(domain.layout, tmp_path / "coordinator.log")
    try:
        process.start()
        yield process
    finally:
        process.stop()


# How long the coordinator holds a quota refusal before it sends it.
REFUSAL_HOLD = _REFUSAL_HOLD_SECONDS


@dataclass
class Hammered:
    served: int
    refused: int
    elapsed: float
    details: str  # of the last refusal


def hammer(
    calls: list[Callable[[], object]], *, seconds: float = 60.0, until_refused: bool = False
) -> Hammered:
    """Call in a tight loop (round robin) for `seconds`; how many were served and refused."""
    served = refused = 0
    details = ""
    started = time.monotonic()
    attempt = 0
    while time.monotonic() - started < seconds:
        try:
            calls[attempt % len(calls)]()
        except grpc.RpcError as error:
            details = str(error.details())
            if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or not RETRY.fullmatch(
                details
            ):
                raise AssertionError(f"not the quota's refusal: {error.code()} {details}") from None
            refused += 1
            if until_refused:
                break
        else:
            served += 1
        attempt += 1
    return Hammered(served, refused, time.monotonic() - started, details)


def answered(call: Callable[[], object], code: grpc.StatusCode) -> Callable[[], None]:
    """`call`, for which an answer with `code` counts as served (not refused by the quota)."""

    def run() -> None:
        try:
            call()
        except grpc.RpcError as error:
            if error.code() is not code:
                raise

    return run


def reads(stub: Any) -> list[Callable[[], object]]:
    """The reads an unauthenticated client may make, one of each."""
    return [
        lambda: stub.GetStatesAfter(
            services_pb2.StatesAfterRequest(after_version=0), timeout=DEADLINE
        ),
        lambda: stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE),
        lambda: stub.GetDomainStatus(services_pb2.DomainStatusRequest(), timeout=DEADLINE),
        lambda: stub.ListProposals(services_pb2.ListProposalsRequest(), timeout=DEADLINE),
        answered(
            lambda: stub.GetProposal(
                services_pb2.ProposalIdRequest(proposal_id=bytes(32)), timeout=DEADLINE
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        lambda: stub.ListHsas(services_pb2.ListHsasRequest(), timeout=DEADLINE),
    ]


def hsa_only_calls(stub: Any) -> list[Callable[[], object]]:
    """HSA-only calls, which the operator port refuses (PERMISSION_DENIED) until the quota
    refuses them first."""
    return [
        answered(
            lambda: stub.GetKey(services_pb2.GetKeyRequest(key_id="k"), timeout=DEADLINE),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        answered(
            lambda: next(iter(stub.WatchStates(services_pb2.WatchStatesRequest(), timeout=5))),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]


def test_a_loop_of_reads_on_the_operator_port_is_limited_and_hsas_are_not(
    domain: Domain, coordinator: CoordinatorProcess
) -> None:
    rate = DEFAULT_LIMITS.coordinator_reads_per_second
    burst = DEFAULT_LIMITS.coordinator_read_burst
    channel, stub = operator_stub(domain, coordinator)
    with channel:
        # The burst is served, then the loop is refused with the time to wait.
        first = hammer(reads(stub), until_refused=True)
        assert first.refused == 1, f"{first.served} reads in a tight loop were all served"
        assert burst * 0.9 <= first.served <= burst + rate * first.elapsed + 1
        match = RETRY.fullmatch(first.details)
        assert match
        # From then on the address gets no more than the rate, on a new connection too, and
        # calls the operator port refuses anyway are charged as well ...
        # (The bucket refills between two loops: while a channel is made, and while the
        # refusal that ended the previous loop was held before it was sent. Each bound counts
        # that time too.)
        emptied = time.monotonic()
        fresh_channel, fresh = operator_stub(domain, coordinator)
        with fresh_channel:
            gap = time.monotonic() - emptied
            loop = hammer(reads(stub) + reads(fresh) + hsa_only_calls(fresh), seconds=2.5)
        assert loop.refused > 0
        assert loop.served <= rate * (REFUSAL_HOLD + gap + loop.elapsed) + 2, (loop, gap)
        # ... and so do other identities on the mutual-TLS port: only HSAs are not limited.
        emptied = time.monotonic()
        with mtls_channel(
            coordinator.address, domain.tls("client", "demo-app"), COORDINATOR
        ) as app_channel:
            app: Any = services_pb2_grpc.CoordinatorStub(app_channel)  # type: ignore[no-untyped-call]
            gap = time.monotonic() - emptied
            loop = hammer(reads(app), seconds=2.5)
        assert loop.refused > 0
        assert loop.served <= rate * (REFUSAL_HOLD + gap + loop.elapsed) + 2, (loop, gap)
        # The HSAs of the domain, from the very same address, are never refused.
        hammer(reads(stub), until_refused=True)
        with mtls_channel(
            coordinator.address, domain.tls("hsa", "hsa-1"), COORDINATOR
        ) as hsa_channel:
            hsa: Any = services_pb2_grpc.CoordinatorStub(hsa_channel)  # type: ignore[no-untyped-call]
            for _ in range(2 * burst):
                states = hsa.GetStatesAfter(
                    services_pb2.StatesAfterRequest(after_version=0), timeout=DEADLINE
                )
                assert SealedState.from_message(states.states[0]).version == 1
                hsa.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
                hsa.ListHsas(services_pb2.ListHsasRequest(), timeout=DEADLINE)
            hsa.RegisterHsa(
                services_pb2.RegisterHsaRequest(host_id="hsa-1", address="127.0.0.1:9"),
                timeout=DEADLINE,
            )
            with pytest.raises(grpc.RpcError) as missing:
                hsa.GetKey(services_pb2.GetKeyRequest(key_id="k"), timeout=DEADLINE)
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        # The quorum flow's calls are charged too; after the wait the refusal named, the
        # operator port answers again.
        submit = answered(
            lambda: stub.SubmitProposal(services_pb2.SubmitProposalRequest(), timeout=DEADLINE),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert hammer([submit], until_refused=True).refused == 1
        time.sleep(int(match.group(1)) + 0.1)
        state = stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=DEADLINE)
        assert SealedState.from_message(state).version == 1
    assert "Traceback" not in coordinator.log()


def watch(stub: Any) -> Any:
    """A WatchStates stream that has delivered genesis (so the coordinator holds it open)."""
    stream = stub.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=30)
    assert SealedState.from_message(next(stream)).version == 1
    return stream


def ended_with(stream: Any, timeout: float = 5.0) -> grpc.RpcError | None:
    """How the stream ended, if it does within `timeout` (nothing more arrives before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not stream.is_active():
            try:
                next(stream)
            except grpc.RpcError as error:
                return error
            raise AssertionError("the stream delivered a state nobody produced")
        time.sleep(0.05)
    return None


def test_one_host_cannot_take_every_watch_stream(
    domain: Domain, coordinator: CoordinatorProcess
) -> None:
    streams: list[Any] = []
    with (
        mtls_channel(
            coordinator.address, domain.tls("hsa", "hsa-1"), COORDINATOR
        ) as greedy_channel,
        mtls_channel(coordinator.address, domain.tls("hsa", "hsa-2"), COORDINATOR) as other_channel,
    ):
        greedy: Any = services_pb2_grpc.CoordinatorStub(greedy_channel)  # type: ignore[no-untyped-call]
        other: Any = services_pb2_grpc.CoordinatorStub(other_channel)  # type: ignore[no-untyped-call]
        try:
            # More streams than the coordinator's global cap (64), all from hsa-1.
            for _ in range(70):
                streams.append(watch(greedy))
            # hsa-1 holds two of them; every older one was replaced by a newer one.
            oldest = ended_with(streams[0])
            assert oldest is not None
            assert oldest.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert oldest.details() == (
                "this WatchStates stream of hsa-1 was replaced by a newer one: a host holds at "
                "most 2"
            )
            assert all(ended_with(s, timeout=0.2) is not None for s in streams[1:-2])
            assert ended_with(streams[-2], timeout=1.0) is None
            assert ended_with(streams[-1], timeout=0.2) is None
            # Another HSA still follows the chain.
            streams.append(watch(other))
            assert ended_with(streams[-1], timeout=0.5) is None
        finally:
            for stream in streams:
                stream.cancel()
    assert coordinator.log().count("its oldest one is replaced") == 68
