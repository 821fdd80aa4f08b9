"""What the processes of a local domain report about themselves (`hsm-domain status`).

Invariant: collecting status never raises because a process is down or slow; an unreachable
process is reported as down with the reason, and every call has a deadline. Nothing read here
is trusted for security decisions: it is a display of what each process claims.

Each coordinator (each replica of a domain on etcd) is asked on its own addresses, so that a
replica that does not answer shows as such; the domain's view (pending proposals, registered
HSAs) is asked of any replica. On etcd the report also holds each etcd member's health and the
replica that leads (who holds the election key, `deploy._domain_etcd`); the domain is healthy
only when every member and every replica is, and one replica leads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from deploy._domain_etcd import EtcdView, etcd_view
from deploy.cluster import (
    coordinator_channel,
    coordinator_operator_addresses,
    coordinator_operator_channel,
    is_alive,
    live_pids,
    node_channel,
    read_ready_file,
)
from deploy.init import DomainLayout
from domain_core.errors import HsmDomainError
from domain_core.model import SealedState
from domain_edge import transport
from domain_edge.metrics import metrics_url
from domain_proto import services_pb2, services_pb2_grpc

__all__ = [
    "CoordinatorView",
    "DomainReport",
    "ProcessReport",
    "collect_status",
    "coordinator_members",
]


@dataclass
class ProcessReport:
    """One process as seen from outside: reachable, healthy, on which state."""

    name: str
    kind: str  # "coordinator" or "hsa"
    running: bool = False
    pid: int | None = None
    address: str = ""
    operator_address: str = ""
    workers: list[str] = field(default_factory=list)  # an HSA's key service workers, ready
    metrics_url: str = ""  # where Prometheus scrapes this process ("" when it serves none)
    worker_metrics_urls: list[str] = field(default_factory=list)  # its workers', by index
    healthy: bool = False
    version: int | None = None
    state_hash: str = ""  # hex
    member: bool | None = None
    expected: bool = True  # whether this process must be healthy for the domain to be
    leader: bool | None = None  # a coordinator replica on etcd: whether it leads now
    detail: str = ""


@dataclass
class CoordinatorView:
    """The coordinator's own account of the domain (GetDomainStatus, ListProposals)."""

    reachable: bool = False
    version: int | None = None
    state_hash: str = ""
    pending_proposals: int = 0
    pending_proposal_ids: list[str] = field(default_factory=list)
    registered_hsas: dict[str, str] = field(default_factory=dict)
    # What each HSA last told the coordinator it has installed (relayed, not verified):
    # host id -> {"version", "state_hash" (hex), "reported_at" (unix seconds)}.
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)
    members: list[str] | None = None
    # "store behind the HSAs: ..." when HSAs report versions above the coordinator's head
    # (its store was restored from an old copy); empty otherwise.
    store_behind: str = ""
    detail: str = ""


