"""`hsm-domain status` as printed: what processes and the coordinator say is escaped."""

from __future__ import annotations

import pytest

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
