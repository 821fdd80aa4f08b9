"""`hsm-domain init`: create every file of a local domain, genesis ceremony included.

Invariants kept here:
- the tree is exactly the one docs/runtime.md lists ("Files of a local domain"), every path
  taken from `domain_edge.layout.DomainPaths`; paths inside config files are relative to the
  config file, so a domain directory can be moved;
- every private key, token and passphrase file is created 0600 and never overwritten; the
  domain directory and every directory holding secrets is 0700;
- a domain directory appears complete or not at all: a new one is built in a temporary
  sibling and renamed into place; an existing empty one is filled in place and emptied again
  if `init` fails; `init` refuses a directory that is not empty;
- the genesis state written is approved by every genesis operator (each token opened with its
  passphrase, as at a real ceremony), sealed by hsa-1, and verified against its own hash
  before `domain.json` pins that hash;
- every node config (genesis nodes and nodes added later) pins the coordinators: their one
  SPIFFE id and the fingerprint of every certificate issued to them here
  (`coordinator_identity`, `coordinator_fingerprints`; `deploy._coordinators`), so an HSA
  takes HsaAdmin calls from those certificates only;
- a domain on SQLite has one coordinator in `DIR/coordinator/`, exactly as before replicas; a
  domain on etcd has replicas `coordinator-1..N` sharing one etcd cluster, whose members'
  ports `init` chooses and keeps in `DIR/etcd/cluster.json` (`deploy._etcd_members`).

Passphrase files are a LOCAL DEMO convenience: a real domain never writes them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from deploy._ceremony import create_operator_tokens, genesis_ceremony, operator_names
from deploy._coordinators import (
    ETCD,
    SQLITE,
    SQLITE_STORE,
    PinnedCoordinator,
    check_coordinators,
    coordinator_config,
    coordinator_names,
    coordinator_pin,
)
from deploy._domain_layout import DomainLayout, load_layout, read_domain_file
from deploy._etcd_members import DomainEtcd
from deploy._files import make_private_dir, replace_file, write_json, write_secret_file
from deploy.bundles import (
    BundleSettings,
    check_addresses,
    domain_addresses,
    make_bundles,
    node_bundle,
)
from deploy.enrollment import VerifiedEnrollment, make_enrollment, verify_enrollment
from domain_core.errors import AlreadyExistsError, InvalidInputError
from domain_core.identity import HostIdentity
from domain_core.limits import DEFAULT_LIMITS
from domain_core.pki import (
    DomainCA,
    SpiffeId,
    is_valid_trust_domain,
    new_tls_key_pem,
    tls_public_key,
)
from domain_edge.ca_files import load_domain_ca, save_domain_ca
from domain_edge.config import (
    FLOORS_COMPLETE_FILE,
    NodeConfig,
    TlsFiles,
    check_worker_count,
)
from domain_edge.file_tokens import (
    DEFAULT_SCRYPT_N,
)
from domain_edge.hosts import DomainAddresses, HostAddress
from domain_edge.identity_files import (
    TLS_CERTIFICATE_FILE,
    TLS_KEY_FILE,
    save_host_certificate,
    save_host_identity,
)
from domain_edge.layout import COORDINATOR_NAME, DEMO_CLIENT, ENROLLMENT_FILE, DomainPaths

__all__ = [
    "COORDINATOR_NAME",
    "DEMO_CLIENT",
    "DomainLayout",
    "PinnedCoordinator",
    "add_node",
    "add_node_across_hosts",
    "coordinator_pin",
    "init_domain",
    "init_domain_across_hosts",
    "load_layout",
    "operator_names",
    "read_passphrase",
]

_HOST_PREFIX: Final = "hsa-"
_HOST_NUMBER: Final = re.compile(r"^hsa-(\d+)$")
_DOMAIN_FORMAT: Final = "hsm-domain-local"


def read_passphrase(path: Path) -> bytes:
    """The passphrase stored in a demo passphrase file (surrounding whitespace stripped)."""
    return Path(path).read_bytes().strip()


def _validate_counts(nodes: int, operators: int, threshold: int, domain_id: str) -> None:
    if not isinstance(nodes, int) or not 1 <= nodes <= DEFAULT_LIMITS.max_hosts:
        raise InvalidInputError(
            f"--nodes must be between 1 and {DEFAULT_LIMITS.max_hosts}, not {nodes}"
        )
    if not isinstance(operators, int) or not 1 <= operators <= DEFAULT_LIMITS.max_operators:
        raise InvalidInputError(
            f"--operators must be between 1 and {DEFAULT_LIMITS.max_operators}, not {operators}"
        )
    if not isinstance(threshold, int) or not 1 <= threshold <= operators:
        raise InvalidInputError(
            f"--quorum must be between 1 and the number of operators ({operators}), not {threshold}"
        )
    if not is_valid_trust_domain(domain_id) or len(domain_id) > 63:
        raise InvalidInputError(
            f"invalid domain id {str(domain_id)[:80]!r}: use 1-63 lower-case letters, digits, "
            "'-' and '.'"
        )


def _aware(now: datetime | None) -> datetime:
    """`now`, or the current time; ValueError for a naive datetime."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _check_host_id(domain_id: str, host_id: str) -> None:
    """InvalidInputError unless `host_id` makes a valid SPIFFE id of an HSA of the domain."""
    try:
        SpiffeId(domain_id, "hsa", host_id)
    except InvalidInputError as error:
        raise InvalidInputError(f"invalid host id: {error.message}") from None