@dataclass
class DomainReport:
    """Status of every process of a local domain and the coordinator's view."""

    domain_id: str
    genesis_hash: str
    quorum: int
    operators: int
    processes: list[ProcessReport]
    coordinator: CoordinatorView
    etcd: EtcdView | None = None  # a domain on etcd: its members, and which replica leads

    @property
    def all_healthy(self) -> bool:
        """True if every process that should be serving is healthy (on etcd: every member
        too, and one coordinator replica leads)."""
        processes = all(p.healthy for p in self.processes if p.expected)
        if self.etcd is None:
            return processes
        return processes and self.etcd.all_healthy and bool(self.etcd.replica_leader)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready document (full hashes)."""
        return {
            "domain_id": self.domain_id,
            "genesis_hash": self.genesis_hash,
            "quorum": self.quorum,
            "operators": self.operators,
            "all_healthy": self.all_healthy,
            "processes": [asdict(p) for p in self.processes],
            "coordinator": asdict(self.coordinator),
            "etcd": asdict(self.etcd) if self.etcd is not None else None,
        }


def _error_text(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else ""
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}" if details else name


def coordinator_members(
    layout: DomainLayout, operator_address: str, timeout: float = 2.0
) -> list[str] | None:
    """Host ids in the coordinator's latest state (None if it cannot be read).

    Used only to decide which nodes `up` waits for; the nodes verify every state themselves.
    """
    try:
        with coordinator_operator_channel(layout, operator_address) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            message = stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=timeout)
        state = SealedState.from_message(message)
    except (grpc.RpcError, HsmDomainError):
        return None
    return [host.host_id for host in state.manifest.message.hosts]


def _coordinator_view(layout: DomainLayout, operator_address: str) -> CoordinatorView:
    view = CoordinatorView()
    try:
        with coordinator_operator_channel(layout, operator_address) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            status = stub.GetDomainStatus(services_pb2.DomainStatusRequest(), timeout=2.0)
            proposals = stub.ListProposals(
                services_pb2.ListProposalsRequest(include_closed=False), timeout=2.0
            )
    except grpc.RpcError as error:
        view.detail = f"operator port {operator_address}: {_error_text(error)}"
        return view
    view.reachable = True
    view.version = int(status.version)
    view.state_hash = bytes(status.state_hash).hex()
    view.pending_proposals = int(status.pending_proposals)
    view.store_behind = status.store_behind
    view.pending_proposal_ids = [
        bytes(p.proposal_id).hex()
        for p in proposals.proposals
        if p.state == services_pb2.PROPOSAL_STATE_PENDING
    ]
    view.registered_hsas = {h.host_id: h.address for h in status.hsas}
    view.reported = {
        h.host_id: {
            "version": int(h.version),
            "state_hash": bytes(h.state_hash).hex(),
            "reported_at": int(h.reported_at),
        }
        for h in status.hsas
    }
    view.members = coordinator_members(layout, operator_address)
    return view


def _probe_coordinator(layout: DomainLayout, report: ProcessReport) -> None:
    """Health and head of one coordinator, asked on its own addresses."""
    info = read_ready_file(layout.ready_file(report.name))
    if info is None or not is_alive(info.pid):
        report.detail = "not running"
        return
    report.running = True
    report.pid = info.pid
    report.address = info.address
    report.operator_address = info.operator_address
    report.metrics_url = metrics_url(info.metrics)
    with coordinator_channel(layout, info.address) as channel:
        report.healthy = transport.check_health(channel, timeout=2.0)
    if not report.healthy:
        report.detail = "health check is not SERVING"
    try:
        with coordinator_operator_channel(layout, info.operator_address) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            status = stub.GetDomainStatus(services_pb2.DomainStatusRequest(), timeout=2.0)
    except grpc.RpcError as error:
        report.detail = f"operator port {info.operator_address}: {_error_text(error)}"
        return
    report.version = int(status.version)
    report.state_hash = bytes(status.state_hash).hex()


def _probe_node(layout: DomainLayout, report: ProcessReport) -> None:
    info = read_ready_file(layout.ready_file(report.name))
    if info is None or not is_alive(info.pid):
        report.detail = "not running"
        return
    report.running = True
    report.pid = info.pid
    report.address = info.address
    report.workers = list(info.workers)
    report.metrics_url = metrics_url(info.metrics)
    report.worker_metrics_urls = [metrics_url(m) for m in info.worker_metrics]
    try:
        with node_channel(layout, info.address, report.name) as channel:
            stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
            status = stub.GetStatus(services_pb2.HsaStatusRequest(), timeout=2.0)
    except grpc.RpcError as error:
        report.detail = f"does not answer: {_error_text(error)}"
        return
    report.healthy = bool(status.healthy)
    report.version = int(status.version)
    report.state_hash = bytes(status.state_hash).hex()
    report.member = bool(status.member)
    report.detail = status.detail


def collect_status(layout: DomainLayout, operator_count: int = 0) -> DomainReport:
    """Ask every process of the domain how it is; never raises for a process that is down."""
    pids = live_pids(layout)
    etcd = etcd_view(layout, pids) if layout.etcd is not None else None
    processes = []
    for name in layout.coordinators:
        coordinator = ProcessReport(name=name, kind="coordinator")
        _probe_coordinator(layout, coordinator)
        if coordinator.pid is None and name in pids:
            coordinator.pid = pids[name]
        if etcd is not None:
            coordinator.leader = coordinator.running and name == etcd.replica_leader
        processes.append(coordinator)
    operator_addresses = coordinator_operator_addresses(layout)
    view = (
        _coordinator_view(layout, operator_addresses)
        if operator_addresses
        else CoordinatorView(detail="no coordinator is running")
    )
    members = set(view.members) if view.members is not None else set(layout.genesis_nodes)
    for host in layout.node_configs:
        report = ProcessReport(name=host, kind="hsa", expected=host in members)
        _probe_node(layout, report)
        if not report.expected and not report.detail:
            report.detail = "not a member of the domain's latest state"
        processes.append(report)
    return DomainReport(
        domain_id=layout.domain_id,
        genesis_hash=layout.genesis_hash.hex(),
        quorum=layout.quorum,
        operators=operator_count or len(layout.operator_tokens),
        processes=processes,
        coordinator=view,
        etcd=etcd,
    )
