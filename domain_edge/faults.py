"""UNSAFE, test-only fault injection: a process kills itself (SIGKILL) at a named point.

Chaos tests (tests/chaos/test_crash_durability.py) need a crash at an exact point of a
proposal's life (after an approval is stored, after the state is stored but before it is
pushed, ...), which timing alone cannot hit. A process started with
`HSM_UNSAFE_FAULT_POINT=<point>[,<point>...]` sends itself SIGKILL, exactly as `kill -9`
would, the first time it reaches one of those points.

Invariants:
- off unless the environment variable is set: the set of points is read once, when this
  module is first imported (process start), and is empty otherwise, so `unsafe_crash_point`
  is then a set lookup and nothing more;
- a process with the variable set says so with a WARNING at start (`warn_if_enabled`), naming
  the points, so it can never be on unnoticed; never set it outside tests;
- only names in `FAULT_POINTS` exist; an unknown name is reported in that warning (a typo
  would otherwise make a chaos test wait for a crash that never comes).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Final

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "FAULT_POINTS",
    "enabled_points",
    "unsafe_crash_point",
    "warn_if_enabled",
]

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE: Final = "HSM_UNSAFE_FAULT_POINT"

FAULT_POINTS: Final[Mapping[str, str]] = {
    # The coordinator (domain_coordinator/_quorum_flow.py, _applying.py, _publish.py).
    "after_approval_stored": "SubmitApproval stored the approval, before answering or applying",
    "after_quorum_before_apply": "a proposal has its quorum, before an HSA is asked to apply it",
    "after_apply_before_store": "an HSA returned the sealed state, before the store has it",
    "after_store_before_push": "the state is stored and its proposal APPLIED, before any push",
    "during_push": "InstallState reached one HSA, while the other pushes are under way",
    # An HSA (hsa_node).
    "hsa_apply_after_seal": "ApplyProposal sealed the next state, before returning it",
    "hsa_install_after_persist": "a verified state is on disk, before it is installed in memory",
}


def _read_environment(environ: Mapping[str, str]) -> frozenset[str]:
    value = environ.get(ENVIRONMENT_VARIABLE, "")
    return frozenset(name.strip() for name in value.split(",") if name.strip())


_ENABLED: Final = _read_environment(os.environ)


def enabled_points() -> frozenset[str]:
    """The fault points this process was started with (empty in every normal run)."""
    return _ENABLED


def warn_if_enabled(logger: logging.Logger) -> None:
    """Log a WARNING at process start when fault injection is on (it never is in production)."""
    if not _ENABLED:
        return
    known = sorted(_ENABLED & FAULT_POINTS.keys())
    unknown = sorted(_ENABLED - FAULT_POINTS.keys())
    logger.warning(
        "UNSAFE test-only fault injection is ON (%s): this process kills itself at %s%s",
        ENVIRONMENT_VARIABLE,
        ", ".join(known) or "no known point",
        f"; unknown point names ignored: {', '.join(unknown)[:200]}" if unknown else "",
    )


def unsafe_crash_point(name: str) -> None:
    """SIGKILL this process here if `name` was enabled at start; otherwise do nothing."""
    if name not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    if name in _ENABLED:
        log.critical("UNSAFE fault injection: killing this process (SIGKILL) at %s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
