"""The etcd cluster of a local domain on etcd: its members started for `up`, their health and
the coordinator replicas' leader for `status`.

The members are processes of the system's `etcd` binary (Debian `etcd-server`), launched by
`deploy.etcd` on the ports `init` chose (`DIR/etcd/cluster.json`, `deploy._etcd_members`),
their data in `DIR/etcd/etcd-<n>/`, their pid files `DIR/run/etcd-<n>.pid` and their logs
`DIR/logs/etcd-<n>.log`.

Invariants kept here:
- `start_members` starts only the members that do not run (a pid file naming a live process
  of that member's data directory, `deploy._runfiles.is_ours`), records each pid file right
  after its spawn (so `down`, and a foreground `up` on Ctrl-C, find it), and returns once every
  member of the cluster is healthy, or raises naming the member's log and quoting its tail;
- the members' ports change only for a cluster that never started, and only when one of them
  is taken now (`ensure_free_ports`); every coordinator config's `store` is rewritten to
  match in the same step, so a config never names ports the cluster does not use;
- reading the status never raises because a member is down: an unreachable member is
  reported with the reason; the leader is whoever holds the replicas' election key
  (`DomainEtcd.leader_key`), asked of the cluster (`domain_edge.etcd.Election.leader`), "" when
  nobody holds it or the cluster cannot say.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final

from deploy import etcd as members
from deploy._etcd_members import DomainEtcd
from deploy._files import make_private_dir
from deploy.cluster import ProcessStartError
from deploy.init import DomainLayout, load_layout
from domain_core.errors import FailedPreconditionError, NotFoundError, UnavailableError
from domain_edge.config import CoordinatorConfig
from domain_edge.etcd import Election, EtcdClient, MemberStatus, cluster_status

__all__ = [
    "EtcdMemberReport",
    "EtcdView",
    "ensure_free_ports",
    "etcd_binary",
    "etcd_view",
    "replica_leader",
    "start_members",
    "wait_for_leader",
]

_STATUS_TIMEOUT: Final = 3.0
_STATUS_ATTEMPT_TIMEOUT: Final = 1.5
_LEADER_POLL_SECONDS: Final = 0.1
# Who asks for the leader (an Election needs a name; this one never campaigns).
_OBSERVER: Final = b"hsm-domain status"


def etcd_binary() -> str:
    """The path of the system's `etcd` (NotFoundError saying how to install it)."""
    found = shutil.which("etcd")
    if found is None:
        raise NotFoundError(
            "this domain's store is etcd, and no `etcd` program is on PATH: install it "
            "(Debian: apt-get install etcd-server)"
        )
    return found


def _cluster(layout: DomainLayout) -> DomainEtcd:
    if layout.etcd is None:
        raise FailedPreconditionError(f"{layout.root} has no etcd cluster (its store is SQLite)")
    return layout.etcd


def ensure_free_ports(layout: DomainLayout, running: Mapping[str, int]) -> DomainLayout:
    """The layout to start from: the same one, or, for a cluster that never started and whose
    ports are partly taken by something else now, one on fresh free ports (the cluster file and
    every coordinator config rewritten to match)."""
    domain_etcd = _cluster(layout)
    if any(name in running for name in domain_etcd.names) or not domain_etcd.never_started():
        return layout
    if not domain_etcd.ports_taken():
        return layout
    moved = domain_etcd.with_free_ports(layout)
    for name in layout.coordinators:
        path = layout.coordinator_config_of(name)
        config = CoordinatorConfig.load(path)
        if config.store != moved.store_spec:
            replace(config, store=moved.store_spec).save(path)
    return load_layout(layout.root)


