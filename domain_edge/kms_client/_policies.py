"""Key policies as JSON and key metadata as the client shows them.

Invariants: a policy document is checked on reading (known operation names, the shape
docs/kms-client.md gives) and turned into the `KeyPolicy` message the service takes; key
metadata is read from the service's message into a frozen value, never sent back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from domain_core.errors import InvalidInputError
from domain_proto import keys_pb2

_STATE_NAMES: Final[dict[int, str]] = {
    keys_pb2.KEY_STATE_ENABLED: "enabled",
    keys_pb2.KEY_STATE_DISABLED: "disabled",
    keys_pb2.KEY_STATE_PENDING_DELETION: "pending-deletion",
    keys_pb2.KEY_STATE_PENDING_IMPORT: "pending-import",
}


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    """A proto enum value's name without its prefix (a number this client does not know, as
    "unknown-N": a newer service may have more)."""
    try:
        return str(enum.Name(number)).removeprefix(prefix)
    except ValueError:
        return f"unknown-{int(number)}"


# The operation names of the policy JSON (docs/kms-client.md), in enum order.
OPERATION_NAMES: Final[dict[str, int]] = {
    "encrypt": keys_pb2.KEY_OPERATION_ENCRYPT,
    "decrypt": keys_pb2.KEY_OPERATION_DECRYPT,
    "re-encrypt-from": keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
    "re-encrypt-to": keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
    "generate-data-key": keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY,
    "describe": keys_pb2.KEY_OPERATION_DESCRIBE,
    "admin": keys_pb2.KEY_OPERATION_ADMIN,
    "sign": keys_pb2.KEY_OPERATION_SIGN,
    "verify": keys_pb2.KEY_OPERATION_VERIFY,
    "get-public-key": keys_pb2.KEY_OPERATION_GET_PUBLIC_KEY,
    "generate-mac": keys_pb2.KEY_OPERATION_GENERATE_MAC,
    "verify-mac": keys_pb2.KEY_OPERATION_VERIFY_MAC,
    "generate-data-key-pair": keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY_PAIR,
    "create-grant": keys_pb2.KEY_OPERATION_CREATE_GRANT,
    "list-grants": keys_pb2.KEY_OPERATION_LIST_GRANTS,
    "revoke-grant": keys_pb2.KEY_OPERATION_REVOKE_GRANT,
}
_NAME_OF_OPERATION: Final = {number: name for name, number in OPERATION_NAMES.items()}


def operation_number(name: object, where: str) -> int:
    """The KeyOperation of a policy operation name ("encrypt", "create-grant", ...)."""
    return _operation_from_name(name, where)


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
        if not isinstance(grant, Mapping) or not (
            {"principals", "operations"} <= set(grant) <= {"principals", "operations", "conditions"}
        ):
            raise InvalidInputError(
                f'{where}: a grant is {{"principals": [...], "operations": [...]}}, and '
                '"conditions" optionally, and nothing else'
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
                conditions=conditions_from_json(grant.get("conditions"), where),
            )
        )
    return policy


_CONDITION_NAMES: Final = ("encryption_context_equals", "encryption_context_subset")


def conditions_from_json(document: object, where: str) -> keys_pb2.ContextConditions:
    """ContextConditions from {"encryption_context_equals": {...},
    "encryption_context_subset": {...}} (either or both; None: no conditions)."""
    conditions = keys_pb2.ContextConditions()
    if document is None:
        return conditions
    if not isinstance(document, Mapping) or not set(document) <= set(_CONDITION_NAMES):
        raise InvalidInputError(
            f"{where}: conditions are an object with {' and/or '.join(_CONDITION_NAMES)}"
        )
    for name, mapping in document.items():
        if not isinstance(mapping, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            raise InvalidInputError(f"{where}: {name} is an object of strings")
        getattr(conditions, name).update(mapping)
    return conditions


def conditions_to_json(conditions: keys_pb2.ContextConditions) -> dict[str, dict[str, str]]:
    """The JSON form of ContextConditions (only the kinds it sets)."""
    return {
        name: dict(getattr(conditions, name))
        for name in _CONDITION_NAMES
        if getattr(conditions, name)
    }


def policy_to_json(policy: keys_pb2.KeyPolicy) -> dict[str, Any]:
    """The JSON form of a KeyPolicy (the inverse of `policy_from_json`)."""
    return {
        "grants": [
            {
                "principals": list(grant.principals),
                "operations": [
                    _NAME_OF_OPERATION.get(op, f"operation-{int(op)}") for op in grant.operations
                ],
                **(
                    {"conditions": conditions_to_json(grant.conditions)}
                    if grant.HasField("conditions") and conditions_to_json(grant.conditions)
                    else {}
                ),
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
    conditions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """{"encryption_context_equals": {...}, "encryption_context_subset": {...}}, as set."""


@dataclass(frozen=True)
class Grant:
    """A grant of a key, as ListGrants gives it (operation names as in a policy)."""

    grant_id: str
    name: str
    grantee_principal: str
    retiring_principal: str
    operations: tuple[str, ...]
    constraints: Mapping[str, Mapping[str, str]]
    issuing_principal: str
    created_at: int

    @classmethod
    def from_message(cls, message: keys_pb2.KeyGrant) -> Grant:
        """Wrap a KeyGrant message."""
        return cls(
            grant_id=message.grant_id,
            name=message.name,
            grantee_principal=message.grantee_principal,
            retiring_principal=message.retiring_principal,
            operations=tuple(
                _NAME_OF_OPERATION.get(op, f"operation-{int(op)}") for op in message.operations
            ),
            constraints=conditions_to_json(message.constraints),
            issuing_principal=message.issuing_principal,
            created_at=message.created_at,
        )


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
    key_spec: str
    """AWS KMS's name: "SYMMETRIC_DEFAULT", "RSA_2048", "ECC_NIST_P256", "HMAC_256", ..."""
    key_usage: str
    """"ENCRYPT_DECRYPT", "SIGN_VERIFY" or "GENERATE_VERIFY_MAC"."""
    origin: str
    """"DOMAIN" (material made by an HSA) or "EXTERNAL" (imported)."""
    material_expires_at: int
    """Imported material: when the domain deletes it (0: never)."""
    tags: Mapping[str, str]
    """The key's tags (TagResource)."""
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
                PolicyGrant(tuple(g["principals"]), tuple(g["operations"]), g.get("conditions", {}))
                for g in policy["grants"]
            ),
            rotation_enabled=message.rotation.enabled,
            rotation_period_days=message.rotation.period_days,
            next_rotation_at=message.rotation.next_rotation_at,
            current_backing_version=message.current_backing_version,
            creator=message.creator,
            metadata_version=message.metadata_version,
            domain_id=message.domain_id,
            key_spec=_enum_name(keys_pb2.KeySpec, message.key_spec, "KEY_SPEC_"),
            key_usage=_enum_name(keys_pb2.KeyUsage, message.key_usage, "KEY_USAGE_"),
            origin=_enum_name(keys_pb2.KeyOrigin, message.origin, "KEY_ORIGIN_"),
            material_expires_at=message.material_expires_at,
            tags=dict(message.tags),
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
            "key_spec": self.key_spec,
            "key_usage": self.key_usage,
            "origin": self.origin,
            "material_expires_at": self.material_expires_at,
            "tags": dict(self.tags),
        }
