"""A server that is not what its clients want: `ImpostorServer`.

A real gRPC server (mutual TLS, in this process) that speaks one of the domain's services
with whatever certificate it is given (the coordinator's, a client's, another domain's
HSA's) and records every request that reaches its servicer. The attack it stands for: an
address that a client believes is an HSA (a stale endpoint list, a DNS answer, a port taken
over) is served by someone holding another certificate of the domain. The defence is that the
client's TLS handshake refuses the server, so `seen` stays empty.
"""

from __future__ import annotations

import threading
from concurrent import futures
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf import message_factory

from domain_edge.transport import TlsMaterial, server_credentials
from domain_proto import services_pb2

__all__ = ["ImpostorServer"]


class ImpostorServer:
    """Serves every method of `service` (default KeyService) under `tls`; each call that
    reaches the servicer is recorded in `seen` as (method, request bytes) and answered with
    an empty response."""

    def __init__(self, tls: TlsMaterial, service: str = "KeyService") -> None:
        self.seen: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        descriptor = services_pb2.DESCRIPTOR.services_by_name[service]
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in descriptor.methods:
            response_class = message_factory.GetMessageClass(method.output_type)
            if method.server_streaming:
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._stream(method.name)
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(method.name, response_class().SerializeToString())
                )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(descriptor.full_name, handlers),)
        )
        self.port = self._server.add_secure_port("127.0.0.1:0", server_credentials(tls))
        self.address = f"127.0.0.1:{self.port}"

    def _record(self, method: str, request: bytes) -> None:
        with self._lock:
            self.seen.append((method, request))

    def _unary(self, method: str, answer: bytes) -> Any:
        def behave(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._record(method, request)
            return answer

        return behave

    def _stream(self, method: str) -> Any:
        def behave(request: bytes, context: grpc.ServicerContext) -> Any:
            self._record(method, request)
            return iter(())

        return behave

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
