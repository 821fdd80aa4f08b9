"""Request-rate quotas of the key service: token buckets per principal and class of operation
(docs/runtime.md "Request quotas").

Every KeyService call belongs to one class (`QUOTA_CLASSES`): cryptographic operations,
asymmetric ones (Sign, Verify, data key pairs; RSA-OAEP Encrypt and Decrypt count as
cryptographic operations, since the class is chosen before the key is read), reads,
listings, key administration, key creation. A class has a rate and a burst for the whole
domain (`Limits`); each HSA process enforces its share of them, the domain's figures
divided by the key-service processes of the domain (hosts times the processes each runs,
`shares`), so the domain never serves a principal more than its quota however the calls are
spread, and a client that spreads them (as `KeyClient` does, round-robin) gets all of it. Key
creation is the exception, as before: its bucket is per process (the coordinator bounds the
keys one principal may hold).

Invariants: a call over its quota is refused before it does anything (`ThrottledError`:
RESOURCE_EXHAUSTED, nothing applied, with the seconds after which a token is back, which the
transport passes to the client as `retry-after`); one principal's calls never take another's
tokens; the buckets are bounded (`RateLimiter`); a change of the domain's size re-divides the
shares within `_RESHARE_SECONDS` (the buckets start full again then).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from domain_core.errors import ThrottledError
from domain_core.limits import Limits
from domain_edge.rate_limit import RateLimiter

__all__ = ["QUOTA_CLASSES", "QuotaClass", "Quotas"]


@dataclass(frozen=True)
class QuotaClass:
    """One class of operation: its name, what a call of it is called in a refusal, and
    whether the domain's figures are shared among its processes (else each process has
    them whole)."""

    name: str
    what: str
    shared: bool = True


CRYPTO: Final = QuotaClass("crypto", "cryptographic operations")
ASYMMETRIC: Final = QuotaClass("asymmetric", "asymmetric cryptographic operations")
READ: Final = QuotaClass("read", "key reads")
LIST: Final = QuotaClass("list", "key listings")
ADMIN: Final = QuotaClass("admin", "key administration calls")
CREATE: Final = QuotaClass("create", "keys", shared=False)

# The class of every KeyService call (a session's calls are counted as their unary calls).
QUOTA_CLASSES: Final[Mapping[str, QuotaClass]] = {
    "Encrypt": CRYPTO,
    "Decrypt": CRYPTO,
    "ReEncrypt": CRYPTO,
    "GenerateDataKey": CRYPTO,
    "GenerateDataKeyWithoutPlaintext": CRYPTO,
    "GenerateRandom": CRYPTO,
    "GenerateMac": CRYPTO,
    "VerifyMac": CRYPTO,
    "Sign": ASYMMETRIC,
    "Verify": ASYMMETRIC,
    "GenerateDataKeyPair": ASYMMETRIC,
    "GenerateDataKeyPairWithoutPlaintext": ASYMMETRIC,
    "GetPublicKey": READ,
    "DescribeKey": READ,
    "ListKeys": LIST,
    "RotateKey": ADMIN,
    "PutKeyPolicy": ADMIN,
    "EnableKey": ADMIN,
    "DisableKey": ADMIN,
    "ScheduleKeyDeletion": ADMIN,
    "CancelKeyDeletion": ADMIN,
    "GetParametersForImport": ADMIN,
    "ImportKeyMaterial": ADMIN,
    "DeleteImportedKeyMaterial": ADMIN,
    "CreateGrant": ADMIN,
    "RetireGrant": ADMIN,
    "RevokeGrant": ADMIN,
    "ListGrants": LIST,
    "TagResource": ADMIN,
    "UntagResource": ADMIN,
    "ListResourceTags": READ,
    "CreateKey": CREATE,
}
# How often the share is recomputed from the domain's size (hosts come and go rarely).
_RESHARE_SECONDS: Final = 5.0


def _figures(limits: Limits, quota: QuotaClass) -> tuple[float, int]:
    """The domain's (rate per second, burst) of a class."""
    if quota is CRYPTO:
        return limits.crypto_requests_per_second, limits.crypto_request_burst
    if quota is ASYMMETRIC:
        return limits.asymmetric_requests_per_second, limits.asymmetric_request_burst
    if quota is READ:
        return limits.read_requests_per_second, limits.read_request_burst
    if quota is LIST:
        return limits.list_requests_per_second, limits.list_request_burst
    if quota is ADMIN:
        return limits.admin_requests_per_second, limits.admin_request_burst
    return limits.create_key_per_second, limits.create_key_burst


class Quotas:
    """The buckets of one HSA process. `shares()` is how many key-service processes the
    domain runs now (at least 1); `admit(principal, operation)` takes a token or raises."""

    def __init__(
        self,
        limits: Limits,
        shares: Callable[[], int] = lambda: 1,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._shares = shares
        self._clock = clock
        self._lock = threading.Lock()
        self._share_count = 0
        self._next_reshare = float("-inf")
        self._buckets: dict[QuotaClass, RateLimiter] = {}
        self._reshare()

    def _reshare(self) -> None:
        count = max(1, int(self._shares()))
        with self._lock:
            self._next_reshare = self._clock() + _RESHARE_SECONDS
            if count == self._share_count:
                return
            self._share_count = count
            buckets = {}
            for quota in {*QUOTA_CLASSES.values()}:
                rate, burst = _figures(self._limits, quota)
                divisor = count if quota.shared else 1
                buckets[quota] = RateLimiter(
                    rate / divisor, max(1, int(burst // divisor)), clock=self._clock
                )
            self._buckets = buckets

    def bucket(self, operation: str) -> RateLimiter:
        """The bucket set of `operation`'s class on this process (its share)."""
        if self._clock() >= self._next_reshare:
            self._reshare()
        return self._buckets[QUOTA_CLASSES[operation]]

    def admit(self, principal: str, operation: str) -> None:
        """Take one token of `principal`'s bucket for `operation`'s class; ThrottledError
        (with the seconds until a token is back) when there is none."""
        bucket = self.bucket(operation)
        wait = bucket.acquire(principal)
        if not wait:
            return
        quota = QUOTA_CLASSES[operation]
        if quota is CREATE:
            message = (
                f"{principal} may create at most {bucket.rate:g} keys per second on this HSA "
                f"(bursts of {bucket.burst}): retry in {wait:.1f} s"
            )
        else:
            message = (
                f"{principal} is over its quota of {quota.what} ({bucket.rate:g} per second "
                f"on this HSA, its share of the domain's): retry in {wait:.2f} s"
            )
        raise ThrottledError(message, wait)
