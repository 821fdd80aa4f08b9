"""The coordinators of a local domain as `init` makes them: names, configs, and the pin.

A domain on SQLite has one coordinator, `coordinator` (in `DIR/coordinator/`, as every local
domain had before replicas). A domain on etcd has replicas `coordinator-1..N`, each in
`DIR/coordinator-<n>/` with its own config (its `name`), its own TLS key and certificate, and
one store: the domain's etcd cluster under one key prefix (`deploy._etcd_members.DomainEtcd`).

Invariants kept here:
- every coordinator certificate of a domain carries the same SPIFFE id,
  `spiffe://<domain>/coordinator/coordinator`: the replicas are one logical service to the
  HSAs and clients (each dials the role name `coordinator.<domain>`), with separate keys;
- a node config pins every coordinator: that one SPIFFE id and the fingerprint of every
  coordinator certificate in the domain directory (`coordinator_pin`), so an HSA takes
  HsaAdmin calls from exactly the certificates `init` issued to the replicas, and from any of
  them (whichever leads may push);
- more than one coordinator needs the etcd store: two coordinators on one SQLite file would
  each believe it is alone (`check_coordinators` refuses it before anything is written).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from domain_core.errors import InvalidInputError, NotFoundError
from domain_core.pki import certificate_fingerprint, spiffe_id_from_certificate
from domain_edge.config import CoordinatorConfig, TlsFiles
from domain_edge.layout import COORDINATOR_NAME, DomainPaths, replica_name

__all__ = [
    "ETCD",
    "MAX_COORDINATORS",
    "SQLITE",
    "SQLITE_STORE",
    "STORES",
    "PinnedCoordinator",
    "check_coordinators",
    "coordinator_config",
    "coordinator_names",
    "coordinator_pin",
]

SQLITE: Final = "sqlite"
ETCD: Final = "etcd"
STORES: Final = (SQLITE, ETCD)
# The one coordinator's SQLite file, beside its config.
SQLITE_STORE: Final = "sqlite:coordinator.db"
MAX_COORDINATORS: Final = 9


def check_coordinators(count: int, store: str | None) -> str:
    """The store of a new domain with `count` coordinators: `store` as asked, or (None) etcd
    for more than one coordinator and SQLite for one. InvalidInputError when they do not go
    together."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidInputError(f"--coordinators must be a whole number, not {count!r}")
    if not 1 <= count <= MAX_COORDINATORS:
        raise InvalidInputError(
            f"--coordinators must be between 1 and {MAX_COORDINATORS}, not {count}"
        )
    if store is None:
        return ETCD if count > 1 else SQLITE
    if store not in STORES:
        raise InvalidInputError(f"--store must be one of {', '.join(STORES)}, not {store!r}")
    if store == SQLITE and count > 1:
        raise InvalidInputError(
            f"{count} coordinators cannot share a SQLite store (each would think itself alone): "
            "use --store etcd, or leave --store out (--coordinators 2 or more implies etcd)"
        )
    return store


def coordinator_names(count: int, store: str) -> list[str]:
    """The coordinators of a new domain: `coordinator` alone on SQLite, replicas
    `coordinator-1..N` on etcd."""
    if store == SQLITE:
        return [COORDINATOR_NAME]
    return [replica_name(n) for n in range(1, count + 1)]


def coordinator_config(
    paths: DomainPaths, name: str, domain_id: str, genesis_hash: bytes, store: str
) -> CoordinatorConfig:
    """The config of coordinator `name` (paths in it relative to its directory)."""
    where = paths.coordinator_dir_of(name)
    return CoordinatorConfig(
        domain_id=domain_id,
        genesis_hash=genesis_hash.hex(),
        name=name,
        genesis_state=os.path.relpath(paths.genesis_state, where),
        tls=TlsFiles(
            ca=os.path.relpath(paths.ca_cert, where),
            cert=os.path.relpath(paths.coordinator_cert_of(name), where),
            key=os.path.relpath(paths.coordinator_key_of(name), where),
        ),
        store=store,
    )


@dataclass(frozen=True)
class PinnedCoordinator:
    """What a node config pins of its coordinators: their one SPIFFE id, and the fingerprint
    of each one's certificate."""

    identity: str
    fingerprints: tuple[str, ...]

    @classmethod
    def of_certificate(cls, cert_pem: bytes) -> PinnedCoordinator:
        """The pin of the coordinator that holds `cert_pem`."""
        return cls.of_certificates([cert_pem])

    @classmethod
    def of_certificates(cls, certificates: Sequence[bytes]) -> PinnedCoordinator:
        """The pin of the coordinators holding these certificates, which must all carry one
        SPIFFE id (InvalidInputError otherwise: they would not be one service)."""
        if not certificates:
            raise ValueError("a pin needs at least one certificate")
        identities = {spiffe_id_from_certificate(pem).uri for pem in certificates}
        if len(identities) != 1:
            raise InvalidInputError(
                "the coordinators' certificates carry different SPIFFE ids "
                f"({', '.join(sorted(identities))}): replicas of one domain carry one"
            )
        return cls(
            identity=identities.pop(),
            fingerprints=tuple(certificate_fingerprint(pem).hex() for pem in certificates),
        )


def coordinator_pin(root: Path, names: Sequence[str] | None = None) -> PinnedCoordinator:
    """The pin of the local domain's coordinators (`names`, default every coordinator with a
    config in `root`), from their certificates."""
    paths = DomainPaths(root)
    wanted = list(names) if names is not None else paths.configured_coordinators()
    if not wanted:
        raise NotFoundError(f"{root} has no coordinator (no coordinator*/config.json)")
    certificates = []
    for name in wanted:
        path = paths.coordinator_cert_of(name)
        try:
            certificates.append(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"{path} is missing: the coordinator's certificate is what every node pins"
            ) from None
    return PinnedCoordinator.of_certificates(certificates)
