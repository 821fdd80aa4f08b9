"""The invariants a chaos run must keep, checked after the faults stop.

Pure functions over the recorded history (`deploy.chaos.history` events) and what was
observed once the domain settled (`FinalObservations`); no I/O, so each invariant is
unit-tested with synthetic histories that break it. Each check returns an `InvariantResult`:
held or broken, how many things it checked, and the first counter-example (in history order)
when broken. The invariants:

1. `ciphertexts-decrypt`: every acknowledged ciphertext (Encrypt, GenerateDataKey) decrypts
   to its plaintext on every node;
2. `decrypts-correct`: every acknowledged Decrypt during the run returned the plaintext that
   was encrypted;
3. `keys-work`: every acknowledged CreateKey's key describes, encrypts and decrypts on every
   node;
4. `versions-in-chain`: every acknowledged (APPLIED) domain change is in the final chain,
   at its version, with its proposal and state hash, and the final chain verifies from the
   pinned genesis;
5. `versions-monotonic`: no node's (nor the coordinator's) version ever went down between
   two samples;
6. `no-forks`: no two different state hashes were seen for one version, across every sample,
   acknowledgement and the final chain;
7. `convergence`: after the faults stopped, every node (and every coordinator replica)
   reached the coordinator's head (version and hash) within the bound;
8. `availability`: of the data-plane operations started while at least one HSA was up and
   reachable, at least the given fraction succeeded.

On a domain with coordinator replicas, `check_all` adds the invariants of `store_checks`
(9 to 12), checked against the store itself.

Plaintexts are compared in constant time and never appear in a counter-example.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from deploy.chaos._verdicts import (
    CONTROL_OPS,
    ChainEntry,
    InvariantResult,
    broken,
    completions,
    held,
    verdict,
    where,
)
from deploy.chaos.store_checks import StoreObservations, check_store

__all__ = [
    "DATA_PLANE_OPS",
    "FAULT_OPS",
    "AvailabilityFigures",
    "ChainEntry",
    "DecryptObservation",
    "FinalObservations",
    "InvariantResult",
    "KeyObservation",
    "availability",
    "check_all",
    "check_availability",
    "check_ciphertexts",
    "check_convergence",
    "check_keys",
    "check_monotonic",
    "check_no_forks",
    "check_online_decrypts",
    "check_versions_in_chain",
    "completions",
    "down_intervals",
]

DATA_PLANE_OPS: Final = frozenset({"encrypt", "decrypt", "generate_data_key"})
CIPHERTEXT_OPS: Final = frozenset({"encrypt", "generate_data_key"})
# Fault events (info, process "nemesis") that make a host unreachable for clients, and the
# event that ends each.
_DOWN_STARTS: Final = {"kill": "restart", "pause": "resume", "cut": "restore"}
FAULT_OPS: Final = frozenset({"kill", "pause", "cut", "kill-coordinator"})


@dataclass(frozen=True)
class DecryptObservation:
    """What one node answered to the final Decrypt of one acknowledged ciphertext."""

    plaintext: bytes | None
    error: str = ""

    def __repr__(self) -> str:
        shown = "<plaintext>" if self.plaintext is not None else "None"
        return f"DecryptObservation({shown}, error={self.error!r})"


@dataclass(frozen=True)
class KeyObservation:
    """Whether one node describes an acknowledged key and round-trips data with it."""

    described: bool
    round_trip: bool
    error: str = ""


@dataclass
class FinalObservations:
    """What the runner observed once the faults stopped and the domain settled."""

    nodes: Sequence[str]
    decrypts: Mapping[int, Mapping[str, DecryptObservation]] = field(default_factory=dict)
    keys: Mapping[str, Mapping[str, KeyObservation]] = field(default_factory=dict)
    chain: Sequence[ChainEntry] = ()
    chain_error: str = ""
    # Seconds from the end of the faults until every node was on the coordinator's head;
    # None if that did not happen within the bound.
    converged_after: float | None = None
    heads: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # node -> (v, hash)
    coordinator_head: tuple[int, str] | None = None
    convergence_detail: str = ""
    # A domain with coordinator replicas: each replica's head at the end, and the store.
    replica_heads: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    store: StoreObservations | None = None


# --- 1. acknowledged ciphertexts decrypt everywhere --------------------------------------------


def check_ciphertexts(
    events: Sequence[Mapping[str, Any]],
    plaintexts: Mapping[int, bytes],
    final: FinalObservations,
) -> InvariantResult:
    """Every acknowledged ciphertext decrypts to its plaintext on every node."""
    name, description = (
        "ciphertexts-decrypt",
        "every acknowledged ciphertext decrypts to its plaintext on every node",
    )
    violations: list[str] = []
    checked = 0
    for invoke, done in completions(events):
        if done["phase"] != "ok" or invoke["op"] not in CIPHERTEXT_OPS:
            continue
        op_id = int(invoke["id"])
        expected = plaintexts.get(op_id)
        if expected is None:
            violations.append(f"{where(invoke)}: its plaintext was not kept for the check")
            continue
        observed = final.decrypts.get(op_id, {})
        for node in final.nodes:
            checked += 1
            seen = observed.get(node)
            if seen is None:
                violations.append(f"{where(invoke)}: not decrypted on {node} at the end")
            elif seen.plaintext is None:
                violations.append(
                    f"{where(invoke)}: {node} refused to decrypt it: {seen.error or '?'}"
                )
            elif not hmac.compare_digest(seen.plaintext, expected):
                violations.append(
                    f"{where(invoke)}: {node} returned a different plaintext "
                    f"({len(seen.plaintext)} bytes, expected {len(expected)})"
                )
    return verdict(name, description, checked, violations)


# --- 2. decrypts during the run were right ----------------------------------------------------


def check_online_decrypts(events: Sequence[Mapping[str, Any]]) -> InvariantResult:
    """Every acknowledged Decrypt returned the plaintext of the ciphertext it was given."""
    name, description = (
        "decrypts-correct",
        "every acknowledged Decrypt during the run returned the encrypted plaintext",
    )
    violations: list[str] = []
    checked = 0
    for invoke, done in completions(events):
        if done["phase"] != "ok" or invoke["op"] != "decrypt":
            continue
        checked += 1
        if done["result"].get("match") is not True:
            source = invoke["args"].get("source_op", "?")
            violations.append(
                f"{where(invoke)}: the plaintext returned for the ciphertext of op {source} "
                "is not the one that was encrypted"
            )
    return verdict(name, description, checked, violations)


# --- 3. acknowledged keys exist and work ------------------------------------------------------


def check_keys(events: Sequence[Mapping[str, Any]], final: FinalObservations) -> InvariantResult:
    """Every acknowledged CreateKey's key describes and round-trips data on every node."""
    name, description = (
        "keys-work",
        "every acknowledged CreateKey's key exists and encrypts/decrypts on every node",
    )
    violations: list[str] = []
    checked = 0
    for invoke, done in completions(events):
        if done["phase"] != "ok" or invoke["op"] != "create_key":
            continue
        key_id = str(done["result"].get("key_id", ""))
        observed = final.keys.get(key_id, {})
        for node in final.nodes:
            checked += 1
            seen = observed.get(node)
            if seen is None:
                violations.append(f"{where(invoke)}: key {key_id} was not checked on {node}")
            elif not seen.described:
                violations.append(
                    f"{where(invoke)}: {node} does not know key {key_id}: {seen.error or '?'}"
                )
            elif not seen.round_trip:
                violations.append(
                    f"{where(invoke)}: key {key_id} does not round-trip data on {node}: "
                    f"{seen.error or '?'}"
                )
    return verdict(name, description, checked, violations)


