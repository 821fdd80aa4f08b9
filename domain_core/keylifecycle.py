"""The lifecycle of a customer key: its states, what each change does, rotation and deletion.

Pure rules over `keys_pb2.KeyMetadata` (and a key's backing keys by version): no gRPC, no I/O,
no threads. The HSA's key service applies them to verified records it read from the
coordinator and writes the result back (`hsa_node.keyservice`); its background upkeep applies
the same rules when a rotation or a deletion falls due, and re-wraps the records a domain
change would strand (`hsa_node.rewrap`).

A key's state moves only along these edges (as AWS KMS):

    ENABLED  <-> DISABLED              EnableKey, DisableKey (`set_state`)
    ENABLED, DISABLED -> PENDING_DELETION   ScheduleKeyDeletion, 7 to 30 days (`schedule_deletion`)
    PENDING_DELETION -> DISABLED       CancelKeyDeletion (`cancel_deletion`)
    PENDING_DELETION -> (deleted)      the upkeep, once `deletion_at` passed (`deletion_due`)

Invariants:
- only an ENABLED key may be used, and only an ENABLED key rotates (`require_enabled`: a
  disabled or pending-deletion key is FailedPreconditionError saying how to use it again); a
  key pending deletion can be neither enabled nor disabled nor scheduled again, only cancelled;
- a change that changes something gives the next metadata with `metadata_version` + 1 (the
  HSAs' rollback floor grows with it); one that changes nothing gives none (`apply_change`),
  and the input is never modified;
- a rotation adds backing version current + 1 with a fresh 256-bit key and keeps every older
  version (old ciphertexts keep decrypting), up to `MAX_BACKING_VERSIONS`; an automatic one
  moves the next rotation date one period on, an on-demand one leaves the schedule alone;
- only symmetric keys rotate, automatically or on demand (as AWS KMS): an asymmetric or HMAC
  key keeps its one backing version for life (`UnsupportedOperationError` otherwise);
- a new key (`new_key`) has a key spec and usage AWS KMS allows together
  (`keyspecs.check_spec_usage`), fixed for its life, a description within the limit, a valid
  policy that gives someone ADMIN (or, without one, the creator may do everything:
  `policy.default_policy`), a rotation period of 90 to 2560 days, backing version 1 and
  metadata version 1;
- what the upkeep reads from an unverified record (`needs_upkeep`, `TransitionTarget.strands`)
  only decides whether to look closer; every write acts on a verified record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, cast

from domain_core import access, crypto, keyimport, keyspecs, keytags, policy
from domain_core.errors import (
    FailedPreconditionError,
    InvalidInputError,
    LimitExceededError,
    UnsupportedOperationError,
)
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_BACKING_VERSIONS,
    MAX_DELETION_WINDOW_DAYS,
    MAX_ROTATION_PERIOD_DAYS,
    MAX_TAGS_PER_KEY,
    MIN_DELETION_WINDOW_DAYS,
    MIN_ROTATION_PERIOD_DAYS,
    Limits,
)
from domain_proto import keys_pb2

__all__ = [
    "DAY_SECONDS",
    "DEFAULT_DELETION_WINDOW_DAYS",
    "DEFAULT_ROTATION_PERIOD_DAYS",
    "KeyChange",
    "NewKey",
    "TransitionTarget",
    "apply_change",
    "cancel_deletion",
    "deletion_due",
    "iso_date",
    "needs_upkeep",
    "new_key",
    "put_policy",
    "require_enabled",
    "rotate",
    "rotate_automatically",
    "rotate_backing_key",
    "rotation_due",
    "schedule_deletion",
    "set_state",
]

DAY_SECONDS: Final = 86_400
DEFAULT_ROTATION_PERIOD_DAYS: Final = 365
DEFAULT_DELETION_WINDOW_DAYS: Final = 30

KeyChange = Callable[[keys_pb2.KeyMetadata, dict[int, bytes], int], bool]
"""A change of a key: it edits a copy of the metadata and of the backing keys in place, given
the time (unix seconds), and says whether it changed anything."""


def iso_date(timestamp: int) -> str:
    """A unix time as an ISO 8601 UTC date and time, for messages."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- using a key ---------------------------------------------------------------------------


