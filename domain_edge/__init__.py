"""hsm-domain's edge: everything the pure core (`domain_core`) leaves to the outside world.

The edge holds the gRPC transport (servers, channels, the one table from error to gRPC status),
the RPC clients (the coordinator's quorum-flow client, the key service client), and every
file, lock and process concern that several packages share: durable files, host identities
and the domain CA on disk, operator tokens (passphrase files and PKCS#11), config files, the
audit log, the CLIs' common error line, process-wide gRPC settings and test-only fault points.

Invariants: the edge imports the core and the generated messages and stubs (`domain_proto`),
never a process or tool package (`hsa_node`, `domain_coordinator`, `operator_tool`, `deploy`,
`kms_tool`); the core never imports the edge. Both rules are import-linter contracts in
pyproject.toml, checked by `scripts/test.sh`.
"""
