"""What the key service's two clients share (`KeyClient` on threads, `AsyncKeyClient` on
asyncio): the endpoints and their cool-downs, the choice of the next endpoint, and how a
failed attempt becomes a retry or one `domain_core.errors` class.

Only the waiting differs between the two clients (a blocking attempt with `time.sleep`
between retries, or an awaited one with `asyncio.sleep`), so each keeps just its `_invoke`
and `_send`; the rules themselves live once, here and in `_retry`.

Invariants: see the package docstring (round-robin over endpoints not cooling down; a
cool-down bounded at any count of failures; every failure one `domain_core.errors` class).
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Self, cast

import grpc

from domain_core.ciphertext import encode_context
from domain_core.errors import (
    ConflictError,
    HsmDomainError,
    NotAppliedError,
    ThrottledError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, MAX_GRANT_TOKENS, Limits
from domain_core.pki import ca_trust_domain
from domain_edge.client import error_from_rpc
from domain_edge.kms_client._cluster import read_cluster
from domain_edge.kms_client._retry import (
    _BACKOFF_FIRST,
    _BACKOFF_MAX,
    _COOL_DOWN_FIRST,
    _COOL_DOWN_MAX,
    _FAILOVER_CODES,
    _MAX_DOUBLINGS,
    ADMIN_METHODS,
    KEYED_METHODS,
    _status,
    backoff_delay,
    retryable,
)
from domain_edge.transport import ANY_HSA, never_sent, nothing_applied, retry_after
from domain_proto import services_pb2_grpc

DEFAULT_TIMEOUT: Final = 5.0
# The key service's own status meanings, where they differ from the coordinator's.
_KEY_SERVICE_CODES: Final[Mapping[grpc.StatusCode, type[HsmDomainError]]] = {
    grpc.StatusCode.ABORTED: ConflictError,
}
# A session refused before any call was served: the HSA has no sessions (UNIMPLEMENTED) or is
# at its cap of streams (RESOURCE_EXHAUSTED); its calls then go unary for a while.
SESSION_REFUSALS: Final = frozenset(
    {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
UNARY_FOR_SECONDS: Final = 30.0


@dataclass(eq=False)
class Endpoint:
    """One HSA of the client: its channel, stub and session (sync or asyncio), and its
    failure state."""

    address: str
    channel: Any
    stub: Any
    session: Any = None
    failures: int = 0
    down_until: float = 0.0
    # Until when this endpoint's data-plane calls go unary: it refused a session (an HSA
    # without sessions, or at its cap of streams).
    unary_until: float = 0.0
    # Until when this endpoint said the caller is over its request-rate quota (its retry
    # delay): calls go elsewhere meanwhile, or wait for it. Not a failure of the endpoint.
    throttled_until: float = 0.0

    def free_at(self) -> float:
        """When this endpoint takes calls again (its cool-down or its retry delay)."""
        return max(self.down_until, self.throttled_until)

    def session_usable(self) -> bool:
        """Whether data-plane calls travel in this endpoint's session now."""
        return self.session is not None and self.unary_until <= time.monotonic()

    def refused_session(self, error: grpc.RpcError) -> bool:
        """Whether `error` is a refused stream (then calls go unary for a while): True after
        marking so, False for any other error."""
        if _status(error)[0] not in SESSION_REFUSALS:
            return False
        self.unary_until = time.monotonic() + UNARY_FOR_SECONDS
        return True


class Failover(Exception):
    """An attempt failed in a way that allows another attempt (internal to the clients)."""

    def __init__(self, error: grpc.RpcError, endpoint: Endpoint) -> None:
        super().__init__(endpoint.address)
        self.error = error
        self.endpoint = endpoint


# Encryption contexts that passed the check lately, by their entries and the limits they
# passed (by identity: the entry holds the limits, so no other object takes their id while it
# lives): an application sends the same few contexts again and again, and the check (a
# canonical encoding) costs more per call than looking one up. Bounded; cleared when full.
_CHECKED_CONTEXTS: dict[tuple[frozenset[tuple[str, str]], int], Limits] = {}
_MAX_CHECKED_CONTEXTS: Final = 1024


def checked_context(
    context: Mapping[str, str] | None, limits: Limits = DEFAULT_LIMITS
) -> dict[str, str]:
    """A copy of an encryption context, checked as the service will (non-empty UTF-8 keys
    and values, within limits), so that bad input fails before any call is made."""
    checked = dict(context or {})
    if not checked:
        return checked
    seen = _context_key(checked, limits)
    if seen is None or _CHECKED_CONTEXTS.get(seen) is not limits:
        encode_context(checked, limits)  # (an unhashable value: the check says what is wrong)
        if seen is not None:
            if len(_CHECKED_CONTEXTS) >= _MAX_CHECKED_CONTEXTS:
                _CHECKED_CONTEXTS.clear()
            _CHECKED_CONTEXTS[seen] = limits
    return checked


