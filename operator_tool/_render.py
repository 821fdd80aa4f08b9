"""What a change does to a domain, as a person reads it: a before/after diff and tables.

Pure functions over manifests (no I/O, no clock: `now` is passed in). The "after" manifest is
always one this operator computed (`transition.apply_changes` on a verified state), never a
description the coordinator sent.

Invariants: a host or operator whose record changes under the same id shows as removed and
added (a changed key is never hidden behind an unchanged id); every line of the text form is
derived from the manifests alone; the JSON form holds the same facts as the text form; every
line a text renderer here returns (`table`, `change_lines`, `diff_lines`) went through
`domain_core.display.escape`, so no text from a message or a server can forge a line or drive
the terminal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from domain_core.display import escape, hex_groups
from domain_core.model import (
    CHANGE_TYPE_NAMES,
    change_type_name,
    change_type_of,
    recovery_key_of,
)
from domain_proto import domain_pb2
from operator_tool._enrollment import added_host_id, added_host_ids, host_key_json, host_key_lines

__all__ = [
    "HostRow",
    "ManifestDiff",
    "OperatorRow",
    "QuorumView",
    "change_json",
    "change_lines",
    "change_short",
    "diff_json",
    "diff_lines",
    "fingerprint",
    "format_duration",
    "iso",
    "manifest_diff",
    "quorum_view",
    "relative",
    "settings_view",
    "table",
]

_RECOVERY_ALGORITHM_NAMES: Final[dict[int, str]] = {
    domain_pb2.RECOVERY_ALGORITHM_X25519: "x25519, a file token",
    domain_pb2.RECOVERY_ALGORITHM_P256: "p256, a PKCS#11 token",
}
_ALGORITHM_NAMES: Final[dict[int, str]] = {
    domain_pb2.SIGNATURE_ALGORITHM_ED25519: "ed25519",
    domain_pb2.SIGNATURE_ALGORITHM_ECDSA_P256: "ecdsa-p256",
}
_SETTINGS_LABELS: Final = (
    ("key_rotation_interval_seconds", "key rotation interval", True),
    ("key_generations_retained", "key generations retained", False),
    ("max_proposal_lifetime_seconds", "longest proposal lifetime", True),
)
SHORT_HEX: Final = 16


# --- small formats -------------------------------------------------------------------------


def fingerprint(hex_id: str, length: int | None = None) -> str:
    """An id in groups of four hex digits, for comparing by eye or by voice."""
    return hex_groups(hex_id if length is None else hex_id[:length])


def iso(timestamp: int) -> str:
    """A unix time as ISO 8601 UTC, e.g. 2026-01-01T12:00:00Z."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: int) -> str:
    """A duration in the largest sensible units: '45 s', '59 min', '2 h 5 min', '7 d'."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days} d" + (f" {hours} h" if hours else "")


def relative(timestamp: int, now: int) -> str:
    """'in 59 min' or '12 s ago'."""
    if timestamp >= now:
        return f"in {format_duration(timestamp - now)}"
    return f"{format_duration(now - timestamp)} ago"


def table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Rows of cells as aligned lines (columns separated by two spaces, no trailing blanks);
    each cell escaped (`display.escape`) before it is measured."""
    if not rows:
        return []
    rows = [[escape(cell) for cell in row] for row in rows]
    widths = [0] * max(len(r) for r in rows)
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


# --- rows of a manifest --------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class HostRow:
    """A trusted host as shown: id, TLS certificate fingerprint, signing key id."""

    host_id: str
    tls_fingerprint: str
    signing_key: str

    @classmethod
    def of(cls, host: domain_pb2.Host) -> HostRow:
        return cls(
            host_id=host.host_id,
            tls_fingerprint=bytes(host.tls_certificate_fingerprint).hex(),
            signing_key=hashlib.sha256(host.signing_public_key).hexdigest(),
        )

    def cells(self) -> list[str]:
        return [
            self.host_id,
            f"tls {self.tls_fingerprint[:SHORT_HEX]}",
            f"key {self.signing_key[:SHORT_HEX]}",
        ]

    def to_json(self) -> dict[str, str]:
        return {
            "host_id": self.host_id,
            "tls_certificate_fingerprint": self.tls_fingerprint,
            "signing_key_sha256": self.signing_key,
        }


