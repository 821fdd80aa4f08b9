"""`hsm-domain chaos`: a local domain under load and faults, and the invariants it must keep.

Modules: `proxy` (a TCP forwarder that cuts and delays links), `history` (every operation as
JSON lines), `workload` (data-plane clients), `control` (quorum-approved domain changes),
`sampler` (every process's head, periodically), `faults` (the seeded fault injector),
`checker` and `store_checks` (pure invariant checks; `_verdicts` is what they share),
`report`, `runner` (owns the processes of the run), `replicas` (etcd members and each
replica's links to them), `final` and `final_store` (what the run observes at its end: the
processes, and the store of a domain with replicas), `experiment` (one run: load, faults,
settling, checks) and `cli` (the command). docs/chaos.md explains the tool.
"""

from __future__ import annotations

from deploy.chaos.checker import InvariantResult, check_all
from deploy.chaos.experiment import run_chaos
from deploy.chaos.faults import FAULT_TYPES, REPLICA_FAULT_TYPES, FaultConfig
from deploy.chaos.history import History
from deploy.chaos.proxy import LinkMode, TcpProxy
from deploy.chaos.report import ChaosReport
from deploy.chaos.runner import ChaosOptions
from deploy.chaos.workload import WorkloadConfig

__all__ = [
    "FAULT_TYPES",
    "REPLICA_FAULT_TYPES",
    "ChaosOptions",
    "ChaosReport",
    "FaultConfig",
    "History",
    "InvariantResult",
    "LinkMode",
    "TcpProxy",
    "WorkloadConfig",
    "check_all",
    "run_chaos",
]