def _context_key(
    context: Mapping[str, object], limits: Limits
) -> tuple[frozenset[tuple[str, str]], int] | None:
    try:
        return frozenset(cast(Mapping[str, str], context).items()), id(limits)
    except TypeError:
        return None


@dataclass(frozen=True)
class ClientSettings:
    """A client's checked settings: endpoints (deduplicated), per-attempt and total time,
    attempts, limits, and the HSA name its servers must present."""

    addresses: tuple[str, ...]
    timeout: float
    total_timeout: float
    attempts: int
    limits: Limits
    expected: str

    @classmethod
    def of(
        cls,
        endpoints: Sequence[str],
        ca_pem: bytes,
        timeout: float,
        limits: Limits,
        attempts: int,
        total_timeout: float | None,
    ) -> ClientSettings:
        """Checked settings; TypeError/ValueError for a programming error."""
        if isinstance(endpoints, str):
            raise TypeError("endpoints is a sequence of host:port strings, not one string")
        addresses = tuple(dict.fromkeys(endpoints))
        if not addresses:
            raise ValueError("give at least one endpoint (host:port of an HSA)")
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        return cls(
            addresses=addresses,
            timeout=timeout,
            total_timeout=total_timeout if total_timeout is not None else 3 * timeout,
            attempts=attempts,
            limits=limits,
            # Requests go only to HSAs of the domain the CA certifies (a refused server gets
            # none).
            expected=ANY_HSA.describe(ca_trust_domain(ca_pem)),
        )