@dataclass(frozen=True, order=True)
class OperatorRow:
    """An operator as shown: name, id (SHA-256 of the public key), algorithm."""

    name: str
    operator_id: str
    algorithm: str

    @classmethod
    def of(cls, operator: domain_pb2.Operator) -> OperatorRow:
        return cls(
            name=operator.name,
            operator_id=operator.operator_id,
            algorithm=_ALGORITHM_NAMES.get(operator.algorithm, "unknown"),
        )

    def cells(self) -> list[str]:
        return [self.name, fingerprint(self.operator_id, SHORT_HEX), self.algorithm]

    def to_json(self) -> dict[str, str]:
        return {"operator_id": self.operator_id, "name": self.name, "algorithm": self.algorithm}


@dataclass(frozen=True)
class QuorumView:
    """A quorum policy against a number of operators."""

    threshold: int
    per_change_type: tuple[tuple[str, int], ...]
    operators: int
    recovery: int = 0  # the recovery threshold (0: no recovery package)
    recovery_keys: int = 0  # operators with an enrolled recovery key

    def lines(self) -> list[str]:
        lines = [f"default: {self.threshold} of {self.operators} operators"]
        lines += [
            f"{name}: {value} of {self.operators} operators" for name, value in self.per_change_type
        ]
        if self.recovery:
            lines.append(f"recovery: {self.recovery} of {self.recovery_keys} recovery keys")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "per_change_type": dict(self.per_change_type),
            "operators": self.operators,
            "recovery_threshold": self.recovery,
            "recovery_keys": self.recovery_keys,
        }


def quorum_view(manifest: domain_pb2.Manifest) -> QuorumView:
    """The quorum policy of a manifest with its operator count."""
    return QuorumView(
        threshold=manifest.quorum.threshold,
        per_change_type=tuple(
            (change_type_name(t.change_type), t.threshold)
            for t in sorted(manifest.quorum.change_thresholds, key=lambda t: t.change_type)
        ),
        operators=len(manifest.operators),
        recovery=manifest.quorum.recovery_threshold,
        recovery_keys=sum(1 for o in manifest.operators if o.HasField("recovery_key")),
    )


def recovery_keys_view(manifest: domain_pb2.Manifest) -> dict[str, str]:
    """Each operator's enrolled recovery key as shown: algorithm and SHA-256 fingerprint."""
    return {
        o.operator_id: (
            f"{_RECOVERY_ALGORITHM_NAMES.get(o.recovery_key.algorithm, 'unknown')}, "
            f"{fingerprint(hashlib.sha256(o.recovery_key.public_key).hexdigest(), SHORT_HEX)}"
        )
        for o in manifest.operators
        if o.HasField("recovery_key")
    }


def settings_view(settings: domain_pb2.DomainSettings) -> dict[str, int]:
    """Domain settings by field name."""
    return {name: int(getattr(settings, name)) for name, _, _ in _SETTINGS_LABELS}


def _setting_text(name: str, value: int) -> str:
    for field_name, label, is_duration in _SETTINGS_LABELS:
        if field_name == name:
            return f"{label}: {format_duration(value) if is_duration else value}"
    raise KeyError(name)


# --- the diff ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestDiff:
    """Hosts, operators, quorum, settings and key generation before and after a change."""

    hosts_before: tuple[HostRow, ...]
    hosts_after: tuple[HostRow, ...]
    operators_before: tuple[OperatorRow, ...]
    operators_after: tuple[OperatorRow, ...]
    quorum_before: QuorumView
    quorum_after: QuorumView
    settings_before: Mapping[str, int]
    settings_after: Mapping[str, int]
    generation_before: int
    generation_after: int
    recovery_before: Mapping[str, str] = field(default_factory=dict)
    recovery_after: Mapping[str, str] = field(default_factory=dict)

    @property
    def recovery_changed(self) -> bool:
        return dict(self.recovery_before) != dict(self.recovery_after)

    @property
    def hosts_added(self) -> tuple[HostRow, ...]:
        return tuple(r for r in self.hosts_after if r not in self.hosts_before)

    @property
    def hosts_removed(self) -> tuple[HostRow, ...]:
        return tuple(r for r in self.hosts_before if r not in self.hosts_after)

    @property
    def operators_added(self) -> tuple[OperatorRow, ...]:
        return tuple(r for r in self.operators_after if r not in self.operators_before)

    @property
    def operators_removed(self) -> tuple[OperatorRow, ...]:
        return tuple(r for r in self.operators_before if r not in self.operators_after)

    @property
    def quorum_changed(self) -> bool:
        return self.quorum_before != self.quorum_after

    @property
    def settings_changed(self) -> bool:
        return dict(self.settings_before) != dict(self.settings_after)

    @property
    def rotated(self) -> bool:
        return self.generation_after != self.generation_before

    @property
    def empty(self) -> bool:
        """True when nothing an operator sees changes."""
        return not (
            self.hosts_added
            or self.hosts_removed
            or self.operators_added
            or self.operators_removed
            or self.quorum_changed
            or self.settings_changed
            or self.rotated
            or self.recovery_changed
        )