def _check_target(directory: Path) -> None:
    if directory.exists():
        if not directory.is_dir():
            raise AlreadyExistsError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()):
            has_domain = DomainPaths(directory).domain_file.exists()
            what = "a domain" if has_domain else "files (it is not empty)"
            raise AlreadyExistsError(
                f"{directory} holds {what} already; choose a new directory "
                "(init never overwrites a domain)"
            )


# (DNS names, IP addresses) a certificate carries besides its SPIFFE names: a local domain's.
_LOCAL_NAMES: Final = (("localhost",), ("127.0.0.1", "::1"))
_Names = tuple[tuple[str, ...], tuple[str, ...]]


def _issue_client_files(
    ca: DomainCA, spiffe: SpiffeId, directory: Path, now: datetime, names: _Names = _LOCAL_NAMES
) -> None:
    """A fresh P-256 key (0600) and a CA-issued certificate in `directory`."""
    make_private_dir(directory)
    key_pem = new_tls_key_pem()
    cert_pem = ca.issue(
        spiffe, tls_public_key(key_pem), now=now, dns_names=names[0], ip_addresses=names[1]
    )
    write_secret_file(directory / TLS_KEY_FILE, key_pem)
    replace_file(directory / TLS_CERTIFICATE_FILE, cert_pem)


def _relative(path: Path, start: Path) -> str:
    """`path` as a config file in `start` names it (configs hold relative paths)."""
    return os.path.relpath(path, start)


def _node_config(
    paths: DomainPaths,
    domain_id: str,
    genesis_hash: bytes,
    host_id: str,
    coordinator: str,
    pin: PinnedCoordinator,
    workers: int = 0,
) -> NodeConfig:
    node_dir = paths.node_dir(host_id)
    identity = paths.node_identity_dir(host_id)
    return NodeConfig(
        domain_id=domain_id,
        genesis_hash=genesis_hash.hex(),
        host_id=host_id,
        identity_dir=_relative(identity, node_dir),
        data_dir=_relative(paths.node_data_dir(host_id), node_dir),
        genesis_state=_relative(paths.genesis_state, node_dir),
        tls=TlsFiles(
            ca=_relative(paths.ca_cert, node_dir),
            cert=_relative(identity / TLS_CERTIFICATE_FILE, node_dir),
            key=_relative(identity / TLS_KEY_FILE, node_dir),
        ),
        coordinator=coordinator,
        key_service_workers=workers,
        coordinator_identity=pin.identity,
        coordinator_fingerprints=pin.fingerprints,
    )


