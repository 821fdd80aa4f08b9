"""The chaos fault injector against a fake domain: its rules, its seeds and its healing.

`FakeDomain` implements `DomainControl` in memory and fails the test on anything a real domain
would not survive (pausing a dead process, killing one twice, more HSAs down than allowed).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from deploy.chaos.faults import FAULT_TYPES, FaultConfig, Nemesis, parse_fault_types
from deploy.chaos.history import History

pytestmark = pytest.mark.unit

NODES = ("hsa-1", "hsa-2", "hsa-3")


class FakeDomain:
    """Processes and links as sets; records every call; checks the nemesis's rules."""

    def __init__(self, max_down: int, fail_starts: int = 0) -> None:
        self.max_down = max_down
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.cut: dict[tuple[str, str], str] = {}
        self.coordinator_down = False
        self.calls: list[tuple[str, ...]] = []
        self.most_down = 0
        self.fail_starts = fail_starts
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _unreachable(self) -> set[str]:
        clients_cut = {h for (h, link) in self.cut if link == "client"}
        return self.killed | self.paused | clients_cut

    def _record(self, *call: str) -> None:
        with self._lock:
            self.calls.append(call)
            down = len(self._unreachable())
            self.most_down = max(self.most_down, down)
            if down > self.max_down:
                self.errors.append(f"{down} HSAs unreachable after {call}")

    def kill_node(self, host: str) -> None:
        if host in self.killed or host in self.paused:
            self.errors.append(f"kill of {host}, which is already faulted")
        self.killed.add(host)
        self._record("kill", host)

    def start_node(self, host: str) -> None:
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("port in use")
        if host not in self.killed:
            self.errors.append(f"start of {host}, which runs")
        self.killed.discard(host)
        self._record("start", host)

    def pause_node(self, host: str) -> None:
        if host in self.killed or host in self.paused:
            self.errors.append(f"pause of {host}, which is already faulted")
        self.paused.add(host)
        self._record("pause", host)

    def resume_node(self, host: str) -> None:
        self.paused.discard(host)
        self._record("resume", host)

    def kill_coordinator(self) -> None:
        if self.coordinator_down:
            self.errors.append("the coordinator was killed twice")
        self.coordinator_down = True
        self._record("kill-coordinator")

    def start_coordinator(self) -> None:
        self.coordinator_down = False
        self._record("start-coordinator")

    def cut_link(self, host: str, link: str, mode: str) -> None:
        assert link in ("client", "coordinator")
        assert mode in ("refuse", "blackhole")
        if any(h == host for h, _ in self.cut):
            self.errors.append(f"a second cut on {host}")
        self.cut[(host, link)] = mode
        self._record("cut", host, link, mode)

    def restore_link(self, host: str, link: str) -> None:
        self.cut.pop((host, link))
        self._record("restore", host, link)

    @property
    def healed(self) -> bool:
        return not (self.killed or self.paused or self.cut or self.coordinator_down)


def _run(nemesis: Nemesis, seconds: float) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=nemesis.run, args=(stop,))
    thread.start()
    time.sleep(seconds)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.parametrize("max_down", [1, 2])
def test_faults_follow_the_rules_and_heal_completely(max_down: int) -> None:
    domain = FakeDomain(max_down)
    history = History()
    config = FaultConfig(interval=0.01, min_duration=0.01, max_duration=0.08, max_down=max_down)
    nemesis = Nemesis(domain, NODES, config, random.Random(3), history)
    _run(nemesis, 1.0)
    assert nemesis.heal(timeout=5) == []
    assert domain.healed
    assert domain.errors == []
    assert domain.most_down == max_down
    assert set(nemesis.figures.injected) == set(FAULT_TYPES)
    # Every fault and every repair is in the history, a fault before its repair.
    events = [e for e in history.events() if e["process"] == "nemesis"]
    ops = [e["op"] for e in events]
    assert ops.count("kill") == ops.count("restart") == nemesis.figures.injected["kill"]
    assert ops.count("pause") == ops.count("resume")
    assert ops.count("cut") == ops.count("restore") == nemesis.figures.injected["partition"]
    assert ops.count("kill-coordinator") == ops.count("restart-coordinator")
    assert ops.index("kill") < ops.index("restart")


def test_every_type_comes_once_before_any_comes_twice() -> None:
    domain = FakeDomain(max_down=2)
    config = FaultConfig(interval=0.01, min_duration=5.0, max_duration=5.0, max_down=2)
    nemesis = Nemesis(domain, NODES, config, random.Random(11), History())
    for _ in range(4):
        nemesis.inject_one()
    assert sorted(nemesis.figures.injected) == sorted(FAULT_TYPES)
    assert all(count == 1 for count in nemesis.figures.injected.values())
    nemesis.heal(timeout=5)
    assert domain.healed


def _schedule(seed: int) -> list[tuple[str, ...]]:
    domain = FakeDomain(max_down=2)
    config = FaultConfig(interval=0.01, min_duration=30.0, max_duration=30.0, max_down=2)
    nemesis = Nemesis(domain, NODES, config, random.Random(seed), History())
    for _ in range(6):
        nemesis.inject_one()
    nemesis.heal(timeout=5)
    return domain.calls


def test_a_seed_names_the_fault_schedule() -> None:
    assert _schedule(5) == _schedule(5)
    assert any(_schedule(5) != _schedule(seed) for seed in range(6, 12))


def test_only_enabled_types_are_injected_and_full_domains_are_skipped() -> None:
    domain = FakeDomain(max_down=0)
    config = FaultConfig(types=("kill", "pause"), interval=0.01, max_down=0)
    nemesis = Nemesis(domain, NODES, config, random.Random(1), History())
    nemesis.inject_one()
    assert domain.calls == []
    assert nemesis.figures.skipped == 1
    # With no room for an unreachable HSA, a partition can still cut a coordinator link.
    config = FaultConfig(types=("partition",), interval=0.01, max_down=0)
    nemesis = Nemesis(domain, NODES, config, random.Random(1), History())
    for _ in range(3):
        nemesis.inject_one()
    assert all(call[0] == "cut" and call[2] == "coordinator" for call in domain.calls)
    nemesis.heal(timeout=5)
    assert domain.healed


def test_a_failed_repair_is_recorded_and_retried() -> None:
    domain = FakeDomain(max_down=1, fail_starts=1)
    history = History()
    config = FaultConfig(types=("kill",), interval=0.01, min_duration=0.01, max_duration=0.01)
    nemesis = Nemesis(domain, NODES, config, random.Random(2), history)
    nemesis.inject_one()
    assert nemesis.heal(timeout=10) == []
    assert domain.healed
    assert nemesis.figures.repairs_failed == 1
    failed = [e for e in history.events() if e["op"] == "repair-failed"]
    assert failed
    assert failed[0]["args"]["error"] == "port in use"


def test_fault_types_and_config_are_validated() -> None:
    assert parse_fault_types("all") is None  # every type the domain supports
    assert parse_fault_types("kill, pause,kill") == ("kill", "pause")
    with pytest.raises(ValueError, match="unknown fault type"):
        parse_fault_types("kill,meteor")
    with pytest.raises(ValueError, match="none given"):
        parse_fault_types(" , ")
    with pytest.raises(ValueError, match="fault types"):
        FaultConfig(types=())
    with pytest.raises(ValueError, match="min <= max"):
        FaultConfig(min_duration=2, max_duration=1)
    with pytest.raises(ValueError, match="positive"):
        FaultConfig(interval=0)
