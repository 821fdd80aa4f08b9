"""`hsm-domain status` as printed: what processes and the coordinator say is escaped."""

from __future__ import annotations

import pytest

from deploy._domain_etcd import EtcdMemberReport, EtcdView
from deploy.cli import _print_status
from deploy.status import CoordinatorView, DomainReport, ProcessReport

pytestmark = pytest.mark.unit

HOSTILE = "fork!\nhsa-9        127.0.0.1:1  yes\r\x1b[2K\x1b[32mall healthy\x1b[0m\u202e"


def test_an_hsas_detail_and_the_coordinators_words_are_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 21, item 5: an HSA's status detail (a compromised or confused host), and the
    # coordinator's warning and HSA list, reach the terminal as visible escapes.
    report = DomainReport(
        domain_id="local",
        genesis_hash="ab" * 32,
        quorum=2,
        operators=3,
        processes=[
            ProcessReport(name="coordinator", kind="coordinator", running=True, healthy=True),
            ProcessReport(name="hsa-1", kind="hsa", running=True, detail=HOSTILE),
        ],
        coordinator=CoordinatorView(
            reachable=True,
            version=1,
            store_behind=HOSTILE,
            reported={HOSTILE: {"version": 1, "state_hash": "cd" * 32, "reported_at": 0}},
        ),
    )
    _print_status(report)
    out = capsys.readouterr().out
    for raw in ("\x1b", "\r", "\u202e"):
        assert raw not in out
    lines = out.splitlines()
    assert all(line.isprintable() for line in lines)
    assert not any(line.startswith("hsa-9 ") for line in lines)
    assert lines[-1] == "NOT all healthy"
    assert "(fork!\\nhsa-9        127.0.0.1:1  yes\\r\\x1b[2K\\x1b[32mall healthy" in out
    assert "  WARNING: fork!\\nhsa-9" in out


def _replicated(leader: str, leader_running: bool, member_detail: str) -> DomainReport:
    replicas = [
        ProcessReport(
            name=f"coordinator-{n}",
            kind="coordinator",
            running=leader_running or f"coordinator-{n}" != leader,
            healthy=leader_running or f"coordinator-{n}" != leader,
            leader=leader_running and f"coordinator-{n}" == leader,
        )
        for n in (1, 2, 3)
    ]
    members = [
        EtcdMemberReport("etcd-1", "127.0.0.1:1", running=True, healthy=True, raft_leader=True),
        EtcdMemberReport("etcd-2", "127.0.0.1:2", running=False, detail=member_detail),
    ]
    return DomainReport(
        domain_id="local",
        genesis_hash="ab" * 32,
        quorum=2,
        operators=3,
        processes=replicas,
        coordinator=CoordinatorView(reachable=True, version=1),
        etcd=EtcdView(members=members, replica_leader=leader),
    )


def test_etcd_members_and_the_leader_are_shown_and_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # What an etcd member says (an alarm, an error) is the member's text: escaped too.
    _print_status(_replicated("coordinator-2", True, HOSTILE))
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert all(line.isprintable() for line in out.splitlines())
    assert "etcd-1         127.0.0.1:1            yes      etcd -" in out
    assert "(etcd's raft leader)" in out
    assert "etcd-2         127.0.0.1:2            down" in out
    assert "coordinator-2" in out
    assert "leader: coordinator-2 leads the coordinator replicas" in out
    assert [line for line in out.splitlines() if line.endswith("(leader)")] == [
        line for line in out.splitlines() if line.startswith("coordinator-2 ")
    ]
    assert out.splitlines()[-1] == "NOT all healthy"


def test_a_dead_leader_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    report = _replicated("coordinator-1", False, "unreachable")
    _print_status(report)
    out = capsys.readouterr().out
    assert "leader: coordinator-1 still holds the leadership but is not running" in out
    assert "(leader)" not in out
    assert not report.all_healthy


def test_the_domain_is_healthy_only_with_every_member_and_a_leader() -> None:
    report = _replicated("coordinator-1", True, "")
    assert report.etcd is not None
    report.etcd.members[1].healthy = True
    report.etcd.members[1].running = True
    assert report.all_healthy
    report.etcd.replica_leader = ""
    assert not report.all_healthy
    report.etcd.replica_leader = "coordinator-1"
    report.etcd.members[0].healthy = False
    assert not report.all_healthy
