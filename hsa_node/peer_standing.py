"""What an HSA's main process tells its key service workers about its peers, and the refusals.

The main process (`hsa_node.peering.Peering`) writes a `StandingNote` into the shared floor
table's meta (`floor_meta`, name "peering"); its workers (`hsa_node.worker_peering`) read it
to follow whether the key service may serve and whether the head was confirmed. Both refuse
with the same messages (`not_ready_error`, `unconfirmed_message`).

Invariants: a note names the main process's pid, so a note from an earlier run never counts;
a note that does not parse counts as none; a refusal says what is wrong and what to do, and
is NotAppliedError (nothing was done).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from domain_core.errors import NotAppliedError

__all__ = ["META_NAME", "StandingNote", "not_ready_error", "unconfirmed_message"]

META_NAME: Final = "peering"
"""The name of the note in the floor table's meta."""


@dataclass
class StandingNote:
    """What the main process tells its key service workers (JSON in the floor table)."""

    pid: int
    ready: bool
    confirmed_at: float  # wall clock: the last confirmation (or the start)
    bound: float
    version: int
    reasons: str
    written_at: float

    def encode(self) -> bytes:
        """The note as JSON bytes."""
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> StandingNote | None:
        """The note in `raw`, or None when there is none or it does not parse."""
        if raw is None:
            return None
        try:
            document = json.loads(raw)
            return cls(
                pid=int(document["pid"]),
                ready=bool(document["ready"]),
                confirmed_at=float(document["confirmed_at"]),
                bound=float(document["bound"]),
                version=int(document["version"]),
                reasons=str(document["reasons"]),
                written_at=float(document["written_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def unconfirmed_message(
    host_id: str, version: int, seconds: float, bound: float, operation: str, reasons: str
) -> str:
    """The refusal of `operation` while no peer confirmed the head (version `version`) for
    `seconds`, beyond `bound`; `reasons` says what the peers answered last."""
    return (
        f"{host_id} has not confirmed its domain state (version {version}) with any other HSA "
        f"for {seconds:.0f} s (the limit is {bound:g} s: head_confirmation_seconds), so it may "
        f"be on a stale or forked state: {operation} and the other key administration calls "
        "are refused until a peer confirms it (encryption and decryption go on). Use another "
        "HSA, and check that this one reaches its peers (`hsm-domain status` shows why"
        + (f"; last seen: {reasons[:400]}" if reasons else "")
        + ")"
    )


def not_ready_error(host_id: str, reasons: str | None = None) -> NotAppliedError:
    """The refusal of a key call while the HSA has not taken a peer's floors (this run);
    `reasons`, when given, says what its peers answered."""
    return NotAppliedError(
        f"{host_id} is not serving keys yet: it has not taken the key metadata floors of any "
        "other HSA since it started (so it cannot rule out a rolled-back key record): use "
        "another HSA, or wait" + (f" ({reasons[:300]})" if reasons is not None else "")
    )
