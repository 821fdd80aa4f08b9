"""The records inside a domain state and a proposal: ids, hosts, operators, enrollments,
settings and changes, each parsed or checked on its own.

Invariants: ids match their patterns in full (not even a trailing newline passes); a host
record, an enrollment or an operator is structurally valid for its domain before anything
uses it; free text is printable (`domain_core.display.printable`).
"""

from __future__ import annotations

import re
from typing import TypeVar

from google.protobuf.message import DecodeError

from domain_core import display
from domain_core.errors import InvalidInputError, LimitExceededError, MalformedMessageError
from domain_core.limits import DEFAULT_LIMITS, MAX_ENROLLMENT_BYTES, MAX_SIGNATURE_BYTES, Limits
from domain_core.recovery_shares import check_recovery_key
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_proto import domain_pb2

ChangeType = domain_pb2.ChangeType
_M = TypeVar(
    "_M",
    domain_pb2.Manifest,
    domain_pb2.Proposal,
    domain_pb2.SealedSecrets,
    domain_pb2.Host,
    domain_pb2.RecoverySession,
)
_E = TypeVar("_E", domain_pb2.HostEnrollment, domain_pb2.Host, domain_pb2.RecoveryKey)

RECOVERY_SESSION_KEY_BYTES = 32  # X25519
# `\Z`, not `$`: `$` also matches before a trailing newline, which would let "hsa-1\n" pass.
HOST_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
DOMAIN_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?\Z")
OPERATOR_ID_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
NONCE_BYTES = 16

DEFAULT_ROTATION_INTERVAL_SECONDS = 24 * 3600
DEFAULT_GENERATIONS_RETAINED = 7
DEFAULT_MAX_PROPOSAL_LIFETIME_SECONDS = 7 * 24 * 3600

CHANGE_TYPE_NAMES: dict[int, str] = {
    domain_pb2.CHANGE_TYPE_ADD_HOST: "add-host",
    domain_pb2.CHANGE_TYPE_REMOVE_HOST: "remove-host",
    domain_pb2.CHANGE_TYPE_ADD_OPERATOR: "add-operator",
    domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR: "remove-operator",
    domain_pb2.CHANGE_TYPE_SET_QUORUM: "set-quorum",
    domain_pb2.CHANGE_TYPE_SET_SETTINGS: "set-settings",
    domain_pb2.CHANGE_TYPE_ROTATE_DOMAIN_KEY: "rotate-domain-key",
    domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY: "set-recovery-key",
    domain_pb2.CHANGE_TYPE_RECOVER: "recover",
}
CHANGE_TYPES_BY_NAME: dict[str, int] = {name: value for value, name in CHANGE_TYPE_NAMES.items()}

_ONEOF_TO_TYPE: dict[str, int] = {
    "add_host": domain_pb2.CHANGE_TYPE_ADD_HOST,
    "remove_host": domain_pb2.CHANGE_TYPE_REMOVE_HOST,
    "add_operator": domain_pb2.CHANGE_TYPE_ADD_OPERATOR,
    "remove_operator": domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR,
    "set_quorum": domain_pb2.CHANGE_TYPE_SET_QUORUM,
    "set_settings": domain_pb2.CHANGE_TYPE_SET_SETTINGS,
    "rotate_domain_key": domain_pb2.CHANGE_TYPE_ROTATE_DOMAIN_KEY,
    "set_recovery_key": domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY,
    "recover": domain_pb2.CHANGE_TYPE_RECOVER,
}

_ALGORITHMS: dict[domain_pb2.SignatureAlgorithm, SignatureAlgorithm] = {
    domain_pb2.SIGNATURE_ALGORITHM_ED25519: SignatureAlgorithm.ED25519,
    domain_pb2.SIGNATURE_ALGORITHM_ECDSA_P256: SignatureAlgorithm.ECDSA_P256,
}
_ALGORITHM_VALUES: dict[SignatureAlgorithm, domain_pb2.SignatureAlgorithm] = {
    v: k for k, v in _ALGORITHMS.items()
}


def change_type_of(change: domain_pb2.Change) -> int:
    """The ChangeType of one change; MalformedMessageError if none is set."""
    which = change.WhichOneof("change")
    if which is None:
        raise MalformedMessageError("a change in the proposal has no type set")
    return _ONEOF_TO_TYPE[which]


