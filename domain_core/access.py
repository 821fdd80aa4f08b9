"""Who may use a key for what, from its key policy and its grants, with conditions on the
encryption context (AWS KMS's key policies with `kms:EncryptionContext` conditions, and its
grants with `EncryptionContextEquals` / `EncryptionContextSubset` constraints).

A key's rules (`AccessRules`, made once per cached key) answer `allows(principal, operation,
context)`. A policy grant or a key grant without conditions gives its operations outright; one
with conditions gives them only to calls whose encryption context meets them. Grants live in
the key's signed metadata (`KeyMetadata.grants`), so the coordinator can neither forge nor
drop one (the HSAs' version floors stop an older metadata); a grant token (`granttokens`) lets
an HSA honour a grant before the metadata that holds it reached it.

Invariants:
- matching is exact, as in `policy`: a principal, an operation, and for a conditional rule
  the whole context (`equals`) or each pair (`subset`); no wildcards;
- conditions go only with operations that take an encryption context
  (`CONTEXT_OPERATIONS`), so a condition can never be met by a call that has none;
- a grant gives only what AWS KMS lets grants give (`GRANT_OPERATIONS`: cryptographic use,
  DescribeKey, CreateGrant; never administration, never ListGrants or RevokeGrant), to a
  client principal of the key's domain; a key holds at most `Limits.max_grants_per_key`;
- a denial is `PermissionDeniedError` naming the principal, the operation and the key.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from domain_core import policy
from domain_core.ciphertext import encode_context
from domain_core.errors import InvalidInputError, LimitExceededError
from domain_core.limits import DEFAULT_LIMITS, MAX_GRANT_NAME_CHARS, Limits
from domain_proto import keys_pb2

__all__ = [
    "CONTEXT_OPERATIONS",
    "GRANT_OPERATIONS",
    "AccessRules",
    "Conditions",
    "access_rules",
    "new_grant_id",
    "validate_conditions",
    "validate_grant",
    "validate_policy_conditions",
]

# Operations whose calls carry an encryption context.
CONTEXT_OPERATIONS: Final = frozenset(
    {
        keys_pb2.KEY_OPERATION_ENCRYPT,
        keys_pb2.KEY_OPERATION_DECRYPT,
        keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
        keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
        keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY,
        keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY_PAIR,
    }
)
# What a grant may give (AWS KMS's grant operations).
GRANT_OPERATIONS: Final = CONTEXT_OPERATIONS | {
    keys_pb2.KEY_OPERATION_DESCRIBE,
    keys_pb2.KEY_OPERATION_SIGN,
    keys_pb2.KEY_OPERATION_VERIFY,
    keys_pb2.KEY_OPERATION_GET_PUBLIC_KEY,
    keys_pb2.KEY_OPERATION_GENERATE_MAC,
    keys_pb2.KEY_OPERATION_VERIFY_MAC,
    keys_pb2.KEY_OPERATION_CREATE_GRANT,
}
_GRANT_ID_BYTES: Final = 32


@dataclass(frozen=True)
class Conditions:
    """A rule's conditions on the encryption context (None: none of that kind)."""

    equals: Mapping[str, str] | None = None
    subset: Mapping[str, str] | None = None

    @classmethod
    def of(cls, message: keys_pb2.ContextConditions) -> Conditions | None:
        """The conditions of a message; None when it sets none."""
        equals = dict(message.encryption_context_equals)
        subset = dict(message.encryption_context_subset)
        if not equals and not subset:
            return None
        return cls(equals or None, subset or None)

    def hold(self, context: Mapping[str, str]) -> bool:
        """Whether a call's encryption context meets every condition."""
        if self.equals is not None and dict(context) != self.equals:
            return False
        return self.subset is None or all(
            context.get(name) == value for name, value in self.subset.items()
        )


_Rule = tuple[frozenset[int], Conditions]


@dataclass(frozen=True)
class AccessRules:
    """A key's decisions: operations each principal has outright, and its conditional rules."""

    outright: Mapping[str, frozenset[int]]
    conditional: Mapping[str, tuple[_Rule, ...]]

    def allows(self, principal: str, operation: int, context: Mapping[str, str]) -> bool:
        """Whether `principal` may do `operation` in a call with `context`."""
        operations = self.outright.get(principal)
        if operations is not None and operation in operations:
            return True
        return any(
            operation in ops and conditions.hold(context)
            for ops, conditions in self.conditional.get(principal, ())
        )

    def require(
        self, principal: str, operation: int, key_id: str, context: Mapping[str, str]
    ) -> None:
        """PermissionDeniedError unless `allows`."""
        if not self.allows(principal, operation, context):
            raise policy.denied(principal, operation, key_id)

    def with_grants(self, grants: Iterable[keys_pb2.KeyGrant]) -> AccessRules:
        """These rules and those of `grants` (grants from tokens, for one call)."""
        outright = {p: set(ops) for p, ops in self.outright.items()}
        conditional = {p: list(rules) for p, rules in self.conditional.items()}
        for grant in grants:
            _add(
                outright,
                conditional,
                [grant.grantee_principal],
                grant.operations,
                grant.constraints,
            )
        return _freeze(outright, conditional)


