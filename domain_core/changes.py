"""Builders for the changes a proposal carries (`hsmdomain.v1.Change`).

Pure functions: each returns one `Change` message and validates what it can without the
current domain state (formats, ranges); whether a change applies to the domain (no duplicate,
a reachable quorum, ...) is decided by `transition` when the proposal is checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from domain_core.errors import InvalidInputError
from domain_core.model import (
    CHANGE_TYPE_NAMES,
    CHANGE_TYPES_BY_NAME,
    HOST_ID_PATTERN,
    OPERATOR_ID_PATTERN,
    default_settings,
)
from domain_core.recovery_shares import (
    RecoveryAlgorithm,
    enrollment_signing_input,
    recipient_public_key,
)
from domain_core.signers import Signer
from domain_proto import domain_pb2

_RECOVERY_ALGORITHMS = {
    RecoveryAlgorithm.X25519: domain_pb2.RECOVERY_ALGORITHM_X25519,
    RecoveryAlgorithm.P256: domain_pb2.RECOVERY_ALGORITHM_P256,
}

__all__ = [
    "add_host",
    "add_operator",
    "recover",
    "remove_host",
    "remove_operator",
    "rotate_domain_key",
    "set_quorum",
    "set_recovery_key",
    "set_settings",
]


def add_host(enrollment: bytes) -> domain_pb2.Change:
    """Trust a new host: the change carries its enrollment, the exact bytes the host made
    (`enrollment.make_enrollment`); every verifier checks it before the change counts."""
    if not isinstance(enrollment, bytes):
        raise TypeError("add_host takes the enrollment's bytes (a serialized HostEnrollment)")
    return domain_pb2.Change(add_host=domain_pb2.AddHost(enrollment=enrollment))


def remove_host(host_id: str) -> domain_pb2.Change:
    """Stop trusting a host; the transition also rotates the domain key."""
    if not HOST_ID_PATTERN.match(host_id):
        raise InvalidInputError(f"{host_id[:70]!r} is not a host id")
    return domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id=host_id))


def add_operator(operator: domain_pb2.Operator) -> domain_pb2.Change:
    """Add an operator (make the record with `model.make_operator`)."""
    if not isinstance(operator, domain_pb2.Operator):
        raise TypeError("operator must be an hsmdomain.v1.Operator")
    return domain_pb2.Change(add_operator=domain_pb2.AddOperator(operator=operator))


def remove_operator(operator_id: str) -> domain_pb2.Change:
    """Remove an operator by id (64 hex characters)."""
    if not OPERATOR_ID_PATTERN.match(operator_id):
        raise InvalidInputError(f"{operator_id[:70]!r} is not an operator id (64 hex characters)")
    return domain_pb2.Change(remove_operator=domain_pb2.RemoveOperator(operator_id=operator_id))


def set_quorum(
    threshold: int, change_type: int | str | None = None, *, recovery: bool = False
) -> domain_pb2.Change:
    """Set the default threshold, or (with `change_type`) the threshold of one change type,
    or (with `recovery`) the recovery threshold M (0 stops recovery packages).

    `change_type` is a ChangeType value or its name ("add-host", ...); a threshold of 0 with
    a change type removes that type's own threshold.
    """
    if recovery:
        if change_type is not None:
            raise InvalidInputError("the recovery threshold belongs to no change type")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise InvalidInputError("a threshold is a whole number of operators")
        return domain_pb2.Change(
            set_quorum=domain_pb2.SetQuorum(threshold=threshold, recovery=True)
        )
    if isinstance(change_type, str):
        if change_type not in CHANGE_TYPES_BY_NAME:
            raise InvalidInputError(
                f"unknown change type {change_type[:40]!r}; use one of "
                f"{', '.join(sorted(CHANGE_TYPES_BY_NAME))}"
            )
        kind = CHANGE_TYPES_BY_NAME[change_type]
    elif change_type is None:
        kind = domain_pb2.CHANGE_TYPE_UNSPECIFIED
    elif change_type in CHANGE_TYPE_NAMES:
        kind = change_type
    else:
        raise InvalidInputError(f"unknown change type {change_type}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise InvalidInputError("a threshold is a whole number of operators")
    if threshold == 0 and kind == domain_pb2.CHANGE_TYPE_UNSPECIFIED:
        raise InvalidInputError("the default threshold must be at least 1")
    return domain_pb2.Change(
        set_quorum=domain_pb2.SetQuorum(
            threshold=threshold, change_type=cast(domain_pb2.ChangeType, kind)
        )
    )


def set_settings(
    *,
    base: domain_pb2.DomainSettings | None = None,
    key_rotation_interval_seconds: int | None = None,
    key_generations_retained: int | None = None,
    max_proposal_lifetime_seconds: int | None = None,
) -> domain_pb2.Change:
    """Replace the domain settings; unnamed values are kept from `base` (the current ones).

    Pass the current manifest's settings as `base`: they carry the domain CA certificate the
    genesis pinned, which a set-settings must keep (the transition refuses one that drops or
    replaces it). Without `base` the defaults (`model.default_settings`) fill the unnamed values
    and no CA.
    """
    settings = domain_pb2.DomainSettings()
    settings.CopyFrom(base if base is not None else default_settings())
    if key_rotation_interval_seconds is not None:
        settings.key_rotation_interval_seconds = key_rotation_interval_seconds
    if key_generations_retained is not None:
        settings.key_generations_retained = key_generations_retained
    if max_proposal_lifetime_seconds is not None:
        settings.max_proposal_lifetime_seconds = max_proposal_lifetime_seconds
    return domain_pb2.Change(set_settings=domain_pb2.SetSettings(settings=settings))


def set_recovery_key(
    signer: Signer,
    *,
    domain_id: str,
    algorithm: RecoveryAlgorithm,
    public_key: bytes,
) -> domain_pb2.Change:
    """Enroll `public_key` as the recovery key of the operator whose signing key `signer`
    holds (their signature over the enrollment input proves it is theirs to enroll)."""
    recipient_public_key(algorithm, public_key)  # well formed, else InvalidInputError
    operator_id = signer.public_key.key_id
    key = domain_pb2.RecoveryKey(
        algorithm=_RECOVERY_ALGORITHMS[algorithm], public_key=public_key
    ).SerializeToString(deterministic=True)
    signature = signer.sign(enrollment_signing_input(domain_id, operator_id, key))
    return domain_pb2.Change(
        set_recovery_key=domain_pb2.SetRecoveryKey(
            operator_id=operator_id, recovery_key=key, signature=signature
        )
    )


def recover(
    enrollments: Sequence[bytes], *, session_host_id: str, session_public_key: bytes
) -> domain_pb2.Change:
    """Recover a lost domain: add these new hosts (their serialized enrollments); the session
    host among them rebuilds the domain keys from the shares sealed to `session_public_key`."""
    return domain_pb2.Change(
        recover=domain_pb2.Recover(
            enrollments=list(enrollments),
            session_host_id=session_host_id,
            session_public_key=session_public_key,
        )
    )


def rotate_domain_key() -> domain_pb2.Change:
    """Rotate the domain key now (before the scheduled rotation is due)."""
    return domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey())
