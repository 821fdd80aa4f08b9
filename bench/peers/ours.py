"""Our key service as a peer: Encrypt/Decrypt of 1 KiB against a 1-node local domain, two ways.

`OurDomain` starts a coordinator and one HSA as real processes (`deploy.init` +
`deploy.cluster`, through `bench._cluster.BenchDomain`), creates one key through
`KeyService.CreateKey` as the demo application, and offers asyncio clients on one mutual-TLS
`grpc.aio` channel (the same credentials and limits as production clients), no retry layer:

- `ours` (`OurDomain` itself): every call over one key-service session
  (`KeyService.Session` through `bench._sessions.AioSession`, calls matched by request id);
  its floor `echo` is `Diagnostics.EchoSession` of the same 1 KiB (`AioEchoSession`), the same
  session machinery doing no work;
- `ours_unary` (`OurDomain.unary()`, a second peer over the same running domain): the unary
  stubs (`KeyService.Encrypt` / `Decrypt`); its floor `echo` is the unary `Diagnostics.Echo`.

Both are measured against the same server processes in the same rounds, so the session's gain
is the ratio of the two. The audit log is always on: every call appends a record to the HSA's
`audit.log`, and the figures include that cost.

Invariants: the domain is always stopped when the `with` block ends (BenchDomain's rules);
server CPU is the HSA process tree's (the coordinator serves no Encrypt/Decrypt once the key
is cached, and its own CPU is reported apart by the runner so that this stays visible); a
session stream is opened only by the first call that needs it, so an idle stream holds no
server threads during another operation's cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import grpc

from bench._cluster import BenchDomain
from bench._core import BenchError
from bench._load import aio_mtls_channel
from bench._sessions import AioEchoSession, AioSession
from bench.peers._common import CALL_TIMEOUT, PAYLOAD_BYTES, OpCall
from deploy.init import COORDINATOR_NAME
from domain_edge.audit import AUDIT_LOG_FILE
from domain_edge.config import NodeConfig
from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["FLOOR_OPERATION", "OURS", "OURS_UNARY", "OurDomain", "OurUnary"]

# The floor of each of our peers, measured in the same rounds: Diagnostics.EchoSession for
# `ours` (sessions), Diagnostics.Echo for `ours_unary`; the same server stack doing no work.
FLOOR_OPERATION: Final = "echo"
OURS: Final = "ours"
OURS_UNARY: Final = "ours_unary"

_DESCRIPTION: Final = "benchmark key for side-by-side runs"
_STACK: Final = "KeyService on 1 HSA, mutual TLS 1.3, audit log on; grpc.aio, one channel"

_Opened = TypeVar("_Opened")


class _Lazy(Generic[_Opened]):
    """A stream opened by the first caller that needs it (the others wait for it), closed
    with `stack`."""

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        opener: Callable[[], AbstractAsyncContextManager[_Opened]],
    ) -> None:
        self._stack = stack
        self._opener = opener
        self._opened: _Opened | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> _Opened:
        """The open stream."""
        if self._opened is None:
            async with self._lock:
                if self._opened is None:
                    self._opened = await self._stack.enter_async_context(self._opener())
        return self._opened


class OurDomain:
    """A 1-node domain with one key; as a peer, `ours` (sessions). Always stopped."""

    label: Final = OURS

    def __init__(self, directory: Path) -> None:
        self.domain = BenchDomain(Path(directory), nodes=1)
        self.key_id = ""
        self.host = ""

    @property
    def description(self) -> str:
        """What runs, for the report."""
        return f"{_STACK}, every call over one key-service session (KeyService.Session)"

    def unary(self) -> OurUnary:
        """The same running domain as the peer `ours_unary` (unary stubs)."""
        return OurUnary(self)

    def server_pids(self) -> list[int]:
        """The HSA process."""
        return [self.domain.pid(self.host)]

    def coordinator_pid(self) -> int:
        """The coordinator process (reported apart: it should do nothing per call)."""
        return self.domain.pid(COORDINATOR_NAME)

    def audit_log(self) -> Path:
        """The HSA's audit log."""
        config = NodeConfig.load(self.domain.layout.node_configs[self.host])
        return config.path(config.data_dir) / AUDIT_LOG_FILE

    def __enter__(self) -> OurDomain:
        self.domain.start()
        try:
            self.host = self.domain.hosts[0]
            with self.domain.node_channel(self.host) as channel:
                stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
                created = stub.CreateKey(
                    services_pb2.CreateKeyRequest(description=_DESCRIPTION),
                    timeout=CALL_TIMEOUT,
                )
                self.key_id = str(created.metadata.key_id)
        except BaseException:
            self.domain.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.domain.stop()

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[grpc.aio.Channel]:
        """One grpc.aio mutual-TLS channel to the HSA (closed at the end)."""
        channel = aio_mtls_channel(self.domain.address(self.host), self.domain.client_tls())
        try:
            yield channel
        finally:
            await channel.close(None)

    def requests(self) -> tuple[bytes, services_pb2.EncryptRequest]:
        """A fresh 1 KiB plaintext and the Encrypt request of it."""
        plaintext = os.urandom(PAYLOAD_BYTES)
        return plaintext, services_pb2.EncryptRequest(key_id=self.key_id, plaintext=plaintext)

    @contextlib.asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        """Every caller's calls over one session on one channel: encrypt, decrypt, and `echo`
        (Diagnostics.EchoSession of the same 1 KiB: the session machinery doing no work)."""
        del concurrency  # one stream carries every caller's calls
        async with self.channel() as channel, contextlib.AsyncExitStack() as stack:
            plaintext, encrypt_request = self.requests()
            sessions = _Lazy(stack, lambda: AioSession(channel).open())
            echoes = _Lazy(stack, lambda: AioEchoSession(channel).open())
            session = await sessions.get()
            first = await session.call("encrypt", encrypt_request, CALL_TIMEOUT)
            decrypt_request = services_pb2.DecryptRequest(ciphertext_blob=first.ciphertext_blob)
            check = await session.call("decrypt", decrypt_request, CALL_TIMEOUT)
            _check_plaintext(check.plaintext, plaintext)

            async def encrypt() -> object:
                return await session.call("encrypt", encrypt_request, CALL_TIMEOUT)

            async def decrypt() -> object:
                return await session.call("decrypt", decrypt_request, CALL_TIMEOUT)

            async def echo() -> object:
                return await (await echoes.get()).echo(plaintext, CALL_TIMEOUT)

            yield {"encrypt": encrypt, "decrypt": decrypt, FLOOR_OPERATION: echo}