def require_enabled(metadata: keys_pb2.KeyMetadata) -> None:
    """FailedPreconditionError unless the key may be used (ENABLED)."""
    key_id = metadata.key_id
    if metadata.state == keys_pb2.KEY_STATE_ENABLED:
        return
    if metadata.state == keys_pb2.KEY_STATE_DISABLED:
        raise FailedPreconditionError(f"key {key_id} is disabled; enable it with EnableKey")
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(
            f"key {key_id} is pending deletion (deletion on {iso_date(metadata.deletion_at)}); "
            "cancel the deletion with CancelKeyDeletion to use it again"
        )
    if metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT:
        raise FailedPreconditionError(
            f"key {key_id} has no key material: import it (GetParametersForImport, then "
            "ImportKeyMaterial) to use the key"
        )
    raise FailedPreconditionError(f"key {key_id} is in an unknown state ({int(metadata.state)})")


# --- a new key -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NewKey:
    """A key a caller asked for, checked (`new_key`); `metadata` gives its first metadata."""

    description: str
    policy: keys_pb2.KeyPolicy
    rotation_enabled: bool
    rotation_period_days: int
    creator: str
    domain_id: str
    key_spec: int = keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT
    key_usage: int = keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT
    origin: int = keys_pb2.KEY_ORIGIN_DOMAIN
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def external(self) -> bool:
        """Whether the key's material is to be imported (it starts without any)."""
        return self.origin == keys_pb2.KEY_ORIGIN_EXTERNAL

    def metadata(self, key_id: str, now: int) -> keys_pb2.KeyMetadata:
        """The key's first metadata: ENABLED with backing version 1 (PENDING_IMPORT with none,
        for origin EXTERNAL), metadata version 1, created `now`, its first automatic rotation
        one period on (when enabled)."""
        period = self.rotation_period_days
        return keys_pb2.KeyMetadata(
            key_id=key_id,
            description=self.description,
            state=keys_pb2.KEY_STATE_PENDING_IMPORT
            if self.external
            else keys_pb2.KEY_STATE_ENABLED,
            created_at=now,
            policy=self.policy,
            rotation=keys_pb2.RotationSettings(
                enabled=self.rotation_enabled,
                period_days=period,
                next_rotation_at=now + period * DAY_SECONDS if self.rotation_enabled else 0,
            ),
            current_backing_version=0 if self.external else 1,
            creator=self.creator,
            metadata_version=1,
            domain_id=self.domain_id,
            key_spec=cast("keys_pb2.KeySpec", self.key_spec),
            key_usage=cast("keys_pb2.KeyUsage", self.key_usage),
            origin=cast("keys_pb2.KeyOrigin", self.origin),
            tags=dict(self.tags),
        )


def new_key(
    *,
    description: str,
    key_policy: keys_pb2.KeyPolicy | None,
    enable_rotation: bool,
    rotation_period_days: int,
    creator: str,
    domain_id: str,
    limits: Limits = DEFAULT_LIMITS,
    key_spec: int = keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT,
    key_usage: int = keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT,
    origin: int = keys_pb2.KEY_ORIGIN_DOMAIN,
    tags: Mapping[str, str] | None = None,
) -> NewKey:
    """Check what a caller asks of a new key: the key spec and usage (a pair AWS KMS allows),
    the description's length, then the policy (None or no grants: `creator` may do
    everything), then the rotation period (0: the default). Automatic rotation is for
    symmetric keys only, as in AWS KMS."""
    keyspecs.check_spec_usage(key_spec, key_usage)
    if tags:
        keytags.check_tags(tags)
        if len(tags) > MAX_TAGS_PER_KEY:
            raise LimitExceededError(f"a key holds at most {MAX_TAGS_PER_KEY} tags")
    if origin not in (keys_pb2.KEY_ORIGIN_DOMAIN, keys_pb2.KEY_ORIGIN_EXTERNAL):
        raise InvalidInputError("origin must be DOMAIN (the default) or EXTERNAL")
    if enable_rotation and not keyspecs.is_symmetric(key_spec):
        raise UnsupportedOperationError(
            f"automatic rotation is for symmetric encryption keys only, not for a "
            f"{keyspecs.spec_name(key_spec)} key; create it without enable_rotation"
        )
    if enable_rotation and origin == keys_pb2.KEY_ORIGIN_EXTERNAL:
        raise UnsupportedOperationError(
            "keys of imported material do not rotate (as in AWS KMS); create it without "
            "enable_rotation"
        )
    limit = limits.max_key_description_chars
    if len(description) > limit:
        raise LimitExceededError(
            f"description is {len(description)} characters; the limit is {limit}"
        )
    if key_policy is not None and key_policy.grants:
        policy.validate_policy(key_policy, domain_id=domain_id, limits=limits)
        access.validate_policy_conditions(key_policy, limits)
    else:
        key_policy = policy.default_policy(creator)
    period = rotation_period_days or DEFAULT_ROTATION_PERIOD_DAYS
    if not MIN_ROTATION_PERIOD_DAYS <= period <= MAX_ROTATION_PERIOD_DAYS:
        raise InvalidInputError(
            f"rotation_period_days must be between {MIN_ROTATION_PERIOD_DAYS} and "
            f"{MAX_ROTATION_PERIOD_DAYS}, not {period}"
        )
    return NewKey(
        description=description,
        policy=key_policy,
        rotation_enabled=enable_rotation,
        rotation_period_days=period,
        creator=creator,
        domain_id=domain_id,
        key_spec=key_spec,
        key_usage=key_usage,
        origin=origin,
        tags=dict(tags or {}),
    )


