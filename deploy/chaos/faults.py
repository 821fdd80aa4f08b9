"""The fault injector of a chaos run ("nemesis"): kills, pauses and partitions, then heals.

Fault types of every domain (`FAULT_TYPES` are those of a domain with one coordinator):
- `kill`: SIGKILL an HSA (its whole process group), restart it after a while;
- `pause`: SIGSTOP an HSA, SIGCONT it after a while;
- `coordinator`: SIGKILL the coordinator, restart it after a while (one coordinator only);
- `partition`: cut one link through its TCP proxy (an HSA's client link, or its link to the
  coordinator; `refuse` resets connections, `blackhole` stalls them), restore it after a while.
Fault types of a domain with coordinator replicas on etcd (`REPLICA_FAULT_TYPES`):
- `replica-kill`: SIGKILL a coordinator replica, restart it after a while;
- `replica-pause`: SIGSTOP a coordinator replica, SIGCONT it after a while;
- `etcd-kill`: SIGKILL an etcd member, restart it (on its data) after a while;
- `etcd-cut`: cut a replica off from etcd (every one of its etcd links, through the proxies,
  `refuse` or `blackhole`), restore it after a while.
The three replica types aim at the leader on purpose half of the time (a seeded draw): the
nemesis asks etcd who leads (`DomainControl.replica_leader`) and takes that replica if it is
free; otherwise, and the other half of the time, a free replica drawn at random.

Invariants:
- every choice (when, which fault, which target, how long, which link and mode, whether to aim
  at the leader) comes from one `random.Random(seed)`, drawn in the same order whatever the
  domain answers, so a seed names a fault schedule (timing and who leads still vary);
- fault types are drawn in rounds, each a seeded shuffle of the enabled types, so every
  enabled type is injected once before any is injected twice (a short run covers them all);
- at most one fault holds a target (an HSA, the coordinator, a replica, an etcd member) at a
  time; at most `max_down` HSAs are unreachable by clients at once (killed, paused or client
  link cut): by default all but one, so the data plane always has somewhere to go; at least
  one replica is up and reaches etcd (at most all but one killed, paused or cut off); at most
  a minority of the etcd members is down ((members - 1) // 2), so etcd keeps its quorum;
- each fault and each repair is recorded in the history (`info` events of process
  "nemesis"): a fault before it is applied, a repair after it took effect, so the recorded
  down windows contain the real ones; a replica fault records whether its target led;
- `heal` repairs every active fault (resumes and links first, then etcd members, then the
  coordinators, then the HSAs) before it returns; a repair that fails is retried until it
  succeeds or `heal`'s deadline passes.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from deploy.chaos.history import History

__all__ = [
    "ALL_FAULT_TYPES",
    "FAULT_TYPES",
    "LINKS",
    "LINK_MODES",
    "REPLICA_FAULT_TYPES",
    "DomainControl",
    "FaultConfig",
    "Nemesis",
    "ReplicaControl",
    "Replicas",
    "domain_fault_types",
    "parse_fault_types",
]

log = logging.getLogger(__name__)

FAULT_TYPES: Final = ("kill", "pause", "coordinator", "partition")
REPLICA_FAULT_TYPES: Final = ("replica-kill", "replica-pause", "etcd-kill", "etcd-cut")
ALL_FAULT_TYPES: Final = (*FAULT_TYPES, *REPLICA_FAULT_TYPES)
# The types of a domain with replicas: `coordinator` (one coordinator) is `replica-kill` there.
_REPLICATED_TYPES: Final = ("kill", "pause", "partition", *REPLICA_FAULT_TYPES)
_REPLICA_KINDS: Final = frozenset({"replica-kill", "replica-pause", "etcd-cut"})
LINKS: Final = ("client", "coordinator")
LINK_MODES: Final = ("refuse", "blackhole")
_RETRY_SECONDS: Final = 1.0
_TICK: Final = 0.05
# What the history calls each fault and each repair, by fault type.
_FAULT_OPS: Final = {
    "replica-kill": "kill-replica",
    "replica-pause": "pause-replica",
    "etcd-kill": "kill-etcd",
    "etcd-cut": "cut-etcd",
}
_REPAIR_OPS: Final = {
    "kill": "restart",
    "pause": "resume",
    "coordinator": "restart-coordinator",
    "partition": "restore",
    "replica-kill": "restart-replica",
    "replica-pause": "resume-replica",
    "etcd-kill": "restart-etcd",
    "etcd-cut": "restore-etcd",
}
_HEAL_ORDER: Final = {
    "pause": 0,
    "replica-pause": 0,
    "partition": 1,
    "etcd-cut": 1,
    "etcd-kill": 2,
    "coordinator": 3,
    "replica-kill": 3,
    "kill": 4,
}


def parse_fault_types(text: str) -> tuple[str, ...] | None:
    """Fault types from "kill,pause,..." (None for "all": every type the domain supports);
    ValueError if unknown."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return None
    unknown = [n for n in names if n not in ALL_FAULT_TYPES]
    if unknown or not names:
        raise ValueError(
            f"unknown fault type(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_FAULT_TYPES)} (or all)"
        )
    return tuple(dict.fromkeys(names))