class OurUnary:
    """The peer `ours_unary`: the running `OurDomain` called through unary stubs."""

    label: Final = OURS_UNARY

    def __init__(self, ours: OurDomain) -> None:
        self.ours = ours

    @property
    def description(self) -> str:
        """What runs, for the report."""
        return f"{_STACK}, unary calls (the same domain as hsm-domain's session cells)"

    def server_pids(self) -> list[int]:
        """The HSA process (the one `ours` measures)."""
        return self.ours.server_pids()

    @contextlib.asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        """Unary stubs on one channel shared by every caller: encrypt, decrypt, and `echo`
        (Diagnostics.Echo of the same 1 KiB: the same server stack doing no work)."""
        del concurrency  # one HTTP/2 channel multiplexes every caller
        async with self.ours.channel() as channel:
            stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
            plaintext, encrypt_request = self.ours.requests()
            first = await stub.Encrypt(encrypt_request, timeout=CALL_TIMEOUT)
            decrypt_request = services_pb2.DecryptRequest(ciphertext_blob=first.ciphertext_blob)
            check = await stub.Decrypt(decrypt_request, timeout=CALL_TIMEOUT)
            _check_plaintext(check.plaintext, plaintext)
            diagnostics: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
            echo_request = services_pb2.EchoMessage(payload=plaintext)

            async def encrypt() -> object:
                return await stub.Encrypt(encrypt_request, timeout=CALL_TIMEOUT)

            async def decrypt() -> object:
                return await stub.Decrypt(decrypt_request, timeout=CALL_TIMEOUT)

            async def echo() -> object:
                return await diagnostics.Echo(echo_request, timeout=CALL_TIMEOUT)

            yield {"encrypt": encrypt, "decrypt": decrypt, FLOOR_OPERATION: echo}


def _check_plaintext(returned: bytes, sent: bytes) -> None:
    if not hmac.compare_digest(returned, sent):
        raise BenchError("ours: Decrypt did not return the plaintext")
