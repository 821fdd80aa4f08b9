"""`hsm-kms`: an application's tool for the domain's key service. It creates and uses
customer keys of every key spec (Encrypt, Decrypt, ReEncrypt, GenerateDataKey, envelopes;
Sign, Verify, GetPublicKey, GenerateMac, VerifyMac, GenerateDataKeyPair) and delegates their
use (CreateGrant, ListGrants, RetireGrant, RevokeGrant) from the shell.

It is a client: it imports `domain_core` and `domain_edge` (the key service client), never
`hsa_node`, `domain_coordinator`, `operator_tool` or `deploy`. Entry point:
`kms_tool.cli.main`.
"""

from __future__ import annotations

from kms_tool.cli import main

__all__ = ["main"]