def domain_fault_types(requested: tuple[str, ...] | None, replicated: bool) -> tuple[str, ...]:
    """The fault types of a run: `requested` (None: every type the domain supports), checked
    against the domain; ValueError naming what to use instead."""
    supported = _REPLICATED_TYPES if replicated else FAULT_TYPES
    if requested is None:
        return supported
    wrong = [t for t in requested if t not in supported]
    if wrong and replicated:
        raise ValueError(
            f"fault type(s) {', '.join(wrong)} are for a domain with one coordinator; this one "
            f"has coordinator replicas on etcd: choose from {', '.join(supported)} "
            "(replica-kill kills a replica, the leader included)"
        )
    if wrong:
        raise ValueError(
            f"fault type(s) {', '.join(wrong)} need coordinator replicas on etcd "
            f"(hsm-domain init DIR --coordinators 3); this domain has one coordinator: "
            f"choose from {', '.join(supported)}"
        )
    return requested


class DomainControl(Protocol):
    """What the nemesis does to the domain's processes and links (the runner implements it)."""

    def kill_node(self, host: str) -> None:
        """SIGKILL the HSA `host` (and its process group)."""

    def start_node(self, host: str) -> None:
        """Start the HSA `host` again; return once it is serving (raise if it does not)."""

    def pause_node(self, host: str) -> None:
        """SIGSTOP the HSA `host`."""

    def resume_node(self, host: str) -> None:
        """SIGCONT the HSA `host`."""

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator."""

    def start_coordinator(self) -> None:
        """Start the coordinator again; return once it is serving (raise if it does not)."""

    def cut_link(self, host: str, link: str, mode: str) -> None:
        """Cut `host`'s `link` ("client" or "coordinator") in `mode` (refuse, blackhole)."""

    def restore_link(self, host: str, link: str) -> None:
        """Restore `host`'s `link`."""


class ReplicaControl(Protocol):
    """What the nemesis does to coordinator replicas and etcd members (a replicated domain)."""

    def replica_leader(self) -> str:
        """The replica that leads now, as etcd says ("" if none or etcd cannot say)."""

    def kill_replica(self, name: str) -> None:
        """SIGKILL the replica `name`."""

    def start_replica(self, name: str) -> None:
        """Start the replica `name` again; return once it is serving."""

    def pause_replica(self, name: str) -> None:
        """SIGSTOP the replica `name`."""

    def resume_replica(self, name: str) -> None:
        """SIGCONT the replica `name`."""

    def cut_etcd(self, name: str, mode: str) -> None:
        """Cut every etcd link of the replica `name` in `mode`."""

    def restore_etcd(self, name: str) -> None:
        """Restore the etcd links of the replica `name`."""

    def kill_etcd(self, member: str) -> None:
        """SIGKILL the etcd member `member`."""

    def start_etcd(self, member: str) -> None:
        """Start the etcd member `member` again (on its data); return once it is healthy."""


