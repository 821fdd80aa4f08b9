"""The layout of a local domain (`hsm-domain init DIR`): which file lives where under DIR.

The one place that spells the tree docs/runtime.md lists ("Files of a local domain"):

    DIR/domain.json                   what `init` pinned: domain id, genesis hash, nodes, ...
    DIR/genesis.state                 the genesis SealedState
    DIR/ca/ca.crt (and ca.key)        the domain CA
    DIR/coordinator/config.json       the coordinator's config; tls.crt, tls.key beside it
                                      (a domain on SQLite with one coordinator)
    DIR/coordinator-<n>/config.json   replica n's config, tls.crt, tls.key (a domain on etcd)
    DIR/etcd/cluster.json             the domain's etcd members (names, ports), token, prefix
    DIR/etcd/etcd-<n>/                member n's data directory (0700)
    DIR/nodes/<host>/config.json      a node's config; identity/, data/, enrollment.bin
    DIR/operators/<name>.token        an operator's file token (and <name>.passphrase)
    DIR/clients/demo-app/             the demo application's tls.crt and tls.key
    DIR/run/<name>.json, <name>.pid   ready and pid files of running processes (etcd members:
                                      pid files only)
    DIR/logs/<name>.log               each process's output
    DIR/chaos/                        what `hsm-domain chaos` keeps of its runs
    DIR/bundles/<name>/               a domain across hosts (`init --host`): each HSA's and the
                                      coordinator's files, to copy to its machine; no nodes/
                                      nor coordinator/ then (docs/deploy.md)

The launcher (`deploy`), the tools (`hsm-kms --cluster`, `hsm-operator --cluster`), the
benchmarks and the tests find every file through `DomainPaths`, so the tree is spelled once.

Invariants: `DomainPaths` is path arithmetic only: it reads, writes and checks nothing, and
its paths are under `root` as given (relative if `root` is). The two methods that look at the
disk, `configured_hosts` and `configured_coordinators`, only list the nodes and the
coordinators that have a config. A coordinator is named `coordinator` (the one coordinator of
a SQLite domain, as every domain had before replicas) or `coordinator-<n>` (replica n, n >= 1);
every coordinator directory, config, certificate and key is spelled by `coordinator_*_of(name)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from domain_edge.ca_files import CA_CERTIFICATE_FILE
from domain_edge.identity_files import TLS_CERTIFICATE_FILE, TLS_KEY_FILE

__all__ = [
    "CONFIG_FILE",
    "COORDINATOR_NAME",
    "DATA_DIR",
    "DEMO_CLIENT",
    "DOMAIN_FILE",
    "ENROLLMENT_FILE",
    "ETCD_CLUSTER_FILE",
    "GENESIS_FILE",
    "IDENTITY_DIR",
    "REPLICA_PREFIX",
    "DomainPaths",
    "replica_name",
    "replica_number",
]

DOMAIN_FILE: Final = "domain.json"
GENESIS_FILE: Final = "genesis.state"
CONFIG_FILE: Final = "config.json"
ENROLLMENT_FILE: Final = "enrollment.bin"
IDENTITY_DIR: Final = "identity"
DATA_DIR: Final = "data"
COORDINATOR_NAME: Final = "coordinator"
DEMO_CLIENT: Final = "demo-app"
REPLICA_PREFIX: Final = "coordinator-"
ETCD_CLUSTER_FILE: Final = "cluster.json"
_REPLICA: Final = re.compile(r"^coordinator-([1-9][0-9]{0,2})$")


def replica_name(number: int) -> str:
    """The name of coordinator replica `number` (1-based): `coordinator-<number>`."""
    if number < 1:
        raise ValueError("replicas are numbered from 1")
    return f"{REPLICA_PREFIX}{number}"


def replica_number(name: str) -> int | None:
    """The number of replica `name` (`coordinator-<n>`); None for any other name (the one
    coordinator of a SQLite domain is `coordinator`)."""
    match = _REPLICA.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class DomainPaths:
    """Where each file of the local domain in `root` lives (see the module docstring)."""

    root: Path

    # --- the domain ---------------------------------------------------------------------------

    @property
    def domain_file(self) -> Path:
        """`domain.json`: what `init` pinned (domain id, genesis hash, nodes, operators)."""
        return self.root / DOMAIN_FILE

    @property
    def genesis_state(self) -> Path:
        """The serialized genesis SealedState."""
        return self.root / GENESIS_FILE

    @property
    def ca_dir(self) -> Path:
        """The domain CA's directory (its certificate, and its key in a local demo)."""
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        """The domain CA certificate (PEM)."""
        return self.ca_dir / CA_CERTIFICATE_FILE

    # --- coordinators ------------------------------------------------------------------------

    @property
    def coordinator_dir(self) -> Path:
        """The one coordinator's directory (a SQLite domain): its config, TLS files and store."""
        return self.coordinator_dir_of(COORDINATOR_NAME)

    @property
    def coordinator_config(self) -> Path:
        """The one coordinator's config file (a SQLite domain)."""
        return self.coordinator_config_of(COORDINATOR_NAME)

    @property
    def coordinator_cert(self) -> Path:
        """The one coordinator's TLS certificate (a SQLite domain)."""
        return self.coordinator_cert_of(COORDINATOR_NAME)

    def coordinator_dir_of(self, name: str) -> Path:
        """The directory of coordinator `name` (`coordinator` or `coordinator-<n>`)."""
        return self.root / name

    def coordinator_config_of(self, name: str) -> Path:
        """The config file of coordinator `name`."""
        return self.coordinator_dir_of(name) / CONFIG_FILE

    def coordinator_cert_of(self, name: str) -> Path:
        """The TLS certificate of coordinator `name` (what every node config pins)."""
        return self.coordinator_dir_of(name) / TLS_CERTIFICATE_FILE

    def coordinator_key_of(self, name: str) -> Path:
        """The TLS key of coordinator `name` (0600)."""
        return self.coordinator_dir_of(name) / TLS_KEY_FILE

    def configured_coordinators(self) -> list[str]:
        """The coordinators that have a config: `coordinator`, then the replicas
        `coordinator-<n>` by number (none if there is no such directory)."""
        found = [p.parent.name for p in self.root.glob(f"coordinator*/{CONFIG_FILE}")]
        single = [COORDINATOR_NAME] if COORDINATOR_NAME in found else []
        numbered = sorted((n, name) for name in found if (n := replica_number(name)) is not None)
        return single + [name for _, name in numbered]

    # --- the etcd cluster of a domain on etcd --------------------------------------------------

    @property
    def etcd_dir(self) -> Path:
        """The domain's etcd cluster: its file and one data directory per member (0700)."""
        return self.root / "etcd"

    @property
    def etcd_cluster_file(self) -> Path:
        """What `init` chose for the etcd cluster: members, ports, token, key prefix."""
        return self.etcd_dir / ETCD_CLUSTER_FILE

    def etcd_member_dir(self, name: str) -> Path:
        """The data directory of etcd member `name` (`etcd-<n>`)."""
        return self.etcd_dir / name

    # --- nodes --------------------------------------------------------------------------------

    @property
    def nodes_dir(self) -> Path:
        """The directory holding one directory per node."""
        return self.root / "nodes"

    def node_dir(self, host_id: str) -> Path:
        """The directory of one node (its config, identity and data)."""
        return self.nodes_dir / host_id

    def node_config(self, host_id: str) -> Path:
        """A node's config file."""
        return self.node_dir(host_id) / CONFIG_FILE

    def node_identity_dir(self, host_id: str) -> Path:
        """A node's identity: its keys and its CA-issued TLS certificate."""
        return self.node_dir(host_id) / IDENTITY_DIR

    def node_data_dir(self, host_id: str) -> Path:
        """A node's data directory (docs/runtime.md, "An HSA's data directory")."""
        return self.node_dir(host_id) / DATA_DIR

    def enrollment_file(self, host_id: str) -> Path:
        """A node's enrollment (`HostEnrollment`), for the genesis or an add-host proposal."""
        return self.node_dir(host_id) / ENROLLMENT_FILE

    def configured_hosts(self) -> list[str]:
        """The host ids of the nodes that have a config, sorted by name (none if there is
        no nodes directory)."""
        return sorted(p.parent.name for p in self.nodes_dir.glob(f"*/{CONFIG_FILE}"))

    # --- operators and the demo application ---------------------------------------------------

    @property
    def operators_dir(self) -> Path:
        """The demo operators' tokens and passphrase files."""
        return self.root / "operators"

    def operator_token(self, name: str) -> Path:
        """Operator `name`'s file token."""
        return self.operators_dir / f"{name}.token"

    def operator_passphrase(self, name: str) -> Path:
        """Operator `name`'s passphrase file (LOCAL DEMO ONLY)."""
        return self.operators_dir / f"{name}.passphrase"

    @property
    def client_dir(self) -> Path:
        """The demo application's TLS files (spiffe://<domain>/client/demo-app)."""
        return self.root / "clients" / DEMO_CLIENT

    @property
    def client_cert(self) -> Path:
        """The demo application's TLS certificate."""
        return self.client_dir / TLS_CERTIFICATE_FILE

    @property
    def client_key(self) -> Path:
        """The demo application's TLS key (0600)."""
        return self.client_dir / TLS_KEY_FILE

    # --- running processes --------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """Ready files and pid files of running processes."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        """One log per process."""
        return self.root / "logs"

    def ready_file(self, name: str) -> Path:
        """The ready file a process writes once serving (a coordinator or a host id)."""
        return self.run_dir / f"{name}.json"

    def pid_file(self, name: str) -> Path:
        """The pid file of a detached process."""
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        """Where a process's stdout and stderr go."""
        return self.log_dir / f"{name}.log"

    @property
    def bundles_dir(self) -> Path:
        """The bundles of a domain across hosts (`hsm-domain init --host`)."""
        return self.root / "bundles"

    def bundle_dir(self, name: str) -> Path:
        """The bundle of one HSA or of the coordinator: its config.json and every file it
        names, copied as one directory to its machine."""
        return self.bundles_dir / name

    @property
    def chaos_dir(self) -> Path:
        """What `hsm-domain chaos` keeps: histories, and its throwaway operator tokens."""
        return self.root / "chaos"
