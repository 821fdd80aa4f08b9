"""What every chaos invariant check shares: its verdict, the pairing of operations, and the
chain entries it compares.

Pure (no I/O). A check returns an `InvariantResult`: held or broken, how many things it
checked, and the first counter-example (in history order) with the count of violations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CONTROL_OPS",
    "ChainEntry",
    "InvariantResult",
    "broken",
    "completions",
    "held",
    "verdict",
    "where",
]

# The quorum-approved domain changes of the control workload.
CONTROL_OPS: Final = frozenset({"rotate-domain-key", "add-operator", "remove-operator"})


@dataclass(frozen=True)
class InvariantResult:
    """One invariant's verdict."""

    name: str
    description: str
    held: bool
    checked: int
    counterexample: str = ""
    violations: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "description": self.description,
            "held": self.held,
            "checked": self.checked,
            "violations": self.violations,
            "counterexample": self.counterexample,
        }


@dataclass(frozen=True)
class ChainEntry:
    """One state of the final chain (verified from genesis by the runner)."""

    version: int
    state_hash: str  # hex
    proposal_id: str  # hex, "" for a scheduled rotation and for genesis


def held(name: str, description: str, checked: int) -> InvariantResult:
    """The verdict of an invariant that held over `checked` things."""
    return InvariantResult(name, description, True, checked)


def broken(name: str, description: str, checked: int, violations: Sequence[str]) -> InvariantResult:
    """The verdict of a broken invariant: its first violation and how many there were."""
    return InvariantResult(name, description, False, checked, violations[0], len(violations))


def verdict(
    name: str, description: str, checked: int, violations: Sequence[str]
) -> InvariantResult:
    """Held if there is no violation, else broken."""
    if violations:
        return broken(name, description, checked, violations)
    return held(name, description, checked)


def completions(
    events: Iterable[Mapping[str, Any]],
) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(invoke, completion) pairs of every completed operation, in completion order."""
    invoked: dict[int, Mapping[str, Any]] = {}
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
    for event in events:
        phase = event.get("phase")
        if phase == "invoke":
            invoked[int(event["id"])] = event
        elif phase in ("ok", "fail", "unknown"):
            start = invoked.pop(int(event["id"]), None)
            if start is not None:
                pairs.append((start, event))
    return pairs


def where(invoke: Mapping[str, Any]) -> str:
    """An operation as a counter-example names it: its id, type, process and start."""
    return f"op {invoke['id']} ({invoke['op']} by {invoke['process']} at t={invoke['t']:.3f} s)"
