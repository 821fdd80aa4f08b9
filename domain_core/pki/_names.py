"""SPIFFE ids and the DNS names the CA derives from them.

Invariants: a `SpiffeId` exists only in its strict form (lower-case DNS-style trust domain, a
kind from {hsa, coordinator, client}, one lower-case name); the role and identity DNS names of
different kinds and identities never collide, and no other name may use their namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, cast, get_args

from domain_core.errors import (
    InvalidInputError,
)
from domain_core.limits import MAX_TRUST_DOMAIN_CHARS

SpiffeKind = Literal["hsa", "coordinator", "client"]
SPIFFE_KINDS: Final[tuple[str, ...]] = get_args(SpiffeKind)
# The kinds that serve: their certificates carry the role and identity DNS names.
SERVER_KINDS: Final[tuple[str, ...]] = ("hsa", "coordinator")

_BACKDATE: Final = timedelta(minutes=5)
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME_RE: Final = re.compile(_LABEL)
_TRUST_DOMAIN_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SPIFFE_PREFIX: Final = "spiffe://"
# Peer certificates whose parsed identity is kept (`peer_identity`); one per client usually.
PEER_IDENTITY_CACHE_ENTRIES: Final = 1024


def is_valid_name(name: object) -> bool:
    """Whether `name` is a valid host id or SPIFFE name: a lower-case DNS label (1-63 chars)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def is_valid_trust_domain(domain: object) -> bool:
    """Whether `domain` is a valid trust domain: dot-separated lower-case DNS labels."""
    return (
        isinstance(domain, str)
        and len(domain) <= MAX_TRUST_DOMAIN_CHARS
        and _TRUST_DOMAIN_RE.fullmatch(domain) is not None
    )


def _require_aware(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")


# --- SPIFFE ids ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpiffeId:
    """A SPIFFE-style identity `spiffe://<domain>/<kind>/<name>`, valid by construction."""

    domain: str
    kind: SpiffeKind
    name: str

    def __post_init__(self) -> None:
        if not is_valid_trust_domain(self.domain):
            raise InvalidInputError(
                f"invalid trust domain {str(self.domain)[:80]!r}: use lower-case letters, "
                "digits, '-' and '.'"
            )
        if self.kind not in SPIFFE_KINDS:
            raise InvalidInputError(
                f"invalid SPIFFE kind {str(self.kind)[:40]!r}: use one of {', '.join(SPIFFE_KINDS)}"
            )
        if not is_valid_name(self.name):
            raise InvalidInputError(
                f"invalid SPIFFE name {str(self.name)[:80]!r}: use 1-63 lower-case letters, "
                "digits and '-', not starting or ending with '-'"
            )

    @property
    def uri(self) -> str:
        """The URI form, as carried in certificates."""
        return f"{_SPIFFE_PREFIX}{self.domain}/{self.kind}/{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse the strict URI form; InvalidInputError for anything else."""
        if not isinstance(uri, str):
            raise InvalidInputError("a SPIFFE id must be a string")
        shown = uri[:120]
        if not uri.startswith(_SPIFFE_PREFIX):
            raise InvalidInputError(f"{shown!r} is not a SPIFFE id: it must start with spiffe://")
        parts = uri[len(_SPIFFE_PREFIX) :].split("/")
        if len(parts) != 3:
            raise InvalidInputError(
                f"{shown!r} is not a SPIFFE id of the form spiffe://<domain>/<kind>/<name>"
            )
        domain, kind, name = parts
        if kind not in SPIFFE_KINDS:
            raise InvalidInputError(
                f"{shown!r}: kind {kind[:40]!r} is not one of {', '.join(SPIFFE_KINDS)}"
            )
        return cls(domain, cast(SpiffeKind, kind), name)


def role_dns_name(domain: str, kind: str) -> str:
    """`<kind>.<domain>`: the DNS name every server certificate of `kind` in `domain` carries.

    A client that may talk to any server of one kind (an application to any HSA) checks the
    server's certificate for it in the TLS handshake.
    """
    if not is_valid_trust_domain(domain):
        raise ValueError(f"invalid trust domain {str(domain)[:80]!r}")
    if kind not in SERVER_KINDS:
        raise ValueError(f"only {' and '.join(SERVER_KINDS)} certificates carry a role name")
    return f"{kind}.{domain}"


def identity_dns_name(spiffe: SpiffeId) -> str:
    """`<name>.<kind>.<domain>`: the DNS name that the server certificate of exactly `spiffe`
    carries. A client that knows which host it dials checks the server's certificate for it."""
    if not isinstance(spiffe, SpiffeId):
        raise TypeError("spiffe must be a SpiffeId")
    return f"{spiffe.name}.{role_dns_name(spiffe.domain, spiffe.kind)}"


def _in_reserved_namespace(name: str, domain: str) -> bool:
    """Whether a DNS name is, or is under, a role name of `domain` (any kind)."""
    lowered = name.lower().rstrip(".")
    return any(
        lowered == f"{kind}.{domain}" or lowered.endswith(f".{kind}.{domain}")
        for kind in SPIFFE_KINDS
    )
