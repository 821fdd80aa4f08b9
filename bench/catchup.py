"""Catch-up: a node that missed 100 changes, from its restart to running the current version.

A 3-node domain; hsa-3 is stopped (SIGTERM), the other two apply 100 rotate-domain-key changes
(each waited for on both, so the coordinator always finds an HSA at the head), then hsa-3 is
started again. Timed from the moment its process is spawned:
- `..._restart_to_ready_ms`: until its ready file appears (interpreter start, imports, its own
  stored chain re-verified from the pinned genesis, server bound);
- `..._restart_to_current_ms`: until its `GetStatus` reports the head version (polled every
  2 ms); `..._ready_to_current_ms` is the difference (the states fetched, each verified,
  persisted with fsync and its keys unsealed);
- `..._log_restart_to_current_ms`: the same end point from the node's own log (its last
  "installed state version" line), free of polling delay; `..._log_install_per_state_ms` the
  time between its first and last install over the states in between (fetch, parse, verify,
  unseal, atomic write with fsync: the node's own catch-up rate).
Full runs repeat this 3 times (the node misses 100 more changes each time) and give medians;
quick mode does it once.

Target (issue 7): catch-up of 100 changes under 2 s.
"""

from __future__ import annotations

import re
import time
from typing import Final

from bench._cluster import BenchDomain, StatusPoller, apply_change, log_events
from bench._core import BenchConfig, Figure, Target
from bench._stats import median
from domain_core.changes import rotate_domain_key

NAME: Final = "catchup"
TITLE: Final = "a restarted node that missed 100 changes, to current"
TARGETS: Final = (
    Target(
        "catchup_100_changes_restart_to_current_median_ms",
        "<",
        2000.0,
        "catch-up of 100 changes < 2 s (restart to current)",
    ),
)

LAGGING_HOST: Final = "hsa-3"
POLL_INTERVAL: Final = 0.002
TIMEOUT: Final = 60.0
_INSTALLED: Final = re.compile(r"installed state version (\d+) \([0-9a-f]+\)(?: from (.+?))?,")

__all__ = ["LAGGING_HOST", "NAME", "TARGETS", "TITLE", "run"]


def _one_catch_up(domain: BenchDomain, poller_hosts: list[str], missed: int) -> dict[str, float]:
    """Stop the lagging node, apply `missed` changes, restart it; timings in ms."""
    domain.stop_node(LAGGING_HOST)
    others = StatusPoller(domain, poller_hosts)
    try:
        head = 0
        for _ in range(missed):
            change = apply_change(domain, [rotate_domain_key()])
            others.wait_version(poller_hosts, change.version, timeout=TIMEOUT)
            head = change.version
    finally:
        others.close()
    log_file = domain.layout.log_file(LAGGING_HOST)
    spawned_wall = time.time()
    spawned = time.perf_counter()
    domain.start_node(LAGGING_HOST)
    ready_wall = domain.layout.ready_file(LAGGING_HOST).stat().st_mtime
    lagging = StatusPoller(domain, [LAGGING_HOST])
    try:
        reached = lagging.wait_version(
            [LAGGING_HOST], head, timeout=TIMEOUT, interval=POLL_INTERVAL
        )[LAGGING_HOST]
    finally:
        lagging.close()
    current_wall = spawned_wall + (reached - spawned)
    timings = {
        "restart_to_ready_ms": (ready_wall - spawned_wall) * 1000,
        "restart_to_current_ms": (reached - spawned) * 1000,
        "ready_to_current_ms": (current_wall - ready_wall) * 1000,
    }
    installs = [
        (int(match[1]), stamp)
        for stamp, match in log_events(log_file, _INSTALLED)
        if stamp >= spawned_wall - 1.0 and head - missed < int(match[1]) <= head
    ]
    if installs:
        stamps = [stamp for _, stamp in installs]
        last = max(stamp for version, stamp in installs if version == head)
        timings["log_restart_to_current_ms"] = (last - spawned_wall) * 1000
        if len(installs) > 1:
            timings["log_install_per_state_ms"] = (
                (max(stamps) - min(stamps)) * 1000 / (len(installs) - 1)
            )
    return timings


def run(config: BenchConfig) -> dict[str, Figure]:
    """The catch-up of 100 missed changes (once in quick mode, 3 times in full runs)."""
    missed = 100
    repetitions = int(config.pick(1, 3))
    prefix = f"catchup_{missed}_changes"
    runs: list[dict[str, float]] = []
    with BenchDomain(config.directory("catchup"), nodes=3) as domain:
        others = [h for h in domain.hosts if h != LAGGING_HOST]
        for repetition in range(repetitions):
            timings = _one_catch_up(domain, others, missed)
            runs.append(timings)
            config.log(
                f"   run {repetition + 1}: restart to current "
                f"{timings['restart_to_current_ms']:.0f} ms (ready after "
                f"{timings['restart_to_ready_ms']:.0f} ms)"
            )
    figures: dict[str, Figure] = {"catchup_missed_changes": missed}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        figures[f"{prefix}_{key.removesuffix('_ms')}_median_ms"] = median(values)
    ready_to_current = float(figures[f"{prefix}_ready_to_current_median_ms"])
    if ready_to_current > 0:
        figures[f"{prefix}_states_per_s"] = missed / (ready_to_current / 1000)
    config.add_samples("catchup", "restart to current", [r["restart_to_current_ms"] for r in runs])
    return figures
