"""Every input limit in one place: how large, how many and (for settings) how far what a
process accepts from outside may be; mirrored in gRPC server and channel options.

Two kinds live here:
- `Limits`, the limits and quotas an operator may tune: a process takes them from its config
  file (`limits`: a JSON object of field names to values, over these defaults;
  `Limits.with_overrides`), so an unknown name or a value of the wrong kind is a clear error at
  start. The token buckets that enforce the rate quotas at run time (a lock, a clock) are
  `domain_edge.rate_limit.RateLimiter`.
- fixed limits (module constants, grouped below, one line each on what they bound): sizes of
  request fields, files and tokens, pages and counts per request, the ranges of settings a
  proposal, a key or a config file may set, and how many items of a kind a process keeps from
  others.

What does not live here, because it bounds nothing a process accepts:
- bounds an encoding fixes (the largest u32 in `keytokens`, `ciphertext` and `kms_tool._args`;
  a one-byte key id length and the 2**32 chunk counter of `ciphertext` and `envelope`; what a
  64-bit integer column holds in the coordinator's store: `store.MAX_STORED_INTEGER`,
  `_requests.MAX_REPORTED_VERSION`);
- the audit record's clipping widths (`domain_edge.audit._encoding`): longer values are cut and
  marked, never refused, since an audit record must be written whatever a caller sent;
- caps on a process's own bookkeeping (`ThrottledLog`'s remembered keys, the interceptor's
  wrapped methods) and tuning (retry doublings, deferral back-off, thread pools);
- the sizing of a server, set where it is built: threads, concurrent calls (the coordinator's
  `MAX_CONCURRENT_RPCS` and `OPERATOR_MAX_CONCURRENT_RPCS`), stream quotas
  (`domain_edge.transport.StreamLimits`), and constructor defaults that tests override
  (`DEFAULT_MAX_STREAMS`, `DEFAULT_MAX_ADDRESSES`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from domain_core.errors import InvalidInputError


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what the domain accepts from anyone."""

    max_message_bytes: int = 4 * 1024 * 1024
    # A proposal's serialized bytes: what every approver reviews and signs. Small and fixed,
    # so that a pending proposal costs little to store, relay and review.
    max_proposal_bytes: int = 64 * 1024
    max_hosts: int = 64
    max_operators: int = 64
    max_changes_per_proposal: int = 64
    max_approvals_per_proposal: int = 128
    max_reason_chars: int = 1024
    max_name_chars: int = 64
    max_clock_skew_seconds: int = 300
    max_states_per_response: int = 100
    max_plaintext_bytes: int = 4096
    max_encryption_context_entries: int = 64
    max_encryption_context_bytes: int = 8192
    max_key_description_chars: int = 8192
    max_policy_grants: int = 64
    max_principals_per_grant: int = 64
    # Grants one key holds (CreateGrant): kept in the key's signed metadata, carried in every
    # copy of its record (AWS KMS allows 50,000 per key, in its own store).
    max_grants_per_key: int = 100
    # A key policy's serialized size (AWS KMS caps a key policy at 32 KiB): the policy is
    # carried in every copy of the key's record and parsed into every HSA's key cache.
    max_policy_bytes: int = 32 * 1024
    max_random_bytes: int = 1024
    # The coordinator's quotas. WatchStates streams one host may hold open at a time (a new
    # one replaces its oldest), on top of the coordinator's global cap on streams.
    max_watch_streams_per_host: int = 2
    # Calls from one client address that is not an authenticated HSA of the domain (anyone on
    # the operator port; other identities on the mutual-TLS port): a token bucket refilled at
    # `coordinator_reads_per_second`, holding at most `coordinator_read_burst`. A page of
    # states costs one token per `coordinator_states_per_token` states beyond the first call.
    coordinator_reads_per_second: float = 50.0
    coordinator_read_burst: int = 200
    coordinator_states_per_token: int = 10
    # A page of ListProposals costs one token per `coordinator_proposals_per_token` proposals
    # beyond the first call (each one is parsed and its approvals counted).
    coordinator_proposals_per_token: int = 5
    # Proposals the coordinator keeps pending: in all, and of one proposer, so that one
    # operator cannot fill the store (nor the global cap, blocking the others).
    max_pending_proposals: int = 1000
    max_pending_proposals_per_operator: int = 32
    # Proposals of one proposer the coordinator keeps in any state: beyond it, their oldest
    # closed and expired ones are purged before the retention period ends, so that submitting
    # and cancelling in a loop cannot grow the store.
    max_stored_proposals_per_operator: int = 1000
    # CreateKey per principal, on each HSA process (a token bucket): AWS KMS allows 5 per
    # second per account, with bursts.
    create_key_per_second: float = 5.0
    create_key_burst: int = 50
    # Keys one principal may have created (counted by the coordinator at create, deleted keys
    # not counted): AWS KMS allows 100,000 per account and region.
    max_keys_per_principal: int = 100_000
    # Request-rate quotas of the key service per principal and class of operation, for the
    # whole domain (token buckets: a rate per second, and the burst a bucket holds). Each HSA
    # process enforces its share, the domain's rate divided among the key-service processes
    # of the domain (hsa_node.quotas, docs/runtime.md "Request quotas"). Modelled on AWS KMS:
    # cryptographic operations (symmetric) 10,000/s (5,500-50,000 by region), DescribeKey
    # 2,000/s, ListKeys 100/s, key administration (EnableKey, DisableKey, ...) 5-15/s.
    crypto_requests_per_second: float = 10_000.0
    crypto_request_burst: int = 10_000
    read_requests_per_second: float = 2_000.0
    read_request_burst: int = 2_000
    list_requests_per_second: float = 100.0
    list_request_burst: int = 100
    admin_requests_per_second: float = 15.0
    admin_request_burst: int = 60
    # Sign, Verify and GenerateDataKeyPair[WithoutPlaintext] (an RSA or ECC operation costs
    # 10-1000 times a symmetric one): AWS KMS allows 500/s for RSA keys, 300/s for ECC keys.
    asymmetric_requests_per_second: float = 500.0
    asymmetric_request_burst: int = 500
    # A signature, a MAC or an RSA ciphertext a caller sends (RSA-4096: 512 bytes; ECDSA
    # P-521: at most 139 bytes DER; HMAC-SHA-512: 64 bytes).
    max_asymmetric_blob_bytes: int = 1024
    # Calls of one key-service session (`KeyService.Session`) running or waiting at once;
    # beyond it the HSA stops reading the stream (HTTP/2 flow control holds the client).
    max_session_calls_in_flight: int = 64

    def grpc_options(self) -> list[tuple[str, int]]:
        """gRPC options that enforce the message limit on servers and channels."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]

    def with_overrides(self, overrides: Mapping[str, object], where: str = "limits") -> Limits:
        """These limits with some fields replaced (a config file's `limits` object).

        InvalidInputError for an unknown name, a value of the wrong type, or a value below 1
        (0 for none of them: every limit is a positive bound).
        """
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        values: dict[str, object] = {}
        for name, value in overrides.items():
            kind = kinds.get(name)
            if kind is None:
                raise InvalidInputError(
                    f"{where}: unknown limit {name[:64]!r}; known: {', '.join(sorted(kinds))}"
                )
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
                raise InvalidInputError(f"{where}: {name} must be a whole number, not {value!r}")
            if kind == "float" and not numeric:
                raise InvalidInputError(f"{where}: {name} must be a number, not {value!r}")
            if not numeric or not value > 0:  # type: ignore[operator]
                raise InvalidInputError(f"{where}: {name} must be above 0, not {value!r}")
            values[name] = float(value) if kind == "float" else value  # type: ignore[arg-type]
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]


DEFAULT_LIMITS = Limits()


# --- key service requests -------------------------------------------------------------------
# The message of Sign, Verify, GenerateMac and VerifyMac, as AWS KMS bounds it (1 to 4096
# bytes; a longer message is signed as its DIGEST).
MIN_KMS_MESSAGE_BYTES: Final = 1
MAX_KMS_MESSAGE_BYTES: Final = 4096
# An import token and wrapped key material a caller sends to ImportKeyMaterial (an RSA-4096
# wrapping key sealed is about 2,500 bytes; wrapped material at most 512 + a 4 KiB key wrap).
MAX_IMPORT_BYTES: Final = 8192
# Tags of one key (AWS KMS: 50), a tag key's and a tag value's characters (128, 256).
MAX_TAGS_PER_KEY: Final = 50
MAX_TAG_KEY_CHARS: Final = 128
MAX_TAG_VALUE_CHARS: Final = 256
# A grant's name (AWS KMS: 256 characters), and a page of ListGrants (AWS KMS: 100).
MAX_GRANT_NAME_CHARS: Final = 256
MAX_GRANT_PAGE: Final = 100
# Grant tokens one call may carry (AWS KMS: 10), and one token's bytes.
MAX_GRANT_TOKENS: Final = 10
MAX_GRANT_TOKEN_BYTES: Final = 8192


# --- requests to the coordinator ----------------------------------------------------------
# A signature carried in a request (approval, cancel, key record, head confirmation).
MAX_SIGNATURE_BYTES: Final = 512
# How many addresses one client channel may be given (a coordinator's replicas).
MAX_CHANNEL_ADDRESSES: Final = 16
# A CreateKey idempotency key: printable ASCII the client chose (a UUID is 36).
MAX_IDEMPOTENCY_KEY_CHARS: Final = 64
# An address an HSA reports for itself ("host:port").
MAX_ADDRESS_CHARS: Final = 255
# A stored key record (metadata, tokens, signature); also capped by max_message_bytes.
MAX_KEY_RECORD_BYTES: Final = 1024 * 1024
# Key tokens in one key record (one per backing version).
MAX_TOKENS_PER_KEY: Final = 4096
# Key records in one page of ListKeyRecords.
MAX_KEY_PAGE: Final = 1000
# Proposals in one page of ListProposals.
MAX_PROPOSAL_PAGE: Final = 200
# A page token (a positive 63-bit integer in decimal).
MAX_PAGE_TOKEN_CHARS: Final = 19
# Audit heads in one HSA report (its own log and up to 16 workers' fit with room).
MAX_AUDIT_HEADS_PER_REPORT: Final = 64
# A health check request, which anyone may send to any server.
HEALTH_REQUEST_BYTES: Final = 1024

# --- requests between HSAs and to the key service -------------------------------------------
# Keys in one page of ListKeys (its `limit`).
MAX_LIST_KEYS_LIMIT: Final = 1000
# A peering challenge's nonce.
MIN_PEERING_NONCE_BYTES: Final = 16
MAX_PEERING_NONCE_BYTES: Final = 64
# Key floors in one page a peer serves or is taken from.
MAX_FLOORS_PER_PAGE: Final = 1000
# Keys whose floors one request asks for.
MAX_FLOOR_KEYS_PER_REQUEST: Final = 100
# Pages of key floors taken from one peer in one exchange round.
MAX_FLOOR_PAGES_PER_ROUND: Final = 100
# Addresses kept per host from peers' hints.
MAX_ADDRESS_HINTS_PER_HOST: Final = 8
# Distinct (version, peer) forks an HSA remembers (the first one is shown).
MAX_FORKS_KEPT: Final = 64
# Audit heads an HSA keeps from its peers (hosts x logs; far above any domain's).
MAX_PEER_HEADS_KEPT: Final = 4096
# Proposals a client fetches for `list_proposals` (newest first).
MAX_LISTED_PROPOSALS: Final = 1000

# --- what a proposal, a key and an envelope may set -----------------------------------------
# An enrollment (a host record, a certificate and two signatures: about 1 KiB).
MAX_ENROLLMENT_BYTES: Final = 8 * 1024
# A recovery share sealed to a recovery session in an approval: a 32-byte key's SLIP-39 words
# (33 words) and the GCM tag fit well within it.
MAX_RECOVERY_CONTRIBUTION_BYTES: Final = 1024
# A recovery session file: enrollments of at most a domain's hosts (8 KiB each) and a little.
MAX_RECOVERY_SESSION_FILE_BYTES: Final = 1024 * 1024
# The domain key rotation interval a proposal may set.
MIN_ROTATION_INTERVAL_SECONDS: Final = 60
# Domain key generations kept; a rotation must keep the generation key records are sealed
# under until re-wrap moves them.
MIN_GENERATIONS_RETAINED: Final = 2
MAX_GENERATIONS_RETAINED: Final = 100
# The proposal lifetime a domain's settings may allow.
MIN_PROPOSAL_LIFETIME_SECONDS: Final = 60
MAX_PROPOSAL_LIFETIME_SECONDS: Final = 30 * 24 * 3600
# A customer key's automatic rotation period (AWS KMS allows 90 to 2560 days).
MIN_ROTATION_PERIOD_DAYS: Final = 90
MAX_ROTATION_PERIOD_DAYS: Final = 2560
# The waiting period before a key scheduled for deletion is deleted.
MIN_DELETION_WINDOW_DAYS: Final = 7
MAX_DELETION_WINDOW_DAYS: Final = 30
# Backing versions of one key (the coordinator stores at most 4096 tokens per key).
MAX_BACKING_VERSIONS: Final = 1000
# An envelope's chunk size.
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
# A DNS name in a certificate, and a SPIFFE trust domain (RFC 1035).
MAX_DNS_NAME_CHARS: Final = 253
MAX_TRUST_DOMAIN_CHARS: Final = 253

# --- audit logs -----------------------------------------------------------------------------
# A log line (the writer never writes a longer one; the verifier refuses to buffer it).
MAX_AUDIT_LINE_BYTES: Final = 1 << 20
# A published head: one checkpoint line.
MAX_HEAD_BYTES: Final = 2048
# The host named in a head.
MAX_AUDIT_HOST_CHARS: Final = 256

# --- operator tokens and PKCS#11 ------------------------------------------------------------
# A PKCS#11 token label (CK_TOKEN_INFO.label is 32 bytes, blank padded).
MAX_TOKEN_LABEL_BYTES: Final = 32
# A PKCS#11 key label (CKA_LABEL), in a token reference or when generating.
MAX_KEY_LABEL_CHARS: Final = 256
# A PKCS#11 key id (CKA_ID).
MAX_CKA_ID_BYTES: Final = 128
# A token reference (pkcs11: URI or file path).
MAX_TOKEN_REFERENCE_CHARS: Final = 4096
# A file token's name.
MAX_FILE_TOKEN_NAME_CHARS: Final = 128
# A file token's scrypt cost parameter N (a power of two).
MIN_SCRYPT_N: Final = 2**14
MAX_SCRYPT_N: Final = 2**20

# --- files a process reads ------------------------------------------------------------------
# A private key file (the CA's key).
MAX_KEY_FILE_BYTES: Final = 1 << 20
# A host identity's files (host.json and its key files).
MAX_HOST_IDENTITY_FILE_BYTES: Final = 64 * 1024
# A file token.
MAX_TOKEN_FILE_BYTES: Final = 64 * 1024
# An operator public key document.
MAX_OPERATOR_PUBLIC_FILE_BYTES: Final = 64 * 1024
# A passphrase or PIN file.
MAX_SECRET_INPUT_FILE_BYTES: Final = 4096
# An HSA's small state files (a worker's ready file, the cached peer list).
MAX_NODE_SMALL_FILE_BYTES: Final = 1024 * 1024
# An HSA's remembered address.
MAX_ADDRESS_FILE_BYTES: Final = 256
# The genesis marker `hsm-domain init` leaves for an HSA (one hash in hex and a newline).
MAX_GENESIS_MARKER_FILE_BYTES: Final = 200
# An HSA's copy of its peers' audit heads.
MAX_PEER_HEADS_FILE_BYTES: Final = 4 * 1024 * 1024
# The longest deadline one call of a key-service session may ask for (`timeout_ms`).
MAX_SESSION_CALL_TIMEOUT_MS: Final = 300_000
# The longest retry delay a client believes of a server that refused a call for its caller's
# request rate (`retry-after`; the client still bounds its wait by its own deadline).
MAX_RETRY_AFTER_MS: Final = 60_000
# A JSON file an operator passes to hsm-operator (cluster file, coordinator pin).
MAX_OPERATOR_JSON_FILE_BYTES: Final = 1 << 20
# domain.json of a domain directory (pins, operators, a domain across hosts' addresses).
MAX_DOMAIN_FILE_BYTES: Final = 1 << 20
# The hex digits of a proposal id an operator must type at least (a prefix names one).
MIN_PROPOSAL_ID_PREFIX_CHARS: Final = 6
# A CA certificate file passed to hsm-operator.
MAX_CA_CERT_FILE_BYTES: Final = 1 << 16
# An offline approval file.
MAX_APPROVAL_FILE_BYTES: Final = 1 << 20
# A proposal export file (the chain grows by a few KiB per state: ~1.2 MiB a year with daily
# rotations).
MAX_EXPORT_FILE_BYTES: Final = 64 << 20
# One state or proposal inside an export file.
MAX_EXPORTED_STATE_BYTES: Final = 4 << 20
# One signature inside an export or approval file.
MAX_EXPORTED_SIGNATURE_BYTES: Final = 256
# A key policy file passed to hsm-kms.
MAX_POLICY_FILE_BYTES: Final = 1 << 20
# The header frame of a backup file (domain id, hashes, counts).
MAX_BACKUP_HEADER_BYTES: Final = 4096
# One record frame of a backup file: a state (at most max_message_bytes), a key record (at most
# MAX_KEY_RECORD_BYTES) or a proposal with its approvals and votes, with room for its fields.
MAX_BACKUP_RECORD_BYTES: Final = 8 << 20
# The operator id an approval or vote is kept under in a backup (64 hex characters).
MAX_BACKUP_OPERATOR_ID_CHARS: Final = 64
# The detail of a stored proposal in a backup (why it closed).
MAX_BACKUP_DETAIL_CHARS: Final = 4096
# An audit log name in a backup.
MAX_BACKUP_LOG_NAME_CHARS: Final = 64
# Key floors a restore takes from the HSAs of a domain, in all (one per key).
MAX_FLOORS_TAKEN: Final = 10_000_000
# One JSON line the coordinator's store tool writes to the program that runs it.
MAX_STORE_TOOL_LINE_BYTES: Final = 1 << 20

# --- an HSA's config file -------------------------------------------------------------------
# head_confirmation_seconds.
MAX_HEAD_CONFIRMATION_SECONDS: Final = 86_400.0
# key_cache_mib.
MAX_KEY_CACHE_MIB: Final = 65_536
# key_service_workers.
MAX_KEY_SERVICE_WORKERS: Final = 16

# --- a local domain (`hsm-domain init`) ------------------------------------------------------
# Coordinator replicas of a local domain (`--coordinators N`).
MAX_LOCAL_COORDINATORS: Final = 9
# Members of a local domain's etcd cluster (`DIR/etcd/cluster.json`).
MAX_LOCAL_ETCD_MEMBERS: Final = 9

# --- the coordinator's etcd store (its `store` spec) -----------------------------------------
# Members named in an etcd store spec (`etcd:HOST:PORT,...`).
MAX_ETCD_ENDPOINTS: Final = 16
# The key prefix of an etcd store spec (`.../PREFIX`).
MAX_ETCD_PREFIX_CHARS: Final = 128
