"""What a chaos run tells its user: a progress line while it runs, a report at the end.

The report lists the faults injected by type, the operations by type and outcome, the
availability of the data plane, the convergence time, and each invariant held or broken with
its first counter-example; `to_json` is the same as a JSON document (`--json FILE`). Nothing
here sees a plaintext: it reads counts and the checker's verdicts only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from deploy.chaos.checker import AvailabilityFigures, InvariantResult, completions
from domain_edge.cli import Progress

if TYPE_CHECKING:
    from deploy.chaos.faults import Nemesis
    from deploy.chaos.history import History

__all__ = ["ChaosReport", "ProgressLine", "operations_by_outcome"]

_OUTCOMES: Final = ("ok", "fail", "unknown")


def operations_by_outcome(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """{op: {"ok": n, "fail": n, "unknown": n}} over the completed operations."""
    table: dict[str, Counter[str]] = {}
    for invoke, done in completions(events):
        table.setdefault(str(invoke["op"]), Counter())[str(done["phase"])] += 1
    return {op: {o: counts[o] for o in _OUTCOMES} for op, counts in sorted(table.items())}


@dataclass
class ChaosReport:
    """The figures and verdicts of one chaos run."""

    seed: int
    duration: float
    faults_seconds: float
    nodes: list[str]
    clients: int
    fault_types: list[str]
    faults: dict[str, int]
    partitions: dict[str, int]
    repairs_failed: int
    operations: dict[str, dict[str, int]]
    availability: AvailabilityFigures
    min_availability: float
    convergence_seconds: float | None
    final_version: int | None
    invariants: list[InvariantResult]
    history_path: Path | None
    samples: int = 0
    crashed_threads: list[str] = field(default_factory=list)
    unhealed: list[str] = field(default_factory=list)
    unfinished: int = 0  # operations invoked whose thread never reported an outcome
    coordinators: list[str] = field(default_factory=list)  # the replicas (a domain on etcd)
    etcd_members: list[str] = field(default_factory=list)
    leader_faults: dict[str, int] = field(default_factory=dict)  # replica faults on the leader

    @property
    def held(self) -> bool:
        """True when every invariant held (and the run itself worked as designed)."""
        return all(r.held for r in self.invariants) and not self.crashed_threads

    def totals(self) -> dict[str, int]:
        """Operations by outcome over every type."""
        totals = dict.fromkeys(_OUTCOMES, 0)
        for counts in self.operations.values():
            for outcome in _OUTCOMES:
                totals[outcome] += counts[outcome]
        return totals

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        totals = self.totals()
        return {
            "seed": self.seed,
            "duration_seconds": self.duration,
            "faults_seconds": round(self.faults_seconds, 3),
            "nodes": self.nodes,
            "coordinators": self.coordinators,
            "etcd_members": self.etcd_members,
            "clients": self.clients,
            "fault_types": self.fault_types,
            "faults": self.faults,
            "faults_total": sum(self.faults.values()),
            "partitions": self.partitions,
            "leader_faults": self.leader_faults,
            "repairs_failed": self.repairs_failed,
            "unhealed": self.unhealed,
            "operations": self.operations,
            "operations_total": sum(totals.values()),
            "outcomes": totals,
            "unfinished_operations": self.unfinished,
            "availability": self.availability.to_json(),
            "min_availability": self.min_availability,
            "convergence_seconds": (
                None if self.convergence_seconds is None else round(self.convergence_seconds, 3)
            ),
            "final_version": self.final_version,
            "status_samples": self.samples,
            "crashed_threads": self.crashed_threads,
            "invariants": [r.to_json() for r in self.invariants],
            "all_invariants_held": self.held,
            "history": str(self.history_path) if self.history_path else None,
        }

    def render(self) -> str:
        """The report as text for a person."""
        lines: list[str] = []
        totals = self.totals()
        total_ops = sum(totals.values())
        replicas = (
            f", {len(self.coordinators)} coordinator replicas, {len(self.etcd_members)} etcd "
            "members"
            if self.coordinators
            else ""
        )
        lines.append(
            f"chaos run: seed {self.seed}, faults for {self.faults_seconds:.1f} s, "
            f"{len(self.nodes)} HSAs{replicas}, {self.clients} clients"
        )
        faults = ", ".join(f"{kind} {count}" for kind, count in self.faults.items())
        lines.append(f"faults injected: {sum(self.faults.values())} ({faults})")
        if self.partitions:
            cuts = ", ".join(f"{name} {count}" for name, count in self.partitions.items())
            lines.append(f"  links cut: {cuts}")
        if self.leader_faults:
            aimed = ", ".join(f"{kind} {count}" for kind, count in self.leader_faults.items())
            lines.append(f"  of which on the leader replica: {aimed}")
        if self.repairs_failed:
            lines.append(f"  repairs that failed and were retried: {self.repairs_failed}")
        if self.unhealed:
            lines.append(f"  NOT healed at the end: {', '.join(self.unhealed)}")
        lines.append(
            f"operations: {total_ops} (ok {totals['ok']}, fail {totals['fail']}, "
            f"unknown {totals['unknown']})"
        )
        if self.unfinished:
            lines.append(f"  operations without an outcome (a stuck thread): {self.unfinished}")
        lines.append(f"  {'operation':<20} {'ok':>7} {'fail':>7} {'unknown':>8}")
        for op, counts in self.operations.items():
            lines.append(f"  {op:<20} {counts['ok']:>7} {counts['fail']:>7} {counts['unknown']:>8}")
        figures = self.availability
        fraction = figures.fraction
        shown = "n/a" if fraction is None else f"{fraction:.2%}"
        lines.append(
            f"availability: {shown} of {figures.attempted} data-plane operations started while "
            f"an HSA was reachable succeeded ({figures.unknown} unknown, {figures.failed} "
            f"failed; minimum {self.min_availability:.0%}); "
            f"{figures.attempted_all_down} started while none was"
        )
        if self.convergence_seconds is None:
            lines.append("convergence: NOT reached")
        else:
            lines.append(
                f"convergence: {self.convergence_seconds:.2f} s after the faults stopped "
                f"(every HSA on version {self.final_version})"
            )
        lines.append("invariants:")
        for result in self.invariants:
            mark = "held  " if result.held else "BROKEN"
            lines.append(f"  [{mark}] {result.description} ({result.checked} checked)")
            if not result.held:
                more = f" (and {result.violations - 1} more)" if result.violations > 1 else ""
                lines.append(f"           first counter-example{more}: {result.counterexample}")
        if self.crashed_threads:
            lines.append(f"workload threads that crashed: {', '.join(self.crashed_threads)}")
        if self.history_path is not None:
            lines.append(f"history: {self.history_path}")
        lines.append("result: every invariant held" if self.held else "result: AN INVARIANT BROKE")
        return "\n".join(lines)


class ProgressLine(Progress):
    """The run's progress (`domain_edge.cli.Progress`: one updating line on a terminal;
    otherwise one line every few seconds), with the running figures of the experiment."""

    def tick(self, elapsed: float, duration: float, history: History, nemesis: Nemesis) -> None:
        """The running figures: elapsed time, outcomes so far, faults, what is down."""
        if not self.due():
            return
        counts = history.counts()
        injected = nemesis.figures.injected
        faults = sum(injected.values())
        active = nemesis.active()
        self.update(
            f"chaos {elapsed:5.1f}/{duration:g} s  ops ok {counts['ok']} fail {counts['fail']} "
            f"unknown {counts['unknown']}  faults {faults}"
            + (f"  now: {', '.join(active)}" if active else "")
        )