def recovery_key_of(change: domain_pb2.SetRecoveryKey) -> domain_pb2.RecoveryKey:
    """The recovery key a set-recovery-key change enrolls (MalformedMessageError unless its
    bytes are the canonical encoding of a RecoveryKey, with no unknown field)."""
    return _parse_canonical(domain_pb2.RecoveryKey, change.recovery_key, "set-recovery-key's key")


def change_type_name(change_type: int) -> str:
    """Human name of a change type, e.g. 'add-host'."""
    return CHANGE_TYPE_NAMES.get(change_type, f"unknown-{change_type}")


def algorithm_to_proto(algorithm: SignatureAlgorithm) -> domain_pb2.SignatureAlgorithm:
    """Protocol enum value of a signature algorithm."""
    return _ALGORITHM_VALUES[algorithm]


def _parse(message_type: type[_M], raw: bytes, what: str, limits: Limits) -> _M:
    if not isinstance(raw, bytes):
        raise TypeError(f"{what} must be bytes")
    if len(raw) > limits.max_message_bytes:
        raise LimitExceededError(
            f"{what} is {len(raw)} bytes, above the limit of {limits.max_message_bytes}"
        )
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        raise MalformedMessageError(
            f"{what} does not parse as hsmdomain.v1.{message_type.__name__}"
        ) from None
    return message


def parse_canonical(message_type: type[_M], raw: bytes, what: str, max_bytes: int) -> _M:
    """Parse `raw` only if it is the one canonical encoding of its message.

    Refused (MalformedMessageError, LimitExceededError) unless: at most `max_bytes`; it parses;
    it holds no field this program does not know, at any depth (they would be signed without
    being shown); and the deterministic serialization of what parsed is byte for byte `raw`
    (fields in field-number order, no default value written out, minimal varints, no repeated
    or split field). Proposers serialize with `SerializeToString(deterministic=True)`.
    """
    if not isinstance(raw, bytes):
        raise TypeError(f"{what} must be bytes")
    if len(raw) > max_bytes:
        raise LimitExceededError(f"{what} is {len(raw)} bytes, above the limit of {max_bytes}")
    message = _parse(message_type, raw, what, DEFAULT_LIMITS)
    kept = message.SerializeToString(deterministic=True)
    message.DiscardUnknownFields()  # recursive: every nested message too
    known = message.SerializeToString(deterministic=True)
    if known != kept:
        raise MalformedMessageError(
            f"{what} carries fields unknown to hsmdomain.v1.{message_type.__name__}: it is "
            "refused, as nobody could review them; build it with this version of the tools"
        )
    if known != raw:
        raise MalformedMessageError(
            f"{what} is not in canonical form (fields out of order, a default value written "
            "out, or another encoding of the same message): serialize it deterministically"
        )
    return message


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedMessageError(message)


def validate_domain_id(domain_id: str) -> None:
    """Domain ids are DNS-label-like: lowercase letters, digits, '.', '-', at most 63."""
    _require(
        bool(DOMAIN_ID_PATTERN.match(domain_id)),
        f"domain id {domain_id[:80]!r} is not valid: use 1-63 of [a-z0-9.-]",
    )


def host_spiffe_id(domain_id: str, host_id: str) -> str:
    """The SPIFFE-style URI a host's TLS certificate must carry."""
    return f"spiffe://{domain_id}/hsa/{host_id}"


def validate_host(host: domain_pb2.Host, domain_id: str) -> None:
    """Structural checks of a host record: id format, key formats, SPIFFE id."""
    _require(
        bool(HOST_ID_PATTERN.match(host.host_id)),
        f"host id {host.host_id[:80]!r} is not valid: use 1-63 of [a-z0-9-]",
    )
    try:
        PublicKey(SignatureAlgorithm.ED25519, host.signing_public_key)
    except MalformedMessageError:
        raise MalformedMessageError(
            f"host {host.host_id}: signing key is not an Ed25519 public key"
        ) from None
    _require(
        len(host.agreement_public_key) == 32,
        f"host {host.host_id}: agreement key must be a raw 32-byte X25519 key",
    )
    _require(
        len(host.tls_certificate_fingerprint) == 32,
        f"host {host.host_id}: TLS fingerprint must be a 32-byte SHA-256",
    )
    expected = host_spiffe_id(domain_id, host.host_id)
    _require(
        host.spiffe_id == expected,
        f"host {host.host_id}: SPIFFE id {host.spiffe_id[:120]!r} should be {expected!r}",
    )


