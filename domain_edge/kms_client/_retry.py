"""Which failed calls the key client may send again, and how long it waits.

Invariants: see the package docstring (a call is sent again only when that is safe: an
idempotent call on an UNAVAILABLE-class failure, or any call whose request never left or that
the HSA marked as having changed nothing); the back-off and the cool-down are bounded at any
number of failures.
"""

from __future__ import annotations

from typing import Any, Final, cast

import grpc

from domain_edge.transport import never_sent

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
        "Sign",
        "Verify",
        "GetPublicKey",
        "GenerateMac",
        "VerifyMac",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GetParametersForImport",
        "ListGrants",
        "ListResourceTags",
    }
)
# Calls that change something but carry an idempotency key (`KeyClient.create_key` always
# sends one): sent again like the calls above, and applied once however often they arrive.
KEYED_METHODS: Final = frozenset({"CreateKey"})
# Calls that change a key: sent again only when the first attempt surely never left.
ADMIN_METHODS: Final = frozenset(
    {
        "RotateKey",
        "PutKeyPolicy",
        "EnableKey",
        "DisableKey",
        "ScheduleKeyDeletion",
        "CancelKeyDeletion",
        "ImportKeyMaterial",
        "DeleteImportedKeyMaterial",
        "CreateGrant",
        "RetireGrant",
        "RevokeGrant",
        "TagResource",
        "UntagResource",
    }
)
DEFAULT_ATTEMPTS: Final = 4
_FAILOVER_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_COOL_DOWN_FIRST: Final = 0.25
_COOL_DOWN_MAX: Final = 5.0
_BACKOFF_FIRST: Final = 0.05
_BACKOFF_MAX: Final = 1.0
# Doublings past this change nothing (every maximum is reached long before): the cap keeps the
# power of two small whatever the count of failures.
_MAX_DOUBLINGS: Final = 32


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
    nothing (`transport.nothing_applied`). See the package docstring for the rules."""
    if never_sent(code, details) or applied_nothing:
        return True
    safe = method in IDEMPOTENT_METHODS or method in KEYED_METHODS
    return safe and code in _FAILOVER_CODES


def backoff_delay(first: float, maximum: float, step: int) -> float:
    """`first` doubled `step` times, at most `maximum`: for any `step`, however large (the
    exponent is capped, so nothing overflows and the cost stays constant)."""
    return float(min(maximum, first * 2.0 ** min(max(step, 0), _MAX_DOUBLINGS)))
