"""The bundles of a domain across hosts: `hsm-domain init DIR --host NAME=ADDR ... --coordinator
ADDR` turns the node and coordinator directories it made into one directory per process, each
to be copied to its machine and started there (`hsa-node --config BUNDLE/config.json`).

A bundle holds its config.json, every file the config names (paths relative to it), the pinned
genesis and the domain CA certificate:

    bundles/<host>/        config.json, identity/ (keys 0600), data/, enrollment.bin,
                           genesis.state, ca.crt
    bundles/coordinator/   config.json, tls.crt, tls.key (0600), genesis.state, ca.crt; its
                           SQLite store (coordinator.db) is made beside config.json

Invariants kept here:
- a host's private keys exist once: its node directory is moved (renamed) into its bundle,
  never copied; every bundle is 0700;
- each process listens where its address says (`domain_edge.hosts.HostAddress`): an HSA on
  its IP, or on every interface advertising its DNS name; the coordinator on its port for
  HSAs and the next one for operators; metrics on loopback unless `expose_metrics`;
- every HSA config names the coordinator's address and pins its certificate, as local
  configs do (`deploy._coordinators.coordinator_pin`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy._coordinators import SQLITE_STORE, PinnedCoordinator, coordinator_pin
from deploy._domain_layout import read_domain_file
from deploy._files import make_private_dir
from domain_core.errors import InvalidInputError
from domain_edge.config import CoordinatorConfig, NodeConfig, TlsFiles
from domain_edge.hosts import METRICS_PORT_OFFSET, DomainAddresses, HostAddress
from domain_edge.identity_files import TLS_CERTIFICATE_FILE, TLS_KEY_FILE
from domain_edge.layout import (
    CONFIG_FILE,
    COORDINATOR_NAME,
    DATA_DIR,
    GENESIS_FILE,
    IDENTITY_DIR,
    DomainPaths,
)

__all__ = [
    "BundleSettings",
    "check_addresses",
    "domain_addresses",
    "hosts_summary",
    "make_bundles",
    "node_bundle",
]

_CA_FILE = "ca.crt"


def check_addresses(hosts: Sequence[tuple[str, HostAddress]], coordinator: HostAddress) -> None:
    """InvalidInputError unless every host id is unique and no two processes would listen on
    one address (each takes its port and its metrics port, port + 2000; the coordinator also
    the next port, for operators)."""
    names = [name for name, _ in hosts]
    if len(set(names)) != len(names):
        raise InvalidInputError("--host names a host id twice: each HSA has one address")
    for name, address in [*hosts, (COORDINATOR_NAME, coordinator)]:
        if address.port + METRICS_PORT_OFFSET + 1 > 65535:
            raise InvalidInputError(
                f"{name}'s port {address.port} is too high: its metrics use the port + "
                f"{METRICS_PORT_OFFSET} (and the coordinator's operators the next port)"
            )
    taken: dict[str, str] = {}
    claims = [(COORDINATOR_NAME, coordinator.with_port(coordinator.port + 1))]
    for name, where in [*hosts, (COORDINATOR_NAME, coordinator)]:
        claims += [
            (name, where.address),
            (name, where.with_port(where.port + METRICS_PORT_OFFSET)),
        ]
    for name, claimed in claims:
        if claimed in taken:
            raise InvalidInputError(
                f"{taken[claimed]} and {name} would both listen on {claimed}: give one of "
                "them another port (NAME=HOST:PORT)"
            )
        taken[claimed] = name


def domain_addresses(
    hosts: Sequence[tuple[str, HostAddress]], coordinator: HostAddress
) -> DomainAddresses:
    """What `domain.json` keeps of the addresses (the tools' way to the domain)."""
    return DomainAddresses(
        hsas={name: address.address for name, address in hosts},
        coordinator=coordinator.address,
        operator=coordinator.with_port(coordinator.port + 1),
    )


def _metrics_listen(address: HostAddress, expose: bool) -> str:
    """Metrics on the process's port + 2000: on its own address when `expose`, else loopback."""
    port = address.port + METRICS_PORT_OFFSET
    return address.listen(port) if expose else f"127.0.0.1:{port}"


def _copy_public_files(paths: DomainPaths, bundle: Path) -> None:
    """The pinned genesis and the CA certificate, beside the config (public files)."""
    shutil.copyfile(paths.genesis_state, bundle / GENESIS_FILE)
    shutil.copyfile(paths.ca_cert, bundle / _CA_FILE)
    for name in (GENESIS_FILE, _CA_FILE):
        (bundle / name).chmod(0o644)


@dataclass(frozen=True)
class BundleSettings:
    """What every HSA bundle of a domain across hosts shares: the pins, the coordinator's
    address and certificate pin, the workers and where metrics listen. `domain.json` keeps it
    (`across_hosts`), so that `hsm-domain add-node --host` makes a bundle like the others."""

    domain_id: str
    genesis_hash: bytes
    coordinator: HostAddress
    pin: PinnedCoordinator
    workers: int = 0
    expose_metrics: bool = False

    def to_json(self) -> dict[str, Any]:
        """The `across_hosts` object of `domain.json` (public facts only)."""
        return {
            "coordinator_identity": self.pin.identity,
            "coordinator_fingerprints": list(self.pin.fingerprints),
            "workers": self.workers,
            "expose_metrics": self.expose_metrics,
        }

    @classmethod
    def from_document(
        cls, document: dict[str, Any], addresses: DomainAddresses, where: str
    ) -> BundleSettings:
        """The settings in `domain.json` (`document`, its `addresses` already read) of a
        domain across hosts."""
        shared = document.get("across_hosts")
        refusal = InvalidInputError(
            f"{where}: across_hosts needs coordinator_identity, coordinator_fingerprints, "
            "workers and expose_metrics"
        )
        if not isinstance(shared, dict):
            raise refusal
        identity, fingerprints = (
            shared.get("coordinator_identity"),
            shared.get("coordinator_fingerprints"),
        )
        workers, expose = shared.get("workers"), shared.get("expose_metrics")
        if (
            not isinstance(identity, str)
            or not isinstance(fingerprints, list)
            or not all(isinstance(f, str) for f in fingerprints)
            or isinstance(workers, bool)
            or not isinstance(workers, int)
            or not isinstance(expose, bool)
        ):
            raise refusal
        try:
            genesis_hash = bytes.fromhex(str(document["genesis_hash"]))
        except (KeyError, ValueError):
            raise refusal from None
        return cls(
            domain_id=str(document.get("domain_id")),
            genesis_hash=genesis_hash,
            coordinator=HostAddress.parse(addresses.coordinator, 0),
            pin=PinnedCoordinator(identity, tuple(fingerprints)),
            workers=workers,
            expose_metrics=expose,
        )


def node_bundle(
    paths: DomainPaths, host_id: str, address: HostAddress, shared: BundleSettings
) -> Path:
    """Move node `host_id`'s directory into its bundle, with the public files and a config
    for `address`; the bundle."""
    bundle = paths.bundle_dir(host_id)
    make_private_dir(paths.bundles_dir)
    os.rename(paths.node_dir(host_id), bundle)
    _copy_public_files(paths, bundle)
    NodeConfig(
        domain_id=shared.domain_id,
        genesis_hash=shared.genesis_hash.hex(),
        host_id=host_id,
        identity_dir=IDENTITY_DIR,
        data_dir=DATA_DIR,
        genesis_state=GENESIS_FILE,
        tls=TlsFiles(
            ca=_CA_FILE,
            cert=f"{IDENTITY_DIR}/{TLS_CERTIFICATE_FILE}",
            key=f"{IDENTITY_DIR}/{TLS_KEY_FILE}",
        ),
        listen=address.listen(),
        advertise_address="" if address.is_ip else address.address,
        metrics_listen=_metrics_listen(address, shared.expose_metrics),
        coordinator=shared.coordinator.address,
        key_service_workers=shared.workers,
        coordinator_identity=shared.pin.identity,
        coordinator_fingerprints=shared.pin.fingerprints,
    ).save(bundle / CONFIG_FILE)
    if paths.nodes_dir.is_dir() and not any(paths.nodes_dir.iterdir()):
        paths.nodes_dir.rmdir()
    return bundle


def make_bundles(
    paths: DomainPaths,
    hosts: Sequence[tuple[str, HostAddress]],
    coordinator: HostAddress,
    *,
    genesis_hash: bytes,
    domain_id: str,
    workers: int,
    expose_metrics: bool,
) -> BundleSettings:
    """Move every node directory and the coordinator's into `DIR/bundles/`, each made
    self-contained with its config for its address; what the HSA bundles share."""
    shared = BundleSettings(
        domain_id=domain_id,
        genesis_hash=genesis_hash,
        coordinator=coordinator,
        pin=coordinator_pin(paths.root, [COORDINATOR_NAME]),
        workers=workers,
        expose_metrics=expose_metrics,
    )
    for host_id, address in hosts:
        node_bundle(paths, host_id, address, shared)
    bundle = paths.bundle_dir(COORDINATOR_NAME)
    os.rename(paths.coordinator_dir, bundle)
    _copy_public_files(paths, bundle)
    CoordinatorConfig(
        domain_id=domain_id,
        genesis_hash=genesis_hash.hex(),
        name=COORDINATOR_NAME,
        genesis_state=GENESIS_FILE,
        tls=TlsFiles(ca=_CA_FILE, cert=TLS_CERTIFICATE_FILE, key=TLS_KEY_FILE),
        store=SQLITE_STORE,
        listen=coordinator.listen(),
        operator_listen=coordinator.listen(coordinator.port + 1),
        metrics_listen=_metrics_listen(coordinator, expose_metrics),
    ).save(bundle / CONFIG_FILE)
    return shared


def hosts_summary(root: Path) -> dict[str, Any]:
    """What `hsm-domain init --host ... --json` prints of the domain in `root`: its pins, where
    each process is reached, each bundle, and the ceremony's files that stay in `root`."""
    paths = DomainPaths(root)
    document = read_domain_file(root)
    addresses = DomainAddresses.from_json(document.get("addresses"), str(paths.domain_file))
    reached = dict(addresses.hsas) | {COORDINATOR_NAME: addresses.coordinator}
    return {
        "directory": str(root),
        "domain_id": document["domain_id"],
        "genesis_hash": document["genesis_hash"],
        "quorum": document["quorum"],
        "addresses": addresses.to_json(),
        "listen": reached,
        "bundles": {name: str(paths.bundle_dir(name)) for name in reached},
        "operators": {
            str(o["name"]): str(paths.operator_token(str(o["name"]))) for o in document["operators"]
        },
        "genesis_state": str(paths.genesis_state),
        "ca_certificate": str(paths.ca_cert),
        "client_certificate": str(paths.client_cert),
        "client_key": str(paths.client_key),
    }