_ADDRESS_HINT = re.compile(r"[A-Za-z0-9.:_\[\]-]{0,255}")


def _parse_canonical(message_type: type[_E], raw: bytes, what: str) -> _E:
    """Parse bytes that must be the deterministic encoding of a message with no unknown field."""
    message = message_type()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        raise MalformedMessageError(f"{what} does not parse") from None
    message.DiscardUnknownFields()
    if message.SerializeToString(deterministic=True) != raw:
        raise MalformedMessageError(
            f"{what} is not canonical (unknown fields or a non-deterministic encoding)"
        )
    return message


def parse_enrollment(
    raw: bytes, domain_id: str
) -> tuple[domain_pb2.HostEnrollment, domain_pb2.Host]:
    """The enrollment and the host record inside it, structurally valid for `domain_id`.

    Structure only: who holds the keys is proven by `enrollment.verify_enrollment`, which
    every verifier runs before an add-host change counts (`transition.apply_changes`).
    """
    if not isinstance(raw, bytes):
        raise TypeError("an enrollment is bytes")
    _require(bool(raw), "add-host carries no enrollment")
    if len(raw) > MAX_ENROLLMENT_BYTES:
        raise LimitExceededError(
            f"an enrollment is at most {MAX_ENROLLMENT_BYTES} bytes, this one is {len(raw)}"
        )
    enrollment = _parse_canonical(domain_pb2.HostEnrollment, raw, "the enrollment")
    host = _parse_canonical(domain_pb2.Host, enrollment.host, "the enrollment's host record")
    validate_host(host, domain_id)
    _require(
        bool(_ADDRESS_HINT.fullmatch(enrollment.address)),
        f"the enrollment of {host.host_id}: the address hint must be at most 255 of "
        "[A-Za-z0-9.:_[]-]",
    )
    return enrollment, host


def added_host(change: domain_pb2.Change, domain_id: str) -> domain_pb2.Host:
    """The host record an add-host change adds (from its enrollment, structurally checked)."""
    return parse_enrollment(change.add_host.enrollment, domain_id)[1]


def recovered_hosts(change: domain_pb2.Change, domain_id: str) -> list[domain_pb2.Host]:
    """The host records a recover change adds (from its enrollments, structurally checked)."""
    return [parse_enrollment(raw, domain_id)[1] for raw in change.recover.enrollments]


def operator_public_key(operator: domain_pb2.Operator) -> PublicKey:
    """The verified public key of an operator record."""
    algorithm = _ALGORITHMS.get(operator.algorithm)
    if algorithm is None:
        raise MalformedMessageError(f"operator {operator.name!r}: unknown signature algorithm")
    try:
        return PublicKey(algorithm, operator.public_key)
    except MalformedMessageError:
        raise MalformedMessageError(
            f"operator {operator.name!r}: public key is not a valid {algorithm.value} key"
        ) from None


def validate_operator(operator: domain_pb2.Operator, limits: Limits = DEFAULT_LIMITS) -> None:
    """Structural checks of an operator record: id = SHA-256 of the key, name, algorithm."""
    _require(
        0 < len(operator.name) <= limits.max_name_chars and display.printable(operator.name),
        f"operator name must be 1-{limits.max_name_chars} printable characters",
    )
    key = operator_public_key(operator)
    _require(
        operator.operator_id == key.key_id,
        f"operator {operator.name!r}: id must be the SHA-256 of its public key ({key.key_id})",
    )
    if operator.HasField("recovery_key"):
        try:
            check_recovery_key(operator.recovery_key)
        except InvalidInputError as error:
            raise MalformedMessageError(f"operator {operator.name!r}: {error}") from None


def make_operator(name: str, public_key: PublicKey) -> domain_pb2.Operator:
    """An operator record for a public key (id = SHA-256 of the key's SPKI DER)."""
    operator = domain_pb2.Operator(
        operator_id=public_key.key_id,
        name=name,
        algorithm=algorithm_to_proto(public_key.algorithm),
        public_key=public_key.spki_der,
    )
    validate_operator(operator)
    return operator


