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
  * any call, CreateKey and the admin calls included, only when gRPC reports that it could not
    connect at all ("failed to connect to all addresses": the request was never sent), or when
    the HSA answered that it changed nothing (`NotAppliedError`, marked in the trailing
    metadata by the HSA's transport: e.g. CreateKey while the HSA cannot reach the
    coordinator). When every attempt failed so, the caller gets `NotAppliedError`: a definite
    failure, safe to send again. Any other failure of CreateKey or an admin call (a
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
"""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, cast, overload

import grpc
import tenacity

from domain_core import crypto, envelope
from domain_core.ciphertext import encode_context, parse_header
from domain_core.errors import (
    ConflictError,
    HsmDomainError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
    NotAppliedError,
    NotFoundError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.pki import ca_trust_domain
from domain_edge.client import error_from_rpc
from domain_edge.envelope_files import decrypt_to_file
from domain_edge.transport import (
    ANY_HSA,
    TlsMaterial,
    never_sent,
    nothing_applied,
    secure_channel,
)
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "ADMIN_METHODS",
    "DEFAULT_ATTEMPTS",
    "IDEMPOTENT_METHODS",
    "OPERATION_NAMES",
    "KeyClient",
    "KeyMetadata",
    "PolicyGrant",
    "backoff_delay",
    "checked_context",
    "decrypt_envelope",
    "encrypt_envelope",
    "never_sent",
    "policy_from_json",
    "policy_to_json",
    "read_cluster",
    "retryable",
]

# Calls that change nothing on the server: sending one twice is harmless.
IDEMPOTENT_METHODS: Final = frozenset(
    {
        "DescribeKey",
        "ListKeys",
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateRandom",
    }
)
# Calls that change a key: sent again only when the first attempt surely never left.
ADMIN_METHODS: Final = frozenset(
    {
        "CreateKey",
        "RotateKey",
        "PutKeyPolicy",
        "EnableKey",
        "DisableKey",
        "ScheduleKeyDeletion",
        "CancelKeyDeletion",
    }
)
DEFAULT_ATTEMPTS: Final = 4
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PAGE_SIZE: Final = 100
_FAILOVER_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_COOL_DOWN_FIRST: Final = 0.25
_COOL_DOWN_MAX: Final = 5.0
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 1.0
# Doublings past this change nothing (every maximum is reached long before): the cap keeps the
# power of two small whatever the count of failures.
_MAX_DOUBLINGS: Final = 32
# The key service's own status meanings, where they differ from the coordinator's.
_KEY_SERVICE_CODES: Final[Mapping[grpc.StatusCode, type[HsmDomainError]]] = {
    grpc.StatusCode.ABORTED: ConflictError,
}
_STATE_NAMES: Final[dict[int, str]] = {
    keys_pb2.KEY_STATE_ENABLED: "enabled",
    keys_pb2.KEY_STATE_DISABLED: "disabled",
    keys_pb2.KEY_STATE_PENDING_DELETION: "pending-deletion",
}

# --- policies as JSON ------------------------------------------------------------------------

# The operation names of the policy JSON (docs/kms-client.md), in enum order.
OPERATION_NAMES: Final[dict[str, int]] = {
    "encrypt": keys_pb2.KEY_OPERATION_ENCRYPT,
    "decrypt": keys_pb2.KEY_OPERATION_DECRYPT,
    "re-encrypt-from": keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
    "re-encrypt-to": keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
    "generate-data-key": keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY,
    "describe": keys_pb2.KEY_OPERATION_DESCRIBE,
    "admin": keys_pb2.KEY_OPERATION_ADMIN,
}
_NAME_OF_OPERATION: Final = {number: name for name, number in OPERATION_NAMES.items()}


def _operation_from_name(name: object, where: str) -> int:
    if not isinstance(name, str):
        raise InvalidInputError(f"{where}: operations are strings such as 'encrypt'")
    normal = name.strip().lower().replace("_", "-").removeprefix("key-operation-")
    if normal not in OPERATION_NAMES:
        raise InvalidInputError(
            f"{where}: unknown operation {name[:60]!r}; use {', '.join(OPERATION_NAMES)}"
        )
    return OPERATION_NAMES[normal]


def policy_from_json(document: object) -> keys_pb2.KeyPolicy:
    """A KeyPolicy from its JSON form (parsed): {"grants": [{"principals": [...],
    "operations": [...]}]}. Operation names are those of OPERATION_NAMES (the enum names such as
    KEY_OPERATION_ENCRYPT are accepted too). Unknown fields are refused, so a typo is an error,
    not a silently narrower or wider policy. The service validates principals and limits."""
    if not isinstance(document, Mapping) or set(document) != {"grants"}:
        raise InvalidInputError('a key policy is a JSON object {"grants": [...]} and nothing else')
    grants = document["grants"]
    if not isinstance(grants, list):
        raise InvalidInputError('"grants" must be a list of {"principals", "operations"} objects')
    policy = keys_pb2.KeyPolicy()
    for number, grant in enumerate(grants, start=1):
        where = f"grant {number}"
        if not isinstance(grant, Mapping) or set(grant) != {"principals", "operations"}:
            raise InvalidInputError(
                f'{where}: a grant is {{"principals": [...], "operations": [...]}} and nothing else'
            )
        principals, operations = grant["principals"], grant["operations"]
        if not isinstance(principals, list) or not all(isinstance(p, str) for p in principals):
            raise InvalidInputError(
                f"{where}: principals must be a list of strings such as "
                '"spiffe://<domain>/client/<name>"'
            )
        if not isinstance(operations, list):
            raise InvalidInputError(f"{where}: operations must be a list of names")
        policy.grants.append(
            keys_pb2.PolicyGrant(
                principals=principals,
                operations=cast(
                    "list[keys_pb2.KeyOperation]",
                    [_operation_from_name(o, where) for o in operations],
                ),
            )
        )
    return policy


def policy_to_json(policy: keys_pb2.KeyPolicy) -> dict[str, Any]:
    """The JSON form of a KeyPolicy (the inverse of `policy_from_json`)."""
    return {
        "grants": [
            {
                "principals": list(grant.principals),
                "operations": [
                    _NAME_OF_OPERATION.get(op, f"operation-{int(op)}") for op in grant.operations
                ],
            }
            for grant in policy.grants
        ]
    }


def _policy_message(policy: keys_pb2.KeyPolicy | Mapping[str, Any] | None) -> keys_pb2.KeyPolicy:
    if policy is None:
        return keys_pb2.KeyPolicy()
    if isinstance(policy, keys_pb2.KeyPolicy):
        return policy
    return policy_from_json(policy)


# --- key metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyGrant:
    """One grant of a key policy: these principals may do these operations."""

    principals: tuple[str, ...]
    operations: tuple[str, ...]


@dataclass(frozen=True)
class KeyMetadata:
    """A customer key as the key service describes it (times are unix seconds, 0 if unset)."""

    key_id: str
    description: str
    state: str
    """"enabled", "disabled", "pending-deletion" (or "unspecified")."""
    created_at: int
    deletion_at: int
    policy: tuple[PolicyGrant, ...]
    rotation_enabled: bool
    rotation_period_days: int
    next_rotation_at: int
    current_backing_version: int
    creator: str
    metadata_version: int
    domain_id: str
    message: keys_pb2.KeyMetadata = field(repr=False, compare=False)
    """The message as received."""

    @classmethod
    def from_message(cls, message: keys_pb2.KeyMetadata) -> KeyMetadata:
        """Wrap a KeyMetadata message."""
        policy = policy_to_json(message.policy)
        return cls(
            key_id=message.key_id,
            description=message.description,
            state=_STATE_NAMES.get(message.state, "unspecified"),
            created_at=message.created_at,
            deletion_at=message.deletion_at,
            policy=tuple(
                PolicyGrant(tuple(g["principals"]), tuple(g["operations"]))
                for g in policy["grants"]
            ),
            rotation_enabled=message.rotation.enabled,
            rotation_period_days=message.rotation.period_days,
            next_rotation_at=message.rotation.next_rotation_at,
            current_backing_version=message.current_backing_version,
            creator=message.creator,
            metadata_version=message.metadata_version,
            domain_id=message.domain_id,
            message=message,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the policy in the format of `policy_from_json`)."""
        return {
            "key_id": self.key_id,
            "description": self.description,
            "state": self.state,
            "created_at": self.created_at,
            "deletion_at": self.deletion_at,
            "policy": policy_to_json(self.message.policy),
            "rotation": {
                "enabled": self.rotation_enabled,
                "period_days": self.rotation_period_days,
                "next_rotation_at": self.next_rotation_at,
            },
            "current_backing_version": self.current_backing_version,
            "creator": self.creator,
            "metadata_version": self.metadata_version,
            "domain_id": self.domain_id,
        }


# --- retry classification --------------------------------------------------------------------


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else ""
    return (code if isinstance(code, grpc.StatusCode) else None), str(details or "")


def retryable(
    method: str, code: grpc.StatusCode | None, details: str, *, applied_nothing: bool = False
) -> bool:
    """Whether a call of `method` that failed with (`code`, `details`) may be sent again,
    to another endpoint; `applied_nothing`: the server marked the failure as having changed
    nothing (`transport.nothing_applied`). See the module docstring for the rules."""
    if never_sent(code, details) or applied_nothing:
        return True
    return method in IDEMPOTENT_METHODS and code in _FAILOVER_CODES


def backoff_delay(first: float, maximum: float, step: int) -> float:
    """`first` doubled `step` times, at most `maximum`: for any `step`, however large (the
    exponent is capped, so nothing overflows and the cost stays constant)."""
    return float(min(maximum, first * 2.0 ** min(max(step, 0), _MAX_DOUBLINGS)))


def checked_context(
    context: Mapping[str, str] | None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, str]:
    """A copy of an encryption context, checked as the service will (non-empty UTF-8 keys
    and values, within limits), so that bad input fails before any call is made."""
    checked = dict(context or {})
    encode_context(checked, limits)
    return checked


# --- endpoints -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Endpoint:
    address: str
    channel: grpc.Channel
    stub: Any
    failures: int = 0
    down_until: float = 0.0


class _Failover(Exception):
    """An attempt failed in a way that allows another attempt (internal to KeyClient)."""

    def __init__(self, error: grpc.RpcError, endpoint: _Endpoint) -> None:
        super().__init__(endpoint.address)
        self.error = error
        self.endpoint = endpoint


def read_cluster(directory: str | os.PathLike[str]) -> tuple[list[str], TlsMaterial]:
    """The node addresses and the demo application's TLS identity of a local domain.

    Layout (docs/runtime.md): DIR/ca/ca.crt, DIR/clients/demo-app/tls.crt and tls.key, and
    DIR/run/<host>.json, the ready file of every running node of DIR/nodes/<host>/: its
    address, then the addresses of its key service workers, if it has any.
    """
    root = Path(directory)
    try:
        return _read_cluster(root)
    except OSError as error:
        raise InvalidInputError(
            f"cannot read the local domain in {root}: {error.strerror or error} "
            f"({error.filename or root})"
        ) from None


def _read_cluster(root: Path) -> tuple[list[str], TlsMaterial]:
    if not (root / "domain.json").is_file():
        raise NotFoundError(
            f"{root} holds no local domain (no domain.json); create one with "
            f"`hsm-domain init {root}`"
        )
    client_dir = root / "clients" / "demo-app"
    try:
        tls = TlsMaterial.from_files(
            root / "ca" / "ca.crt", client_dir / "tls.crt", client_dir / "tls.key"
        )
    except FileNotFoundError as error:
        raise NotFoundError(
            f"{error.filename} is missing: {root} is not a complete local domain"
        ) from None
    hosts = sorted(p.parent.name for p in (root / "nodes").glob("*/config.json"))
    endpoints: list[str] = []
    for host in hosts:
        try:
            document = json.loads((root / "run" / f"{host}.json").read_text())
            address = document["address"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not running (or still writing its ready file)
        if isinstance(address, str) and address:
            endpoints.append(address)
            # The node's key service worker processes answer for the same host.
            workers = document.get("workers", [])
            if isinstance(workers, list):
                endpoints += [w for w in workers if isinstance(w, str) and w]
    if not endpoints:
        raise UnavailableError(
            f"no node of the domain in {root} is running (no ready file in {root / 'run'}); "
            f"start them with `hsm-domain up {root}`"
        )
    return endpoints, tls


# --- the client ------------------------------------------------------------------------------


class KeyClient:
    """A client of the key service of one domain, over every given HSA endpoint.

    Thread-safe: one client can serve many threads (its channels multiplex calls). Use it as a
    context manager or call `close`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
        attempts: int = DEFAULT_ATTEMPTS,
        total_timeout: float | None = None,
    ) -> None:
        """`timeout` bounds each attempt; `attempts` and `total_timeout` (default three times
        `timeout`) bound a call with its retries."""
        if isinstance(endpoints, str):
            raise TypeError("endpoints is a sequence of host:port strings, not one string")
        addresses = list(dict.fromkeys(endpoints))
        if not addresses:
            raise ValueError("give at least one endpoint (host:port of an HSA)")
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        self._timeout = timeout
        self._total_timeout = total_timeout if total_timeout is not None else 3 * timeout
        self._attempts = attempts
        self._limits = limits
        # Requests go only to HSAs of the domain the CA certifies (a refused server gets none).
        self._expected = ANY_HSA.describe(ca_trust_domain(ca_pem))
        self._endpoints: list[_Endpoint] = []
        for address in addresses:
            channel = secure_channel(
                address, ca_pem, ANY_HSA, cert_pem=cert_pem, key_pem=key_pem, limits=limits
            )
            stub = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
            self._endpoints.append(_Endpoint(address, channel, stub))
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_cluster(cls, directory: str | os.PathLike[str], **kwargs: Any) -> KeyClient:
        """A client of a local domain (`hsm-domain init DIR`, `hsm-domain up DIR`) as its demo
        application (spiffe://<domain>/client/demo-app), over every node running now."""
        endpoints, tls = read_cluster(directory)
        return cls(
            endpoints, ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, **kwargs
        )

    @property
    def endpoints(self) -> list[str]:
        """The endpoint addresses, in the order given."""
        return [e.address for e in self._endpoints]

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel (calls in flight fail)."""
        if self._closed:
            return
        self._closed = True
        for endpoint in self._endpoints:
            endpoint.channel.close()

    # --- calling -----------------------------------------------------------------------------

    def _pick(self, tried: Sequence[_Endpoint]) -> _Endpoint:
        """The next endpoint round-robin, preferring one not tried in this call and not cooling
        down; else the untried (or any) one whose cool-down ends first."""
        endpoints = self._endpoints
        count = len(endpoints)
        start = next(self._next)
        now = time.monotonic()
        for i in range(count):
            endpoint = endpoints[(start + i) % count]
            if endpoint.down_until <= now and endpoint not in tried:
                return endpoint
        untried = [e for e in endpoints if e not in tried] or endpoints
        return min(untried, key=lambda e: e.down_until)

    def _backoff(self, tried: Sequence[_Endpoint]) -> float:
        """No wait while an endpoint is left untried; then short exponential steps (bounded)."""
        rounds = len(tried) - len(self._endpoints)
        if rounds < 0 or len({id(e) for e in tried}) < len(self._endpoints):
            return 0.0
        return backoff_delay(_BACKOFF_FIRST, _BACKOFF_MAX, rounds)

    def _mark_down(self, endpoint: _Endpoint) -> None:
        """Set a failed endpoint aside: 0.25 s, doubling per consecutive failure, at most 5 s."""
        with self._lock:
            endpoint.failures = min(endpoint.failures + 1, _MAX_DOUBLINGS + 1)
            cool_down = backoff_delay(_COOL_DOWN_FIRST, _COOL_DOWN_MAX, endpoint.failures - 1)
            endpoint.down_until = time.monotonic() + cool_down

    def _mark_up(self, endpoint: _Endpoint) -> None:
        if endpoint.failures:
            with self._lock:
                endpoint.failures = 0
                endpoint.down_until = 0.0

    def _invoke(self, method: str, request: Any) -> Any:
        """One logical call: attempts on the endpoints under the retry rules, with deadlines."""
        if self._closed:
            raise RuntimeError("the KeyClient is closed")
        tried: list[_Endpoint] = []
        # Whether each failed attempt surely changed nothing (never sent, or marked so).
        definite: list[bool] = []
        deadline = time.monotonic() + self._total_timeout

        def attempt() -> Any:
            endpoint = self._pick(tried)
            tried.append(endpoint)
            timeout = max(0.05, min(self._timeout, deadline - time.monotonic()))
            try:
                response = getattr(endpoint.stub, method)(request, timeout=timeout)
            except grpc.RpcError as error:
                code, details = _status(error)
                answered_nothing = nothing_applied(error)
                definite.append(answered_nothing or never_sent(code, details))
                if code in _FAILOVER_CODES and not answered_nothing:
                    self._mark_down(endpoint)
                if retryable(method, code, details, applied_nothing=answered_nothing):
                    raise _Failover(error, endpoint) from None
                raise self._error(method, error, endpoint) from None
            except ValueError:
                if self._closed:  # closed by another thread meanwhile
                    raise RuntimeError("the KeyClient is closed") from None
                raise
            self._mark_up(endpoint)
            return response

        try:
            return attempt()  # the common case, without the retry machinery
        except _Failover as failover:
            if self._attempts == 1 or time.monotonic() >= deadline:
                raise self._unavailable(method, failover, tried, all(definite)) from None
        time.sleep(min(self._backoff(tried), max(0.0, deadline - time.monotonic())))
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Failover),
            stop=tenacity.stop_after_attempt(self._attempts - 1)
            | tenacity.stop_after_delay(max(0.0, deadline - time.monotonic())),
            wait=lambda _: self._backoff(tried),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _Failover as failover:
            raise self._unavailable(method, failover, tried, all(definite)) from None

    def _error(self, method: str, error: grpc.RpcError, endpoint: _Endpoint) -> HsmDomainError:
        """The domain error of a failed attempt that is not sent again."""
        code, details = _status(error)
        if nothing_applied(error):
            return NotAppliedError(
                f"{method} was not applied: the HSA at {endpoint.address} answered "
                f"{details[:300]!r}; nothing changed, so it is safe to send it again"
            )
        mapped = error_from_rpc(
            error,
            endpoint.address,
            peer="the HSA",
            overrides=_KEY_SERVICE_CODES,
            expected=self._expected,
        )
        if method in ADMIN_METHODS and code in _FAILOVER_CODES and not never_sent(code, details):
            return type(mapped)(
                f"{mapped.message}. {method} is not sent again because it may have been "
                "applied: check the key (describe-key, list-keys) before trying again"
            )
        return mapped

    def _unavailable(
        self, method: str, failover: _Failover, tried: Sequence[_Endpoint], definite: bool
    ) -> HsmDomainError:
        """The error of a call whose attempts all failed; NotAppliedError when every attempt
        surely changed nothing (`definite`: none was sent, or the HSA said so)."""
        last = self._error(method, failover.error, failover.endpoint)
        addresses = ", ".join(dict.fromkeys(e.address for e in tried))
        attempts = len(tried)
        cls = NotAppliedError if definite and type(last) is UnavailableError else type(last)
        return cls(
            f"{method} failed on every attempt ({attempts} on {addresses}); last: {last.message}"
        )

    # --- keys --------------------------------------------------------------------------------

    def _metadata(self, method: str, request: Any) -> KeyMetadata:
        response: services_pb2.KeyMetadataResponse = self._invoke(method, request)
        return KeyMetadata.from_message(response.metadata)

    def create_key(
        self,
        description: str = "",
        policy: keys_pb2.KeyPolicy | Mapping[str, Any] | None = None,
        enable_rotation: bool = False,
        rotation_period_days: int = 0,
    ) -> KeyMetadata:
        """Create a customer key. Without a policy the caller gets every operation on it.

        Not retried once it may have reached a server: after an UnavailableError, look for
        the key (list_keys) before creating another.
        """
        return self._metadata(
            "CreateKey",
            services_pb2.CreateKeyRequest(
                description=description,
                policy=_policy_message(policy),
                enable_rotation=enable_rotation,
                rotation_period_days=rotation_period_days,
            ),
        )

    def describe_key(self, key_id: str) -> KeyMetadata:
        """A key's metadata."""
        return self._metadata("DescribeKey", services_pb2.KeyIdRequest(key_id=key_id))

    def list_key_pages(self, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[KeyMetadata]]:
        """The keys, one page (at most `page_size`) at a time; pages are fetched lazily."""
        token = ""
        while True:
            response: services_pb2.ListKeysResponse = self._invoke(
                "ListKeys", services_pb2.ListKeysRequest(limit=page_size, page_token=token)
            )
            yield [KeyMetadata.from_message(m) for m in response.keys]
            if not response.next_page_token:
                return
            if response.next_page_token == token:
                raise HsmDomainError("the key service returned the same page token twice")
            token = response.next_page_token

    def list_keys(self, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[KeyMetadata]:
        """Every key the caller may see, following the pages lazily."""
        for page in self.list_key_pages(page_size):
            yield from page

    def rotate_key(self, key_id: str) -> KeyMetadata:
        """Add a backing key version (old versions keep decrypting). Not retried once sent."""
        return self._metadata("RotateKey", services_pb2.KeyIdRequest(key_id=key_id))

    def put_key_policy(
        self, key_id: str, policy: keys_pb2.KeyPolicy | Mapping[str, Any]
    ) -> KeyMetadata:
        """Replace a key's policy (which must keep an admin). Not retried once sent."""
        return self._metadata(
            "PutKeyPolicy",
            services_pb2.PutKeyPolicyRequest(key_id=key_id, policy=_policy_message(policy)),
        )

    def enable_key(self, key_id: str) -> KeyMetadata:
        """Enable a key. Not retried once sent."""
        return self._metadata("EnableKey", services_pb2.KeyIdRequest(key_id=key_id))

    def disable_key(self, key_id: str) -> KeyMetadata:
        """Disable a key: it refuses every cryptographic operation until enabled. Not retried
        once sent."""
        return self._metadata("DisableKey", services_pb2.KeyIdRequest(key_id=key_id))

    def schedule_key_deletion(self, key_id: str, days: int = 30) -> KeyMetadata:
        """Schedule a key's deletion after `days` (7 to 30). Not retried once sent."""
        return self._metadata(
            "ScheduleKeyDeletion",
            services_pb2.ScheduleKeyDeletionRequest(key_id=key_id, pending_window_days=days),
        )

    def cancel_key_deletion(self, key_id: str) -> KeyMetadata:
        """Cancel a scheduled deletion (the key comes back disabled). Not retried once sent."""
        return self._metadata("CancelKeyDeletion", services_pb2.KeyIdRequest(key_id=key_id))

    # --- cryptographic operations ------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The limits this client checks inputs against before sending them."""
        return self._limits

    def _context(self, context: Mapping[str, str] | None) -> dict[str, str]:
        return checked_context(context, self._limits)

    def _checked_blob(self, blob: bytes, address_hint: str) -> bytes:
        try:
            parse_header(blob, self._limits)
        except InvalidCiphertextError:
            raise HsmDomainError(
                f"{address_hint} returned something that is not a ciphertext blob"
            ) from None
        return blob

    def encrypt(
        self, key_id: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Encrypt at most `limits.max_plaintext_bytes` (4 KiB) under a key; returns the blob.

        For larger data use `encrypt_envelope`. The same context must be given to decrypt.
        """
        if not isinstance(plaintext, bytes):
            raise TypeError("plaintext must be bytes")
        if len(plaintext) > self._limits.max_plaintext_bytes:
            raise LimitExceededError(
                f"plaintext is {len(plaintext)} bytes; Encrypt takes at most "
                f"{self._limits.max_plaintext_bytes}: use envelope encryption for larger data"
            )
        response: services_pb2.EncryptResponse = self._invoke(
            "Encrypt",
            services_pb2.EncryptRequest(
                key_id=key_id, plaintext=plaintext, encryption_context=self._context(context)
            ),
        )
        return self._checked_blob(response.ciphertext_blob, "Encrypt")

    def decrypt(
        self,
        blob: bytes,
        context: Mapping[str, str] | None = None,
        key_id: str | None = None,
    ) -> bytes:
        """The plaintext of a blob (the blob names its key). With `key_id`, the service refuses
        a blob of another key. Any failure about the blob is "invalid ciphertext"."""
        if not isinstance(blob, bytes):
            raise TypeError("blob must be bytes")
        response: services_pb2.DecryptResponse = self._invoke(
            "Decrypt",
            services_pb2.DecryptRequest(
                ciphertext_blob=blob,
                encryption_context=self._context(context),
                key_id=key_id or "",
            ),
        )
        return bytes(response.plaintext)

    def re_encrypt(
        self,
        blob: bytes,
        destination_key_id: str,
        source_context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Decrypt a blob and encrypt its plaintext under another key (or another context),
        inside an HSA: the plaintext never leaves it. Returns the new blob."""
        if not isinstance(blob, bytes):
            raise TypeError("blob must be bytes")
        response: services_pb2.ReEncryptResponse = self._invoke(
            "ReEncrypt",
            services_pb2.ReEncryptRequest(
                ciphertext_blob=blob,
                source_encryption_context=self._context(source_context),
                destination_key_id=destination_key_id,
                destination_encryption_context=self._context(destination_context),
            ),
        )
        return self._checked_blob(response.ciphertext_blob, "ReEncrypt")

    def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> tuple[bytes, bytes]:
        """A fresh data key: (plaintext key, its blob under `key_id`). Use the key once, drop
        it, keep the blob (e.g. in an envelope header) to get the key back with `decrypt`."""
        response: services_pb2.GenerateDataKeyResponse = self._invoke(
            "GenerateDataKey",
            services_pb2.GenerateDataKeyRequest(
                key_id=key_id,
                encryption_context=self._context(context),
                number_of_bytes=number_of_bytes,
            ),
        )
        if len(response.plaintext) != number_of_bytes:
            raise HsmDomainError(
                f"GenerateDataKey returned a key of {len(response.plaintext)} bytes, "
                f"not {number_of_bytes}"
            )
        return bytes(response.plaintext), self._checked_blob(
            response.ciphertext_blob, "GenerateDataKey"
        )

    def generate_data_key_without_plaintext(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> bytes:
        """Only the blob of a fresh data key (for a party that will encrypt later)."""
        response: services_pb2.GenerateDataKeyResponse = self._invoke(
            "GenerateDataKeyWithoutPlaintext",
            services_pb2.GenerateDataKeyRequest(
                key_id=key_id,
                encryption_context=self._context(context),
                number_of_bytes=number_of_bytes,
            ),
        )
        return self._checked_blob(response.ciphertext_blob, "GenerateDataKeyWithoutPlaintext")

    def generate_random(self, number_of_bytes: int) -> bytes:
        """`number_of_bytes` (1 to 1024) random bytes from an HSA's CSPRNG."""
        response: services_pb2.GenerateRandomResponse = self._invoke(
            "GenerateRandom", services_pb2.GenerateRandomRequest(number_of_bytes=number_of_bytes)
        )
        if len(response.random) != number_of_bytes:
            raise HsmDomainError(
                f"GenerateRandom returned {len(response.random)} bytes, not {number_of_bytes}"
            )
        return bytes(response.random)


# --- envelope encryption ---------------------------------------------------------------------


def _reader(source: envelope.ByteReader | bytes) -> envelope.ByteReader:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return source


@overload
def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: None = None,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> bytes: ...


@overload
def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: envelope.ByteWriter,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> int: ...


def encrypt_envelope(
    client: KeyClient,
    key_id: str,
    source: envelope.ByteReader | bytes,
    writer: envelope.ByteWriter | None = None,
    context: Mapping[str, str] | None = None,
    *,
    chunk_size: int = envelope.DEFAULT_CHUNK_SIZE,
) -> bytes | int:
    """Envelope-encrypt `source` (bytes or a reader) under a fresh data key of `key_id`.

    GenerateDataKey gives the data key and its blob; the data is encrypted locally with
    AES-256-GCM in chunks (`envelope.EnvelopeEncryptor`), so memory stays about one chunk
    whatever the size. With `writer`, the envelope goes there and the plaintext length is
    returned; without, the envelope is returned as bytes. The data key is dropped right after
    use (Python cannot overwrite it in memory; see the module docstring).
    """
    wanted = checked_context(context, client.limits)
    data_key, blob = client.generate_data_key(key_id, wanted)
    try:
        out: envelope.ByteWriter = io.BytesIO() if writer is None else writer
        total = envelope.encrypt_stream(
            _reader(source),
            out,
            data_key,
            blob,
            wanted,
            chunk_size=chunk_size,
            limits=client.limits,
        )
    finally:
        del data_key
    if writer is None:
        return cast(io.BytesIO, out).getvalue()
    return total


@overload
def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: None = None,
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> bytes: ...


@overload
def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: envelope.ByteWriter | str | os.PathLike[str],
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> int: ...


def decrypt_envelope(
    client: KeyClient,
    source: envelope.ByteReader | bytes,
    output: envelope.ByteWriter | str | os.PathLike[str] | None = None,
    context: Mapping[str, str] | None = None,
    *,
    key_id: str | None = None,
) -> bytes | int:
    """Decrypt an envelope: read its header, Decrypt its data key through the key service,
    then open the chunks as they stream by.

    `context`, when given, must equal the context the envelope was made with (else "invalid
    ciphertext", like Decrypt); without it the header's context is used. `key_id` refuses an
    envelope whose data key belongs to another key.

    Output: None returns the plaintext as bytes (all or nothing); a path gets a temporary file
    renamed into place only once everything verified (nothing is left on failure); a writer gets
    plaintext chunk by chunk, each authentic, but the whole only confirmed when this returns:
    on InvalidCiphertextError the caller must discard what the writer received.
    """
    reader = _reader(source)
    header = envelope.parse_envelope_header(reader, client.limits)
    wanted = header.context if context is None else checked_context(context, client.limits)
    if wanted != header.context:
        raise InvalidCiphertextError()
    data_key = client.decrypt(header.encrypted_data_key, wanted, key_id=key_id)
    try:
        if len(data_key) != crypto.AES_KEY_BYTES:
            raise InvalidCiphertextError()
        if output is None:
            buffer = io.BytesIO()
            envelope.decrypt_stream(reader, buffer, data_key, header)
            return buffer.getvalue()
        if isinstance(output, str | os.PathLike):
            return decrypt_to_file(reader, output, data_key, header)
        return envelope.decrypt_stream(reader, output, data_key, header)
    finally:
        del data_key
