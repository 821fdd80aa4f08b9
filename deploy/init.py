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

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from deploy._coordinators import (
    ETCD,
    SQLITE_STORE,
    PinnedCoordinator,
    check_coordinators,
    coordinator_config,
    coordinator_names,
    coordinator_pin,
)
from deploy._etcd_members import DomainEtcd
from deploy._files import make_private_dir, replace_file, write_json, write_secret_file
from deploy.enrollment import VerifiedEnrollment, make_enrollment, verify_enrollment
from domain_core import canonical, genesis, model, quorum
from domain_core.chain import TrustedChain
from domain_core.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from domain_core.identity import HostIdentity
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import SealedState
from domain_core.pki import (
    DomainCA,
    SpiffeId,
    is_valid_trust_domain,
    new_tls_key_pem,
    tls_public_key,
)
from domain_core.signers import (
    SignatureAlgorithm,
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
    create_file_token,
    load_file_token,
)
from domain_edge.identity_files import (
    TLS_CERTIFICATE_FILE,
    TLS_KEY_FILE,
    save_host_certificate,
    save_host_identity,
)
from domain_edge.layout import COORDINATOR_NAME, DEMO_CLIENT, DOMAIN_FILE, DomainPaths
from domain_proto import domain_pb2

__all__ = [
    "COORDINATOR_NAME",
    "DEMO_CLIENT",
    "DomainLayout",
    "PinnedCoordinator",
    "add_node",
    "coordinator_pin",
    "init_domain",
    "load_layout",
    "operator_names",
    "read_passphrase",
]

_OPERATOR_NAMES: Final = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
)
_HOST_PREFIX: Final = "hsa-"
_HOST_NUMBER: Final = re.compile(r"^hsa-(\d+)$")
_DOMAIN_FORMAT: Final = "hsm-domain-local"


def operator_names(count: int) -> list[str]:
    """The demo operator names: alice, bob, ... judy, then op-11, op-12, ..."""
    return [_OPERATOR_NAMES[i] if i < len(_OPERATOR_NAMES) else f"op-{i + 1}" for i in range(count)]


def read_passphrase(path: Path) -> bytes:
    """The passphrase stored in a demo passphrase file (surrounding whitespace stripped)."""
    return Path(path).read_bytes().strip()


@dataclass(frozen=True)
class DomainLayout(DomainPaths):
    """A local domain as `load_layout` reads it back: where its files live (`DomainPaths`),
    what `domain.json` pins, and which nodes have a config.

    `node_configs` lists every node that has a config: the genesis hosts in order, then the
    hosts added later with `add_node` (which join the domain only once operators approve).
    `coordinators` lists every coordinator that has a config (`coordinator`, or the replicas
    `coordinator-1..N`); `etcd` is the domain's etcd cluster when it has one.
    """

    domain_id: str
    genesis_hash: bytes
    node_configs: dict[str, Path]
    operator_tokens: dict[str, tuple[Path, Path]]
    genesis_nodes: tuple[str, ...] = ()
    quorum: int = 0
    coordinators: tuple[str, ...] = (COORDINATOR_NAME,)
    etcd: DomainEtcd | None = None

    @property
    def etcd_members(self) -> list[str]:
        """The names of the domain's etcd members (none without an etcd cluster)."""
        return self.etcd.names if self.etcd is not None else []

    @property
    def process_names(self) -> list[str]:
        """Every process of the domain, in the order they start: the etcd members, the
        coordinators, then the nodes (they stop in the reverse order of kinds)."""
        return [*self.etcd_members, *self.coordinators, *self.node_configs]

    @property
    def replicated(self) -> bool:
        """Whether the coordinators are replicas on etcd (`coordinator-<n>`)."""
        return self.coordinators != (COORDINATOR_NAME,)

    @property
    def store_config(self) -> Path:
        """A coordinator config that names the domain's store (every coordinator's names the
        same one): what the store tools (backup, restore, migrate) open."""
        return self.coordinator_config_of(self.coordinators[0])


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


