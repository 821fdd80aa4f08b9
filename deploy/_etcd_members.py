"""The members of a loopback etcd cluster, and the file that keeps a local domain's cluster.

`EtcdMember` and `EtcdCluster` say what each member is called, which ports it has, where its
data lives and the command line that runs it (`deploy.etcd` starts and watches the processes;
it re-exports both). `DomainEtcd` is the cluster of a local domain on etcd: `hsm-domain init`
chooses its members' ports and writes them with the cluster's token and the store's key prefix
to `DIR/etcd/cluster.json` (`DomainPaths.etcd_cluster_file`); `up`, `status`, `down` and the
tests read it back from there.

Invariants kept here:
- members listen only on 127.0.0.1, for clients and for peers;
- the ports of a cluster are distinct, and a member's data directory is under the domain's
  `etcd/` directory, named after the member (`etcd-<n>`): a cluster file cannot point a member
  elsewhere (the file is read back through `DomainPaths`, its names checked);
- the ports change only while no member has ever started (`never_started`): etcd keeps its
  peers' URLs in its data, so an initialised cluster on other ports would not find itself.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deploy._files import make_private_dir, write_json
from domain_core.errors import InvalidInputError, NotFoundError
from domain_core.limits import MAX_LOCAL_ETCD_MEMBERS, Limits
from domain_edge.etcd import replica_leader_key
from domain_edge.layout import DomainPaths

__all__ = [
    "DEFAULT_MEMBERS",
    "LOOPBACK",
    "REQUEST_BYTES",
    "STORE_PREFIX",
    "TXN_OPS",
    "DomainEtcd",
    "EtcdCluster",
    "EtcdMember",
    "free_ports",
]

LOOPBACK: Final = "127.0.0.1"
# What one request to etcd may carry: a sealed state takes up to the message limit (4 MiB),
# and etcd's default (1.5 MiB) is below it. Not an input limit: the store's callers are.
REQUEST_BYTES: Final = 2 * Limits().max_message_bytes + 2 * 1024 * 1024
# Operations in one transaction: a proposal stored with all its initial approvals (up to
# Limits.max_approvals_per_proposal) is one transaction of the etcd store.
TXN_OPS: Final = 1024
DEFAULT_MEMBERS: Final = 3
# The key prefix of a local domain's store (the coordinators' `store` spec names it).
STORE_PREFIX: Final = "hsm-domain"
_FORMAT: Final = "hsm-domain-etcd"
_MEMBER_NAME: Final = re.compile(r"^etcd-[1-9][0-9]?$")
_TOKEN: Final = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_PREFIX: Final = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
# etcd creates this directory in a member's data directory at its first start.
_MEMBER_DATA: Final = "member"


@dataclass(frozen=True)
class EtcdMember:
    """One member of a loopback cluster: its name, ports and data directory."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def endpoint(self) -> str:
        """HOST:PORT of its client API (what the etcd store and the health check call)."""
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"


