"""Configuration files of the domain's processes (JSON), shared by their writers and readers.

`hsm-domain init` writes one file per process; `hsa-node --config` and
`domain-coordinator --config` read them. Relative paths in a file are relative to the
directory holding the file. Unknown keys are refused, so a typo is a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, TypeVar

from domain_core.errors import InvalidInputError
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_HEAD_CONFIRMATION_SECONDS,
    MAX_KEY_CACHE_MIB,
    MAX_KEY_SERVICE_WORKERS,
    Limits,
)
from domain_core.model import validate_domain_id
from domain_core.pki import SpiffeId
from domain_edge.files import replace_file
from domain_edge.transport import split_addresses

_C = TypeVar("_C", bound="_ConfigBase")

# Long enough to ride out a peer's restart or a short network fault without refusing key
# administration; short enough that a hidden fork or withheld states let key administration
# go on for at most half a minute on a head no peer shares.
DEFAULT_HEAD_CONFIRMATION_SECONDS: Final = 30.0
# In a node's data directory: written by `hsm-domain init` for the hosts of a new domain (no key
# exists yet, so their empty key floor tables are complete), holding the genesis hash in hex.
# The HSA marks its floor table complete and removes the file at its first start.
FLOORS_COMPLETE_FILE: Final = "key_versions.complete"
HEAD_CONFIRMATION_ROUNDS: Final = 5


@dataclass(frozen=True)
class TlsFiles:
    """Where a process's TLS material lives (PEM files)."""

    ca: str
    cert: str
    key: str


