"""The key service client (`KeyClient`): endpoints, fail-over, and one method per RPC.

Invariants: see the package docstring (one mutual-TLS channel per endpoint, expecting an HSA
of the domain; round-robin over endpoints not cooling down; every failure one
`domain_core.errors` class).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import grpc
import tenacity

from domain_core.ciphertext import encode_context, parse_header
from domain_core.errors import (
    ConflictError,
    HsmDomainError,
    InvalidCiphertextError,
    LimitExceededError,
    NotAppliedError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.pki import ca_trust_domain
from domain_edge.client import error_from_rpc
from domain_edge.kms_client._cluster import read_cluster
from domain_edge.kms_client._policies import KeyMetadata, _policy_message
from domain_edge.kms_client._retry import (
    _BACKOFF_FIRST,
    _BACKOFF_MAX,
    _COOL_DOWN_FIRST,
    _COOL_DOWN_MAX,
    _FAILOVER_CODES,
    _MAX_DOUBLINGS,
    ADMIN_METHODS,
    DEFAULT_ATTEMPTS,
    KEYED_METHODS,
    _status,
    backoff_delay,
    retryable,
)
from domain_edge.kms_client._session import SESSION_FIELDS, KeySession, SessionCallError
from domain_edge.transport import (
    ANY_HSA,
    never_sent,
    nothing_applied,
    secure_channel,
)
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PAGE_SIZE: Final = 100
# The key service's own status meanings, where they differ from the coordinator's.
_KEY_SERVICE_CODES: Final[Mapping[grpc.StatusCode, type[HsmDomainError]]] = {
    grpc.StatusCode.ABORTED: ConflictError,
}
# A session refused before any call was served: the HSA has no sessions (UNIMPLEMENTED) or is
# at its cap of streams (RESOURCE_EXHAUSTED); its calls then go unary for a while.
_SESSION_REFUSALS: Final = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
_UNARY_FOR_SECONDS: Final = 30.0


@dataclass(eq=False)
class _Endpoint:
    address: str
    channel: grpc.Channel
    stub: Any
    session: KeySession | None = None
    failures: int = 0
    down_until: float = 0.0
    # Until when this endpoint's data-plane calls go unary: it refused a session (an HSA
    # without sessions, or at its cap of streams).
    unary_until: float = 0.0


class _Failover(Exception):
    """An attempt failed in a way that allows another attempt (internal to KeyClient)."""

    def __init__(self, error: grpc.RpcError, endpoint: _Endpoint) -> None:
        super().__init__(endpoint.address)
        self.error = error
        self.endpoint = endpoint


def checked_context(
    context: Mapping[str, str] | None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, str]:
    """A copy of an encryption context, checked as the service will (non-empty UTF-8 keys
    and values, within limits), so that bad input fails before any call is made."""
    checked = dict(context or {})
    encode_context(checked, limits)
    return checked


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
        sessions: bool = True,
    ) -> None:
        """`timeout` bounds each attempt; `attempts` and `total_timeout` (default three times
        `timeout`) bound a call with its retries. With `sessions` (the default) the data-plane
        calls (Encrypt, Decrypt, ReEncrypt, GenerateDataKey[WithoutPlaintext]) of every thread
        travel over one key-service session per endpoint (`KeyService.Session`), with the same
        retry and fail-over rules; an HSA that refuses a session gets unary calls for a while."""
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
            session = KeySession(channel) if sessions else None
            self._endpoints.append(_Endpoint(address, channel, stub, session))
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
            if endpoint.session is not None:
                endpoint.session.close()
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
                response = self._send(endpoint, method, request, timeout)
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

    def _send(self, endpoint: _Endpoint, method: str, request: Any, timeout: float) -> Any:
        """One attempt on `endpoint`: over its session when the call travels in one and the
        HSA takes sessions, else unary."""
        session = endpoint.session
        usable = endpoint.unary_until <= time.monotonic()
        if session is not None and method in SESSION_FIELDS and usable:
            try:
                return session.call(method, request, timeout)
            except SessionCallError:
                raise  # the call's own answer, or its session ended: as a unary call's
            except grpc.RpcError as error:  # the stream was refused
                if _status(error)[0] not in _SESSION_REFUSALS:
                    raise
                endpoint.unary_until = time.monotonic() + _UNARY_FOR_SECONDS
        return getattr(endpoint.stub, method)(request, timeout=timeout)

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
        if method in KEYED_METHODS and code in _FAILOVER_CODES and not never_sent(code, details):
            return type(mapped)(
                f"{mapped.message}. {method} may have been applied: send it again with the same "
                "idempotency key (create_key(idempotency_key=...), hsm-kms create-key "
                "--idempotency-key KEY) and you get the key the first attempt made, never a "
                "second"
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
        summary = f"{method} failed on every attempt ({attempts} on {addresses}); last: "
        if not definite and method in KEYED_METHODS:
            # An earlier attempt may have been applied, whatever the last one said.
            return UnavailableError(
                f"{summary}{last.message}. An earlier attempt may have been applied: send it "
                "again with the same idempotency key and you get what it made, never a second"
            )
        cls = NotAppliedError if definite and type(last) is UnavailableError else type(last)
        return cls(f"{summary}{last.message}")

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
        *,
        idempotency_key: str | None = None,
    ) -> KeyMetadata:
        """Create a customer key. Without a policy the caller gets every operation on it.

        Every call carries an idempotency key (`idempotency_key`, or a fresh random UUID), so
        it is retried on another HSA when no answer came, and the retry returns the key the
        first attempt created. Pass the same `idempotency_key` again to retry a call that
        failed with UnavailableError: one key comes of it, never two.
        """
        return self._metadata(
            "CreateKey",
            services_pb2.CreateKeyRequest(
                description=description,
                policy=_policy_message(policy),
                enable_rotation=enable_rotation,
                rotation_period_days=rotation_period_days,
                idempotency_key=idempotency_key or str(uuid.uuid4()),
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
