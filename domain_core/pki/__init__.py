"""The domain CA and its SPIFFE-style TLS certificates, and reading identities off peers.

Invariants kept here:
- every certificate the CA issues has a P-256 key (gRPC's TLS stack refuses Ed25519 leaves),
  exactly one SPIFFE URI `spiffe://<domain>/<kind>/<name>` in its subject alternative names,
  plus the DNS names and IP addresses a client dials, `CA:FALSE`, digitalSignature only, and an
  extended key usage per kind: hosts and coordinators serve and call (serverAuth + clientAuth),
  clients only call (clientAuth);
- every server certificate (kinds hsa and coordinator) also carries two DNS names derived from
  its SPIFFE id and nothing else: the identity name `<name>.<kind>.<domain>` and the role name
  `<kind>.<domain>` (`identity_dns_name`, `role_dns_name`). Clients check the server they dial
  for one of them (`domain_edge.transport.ExpectedServer`), so a certificate of another kind or
  host fails the TLS handshake. The names of different kinds and identities never collide (the
  kind is always the label right before the domain, and a role name has one label fewer), and
  the CA refuses to put a name of that namespace, or a wildcard, anywhere else;
- the CA signs only for its own trust domain and never past its own expiry;
- a `SpiffeId` exists only in its strict form: lower-case DNS-style trust domain, a kind from
  {hsa, coordinator, client}, one lower-case name; nothing else (no port, query, extra path);
- a peer identity comes from the certificate gRPC verified in the handshake; a peer with no
  certificate, or whose certificate carries no or several SPIFFE ids, is UnauthenticatedError.
  Parsed identities are remembered by the certificate's exact bytes (bounded LRU), so a
  cached identity is only ever returned for the very bytes it was parsed from.

Time is always passed in (`now=`, timezone-aware) so tests control it.

The package's modules: `_names` (SPIFFE ids, derived DNS names), `_certificates` (reading
certificates and peer identities) and `_ca` (the domain CA). This module names the public
API. Keys on disk are the edge's (`domain_edge.ca_files`, `domain_edge.identity_files`).
"""

from __future__ import annotations

from domain_core.pki._ca import DomainCA
from domain_core.pki._certificates import (
    PeerIdentity,
    ca_trust_domain,
    certificate_der,
    certificate_fingerprint,
    certificate_public_key,
    check_domain_ca,
    new_tls_key_pem,
    parse_certificate,
    peer_identity,
    spiffe_id_from_certificate,
    spiffe_id_from_san_values,
    tls_public_key,
    verify_certificate_chain,
)
from domain_core.pki._names import (
    PEER_IDENTITY_CACHE_ENTRIES,
    SERVER_KINDS,
    SPIFFE_KINDS,
    SpiffeId,
    SpiffeKind,
    identity_dns_name,
    is_valid_name,
    is_valid_trust_domain,
    role_dns_name,
)

__all__ = [
    "PEER_IDENTITY_CACHE_ENTRIES",
    "SERVER_KINDS",
    "SPIFFE_KINDS",
    "DomainCA",
    "PeerIdentity",
    "SpiffeId",
    "SpiffeKind",
    "ca_trust_domain",
    "certificate_der",
    "certificate_fingerprint",
    "certificate_public_key",
    "check_domain_ca",
    "identity_dns_name",
    "is_valid_name",
    "is_valid_trust_domain",
    "new_tls_key_pem",
    "parse_certificate",
    "peer_identity",
    "role_dns_name",
    "spiffe_id_from_certificate",
    "spiffe_id_from_san_values",
    "tls_public_key",
    "verify_certificate_chain",
]
