"""The application's client of the key service: `KeyClient`, and envelope encryption on top.

A `KeyClient` talks to every HSA of a domain it is given (each HSA serves the whole
`KeyService`, and a ciphertext made on one decrypts on any other), spreading calls across
them and failing over when one is lost.

Invariants kept here:
- one mutual-TLS channel per endpoint, made once and reused; every call carries a deadline;
- a request goes only to an HSA of the domain: every channel expects the HSA role name in the
  server's certificate (`transport.ANY_HSA`), so a server holding any other certificate of the
  domain (the coordinator's, a client's) fails the TLS handshake and receives nothing; that
  attempt fails with UnauthenticatedError ("the server at ... is not an hsa of domain ...")
  unless another endpoint answers;
- calls start round-robin over the endpoints that have not failed recently; an endpoint that
  fails with an UNAVAILABLE-class error is set aside for a short, growing cool-down, bounded
  (at most 5 s, whatever the number of failures: the exponent is capped, so nothing overflows
  after any number of failures), and an endpoint's first success ends it;
- a call is sent again (to the next endpoint, tenacity, short exponential backoff once every
  endpoint was tried, bounded in attempts AND in total time) only when that is safe:
  * calls that change nothing (Encrypt, Decrypt, ReEncrypt, GenerateDataKey[WithoutPlaintext],
    GenerateRandom, DescribeKey, ListKeys) on UNAVAILABLE or DEADLINE_EXCEEDED;
  * CreateKey like those: it always carries an idempotency key (`create_key`'s, or a fresh
    UUID), from which the HSA derives the key id, so a retry returns the key the first attempt
    made;
  * any call, the admin calls included, only when gRPC reports that it could not
    connect at all ("failed to connect to all addresses": the request was never sent), or when
    the HSA answered that it changed nothing (`NotAppliedError`, marked in the trailing
    metadata by the HSA's transport: e.g. CreateKey while the HSA cannot reach the
    coordinator). When every attempt failed so, the caller gets `NotAppliedError`: a definite
    failure, safe to send again. Any other failure of an admin call (a
    connection lost mid-call, a deadline, an UNAVAILABLE without that mark) may have reached
    a server and is NOT retried: the caller gets `UnavailableError` ("may have been applied")
    and must check (DescribeKey, ListKeys) before trying again;
  * never a client error, a refusal or a failed verification (INVALID_ARGUMENT,
    PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION, ...): they come back at once;
- every failure comes back as one `domain_core.errors` class (`client.error_from_rpc`), with
  the server's message; "invalid ciphertext" stays the one message without detail. Nothing
  else escapes a call but `TypeError`/`ValueError`/`RuntimeError` for a programming error
  (wrong argument types, a closed client);
- nothing here logs or puts in a message any plaintext or data key.

Envelope encryption (`encrypt_envelope`, `decrypt_envelope`) streams data of any size through
`domain_core.envelope` with a data key from GenerateDataKey; the format is in
docs/ciphertext-format.md. Python cannot truly erase memory: the data key lives in immutable
`bytes` that the helpers drop as soon as they are done, but copies may linger in freed memory
until it is reused. Keep the process short-lived or use the service's Encrypt for the most
sensitive small secrets.

The package's modules: `_client` (`KeyClient`), `_retry` (what may be sent again),
`_policies` (policies as JSON, key metadata), `_cluster` (a local domain's endpoints) and
`_envelopes` (envelope encryption). This module names the public API.
"""

from __future__ import annotations

from domain_edge.kms_client._aio import AsyncKeyClient
from domain_edge.kms_client._calls import (
    DEFAULT_PAGE_SIZE,
    CreatedGrant,
    DataKeyPair,
    ImportParameters,
    PublicKey,
    wrap_key_material,
)
from domain_edge.kms_client._client import KeyClient
from domain_edge.kms_client._cluster import read_cluster
from domain_edge.kms_client._core import DEFAULT_TIMEOUT, checked_context
from domain_edge.kms_client._envelopes import decrypt_envelope, encrypt_envelope
from domain_edge.kms_client._policies import (
    OPERATION_NAMES,
    Grant,
    KeyMetadata,
    PolicyGrant,
    policy_from_json,
    policy_to_json,
)
from domain_edge.kms_client._retry import (
    ADMIN_METHODS,
    DEFAULT_ATTEMPTS,
    IDEMPOTENT_METHODS,
    KEYED_METHODS,
    backoff_delay,
    retryable,
)
from domain_edge.transport import never_sent

__all__ = [
    "ADMIN_METHODS",
    "DEFAULT_ATTEMPTS",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT_METHODS",
    "KEYED_METHODS",
    "OPERATION_NAMES",
    "AsyncKeyClient",
    "CreatedGrant",
    "DataKeyPair",
    "Grant",
    "ImportParameters",
    "KeyClient",
    "KeyMetadata",
    "PolicyGrant",
    "PublicKey",
    "backoff_delay",
    "checked_context",
    "decrypt_envelope",
    "encrypt_envelope",
    "never_sent",
    "policy_from_json",
    "policy_to_json",
    "read_cluster",
    "retryable",
    "wrap_key_material",
]