def _add(
    outright: dict[str, set[int]],
    conditional: dict[str, list[_Rule]],
    principals: Iterable[str],
    operations: Iterable[int],
    conditions_message: keys_pb2.ContextConditions,
) -> None:
    known = frozenset(int(o) for o in operations if policy.is_operation(int(o)))
    if not known:
        return
    conditions = Conditions.of(conditions_message)
    for principal in principals:
        if not principal:
            continue
        if conditions is None:
            outright.setdefault(principal, set()).update(known)
        else:
            conditional.setdefault(principal, []).append((known, conditions))


def _freeze(outright: dict[str, set[int]], conditional: dict[str, list[_Rule]]) -> AccessRules:
    shared: dict[frozenset[int], frozenset[int]] = {}
    decisions: dict[str, frozenset[int]] = {}
    for principal, operations in outright.items():
        frozen = frozenset(operations)
        decisions[principal] = shared.setdefault(frozen, frozen)
    return AccessRules(
        MappingProxyType(decisions),
        MappingProxyType({p: tuple(rules) for p, rules in conditional.items()}),
    )


def access_rules(metadata: keys_pb2.KeyMetadata) -> AccessRules:
    """The rules of a key's policy and grants (made once per cached key)."""
    outright: dict[str, set[int]] = {}
    conditional: dict[str, list[_Rule]] = {}
    for grant in metadata.policy.grants:
        _add(outright, conditional, grant.principals, grant.operations, grant.conditions)
    for key_grant in metadata.grants:
        _add(
            outright,
            conditional,
            [key_grant.grantee_principal],
            key_grant.operations,
            key_grant.constraints,
        )
    return _freeze(outright, conditional)


def validate_conditions(
    conditions: keys_pb2.ContextConditions,
    operations: Iterable[int],
    where: str,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Conditions go only with operations that take a context, and each map is a valid
    encryption context (as `ciphertext.encode_context` checks one)."""
    if Conditions.of(conditions) is None:
        return
    other = [policy.operation_name(o) for o in operations if o not in CONTEXT_OPERATIONS]
    if other:
        raise InvalidInputError(
            f"{where}: encryption context conditions go only with operations that take a "
            f"context (encrypt, decrypt, re-encrypt, data keys); not with {', '.join(other)}"
        )
    for mapping in (conditions.encryption_context_equals, conditions.encryption_context_subset):
        try:
            encode_context(dict(mapping), limits)
        except InvalidInputError as error:
            raise InvalidInputError(f"{where}: a condition's context: {error.message}") from None


def validate_policy_conditions(key_policy: keys_pb2.KeyPolicy, limits: Limits) -> None:
    """The conditions of every grant of a key policy (`validate_conditions`)."""
    for number, grant in enumerate(key_policy.grants, start=1):
        validate_conditions(
            grant.conditions, grant.operations, f"key policy grant {number}", limits
        )


def new_grant_id() -> str:
    """A fresh grant id: 64 hex characters, as AWS KMS's."""
    return secrets.token_hex(_GRANT_ID_BYTES)


def validate_grant(
    grant: keys_pb2.KeyGrant,
    metadata: keys_pb2.KeyMetadata,
    *,
    domain_id: str,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """A grant CreateGrant may add to a key (see the module invariants)."""
    where = "the grant"
    if len(metadata.grants) >= limits.max_grants_per_key:
        raise LimitExceededError(
            f"key {metadata.key_id} holds {len(metadata.grants)} grants, the most a key may "
            "hold; retire or revoke grants first"
        )
    policy.check_principal(grant.grantee_principal, domain_id, "grantee_principal")
    if grant.retiring_principal:
        policy.check_principal(grant.retiring_principal, domain_id, "retiring_principal")
    if not grant.operations:
        raise InvalidInputError("a grant names at least one operation")
    for operation in grant.operations:
        if operation not in GRANT_OPERATIONS:
            raise InvalidInputError(
                f"a grant cannot give {policy.operation_name(int(operation))}; grants give "
                "cryptographic use, describe and create-grant"
            )
    if len(grant.name) > MAX_GRANT_NAME_CHARS or not grant.name.isprintable():
        raise InvalidInputError(
            f"a grant's name is at most {MAX_GRANT_NAME_CHARS} printable characters"
        )
    validate_conditions(grant.constraints, grant.operations, where, limits)