def manifest_diff(before: domain_pb2.Manifest, after: domain_pb2.Manifest) -> ManifestDiff:
    """Compare two manifests (the verified base and the one computed from it)."""
    return ManifestDiff(
        hosts_before=tuple(HostRow.of(h) for h in before.hosts),
        hosts_after=tuple(HostRow.of(h) for h in after.hosts),
        operators_before=tuple(OperatorRow.of(o) for o in before.operators),
        operators_after=tuple(OperatorRow.of(o) for o in after.operators),
        quorum_before=quorum_view(before),
        quorum_after=quorum_view(after),
        settings_before=settings_view(before.settings),
        settings_after=settings_view(after.settings),
        generation_before=before.key_generations[-1].generation if before.key_generations else 0,
        generation_after=after.key_generations[-1].generation if after.key_generations else 0,
        recovery_before=recovery_keys_view(before),
        recovery_after=recovery_keys_view(after),
    )


def _count(before: int, after: int) -> str:
    return f"{before} -> {after}" if before != after else f"{before}, unchanged"


def _rows_diff(
    before: Sequence[HostRow] | Sequence[OperatorRow],
    after: Sequence[HostRow] | Sequence[OperatorRow],
) -> list[str]:
    after_set = set(after)
    before_set = set(before)
    marked: list[tuple[str, HostRow | OperatorRow]] = [
        ("-" if row not in after_set else " ", row) for row in before
    ]
    marked += [("+", row) for row in after if row not in before_set]
    aligned = table([row.cells() for _, row in marked])
    return [f"  {marker} {line}" for (marker, _), line in zip(marked, aligned, strict=True)]


def diff_lines(diff: ManifestDiff) -> list[str]:
    """The diff as text: unchanged lines indented, removed lines '-', added lines '+'."""
    changed_hosts = bool(diff.hosts_added or diff.hosts_removed)
    lines = [
        f"hosts: {_count(len(diff.hosts_before), len(diff.hosts_after))}"
        + (
            " (members change)"
            if changed_hosts and len(diff.hosts_before) == len(diff.hosts_after)
            else ""
        )
    ]
    lines += _rows_diff(diff.hosts_before, diff.hosts_after)
    changed_ops = bool(diff.operators_added or diff.operators_removed)
    lines.append(
        f"operators: {_count(len(diff.operators_before), len(diff.operators_after))}"
        + (
            " (members change)"
            if changed_ops and len(diff.operators_before) == len(diff.operators_after)
            else ""
        )
    )
    lines += _rows_diff(diff.operators_before, diff.operators_after)
    if diff.recovery_changed:
        names = {r.operator_id: r.name for r in (*diff.operators_before, *diff.operators_after)}
        lines.append("recovery keys:")
        for operator_id in sorted({*diff.recovery_before, *diff.recovery_after}):
            old_key = diff.recovery_before.get(operator_id)
            new_key = diff.recovery_after.get(operator_id)
            if old_key == new_key:
                continue
            name = names.get(operator_id, operator_id[:SHORT_HEX])
            if old_key is not None:
                lines.append(f"  - {name}: {old_key}")
            if new_key is not None:
                lines.append(f"  + {name}: {new_key}")
    if diff.quorum_changed:
        before, after = diff.quorum_before.lines(), diff.quorum_after.lines()
        lines.append("quorum:")
        lines += [f"  {'-' if line not in after else ' '} {line}" for line in before]
        lines += [f"  + {line}" for line in after if line not in before]
    else:
        lines.append("quorum: unchanged")
        lines += [f"    {line}" for line in diff.quorum_after.lines()]
    if diff.settings_changed:
        lines.append("settings:")
        for name, value in diff.settings_before.items():
            new = diff.settings_after[name]
            if new != value:
                lines.append(f"  - {_setting_text(name, value)}")
                lines.append(f"  + {_setting_text(name, new)}")
    else:
        lines.append("settings: unchanged")
    if diff.rotated:
        lines.append(
            f"domain key: generation {diff.generation_before} -> {diff.generation_after} "
            "(rotated: new key tokens are sealed under the new generation)"
        )
    else:
        lines.append(f"domain key: generation {diff.generation_before}, unchanged")
    return [escape(line) for line in lines]


