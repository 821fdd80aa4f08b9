"""`hsm-operator`: the operator's tool. An operator holds a token (a PKCS#11 device or a
passphrase-encrypted key file) and uses it to propose, review and approve domain changes.

The private key never leaves a PKCS#11 token; this package imports only `domain_core`,
`domain_edge` and `domain_proto`, never `hsa_node`, `domain_coordinator`, `kms_tool` or
`deploy`. Entry point: `operator_tool.cli.main`.
"""

from __future__ import annotations

from operator_tool.cli import main

__all__ = ["main"]