class _ConfigBase:
    """Load/save helpers common to every config file."""

    @classmethod
    def load(cls: type[_C], path: Path) -> _C:
        """Read and validate a config file; errors name the file and the problem."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidInputError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"config file {path} is not valid JSON: {error}") from None
        if not isinstance(raw, dict):
            raise InvalidInputError(f"config file {path} must hold a JSON object")
        config = cls._from_dict(raw, path)
        object.__setattr__(config, "base_dir", path.parent.resolve())
        return config

    @classmethod
    def _from_dict(cls: type[_C], raw: Mapping[str, Any], path: Path) -> _C:
        known = {f.name for f in fields(cls) if f.name != "base_dir"}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidInputError(f"config file {path}: unknown keys {', '.join(unknown)}")
        values = dict(raw)
        if "tls" in values:
            tls = values["tls"]
            if not isinstance(tls, dict) or set(tls) != {"ca", "cert", "key"}:
                raise InvalidInputError(f"config file {path}: tls needs exactly ca, cert, key")
            values["tls"] = TlsFiles(**tls)
        try:
            config = cls(**values)
        except TypeError as error:
            raise InvalidInputError(f"config file {path}: {error}") from None
        return config

    def save(self, path: Path) -> None:
        """Write the config as JSON (mode 0644: configs hold paths, never secrets)."""
        data = {k: v for k, v in asdict(self).items() if k != "base_dir"}  # type: ignore[call-overload]
        replace_file(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())

    def path(self, relative: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        base: Path = getattr(self, "base_dir", None) or Path.cwd()
        return (base / relative).resolve()


@dataclass(frozen=True)
class NodeConfig(_ConfigBase):
    """Config of one HSA (`hsa-node --config FILE`)."""

    domain_id: str
    genesis_hash: str  # hex; the trust anchor
    host_id: str
    identity_dir: str  # identity_files.save_host_identity() directory
    data_dir: str  # verified states, peer cache, audit log
    genesis_state: str  # serialized genesis SealedState
    tls: TlsFiles
    listen: str = "127.0.0.1:0"
    # "host:port" others dial to reach this HSA, told to the coordinator and the peers; "": the
    # address bound (`listen`). Set when listening on every interface (0.0.0.0) under a DNS name.
    advertise_address: str = ""
    # Prometheus metrics (plain HTTP, `domain_edge.metrics`): loopback by default; "" for none.
    # Each key service worker serves its own, on this host with a port of its own.
    metrics_listen: str = "127.0.0.1:0"
    # host:port of the coordinator's mutual-TLS listener; of every replica, comma-separated
    coordinator: str = ""
    pull_interval_seconds: float = 2.0
    gossip_interval_seconds: float = 2.0
    # Data-plane worker processes serving KeyService beside the main process (0: none).
    key_service_workers: int = 0
    # The one coordinator whose HsaAdmin calls this HSA takes: its SPIFFE id, and the SHA-256
    # fingerprints (hex) of the TLS certificates it may present (empty: any certificate the
    # domain CA issued for that id). No id: HsaAdmin refuses everyone (GetStatus aside).
    coordinator_identity: str = ""
    coordinator_fingerprints: tuple[str, ...] = ()
    # Overrides of `domain_core.limits.Limits` (e.g. {"create_key_per_second": 20}).
    limits: dict[str, float] = field(default_factory=dict)
    # How long this HSA may go without a peer confirming its head (same version and hash,
    # signed) before it refuses key administration (docs/runtime.md "Peers"); 0: automatic,
    # `head_confirmation_bound` (30 s, or 5 gossip intervals if that is longer).
    head_confirmation_seconds: float = 0.0
    # Where other HSAs may listen ("host:port"): hints beside the coordinator's list and the
    # cached peers.json. Who answers is checked by its signature, never by the address.
    peer_addresses: tuple[str, ...] = ()
    # The memory each key service process (the main one, each worker) may give its cache of
    # verified keys, by estimate (hsa_node.keycache.CachedKey.size): MiB, 1 to 65536.
    key_cache_mib: int = 512
    base_dir: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate_domain_id(self.domain_id)
        _check_hash(self.genesis_hash)
        check_worker_count(self.key_service_workers)
        if self.coordinator:
            try:
                split_addresses(self.coordinator)
            except InvalidInputError as error:
                raise InvalidInputError(f"coordinator: {error.message}") from None
        mib = self.key_cache_mib
        if isinstance(mib, bool) or not isinstance(mib, int) or not 1 <= mib <= MAX_KEY_CACHE_MIB:
            raise InvalidInputError(
                f"key_cache_mib must be a whole number of MiB from 1 to {MAX_KEY_CACHE_MIB}, "
                f"not {mib!r}"
            )
        if self.coordinator_identity:
            coordinator = coordinator_spiffe_id(self.coordinator_identity)
            if coordinator.domain != self.domain_id:
                raise InvalidInputError(
                    f"coordinator_identity {coordinator.uri} belongs to another trust domain "
                    f"than {self.domain_id}"
                )
        object.__setattr__(
            self, "coordinator_fingerprints", _fingerprints(self.coordinator_fingerprints)
        )
        if self.coordinator_fingerprints and not self.coordinator_identity:
            raise InvalidInputError(
                "coordinator_fingerprints needs coordinator_identity (the coordinator's SPIFFE id)"
            )
        object.__setattr__(self, "peer_addresses", _check_addresses(self.peer_addresses))
        if self.advertise_address:
            _check_addresses([self.advertise_address], "advertise_address")
        bound, gossip = self.head_confirmation_seconds, self.gossip_interval_seconds
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not (bound == 0 or 2 * gossip <= bound <= MAX_HEAD_CONFIRMATION_SECONDS)
        ):
            raise InvalidInputError(
                f"head_confirmation_seconds must be 0 (automatic) or a number of seconds from "
                f"twice gossip_interval_seconds ({2 * gossip:g}) to "
                f"{MAX_HEAD_CONFIRMATION_SECONDS:g}, not {bound!r}: peers confirm the head "
                "once per gossip round"
            )
        self.effective_limits()

    def effective_limits(self) -> Limits:
        """The default limits with this config's `limits` over them."""
        return _limits(self.limits)

    @property
    def head_confirmation_bound(self) -> float:
        """Seconds without a peer confirming the head before key administration is refused."""
        if self.head_confirmation_seconds:
            return float(self.head_confirmation_seconds)
        return max(
            DEFAULT_HEAD_CONFIRMATION_SECONDS,
            HEAD_CONFIRMATION_ROUNDS * self.gossip_interval_seconds,
        )


