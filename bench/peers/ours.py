"""Our key service as a peer: Encrypt/Decrypt of 1 KiB against a 1-node local domain.

`OurDomain` starts a coordinator and one HSA as real processes (`deploy.init` +
`deploy.cluster`, through `bench._cluster.BenchDomain`), creates one key through
`KeyService.CreateKey` as the demo application, and offers an asyncio client: raw
`grpc.aio` stubs on one mutual-TLS channel (the same credentials and limits as production
clients), no retry layer. The audit log is always on: every call appends a record to the
HSA's `audit.log`, and the figures include that cost.

Invariants: the domain is always stopped when the `with` block ends (BenchDomain's rules);
server CPU is the HSA process tree's (the coordinator serves no Encrypt/Decrypt once the key
is cached, and its own CPU is reported apart by the runner so that this stays visible).
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from bench._cluster import BenchDomain
from bench._core import BenchError
from bench._load import aio_mtls_channel
from bench.peers._common import CALL_TIMEOUT, PAYLOAD_BYTES, OpCall
from deploy.init import COORDINATOR_NAME
from domain_edge.audit import AUDIT_LOG_FILE
from domain_edge.config import NodeConfig
from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["FLOOR_OPERATION", "OurDomain"]

# Diagnostics.Echo through the same server stack: what any call costs before any key work.
FLOOR_OPERATION: Final = "echo"

_DESCRIPTION: Final = "benchmark key for side-by-side runs"


class OurDomain:
    """A 1-node domain with one key; `label` is `ours` (always stopped)."""

    label: Final = "ours"

    def __init__(self, directory: Path) -> None:
        self.domain = BenchDomain(Path(directory), nodes=1)
        self.key_id = ""
        self.host = ""

    @property
    def description(self) -> str:
        """What runs, for the report."""
        return "KeyService on 1 HSA, mutual TLS 1.3, audit log on; grpc.aio, one channel"

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
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        """One grpc.aio mutual-TLS channel shared by every caller: encrypt, decrypt, and
        `echo` (Diagnostics.Echo of the same 1 KiB: the same server stack doing no work)."""
        del concurrency  # one HTTP/2 channel multiplexes every caller
        channel = aio_mtls_channel(self.domain.address(self.host), self.domain.client_tls())
        try:
            stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
            plaintext = os.urandom(PAYLOAD_BYTES)
            encrypt_request = services_pb2.EncryptRequest(key_id=self.key_id, plaintext=plaintext)
            first = await stub.Encrypt(encrypt_request, timeout=CALL_TIMEOUT)
            decrypt_request = services_pb2.DecryptRequest(ciphertext_blob=first.ciphertext_blob)
            check = await stub.Decrypt(decrypt_request, timeout=CALL_TIMEOUT)
            if not hmac.compare_digest(check.plaintext, plaintext):
                raise BenchError("ours: Decrypt did not return the plaintext")

            async def encrypt() -> object:
                return await stub.Encrypt(encrypt_request, timeout=CALL_TIMEOUT)

            async def decrypt() -> object:
                return await stub.Decrypt(decrypt_request, timeout=CALL_TIMEOUT)

            diagnostics: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
            echo_request = services_pb2.EchoMessage(payload=plaintext)

            async def echo() -> object:
                return await diagnostics.Echo(echo_request, timeout=CALL_TIMEOUT)

            yield {"encrypt": encrypt, "decrypt": decrypt, FLOOR_OPERATION: echo}
        finally:
            await channel.close(None)
