"""Where the etcd members are: HOST:PORT endpoints, parsed and checked.

Invariants: an endpoint list is non-empty, at most `MAX_ETCD_ENDPOINTS` long, without duplicates,
each a host and a port 1-65535; the host is a loopback address (127.0.0.0/8, ::1, localhost)
unless the caller asked for `unsafe_remote_plaintext`, because aetcd speaks plaintext gRPC
(no TLS): etcd traffic leaves the host only when someone chose that, knowing it.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from domain_core.errors import InvalidInputError
from domain_core.limits import MAX_ETCD_ENDPOINTS

_LOCALHOST: Final = "localhost"


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_loopback(host: str) -> bool:
    if host == _LOCALHOST:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_one(text: str) -> Endpoint:
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidInputError(
            f"etcd endpoint {text[:80]!r} is not HOST:PORT (e.g. 127.0.0.1:2379, a port "
            "between 1 and 65535)"
        )
    return Endpoint(host, int(port_text))


def parse_endpoints(
    endpoints: str | Sequence[str], *, unsafe_remote_plaintext: bool = False
) -> tuple[Endpoint, ...]:
    """Endpoints from "HOST:PORT,HOST:PORT" (or a list of them); see the module invariants."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed = tuple(_parse_one(item) for item in items if item.strip())
    if not parsed:
        raise InvalidInputError("no etcd endpoint given: name every member, HOST:PORT,...")
    if len(parsed) > MAX_ETCD_ENDPOINTS:
        raise InvalidInputError(f"{len(parsed)} etcd endpoints: at most {MAX_ETCD_ENDPOINTS}")
    if len(set(parsed)) != len(parsed):
        raise InvalidInputError("an etcd endpoint is named twice")
    remote = [str(e) for e in parsed if not _is_loopback(e.host)]
    if remote and not unsafe_remote_plaintext:
        raise InvalidInputError(
            f"etcd endpoint {remote[0]} is not on this host's loopback: the etcd store speaks "
            "plaintext gRPC (its client, aetcd, has no TLS), so its members must listen on "
            "127.0.0.1 beside the coordinator"
        )
    if remote:
        warnings.warn(
            f"UNSAFE: plaintext etcd traffic to {', '.join(remote)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return parsed