def _create_host(
    paths: DomainPaths,
    ca: DomainCA,
    domain_id: str,
    host_id: str,
    now: datetime,
    names: _Names = _LOCAL_NAMES,
) -> tuple[HostIdentity, VerifiedEnrollment]:
    """Identity, CA-issued TLS certificate (naming `names` besides its SPIFFE names) and
    enrollment (`enrollment.bin`) of one new node under `paths`; the enrollment is verified
    against the CA before it is written."""
    make_private_dir(paths.node_dir(host_id))
    identity_dir = paths.node_identity_dir(host_id)
    identity = HostIdentity.generate(host_id)
    save_host_identity(identity, identity_dir)
    cert_pem = ca.issue(
        identity.spiffe_id(domain_id),
        identity.tls_public_key,
        now=now,
        dns_names=names[0],
        ip_addresses=names[1],
    )
    save_host_certificate(identity, identity_dir, cert_pem)
    make_private_dir(paths.node_data_dir(host_id))
    raw = make_enrollment(identity, domain_id, cert_pem)
    enrollment = verify_enrollment(
        raw, domain_id=domain_id, ca_certificate=ca.certificate_der, now=now
    )
    replace_file(paths.enrollment_file(host_id), raw)
    return identity, enrollment


@dataclass(frozen=True)
class _Request:
    """What `init_domain` was asked to create."""

    nodes: int
    operators: int
    quorum: int
    domain_id: str
    now: datetime
    scrypt_n: int
    workers: int
    coordinators: tuple[str, ...]
    store: str
    hosts: tuple[tuple[str, HostAddress], ...] = ()
    coordinator_address: HostAddress | None = None
    expose_metrics: bool = False

    @property
    def host_ids(self) -> list[str]:
        """The genesis hosts: the names given with their addresses, or hsa-1..N."""
        if self.hosts:
            return [name for name, _ in self.hosts]
        return [f"{_HOST_PREFIX}{index}" for index in range(1, self.nodes + 1)]

    def names_of(self, host_id: str | None) -> _Names:
        """What the certificate of `host_id` (None: a coordinator) names besides its SPIFFE
        names: its address across hosts, localhost in a local domain."""
        if self.coordinator_address is None:
            return _LOCAL_NAMES
        if host_id is None:
            return self.coordinator_address.certificate_names
        return dict(self.hosts)[host_id].certificate_names


def init_domain(
    directory: Path,
    *,
    nodes: int = 3,
    operators: int = 3,
    quorum: int = 2,
    domain_id: str = "local",
    now: datetime | None = None,
    scrypt_n: int = DEFAULT_SCRYPT_N,
    workers: int = 0,
    coordinators: int = 1,
    store: str | None = None,
) -> DomainLayout:
    """Create a local domain in `directory` (absent or empty) and return its layout.

    Creates the CA, `nodes` hosts (hsa-1..hsa-N), the coordinators' and the demo client's TLS
    files, `operators` file tokens with demo passphrase files, and the genesis state approved
    by every operator and sealed by hsa-1. Refuses a non-empty directory. `workers` is each
    node's number of key service worker processes (`key_service_workers`, 0 to 16).
    `coordinators` replicas share the `store` ("sqlite" or "etcd"; None: etcd for 2 or more
    coordinators); on etcd, `init` also chooses the ports of a 3-member etcd cluster.
    """
    _validate_counts(nodes, operators, quorum, domain_id)
    check_worker_count(workers)
    chosen_store = check_coordinators(coordinators, store)
    request = _Request(
        nodes,
        operators,
        quorum,
        domain_id,
        _aware(now),
        scrypt_n,
        workers,
        tuple(coordinator_names(coordinators, chosen_store)),
        chosen_store,
    )
    return load_layout(_create(Path(directory), request))


def init_domain_across_hosts(
    directory: Path,
    hosts: Sequence[tuple[str, HostAddress]],
    coordinator: HostAddress,
    *,
    operators: int = 3,
    quorum: int = 2,
    domain_id: str = "local",
    now: datetime | None = None,
    scrypt_n: int = DEFAULT_SCRYPT_N,
    workers: int = 0,
    expose_metrics: bool = False,
) -> Path:
    """Create a domain whose HSAs (`hosts`: host id, address) and one coordinator (on
    SQLite) run on machines of their own, and return its directory.

    As `init_domain`, but every certificate names its process's address, and every process's
    files end up in a bundle to copy to its machine (`deploy.bundles`), not in `nodes/` and
    `coordinator/`; `domain.json` keeps the addresses for the tools.
    """
    if not hosts:
        raise InvalidInputError("a domain across hosts needs --host NAME=ADDRESS for each HSA")
    check_addresses(hosts, coordinator)
    _validate_counts(len(hosts), operators, quorum, domain_id)
    check_worker_count(workers)
    for host_id, _ in hosts:
        _check_host_id(domain_id, host_id)
    request = _Request(
        len(hosts),
        operators,
        quorum,
        domain_id,
        _aware(now),
        scrypt_n,
        workers,
        (COORDINATOR_NAME,),
        SQLITE,
        tuple(hosts),
        coordinator,
        expose_metrics,
    )
    return _create(Path(directory), request)


