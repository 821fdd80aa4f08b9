"""The key client's session errors read as a unary call's would (`kms_client._session`), so
that the retry rules (`kms_client._retry`) decide a session call exactly as a unary one."""

from __future__ import annotations

import grpc
import pytest

from domain_edge.kms_client._retry import retryable
from domain_edge.kms_client._session import SESSION_FIELDS, SessionCallError
from domain_edge.transport import nothing_applied
from domain_proto import services_pb2

pytestmark = pytest.mark.unit


def test_a_session_error_carries_the_status_and_the_nothing_applied_mark() -> None:
    marked = SessionCallError(grpc.StatusCode.UNAVAILABLE, "catching up", nothing_applied=True)
    assert (marked.code(), marked.details()) == (grpc.StatusCode.UNAVAILABLE, "catching up")
    assert nothing_applied(marked)
    plain = SessionCallError(grpc.StatusCode.INVALID_ARGUMENT, "invalid ciphertext")
    assert not nothing_applied(plain)


@pytest.mark.parametrize(
    ("code", "again"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
    ],
)
def test_session_calls_are_retried_as_their_unary_calls_are(
    code: grpc.StatusCode, again: bool
) -> None:
    error = SessionCallError(code, "answer")
    for method in SESSION_FIELDS:
        assert retryable(method, error.code(), error.details()) is again


def test_every_session_field_is_a_call_of_the_session_request() -> None:
    fields = {f.name for f in services_pb2.SessionRequest.DESCRIPTOR.oneofs_by_name["call"].fields}
    assert set(SESSION_FIELDS.values()) == fields
    results = {
        f.name for f in services_pb2.SessionResponse.DESCRIPTOR.oneofs_by_name["result"].fields
    }
    assert results == fields
