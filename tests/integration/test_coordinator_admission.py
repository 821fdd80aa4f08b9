"""Every method of a running coordinator admits its caller before it looks at the request.

The servicer's methods are built from `_admission.RULES`, so none can skip the admission.
Shown against a coordinator in this process (real ports, real TLS): once the quota of the
operator port's address is spent, every method of the Coordinator service, whatever its
request (here an empty one, which most methods would refuse as INVALID_ARGUMENT), answers
RESOURCE_EXHAUSTED from the quota, HSA-only methods included (their refusal is charged too).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from test_coordinator import Domain, make_domain

from domain_coordinator.server import CoordinatorServer
from domain_edge.config import CoordinatorConfig
from domain_edge.transport import COORDINATOR, secure_channel
from domain_proto import services_pb2

pytestmark = pytest.mark.integration

DEADLINE = 10.0
SERVICE = services_pb2.DESCRIPTOR.services_by_name["Coordinator"]
REFUSED = re.compile(r"too many calls to the coordinator from 127\.0\.0\.1: .*; retry in \d+ s")


@dataclass
class Running:
    domain: Domain
    operator_address: str


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A coordinator whose quota holds one call per address (and refills very slowly)."""
    domain = make_domain(tmp_path / "d")
    config = CoordinatorConfig.load(domain.layout.coordinator_config)
    limits = dataclasses.replace(
        config.effective_limits(), coordinator_read_burst=1, coordinator_reads_per_second=0.001
    )
    coordinator = CoordinatorServer(config, limits=limits, sweep_interval=3600.0)
    addresses = coordinator.start()
    try:
        yield Running(domain, addresses.operator_address)
    finally:
        coordinator.stop()


def _call(channel: grpc.Channel, method: Any) -> None:
    """Call `method` of the Coordinator service with an empty request (reading the first
    answer of a stream)."""
    request = message_factory.GetMessageClass(method.input_type)()
    path = f"/{SERVICE.full_name}/{method.name}"
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=type(request).SerializeToString)
        next(iter(stream(request, timeout=DEADLINE)))
    else:
        unary = channel.unary_unary(path, request_serializer=type(request).SerializeToString)
        unary(request, timeout=DEADLINE)


def test_every_method_admits_its_caller_before_anything_else(running: Running) -> None:
    answers: dict[str, tuple[grpc.StatusCode | None, str]] = {}
    with secure_channel(running.operator_address, running.domain.ca_pem, COORDINATOR) as channel:
        get_latest = next(m for m in SERVICE.methods if m.name == "GetLatestState")
        _call(channel, get_latest)  # the one call the bucket holds
        for method in SERVICE.methods:
            with pytest.raises(grpc.RpcError) as refused:
                _call(channel, method)
            answers[method.name] = (refused.value.code(), str(refused.value.details()))
    assert sorted(answers) == sorted(m.name for m in SERVICE.methods)
    for name, (code, details) in answers.items():
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code, details)
        assert REFUSED.fullmatch(details), (name, details)
