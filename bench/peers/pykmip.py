"""PyKMIP as a peer: its KMIP server with mutual TLS, AES-256-GCM Encrypt/Decrypt of 1 KiB.

`PyKmipServer` makes a throwaway PKI (an ECDSA P-256 CA, an ECDSA server certificate for
127.0.0.1, a client certificate with the clientAuth extended key usage, which PyKMIP checks),
writes a server config (TLS 1.2 auth suite with one AES-GCM cipher suite, client certificate
required, an empty policy folder, its SQLite database in the server's directory, INFO logging:
PyKMIP's own per-operation log), starts `kmip.services.server.server` on an OS-chosen
127.0.0.1 port in its own process group, then creates an AES-256 key and activates it (KMIP
keys are not usable until Activated).

The client speaks raw KMIP 1.4 over asyncio TLS connections, one connection per caller (KMIP
is one request at a time per connection), with messages built and parsed by PyKMIP's own
TTLV encoder: PyKMIP's client returns no GCM authentication tag from Encrypt (its results keep
only the ciphertext and IV), so AES-GCM through it cannot be decrypted again, whereas KMIP 1.4
payloads carry the tag both ways. The server picks the IV (as ours and OpenBao pick nonces).

Invariants: the server and its child processes (a multiprocessing manager and a policy
monitor) are always stopped when the `with` block ends, on any error, and at interpreter
exit (`PeerServer`'s rules: its whole process group); server CPU is the whole process tree's;
`kmip` (PyKMIP) is optional (the `bench` extra): importing this module does not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import importlib
import importlib.metadata
import ipaddress
import os
import ssl
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench._core import BenchError
from bench.peers._common import CALL_TIMEOUT, PAYLOAD_BYTES, OpCall, free_port
from bench.peers._server import PeerServer

__all__ = [
    "CIPHER_SUITE",
    "TTLV_HEADER_BYTES",
    "KmipCodec",
    "PeerPki",
    "PyKmipServer",
    "make_pki",
    "server_config",
    "ttlv_length",
]

CIPHER_SUITE: Final = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
TTLV_HEADER_BYTES: Final = 8  # tag (3) + type (1) + length (4, big-endian)
CLIENT_NAME: Final = "bench-client"
GCM_TAG_BYTES: Final = 16
_INSTALL_HINT: Final = "install the bench extra: .venv/bin/pip install -e '.[bench]'"


def ttlv_length(header: bytes) -> int:
    """The length of the value that follows a TTLV header (the first 8 bytes of a message)."""
    if len(header) != TTLV_HEADER_BYTES:
        raise ValueError(f"a TTLV header is {TTLV_HEADER_BYTES} bytes, not {len(header)}")
    return int.from_bytes(header[4:8], "big")


# --- PKI -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerPki:
    """The files of a throwaway PKI for one PyKMIP server and its client."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    now: datetime.datetime,
    ca: bool,
    usage: list[x509.ObjectIdentifier],
    ip: str | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if ca else issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, now: datetime.datetime | None = None) -> PeerPki:
    """An ECDSA P-256 CA, a server certificate for 127.0.0.1, a clientAuth client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench peer CA")])
    ca = _issue("bench peer CA", ca_key, ca_name, ca_key, now=now, ca=True, usage=[])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "127.0.0.1",
        server_key,
        ca_name,
        ca_key,
        now=now,
        ca=False,
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        ip="127.0.0.1",
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        CLIENT_NAME,
        client_key,
        ca_name,
        ca_key,
        now=now,
        ca=False,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    pki = PeerPki(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    pki.ca_cert.write_bytes(ca.public_bytes(pem))
    pki.server_cert.write_bytes(server.public_bytes(pem))
    pki.client_cert.write_bytes(client.public_bytes(pem))
    _write_key(pki.server_key, server_key)
    _write_key(pki.client_key, client_key)
    return pki


def server_config(
    pki: PeerPki, *, port: int, policy_dir: Path, database: Path, cipher_suite: str = CIPHER_SUITE
) -> str:
    """The `[server]` section of a PyKMIP server config (mutual TLS, one GCM suite)."""
    return "\n".join(
        [
            "[server]",
            "hostname=127.0.0.1",
            f"port={port}",
            f"certificate_path={pki.server_cert}",
            f"key_path={pki.server_key}",
            f"ca_path={pki.ca_cert}",
            "auth_suite=TLS1.2",
            f"policy_path={policy_dir}",
            "enable_tls_client_auth=True",
            f"tls_cipher_suites={cipher_suite}",
            "logging_level=INFO",
            f"database_path={database}",
            "",
        ]
    )


# --- raw KMIP --------------------------------------------------------------------------------


class KmipCodec:
    """KMIP 1.4 request building and response parsing with PyKMIP's TTLV encoder."""

    def __init__(self) -> None:
        try:
            self.enums: Any = importlib.import_module("kmip.core.enums")
            self.attributes: Any = importlib.import_module("kmip.core.attributes")
            self.contents: Any = importlib.import_module("kmip.core.messages.contents")
            self.messages: Any = importlib.import_module("kmip.core.messages.messages")
            self.payloads: Any = importlib.import_module("kmip.core.messages.payloads")
            self.objects: Any = importlib.import_module("kmip.core.objects")
            self.factory: Any = importlib.import_module("kmip.core.factories.attributes")
            self.utils: Any = importlib.import_module("kmip.core.utils")
        except ImportError:
            raise BenchError(f"PyKMIP is not installed; {_INSTALL_HINT}") from None
        self.version = self.enums.KMIPVersion.KMIP_1_4

    def request(self, operation: str, payload: Any) -> bytes:
        """One request message (batch of one) as TTLV bytes."""
        header = self.messages.RequestHeader(
            protocol_version=self.contents.ProtocolVersion(1, 4),
            batch_count=self.contents.BatchCount(1),
        )
        item = self.messages.RequestBatchItem(
            operation=self.contents.Operation(getattr(self.enums.Operation, operation)),
            request_payload=payload,
        )
        message = self.messages.RequestMessage(request_header=header, batch_items=[item])
        stream = self.utils.BytearrayStream()
        message.write(stream, kmip_version=self.version)
        return bytes(stream.buffer)

    def response(self, data: bytes) -> Any:
        """The payload of a successful single-item response; RuntimeError with its reason if not."""
        message = self.messages.ResponseMessage()
        message.read(self.utils.BytearrayStream(data), kmip_version=self.version)
        item = message.batch_items[0]
        if item.result_status.value != self.enums.ResultStatus.SUCCESS:
            reason = getattr(item.result_reason, "value", None)
            text = getattr(item.result_message, "value", "")
            raise RuntimeError(f"KMIP {getattr(reason, 'name', reason)}: {str(text)[:200]}")
        return item.response_payload

    def create_aes_key(self, bits: int = 256) -> bytes:
        """Create: a symmetric AES key usable for Encrypt and Decrypt."""
        make = self.factory.AttributeFactory().create_attribute
        kinds = self.enums.AttributeType
        masks = self.enums.CryptographicUsageMask
        template = self.objects.TemplateAttribute(
            attributes=[
                make(kinds.CRYPTOGRAPHIC_ALGORITHM, self.enums.CryptographicAlgorithm.AES),
                make(kinds.CRYPTOGRAPHIC_LENGTH, bits),
                make(kinds.CRYPTOGRAPHIC_USAGE_MASK, [masks.ENCRYPT, masks.DECRYPT]),
            ]
        )
        payload = self.payloads.CreateRequestPayload(
            object_type=self.enums.ObjectType.SYMMETRIC_KEY, template_attribute=template
        )
        return self.request("CREATE", payload)

    def activate(self, key_id: str) -> bytes:
        """Activate the key (Pre-Active keys refuse every cryptographic operation)."""
        payload = self.payloads.ActivateRequestPayload(
            unique_identifier=self.attributes.UniqueIdentifier(key_id)
        )
        return self.request("ACTIVATE", payload)

    def _gcm(self) -> Any:
        return self.attributes.CryptographicParameters(
            block_cipher_mode=self.enums.BlockCipherMode.GCM,
            cryptographic_algorithm=self.enums.CryptographicAlgorithm.AES,
            tag_length=GCM_TAG_BYTES,
        )

    def encrypt(self, key_id: str, plaintext: bytes) -> bytes:
        """Encrypt with AES-GCM; the server picks the IV and returns it with the tag."""
        payload = self.payloads.EncryptRequestPayload(
            unique_identifier=key_id, cryptographic_parameters=self._gcm(), data=plaintext
        )
        return self.request("ENCRYPT", payload)

    def decrypt(self, key_id: str, ciphertext: bytes, iv: bytes, tag: bytes) -> bytes:
        """Decrypt AES-GCM with the IV and tag Encrypt returned."""
        payload = self.payloads.DecryptRequestPayload(
            unique_identifier=key_id,
            cryptographic_parameters=self._gcm(),
            data=ciphertext,
            iv_counter_nonce=iv,
            auth_tag=tag,
        )
        return self.request("DECRYPT", payload)


