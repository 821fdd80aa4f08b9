"""hsm-domain's pure core: the rules every process and tool verifies alike.

What it holds: the data model (`model`: proposals, approvals, manifests, sealed states, host
records, each validated on construction from the exact bytes received), canonical encoding
and domain-separated digests (`canonical`), the changes a proposal makes (`changes`), quorum
rules (`quorum`), state transitions and their invariants (`transition`), chain verification
(`chain`), sealing of the domain keys (`sealing`), genesis (`genesis`), host enrollments and
their verification (`enrollment`), key tokens and key records (`keytokens`), the ciphertext
and envelope formats (`ciphertext`, `envelope`), key policies (`policy`), the signed messages
between peers (`peering`), crypto primitives (`crypto`), the in-memory signer and verifier
types (`signers`: `Signer`, `InMemorySigner`, `PublicKey`), a host's keys in memory
(`identity.HostIdentity`), SPIFFE ids, certificates and the domain CA in memory (`pki`),
input limits as values (`limits`), the domain-separation labels of every signature
(`contexts`), the key-lifecycle rules (`keylifecycle`), how the next state is produced from a
proposal or a scheduled rotation (`producing`), terminal-safe text (`display`) and the one error
hierarchy (`errors`, each class with one `Status`).

What it does not do: no network, file, process or lock I/O, and no grpc: it reads the
generated protobuf messages (`domain_proto.*_pb2`) but never the gRPC stubs. Its only
contact with the outside is the OS random source (`crypto.random_bytes`); time is passed in.
Files, keys on disk, tokens, RPC clients, the transport and the error-to-gRPC table are the
edge (`domain_edge`). Import-linter contracts in pyproject.toml hold the core to this.
"""
