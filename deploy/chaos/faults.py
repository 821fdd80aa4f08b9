"""The fault injector of a chaos run ("nemesis"): kills, pauses and partitions, then heals.

Fault types (`FAULT_TYPES`):
- `kill`: SIGKILL an HSA (its whole process group), restart it after a while;
- `pause`: SIGSTOP an HSA, SIGCONT it after a while;
- `coordinator`: SIGKILL the coordinator, restart it after a while;
- `partition`: cut one link through its TCP proxy (an HSA's client link, or its link to the
  coordinator; `refuse` resets connections, `blackhole` stalls them), restore it after a while.

Invariants:
- every choice (when, which fault, which target, how long, which link and mode) comes from one
  `random.Random(seed)`, so a seed names a fault schedule (timing still varies with the load);
- fault types are drawn in rounds, each a seeded shuffle of the enabled types, so every
  enabled type is injected once before any is injected twice (a short run covers them all);
- at most one fault holds a host at a time, and at most `max_down` HSAs are unreachable by
  clients at once (killed, paused or client link cut): by default all but one, so the data
  plane always has somewhere to go;
- each fault and each repair is recorded in the history (`info` events of process
  "nemesis"): a fault before it is applied, a repair after it took effect, so the recorded
  down windows contain the real ones;
- `heal` repairs every active fault (restarts, resumes, restores) before it returns; a repair
  that fails is retried until it succeeds or `heal`'s deadline passes.
"""

from __future__ import annotations

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
    "FAULT_TYPES",
    "LINKS",
    "LINK_MODES",
    "DomainControl",
    "FaultConfig",
    "Nemesis",
    "parse_fault_types",
]

log = logging.getLogger(__name__)

FAULT_TYPES: Final = ("kill", "pause", "coordinator", "partition")
LINKS: Final = ("client", "coordinator")
LINK_MODES: Final = ("refuse", "blackhole")
_RETRY_SECONDS: Final = 1.0
_TICK: Final = 0.05


def parse_fault_types(text: str) -> tuple[str, ...]:
    """Fault types from "kill,pause,..." ("all" for every type); ValueError if unknown."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return FAULT_TYPES
    unknown = [n for n in names if n not in FAULT_TYPES]
    if unknown or not names:
        raise ValueError(
            f"unknown fault type(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FAULT_TYPES)} (or all)"
        )
    return tuple(dict.fromkeys(names))


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


@dataclass(frozen=True)
class FaultConfig:
    """How the nemesis behaves."""

    types: tuple[str, ...] = FAULT_TYPES
    interval: float = 2.0  # mean seconds between two faults (uniform in [0.5, 1.5] x interval)
    min_duration: float = 0.5  # how long a fault lasts before its repair
    max_duration: float = 3.0
    max_down: int | None = None  # HSAs unreachable by clients at once (None: all but one)

    def __post_init__(self) -> None:
        if not self.types or set(self.types) - set(FAULT_TYPES):
            raise ValueError(f"fault types must be among {', '.join(FAULT_TYPES)}")
        if self.interval <= 0:
            raise ValueError("the fault interval must be positive")
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError("fault durations need 0 < min <= max")
        if self.max_down is not None and self.max_down < 0:
            raise ValueError("max_down cannot be negative")


@dataclass
class _Active:
    kind: str  # kill, pause, coordinator, partition
    target: str  # host id, or "coordinator"
    until: float
    link: str = ""
    mode: str = ""
    attempts: int = 0


@dataclass
class NemesisFigures:
    """What the nemesis did."""

    injected: Counter[str] = field(default_factory=Counter)
    repairs_failed: int = 0
    skipped: int = 0  # fault times at which no enabled fault could be applied


class Nemesis:
    """Injects faults into a domain at seeded random times until stopped, then heals."""

    def __init__(
        self,
        control: DomainControl,
        nodes: Sequence[str],
        config: FaultConfig,
        rng: random.Random,
        history: History,
    ) -> None:
        if not nodes:
            raise ValueError("the nemesis needs at least one node")
        self._control = control
        self._nodes = list(nodes)
        self._config = config
        self._rng = rng
        self._history = history
        self._max_down = config.max_down if config.max_down is not None else len(nodes) - 1
        self._active: list[_Active] = []
        self._round: list[str] = []
        self._lock = threading.Lock()
        self.figures = NemesisFigures()

    # --- observing ----------------------------------------------------------------------------

    def unreachable(self) -> list[str]:
        """HSAs clients cannot reach now (killed, paused, or client link cut)."""
        with self._lock:
            return sorted(a.target for a in self._active if self._blocks_clients(a))

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
            self._round = list(self._config.types)
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

    def _free_nodes(self) -> list[str]:
        with self._lock:
            busy = {a.target for a in self._active}
        return [n for n in self._nodes if n not in busy]

    def _try_inject(self, kind: str) -> bool:
        """Apply one fault of `kind` if the rules allow it now; True if applied."""
        free = self._free_nodes()
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

    def _repair(self, fault: _Active) -> bool:
        """Undo one fault; on failure it stays active and is retried a little later."""
        fault.attempts += 1
        began = time.monotonic()
        try:
            if fault.kind == "kill":
                self._control.start_node(fault.target)
                op = "restart"
            elif fault.kind == "pause":
                self._control.resume_node(fault.target)
                op = "resume"
            elif fault.kind == "coordinator":
                self._control.start_coordinator()
                op = "restart-coordinator"
            else:
                self._control.restore_link(fault.target, fault.link)
                op = "restore"
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
        self._history.info("nemesis", op, **args)
        return True

    def heal(self, timeout: float = 60.0) -> list[str]:
        """Repair every active fault (pauses and links first, then processes); returns the
        faults still active when `timeout` ran out (empty on success)."""
        deadline = time.monotonic() + timeout
        order = {"pause": 0, "partition": 1, "coordinator": 2, "kill": 3}
        while True:
            with self._lock:
                remaining = sorted(self._active, key=lambda a: order[a.kind])
            if not remaining:
                return []
            for fault in remaining:
                self._repair(fault)
            if time.monotonic() > deadline:
                return self.active()
            with self._lock:
                if self._active:
                    time.sleep(_RETRY_SECONDS / 4)