# --- changing a key ------------------------------------------------------------------------


def apply_change(
    current: keys_pb2.KeyMetadata,
    backing_keys: Mapping[int, bytes],
    change: KeyChange,
    now: int,
) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]] | None:
    """The key after `change`, on copies: (metadata with `metadata_version` + 1, backing keys),
    or None when the change changes nothing. Errors of `change` propagate."""
    metadata, keys = _copy(current, backing_keys)
    if not change(metadata, keys, now):
        return None
    metadata.metadata_version = current.metadata_version + 1
    return metadata, keys


def _copy(
    metadata: keys_pb2.KeyMetadata, backing_keys: Mapping[int, bytes]
) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
    copy = keys_pb2.KeyMetadata()
    copy.CopyFrom(metadata)
    return copy, dict(backing_keys)


def rotate_backing_key(
    metadata: keys_pb2.KeyMetadata,
    backing_keys: dict[int, bytes],
    now: int,
    *,
    automatic: bool = False,
) -> None:
    """Add a fresh backing key version (it becomes current); old versions keep decrypting.

    An automatic rotation also moves the next rotation date one period on; an on-demand one
    leaves the schedule alone (as KMS).
    """
    require_enabled(metadata)
    if metadata.origin == keys_pb2.KEY_ORIGIN_EXTERNAL:
        raise UnsupportedOperationError(
            f"key {metadata.key_id} holds imported material, which does not rotate here; "
            "import into a new key and move the key's users to it"
        )
    if not keyspecs.is_symmetric(metadata.key_spec):
        raise UnsupportedOperationError(
            f"key {metadata.key_id} is a {keyspecs.spec_name(metadata.key_spec)} key: only "
            "symmetric encryption keys rotate (as in AWS KMS); to replace it, create a new "
            "key and move its users to it"
        )
    current = int(metadata.current_backing_version)
    if current >= MAX_BACKING_VERSIONS:
        raise FailedPreconditionError(
            f"key {metadata.key_id} has {current} backing key versions, the most a key may "
            "hold; create a new key and re-encrypt to it"
        )
    backing_keys[current + 1] = crypto.new_aes_key()
    metadata.current_backing_version = current + 1
    if automatic and metadata.rotation.enabled:
        metadata.rotation.next_rotation_at = now + metadata.rotation.period_days * DAY_SECONDS


def rotate(metadata: keys_pb2.KeyMetadata, backing_keys: dict[int, bytes], now: int) -> bool:
    """RotateKey: a new backing key version, on demand (a `KeyChange`; it always changes)."""
    rotate_backing_key(metadata, backing_keys, now)
    return True


def rotate_automatically(
    current: keys_pb2.KeyMetadata, backing_keys: Mapping[int, bytes], now: int
) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
    """The key after the upkeep's automatic rotation (once `rotation_due`), on copies: a new
    backing version, the next rotation one period on, `metadata_version` + 1."""
    metadata, keys = _copy(current, backing_keys)
    rotate_backing_key(metadata, keys, now, automatic=True)
    metadata.metadata_version = current.metadata_version + 1
    return metadata, keys