@dataclass(frozen=True)
class CoordinatorConfig(_ConfigBase):
    """Config of a coordinator (`domain-coordinator --config FILE`)."""

    domain_id: str
    genesis_hash: str
    name: str
    genesis_state: str
    tls: TlsFiles
    store: str = "sqlite:coordinator.db"  # "sqlite:PATH" (the only backend today)
    listen: str = "127.0.0.1:0"  # mutual TLS: HSAs
    operator_listen: str = "127.0.0.1:0"  # server-auth TLS: operators sign what they submit
    # Prometheus metrics (plain HTTP, `domain_edge.metrics`): loopback by default; "" for none.
    metrics_listen: str = "127.0.0.1:0"
    hsa_call_timeout_seconds: float = 10.0
    # How long a deleted key record is kept as a tombstone (recoverable, never reused).
    key_tombstone_days: int = 30
    # How long a closed proposal (applied, expired, cancelled, stale, rejected) is kept for
    # operators to look up before it is purged with its approvals (once it has expired too).
    proposal_retention_days: int = 30
    # Overrides of `domain_core.limits.Limits` (e.g. {"max_keys_per_principal": 1000}).
    limits: dict[str, float] = field(default_factory=dict)
    base_dir: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate_domain_id(self.domain_id)
        _check_hash(self.genesis_hash)
        for name in ("key_tombstone_days", "proposal_retention_days"):
            days = getattr(self, name)
            if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
                raise InvalidInputError(
                    f"{name} must be a whole number of days from 1 to 3650, not {days!r}"
                )
        self.effective_limits()

    def effective_limits(self) -> Limits:
        """The default limits with this config's `limits` over them."""
        return _limits(self.limits)


def _limits(overrides: object) -> Limits:
    if not isinstance(overrides, dict):
        raise InvalidInputError(
            f"limits must be a JSON object of limit names to numbers, not {overrides!r}"
        )
    return DEFAULT_LIMITS.with_overrides(overrides, "limits")


def _check_addresses(value: object, name: str = "peer_addresses") -> tuple[str, ...]:
    """`value` (a list from JSON) as a tuple of "host:port" strings; InvalidInputError if not."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidInputError(f'{name} must be a list of "host:port" strings')
    for address in value:
        host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise InvalidInputError(
                f"{name}: {str(address)[:80]!r} is not an address of the form host:port"
            )
    return tuple(value)


def check_worker_count(value: object) -> int:
    """`value` as a number of key service worker processes (0..16); InvalidInputError if not."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            f"key_service_workers must be a whole number from 0 to {MAX_KEY_SERVICE_WORKERS}, "
            f"not {value!r}"
        )
    if not 0 <= value <= MAX_KEY_SERVICE_WORKERS:
        raise InvalidInputError(
            f"key_service_workers must be from 0 to {MAX_KEY_SERVICE_WORKERS} (worker processes "
            f"beside the main HSA process), not {value}"
        )
    return value


def coordinator_spiffe_id(value: object) -> SpiffeId:
    """`value` as a coordinator's SPIFFE id (`spiffe://<domain>/coordinator/<name>`)."""
    if not isinstance(value, str):
        raise InvalidInputError("coordinator_identity must be a string (a SPIFFE id)")
    try:
        spiffe = SpiffeId.parse(value)
    except InvalidInputError as error:
        raise InvalidInputError(f"coordinator_identity: {error.message}") from None
    if spiffe.kind != "coordinator":
        raise InvalidInputError(
            f"coordinator_identity {spiffe.uri} is not a coordinator's id "
            "(spiffe://<domain>/coordinator/<name>)"
        )
    return spiffe


def _fingerprints(values: object) -> tuple[str, ...]:
    """Certificate fingerprints as lower-case hex strings of 32 bytes, without duplicates."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise InvalidInputError("coordinator_fingerprints must be a list of hex SHA-256 digests")
    found: list[str] = []
    for value in values:
        try:
            ok = isinstance(value, str) and len(bytes.fromhex(value)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise InvalidInputError(
                "coordinator_fingerprints holds something that is not 64 hex characters "
                "(the SHA-256 of a certificate's DER encoding)"
            )
        if value.lower() not in found:
            found.append(value.lower())
    return tuple(found)


def _check_hash(value: str) -> None:
    try:
        ok = len(bytes.fromhex(value)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise InvalidInputError("genesis_hash must be 64 hex characters")
