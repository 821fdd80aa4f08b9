"""Changes an HSA defers (key records must move first) wait, visibly, with a back-off.

The coordinator runs in this process with real ports and TLS; the HSA is the scripted
`HsaAdmin` of test_coordinator_apply (hsa-1's certificate), here answering UNAVAILABLE with the
reason an HSA gives while it re-signs or re-wraps key records (`TransitionDeferredError`). A
deferred proposal stays PENDING with that reason, is asked again after a growing delay (not at
every 0.2 s sweep: each ask may list every key record), and applies once the HSA is ready; a
due scheduled rotation that an HSA defers says so in the coordinator's log, with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_coordinator_apply import Clock, ScriptedHsa, cleanup, start, wait_for

from domain_core import transition
from domain_edge.client import rotate_domain_key
from domain_proto import domain_pb2

pytestmark = pytest.mark.integration

__all__ = ["cleanup"]  # the fixture, used by name

REASON = (
    "12 key records are still signed by hsa-3, which this change removes; re-signing them "
    "first: the coordinator retries"
)


@dataclass
class DeferringHsa(ScriptedHsa):
    """Defers (UNAVAILABLE with a reason) while `deferring`, then applies honestly."""

    deferring: bool = True
    rotations: int = 0

    def ApplyProposal(self, request: Any, context: Any) -> domain_pb2.SealedState:
        if self.deferring:
            self.applied += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, REASON)
        return super().ApplyProposal(request, context)

    def RotateDomainKey(self, request: Any, context: Any) -> domain_pb2.SealedState:
        self.rotations += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, REASON)
        raise AssertionError("abort raises")


def test_a_deferred_proposal_waits_with_its_reason_and_a_back_off(
    tmp_path: Path, cleanup: list[Callable[[], None]]
) -> None:
    setup = start(tmp_path, cleanup, hsa_type=DeferringHsa)
    hsa = setup.hsa
    assert isinstance(hsa, DeferringHsa)
    alice, bob = setup.domain.operators["alice"], setup.domain.operators["bob"]
    view = setup.client.propose([rotate_domain_key()], alice)
    view = setup.client.approve(view.proposal_id, bob)
    assert view.state == "pending"
    assert REASON in view.detail
    assert "the coordinator retries in" in view.detail
    # The sweep runs every 0.2 s; asked again only after 0.2, 0.4, 0.8, 1.6 s...: in 3 s at
    # most 5 asks, where 15 sweeps would have asked 15 times.
    asked = hsa.applied
    time.sleep(3.0)
    assert 1 <= hsa.applied - asked <= 5, hsa.applied - asked
    assert setup.client.latest_state().version == 1
    hsa.deferring = False
    wait_for(
        "the deferred proposal to apply",
        lambda: setup.client.get_proposal(view.proposal_id).applied,
        timeout=15,
    )
    assert setup.client.latest_state().version == 2


def test_a_deferred_scheduled_rotation_is_logged_with_its_reason(
    tmp_path: Path, cleanup: list[Callable[[], None]], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    setup = start(tmp_path, cleanup, clock=clock, hsa_type=DeferringHsa)
    hsa = setup.hsa
    assert isinstance(hsa, DeferringHsa)
    caplog.set_level(logging.WARNING, logger="domain_coordinator._applying")
    due = transition.rotation_due_at(setup.client.latest_state().manifest)
    clock.offset = due - time.time() + 1  # the rotation is due now
    wait_for("the rotation to be asked for", lambda: hsa.rotations >= 1)
    wait_for(
        "the deferral in the log",
        lambda: "scheduled domain key rotation is due but waits" in caplog.text,
    )
    assert REASON in caplog.text
    asked = hsa.rotations
    time.sleep(3.0)
    assert hsa.rotations - asked <= 5
    assert setup.client.latest_state().version == 1
