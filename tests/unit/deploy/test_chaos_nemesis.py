"""The chaos fault injector against a fake domain: its rules, its seeds and its healing.

`FakeDomain` implements `DomainControl` in memory and fails the test on anything a real domain
would not survive (pausing a dead process, killing one twice, more HSAs down than allowed).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from deploy.chaos.faults import (
    FAULT_TYPES,
    REPLICA_FAULT_TYPES,
    FaultConfig,
    Nemesis,
    Replicas,
    domain_fault_types,
    parse_fault_types,
)
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


# --- a domain with coordinator replicas -------------------------------------------------------

REPLICAS = ("coordinator-1", "coordinator-2", "coordinator-3")
ETCD = ("etcd-1", "etcd-2", "etcd-3")


class FakeReplicas:
    """Replicas and etcd members as sets; fails the test on what a real domain would not
    survive (no replica up and reaching etcd, etcd without a majority, a target faulted
    twice), and says who leads."""

    def __init__(self) -> None:
        self.killed: set[str] = set()
        self.paused: set[str] = set()
        self.cut: dict[str, str] = {}
        self.etcd_down: set[str] = set()
        self.leader = "coordinator-2"
        self.leader_asked = 0
        self.calls: list[tuple[str, ...]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _down(self) -> set[str]:
        return self.killed | self.paused | set(self.cut)

    def _record(self, *call: str) -> None:
        with self._lock:
            self.calls.append(call)
            if len(self._down()) >= len(REPLICAS):
                self.errors.append(f"no replica up after {call}")
            if len(self.etcd_down) > (len(ETCD) - 1) // 2:
                self.errors.append(f"etcd lost its majority after {call}")

    def _fault(self, name: str) -> None:
        if name in self._down():
            self.errors.append(f"{name} faulted twice")

    def replica_leader(self) -> str:
        self.leader_asked += 1
        return self.leader

    def kill_replica(self, name: str) -> None:
        self._fault(name)
        self.killed.add(name)
        self._record("kill-replica", name)

    def start_replica(self, name: str) -> None:
        if name not in self.killed:
            self.errors.append(f"start of {name}, which runs")
        self.killed.discard(name)
        self._record("start-replica", name)

    def pause_replica(self, name: str) -> None:
        self._fault(name)
        self.paused.add(name)
        self._record("pause-replica", name)

    def resume_replica(self, name: str) -> None:
        self.paused.discard(name)
        self._record("resume-replica", name)

    def cut_etcd(self, name: str, mode: str) -> None:
        assert mode in ("refuse", "blackhole")
        self._fault(name)
        self.cut[name] = mode
        self._record("cut-etcd", name, mode)

    def restore_etcd(self, name: str) -> None:
        self.cut.pop(name)
        self._record("restore-etcd", name)

    def kill_etcd(self, member: str) -> None:
        if member in self.etcd_down:
            self.errors.append(f"{member} killed twice")
        self.etcd_down.add(member)
        self._record("kill-etcd", member)

    def start_etcd(self, member: str) -> None:
        self.etcd_down.discard(member)
        self._record("start-etcd", member)

    @property
    def healed(self) -> bool:
        return not (self._down() or self.etcd_down)


def _replicated(
    seed: int, config: FaultConfig, replicas: FakeReplicas, history: History | None = None
) -> tuple[Nemesis, FakeDomain]:
    domain = FakeDomain(max_down=2)
    nemesis = Nemesis(
        domain,
        NODES,
        config,
        random.Random(seed),
        history or History(),
        replicas=Replicas(replicas, REPLICAS, ETCD),
    )
    return nemesis, domain


def test_replica_faults_keep_a_replica_up_and_etcd_a_majority_and_heal() -> None:
    replicas = FakeReplicas()
    history = History()
    config = FaultConfig(interval=0.01, min_duration=0.01, max_duration=0.1)
    nemesis, domain = _replicated(4, config, replicas, history)
    assert nemesis.types == ("kill", "pause", "partition", *REPLICA_FAULT_TYPES)
    _run(nemesis, 1.5)
    assert nemesis.heal(timeout=5) == []
    assert replicas.healed
    assert domain.healed
    assert replicas.errors == []
    assert domain.errors == []
    assert set(nemesis.figures.injected) == set(nemesis.types)
    ops = [e["op"] for e in history.events() if e["process"] == "nemesis"]
    assert ops.count("kill-replica") == ops.count("restart-replica") > 0
    assert ops.count("pause-replica") == ops.count("resume-replica") > 0
    assert ops.count("cut-etcd") == ops.count("restore-etcd") > 0
    assert ops.count("kill-etcd") == ops.count("restart-etcd") > 0
    assert "kill-coordinator" not in ops  # one coordinator's fault: not on replicas


def test_with_every_replica_but_one_down_no_replica_fault_is_injected() -> None:
    replicas = FakeReplicas()
    config = FaultConfig(types=("replica-kill", "replica-pause"), interval=0.01, max_duration=60)
    nemesis, _ = _replicated(2, config, replicas)
    for _ in range(5):
        nemesis.inject_one()
    assert len(replicas.killed | replicas.paused) == len(REPLICAS) - 1
    assert nemesis.figures.skipped == 3
    # etcd: one member of three down at most.
    nemesis, _ = _replicated(2, FaultConfig(types=("etcd-kill",), max_duration=60), replicas)
    for _ in range(3):
        nemesis.inject_one()
    assert len(replicas.etcd_down) == 1
    assert nemesis.figures.skipped == 2
    assert replicas.errors == []


def test_replica_faults_aim_at_the_leader_etcd_names_and_record_it() -> None:
    replicas = FakeReplicas()
    history = History()
    config = FaultConfig(
        types=("replica-kill",), interval=0.01, min_duration=0.01, max_duration=0.01
    )
    led = 0
    for seed in range(40):
        nemesis, _ = _replicated(seed, config, replicas, history)
        nemesis.inject_one()
        led += nemesis.figures.leader_faults["replica-kill"]
        nemesis.heal(timeout=5)
    kills = [e["args"] for e in history.events() if e["op"] == "kill-replica"]
    assert len(kills) == 40
    assert replicas.leader_asked == 40
    for kill in kills:
        assert kill["leader"] is (kill["target"] == "coordinator-2")
        if kill["aimed"]:
            assert kill["target"] == "coordinator-2"  # the leader etcd named, on purpose
    aimed = sum(1 for k in kills if k["aimed"])
    assert 10 < aimed < 30  # a seeded coin, about half of the time
    assert led == sum(1 for k in kills if k["leader"]) > aimed  # and now and then by chance


def test_a_leader_etcd_cannot_name_leaves_the_fault_to_chance() -> None:
    replicas = FakeReplicas()

    def unavailable() -> str:
        raise RuntimeError("etcd does not answer")

    replicas.replica_leader = unavailable  # type: ignore[method-assign]
    history = History()
    seen: list[tuple[str, str, bool]] = []
    config = FaultConfig(types=("replica-pause",), max_duration=60)
    domain = FakeDomain(max_down=2)
    nemesis = Nemesis(
        domain,
        NODES,
        config,
        random.Random(1),
        history,
        replicas=Replicas(replicas, REPLICAS, ETCD),
        on_fault=lambda kind, target, leader: seen.append((kind, target, leader)),
    )
    nemesis.inject_one()
    assert len(replicas.paused) == 1
    assert seen == [("replica-pause", next(iter(replicas.paused)), False)]
    nemesis.heal(timeout=5)
    assert replicas.healed


def test_fault_types_must_fit_the_domain() -> None:
    assert domain_fault_types(None, replicated=False) == FAULT_TYPES
    assert domain_fault_types(None, replicated=True) == (
        "kill",
        "pause",
        "partition",
        *REPLICA_FAULT_TYPES,
    )
    assert parse_fault_types("etcd-kill,kill") == ("etcd-kill", "kill")
    with pytest.raises(ValueError, match="need coordinator replicas on etcd"):
        domain_fault_types(("kill", "etcd-cut"), replicated=False)
    with pytest.raises(ValueError, match="replica-kill kills a replica"):
        domain_fault_types(("coordinator",), replicated=True)
    with pytest.raises(ValueError, match="need coordinator replicas"):
        Nemesis(
            FakeDomain(1), NODES, FaultConfig(types=("replica-kill",)), random.Random(), History()
        )
