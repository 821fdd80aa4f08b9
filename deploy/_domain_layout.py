"""A local domain as `hsm-domain init` made it, read back from `domain.json` and its tree.

Invariants: `load_layout` reads local domains only: a domain across hosts (`init --host`) has
no local processes to start or watch, and says so (its bundles run on their own machines).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deploy._etcd_members import DomainEtcd
from domain_core import canonical
from domain_core.errors import InvalidInputError, NotFoundError
from domain_edge.layout import COORDINATOR_NAME, DOMAIN_FILE, DomainPaths

__all__ = ["DomainLayout", "load_layout", "read_domain_file"]

_HOST_NUMBER: Final = re.compile(r"^hsa-(\d+)$")


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


def read_domain_file(root: Path) -> dict[str, Any]:
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
    document = read_domain_file(paths.root)
    if "addresses" in document:
        raise InvalidInputError(
            f"{paths.root} is a domain across hosts (hsm-domain init --host): its processes run "
            f"from {paths.bundles_dir}/<name> on their own machines (docs/deploy.md), so "
            "hsm-domain cannot start or watch them here; reach it with `hsm-operator --cluster "
            f"{paths.root}` and `hsm-kms --cluster {paths.root}`"
        )
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