def _create(directory: Path, request: _Request) -> Path:
    """Build the domain of `request` in `directory` (absent or empty): complete, or not at
    all."""
    directory = directory.absolute()
    _check_target(directory)
    if directory.exists():
        # An existing empty directory (maybe the caller's cwd) is filled in place and emptied
        # again on failure, rather than replaced.
        directory.chmod(0o700)
        try:
            _build(DomainPaths(directory), request)
        except BaseException:
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            raise
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.init-{secrets.token_hex(4)}"
    make_private_dir(staging)
    try:
        _build(DomainPaths(staging), request)
        os.rename(staging, directory)  # refuses a non-empty directory that appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _build(paths: DomainPaths, request: _Request) -> None:
    """Every file of a new domain under `paths.root`, in the order a real ceremony makes them:
    CA, hosts, TLS files, operator tokens, the genesis, then the configs and `domain.json`."""
    domain_id, now = request.domain_id, request.now
    ca = DomainCA.create(domain_id, now=now)
    save_domain_ca(ca, paths.ca_dir)
    identities: dict[str, HostIdentity] = {}
    enrollments: list[VerifiedEnrollment] = []
    for host_id in request.host_ids:
        identities[host_id], enrollment = _create_host(
            paths, ca, domain_id, host_id, now, request.names_of(host_id)
        )
        enrollments.append(enrollment)
    # Every replica carries the one SPIFFE id of the service, each with a key of its own.
    coordinator = SpiffeId(domain_id, "coordinator", COORDINATOR_NAME)
    for name in request.coordinators:
        _issue_client_files(
            ca, coordinator, paths.coordinator_dir_of(name), now, request.names_of(None)
        )
    _issue_client_files(ca, SpiffeId(domain_id, "client", DEMO_CLIENT), paths.client_dir, now)
    tokens = create_operator_tokens(paths, request.operators, request.scrypt_n)
    state = genesis_ceremony(
        ca,
        enrollments,
        identities,
        tokens,
        domain_id=domain_id,
        threshold=request.quorum,
        now=now,
    )
    replace_file(paths.genesis_state, state.to_bytes())
    _write_configs(paths, [e.host.host_id for e in enrollments], state.hash, request)
    document: dict[str, Any] = {}
    if request.coordinator_address is not None:
        shared = make_bundles(
            paths,
            request.hosts,
            request.coordinator_address,
            genesis_hash=state.hash,
            domain_id=domain_id,
            workers=request.workers,
            expose_metrics=request.expose_metrics,
        )
        addresses = domain_addresses(request.hosts, request.coordinator_address)
        document["addresses"] = addresses.to_json()
        document["across_hosts"] = shared.to_json()
    write_json(
        paths.domain_file,
        document
        | {
            "format": _DOMAIN_FORMAT,
            "domain_id": domain_id,
            "genesis_hash": state.hash.hex(),
            "nodes": [e.host.host_id for e in enrollments],
            "operators": [
                {"name": t.record.name, "operator_id": t.record.operator_id} for t in tokens
            ],
            "quorum": request.quorum,
        },
    )


def _write_configs(
    paths: DomainPaths, hosts: list[str], genesis_hash: bytes, request: _Request
) -> None:
    """Every node's config, the coordinators' configs (and on etcd the etcd cluster's file),
    and the run and log directories."""
    pin = coordinator_pin(paths.root, request.coordinators)
    for host_id in hosts:
        config = _node_config(
            paths, request.domain_id, genesis_hash, host_id, "", pin, request.workers
        )
        config.save(paths.node_config(host_id))
        # No key exists yet: every genesis host starts with a complete (empty) floor table.
        replace_file(
            paths.node_data_dir(host_id) / FLOORS_COMPLETE_FILE,
            (genesis_hash.hex() + "\n").encode(),
        )
    store = SQLITE_STORE
    if request.store == ETCD:
        store = DomainEtcd.create(paths).store_spec
    for name in request.coordinators:
        coordinator_config(paths, name, request.domain_id, genesis_hash, store).save(
            paths.coordinator_config_of(name)
        )
    if request.coordinator_address is None:  # processes of a local domain run here
        for directory in (paths.run_dir, paths.log_dir):
            make_private_dir(directory)


