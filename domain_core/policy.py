"""Key policies: which client principals may use a customer key for which operations.

A policy is a list of grants; a grant gives each of its principals each of its operations.
Principals are the SPIFFE-style URIs of client certificates, `spiffe://<domain>/client/<name>`.

Invariants kept here:
- matching is exact: a principal is allowed an operation only if some grant lists exactly that
  URI and exactly that operation. There are no wildcards, prefixes, case folding or implied
  operations (ADMIN does not imply ENCRYPT); `KEY_OPERATION_UNSPECIFIED` and unknown operation
  numbers are never allowed;
- a valid policy stays within `Limits` (its serialized size included: at most
  `max_policy_bytes`, 32 KiB as in AWS KMS), names only client principals of its own domain, lists
  only known operations, and gives ADMIN to at least one principal, so that no key can be
  locked beyond change;
- a key created without a policy gets `default_policy(creator)`: the creator, and only the
  creator, may do everything;
- a denial is `PermissionDeniedError` naming the principal, the operation and the key, never
  anything about other principals in the policy.
"""

from __future__ import annotations

from typing import Final, cast

from domain_core.errors import InvalidInputError, LimitExceededError, PermissionDeniedError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.pki import SpiffeId
from domain_proto import keys_pb2

__all__ = [
    "ALL_OPERATIONS",
    "allowed",
    "check_principal",
    "default_policy",
    "denied",
    "is_operation",
    "operation_name",
    "require",
    "validate_policy",
]

_OPERATION_NAMES: Final[dict[int, str]] = {
    keys_pb2.KEY_OPERATION_ENCRYPT: "encrypt",
    keys_pb2.KEY_OPERATION_DECRYPT: "decrypt",
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM: "re-encrypt from",
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO: "re-encrypt to",
    keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY: "generate data keys",
    keys_pb2.KEY_OPERATION_DESCRIBE: "describe",
    keys_pb2.KEY_OPERATION_ADMIN: "administer",
    keys_pb2.KEY_OPERATION_SIGN: "sign",
    keys_pb2.KEY_OPERATION_VERIFY: "verify",
    keys_pb2.KEY_OPERATION_GET_PUBLIC_KEY: "get the public key",
    keys_pb2.KEY_OPERATION_GENERATE_MAC: "generate MACs",
    keys_pb2.KEY_OPERATION_VERIFY_MAC: "verify MACs",
    keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY_PAIR: "generate data key pairs",
    keys_pb2.KEY_OPERATION_CREATE_GRANT: "create grants",
    keys_pb2.KEY_OPERATION_LIST_GRANTS: "list grants",
    keys_pb2.KEY_OPERATION_REVOKE_GRANT: "revoke grants",
}

# Every operation a grant may name, in enum order (UNSPECIFIED is not one).
ALL_OPERATIONS: Final[tuple[int, ...]] = tuple(sorted(_OPERATION_NAMES))

_SHOWN_CHARS: Final = 200


def operation_name(operation: int) -> str:
    """A short human name for an operation ("decrypt", "administer"), for messages and audit."""
    return _OPERATION_NAMES.get(operation, f"operation {int(operation)}")


def is_operation(operation: int) -> bool:
    """Whether `operation` is a known key operation (UNSPECIFIED is not)."""
    return operation in _OPERATION_NAMES


def allowed(policy: keys_pb2.KeyPolicy, principal: str, operation: int) -> bool:
    """Whether some grant of `policy` lists exactly `principal` and exactly `operation`."""
    if operation not in _OPERATION_NAMES or not principal:
        return False
    return any(
        principal in grant.principals and operation in grant.operations for grant in policy.grants
    )


def require(policy: keys_pb2.KeyPolicy, principal: str, operation: int, key_id: str) -> None:
    """Raise PermissionDeniedError unless `principal` may do `operation` with key `key_id`."""
    if not allowed(policy, principal, operation):
        raise denied(principal, operation, key_id)


