"""Scripted key services: real gRPC servers with mutual TLS in the test's process that really
encrypt (so envelopes and the CLI run end to end), count calls, and fail on a script, for the
key clients' retry and fail-over tests (`KeyClient`, `AsyncKeyClient`). They serve no
sessions (`KeyService.Session` is UNIMPLEMENTED), so clients fall back to unary calls here;
sessions are tested against real HSA processes (tests/cluster/test_key_sessions.py)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from domain_core import ciphertext, crypto
from domain_core.errors import InvalidCiphertextError
from domain_core.pki import DomainCA, SpiffeId
from domain_edge.kms_client import AsyncKeyClient, KeyClient
from domain_edge.transport import TlsMaterial, make_server, server_credentials
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

Code = grpc.StatusCode
T = TypeVar("T")


@dataclass
class Keys:
    """Backing keys shared by the scripted services, as the real HSAs share key tokens."""

    backing: dict[str, bytes] = field(default_factory=dict)

    def create(self) -> str:
        key_id = ciphertext.new_key_id()
        self.backing[key_id] = crypto.new_aes_key()
        return key_id


Action = tuple[Any, ...]


class ScriptedKeyService(services_pb2_grpc.KeyServiceServicer):
    """A key service that really encrypts, counts calls, and follows a script of failures:
    `script[method]` is a list of ("abort", code, details), ("raise", domain error) or
    ("sleep", seconds) actions, taken one per call before the call is served. It runs under
    the transport's error-mapping interceptor, as an HSA's servicers do."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.calls: Counter[str] = Counter()
        self.idempotency_keys: list[str] = []  # of every CreateKey, in arrival order
        self.script: dict[str, list[Action]] = {}
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            actions = self.script.get(method) or []
            action = actions.pop(0) if actions else None
        self.entered.set()
        if action is None:
            return
        if action[0] == "sleep":
            time.sleep(action[1])
        elif action[0] == "abort":
            context.abort(action[1], action[2])
        elif action[0] == "raise":
            raise action[1]

    def _backing(self, key_id: str, context: grpc.ServicerContext) -> bytes:
        if key_id not in self.keys.backing:
            context.abort(Code.NOT_FOUND, f"key {key_id} does not exist")
        return self.keys.backing[key_id]

    @staticmethod
    def _metadata(key_id: str) -> services_pb2.KeyMetadataResponse:
        return services_pb2.KeyMetadataResponse(
            metadata=keys_pb2.KeyMetadata(
                key_id=key_id,
                state=keys_pb2.KEY_STATE_ENABLED,
                current_backing_version=1,
                policy=keys_pb2.KeyPolicy(
                    grants=[
                        keys_pb2.PolicyGrant(
                            principals=["spiffe://local/client/demo-app"],
                            operations=[keys_pb2.KEY_OPERATION_ADMIN],
                        )
                    ]
                ),
            )
        )

    def CreateKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.idempotency_keys.append(request.idempotency_key)
        self._enter("CreateKey", context)
        return self._metadata(self.keys.create())

    def DescribeKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("DescribeKey", context)
        self._backing(request.key_id, context)
        return self._metadata(request.key_id)

    def ListKeys(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ListKeys", context)
        ids = sorted(self.keys.backing)
        start = int(request.page_token or 0)
        page = ids[start : start + request.limit]
        more = start + request.limit < len(ids)
        return services_pb2.ListKeysResponse(
            keys=[self._metadata(i).metadata for i in page],
            next_page_token=str(start + request.limit) if more else "",
        )

    def Encrypt(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Encrypt", context)
        backing = self._backing(request.key_id, context)
        blob = ciphertext.encrypt(
            backing, request.key_id, 1, request.plaintext, dict(request.encryption_context)
        )
        return services_pb2.EncryptResponse(key_id=request.key_id, ciphertext_blob=blob)

    def _open(self, blob: bytes, context_map: Any, context: grpc.ServicerContext) -> bytes:
        try:
            header = ciphertext.parse_header(blob)
            backing = self.keys.backing.get(header.key_id, bytes(32))
            return ciphertext.decrypt(backing, blob, dict(context_map))
        except InvalidCiphertextError:
            context.abort(Code.INVALID_ARGUMENT, "invalid ciphertext")
            raise

    def Decrypt(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("Decrypt", context)
        plaintext = self._open(request.ciphertext_blob, request.encryption_context, context)
        key_id = ciphertext.parse_header(request.ciphertext_blob).key_id
        if request.key_id and request.key_id != key_id:
            context.abort(Code.INVALID_ARGUMENT, "the ciphertext is for another key")
        return services_pb2.DecryptResponse(key_id=key_id, plaintext=plaintext)

    def ReEncrypt(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("ReEncrypt", context)
        plaintext = self._open(request.ciphertext_blob, request.source_encryption_context, context)
        backing = self._backing(request.destination_key_id, context)
        blob = ciphertext.encrypt(
            backing,
            request.destination_key_id,
            1,
            plaintext,
            dict(request.destination_encryption_context),
        )
        return services_pb2.ReEncryptResponse(
            key_id=request.destination_key_id, ciphertext_blob=blob
        )

    def _data_key(self, request: Any, context: grpc.ServicerContext, plain: bool) -> Any:
        backing = self._backing(request.key_id, context)
        data_key = crypto.random_bytes(request.number_of_bytes or 32)
        blob = ciphertext.encrypt(
            backing, request.key_id, 1, data_key, dict(request.encryption_context)
        )
        return services_pb2.GenerateDataKeyResponse(
            key_id=request.key_id, plaintext=data_key if plain else b"", ciphertext_blob=blob
        )

    def GenerateDataKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GenerateDataKey", context)
        return self._data_key(request, context, plain=True)

    def GenerateDataKeyWithoutPlaintext(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GenerateDataKeyWithoutPlaintext", context)
        return self._data_key(request, context, plain=False)

    def GenerateRandom(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GenerateRandom", context)
        return services_pb2.GenerateRandomResponse(
            random=crypto.random_bytes(request.number_of_bytes)
        )

    def _admin(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter(method, context)
        self._backing(request.key_id, context)
        return self._metadata(request.key_id)

    def RotateKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("RotateKey", request, context)

    def PutKeyPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("PutKeyPolicy", request, context)

    def EnableKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("EnableKey", request, context)

    def DisableKey(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("DisableKey", request, context)

    def ScheduleKeyDeletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("ScheduleKeyDeletion", request, context)

    def CancelKeyDeletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("CancelKeyDeletion", request, context)

    def ImportKeyMaterial(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("ImportKeyMaterial", request, context)

    def DeleteImportedKeyMaterial(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("DeleteImportedKeyMaterial", request, context)

    def CreateGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._admin("CreateGrant", request, context)
        return services_pb2.CreateGrantResponse(grant_id="ab" * 32, grant_token=b"token")

    def RetireGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("RetireGrant", request, context)

    def RevokeGrant(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("RevokeGrant", request, context)

    def TagResource(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("TagResource", request, context)

    def UntagResource(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._admin("UntagResource", request, context)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Pki:
    ca_pem: bytes
    server: TlsMaterial
    client: TlsMaterial


def make_pki() -> Pki:
    """A domain CA, an HSA's TLS material and the demo application's."""
    now = datetime.now(UTC)
    ca = DomainCA.create("local", now=now)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server_cert = ca.issue(SpiffeId("local", "hsa", "hsa-1"), server_key.public_key(), now=now)
    client_cert = ca.issue(
        SpiffeId("local", "client", "demo-app"), client_key.public_key(), now=now
    )
    return Pki(
        ca_pem=ca.certificate_pem,
        server=TlsMaterial(ca.certificate_pem, server_cert, _pem(server_key)),
        client=TlsMaterial(ca.certificate_pem, client_cert, _pem(client_key)),
    )


class BlockingAsyncKeyClient:
    """An `AsyncKeyClient` driven from blocking test code: its coroutines run on an event loop
    in a thread of its own (so several test threads may call at once), and its async
    iterators come back as lists; the `KeyClient` tests run unchanged against it."""

    def __init__(self, make: Callable[[], AsyncKeyClient]) -> None:
        self._client: AsyncKeyClient | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def made() -> AsyncKeyClient:
            return make()  # inside the loop: its grpc.aio channels belong to it

        try:
            self._client = self._wait(made())
        except BaseException:
            self.shutdown()
            raise

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)  # (never reached for _client: set first)
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self._wait(value(*args, **kwargs))
        if inspect.isasyncgenfunction(value):

            async def collect(*args: Any, **kwargs: Any) -> list[Any]:
                return [item async for item in value(*args, **kwargs)]

            return lambda *args, **kwargs: iter(self._wait(collect(*args, **kwargs)))
        return value

    def __enter__(self) -> BlockingAsyncKeyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client (later calls fail as a closed client's do)."""
        if self._client is not None:
            self._wait(self._client.close())

    def shutdown(self) -> None:
        """Close the client and stop its loop."""
        if self._loop.is_running():
            self.close()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


@dataclass
class Domain:
    """Scripted HSAs (`services[i]` at `addresses[i]`), and clients of them: `KeyClient`s,
    or `AsyncKeyClient`s behind `BlockingAsyncKeyClient` when `use_asyncio` is set."""

    pki: Pki
    pem_dir: Path
    use_asyncio: bool = False
    keys: Keys = field(default_factory=Keys)
    services: list[ScriptedKeyService] = field(default_factory=list)
    servers: list[grpc.Server] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)

    def start(self, count: int) -> None:
        for _ in range(count):
            service = ScriptedKeyService(self.keys)
            server = make_server(max_workers=8)
            services_pb2_grpc.add_KeyServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
            port = server.add_secure_port("127.0.0.1:0", server_credentials(self.pki.server))
            server.start()
            self.services.append(service)
            self.servers.append(server)
            self.addresses.append(f"127.0.0.1:{port}")

    def close(self) -> None:
        for client in self.clients:
            if isinstance(client, BlockingAsyncKeyClient):
                client.shutdown()
            else:
                client.close()
        for server in self.servers:
            server.stop(0).wait()

    def client(self, addresses: list[str] | None = None, **kwargs: Any) -> Any:
        """A client of these HSAs (of the domain's kind), closed with the domain."""
        cls = AsyncKeyClient if self.use_asyncio else KeyClient

        def make() -> Any:
            return cls(
                addresses if addresses is not None else self.addresses,
                ca_pem=self.pki.ca_pem,
                cert_pem=self.pki.client.cert_pem,
                key_pem=self.pki.client.key_pem,
                **kwargs,
            )

        client = BlockingAsyncKeyClient(make) if self.use_asyncio else make()
        self.clients.append(client)
        return client

    def cli_args(self) -> list[str]:
        """hsm-kms options for these HSAs, with the client's PEM files."""
        args = ["--timeout", "2"]
        for name, file in (("--ca", "ca.crt"), ("--cert", "tls.crt"), ("--key", "tls.key")):
            args += [name, str(self.pem_dir / file)]
        for address in self.addresses:
            args += ["--endpoint", address]
        return args


def free_port_address() -> str:
    """An address nothing listens on (a port the OS gave out and we closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@contextlib.contextmanager
def scripted_domain(pki: Pki, tmp_path: Path, *, use_asyncio: bool = False) -> Iterator[Domain]:
    """Three scripted HSAs, and the client's PEM files under `tmp_path` (for hsm-kms)."""
    pem_dir = tmp_path / "pem"
    pem_dir.mkdir()
    (pem_dir / "ca.crt").write_bytes(pki.ca_pem)
    (pem_dir / "tls.crt").write_bytes(pki.client.cert_pem)
    (pem_dir / "tls.key").write_bytes(pki.client.key_pem)
    (pem_dir / "tls.key").chmod(0o600)
    found = Domain(pki, pem_dir, use_asyncio=use_asyncio)
    try:
        found.start(3)
        yield found
    finally:
        found.close()