# --- 4. acknowledged versions are in the final chain ------------------------------------------


def check_versions_in_chain(
    events: Sequence[Mapping[str, Any]], final: FinalObservations
) -> InvariantResult:
    """Every APPLIED change is in the verified final chain at its version, hash and proposal."""
    name, description = (
        "versions-in-chain",
        "every acknowledged domain version is in the final chain, which verifies from genesis",
    )
    violations: list[str] = []
    if final.chain_error:
        violations.append(f"the final chain does not verify: {final.chain_error}")
    by_version = {entry.version: entry for entry in final.chain}
    checked = 0
    for invoke, done in completions(events):
        if done["phase"] != "ok" or invoke["op"] not in CONTROL_OPS:
            continue
        checked += 1
        version = int(done["result"].get("version", 0))
        proposal = str(done["result"].get("proposal_id", ""))
        state_hash = str(done["result"].get("state_hash", ""))
        entry = by_version.get(version)
        if entry is None:
            head = max(by_version, default=0)
            violations.append(
                f"{where(invoke)}: acknowledged as version {version}, but the final chain "
                f"ends at version {head}"
            )
        elif proposal and entry.proposal_id != proposal:
            violations.append(
                f"{where(invoke)}: acknowledged proposal {proposal[:16]}... as version "
                f"{version}, but the final chain has proposal {entry.proposal_id[:16] or '-'} "
                "there"
            )
        elif state_hash and entry.state_hash != state_hash:
            violations.append(
                f"{where(invoke)}: acknowledged version {version} with state hash "
                f"{state_hash[:16]}..., the final chain has {entry.state_hash[:16]}..."
            )
    return verdict(name, description, checked, violations)


# --- 5. and 6. versions never go down; no forks -----------------------------------------------


