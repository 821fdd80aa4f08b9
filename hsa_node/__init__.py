"""An HSA of the domain: verifies and keeps the chain of sealed states, holds the domain keys
in memory, seals quorum-approved transitions, and serves peers and the coordinator.

Public API: `DomainNode` (the verified state of one HSA; every state enters through
`DomainNode.offer`), `NodeStore` (its files), `Syncer` (the stream, pull and gossip threads),
`HsaServer` / `load_node` (one process), and `main` (the `hsa-node` command). The key service
(docs/runtime.md, "The key service"): `KeyServiceServicer`, `KeyCache` (verified key records
from the coordinator), `KeyMaintainer` (re-wrap, automatic rotation and deletion in the
background).
Key service workers (more cores for one host's data plane): `hsa_node.worker` (one worker
process, following the main process's store read-only) and `hsa_node.supervisor` (the main
process starts, restarts and stops them).

Importing the package first pins the TLS 1.2 cipher suites gRPC may negotiate
(`domain_edge.grpc_env`), before anything loads gRPC.
"""

from __future__ import annotations

import domain_edge.grpc_env  # noqa: F401  (first: pins TLS 1.2 suites before gRPC loads)
from hsa_node.keycache import KeyCache
from hsa_node.keyservice import KeyServiceServicer
from hsa_node.node import DomainNode, NodeStatus, StoredStateError
from hsa_node.rewrap import KeyMaintainer
from hsa_node.server import HsaServer, load_node
from hsa_node.storage import NodeStore, Peer
from hsa_node.sync import Syncer

__all__ = [
    "DomainNode",
    "HsaServer",
    "KeyCache",
    "KeyMaintainer",
    "KeyServiceServicer",
    "NodeStatus",
    "NodeStore",
    "Peer",
    "StoredStateError",
    "Syncer",
    "load_node",
]