def denied(principal: str, operation: int, key_id: str) -> PermissionDeniedError:
    """The refusal of `operation` to `principal` on key `key_id` (no more about the policy)."""
    return PermissionDeniedError(
        f"principal {principal[:_SHOWN_CHARS]} may not {operation_name(operation)} "
        f"with key {key_id[:_SHOWN_CHARS]}; a principal with the administer permission on "
        "this key can allow it (in this encryption context, where the key's rules set "
        "conditions) with PutKeyPolicy or CreateGrant"
    )


def default_policy(creator: str) -> keys_pb2.KeyPolicy:
    """The policy of a key created without one: the creator may do every operation."""
    if not isinstance(creator, str) or not creator:
        raise ValueError("creator must be a non-empty principal URI")
    return keys_pb2.KeyPolicy(
        grants=[
            keys_pb2.PolicyGrant(
                principals=[creator],
                operations=cast("list[keys_pb2.KeyOperation]", list(ALL_OPERATIONS)),
            )
        ]
    )


def check_principal(principal: str, domain_id: str, where: str) -> None:
    """InvalidInputError unless `principal` is a client of domain `domain_id`."""
    _validate_principal(principal, domain_id, where)


def _validate_principal(principal: str, domain_id: str, where: str) -> None:
    try:
        spiffe_id = SpiffeId.parse(principal)
    except InvalidInputError as error:
        raise InvalidInputError(
            f"{where}: principal {principal[:_SHOWN_CHARS]!r} is not a client id of the form "
            f"spiffe://{domain_id}/client/<name> ({error.message})"
        ) from None
    if spiffe_id.domain != domain_id or spiffe_id.kind != "client":
        raise InvalidInputError(
            f"{where}: principal {principal[:_SHOWN_CHARS]!r} is not a client of this domain; "
            f"use spiffe://{domain_id}/client/<name>"
        )


def validate_policy(
    policy: keys_pb2.KeyPolicy, *, domain_id: str, limits: Limits = DEFAULT_LIMITS
) -> None:
    """Check a policy before it is stored; InvalidInputError (or LimitExceededError) says why.

    Rules: at most `limits.max_policy_bytes` serialized (checked first, before anything is
    read from it), `limits.max_policy_grants` grants and `limits.max_principals_per_grant`
    principals per grant; every grant names at least one principal and one operation; every
    principal is `spiffe://<domain_id>/client/<name>`; every operation is a known one other
    than UNSPECIFIED; at least one principal is given ADMIN.
    """
    if not isinstance(policy, keys_pb2.KeyPolicy):
        raise TypeError("policy must be a KeyPolicy")
    size = policy.ByteSize()
    if size > limits.max_policy_bytes:
        raise LimitExceededError(
            f"key policy is {size} bytes; the limit is {limits.max_policy_bytes} bytes: grant "
            "fewer principals, or give them to a role-like principal that applications share"
        )
    if len(policy.grants) > limits.max_policy_grants:
        raise LimitExceededError(
            f"key policy has {len(policy.grants)} grants; the limit is {limits.max_policy_grants}"
        )
    has_admin = False
    for number, grant in enumerate(policy.grants, start=1):
        where = f"key policy grant {number}"
        if len(grant.principals) > limits.max_principals_per_grant:
            raise LimitExceededError(
                f"{where} has {len(grant.principals)} principals; the limit is "
                f"{limits.max_principals_per_grant}"
            )
        if not grant.principals:
            raise InvalidInputError(f"{where} names no principal")
        if not grant.operations:
            raise InvalidInputError(f"{where} names no operation")
        for principal in grant.principals:
            _validate_principal(principal, domain_id, where)
        for operation in grant.operations:
            if operation not in _OPERATION_NAMES:
                raise InvalidInputError(
                    f"{where} names operation {int(operation)}, which is not a key operation; "
                    f"use one of {', '.join(keys_pb2.KeyOperation.Name(o) for o in ALL_OPERATIONS)}"
                )
        if keys_pb2.KEY_OPERATION_ADMIN in grant.operations:
            has_admin = True
    if not has_admin:
        raise InvalidInputError(
            "key policy gives no principal KEY_OPERATION_ADMIN; grant it to at least one "
            "principal, or the key could never be changed again"
        )
