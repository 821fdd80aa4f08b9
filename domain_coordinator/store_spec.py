"""Opening the store a coordinator config names (its `store` value).

Two forms:
- `sqlite:PATH`: one SQLite file; a relative PATH is relative to the config file's directory;
- `etcd:HOST:PORT[,HOST:PORT...][/PREFIX]`: an etcd cluster, every member named (the store
  fails over between them), e.g. `etcd:127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379/hsm/prod`;
  the store's keys are under `PREFIX/` (default `hsm-domain`), so that several domains, or a
  domain and its tests, can share a cluster; PREFIX is segments of letters, digits, `.`, `_`
  and `-` joined by `/`. The members must be on this host's loopback (the etcd client speaks
  plaintext gRPC).

Invariants: a value that is not one of these forms, or names a backend this build does not
have, is an InvalidInputError saying what to write instead; nothing in an etcd spec is relative.
This module picks a backend; the interface (`store`) imports no backend.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from domain_coordinator._coordination import Coordination, ReplicaCoordination, SoleCoordination
from domain_coordinator.etcd_store import DEFAULT_PREFIX, EtcdStore
from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore
from domain_core.errors import InvalidInputError
from domain_core.limits import MAX_ETCD_PREFIX_CHARS
from domain_edge.etcd import Endpoint, parse_endpoints

_PREFIX: Final = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_FORMS: Final = "sqlite:PATH or etcd:HOST:PORT[,HOST:PORT...][/PREFIX]"


def parse_etcd_spec(rest: str) -> tuple[tuple[Endpoint, ...], str]:
    """The endpoints and the key prefix of an `etcd:` spec (what follows `etcd:`)."""
    endpoints, sep, prefix = rest.partition("/")
    if not sep:
        prefix = DEFAULT_PREFIX
    if len(prefix) > MAX_ETCD_PREFIX_CHARS or not _PREFIX.fullmatch(prefix):
        raise InvalidInputError(
            f"etcd store prefix {prefix[:80]!r}: use up to {MAX_ETCD_PREFIX_CHARS} characters, "
            "segments of letters, digits, '.', '_' and '-' joined by '/' (e.g. hsm/prod)"
        )
    if any(segment in (".", "..") for segment in prefix.split("/")):
        raise InvalidInputError(f"etcd store prefix {prefix[:80]!r}: no '.' or '..' segments")
    return parse_endpoints(endpoints), prefix


def open_store(spec: str, base_dir: Path) -> CoordinatorStore:
    """Open the store named by a config's `store` value (see the module docstring).

    Relative SQLite paths are relative to `base_dir` (the config file's directory).
    """
    scheme, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InvalidInputError(
            f"store {spec[:120]!r} is not of the form SCHEME:VALUE: use {_FORMS}"
        )
    if scheme == "sqlite":
        path = Path(rest)
        if not path.is_absolute():
            path = Path(base_dir) / path
        return SqliteStore(path)
    if scheme == "etcd":
        endpoints, prefix = parse_etcd_spec(rest)
        return EtcdStore.open([str(e) for e in endpoints], prefix)
    raise InvalidInputError(f"store {spec[:120]!r}: unknown scheme {scheme[:20]!r}; use {_FORMS}")


def state_directory(spec: str, base_dir: Path) -> Path:
    """Where a coordinator keeps its small local files (remembered addresses): next to the db
    for SQLite, the config's directory otherwise."""
    scheme, _, rest = spec.partition(":")
    if scheme == "sqlite" and rest:
        path = Path(rest)
        if not path.is_absolute():
            path = Path(base_dir) / path
        return path.parent
    return Path(base_dir)


def open_coordination(store: CoordinatorStore, name: str) -> Coordination:
    """How a coordinator named `name` shares `store`: with its replicas on an etcd store (a
    shared write lock and a leader election under the store's prefix), alone on any other."""
    if isinstance(store, EtcdStore):
        return ReplicaCoordination(store.client, store.prefix, name)
    return SoleCoordination(name)