@dataclass(frozen=True)
class FaultConfig:
    """How the nemesis behaves."""

    types: tuple[str, ...] | None = None  # None: every type the domain supports
    interval: float = 2.0  # mean seconds between two faults (uniform in [0.5, 1.5] x interval)
    min_duration: float = 0.5  # how long a fault lasts before its repair
    max_duration: float = 3.0
    max_down: int | None = None  # HSAs unreachable by clients at once (None: all but one)

    def __post_init__(self) -> None:
        if self.types is not None and (not self.types or set(self.types) - set(ALL_FAULT_TYPES)):
            raise ValueError(f"fault types must be among {', '.join(ALL_FAULT_TYPES)}")
        if self.interval <= 0:
            raise ValueError("the fault interval must be positive")
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError("fault durations need 0 < min <= max")
        if self.max_down is not None and self.max_down < 0:
            raise ValueError("max_down cannot be negative")


@dataclass(frozen=True)
class Replicas:
    """The coordinator replicas and etcd members of a replicated domain, and their control."""

    control: ReplicaControl
    names: Sequence[str]
    etcd_members: Sequence[str]


@dataclass
class _Active:
    kind: str  # one of ALL_FAULT_TYPES
    target: str  # host id, "coordinator", a replica's or an etcd member's name
    until: float
    link: str = ""
    mode: str = ""
    attempts: int = 0


@dataclass
class NemesisFigures:
    """What the nemesis did."""

    injected: Counter[str] = field(default_factory=Counter)
    leader_faults: Counter[str] = field(default_factory=Counter)  # replica faults on the leader
    repairs_failed: int = 0
    skipped: int = 0  # fault times at which no enabled fault could be applied


# Called after a fault took effect: (fault type, target, whether the target led).
FaultHook = Callable[[str, str, bool], None]