def _issue_client_files(ca: DomainCA, spiffe: SpiffeId, directory: Path, now: datetime) -> None:
    """A fresh P-256 key (0600) and a CA-issued certificate in `directory`."""
    make_private_dir(directory)
    key_pem = new_tls_key_pem()
    cert_pem = ca.issue(spiffe, tls_public_key(key_pem), now=now)
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
    paths: DomainPaths, ca: DomainCA, domain_id: str, host_id: str, now: datetime
) -> tuple[HostIdentity, VerifiedEnrollment]:
    """Identity, CA-issued TLS certificate and enrollment (`enrollment.bin`) of one new node
    under `paths`; the enrollment is verified against the CA before it is written."""
    make_private_dir(paths.node_dir(host_id))
    identity_dir = paths.node_identity_dir(host_id)
    identity = HostIdentity.generate(host_id)
    save_host_identity(identity, identity_dir)
    cert_pem = ca.issue(identity.spiffe_id(domain_id), identity.tls_public_key, now=now)
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
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    request = _Request(
        nodes,
        operators,
        quorum,
        domain_id,
        now,
        scrypt_n,
        workers,
        tuple(coordinator_names(coordinators, chosen_store)),
        chosen_store,
    )
    directory = Path(directory).absolute()
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
        return load_layout(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.init-{secrets.token_hex(4)}"
    make_private_dir(staging)
    try:
        _build(DomainPaths(staging), request)
        os.rename(staging, directory)  # refuses a non-empty directory that appeared meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_layout(directory)


def _build(paths: DomainPaths, request: _Request) -> None:
    """Every file of a new domain under `paths.root`, in the order a real ceremony makes them:
    CA, hosts, TLS files, operator tokens, the genesis, then the configs and `domain.json`."""
    domain_id, now = request.domain_id, request.now
    ca = DomainCA.create(domain_id, now=now)
    save_domain_ca(ca, paths.ca_dir)
    identities: dict[str, HostIdentity] = {}
    enrollments: list[VerifiedEnrollment] = []
    for index in range(1, request.nodes + 1):
        host_id = f"{_HOST_PREFIX}{index}"
        identities[host_id], enrollment = _create_host(paths, ca, domain_id, host_id, now)
        enrollments.append(enrollment)
    # Every replica carries the one SPIFFE id of the service, each with a key of its own.
    coordinator = SpiffeId(domain_id, "coordinator", COORDINATOR_NAME)
    for name in request.coordinators:
        _issue_client_files(ca, coordinator, paths.coordinator_dir_of(name), now)
    _issue_client_files(ca, SpiffeId(domain_id, "client", DEMO_CLIENT), paths.client_dir, now)
    tokens = _create_operator_tokens(paths, request)
    state = _genesis_ceremony(ca, enrollments, identities, tokens, request)
    replace_file(paths.genesis_state, state.to_bytes())
    _write_configs(paths, [e.host.host_id for e in enrollments], state.hash, request)
    write_json(
        paths.domain_file,
        {
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


@dataclass(frozen=True)
class _DemoToken:
    """An operator token `init` made, and the passphrase it holds for the ceremony."""

    record: domain_pb2.Operator
    path: Path
    passphrase: bytes


def _create_operator_tokens(paths: DomainPaths, request: _Request) -> list[_DemoToken]:
    """A file token and a demo passphrase file (0600) for each operator."""
    make_private_dir(paths.operators_dir)
    tokens: list[_DemoToken] = []
    for name in operator_names(request.operators):
        passphrase = secrets.token_urlsafe(32).encode("ascii")
        token_path = paths.operator_token(name)
        write_secret_file(paths.operator_passphrase(name), passphrase + b"\n")
        public_key = create_file_token(
            token_path,
            SignatureAlgorithm.ED25519,
            passphrase,
            name=name,
            scrypt_n=request.scrypt_n,
        )
        tokens.append(_DemoToken(model.make_operator(name, public_key), token_path, passphrase))
    return tokens


def _genesis_ceremony(
    ca: DomainCA,
    enrollments: list[VerifiedEnrollment],
    identities: dict[str, HostIdentity],
    tokens: list[_DemoToken],
    request: _Request,
) -> SealedState:
    """The genesis: every operator opens their token and approves; the first host seals; the
    state is verified against its own hash before anything pins it."""
    timestamp = int(request.now.timestamp())
    records = [t.record for t in tokens]
    proposal = genesis.genesis_proposal(
        request.domain_id,
        [e.raw for e in enrollments],
        records,
        request.quorum,
        ca_certificate=ca.certificate_der,
        proposer_id=records[0].operator_id,
        now=timestamp,
    )
    approvals = [quorum.approve(proposal, load_file_token(t.path, t.passphrase)) for t in tokens]
    first = enrollments[0].host.host_id
    state = genesis.seal_genesis(
        proposal,
        approvals,
        producer_host_id=first,
        producer=identities[first].signer,
        now=timestamp,
    )
    TrustedChain.from_genesis(
        request.domain_id, state.hash, SealedState.from_bytes(state.to_bytes())
    )
    return state


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
    for directory in (paths.run_dir, paths.log_dir):
        make_private_dir(directory)


def _read_domain_file(root: Path) -> dict[str, Any]:
    path = DomainPaths(root).domain_file
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(
            f"{root} holds no local domain ({DOMAIN_FILE} is missing); "
            f"create one with `hsm-domain init {root}`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from None
    required = {"domain_id", "genesis_hash", "nodes", "operators", "quorum"}
    if not isinstance(document, dict) or not required <= set(document):
        raise InvalidInputError(f"{path} must be an object with {', '.join(sorted(required))}")
    return document


def _host_sort_key(host_id: str) -> tuple[int, str]:
    match = _HOST_NUMBER.match(host_id)
    return (int(match.group(1)) if match else 1 << 30, host_id)


def load_layout(directory: Path) -> DomainLayout:
    """Read `domain.json` of a domain made by `init_domain` and locate its files."""
    paths = DomainPaths(Path(directory).absolute())
    document = _read_domain_file(paths.root)
    try:
        genesis_hash = bytes.fromhex(str(document["genesis_hash"]))
        genesis_nodes = tuple(str(n) for n in document["nodes"])
        operator_list = [str(o["name"]) for o in document["operators"]]
        threshold = int(document["quorum"])
    except (ValueError, TypeError, KeyError) as error:
        raise InvalidInputError(f"{paths.domain_file} is malformed: {error}") from None
    if len(genesis_hash) != canonical.DIGEST_BYTES:
        raise InvalidInputError(f"{paths.domain_file}: genesis_hash is not 64 hex characters")
    found = sorted(paths.configured_hosts(), key=_host_sort_key)
    coordinators = tuple(paths.configured_coordinators()) or (COORDINATOR_NAME,)
    etcd = DomainEtcd.load(paths) if paths.etcd_cluster_file.exists() else None
    ordered = [h for h in genesis_nodes if h in found] + [
        h for h in found if h not in genesis_nodes
    ]
    return DomainLayout(
        root=paths.root,
        domain_id=str(document["domain_id"]),
        genesis_hash=genesis_hash,
        node_configs={h: paths.node_config(h) for h in ordered},
        operator_tokens={
            name: (paths.operator_token(name), paths.operator_passphrase(name))
            for name in operator_list
        },
        genesis_nodes=genesis_nodes,
        quorum=threshold,
        coordinators=coordinators,
        etcd=etcd,
    )


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
    try:
        SpiffeId(layout.domain_id, "hsa", host_id)
    except InvalidInputError as error:
        raise InvalidInputError(f"invalid host id: {error.message}") from None
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