class ClientCore:
    """Endpoint choice, cool-downs and error shaping for one client's endpoints."""

    def __init__(
        self,
        settings: ClientSettings,
        make_channel: Callable[[str], Any],
        make_session: Callable[[Any], Any] | None,
    ) -> None:
        """One endpoint per address of `settings`: its channel `make_channel(address)`, a
        key-service stub on it, and `make_session(channel)` (None: unary calls only)."""
        endpoints = []
        for address in settings.addresses:
            channel = make_channel(address)
            stub = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
            session = make_session(channel) if make_session is not None else None
            endpoints.append(Endpoint(address, channel, stub, session))
        self._timeout = settings.timeout
        self._total_timeout = settings.total_timeout
        self._attempts = settings.attempts
        self._limits = settings.limits
        self._expected = settings.expected
        self._endpoints = endpoints
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._grant_tokens: tuple[bytes, ...] = ()

    @classmethod
    def from_cluster(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Self:
        """A client of a local domain (`hsm-domain init DIR`, `hsm-domain up DIR`) as its demo
        application (spiffe://<domain>/client/demo-app), over every node running now."""
        endpoints, tls = read_cluster(directory)
        client: Self = cast(Any, cls)(  # (each client's own constructor: the same arguments)
            endpoints, ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, **kwargs
        )
        return client

    def with_grant_tokens(self, grant_tokens: Sequence[bytes]) -> Self:
        """A view of this client whose calls carry `grant_tokens` (from CreateGrant), so that
        a grant works on every HSA before it has reached them all. The view shares this
        client's channels: use it while the client is open, and close the client, not it."""
        if len(grant_tokens) > MAX_GRANT_TOKENS or not all(
            isinstance(t, bytes) for t in grant_tokens
        ):
            raise ValueError(f"grant_tokens: at most {MAX_GRANT_TOKENS} tokens, as bytes")
        view = copy.copy(self)
        view._grant_tokens = tuple(grant_tokens)
        return view

    def _prepared(self, request: Any) -> Any:
        """`request` with this client's grant tokens, if it takes any."""
        if self._grant_tokens and "grant_tokens" in request.DESCRIPTOR.fields_by_name:
            request.grant_tokens.extend(self._grant_tokens)
        return request

    @property
    def endpoints(self) -> list[str]:
        """The endpoint addresses, in the order given."""
        return [e.address for e in self._endpoints]

    @property
    def limits(self) -> Limits:
        """The limits this client checks inputs against before sending them."""
        return self._limits

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the {type(self).__name__} is closed")

    def _pick(self, tried: Sequence[Endpoint]) -> Endpoint:
        """The next endpoint round-robin, preferring one not tried in this call and not cooling
        down; else the untried (or any) one whose cool-down ends first."""
        endpoints = self._endpoints
        count = len(endpoints)
        start = next(self._next)
        now = time.monotonic()
        for i in range(count):
            endpoint = endpoints[(start + i) % count]
            if endpoint.free_at() <= now and endpoint not in tried:
                return endpoint
        untried = [e for e in endpoints if e not in tried] or endpoints
        return min(untried, key=Endpoint.free_at)

    def _attempt_timeout(self, deadline: float) -> float:
        """One attempt's timeout: the per-attempt one, within the call's whole deadline."""
        return max(0.05, min(self._timeout, deadline - time.monotonic()))

    def _backoff(self, tried: Sequence[Endpoint]) -> float:
        """No wait while an endpoint is left untried; then short exponential steps (bounded),
        and at least until the first endpoint's retry delay ends when every endpoint said the
        caller is over its quota (the server's `retry-after`, honoured)."""
        rounds = len(tried) - len(self._endpoints)
        if rounds < 0 or len({id(e) for e in tried}) < len(self._endpoints):
            return 0.0
        wait = backoff_delay(_BACKOFF_FIRST, _BACKOFF_MAX, rounds)
        now = time.monotonic()
        throttled = [e.throttled_until - now for e in self._endpoints]
        if all(left > 0 for left in throttled):
            wait = max(wait, min(throttled))
        return wait

    def _mark_down(self, endpoint: Endpoint) -> None:
        """Set a failed endpoint aside: 0.25 s, doubling per consecutive failure, at most 5 s."""
        with self._lock:
            endpoint.failures = min(endpoint.failures + 1, _MAX_DOUBLINGS + 1)
            cool_down = backoff_delay(_COOL_DOWN_FIRST, _COOL_DOWN_MAX, endpoint.failures - 1)
            endpoint.down_until = time.monotonic() + cool_down

    def _mark_up(self, endpoint: Endpoint) -> None:
        if endpoint.failures:
            with self._lock:
                endpoint.failures = 0
                endpoint.down_until = 0.0

    def _failed(
        self, method: str, error: grpc.RpcError, endpoint: Endpoint, definite: list[bool]
    ) -> Failover:
        """A failed attempt: a `Failover` to return when it may be sent again, else the
        domain error raised. Records whether the attempt surely changed nothing in `definite`
        and sets an UNAVAILABLE-class endpoint aside."""
        code, details = _status(error)
        answered_nothing = nothing_applied(error)
        definite.append(answered_nothing or never_sent(code, details))
        if code in _FAILOVER_CODES and not answered_nothing:
            self._mark_down(endpoint)
        delay = _throttle_delay(code, error)
        if delay is not None:
            endpoint.throttled_until = time.monotonic() + delay
        if retryable(method, code, details, applied_nothing=answered_nothing):
            return Failover(error, endpoint)
        raise self._error(method, error, endpoint) from None

    def _error(self, method: str, error: grpc.RpcError, endpoint: Endpoint) -> HsmDomainError:
        """The domain error of a failed attempt that is not sent again."""
        code, details = _status(error)
        delay = _throttle_delay(code, error)
        if delay is not None:
            return ThrottledError(
                f"the HSA at {endpoint.address} answered {details[:300]!r}; {method} changed "
                f"nothing: send it again after {delay:g} s",
                delay,
            )
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
        self, method: str, failover: Failover, tried: Sequence[Endpoint], definite: list[bool]
    ) -> HsmDomainError:
        """The error of a call whose attempts all failed; NotAppliedError when every attempt
        surely changed nothing (`definite`: none was sent, or the HSA said so)."""
        last = self._error(method, failover.error, failover.endpoint)
        addresses = ", ".join(dict.fromkeys(e.address for e in tried))
        attempts = len(tried)
        summary = f"{method} failed on every attempt ({attempts} on {addresses}); last: "
        if not all(definite) and method in KEYED_METHODS:
            # An earlier attempt may have been applied, whatever the last one said.
            return UnavailableError(
                f"{summary}{last.message}. An earlier attempt may have been applied: send it "
                "again with the same idempotency key and you get what it made, never a second"
            )
        if isinstance(last, ThrottledError):
            return ThrottledError(f"{summary}{last.message}", last.retry_after)
        cls = NotAppliedError if all(definite) and type(last) is UnavailableError else type(last)
        return cls(f"{summary}{last.message}")


def _throttle_delay(code: grpc.StatusCode | None, error: grpc.RpcError) -> float | None:
    """The retry delay of a call refused for the caller's request rate (RESOURCE_EXHAUSTED
    with the HSA's `retry-after`), else None."""
    if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return retry_after(error)