def diff_json(diff: ManifestDiff) -> dict[str, Any]:
    """The diff as a JSON-ready document (same facts as `diff_lines`)."""
    return {
        "hosts": {
            "before": [r.to_json() for r in diff.hosts_before],
            "after": [r.to_json() for r in diff.hosts_after],
            "added": [r.host_id for r in diff.hosts_added],
            "removed": [r.host_id for r in diff.hosts_removed],
        },
        "operators": {
            "before": [r.to_json() for r in diff.operators_before],
            "after": [r.to_json() for r in diff.operators_after],
            "added": [r.operator_id for r in diff.operators_added],
            "removed": [r.operator_id for r in diff.operators_removed],
        },
        "quorum": {
            "before": diff.quorum_before.to_json(),
            "after": diff.quorum_after.to_json(),
            "changed": diff.quorum_changed,
        },
        "settings": {
            "before": dict(diff.settings_before),
            "after": dict(diff.settings_after),
            "changed": diff.settings_changed,
        },
        "key_generation": {
            "before": diff.generation_before,
            "after": diff.generation_after,
            "rotated": diff.rotated,
        },
        "recovery_keys": {
            "before": dict(diff.recovery_before),
            "after": dict(diff.recovery_after),
            "changed": diff.recovery_changed,
        },
    }


# --- the changes a proposal carries --------------------------------------------------------


def _operator_name(operator_id: str, names: Mapping[str, str]) -> str:
    name = names.get(operator_id)
    short = fingerprint(operator_id, SHORT_HEX)
    return f"{name} ({short})" if name else f"unknown operator {short}"


def _one_change(change: domain_pb2.Change, names: Mapping[str, str]) -> tuple[str, str, str]:
    """(change type, one-line summary, detail line or '') of one change."""
    kind = change_type_of(change)
    name = change_type_name(kind)
    if kind == domain_pb2.CHANGE_TYPE_ADD_HOST:
        host = added_host_id(change)
        return name, f"add-host {host}", ""
    if kind == domain_pb2.CHANGE_TYPE_REMOVE_HOST:
        host_id = change.remove_host.host_id
        return name, f"remove-host {host_id} (the domain key rotates with it)", ""
    if kind == domain_pb2.CHANGE_TYPE_ADD_OPERATOR:
        operator = change.add_operator.operator
        algorithm = _ALGORITHM_NAMES.get(operator.algorithm, "unknown")
        return (
            name,
            f"add-operator {operator.name} ({algorithm})",
            f"fingerprint {fingerprint(operator.operator_id)} (compare it with {operator.name})",
        )
    if kind == domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR:
        operator_id = change.remove_operator.operator_id
        return name, f"remove-operator {_operator_name(operator_id, names)}", ""
    if kind == domain_pb2.CHANGE_TYPE_SET_QUORUM:
        quorum = change.set_quorum
        if quorum.recovery:
            if quorum.threshold == 0:
                return name, "set-quorum: recovery threshold 0 (no recovery package any more)", ""
            return (
                name,
                f"set-quorum: recovery threshold {quorum.threshold} (that many operators' "
                "recovery shares rebuild the domain)",
                "",
            )
        if quorum.change_type == domain_pb2.CHANGE_TYPE_UNSPECIFIED:
            return name, f"set-quorum: default threshold {quorum.threshold}", ""
        target = CHANGE_TYPE_NAMES.get(quorum.change_type, f"type {quorum.change_type}")
        if quorum.threshold == 0:
            return name, f"set-quorum: {target} uses the default threshold again", ""
        return name, f"set-quorum: {target} needs {quorum.threshold}", ""
    if kind == domain_pb2.CHANGE_TYPE_SET_SETTINGS:
        values = settings_view(change.set_settings.settings)
        text = ", ".join(_setting_text(k, v) for k, v in values.items())
        return name, f"set-settings: {text}", ""
    if kind == domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY:
        enrolled = change.set_recovery_key
        key = recovery_key_of(enrolled)
        algorithm = _RECOVERY_ALGORITHM_NAMES.get(key.algorithm, "unknown")
        digest = hashlib.sha256(key.public_key).hexdigest()
        return (
            name,
            f"set-recovery-key for {_operator_name(enrolled.operator_id, names)} ({algorithm})",
            f"recovery key fingerprint {fingerprint(digest)} (compare it with the operator's "
            "`hsm-operator recovery show`)",
        )
    if kind == domain_pb2.CHANGE_TYPE_ROTATE_DOMAIN_KEY:
        return name, "rotate-domain-key now", ""
    if kind == domain_pb2.CHANGE_TYPE_RECOVER:
        recover = change.recover
        session = hashlib.sha256(recover.session_public_key).hexdigest()
        return (
            name,
            f"recover the domain onto new hosts {', '.join(added_host_ids(change))} "
            f"(session host {recover.session_host_id})",
            f"session key fingerprint {fingerprint(session)} (compare it with what "
            "`hsm-domain recover` printed); approving with --recovery-token gives your share",
        )
    return name, f"{name} (a change this tool does not know: do not approve it)", ""