def start_members(
    layout: DomainLayout,
    running: Mapping[str, int],
    *,
    timeout: float,
    on_start: Callable[[str, members.EtcdProcess], None] | None = None,
) -> dict[str, members.EtcdProcess]:
    """Start every member that does not run (`running`: name -> pid of what runs), then wait
    until every member is healthy; the members it started, by name. `on_start(name, process)`
    runs right after each spawn (so a caller can stop it whatever happens next)."""
    domain_etcd = _cluster(layout)
    binary = etcd_binary()
    make_private_dir(layout.run_dir)
    started: dict[str, members.EtcdProcess] = {}
    for member in domain_etcd.cluster.members:
        if member.name in running:
            continue
        process = members.start_member(
            domain_etcd.cluster,
            member,
            layout.log_file(member.name),
            etcd=binary,
            pid_file=layout.pid_file(member.name),
        )
        started[member.name] = process
        if on_start is not None:
            on_start(member.name, process)
    deadline = time.monotonic() + timeout
    members.wait_healthy(list(started.values()), timeout=timeout)
    for member in domain_etcd.cluster.members:
        if member.name in started:
            continue
        while not (health := members.member_health(member, timeout=0.5)).healthy:
            if time.monotonic() > deadline:
                raise ProcessStartError(
                    f"etcd member {member.name} (running) is not healthy: {health.detail}; "
                    f"see {layout.log_file(member.name)}",
                    layout.log_file(member.name),
                )
            time.sleep(_LEADER_POLL_SECONDS)
    return started


def _client(domain_etcd: DomainEtcd) -> EtcdClient:
    return EtcdClient(
        domain_etcd.cluster.endpoints,
        timeout=_STATUS_TIMEOUT,
        attempt_timeout=_STATUS_ATTEMPT_TIMEOUT,
    )


def _leader(client: EtcdClient, domain_etcd: DomainEtcd) -> str:
    found = Election(client, domain_etcd.leader_key, _OBSERVER).leader()
    return found.decode("utf-8", errors="replace") if found else ""


def replica_leader(layout: DomainLayout) -> str:
    """The name of the coordinator replica that leads now ("" if none does; UnavailableError
    when the etcd cluster does not answer)."""
    domain_etcd = _cluster(layout)
    with _client(domain_etcd) as client:
        return _leader(client, domain_etcd)


def wait_for_leader(layout: DomainLayout, timeout: float) -> str:
    """Wait until a coordinator replica leads; its name (UnavailableError after `timeout`)."""
    domain_etcd = _cluster(layout)
    deadline = time.monotonic() + timeout
    last = "no replica campaigned yet"
    with _client(domain_etcd) as client:
        while True:
            try:
                leader = _leader(client, domain_etcd)
            except UnavailableError as error:
                leader, last = "", error.message
            if leader:
                return leader
            if time.monotonic() > deadline:
                raise UnavailableError(f"no coordinator replica leads after {timeout:g} s: {last}")
            time.sleep(_LEADER_POLL_SECONDS)


@dataclass
class EtcdMemberReport:
    """One etcd member as `hsm-domain status` shows it."""

    name: str
    endpoint: str
    running: bool = False
    pid: int | None = None
    healthy: bool = False
    raft_leader: bool = False  # whether this member leads etcd's own Raft group
    version: str = ""
    detail: str = ""


@dataclass
class EtcdView:
    """The domain's etcd cluster: each member, and which coordinator replica leads."""

    members: list[EtcdMemberReport] = field(default_factory=list)
    replica_leader: str = ""
    detail: str = ""  # why the leader is unknown, if it is

    @property
    def all_healthy(self) -> bool:
        """Every member healthy."""
        return bool(self.members) and all(m.healthy for m in self.members)


def etcd_view(layout: DomainLayout, pids: Mapping[str, int]) -> EtcdView:
    """Each member's health and the replicas' leader (never raises for a member that is down;
    `pids`: the live processes of the domain, by name)."""
    domain_etcd = _cluster(layout)
    view = EtcdView()
    with _client(domain_etcd) as client:
        try:
            statuses = cluster_status(client)
        except UnavailableError as error:
            statuses = [
                MemberStatus(m.endpoint, False, False, f"no answer: {error.message}")
                for m in domain_etcd.cluster.members
            ]
        for member, status in zip(domain_etcd.cluster.members, statuses, strict=True):
            view.members.append(
                EtcdMemberReport(
                    name=member.name,
                    endpoint=member.endpoint,
                    running=member.name in pids,
                    pid=pids.get(member.name),
                    healthy=status.healthy,
                    raft_leader=status.is_leader,
                    version=status.version,
                    detail=status.detail,
                )
            )
        try:
            view.replica_leader = _leader(client, domain_etcd)
            if not view.replica_leader:
                view.detail = "no coordinator replica leads"
        except UnavailableError as error:
            view.detail = f"cannot ask etcd who leads: {error.message}"
    return view
