"""Where the processes of a domain across hosts listen (`hsm-domain init DIR --host ...`).

A domain across hosts names each HSA and the coordinator by an address other machines reach:
an IP literal or a DNS name, with a port or the default one. From that address follow:
- where the process listens: an IP literal is bound as is (the process listens on that
  interface only); a DNS name is not bound (it may resolve to an address of a load balancer
  or to nothing yet), so the process listens on every interface of the port and tells others
  the name (`NodeConfig.advertise_address`);
- what its TLS certificate names besides its SPIFFE id: that IP address or that DNS name;
- where its metrics are served: on its port + 2000, on loopback by default, on the host's
  address when asked.

`domain.json` of such a domain keeps the addresses (`DomainAddresses`), so that the tools that
read the ceremony directory (`hsm-operator --cluster DIR`, `hsm-kms --cluster DIR`) find the
coordinator and the HSAs without ready files.

Invariants: an address is `host` or `host:port` with port 1-65535 (`[v6]:port` for IPv6);
a DNS name is checked as RFC 1123 host names are (no wildcard); nothing here resolves a name
or opens a socket.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from domain_core.errors import HsmDomainError, InvalidInputError
from domain_core.limits import MAX_DNS_NAME_CHARS, MAX_DOMAIN_FILE_BYTES
from domain_edge.files import read_limited
from domain_edge.layout import DomainPaths

__all__ = [
    "COORDINATOR_PORT",
    "HSA_PORT",
    "METRICS_PORT_OFFSET",
    "DomainAddresses",
    "HostAddress",
    "addresses_of",
    "parse_host_option",
]

HSA_PORT: Final = 7700
"""An HSA's one mutual-TLS port: its peers, the coordinator's admin calls, the key service."""
COORDINATOR_PORT: Final = 7710
"""The coordinator's mutual-TLS port for HSAs; operators use the next port (7711)."""
METRICS_PORT_OFFSET: Final = 2000
"""A process serves its metrics on its port + 2000 (HSA 9700, coordinator 9710): unique on a
machine because the processes' ports are."""
_LABEL: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _dns_name(text: str) -> str:
    name = text.lower().rstrip(".")
    labels = name.split(".")
    valid = all(_LABEL.match(label) for label in labels)
    if not name or len(name) > MAX_DNS_NAME_CHARS or not valid:
        raise InvalidInputError(
            f"{text[:80]!r} is neither an IP address nor a DNS name (letters, digits and '-' "
            "in labels of 1 to 63 characters, separated by dots)"
        )
    if labels[-1].isdigit():
        raise InvalidInputError(f"{text[:80]!r} is not a valid IP address")
    return name


@dataclass(frozen=True)
class HostAddress:
    """Where one process of a domain across hosts is reached: an IP literal or a DNS name
    (`host`), and its port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int) -> HostAddress:
        """`host`, `host:port`, `v6` or `[v6]:port`; InvalidInputError when malformed."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("an address is HOST or HOST:PORT, not empty")
        text = text.strip()
        host, port = text, default_port
        if text.startswith("["):
            close = text.find("]")
            rest = text[close + 1 :] if close > 0 else "?"
            if rest and not rest.startswith(":"):
                raise InvalidInputError(f"{text[:80]!r} is not [IPv6] or [IPv6]:PORT")
            host, port = text[1:close], _port(rest[1:], text) if rest else default_port
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = _port(port_text, text)
        try:
            return cls(str(ipaddress.ip_address(host)), port)
        except ValueError:
            if ":" in host:
                raise InvalidInputError(f"{text[:80]!r} is not a valid IPv6 address") from None
            return cls(_dns_name(host), port)

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IP literal (bound as is) rather than a DNS name."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def _host_part(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def with_port(self, port: int) -> str:
        """This host at another `port` ("host:port", IPv6 in brackets)."""
        return f"{self._host_part()}:{port}"

    @property
    def address(self) -> str:
        """ "host:port" as others dial it."""
        return self.with_port(self.port)

    def listen(self, port: int | None = None) -> str:
        """Where the process binds `port` (default its own): the IP itself, or every
        interface for a DNS name (gRPC takes 0.0.0.0 for IPv6 too where the host has it)."""
        port = self.port if port is None else port
        return self.with_port(port) if self.is_ip else f"0.0.0.0:{port}"

    @property
    def certificate_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(DNS names, IP addresses) its TLS certificate carries besides its SPIFFE names."""
        return ((), (self.host,)) if self.is_ip else ((self.host,), ())


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise InvalidInputError(f"{whole[:80]!r}: the port must be a number from 1 to 65535")
    return int(text)


def parse_host_option(text: str) -> tuple[str, HostAddress]:
    """`NAME=ADDR` of `--host` as (host id, address); InvalidInputError when malformed."""
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise InvalidInputError(f"--host takes NAME=ADDRESS (e.g. hsa-1=10.0.0.11), not {text!r}")
    return name, HostAddress.parse(address, HSA_PORT)


@dataclass(frozen=True)
class DomainAddresses:
    """The addresses `domain.json` of a domain across hosts keeps: each HSA's (key service
    and peers), the coordinator's for HSAs and for operators."""

    hsas: dict[str, str]
    coordinator: str
    operator: str

    def to_json(self) -> dict[str, Any]:
        """The `addresses` object of `domain.json`."""
        return {"hsas": dict(self.hsas), "coordinator": self.coordinator, "operator": self.operator}

    @classmethod
    def from_json(cls, value: object, where: str) -> DomainAddresses:
        """The `addresses` object of `domain.json` (`where` names the file in errors)."""
        if not isinstance(value, dict):
            raise InvalidInputError(f"{where}: addresses must be an object")
        hsas = value.get("hsas")
        coordinator, operator = value.get("coordinator"), value.get("operator")
        if (
            not isinstance(hsas, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in hsas.items())
            or not isinstance(coordinator, str)
            or not isinstance(operator, str)
        ):
            raise InvalidInputError(
                f"{where}: addresses needs hsas (host id to HOST:PORT), coordinator and operator"
            )
        for address in [*hsas.values(), coordinator, operator]:
            HostAddress.parse(address, 0)
        return cls(hsas=dict(hsas), coordinator=coordinator, operator=operator)


def addresses_of(paths: DomainPaths) -> DomainAddresses | None:
    """The addresses `domain.json` in `paths.root` keeps: None for a local domain (its
    processes' ready files say where they are); InvalidInputError when unreadable."""
    try:
        document = json.loads(read_limited(paths.domain_file, MAX_DOMAIN_FILE_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, HsmDomainError) as error:
        raise InvalidInputError(f"cannot read {paths.domain_file}: {error}") from None
    if not isinstance(document, dict) or "addresses" not in document:
        return None
    return DomainAddresses.from_json(document["addresses"], str(paths.domain_file))
