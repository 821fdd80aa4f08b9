"""The argument checks of `store.CoordinatorStore`, the same for every backend.

Invariants: each raises TypeError or ValueError (a programming error), never a domain error;
`MAX_STORED_INTEGER` is what every backend's integer columns hold (a 64-bit signed integer).
"""

from __future__ import annotations

import time

MAX_STORED_INTEGER = 2**63 - 1  # what a 64-bit signed integer column holds


def check_bytes(value: object, what: str) -> None:
    if not isinstance(value, bytes) or not value:
        raise TypeError(f"{what} must be non-empty bytes")


def check_text(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty string")


def check_version(version: object) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("a state version is an integer of at least 1")


def check_report(version: int, state_hash: bytes, when: int) -> None:
    for value in (version, when):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("a reported version and time are integers")
        if not 0 <= value <= MAX_STORED_INTEGER:
            raise ValueError("a reported version or time is out of range")
    if not isinstance(state_hash, bytes):
        raise TypeError("a reported state hash is bytes")


def timestamp(value: int | None) -> int:
    """A unix time for a store column: `value`, or now when None."""
    if value is None:
        return int(time.time())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("a time is a unix time in whole seconds")
    return value