def make_host(
    domain_id: str,
    host_id: str,
    signing_public_key: PublicKey,
    agreement_public_key: bytes,
    tls_certificate_fingerprint: bytes,
) -> domain_pb2.Host:
    """A host record, validated."""
    host = domain_pb2.Host(
        host_id=host_id,
        signing_public_key=signing_public_key.spki_der,
        agreement_public_key=agreement_public_key,
        tls_certificate_fingerprint=tls_certificate_fingerprint,
        spiffe_id=host_spiffe_id(domain_id, host_id),
    )
    validate_host(host, domain_id)
    return host


def default_settings() -> domain_pb2.DomainSettings:
    """The default domain settings: 24 h rotation, 7 generations, 7-day proposals."""
    return domain_pb2.DomainSettings(
        key_rotation_interval_seconds=DEFAULT_ROTATION_INTERVAL_SECONDS,
        key_generations_retained=DEFAULT_GENERATIONS_RETAINED,
        max_proposal_lifetime_seconds=DEFAULT_MAX_PROPOSAL_LIFETIME_SECONDS,
    )


def _validate_change(change: domain_pb2.Change, domain_id: str, limits: Limits) -> None:
    kind = change_type_of(change)
    if kind == domain_pb2.CHANGE_TYPE_ADD_HOST:
        parse_enrollment(change.add_host.enrollment, domain_id)
    elif kind == domain_pb2.CHANGE_TYPE_REMOVE_HOST:
        _require(
            bool(HOST_ID_PATTERN.match(change.remove_host.host_id)),
            "remove-host names no valid host id",
        )
    elif kind == domain_pb2.CHANGE_TYPE_ADD_OPERATOR:
        validate_operator(change.add_operator.operator, limits)
    elif kind == domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR:
        _require(
            bool(OPERATOR_ID_PATTERN.match(change.remove_operator.operator_id)),
            "remove-operator names no valid operator id (64 hex characters)",
        )
    elif kind == domain_pb2.CHANGE_TYPE_SET_QUORUM:
        _require(
            change.set_quorum.change_type in CHANGE_TYPE_NAMES
            or change.set_quorum.change_type == domain_pb2.CHANGE_TYPE_UNSPECIFIED,
            "set-quorum names an unknown change type",
        )
        _require(
            not change.set_quorum.recovery
            or change.set_quorum.change_type == domain_pb2.CHANGE_TYPE_UNSPECIFIED,
            "set-quorum of the recovery threshold names no change type",
        )
        _require(
            change.set_quorum.threshold >= 1
            or change.set_quorum.recovery
            or change.set_quorum.change_type != domain_pb2.CHANGE_TYPE_UNSPECIFIED,
            "set-quorum needs a threshold of at least 1",
        )
    elif kind == domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY:
        enrolled = change.set_recovery_key
        _require(
            bool(OPERATOR_ID_PATTERN.match(enrolled.operator_id)),
            "set-recovery-key names no valid operator id (64 hex characters)",
        )
        key = recovery_key_of(enrolled)
        try:
            check_recovery_key(key)
        except InvalidInputError as error:
            raise MalformedMessageError(f"set-recovery-key: {error}") from None
        _require(
            0 < len(enrolled.signature) <= MAX_SIGNATURE_BYTES,
            "set-recovery-key carries no signature of the operator",
        )
    elif kind == domain_pb2.CHANGE_TYPE_SET_SETTINGS:
        _require(change.set_settings.HasField("settings"), "set-settings carries no settings")
    elif kind == domain_pb2.CHANGE_TYPE_RECOVER:
        recover = change.recover
        _require(
            0 < len(recover.enrollments) <= limits.max_hosts,
            f"recover names 1 to {limits.max_hosts} new hosts",
        )
        ids = [h.host_id for h in recovered_hosts(change, domain_id)]
        _require(len(set(ids)) == len(ids), "recover names a new host twice")
        _require(
            recover.session_host_id in ids,
            "recover's session host must be one of the new hosts it names",
        )
        _require(
            len(recover.session_public_key) == RECOVERY_SESSION_KEY_BYTES,
            f"recover's session key is a raw X25519 key of {RECOVERY_SESSION_KEY_BYTES} bytes",
        )