def _samples(
    events: Iterable[Mapping[str, Any]],
) -> Iterable[tuple[Mapping[str, Any], str, int, str]]:
    """(event, who, version, state hash) of every status sample, in order."""
    for event in events:
        if event.get("phase") == "info" and event.get("op") == "status":
            args = event["args"]
            yield event, str(args["host"]), int(args["version"]), str(args["state_hash"])


def check_monotonic(events: Sequence[Mapping[str, Any]]) -> InvariantResult:
    """No node's (or the coordinator's) sampled version ever went down."""
    name, description = (
        "versions-monotonic",
        "no node's (nor the coordinator's) version ever went down",
    )
    last: dict[str, tuple[int, float]] = {}
    violations: list[str] = []
    checked = 0
    for event, who, version, _ in _samples(events):
        checked += 1
        previous = last.get(who)
        if previous is not None and version < previous[0]:
            violations.append(
                f"{who} was at version {previous[0]} at t={previous[1]:.3f} s and at version "
                f"{version} at t={event['t']:.3f} s"
            )
        if previous is None or version >= previous[0]:
            last[who] = (version, float(event["t"]))
    return verdict(name, description, checked, violations)


def check_no_forks(
    events: Sequence[Mapping[str, Any]], final: FinalObservations
) -> InvariantResult:
    """No two different state hashes were seen for one version, anywhere."""
    name, description = (
        "no-forks",
        "no two different states were seen with one version",
    )
    seen: dict[int, tuple[str, str]] = {}  # version -> (hash, where first seen)
    violations: list[str] = []
    checked = 0

    def see(version: int, state_hash: str, where: str) -> None:
        nonlocal checked
        if not state_hash or version <= 0:
            return
        checked += 1
        first = seen.setdefault(version, (state_hash, where))
        if first[0] != state_hash:
            violations.append(
                f"version {version}: state {first[0][:16]}... ({first[1]}) and state "
                f"{state_hash[:16]}... ({where})"
            )

    for event, who, version, state_hash in _samples(events):
        see(version, state_hash, f"{who} at t={event['t']:.3f} s")
    for invoke, done in completions(events):
        if done["phase"] == "ok" and invoke["op"] in CONTROL_OPS:
            see(
                int(done["result"].get("version", 0)),
                str(done["result"].get("state_hash", "")),
                f"acknowledged by {where(invoke)}",
            )
    for entry in final.chain:
        see(entry.version, entry.state_hash, "the final chain")
    for node, (version, state_hash) in final.heads.items():
        see(version, state_hash, f"{node} at the end")
    return verdict(name, description, checked, violations)


# --- 7. convergence ---------------------------------------------------------------------------


def check_convergence(final: FinalObservations, bound: float) -> InvariantResult:
    """Every node reached the coordinator's head within `bound` seconds after the faults."""
    name, description = (
        "convergence",
        f"all nodes reach the coordinator's version and state hash within {bound:g} s "
        "after the faults stop",
    )
    checked = len(final.nodes)
    violations: list[str] = []
    if final.converged_after is None or final.converged_after > bound:
        detail = final.convergence_detail or "no detail"
        violations.append(f"the nodes did not converge within {bound:g} s: {detail}")
    elif final.coordinator_head is None:
        violations.append("the coordinator's head was not observed at the end")
    else:
        for node in final.nodes:
            head = final.heads.get(node)
            if head != final.coordinator_head:
                shown = f"version {head[0]} ({head[1][:16]}...)" if head else "nothing"
                violations.append(
                    f"{node} ended on {shown}, the coordinator on version "
                    f"{final.coordinator_head[0]} ({final.coordinator_head[1][:16]}...)"
                )
        for replica, head in final.replica_heads.items():
            if head != final.coordinator_head:
                violations.append(
                    f"replica {replica} ended on version {head[0]} ({head[1][:16]}...), the "
                    f"coordinator's head is version {final.coordinator_head[0]}"
                )
        chain_head = final.chain[-1] if final.chain else None
        if (
            chain_head is not None
            and (
                chain_head.version,
                chain_head.state_hash,
            )
            != final.coordinator_head
        ):
            violations.append(
                f"the final chain ends at version {chain_head.version}, the coordinator's "
                f"head is version {final.coordinator_head[0]}"
            )
    return verdict(name, description, checked, violations)


# --- 8. availability --------------------------------------------------------------------------


