"""Client channels: TLS material, the server a channel expects, and reading a failed call.

Invariants: every client channel names the server it expects (`ExpectedServer`: any HSA, one
HSA, the coordinator) and is built in one place (`secure_channel`, `channel_options`), so the
TLS handshake accepts only a server whose domain-CA certificate carries the DNS name the CA
derives from that role or identity; `never_sent`, `wrong_server` and `nothing_applied` are the
one reading of a failed call's status, details and trailing metadata.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from domain_core.errors import (
    WIRE_KINDS,
    HsmDomainError,
    InvalidInputError,
    ThrottledError,
    UnauthenticatedError,
)
from domain_core.limits import DEFAULT_LIMITS, MAX_CHANNEL_ADDRESSES, MAX_RETRY_AFTER_MS, Limits
from domain_core.pki import (
    SERVER_KINDS,
    SpiffeId,
    ca_trust_domain,
    identity_dns_name,
    is_valid_name,
    role_dns_name,
)

DEFAULT_DEADLINE_SECONDS = 5.0
_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 0),  # retries are ours (tenacity), only where safe
]


@dataclass(frozen=True)
class TlsMaterial:
    """A process's TLS identity: the domain CA certificate and its own certificate and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> TlsMaterial:
        """Read PEM files (the key file must not be readable by others)."""
        if key.stat().st_mode & 0o077:
            raise UnauthenticatedError(f"{key} is readable by others; chmod 600 it")
        return cls(ca_pem=ca.read_bytes(), cert_pem=cert.read_bytes(), key_pem=key.read_bytes())

    def __repr__(self) -> str:
        return "TlsMaterial(<redacted>)"


def server_credentials(
    tls: TlsMaterial, *, server_auth_only: bool = False
) -> grpc.ServerCredentials:
    """Server credentials; client certificates from the CA are required unless told otherwise."""
    return grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)],
        root_certificates=tls.ca_pem,
        require_client_auth=not server_auth_only,
    )