class Nemesis:
    """Injects faults into a domain at seeded random times until stopped, then heals."""

    def __init__(
        self,
        control: DomainControl,
        nodes: Sequence[str],
        config: FaultConfig,
        rng: random.Random,
        history: History,
        *,
        replicas: Replicas | None = None,
        on_fault: FaultHook | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("the nemesis needs at least one node")
        self._control = control
        self._nodes = list(nodes)
        self._replicas = replicas
        self._types = domain_fault_types(config.types, replicas is not None)
        self._config = config
        self._rng = rng
        self._history = history
        self._on_fault = on_fault
        self._max_down = config.max_down if config.max_down is not None else len(nodes) - 1
        self._active: list[_Active] = []
        self._round: list[str] = []
        self._lock = threading.Lock()
        self.figures = NemesisFigures()

    @property
    def types(self) -> tuple[str, ...]:
        """The fault types this nemesis injects."""
        return self._types

    # --- observing ----------------------------------------------------------------------------

    def unreachable(self) -> list[str]:
        """HSAs clients cannot reach now (killed, paused, or client link cut)."""
        with self._lock:
            return sorted(a.target for a in self._active if self._blocks_clients(a))

    def replicas_down(self) -> list[str]:
        """Replicas killed, paused or cut off from etcd now."""
        with self._lock:
            return sorted(a.target for a in self._active if a.kind in _REPLICA_KINDS)

    def active(self) -> list[str]:
        """A short description of every active fault."""
        with self._lock:
            return [
                f"{a.kind}:{a.target}" + (f"/{a.link}:{a.mode}" if a.link else "")
                for a in self._active
            ]

    @staticmethod
    def _blocks_clients(fault: _Active) -> bool:
        return fault.kind in ("kill", "pause") or (
            fault.kind == "partition" and fault.link == "client"
        )

    # --- the loop -----------------------------------------------------------------------------

    def _gap(self) -> float:
        return self._config.interval * self._rng.uniform(0.5, 1.5)

    def _duration(self) -> float:
        return self._rng.uniform(self._config.min_duration, self._config.max_duration)

    def run(self, stop: threading.Event) -> None:
        """Inject and repair faults until `stop` is set (the caller then calls `heal`)."""
        next_fault = time.monotonic() + self._gap()
        while not stop.is_set():
            now = time.monotonic()
            self._repair_due(now)
            if now >= next_fault and not stop.is_set():
                self.inject_one()
                next_fault = time.monotonic() + self._gap()
            stop.wait(_TICK)

    def _next_kinds(self) -> list[str]:
        """The fault types to try now: the rest of this round, then a fresh round."""
        if not self._round:
            self._round = list(self._types)
            self._rng.shuffle(self._round)
        return list(self._round)

    def inject_one(self) -> None:
        """Inject one fault now: the first type of the current round that the rules allow."""
        for kind in self._next_kinds():
            if self._try_inject(kind):
                self._round.remove(kind)
                self.figures.injected[kind] += 1
                return
        self.figures.skipped += 1

    def _free(self, targets: Sequence[str]) -> list[str]:
        with self._lock:
            busy = {a.target for a in self._active}
        return [t for t in targets if t not in busy]

    def _try_inject(self, kind: str) -> bool:
        """Apply one fault of `kind` if the rules allow it now; True if applied."""
        if kind in _REPLICA_KINDS:
            return self._inject_replica(kind)
        if kind == "etcd-kill":
            return self._inject_etcd_kill()
        free = self._free(self._nodes)
        room = len(self.unreachable()) < self._max_down
        if kind == "coordinator":
            with self._lock:
                if any(a.kind == "coordinator" for a in self._active):
                    return False
            until = time.monotonic() + self._duration()
            self._history.info("nemesis", "kill-coordinator", target="coordinator")
            self._start(
                _Active("coordinator", "coordinator", until), self._control.kill_coordinator
            )
            return True
        if not free:
            return False
        if kind == "partition":
            link = self._rng.choice(LINKS)
            if link == "client" and not room:
                link = "coordinator"
            mode = self._rng.choice(LINK_MODES)
            host = self._rng.choice(free)
            until = time.monotonic() + self._duration()
            self._history.info("nemesis", "cut", target=host, link=link, mode=mode)
            fault = _Active("partition", host, until, link=link, mode=mode)
            self._start(fault, lambda: self._control.cut_link(host, link, mode))
            return True
        if not room:
            return False
        host = self._rng.choice(free)
        until = time.monotonic() + self._duration()
        self._history.info("nemesis", kind, target=host)
        action = self._control.kill_node if kind == "kill" else self._control.pause_node
        self._start(_Active(kind, host, until), lambda: action(host))
        return True

    def _leader(self) -> str:
        """Who leads the replicas now ("" if etcd cannot say)."""
        assert self._replicas is not None
        try:
            return self._replicas.control.replica_leader()
        except Exception as error:  # the fault then goes to a replica drawn at random
            log.warning("cannot ask etcd which replica leads: %s", error)
            return ""

    def _inject_replica(self, kind: str) -> bool:
        """A replica fault (kill, pause, cut off from etcd), leaving one replica up."""
        if self._replicas is None:
            return False
        names = self._replicas.names
        free = self._free(names)
        if not free or len(self.replicas_down()) >= len(names) - 1:
            return False
        aim = self._rng.random() < 0.5
        drawn = self._rng.choice(free)
        mode = self._rng.choice(LINK_MODES) if kind == "etcd-cut" else ""
        until = time.monotonic() + self._duration()
        leader = self._leader()
        target = leader if aim and leader in free else drawn
        led = bool(leader) and target == leader
        args: dict[str, object] = {"target": target, "leader": led, "aimed": aim}
        if mode:
            args["mode"] = mode
        self._history.info("nemesis", _FAULT_OPS[kind], **args)
        control = self._replicas.control
        if kind == "etcd-cut":
            action = functools.partial(control.cut_etcd, target, mode)
        else:
            faults = {"replica-kill": control.kill_replica, "replica-pause": control.pause_replica}
            action = functools.partial(faults[kind], target)
        self._start(_Active(kind, target, until, mode=mode), action)
        if led:
            self.figures.leader_faults[kind] += 1
        if self._on_fault is not None:
            self._on_fault(kind, target, led)
        return True

    def _inject_etcd_kill(self) -> bool:
        """Kill an etcd member, leaving a majority of them up."""
        if self._replicas is None:
            return False
        members = self._replicas.etcd_members
        with self._lock:
            down = sum(1 for a in self._active if a.kind == "etcd-kill")
        free = self._free(members)
        if not free or down >= (len(members) - 1) // 2:
            return False
        member = self._rng.choice(free)
        until = time.monotonic() + self._duration()
        self._history.info("nemesis", "kill-etcd", target=member)
        control = self._replicas.control
        self._start(_Active("etcd-kill", member, until), lambda: control.kill_etcd(member))
        return True

    def _start(self, fault: _Active, action: Callable[[], None]) -> None:
        with self._lock:
            self._active.append(fault)
        try:
            action()
        except Exception as error:  # a fault that could not be applied is repaired anyway
            log.warning("applying %s to %s failed: %s", fault.kind, fault.target, error)
            self._history.info(
                "nemesis", "fault-failed", target=fault.target, kind=fault.kind, error=str(error)
            )

    # --- repairs ------------------------------------------------------------------------------

    def _repair_due(self, now: float) -> None:
        with self._lock:
            due = [a for a in self._active if a.until <= now]
        for fault in due:
            self._repair(fault)

    def _undo(self, fault: _Active) -> None:
        """The repair of one fault (raises if it did not take effect)."""
        kind, target = fault.kind, fault.target
        if kind == "kill":
            self._control.start_node(target)
        elif kind == "pause":
            self._control.resume_node(target)
        elif kind == "coordinator":
            self._control.start_coordinator()
        elif kind == "partition":
            self._control.restore_link(target, fault.link)
        else:
            assert self._replicas is not None
            control = self._replicas.control
            {
                "replica-kill": control.start_replica,
                "replica-pause": control.resume_replica,
                "etcd-kill": control.start_etcd,
                "etcd-cut": control.restore_etcd,
            }[kind](target)

    def _repair(self, fault: _Active) -> bool:
        """Undo one fault; on failure it stays active and is retried a little later."""
        fault.attempts += 1
        began = time.monotonic()
        try:
            self._undo(fault)
        except Exception as error:
            self.figures.repairs_failed += 1
            log.warning("repairing %s of %s failed: %s", fault.kind, fault.target, error)
            self._history.info(
                "nemesis",
                "repair-failed",
                target=fault.target,
                kind=fault.kind,
                attempt=fault.attempts,
                error=str(error)[:500],
            )
            fault.until = time.monotonic() + _RETRY_SECONDS
            return False
        with self._lock:
            self._active.remove(fault)
        args: dict[str, object] = {
            "target": fault.target,
            "seconds": round(time.monotonic() - began, 3),
        }
        if fault.link:
            args["link"] = fault.link
        self._history.info("nemesis", _REPAIR_OPS[fault.kind], **args)
        return True

    def heal(self, timeout: float = 60.0) -> list[str]:
        """Repair every active fault (pauses and links first, then etcd members, then the
        coordinators, then the HSAs); returns the faults still active when `timeout` ran out
        (empty on success)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                remaining = sorted(self._active, key=lambda a: _HEAL_ORDER[a.kind])
            if not remaining:
                return []
            for fault in remaining:
                self._repair(fault)
            if time.monotonic() > deadline:
                return self.active()
            with self._lock:
                if self._active:
                    time.sleep(_RETRY_SECONDS / 4)
