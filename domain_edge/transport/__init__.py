"""gRPC transport shared by every process: mutual TLS, limits, and error mapping.

Invariants:
- servers require a client certificate from the domain CA (mutual TLS) unless a listener is
  explicitly created as `server_auth_only` (the coordinator's operator port, where operators
  authenticate by signatures over what they submit, not by TLS);
- every error raised by a servicer is mapped to a gRPC status in one place
  (`ErrorMappingInterceptor`): an `HsmDomainError` to its own status and message, anything
  else to INTERNAL with a generic message (the details go to the log, never to the peer);
- message sizes and concurrent RPCs are bounded by `Limits`; channels reconnect quickly;
- streams cannot starve a server (`StreamQuota`, outermost on every server): a stream is
  admitted only within its peer's and the server's caps (`StreamLimits`), never holds a worker
  of the call pool (a non-blocking handler holds no thread; a generator runs on the quota's
  own pool, exactly as large as the streams it may admit, so nothing waits in a queue), and is
  ended after `StreamLimits.idle_seconds` without traffic;
- health answers only for the fixed names it was built with (`HealthService`): an unknown
  name is NOT_FOUND in Check and Watch, a health request over `HEALTH_REQUEST_BYTES` is
  refused before it is parsed, and nothing a caller sends is kept after its call ends;
- every client channel names the server it expects (`ExpectedServer`: any HSA, one HSA, the
  coordinator) and is built in one place (`secure_channel`, `channel_options`): the TLS
  handshake then accepts only a server whose certificate, issued by the domain CA, carries the
  DNS name the CA derives from that SPIFFE role or identity (`pki.role_dns_name`,
  `pki.identity_dns_name`). A server holding any other certificate of the domain (the
  coordinator's, another host's, a client's) or another domain's fails the handshake: the call
  fails UNAVAILABLE before a byte of the request is sent;
- an error whose class says that nothing was applied (`HsmDomainError.nothing_applied`) is
  marked so in the call's trailing metadata (`NOTHING_APPLIED_KEY`), so a client can tell a
  definite failure from a call that may have been applied (`nothing_applied`); a call refused
  for its caller's request rate carries its retry delay too (`retry_after`).

The package's modules: `_channels` (client channels and reading failed calls), `_callers`
(who is calling), `_interceptor` (errors to statuses), `_streams` (the stream quota) and
`_server` (servers, health, reflection). This module names the public API.
"""

from __future__ import annotations

from domain_edge.transport._callers import (
    CertificatePeerContext,
    caller,
    caller_spiffe,
    require_caller,
    require_caller_spiffe,
)
from domain_edge.transport._channels import (
    ANY_HSA,
    COORDINATOR,
    DEFAULT_DEADLINE_SECONDS,
    ERROR_KIND_KEY,
    NOTHING_APPLIED_KEY,
    RETRY_AFTER_KEY,
    ExpectedServer,
    TlsMaterial,
    channel_credentials,
    channel_options,
    channel_target,
    check_health,
    error_kind,
    hsa_host,
    mtls_channel,
    never_sent,
    nothing_applied,
    retry_after,
    retry_after_ms,
    secure_aio_channel,
    secure_channel,
    server_credentials,
    server_name_option,
    split_addresses,
    wire_kind,
    wrong_server,
)
from domain_edge.transport._interceptor import (
    HEALTH_REQUEST_LIMITS,
    ErrorMappingInterceptor,
)
from domain_edge.transport._server import (
    HealthService,
    add_health_and_reflection,
    make_server,
    set_serving,
)
from domain_edge.transport._streams import (
    DEFAULT_STREAM_LIMITS,
    StreamLimits,
    StreamQuota,
    stream_peer,
)

__all__ = [
    "ANY_HSA",
    "COORDINATOR",
    "DEFAULT_DEADLINE_SECONDS",
    "DEFAULT_STREAM_LIMITS",
    "ERROR_KIND_KEY",
    "HEALTH_REQUEST_LIMITS",
    "NOTHING_APPLIED_KEY",
    "RETRY_AFTER_KEY",
    "CertificatePeerContext",
    "ErrorMappingInterceptor",
    "ExpectedServer",
    "HealthService",
    "StreamLimits",
    "StreamQuota",
    "TlsMaterial",
    "add_health_and_reflection",
    "caller",
    "caller_spiffe",
    "channel_credentials",
    "channel_options",
    "channel_target",
    "check_health",
    "error_kind",
    "hsa_host",
    "make_server",
    "mtls_channel",
    "never_sent",
    "nothing_applied",
    "require_caller",
    "require_caller_spiffe",
    "retry_after",
    "retry_after_ms",
    "secure_aio_channel",
    "secure_channel",
    "server_credentials",
    "server_name_option",
    "set_serving",
    "split_addresses",
    "stream_peer",
    "wire_kind",
    "wrong_server",
]
