"""Request-rate quotas of the key service (`hsa_node.quotas`): a bucket per principal and class
of operation, each HSA process holding its share of the domain's figures, refusals that carry
their retry delay, and the delay as the transport sends it (trailing metadata, session field)."""

from __future__ import annotations

import grpc
import pytest

from domain_core.errors import ThrottledError
from domain_core.limits import MAX_RETRY_AFTER_MS, Limits
from domain_edge.kms_client._session import SessionCallError
from domain_edge.transport import (
    NOTHING_APPLIED_KEY,
    RETRY_AFTER_KEY,
    nothing_applied,
    retry_after,
)
from domain_edge.transport._channels import error_metadata
from domain_proto import services_pb2
from hsa_node.quotas import QUOTA_CLASSES, Quotas

pytestmark = pytest.mark.unit

ALICE = "spiffe://local/client/alice"
BOB = "spiffe://local/client/bob"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_key_service_call_has_a_class() -> None:
    methods = {m.name for m in services_pb2.DESCRIPTOR.services_by_name["KeyService"].methods}
    assert set(QUOTA_CLASSES) == methods - {"Session"}  # a session's calls count as unary


def test_a_principal_over_its_quota_is_refused_with_its_retry_delay_and_others_are_not() -> None:
    clock = Clock()
    quotas = Quotas(Limits(crypto_requests_per_second=4, crypto_request_burst=2), clock=clock)
    quotas.admit(ALICE, "Encrypt")
    quotas.admit(ALICE, "Decrypt")  # one bucket for every cryptographic operation
    with pytest.raises(ThrottledError, match="over its quota of cryptographic operations") as got:
        quotas.admit(ALICE, "GenerateDataKey")
    assert got.value.retry_after == pytest.approx(0.25)
    assert got.value.nothing_applied
    quotas.admit(BOB, "Encrypt")  # another principal, the same moment
    quotas.admit(ALICE, "DescribeKey")  # another class
    clock.now += 0.25
    quotas.admit(ALICE, "Encrypt")  # a token came back
    with pytest.raises(ThrottledError):
        quotas.admit(ALICE, "Encrypt")


def test_each_process_enforces_its_share_and_the_share_follows_the_domain() -> None:
    clock = Clock()
    processes = [3]
    limits = Limits(
        admin_requests_per_second=30,
        admin_request_burst=6,
        create_key_per_second=5,
        create_key_burst=5,
    )
    quotas = Quotas(limits, lambda: processes[0], clock=clock)
    assert (quotas.bucket("RotateKey").rate, quotas.bucket("RotateKey").burst) == (10.0, 2)
    for _ in range(2):
        quotas.admit(ALICE, "EnableKey")
    with pytest.raises(ThrottledError, match=r"10 per second on this HSA"):
        quotas.admit(ALICE, "DisableKey")
    # Key creation keeps a bucket per process, not a share.
    assert (quotas.bucket("CreateKey").rate, quotas.bucket("CreateKey").burst) == (5.0, 5)
    for _ in range(5):
        quotas.admit(ALICE, "CreateKey")
    with pytest.raises(ThrottledError, match=r"may create at most 5 keys per second"):
        quotas.admit(ALICE, "CreateKey")
    processes[0] = 1  # the domain shrank: after the next re-share, the whole quota here
    clock.now += 1.0
    assert quotas.bucket("RotateKey").burst == 2  # (re-divided at most every 5 s)
    clock.now += 5.0
    assert (quotas.bucket("RotateKey").rate, quotas.bucket("RotateKey").burst) == (30.0, 6)


def test_a_tiny_share_keeps_one_token_of_burst() -> None:
    quotas = Quotas(Limits(list_requests_per_second=2, list_request_burst=2), lambda: 9)
    assert quotas.bucket("ListKeys").burst == 1
    assert quotas.bucket("ListKeys").rate == pytest.approx(2 / 9)


def test_the_retry_delay_travels_as_metadata_and_in_a_session_answer() -> None:
    throttled = ThrottledError("over", 0.1234)
    assert error_metadata(throttled) == ((NOTHING_APPLIED_KEY, "true"), (RETRY_AFTER_KEY, "123"))
    assert error_metadata(ThrottledError("over", 3600)) == (
        (NOTHING_APPLIED_KEY, "true"),
        (RETRY_AFTER_KEY, str(MAX_RETRY_AFTER_MS)),
    )
    answer = services_pb2.SessionResponse(
        request_id=1,
        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        message="over",
        nothing_applied=True,
        retry_after_ms=250,
    )
    error = SessionCallError.of_answer(answer)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert nothing_applied(error)
    assert retry_after(error) == 0.25
    # A server's delay is believed up to a minute, and only as whole milliseconds.
    for value, read in (("999999999", MAX_RETRY_AFTER_MS / 1000), ("-5", None), ("1e3", None)):
        odd = SessionCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "over")
        odd.trailing_metadata = lambda v=value: ((RETRY_AFTER_KEY, v),)  # type: ignore[method-assign]
        assert retry_after(odd) == read
