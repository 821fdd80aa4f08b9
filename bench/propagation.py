"""Propagation: from the final approval of a change to every node running the new version.

For 3, 5 and 9 nodes (3 operators, quorum 2): 20 rotate-domain-key proposals, each proposed by
one operator and approved by another. The clock starts just before the final approval is sent
(its signature is made beforehand: signing is the operator's time) and stops when the last
node's `HsaAdmin.GetStatus` reports the new version; nodes are polled one after the other every
2 ms, as the demo application (any CA-certified caller may ask).

Where the time goes, from the processes' own logs (millisecond timestamps, same clock):
`..._applied_log_median_ms` is when the coordinator logged the state as applied (an HSA
computed and sealed it, the coordinator verified and stored it), `..._log_median_ms` when the
last node logged it installed (verified, persisted with fsync, keys unsealed), and
`..._installs_by_stream_ratio` how many installs came through the coordinator's WatchStates
stream rather than its InstallState push (the two race; the first wins).

Targets (issue 7): median under 300 ms for 3 nodes and under 600 ms for 9. Quick mode: 3 and
9 nodes, 5 changes each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from bench._cluster import AppliedChange, BenchDomain, StatusPoller, apply_change, log_events
from bench._core import BenchConfig, Curve, Figure, Target
from bench._stats import median, percentile
from domain_core.changes import rotate_domain_key

NAME: Final = "propagation"
TITLE: Final = "approved change to every node (rotate-domain-key, 3/5/9 nodes)"
TARGETS: Final = (
    Target("propagation_3_nodes_median_ms", "<", 300.0, "propagation median, 3 nodes < 300 ms"),
    Target("propagation_9_nodes_median_ms", "<", 600.0, "propagation median, 9 nodes < 600 ms"),
)

POLL_INTERVAL: Final = 0.002
CHANGE_TIMEOUT: Final = 30.0
_INSTALLED: Final = re.compile(r"installed state version (\d+) \([0-9a-f]+\)(?: from (.+?))?,")
_APPLIED: Final = re.compile(r"proposal [0-9a-f]+ applied: version (\d+)")

__all__ = ["NAME", "TARGETS", "TITLE", "Followed", "follow_changes", "measure_nodes", "run"]


def _log_figures(
    domain: BenchDomain, changes: list[AppliedChange], prefix: str
) -> dict[str, Figure]:
    """Install and apply times from the logs, relative to each change's final approval."""
    installs: dict[int, list[float]] = {}
    sources: list[str] = []
    for host in domain.hosts:
        for stamp, match in log_events(domain.layout.log_file(host), _INSTALLED):
            installs.setdefault(int(match[1]), []).append(stamp)
            sources.append(match[2] or "")
    applied = {  # whichever replica applied it logged it (the only coordinator on SQLite)
        int(match[1]): stamp
        for name in domain.layout.coordinators
        for stamp, match in log_events(domain.layout.log_file(name), _APPLIED)
    }
    last_install: list[float] = []
    applied_at: list[float] = []
    for change in changes:
        stamps = installs.get(change.version, [])
        if len(stamps) == len(domain.hosts):
            last_install.append((max(stamps) - change.started_wall) * 1000)
        if change.version in applied:
            applied_at.append((applied[change.version] - change.started_wall) * 1000)
    figures: dict[str, Figure] = {}
    if last_install:
        figures[f"{prefix}_log_median_ms"] = median(last_install)
        figures[f"{prefix}_log_p95_ms"] = percentile(last_install, 95)
    if applied_at:
        figures[f"{prefix}_applied_log_median_ms"] = median(applied_at)
    counted = [s for s in sources if s]
    if counted:
        by_stream = sum(1 for s in counted if "stream" in s)
        figures[f"{prefix}_installs_by_stream_ratio"] = by_stream / len(counted)
    return figures


@dataclass
class Followed:
    """What `follow_changes` saw: per change, ms from the final approval to the last node
    current, to the first node current, and to the coordinator's answer."""

    applied: list[AppliedChange] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    firsts: list[float] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)

    def figures(self, domain: BenchDomain, prefix: str) -> dict[str, Figure]:
        """`<prefix>_median_ms`, p95, max, first node, approval answer, and the log figures."""
        figures: dict[str, Figure] = {
            f"{prefix}_changes": len(self.totals),
            f"{prefix}_median_ms": median(self.totals),
            f"{prefix}_p95_ms": percentile(self.totals, 95),
            f"{prefix}_max_ms": max(self.totals),
            f"{prefix}_first_node_median_ms": median(self.firsts),
            f"{prefix}_approve_ack_median_ms": median(self.acks),
        }
        figures.update(_log_figures(domain, self.applied, prefix))
        return figures


def follow_changes(domain: BenchDomain, changes: int) -> Followed:
    """Apply `changes` rotate-domain-key changes one after the other on a running domain, each
    followed until every node reports it."""
    followed = Followed()
    poller = StatusPoller(domain, domain.hosts)
    try:
        for _ in range(changes):
            change = apply_change(domain, [rotate_domain_key()])
            reached = poller.wait_version(
                domain.hosts, change.version, timeout=CHANGE_TIMEOUT, interval=POLL_INTERVAL
            )
            followed.applied.append(change)
            followed.totals.append((max(reached.values()) - change.started) * 1000)
            followed.firsts.append((min(reached.values()) - change.started) * 1000)
            followed.acks.append((change.acknowledged - change.started) * 1000)
    finally:
        poller.close()
    return followed


def measure_nodes(
    config: BenchConfig, nodes: int, changes: int
) -> tuple[dict[str, Figure], list[float]]:
    """Run `changes` changes on a fresh domain of `nodes` nodes; figures and the samples (ms)."""
    with BenchDomain(config.directory(f"propagation-{nodes}"), nodes=nodes) as domain:
        followed = follow_changes(domain, changes)
        return followed.figures(domain, f"propagation_{nodes}_nodes"), followed.totals


def run(config: BenchConfig) -> dict[str, Figure]:
    """Propagation for each node count; a scaling curve and the distributions for plots."""
    node_counts: tuple[int, ...] = config.pick((3, 9), (3, 5, 9))
    changes = int(config.pick(5, 20))
    figures: dict[str, Figure] = {}
    medians: list[float] = []
    p95s: list[float] = []
    for nodes in node_counts:
        measured, samples = measure_nodes(config, nodes, changes)
        figures.update(measured)
        medians.append(float(measured[f"propagation_{nodes}_nodes_median_ms"]))
        p95s.append(float(measured[f"propagation_{nodes}_nodes_p95_ms"]))
        config.add_samples("propagation", f"{nodes} nodes", samples)
        config.log(
            f"   {nodes} nodes: median {medians[-1]:.1f} ms, p95 {p95s[-1]:.1f} ms "
            f"over {changes} changes"
        )
    xs = [float(n) for n in node_counts]
    config.add_curve(
        "propagation_scaling",
        Curve(
            title="Propagation of an approved change to every node",
            x_label="nodes",
            y_label="ms from final approval to all nodes current",
            series={"median": (xs, medians), "p95": (xs, p95s)},
            lines={"target, 3 nodes (300 ms)": 300.0, "target, 9 nodes (600 ms)": 600.0},
        ),
    )
    return figures