def put_policy(
    metadata: keys_pb2.KeyMetadata,
    new_policy: keys_pb2.KeyPolicy | None,
    *,
    domain_id: str,
    limits: Limits = DEFAULT_LIMITS,
) -> bool:
    """PutKeyPolicy: replace the policy with `new_policy` (None: the caller gave no grant,
    refused), validated; False when it is the policy already."""
    if new_policy is None:
        raise InvalidInputError(
            "policy is empty: give at least one grant, and KEY_OPERATION_ADMIN to "
            "at least one principal"
        )
    policy.validate_policy(new_policy, domain_id=domain_id, limits=limits)
    access.validate_policy_conditions(new_policy, limits)
    if metadata.policy == new_policy:
        return False
    metadata.policy.CopyFrom(new_policy)
    return True


def _pending_deletion_message(metadata: keys_pb2.KeyMetadata, what: str) -> str:
    return (
        f"key {metadata.key_id} is pending deletion (deletion on "
        f"{iso_date(metadata.deletion_at)}); {what}"
    )


def set_state(metadata: keys_pb2.KeyMetadata, target: keys_pb2.KeyState) -> bool:
    """EnableKey and DisableKey: flip a key between ENABLED and DISABLED (False when it is in
    `target` already); a key pending deletion must be cancelled first."""
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(
            _pending_deletion_message(metadata, "cancel the deletion first")
        )
    if metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT:
        raise FailedPreconditionError(
            f"key {metadata.key_id} is pending import: import its material first"
        )
    if metadata.state == target:
        return False
    metadata.state = target
    return True


def schedule_deletion(metadata: keys_pb2.KeyMetadata, days: int, now: int) -> bool:
    """ScheduleKeyDeletion: PENDING_DELETION, to be deleted `days` (7 to 30) from `now`."""
    if not MIN_DELETION_WINDOW_DAYS <= days <= MAX_DELETION_WINDOW_DAYS:
        raise InvalidInputError(
            f"pending_window_days must be between {MIN_DELETION_WINDOW_DAYS} and "
            f"{MAX_DELETION_WINDOW_DAYS}, not {days}"
        )
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(
            _pending_deletion_message(metadata, "its deletion is scheduled already")
        )
    metadata.state = keys_pb2.KEY_STATE_PENDING_DELETION
    metadata.deletion_at = now + days * DAY_SECONDS
    return True


def cancel_deletion(metadata: keys_pb2.KeyMetadata) -> bool:
    """CancelKeyDeletion: PENDING_DELETION -> DISABLED (as KMS): enable it to use it again;
    a key without material (its import deleted or never made) -> PENDING_IMPORT."""
    if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(f"key {metadata.key_id} is not pending deletion")
    metadata.state = (
        keys_pb2.KEY_STATE_DISABLED
        if metadata.current_backing_version
        else keys_pb2.KEY_STATE_PENDING_IMPORT
    )
    metadata.deletion_at = 0
    return True


# --- upkeep --------------------------------------------------------------------------------


def deletion_due(metadata: keys_pb2.KeyMetadata, now: int) -> bool:
    """Whether a verified key pending deletion has reached its deletion date."""
    return metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION and metadata.deletion_at <= now


def rotation_due(metadata: keys_pb2.KeyMetadata, now: int) -> bool:
    """Whether an enabled key with automatic rotation has reached its next rotation date."""
    return (
        metadata.state == keys_pb2.KEY_STATE_ENABLED
        and metadata.rotation.enabled
        and 0 < metadata.rotation.next_rotation_at <= now
    )


def needs_upkeep(
    record: keys_pb2.KeyRecord, metadata: keys_pb2.KeyMetadata, generation: int, now: int
) -> bool:
    """Whether a record (not verified: this only decides whether to look closer, and to take
    over) needs upkeep: a token under an older generation, a due deletion or rotation."""
    if any(t.domain_key_generation < generation for t in record.tokens):
        return True
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        return 0 < metadata.deletion_at <= now
    return rotation_due(metadata, now) or keyimport.material_expired(metadata, now)


@dataclass(frozen=True)
class TransitionTarget:
    """What a domain change would strand: hosts it removes and generations it retires."""

    removed_hosts: frozenset[str] = frozenset()
    retired_generations: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.removed_hosts or self.retired_generations)

    def strands(self, record: keys_pb2.KeyRecord) -> bool:
        """Whether `record` (unverified) would be unreadable after the change."""
        return record.signer_host_id in self.removed_hosts or any(
            t.domain_key_generation in self.retired_generations for t in record.tokens
        )