def channel_credentials(
    ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials; with a certificate and key the channel authenticates as that peer."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


# gRPC checks the server certificate's DNS names against this name instead of the dialled host.
_SERVER_NAME_OPTION: Final = "grpc.ssl_target_name_override"
# The words gRPC's TLS stack uses when the server certificate lacks the expected name.
_WRONG_SERVER_WORDS: Final = "Hostname Verification Check failed"
_ROLE_WORDS: Final = {"hsa": "an HSA", "coordinator": "a coordinator"}


@dataclass(frozen=True)
class ExpectedServer:
    """Whom a client channel may talk to: any server of one SPIFFE kind of the domain (`name`
    None, e.g. any HSA), or exactly one identity (an HSA whose host id the caller knows).

    The domain is the one the channel's CA certificate names, so a certificate of another
    domain never passes. See the package docstring for how the handshake enforces it.
    """

    kind: Literal["hsa", "coordinator"]
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SERVER_KINDS:
            raise ValueError(f"a server is of kind {' or '.join(SERVER_KINDS)}, not {self.kind!r}")
        if self.name is not None and not is_valid_name(self.name):
            raise ValueError(f"invalid server name {str(self.name)[:80]!r}")

    def tls_name(self, domain: str) -> str:
        """The DNS name the server's certificate must carry in trust domain `domain`."""
        if self.name is None:
            return role_dns_name(domain, self.kind)
        return identity_dns_name(SpiffeId(domain, self.kind, self.name))

    def describe(self, domain: str) -> str:
        """How messages name the expected server ("an HSA of domain d", or its SPIFFE id)."""
        if self.name is None:
            return f"{_ROLE_WORDS[self.kind]} of domain {domain}"
        return SpiffeId(domain, self.kind, self.name).uri


ANY_HSA: Final = ExpectedServer("hsa")
"""Any HSA of the domain: what applications dial (every HSA serves the whole key service)."""
COORDINATOR: Final = ExpectedServer("coordinator")
"""Any coordinator of the domain (replicas share one role)."""


def hsa_host(host_id: str) -> ExpectedServer:
    """Exactly the HSA `host_id` (for callers that know which host they dial)."""
    return ExpectedServer("hsa", host_id)


def server_name_option(ca_pem: bytes, server: ExpectedServer) -> tuple[str, str]:
    """The channel option that makes gRPC accept only `server` (domain from `ca_pem`)."""
    if not isinstance(server, ExpectedServer):
        raise TypeError("server must be an ExpectedServer (ANY_HSA, COORDINATOR, hsa_host(...))")
    return (_SERVER_NAME_OPTION, server.tls_name(ca_trust_domain(ca_pem)))


def channel_options(
    ca_pem: bytes, server: ExpectedServer, limits: Limits = DEFAULT_LIMITS
) -> list[tuple[str, str | int]]:
    """Every option of a client channel to `server`: fast reconnects, the message-size limits,
    and the expected server name (for grpc.aio channels; sync ones use `secure_channel`)."""
    return [*_CHANNEL_OPTIONS, *limits.grpc_options(), server_name_option(ca_pem, server)]


def split_addresses(addresses: str) -> tuple[str, ...]:
    """ "host:port" or "host:port,host:port,..." as a tuple of "host:port" strings;
    InvalidInputError, saying which part is wrong, when one is not of that form."""
    parts = tuple(part.strip() for part in addresses.split(","))
    if not 1 <= len(parts) <= MAX_CHANNEL_ADDRESSES:
        raise InvalidInputError(f"give 1 to {MAX_CHANNEL_ADDRESSES} addresses, comma-separated")
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise InvalidInputError(
                f"{part[:80]!r} is not an address of the form host:port (several: "
                "host:port,host:port)"
            )
    return parts


def _literal(address: str) -> tuple[str, str]:
    """("ipv4" or "ipv6", "ip:port") for one "host:port", resolving a host name once."""
    host, _, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        try:
            found = socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
        except OSError as error:
            raise InvalidInputError(f"cannot resolve {bare[:80]!r}: {error}") from None
        ip = ipaddress.ip_address(str(found[0][4][0]))
    if ip.version == 6:
        return "ipv6", f"[{ip}]:{port}"
    return "ipv4", f"{ip}:{port}"


def channel_target(addresses: str) -> tuple[str, list[tuple[str, str]]]:
    """The gRPC target for one address or several, and the options it needs.

    One address is dialled as given. Several (the replicas of a coordinator) become one
    channel over all of them (`ipv4:` / `ipv6:` target, host names resolved once here) that
    spreads calls round-robin over the replicas that are up and stops using one while it is
    down, so a caller fails over without code of its own; a call in flight on a replica that
    dies still fails (UNAVAILABLE), and the caller retries it only where that is safe.
    """
    parts = split_addresses(addresses)
    if len(parts) == 1:
        return parts[0], []
    literals = [_literal(part) for part in parts]
    families = {family for family, _ in literals}
    if len(families) != 1:
        raise InvalidInputError("give the replicas' addresses all as IPv4 or all as IPv6")
    target = f"{families.pop()}:{','.join(address for _, address in literals)}"
    return target, [("grpc.lb_policy_name", "round_robin")]


def secure_channel(
    target: str,
    ca_pem: bytes,
    server: ExpectedServer,
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> grpc.Channel:
    """A TLS channel to `target` (host:port, or several comma-separated: `channel_target`)
    that talks only to `server` (see the module docstring); with `cert_pem` and `key_pem` it
    authenticates as their holder (mutual TLS)."""
    return grpc.secure_channel(
        *_secure_channel_arguments(target, ca_pem, server, cert_pem, key_pem, limits)
    )


def secure_aio_channel(
    target: str,
    ca_pem: bytes,
    server: ExpectedServer,
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> grpc.aio.Channel:
    """`secure_channel` for asyncio: the same target, credentials and options on a
    `grpc.aio` channel (which belongs to the event loop that uses it first)."""
    return grpc.aio.secure_channel(
        *_secure_channel_arguments(target, ca_pem, server, cert_pem, key_pem, limits)
    )


def _secure_channel_arguments(
    target: str,
    ca_pem: bytes,
    server: ExpectedServer,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    limits: Limits,
) -> tuple[str, grpc.ChannelCredentials, list[tuple[str, str | int]]]:
    """The dialled target, the credentials and the options of a channel to `server`."""
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    dialled, extra = channel_target(target)
    options: list[tuple[str, str | int]] = [*channel_options(ca_pem, server, limits), *extra]
    return dialled, channel_credentials(ca_pem, cert_pem, key_pem), options


def mtls_channel(
    target: str, tls: TlsMaterial, server: ExpectedServer, limits: Limits = DEFAULT_LIMITS
) -> grpc.Channel:
    """A mutually authenticated channel as the holder of `tls`, to `server` only."""
    return secure_channel(
        target, tls.ca_pem, server, cert_pem=tls.cert_pem, key_pem=tls.key_pem, limits=limits
    )


# gRPC's own messages when no connection could be made: the request was never sent.
_NOT_SENT_PREFIXES: Final = ("failed to connect to all addresses", "DNS resolution failed")


def never_sent(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether gRPC reports that the call found no connection, so no server saw it.

    Only gRPC's own "failed to connect" / DNS failures qualify (a refused handshake too: a
    server of the wrong identity gets nothing). A server could send the same words as its own
    UNAVAILABLE message; ours never do, and a server that lies so gains nothing it could not
    get by answering wrongly.
    """
    return code is grpc.StatusCode.UNAVAILABLE and details.startswith(_NOT_SENT_PREFIXES)


def wrong_server(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether a failed call means the server's certificate is not the expected server's (the
    handshake refused it, so nothing was sent): gRPC's own connection failure, for that
    reason."""
    return never_sent(code, details) and _WRONG_SERVER_WORDS in details


NOTHING_APPLIED_KEY: Final = "hsm-nothing-applied"
"""Trailing metadata key that marks an error after which nothing was applied (value "true")."""
_NOTHING_APPLIED: Final = ((NOTHING_APPLIED_KEY, "true"),)
RETRY_AFTER_KEY: Final = "hsm-retry-after-ms"
"""Trailing metadata key of a call refused for its caller's request rate: after how many
milliseconds to send it again (`domain_core.errors.ThrottledError`)."""


ERROR_KIND_KEY: Final = "hsm-error-kind"
"""Trailing metadata key naming the error's class, for the classes of
`domain_core.errors.WIRE_KINDS` (one status, several meanings)."""


def error_metadata(error: HsmDomainError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a call that failed with `error`: the nothing-applied mark,
    a throttled call's retry delay, and the error's kind where its status says too little."""
    marks: tuple[tuple[str, str], ...] = _NOTHING_APPLIED if error.nothing_applied else ()
    if isinstance(error, ThrottledError):
        marks += ((RETRY_AFTER_KEY, str(retry_after_ms(error))),)
    if (kind := wire_kind(error)) is not None:
        marks += ((ERROR_KIND_KEY, kind),)
    return marks


def wire_kind(error: HsmDomainError) -> str | None:
    """The kind a server sends beside `error`'s status (`WIRE_KINDS`), or None."""
    name = type(error).__name__
    return name if WIRE_KINDS.get(name) is type(error) else None


def error_kind(error: grpc.RpcError) -> type[HsmDomainError] | None:
    """The error class a server named beside a failed call's status, if it is one of
    `WIRE_KINDS` (anything else is ignored)."""
    for key, value in _trailing(error):
        if key == ERROR_KIND_KEY and isinstance(value, str):
            return WIRE_KINDS.get(value)
    return None


def retry_after_ms(error: ThrottledError) -> int:
    """A throttled call's retry delay as sent: whole milliseconds, 1 to a minute."""
    return min(MAX_RETRY_AFTER_MS, max(1, round(error.retry_after * 1000)))


def retry_after(error: grpc.RpcError) -> float | None:
    """The retry delay (seconds) a server put on a failed call, if any and if it reads as a
    whole number of milliseconds (at most a minute is believed)."""
    for key, value in _trailing(error):
        if key == RETRY_AFTER_KEY and isinstance(value, str) and value.isdigit():
            return min(MAX_RETRY_AFTER_MS, int(value)) / 1000
    return None


def nothing_applied(error: grpc.RpcError) -> bool:
    """Whether the server marked a failed call as having changed nothing (`NotAppliedError`).

    Only a server's own answer carries trailing metadata: a connection lost mid-call or a
    deadline passed never does, so those stay "outcome unknown".
    """
    return any(key == NOTHING_APPLIED_KEY and value == "true" for key, value in _trailing(error))


def _trailing(error: grpc.RpcError) -> tuple[tuple[str, Any], ...]:
    """A failed call's trailing metadata (none for a call object that cannot say)."""
    call = cast(Any, error)
    try:
        metadata = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
        return tuple((str(key), value) for key, value in (metadata or ()))
    except Exception:
        return ()


def check_health(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> bool:
    """True if the server behind `channel` reports SERVING for `service`."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
