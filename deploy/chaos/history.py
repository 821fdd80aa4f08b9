"""The record of a chaos run: every operation (invoke, then ok, fail or unknown) and every
fault and observation, as JSON lines.

An event is a JSON object:

    {"t": 12.345, "id": 17, "process": "client-1", "op": "encrypt", "phase": "invoke",
     "args": {"key_id": "...", "plaintext_sha256": "...", "plaintext_bytes": 64}, "result": {}}

`t` is seconds since the run began (monotonic clock); `id` pairs an operation's invoke with
its completion (0 for events that are not operations); `phase` is one of PHASES:
- `invoke`: the operation is about to be sent;
- `ok`: it was acknowledged;
- `fail`: it surely did not happen (a definite refusal, or it was never sent);
- `unknown`: it may or may not have happened (a timeout or a lost connection after the
  request may have left);
- `info`: not an operation: a fault injected or repaired, a status sample, a milestone.

Invariants: a line is written (and flushed) for each event as it happens, so a run that dies
leaves its history up to that point; events are totally ordered by the order of their lines;
NOTHING SECRET is ever written: plaintexts and data keys appear only as lengths and (for the
random test plaintexts of Encrypt) SHA-256 digests; the bytes themselves stay in memory
(`remember_plaintext`) for the final check and are never serialised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TextIO

__all__ = [
    "COMPLETIONS",
    "PHASES",
    "History",
    "b64",
    "from_b64",
    "read_history",
    "sha256_hex",
]

PHASES: Final = ("invoke", "ok", "fail", "unknown", "info")
COMPLETIONS: Final = ("ok", "fail", "unknown")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of test data (for the history: a digest, never the data)."""
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    """Base64 text of public bytes (ciphertext blobs, hashes)."""
    return base64.b64encode(data).decode("ascii")


def from_b64(text: str) -> bytes:
    """The bytes of `b64` text."""
    return base64.b64decode(text.encode("ascii"), validate=True)


class History:
    """A thread-safe, append-only event log, mirrored to a JSON-lines file as it grows."""

    def __init__(
        self, path: Path | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._began = clock()
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._next_id = 1
        self._open: dict[int, dict[str, Any]] = {}
        self._plaintexts: dict[int, bytes] = {}
        self.path = path
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the file (the events stay readable in memory)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> History:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- recording ----------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the run began."""
        return self._clock() - self._began

    def _append(self, event: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            event["t"] = round(self.now(), 6)
            self._events.append(event)
            if self._file is not None:
                self._file.write(json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n")
                self._file.flush()
        return event

    def invoke(self, process: str, op: str, **args: Any) -> int:
        """Record that `process` is about to send `op`; returns the operation's id."""
        with self._lock:
            op_id = self._next_id
            self._next_id += 1
        event = {
            "id": op_id,
            "process": process,
            "op": op,
            "phase": "invoke",
            "args": args,
            "result": {},
        }
        with self._lock:
            self._open[op_id] = event
        self._append(event)
        return op_id

    def complete(self, op_id: int, phase: str, **result: Any) -> None:
        """Record the outcome of operation `op_id` (ok, fail or unknown), once."""
        if phase not in COMPLETIONS:
            raise ValueError(f"an operation completes with one of {COMPLETIONS}, not {phase!r}")
        with self._lock:
            invoked = self._open.pop(op_id, None)
        if invoked is None:
            raise RuntimeError(f"operation {op_id} was not invoked or has completed already")
        self._append(
            {
                "id": op_id,
                "process": invoked["process"],
                "op": invoked["op"],
                "phase": phase,
                "args": {},
                "result": result,
            }
        )

    def ok(self, op_id: int, **result: Any) -> None:
        """The operation was acknowledged."""
        self.complete(op_id, "ok", **result)

    def fail(self, op_id: int, **result: Any) -> None:
        """The operation surely did not take effect."""
        self.complete(op_id, "fail", **result)

    def unknown(self, op_id: int, **result: Any) -> None:
        """The operation may or may not have taken effect."""
        self.complete(op_id, "unknown", **result)

    def info(self, process: str, op: str, **args: Any) -> None:
        """Record something that is not an operation (a fault, a sample, a milestone)."""
        self._append(
            {"id": 0, "process": process, "op": op, "phase": "info", "args": args, "result": {}}
        )

    def remember_plaintext(self, op_id: int, plaintext: bytes) -> None:
        """Keep the plaintext of an operation in memory (never written) for the final check."""
        with self._lock:
            self._plaintexts[op_id] = plaintext

    # --- reading ------------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """A snapshot of the events so far, in order."""
        with self._lock:
            return list(self._events)

    def plaintexts(self) -> dict[int, bytes]:
        """A snapshot of the remembered plaintexts (in memory only)."""
        with self._lock:
            return dict(self._plaintexts)

    def pending(self) -> int:
        """How many invoked operations have no outcome yet."""
        with self._lock:
            return len(self._open)

    def counts(self) -> dict[str, int]:
        """Completed operations by outcome, and info events."""
        totals = dict.fromkeys(PHASES, 0)
        with self._lock:
            for event in self._events:
                totals[event["phase"]] += 1
        return totals


def read_history(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a history file, in order (ValueError on a line that is not an event)."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            event = json.loads(line)
            if not isinstance(event, Mapping) or event.get("phase") not in PHASES:
                raise ValueError(f"{path}:{number} is not a chaos history event")
            yield dict(event)