@dataclass(frozen=True)
class EtcdCluster:
    """The members of one loopback cluster, and the token that keeps it apart from others."""

    members: tuple[EtcdMember, ...]
    token: str

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an etcd cluster has at least one member")
        names = [m.name for m in self.members]
        ports = [p for m in self.members for p in (m.client_port, m.peer_port)]
        if len(set(names)) != len(names) or len(set(ports)) != len(ports):
            raise ValueError("etcd members need distinct names and ports")

    @classmethod
    def on_ports(
        cls, root: Path, ports: Sequence[tuple[int, int]], token: str, *, name: str = "etcd"
    ) -> EtcdCluster:
        """Members `{name}-1..N` with these (client, peer) ports, data in `root/{name}-N`."""
        members = tuple(
            EtcdMember(f"{name}-{index}", client, peer, Path(root) / f"{name}-{index}")
            for index, (client, peer) in enumerate(ports, start=1)
        )
        return cls(members, token)

    @property
    def endpoints(self) -> list[str]:
        """Every member's HOST:PORT, in order."""
        return [m.endpoint for m in self.members]

    def member(self, name: str) -> EtcdMember:
        """The member called `name` (InvalidInputError naming the members otherwise)."""
        for member in self.members:
            if member.name == name:
                return member
        names = ", ".join(m.name for m in self.members)
        raise InvalidInputError(f"the etcd cluster has no member {name!r}; members: {names}")

    def store_spec(self, prefix: str = "") -> str:
        """The coordinator config's `store` value for this cluster (see `store_spec`)."""
        spec = "etcd:" + ",".join(self.endpoints)
        return f"{spec}/{prefix}" if prefix else spec

    def command(self, member: EtcdMember, etcd: str = "etcd") -> list[str]:
        """The command line that runs `member` (first start and restarts alike)."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            etcd,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--max-request-bytes", str(REQUEST_BYTES),
            # A proposal with many initial approvals is one transaction (etcd's default: 128).
            "--max-txn-ops", str(TXN_OPS),
            # Keep an hour of history (watches resume from a recent revision), not forever.
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1h",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]  # fmt: skip


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (each bound to port 0, read, then
    all closed together). Another process may take one before etcd binds it: a start then
    fails naming the port, and `DomainEtcd.with_free_ports` chooses again."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(probe)
            probe.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class DomainEtcd:
    """A local domain's etcd cluster (`DIR/etcd/cluster.json`) and its store's key prefix."""

    cluster: EtcdCluster
    prefix: str = STORE_PREFIX

    @property
    def store_spec(self) -> str:
        """The `store` value of every coordinator config of the domain."""
        return self.cluster.store_spec(self.prefix)

    @property
    def leader_key(self) -> bytes:
        """The key the coordinator replicas' election holds (the leader's name is its value):
        `domain_edge.etcd.replica_leader_key`, which the replicas campaign on."""
        return replica_leader_key(self.prefix)

    @property
    def names(self) -> list[str]:
        """The members' names, in order."""
        return [m.name for m in self.cluster.members]

    @classmethod
    def create(cls, paths: DomainPaths, members: int = DEFAULT_MEMBERS) -> DomainEtcd:
        """A new cluster for the domain in `paths`: free ports now, a fresh token, empty data
        directories (0700); written to its file."""
        if not 1 <= members <= MAX_LOCAL_ETCD_MEMBERS:
            raise InvalidInputError(
                f"an etcd cluster of 1 to {MAX_LOCAL_ETCD_MEMBERS} members, not {members}"
            )
        token = f"hsm-domain-{secrets.token_hex(8)}"
        chosen = cls(_cluster_on(paths, free_ports(2 * members), token))
        chosen.save(paths)
        return chosen

    def save(self, paths: DomainPaths) -> None:
        """Write the cluster file and make every member's data directory (0700)."""
        make_private_dir(paths.etcd_dir)
        for member in self.cluster.members:
            make_private_dir(member.data_dir)
        write_json(
            paths.etcd_cluster_file,
            {
                "format": _FORMAT,
                "token": self.cluster.token,
                "prefix": self.prefix,
                "members": [
                    {"name": m.name, "client_port": m.client_port, "peer_port": m.peer_port}
                    for m in self.cluster.members
                ],
            },
        )

    @classmethod
    def load(cls, paths: DomainPaths) -> DomainEtcd:
        """The cluster `init` wrote for the domain in `paths` (NotFoundError if it has none)."""
        path = paths.etcd_cluster_file
        try:
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"{paths.root} has no etcd cluster ({path} is missing)") from None
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"{path} is not readable JSON: {error}") from None
        try:
            return _parse(paths, document)
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidInputError(f"{path} is not an etcd cluster file: {error}") from None

    def never_started(self) -> bool:
        """Whether no member ever started (none has etcd's data in its directory)."""
        return not any((m.data_dir / _MEMBER_DATA).exists() for m in self.cluster.members)

    def ports_taken(self) -> list[int]:
        """The ports of the cluster that something else listens on now."""
        return [
            port
            for m in self.cluster.members
            for port in (m.client_port, m.peer_port)
            if not _port_is_free(port)
        ]

    def with_free_ports(self, paths: DomainPaths) -> DomainEtcd:
        """The same members on ports free now, saved (only for a cluster that never started)."""
        if not self.never_started():
            raise InvalidInputError(
                f"the etcd cluster of {paths.root} has started before: its ports cannot change"
            )
        size = len(self.cluster.members)
        cluster = _cluster_on(paths, free_ports(2 * size), self.cluster.token)
        chosen = DomainEtcd(cluster, self.prefix)
        chosen.save(paths)
        return chosen


def _cluster_on(paths: DomainPaths, ports: Sequence[int], token: str) -> EtcdCluster:
    pairs = list(zip(ports[::2], ports[1::2], strict=True))
    return EtcdCluster.on_ports(paths.etcd_dir, pairs, token)


def _parse(paths: DomainPaths, document: Any) -> DomainEtcd:
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ValueError(f"format is not {_FORMAT!r}")
    token, prefix = str(document["token"]), str(document["prefix"])
    dots = any(segment in (".", "..") for segment in prefix.split("/"))
    if not _TOKEN.match(token) or not _PREFIX.match(prefix) or dots:
        raise ValueError("token or prefix is malformed")
    entries = document["members"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_LOCAL_ETCD_MEMBERS:
        raise ValueError(f"members must be a list of 1 to {MAX_LOCAL_ETCD_MEMBERS}")
    members = []
    for entry in entries:
        name = str(entry["name"])
        client, peer = int(entry["client_port"]), int(entry["peer_port"])
        if not _MEMBER_NAME.match(name) or not all(0 < p < 65536 for p in (client, peer)):
            raise ValueError(f"member {name[:20]!r} has a bad name or port")
        members.append(EtcdMember(name, client, peer, paths.etcd_member_dir(name)))
    return DomainEtcd(EtcdCluster(tuple(members), token), prefix)