@dataclass(frozen=True)
class AvailabilityFigures:
    """Data-plane outcomes, split by whether at least one HSA was reachable at the start."""

    attempted: int  # data-plane operations started while >= 1 HSA was reachable
    succeeded: int
    unknown: int
    failed: int
    attempted_all_down: int  # started while no HSA was reachable (not counted)
    reachable_seconds: float  # time with >= 1 HSA reachable

    @property
    def fraction(self) -> float | None:
        """Succeeded / attempted (None when nothing was attempted)."""
        return self.succeeded / self.attempted if self.attempted else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "unknown": self.unknown,
            "failed": self.failed,
            "attempted_while_all_down": self.attempted_all_down,
            "reachable_seconds": round(self.reachable_seconds, 3),
            "fraction": None if self.fraction is None else round(self.fraction, 6),
        }


def down_intervals(
    events: Sequence[Mapping[str, Any]], end: float
) -> dict[str, list[tuple[float, float]]]:
    """Per host, the intervals in which clients could not reach it (killed and not yet
    restarted, paused, or its client link cut), from the nemesis's info events."""
    opened: dict[tuple[str, str], float] = {}
    intervals: dict[str, list[tuple[float, float]]] = {}
    ends = {v: k for k, v in _DOWN_STARTS.items()}
    for event in events:
        if event.get("phase") != "info" or event.get("process") != "nemesis":
            continue
        op = str(event["op"])
        args = event["args"]
        host = str(args.get("target", ""))
        if op == "cut" and args.get("link") != "client":
            continue
        if op == "restore" and args.get("link") != "client":
            continue
        if op in _DOWN_STARTS:
            opened.setdefault((host, op), float(event["t"]))
        elif op in ends:
            began = opened.pop((host, ends[op]), None)
            if began is not None:
                intervals.setdefault(host, []).append((began, float(event["t"])))
    for (host, _), began in opened.items():
        intervals.setdefault(host, []).append((began, end))
    return intervals


def _reachable(
    t: float, nodes: Sequence[str], down: Mapping[str, list[tuple[float, float]]]
) -> bool:
    return any(not any(a <= t < b for a, b in down.get(node, ())) for node in nodes)


def availability(events: Sequence[Mapping[str, Any]], nodes: Sequence[str]) -> AvailabilityFigures:
    """Outcomes of data-plane operations started while at least one HSA was reachable."""
    end = max((float(e["t"]) for e in events), default=0.0)
    down = down_intervals(events, end)
    attempted = succeeded = unknown = failed = all_down = 0
    for invoke, done in completions(events):
        if invoke["op"] not in DATA_PLANE_OPS:
            continue
        if not _reachable(float(invoke["t"]), nodes, down):
            all_down += 1
            continue
        attempted += 1
        if done["phase"] == "ok":
            succeeded += 1
        elif done["phase"] == "unknown":
            unknown += 1
        else:
            failed += 1
    # Time with at least one node reachable: sweep the interval boundaries.
    points = sorted({0.0, end, *(p for spans in down.values() for span in spans for p in span)})
    reachable = 0.0
    for a, b in itertools.pairwise(points):
        if _reachable((a + b) / 2, nodes, down):
            reachable += b - a
    return AvailabilityFigures(attempted, succeeded, unknown, failed, all_down, reachable)


def check_availability(
    figures: AvailabilityFigures, minimum: float, *, expected: bool = True
) -> InvariantResult:
    """At least `minimum` of the data-plane operations started with an HSA reachable succeeded.

    With `expected` False (a run without data-plane clients) no operation is no violation.
    """
    name, description = (
        "availability",
        f"at least {minimum:.0%} of data-plane operations started while an HSA was reachable "
        "succeeded",
    )
    fraction = figures.fraction
    if fraction is None and not expected:
        return held(name, description, 0)
    if fraction is None:
        return broken(
            name, description, 0, ["no data-plane operation was started while an HSA was up"]
        )
    if fraction < minimum:
        return broken(
            name,
            description,
            figures.attempted,
            [
                f"{figures.succeeded} of {figures.attempted} succeeded ({fraction:.1%}): "
                f"{figures.unknown} unknown, {figures.failed} failed"
            ],
        )
    return held(name, description, figures.attempted)


# --- all --------------------------------------------------------------------------------------


def check_all(
    events: Sequence[Mapping[str, Any]],
    plaintexts: Mapping[int, bytes],
    final: FinalObservations,
    *,
    convergence_bound: float,
    min_availability: float,
    expect_data_plane: bool = True,
) -> list[InvariantResult]:
    """Every invariant, in the order of the module docstring (and, on a domain with replicas,
    those of `store_checks`)."""
    results = [
        check_ciphertexts(events, plaintexts, final),
        check_online_decrypts(events),
        check_keys(events, final),
        check_versions_in_chain(events, final),
        check_monotonic(events),
        check_no_forks(events, final),
        check_convergence(final, convergence_bound),
        check_availability(
            availability(events, final.nodes), min_availability, expected=expect_data_plane
        ),
    ]
    if final.store is not None:
        results.extend(check_store(events, final.store))
    return results