def change_lines(changes: Iterable[domain_pb2.Change], names: Mapping[str, str]) -> list[str]:
    """One line per change, in order, each followed by an indented detail line if it has one;
    `names` maps operator ids to names for removals."""
    lines = []
    for change in changes:
        _, summary, detail = _one_change(change, names)
        lines.append(summary)
        if detail:
            lines.append(f"  {detail}")
        lines += [f"  {line}" for line in host_key_lines(change)]
    return [escape(line) for line in lines]


def change_json(
    changes: Iterable[domain_pb2.Change], names: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The changes as [{"type": "add-operator", "summary": "...", "detail": "..."}]; an
    add-host entry also has "host_keys" (the SHA-256 of each key it names)."""
    result: list[dict[str, Any]] = []
    for change in changes:
        kind, summary, detail = _one_change(change, names)
        entry: dict[str, Any] = {"type": kind, "summary": summary, "detail": detail}
        keys = host_key_json(change)
        if keys is not None:
            entry["host_keys"] = keys
        result.append(entry)
    return result


def _short(change: domain_pb2.Change, names: Mapping[str, str]) -> str:
    kind = change_type_of(change)
    name = change_type_name(kind)
    if kind == domain_pb2.CHANGE_TYPE_ADD_HOST:
        return f"{name} {added_host_id(change)}"
    if kind == domain_pb2.CHANGE_TYPE_REMOVE_HOST:
        return f"{name} {change.remove_host.host_id}"
    if kind == domain_pb2.CHANGE_TYPE_ADD_OPERATOR:
        return f"{name} {change.add_operator.operator.name}"
    if kind == domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR:
        operator_id = change.remove_operator.operator_id
        return f"{name} {names.get(operator_id) or operator_id[:SHORT_HEX]}"
    if kind == domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY:
        operator_id = change.set_recovery_key.operator_id
        return f"{name} {names.get(operator_id) or operator_id[:SHORT_HEX]}"
    if kind == domain_pb2.CHANGE_TYPE_RECOVER:
        return f"{name} {', '.join(added_host_ids(change))}"
    if kind == domain_pb2.CHANGE_TYPE_SET_QUORUM:
        quorum = change.set_quorum
        if quorum.recovery:
            return f"{name} {quorum.threshold} --recovery"
        if quorum.change_type == domain_pb2.CHANGE_TYPE_UNSPECIFIED:
            return f"{name} {quorum.threshold}"
        target = CHANGE_TYPE_NAMES.get(quorum.change_type, str(quorum.change_type))
        return f"{name} {quorum.threshold} --for {target}"
    return name


def change_short(changes: Iterable[domain_pb2.Change], names: Mapping[str, str]) -> str:
    """The changes in a few words, for a table cell: 'add-operator dave, set-quorum 3'."""
    return ", ".join(_short(change, names) for change in changes)
