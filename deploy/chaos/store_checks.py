"""The invariants a chaos run on a domain with coordinator replicas checks against its store.

Pure functions over the history and what the store held at the end (`StoreObservations`: a
backup of the store taken after the run settled, verified from the pinned genesis, read by
`deploy.chaos.final`). No I/O, so each is unit-tested with histories and stores that break it.

9. `changes-durable`: every domain change the workload saw APPLIED is in the store's chain at
   its version, and the store holds its proposal as APPLIED at that version;
10. `key-records-durable`: every key whose CreateKey or RotateKey was acknowledged is a live
   record in the store, with at least the acknowledged metadata version and backing version
   (and, for a CreateKey, made under the acknowledged idempotency key);
11. `applied-once`: no change applied twice: each proposal id is in at most one state of the
   store's chain, every acknowledgement of one CreateKey idempotency key names one key, and
   the store holds at most one key made under each idempotency key;
12. `leader-kill-changes-complete`: every quorum change submitted while the leader replica was
   killed (started between the kill of the replica that led and its restart, or under way
   when it was killed) completed: APPLIED, after retries.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from deploy.chaos._verdicts import (
    CONTROL_OPS,
    ChainEntry,
    InvariantResult,
    completions,
    verdict,
    where,
)

__all__ = [
    "CONTROL_OPS",
    "StoreObservations",
    "StoredKey",
    "StoredProposal",
    "check_applied_once",
    "check_changes_durable",
    "check_key_records_durable",
    "check_leader_kill_changes",
    "check_store",
    "leader_faults",
    "leader_kill_windows",
]

_KEY_OPS: Final = frozenset({"create_key", "rotate_key"})


@dataclass(frozen=True)
class StoredProposal:
    """A proposal as the store keeps it: its state ("applied", "pending", ...) and, once
    applied, the version of the state that applied it."""

    state: str
    applied_version: int = 0


@dataclass(frozen=True)
class StoredKey:
    """A key record as the store keeps it (from its signed metadata)."""

    description: str
    metadata_version: int
    backing_version: int
    deleted: bool = False
    idempotency_key: str = ""  # what its description says it was made under ("" if nothing)


@dataclass
class StoreObservations:
    """What the store held once the run settled (every state verified from genesis)."""

    chain: Sequence[ChainEntry] = ()
    proposals: Mapping[str, StoredProposal] = field(default_factory=dict)  # by id (hex)
    keys: Mapping[str, StoredKey] = field(default_factory=dict)  # live and deleted, by id
    error: str = ""  # why the store could not be read or did not verify


def _acknowledged(
    events: Sequence[Mapping[str, Any]], ops: frozenset[str]
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    return [(i, d) for i, d in completions(events) if d["phase"] == "ok" and i["op"] in ops]


# --- 9. acknowledged domain changes are in the store -----------------------------------------


def check_changes_durable(
    events: Sequence[Mapping[str, Any]], store: StoreObservations
) -> InvariantResult:
    """Every APPLIED change is in the store's chain at its version, its proposal APPLIED."""
    name, description = (
        "changes-durable",
        "every acknowledged domain change is in the store's chain at its version, its "
        "proposal stored as applied there",
    )
    violations: list[str] = [f"the store was not read: {store.error}"] if store.error else []
    by_version = {entry.version: entry for entry in store.chain}
    acked = _acknowledged(events, CONTROL_OPS)
    for invoke, done in acked:
        version = int(done["result"].get("version", 0))
        proposal = str(done["result"].get("proposal_id", ""))
        entry = by_version.get(version)
        stored = store.proposals.get(proposal)
        if entry is None:
            head = max(by_version, default=0)
            violations.append(
                f"{where(invoke)}: applied as version {version}, but the store's chain ends "
                f"at version {head}"
            )
        elif entry.proposal_id != proposal:
            violations.append(
                f"{where(invoke)}: proposal {proposal[:16]}... applied as version {version}, "
                f"but the store has proposal {entry.proposal_id[:16] or '-'} there"
            )
        elif stored is None:
            violations.append(f"{where(invoke)}: the store no longer holds proposal {proposal}")
        elif stored.state != "applied" or stored.applied_version != version:
            violations.append(
                f"{where(invoke)}: the store holds proposal {proposal[:16]}... as "
                f"{stored.state} (version {stored.applied_version}), acknowledged as applied "
                f"at version {version}"
            )
    return verdict(name, description, len(acked), violations)


# --- 10. acknowledged key records are in the store -------------------------------------------


def _key_violation(
    invoke: Mapping[str, Any], done: Mapping[str, Any], stored: StoredKey | None
) -> str:
    """Why the store's record of an acknowledged key breaks the invariant ("" if it holds)."""
    result = done["result"]
    key_id = str(result.get("key_id", ""))
    if stored is None:
        return f"{where(invoke)}: key {key_id} is not in the store"
    if stored.deleted:
        return f"{where(invoke)}: key {key_id} is deleted in the store"
    for field_name, have in (
        ("metadata_version", stored.metadata_version),
        ("backing_version", stored.backing_version),
    ):
        want = int(result.get(field_name, 0))
        if have < want:
            return (
                f"{where(invoke)}: key {key_id} was acknowledged with {field_name} {want}, "
                f"the store has {have}"
            )
    wanted_key = str(invoke["args"].get("idempotency_key", ""))
    if wanted_key and stored.idempotency_key != wanted_key:
        return (
            f"{where(invoke)}: key {key_id} was acknowledged for idempotency key "
            f"{wanted_key!r}, the store's record says {stored.idempotency_key or 'none'!r}"
        )
    return ""


