"""The local cluster launcher behind `hsm-domain`: init, up, down, status, add-node, audit
verify and chaos.

Public API: `init_domain`, `load_layout`, `add_node`, `DomainLayout` (a local domain read back:
its paths, from `domain_edge.layout.DomainPaths`, and what `domain.json` pins),
`read_enrollment` (verify a new host's enrollment), `deploy.cluster` for running the
processes, and `deploy.localdomain.LocalDomain` for a whole local domain driven from Python
(benchmarks, tests). This package imports only `domain_core`, `domain_edge` and
`domain_proto`, never the process or tool packages (it starts the processes by module name).
"""

from __future__ import annotations

from deploy.enrollment import read_enrollment, verify_enrollment
from deploy.init import DomainLayout, add_node, init_domain, load_layout, read_passphrase

__all__ = [
    "DomainLayout",
    "add_node",
    "init_domain",
    "load_layout",
    "read_enrollment",
    "read_passphrase",
    "verify_enrollment",
]