def _next_host_id(layout: DomainLayout) -> str:
    taken = set(layout.node_configs) | set(layout.genesis_nodes)
    if layout.nodes_dir.is_dir():
        taken |= {p.name for p in layout.nodes_dir.iterdir()}
    numbers = [int(m.group(1)) for h in taken if (m := _HOST_NUMBER.match(h))]
    return f"{_HOST_PREFIX}{max(numbers, default=0) + 1}"


def add_node(directory: Path, host_id: str | None = None, *, now: datetime | None = None) -> Path:
    """Prepare a new node (not yet in the domain) and return its enrollment file's path.

    Creates `nodes/<host>/` with a fresh identity, a CA-issued TLS certificate, a config and
    `enrollment.bin` (a `HostEnrollment` signed by the host's signing and TLS keys) that
    operators turn into an add-host proposal. The host id defaults to the next free `hsa-N`.
    """
    layout = load_layout(directory)
    now = now or datetime.now(UTC)
    if host_id is None:
        host_id = _next_host_id(layout)
    _check_host_id(layout.domain_id, host_id)
    node_dir = layout.node_dir(host_id)
    if node_dir.exists():
        raise AlreadyExistsError(f"{node_dir} exists already; choose another host id")
    ca = load_domain_ca(layout.ca_dir)
    coordinator, workers = "", 0
    for path in layout.node_configs.values():
        existing = NodeConfig.load(path)
        coordinator, workers = existing.coordinator, existing.key_service_workers
        if coordinator:
            break
    try:
        _create_host(layout, ca, layout.domain_id, host_id, now)
        pin = coordinator_pin(layout.root)
        _node_config(
            layout, layout.domain_id, layout.genesis_hash, host_id, coordinator, pin, workers
        ).save(layout.node_config(host_id))
    except BaseException:
        shutil.rmtree(node_dir, ignore_errors=True)
        raise
    return layout.enrollment_file(host_id)


def add_node_across_hosts(
    directory: Path, host_id: str, address: HostAddress, *, now: datetime | None = None
) -> Path:
    """Prepare a new HSA of a domain across hosts (not yet in the domain): its bundle, made as
    `init --host` makes them, and `domain.json` listing its address; returns its enrollment
    file (in the bundle), which operators turn into an add-host proposal."""
    paths = DomainPaths(Path(directory).absolute())
    document = read_domain_file(paths.root)
    if "addresses" not in document:
        raise InvalidInputError(
            f"{paths.root} is a local domain: add a node with `hsm-domain add-node` without --host"
        )
    addresses = DomainAddresses.from_json(document["addresses"], str(paths.domain_file))
    shared = BundleSettings.from_document(document, addresses, str(paths.domain_file))
    _check_host_id(shared.domain_id, host_id)
    taken = set(addresses.hsas) | set(document.get("nodes", []))
    if host_id in taken or paths.bundle_dir(host_id).exists() or paths.node_dir(host_id).exists():
        raise AlreadyExistsError(f"{host_id} is a host of this domain already; choose another id")
    known = [(h, HostAddress.parse(a, 0)) for h, a in addresses.hsas.items()]
    check_addresses([*known, (host_id, address)], shared.coordinator)
    ca = load_domain_ca(paths.ca_dir)
    now = _aware(now)
    try:
        _create_host(paths, ca, shared.domain_id, host_id, now, address.certificate_names)
        bundle = node_bundle(paths, host_id, address, shared)
        addresses.hsas[host_id] = address.address
        write_json(paths.domain_file, document | {"addresses": addresses.to_json()})
    except BaseException:
        shutil.rmtree(paths.node_dir(host_id), ignore_errors=True)
        shutil.rmtree(paths.bundle_dir(host_id), ignore_errors=True)
        raise
    return bundle / ENROLLMENT_FILE