class _Connection:
    """One TLS connection carrying one KMIP request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def roundtrip(self, request: bytes) -> bytes:
        self.writer.write(request)
        await self.writer.drain()
        header = await self.reader.readexactly(TTLV_HEADER_BYTES)
        return header + await self.reader.readexactly(ttlv_length(header))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# --- the server --------------------------------------------------------------------------------


class PyKmipServer(PeerServer):
    """One PyKMIP server process (with its helper processes) and an active AES-256 key."""

    label: Final = "pykmip"

    def __init__(self, directory: Path, *, start_timeout: float = 60.0) -> None:
        super().__init__(directory, start_timeout=start_timeout)
        self.port = 0
        self.key_id = ""
        self.version = "?"
        self.pki: PeerPki | None = None
        self._ssl: ssl.SSLContext | None = None
        self._codec: KmipCodec | None = None

    @property
    def description(self) -> str:
        """What runs, for the report."""
        return f"PyKMIP {self.version}, AES-256-GCM via raw KMIP 1.4, mutual TLS 1.2; asyncio"

    @property
    def codec(self) -> KmipCodec:
        """The TTLV codec (imports PyKMIP on first use)."""
        if self._codec is None:
            self._codec = KmipCodec()
        return self._codec

    def _start(self) -> None:
        """Write the PKI and config, start the server, create and activate the key."""
        codec = self.codec  # fails early, with the install hint, if PyKMIP is missing
        self.version = str(importlib.metadata.version("pykmip"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.directory / "pki")
        policies = self.directory / "policies"
        policies.mkdir(exist_ok=True)
        home = self.directory / "home"
        home.mkdir(exist_ok=True)
        self.port = free_port()
        config = self.directory / "server.conf"
        config.write_text(
            server_config(
                self.pki,
                port=self.port,
                policy_dir=policies,
                database=self.directory / "pykmip.db",
            )
        )
        self._spawn(
            [
                sys.executable,
                "-m",
                "kmip.services.server.server",
                "-f",
                str(config),
                "-l",
                str(self.directory / "server.log"),
            ],
            env=dict(os.environ, HOME=str(home)),
            log=self.directory / "stdout.log",
        )
        if not self._wait_ready(self._accepting, what="pykmip server"):
            raise self._exit_error("pykmip server")
        asyncio.run(self._create_key(codec))

    def _accepting(self) -> bool:
        return "Starting connection service" in self._log()

    def _log(self) -> str:
        try:
            return (self.directory / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def _create_key(self, codec: KmipCodec) -> None:
        connection = await self._connect()
        try:
            created = codec.response(await connection.roundtrip(codec.create_aes_key()))
            self.key_id = str(created.unique_identifier)
            codec.response(await connection.roundtrip(codec.activate(self.key_id)))
        finally:
            await connection.close()

    # --- calls -----------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Mutual TLS as the client certificate (clientAuth), trusting the throwaway CA."""
        if self._ssl is None:
            if self.pki is None:
                raise BenchError("pykmip is not started")
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.pki.ca_cert)
            )
            context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
            self._ssl = context
        return self._ssl

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.ssl_context(), server_hostname="127.0.0.1"
            ),
            timeout=CALL_TIMEOUT,
        )
        return _Connection(reader, writer)

    @contextlib.asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        """`concurrency` TLS connections (opened one by one: the server's backlog is 5)."""
        codec = self.codec
        idle: asyncio.Queue[_Connection] = asyncio.Queue()
        opened: list[_Connection] = []
        try:
            for _ in range(concurrency):
                connection = await self._connect()
                opened.append(connection)
                idle.put_nowait(connection)
            plaintext = os.urandom(PAYLOAD_BYTES)
            encrypt_request = codec.encrypt(self.key_id, plaintext)
            first = codec.response(await opened[0].roundtrip(encrypt_request))
            if not first.auth_tag:
                raise BenchError("pykmip: Encrypt returned no GCM tag")
            decrypt_request = codec.decrypt(
                self.key_id, first.data, first.iv_counter_nonce, first.auth_tag
            )
            check = codec.response(await opened[0].roundtrip(decrypt_request))
            if not hmac.compare_digest(bytes(check.data), plaintext):
                raise BenchError("pykmip: Decrypt did not return the plaintext")

            async def call(request: bytes) -> object:
                connection = await idle.get()
                try:
                    answer = await asyncio.wait_for(
                        connection.roundtrip(request), timeout=CALL_TIMEOUT
                    )
                except BaseException as error:
                    # A connection left half-way through a message cannot be reused.
                    await connection.close()
                    if isinstance(error, Exception):
                        replacement = await self._connect()
                        opened.append(replacement)
                        idle.put_nowait(replacement)
                    raise
                idle.put_nowait(connection)
                return codec.response(answer)

            async def encrypt() -> object:
                return await call(encrypt_request)

            async def decrypt() -> object:
                return await call(decrypt_request)

            yield {"encrypt": encrypt, "decrypt": decrypt}
        finally:
            for connection in opened:
                await connection.close()
