"""domain_edge.transport.ErrorMappingInterceptor: one status per error, wrapped handlers reused.

The interceptor runs for every call; it keeps the wrapped handler of a method with the very
handler object it wraps, so these tests check that it is reused only for that object, and
that a reused wrapper still maps errors exactly as a fresh one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from domain_core.errors import NotFoundError, PermissionDeniedError
from domain_edge.transport import ErrorMappingInterceptor
from domain_proto import services_pb2

pytestmark = pytest.mark.unit

METHOD = "/hsmdomain.v1.Diagnostics/Echo"


@dataclass(frozen=True)
class Details:
    """The part of grpc.HandlerCallDetails the interceptor reads."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class Aborted(Exception):
    """What context.abort raises here (gRPC raises a bare Exception)."""


class FakeContext:
    """Records the status a call is aborted with."""

    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)

    def code(self) -> grpc.StatusCode | None:
        return self.status[0] if self.status else None


def unary(behavior: Any) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=services_pb2.EchoMessage.FromString,
        response_serializer=services_pb2.EchoMessage.SerializeToString,
    )


def refuse(request: Any, context: Any) -> Any:
    raise PermissionDeniedError("principal x may not echo")


def test_the_wrapped_handler_is_reused_for_the_same_handler_only() -> None:
    interceptor = ErrorMappingInterceptor()
    handler = unary(lambda request, context: request)
    first = interceptor.intercept_service(lambda _: handler, Details(METHOD))
    again = interceptor.intercept_service(lambda _: handler, Details(METHOD))
    assert first is not None
    assert first is again
    replaced = unary(refuse)
    other = interceptor.intercept_service(lambda _: replaced, Details(METHOD))
    assert other is not None
    assert other is not first
    # The new handler's behaviour, not the remembered one, answers.
    context = FakeContext()
    with pytest.raises(Aborted):
        other.unary_unary(services_pb2.EchoMessage(payload=b"x"), context)
    assert context.status == (grpc.StatusCode.PERMISSION_DENIED, "principal x may not echo")
    assert interceptor.intercept_service(lambda _: None, Details(METHOD)) is None


def test_a_reused_wrapper_maps_errors_on_every_call() -> None:
    interceptor = ErrorMappingInterceptor()
    calls = iter([b"ok", NotFoundError("key k does not exist"), RuntimeError("secret detail")])

    def behavior(request: Any, context: Any) -> Any:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return services_pb2.EchoMessage(payload=outcome)

    handler = unary(behavior)
    wrapped = [interceptor.intercept_service(lambda _: handler, Details(METHOD)) for _ in range(3)]
    assert wrapped[0] is wrapped[1] is wrapped[2]
    request = services_pb2.EchoMessage(payload=b"x")
    method = wrapped[0].unary_unary  # type: ignore[union-attr]
    assert method(request, FakeContext()).payload == b"ok"
    statuses = []
    for _ in range(2):
        context = FakeContext()
        with pytest.raises(Aborted):
            method(request, context)
        statuses.append(context.status)
    assert statuses == [
        (grpc.StatusCode.NOT_FOUND, "key k does not exist"),
        (grpc.StatusCode.INTERNAL, "internal error; the server logged the details"),
    ]
    # A body that does not parse is INVALID_ARGUMENT, through the remembered deserializer too.
    parse = wrapped[2].request_deserializer  # type: ignore[union-attr]
    context = FakeContext()
    with pytest.raises(Aborted):
        method(parse(b"\xff\xff\xff"), context)
    assert context.status is not None
    assert context.status[0] is grpc.StatusCode.INVALID_ARGUMENT


def test_streaming_handlers_are_wrapped_and_reused() -> None:
    interceptor = ErrorMappingInterceptor()

    def stream(request: Any, context: Any) -> Iterator[Any]:
        yield request
        raise PermissionDeniedError("no more")

    handler = grpc.unary_stream_rpc_method_handler(
        stream,
        request_deserializer=services_pb2.EchoMessage.FromString,
        response_serializer=services_pb2.EchoMessage.SerializeToString,
    )
    first = interceptor.intercept_service(lambda _: handler, Details("/s/Stream"))
    assert first is interceptor.intercept_service(lambda _: handler, Details("/s/Stream"))
    context = FakeContext()
    responses = first.unary_stream(services_pb2.EchoMessage(payload=b"x"), context)  # type: ignore[union-attr]
    assert next(responses).payload == b"x"
    with pytest.raises(Aborted):
        next(responses)
    assert context.status == (grpc.StatusCode.PERMISSION_DENIED, "no more")
