"""Finding the key service of a local domain (`hsm-domain init DIR`) from its directory.

Invariants: only the ready files of running nodes give addresses; a missing or incomplete
domain, or one with no node running, is a clear error saying what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from domain_core.errors import (
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from domain_edge.transport import TlsMaterial


def read_cluster(directory: str | os.PathLike[str]) -> tuple[list[str], TlsMaterial]:
    """The node addresses and the demo application's TLS identity of a local domain.

    Layout (docs/runtime.md): DIR/ca/ca.crt, DIR/clients/demo-app/tls.crt and tls.key, and
    DIR/run/<host>.json, the ready file of every running node of DIR/nodes/<host>/: its
    address, then the addresses of its key service workers, if it has any.
    """
    root = Path(directory)
    try:
        return _read_cluster(root)
    except OSError as error:
        raise InvalidInputError(
            f"cannot read the local domain in {root}: {error.strerror or error} "
            f"({error.filename or root})"
        ) from None


def _read_cluster(root: Path) -> tuple[list[str], TlsMaterial]:
    if not (root / "domain.json").is_file():
        raise NotFoundError(
            f"{root} holds no local domain (no domain.json); create one with "
            f"`hsm-domain init {root}`"
        )
    client_dir = root / "clients" / "demo-app"
    try:
        tls = TlsMaterial.from_files(
            root / "ca" / "ca.crt", client_dir / "tls.crt", client_dir / "tls.key"
        )
    except FileNotFoundError as error:
        raise NotFoundError(
            f"{error.filename} is missing: {root} is not a complete local domain"
        ) from None
    hosts = sorted(p.parent.name for p in (root / "nodes").glob("*/config.json"))
    endpoints: list[str] = []
    for host in hosts:
        try:
            document = json.loads((root / "run" / f"{host}.json").read_text())
            address = document["address"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not running (or still writing its ready file)
        if isinstance(address, str) and address:
            endpoints.append(address)
            # The node's key service worker processes answer for the same host.
            workers = document.get("workers", [])
            if isinstance(workers, list):
                endpoints += [w for w in workers if isinstance(w, str) and w]
    if not endpoints:
        raise UnavailableError(
            f"no node of the domain in {root} is running (no ready file in {root / 'run'}); "
            f"start them with `hsm-domain up {root}`"
        )
    return endpoints, tls
