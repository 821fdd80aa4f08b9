"""Process-wide gRPC settings that must be in place before gRPC core loads: the TLS 1.2
cipher suites the domain's servers may negotiate.

grpcio (1.85) cannot set a minimum TLS version (`grpc.ssl_server_credentials` takes none), so
a peer that offers only TLS 1.2 is still accepted; every process of the domain negotiates TLS
1.3 with every other (docs/threat-model.md, "Known limits"). What gRPC does document is the
`GRPC_SSL_CIPHER_SUITES` environment variable (grpc/grpc doc/environment_variables.md): the
TLS 1.2 suites, read once when gRPC core initialises, i.e. when `grpc` is first imported; TLS
1.3 suites are not affected by it.

Invariants: importing this module sets the variable to `TLS12_CIPHER_SUITES` (ECDHE with the
ECDSA P-256 keys the domain uses, AES-GCM only), overriding any inherited value, so a wider
setting left in an operator's environment (e.g. `HIGH+ECDSA`, which adds ChaCha20 and CBC
suites) cannot widen what a server accepts. The server packages (`hsa_node`,
`domain_coordinator`) import it before anything that loads gRPC; a process that loaded gRPC
earlier keeps gRPC's default (which, with P-256 keys, is the same two suites) and its
children inherit the pinned value.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Final

VARIABLE: Final = "GRPC_SSL_CIPHER_SUITES"
TLS12_CIPHER_SUITES: Final = "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256"


def pin_tls12_cipher_suites(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the TLS 1.2 suites gRPC may use; False if gRPC was loaded already (too late here)."""
    environ[VARIABLE] = TLS12_CIPHER_SUITES
    return "grpc" not in sys.modules


pin_tls12_cipher_suites()