def check_key_records_durable(
    events: Sequence[Mapping[str, Any]], store: StoreObservations
) -> InvariantResult:
    """Every acknowledged CreateKey and RotateKey is in the store with at least its metadata."""
    name, description = (
        "key-records-durable",
        "every key whose CreateKey or RotateKey was acknowledged is in the store with at least "
        "that metadata",
    )
    violations: list[str] = [f"the store was not read: {store.error}"] if store.error else []
    acked = _acknowledged(events, _KEY_OPS)
    for invoke, done in acked:
        found = _key_violation(invoke, done, store.keys.get(str(done["result"].get("key_id"))))
        if found:
            violations.append(found)
    return verdict(name, description, len(acked), violations)


# --- 11. nothing applied twice ----------------------------------------------------------------


def check_applied_once(
    events: Sequence[Mapping[str, Any]], store: StoreObservations
) -> InvariantResult:
    """Each proposal in at most one state; each CreateKey idempotency key names one key."""
    name, description = (
        "applied-once",
        "no change applied twice: each proposal in at most one state of the store's chain, "
        "each CreateKey idempotency key one key",
    )
    violations: list[str] = [f"the store was not read: {store.error}"] if store.error else []
    versions: dict[str, list[int]] = defaultdict(list)
    for entry in store.chain:
        if entry.proposal_id:
            versions[entry.proposal_id].append(entry.version)
    for proposal, where_applied in versions.items():
        if len(where_applied) > 1:
            shown = ", ".join(map(str, where_applied))
            violations.append(f"proposal {proposal[:16]}... is in the states {shown}")
    acked: dict[str, set[str]] = defaultdict(set)
    for invoke, done in _acknowledged(events, frozenset({"create_key"})):
        key = str(invoke["args"].get("idempotency_key", ""))
        if key:
            acked[key].add(str(done["result"].get("key_id", "")))
    stored: dict[str, list[str]] = defaultdict(list)
    for key_id, record in sorted(store.keys.items()):
        if record.idempotency_key:
            stored[record.idempotency_key].append(key_id)
    for key, named in sorted(acked.items()):
        if len(named) > 1:
            violations.append(
                f"CreateKey with idempotency key {key!r} was acknowledged with keys "
                f"{', '.join(sorted(named))}"
            )
    for key, key_ids in sorted(stored.items()):
        if len(key_ids) > 1:
            violations.append(
                f"the store holds {len(key_ids)} keys made under idempotency key {key!r}: "
                f"{', '.join(key_ids)}"
            )
    checked = len(versions) + len(set(acked) | set(stored))
    return verdict(name, description, checked, violations)


# --- 12. changes submitted during a leader kill complete --------------------------------------


def leader_kill_windows(events: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, float]]:
    """(replica, from, to) of every kill of the replica that led: from the kill until the
    replica's restart (the end of the history if it was not restarted)."""
    opened: dict[str, float] = {}
    windows: list[tuple[str, float, float]] = []
    end = max((float(e["t"]) for e in events), default=0.0)
    for event in events:
        if event.get("phase") != "info" or event.get("process") != "nemesis":
            continue
        target = str(event["args"].get("target", ""))
        if event["op"] == "kill-replica" and event["args"].get("leader") is True:
            opened[target] = float(event["t"])
        elif event["op"] == "restart-replica" and target in opened:
            windows.append((target, opened.pop(target), float(event["t"])))
    windows.extend((target, began, end) for target, began in opened.items())
    return sorted(windows, key=lambda w: w[1])


def check_leader_kill_changes(events: Sequence[Mapping[str, Any]]) -> InvariantResult:
    """Every quorum change submitted (or under way) while the leader was killed was APPLIED."""
    name, description = (
        "leader-kill-changes-complete",
        "every quorum change submitted while the leader replica was killed completed after retries",
    )
    windows = leader_kill_windows(events)
    outcomes = {int(i["id"]): (i, d) for i, d in completions(events)}
    violations: list[str] = []
    checked = 0
    for event in events:
        if event.get("phase") != "invoke" or event["op"] not in CONTROL_OPS:
            continue
        began = float(event["t"])
        pair = outcomes.get(int(event["id"]))
        ended = float(pair[1]["t"]) if pair is not None else float("inf")
        window = next((w for w in windows if began <= w[2] and ended >= w[1]), None)
        if window is None:
            continue
        checked += 1
        during = f"during the kill of the leader {window[0]} at t={window[1]:.3f} s"
        if pair is None:
            violations.append(f"{where(event)} {during}: it never completed")
        elif pair[1]["phase"] != "ok":
            result = pair[1]["result"]
            violations.append(
                f"{where(event)} {during}: {pair[1]['phase']} after "
                f"{result.get('resent', 0)} resends: {result.get('error', '?')}: "
                f"{str(result.get('detail', ''))[:200]}"
            )
    return verdict(name, description, checked, violations)


def check_store(
    events: Sequence[Mapping[str, Any]], store: StoreObservations
) -> list[InvariantResult]:
    """The invariants of a domain with replicas, in the order of the module docstring."""
    return [
        check_changes_durable(events, store),
        check_key_records_durable(events, store),
        check_applied_once(events, store),
        check_leader_kill_changes(events),
    ]


def leader_faults(events: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """How many replica faults of each kind hit the replica that led."""
    counts: Counter[str] = Counter()
    for event in events:
        if (
            event.get("phase") == "info"
            and event.get("process") == "nemesis"
            and event["args"].get("leader") is True
        ):
            counts[str(event["op"])] += 1
    return counts
