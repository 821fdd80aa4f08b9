"""Opening the store a coordinator config names (its `store` value, e.g. "sqlite:coordinator.db").

Invariants: a value that is not SCHEME:VALUE, or names a backend this build does not have, is
an InvalidInputError saying what to write instead; relative paths are relative to the config
file's directory. This module picks a backend; the interface (`store`) imports no backend.
"""

from __future__ import annotations

from pathlib import Path

from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore
from domain_core.errors import InvalidInputError


def open_store(spec: str, base_dir: Path) -> CoordinatorStore:
    """Open the store named by a config's `store` value, e.g. "sqlite:coordinator.db".

    Relative paths are relative to `base_dir` (the config file's directory).
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InvalidInputError(
            f"store {spec[:120]!r} is not of the form SCHEME:VALUE, e.g. sqlite:coordinator.db"
        )
    if scheme == "sqlite":
        path = Path(rest)
        if not path.is_absolute():
            path = Path(base_dir) / path
        return SqliteStore(path)
    if scheme == "etcd":
        raise InvalidInputError(
            f"store {spec[:120]!r}: the etcd store is not available in this build; use sqlite:PATH"
        )
    raise InvalidInputError(
        f"store {spec[:120]!r}: unknown scheme {scheme[:20]!r}; use sqlite:PATH"
    )


def state_directory(spec: str, base_dir: Path) -> Path:
    """Where a coordinator keeps its small local files (remembered addresses): next to the db."""
    scheme, _, rest = spec.partition(":")
    if scheme == "sqlite" and rest:
        path = Path(rest)
        if not path.is_absolute():
            path = Path(base_dir) / path
        return path.parent
    return Path(base_dir)
