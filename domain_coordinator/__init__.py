"""The domain coordinator: an untrusted relay and durable store for an HSM domain.

It keeps pending proposals and approvals, the chain of sealed domain states, key records, the
registry of HSA addresses and the HSAs' signed audit heads; it believes nothing it is told
without verification and holds nothing secret. `CoordinatorStore` is its storage interface,
`SqliteStore` the default backend, `EtcdStore` the one coordinator replicas share, and
`open_store` opens the one a config names (exported here); `service.CoordinatorService` is the
gRPC servicer, `server.CoordinatorServer` one running process and `__main__.main` the
`domain-coordinator` command (imported from their modules, so that using the store does not
load gRPC servers).
Importing the package first pins the TLS 1.2 cipher suites gRPC may negotiate
(`domain_edge.grpc_env`), before anything loads gRPC.
"""

from __future__ import annotations

import domain_edge.grpc_env  # noqa: F401  (first: pins TLS 1.2 suites before gRPC loads)
from domain_coordinator.etcd_store import EtcdStore
from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import (
    AuditHeadRecord,
    CoordinatorStore,
    HsaRecord,
    KeyEntry,
    ProposalRecord,
    ProposalState,
)
from domain_coordinator.store_spec import open_store

__all__ = [
    "AuditHeadRecord",
    "CoordinatorStore",
    "EtcdStore",
    "HsaRecord",
    "KeyEntry",
    "ProposalRecord",
    "ProposalState",
    "SqliteStore",
    "open_store",
]
