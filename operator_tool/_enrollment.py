"""What an approver sees of an add-host or recover change: each new host's key fingerprints,
the request to compare them with the host's operator out of band, and whether its enrollment
verifies.

The enrollment is verified here with `domain_core.enrollment.verify_enrollment` against the
domain CA of the verified base state (never a CA file or the coordinator's word), at the
operator's clock: the same check every HSA runs before the change counts. Every line is built
from hex digits, fixed words and host ids (which proposal parsing restricts to [a-z0-9-]), so
nothing here prints text a proposer chose. Pure: no I/O, time passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.message import DecodeError

from domain_core.display import hex_groups
from domain_core.enrollment import host_key_fingerprints, verify_enrollment
from domain_core.errors import EnrollmentError, HsmDomainError
from domain_core.model import Manifest, Proposal
from domain_proto import domain_pb2

__all__ = [
    "added_host_id",
    "added_host_ids",
    "enrollment_problems",
    "host_key_json",
    "host_key_lines",
    "require_enrollments_verify",
]

_LABEL_WIDTH = max(len(label) for label, _ in host_key_fingerprints(domain_pb2.Host()))


def _groups(digest: bytes) -> str:
    return hex_groups(digest.hex())


def _enrollments(change: domain_pb2.Change) -> list[bytes]:
    """The enrollments an add-host or recover change carries ([] for any other change)."""
    which = change.WhichOneof("change")
    if which == "add_host":
        return [change.add_host.enrollment]
    if which == "recover":
        return list(change.recover.enrollments)
    return []


def _host_in(enrollment: bytes) -> domain_pb2.Host | None:
    """The host record of an enrollment, for display (None if it does not parse)."""
    try:
        parsed = domain_pb2.HostEnrollment.FromString(enrollment)
        return domain_pb2.Host.FromString(parsed.host)
    except DecodeError:
        return None


def _host_of(change: domain_pb2.Change) -> domain_pb2.Host | None:
    """The host record of an add-host change, for display (None if it does not parse)."""
    if change.WhichOneof("change") != "add_host":
        return None
    return _host_in(change.add_host.enrollment)


def added_host_id(change: domain_pb2.Change) -> str:
    """The host id an add-host change names ('?' if its enrollment does not parse)."""
    host = _host_of(change)
    return host.host_id if host is not None else "?"


def added_host_ids(change: domain_pb2.Change) -> list[str]:
    """The host ids an add-host or recover change names ('?' for one that does not parse)."""
    hosts = [_host_in(raw) for raw in _enrollments(change)]
    return [host.host_id if host is not None else "?" for host in hosts]


def host_key_lines(change: domain_pb2.Change) -> list[str]:
    """The fingerprint lines of each host an add-host or recover change adds (SHA-256 of each
    key, in groups of four), then the sentence that asks the approver to compare them; [] for
    any other change."""
    lines: list[str] = []
    enrollments = _enrollments(change)
    for raw in enrollments:
        host = _host_in(raw)
        if host is None:
            return ["an enrollment does not parse: do not approve"]
        if len(enrollments) > 1:
            lines.append(f"{host.host_id}:")
        lines += [
            f"{label.ljust(_LABEL_WIDTH)}  SHA-256 {_groups(digest)}"
            for label, digest in host_key_fingerprints(host)
        ]
    if not enrollments:
        return []
    named = ", ".join(added_host_ids(change))
    where = "`hsm-domain recover`" if change.HasField("recover") else "`hsm-domain add-node`"
    lines.append(
        f"compare these fingerprints with the operator of {named} out of band (in person or "
        f"by phone, as for a new operator) before you approve: the host shows them when it is "
        f"prepared ({where})"
    )
    return lines


def host_key_json(change: domain_pb2.Change) -> dict[str, Any] | list[dict[str, Any]] | None:
    """The fingerprints of an add-host change as JSON (a list of them for a recover change),
    or None for any other change."""
    enrollments = _enrollments(change)
    if not enrollments:
        return None
    found = []
    for raw in enrollments:
        host = _host_in(raw)
        if host is None:
            return None
        found.append(
            {
                "host_id": host.host_id,
                "sha256": {label: digest.hex() for label, digest in host_key_fingerprints(host)},
            }
        )
    return found if change.HasField("recover") else found[0]


def enrollment_problems(
    base: Manifest | None, proposal: Proposal, now: int
) -> tuple[tuple[str, str], ...]:
    """(host id, why) for each new host (add-host, recover) whose enrollment does not verify
    against the
    verified `base` state's domain CA at `now`; empty when every one verifies."""
    changes: Iterable[domain_pb2.Change] = proposal.changes
    problems: list[tuple[str, str]] = []
    for change in changes:
        for raw in _enrollments(change):
            host = _host_in(raw)
            host_id = host.host_id if host is not None else "?"
            if base is None:
                problems.append(
                    (host_id, "the base state is not verified here, so its domain CA is unknown")
                )
                continue
            try:
                verify_enrollment(
                    raw,
                    domain_id=base.domain_id,
                    ca_certificate=base.message.settings.domain_ca_certificate,
                    now=now,
                )
            except HsmDomainError as error:
                problems.append((host_id, error.message))
    return tuple(problems)


def require_enrollments_verify(problems: Iterable[tuple[str, str]]) -> None:
    """Raise EnrollmentError (nothing is signed) if any enrollment of a proposal fails."""
    problems = list(problems)
    if problems:
        reasons = "; ".join(why for _, why in problems)
        raise EnrollmentError(
            f"refusing to sign: an add-host enrollment does not verify ({reasons}); the host "
            "must enroll again (`hsm-domain add-node`) and a new proposal be made"
        )
