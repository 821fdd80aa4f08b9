"""Finding the key service of a local domain (`hsm-domain init DIR`) from its directory.

Invariants: only the ready files of running nodes give addresses (of a domain across hosts,
`domain.json`'s addresses: its nodes run elsewhere); a missing or incomplete domain, or one with
no node running, is a clear error saying what to do.
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
from domain_edge.hosts import addresses_of
from domain_edge.layout import DomainPaths
from domain_edge.transport import TlsMaterial


def read_cluster(directory: str | os.PathLike[str]) -> tuple[list[str], TlsMaterial]:
    """The node addresses and the demo application's TLS identity of a local domain.

    Files (`domain_edge.layout.DomainPaths`): the CA certificate, the demo application's
    TLS certificate and key, and the ready file of every running node that has a config: its
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
    paths = DomainPaths(root)
    if not paths.domain_file.is_file():
        raise NotFoundError(
            f"{root} holds no local domain (no domain.json); create one with "
            f"`hsm-domain init {root}`"
        )
    try:
        tls = TlsMaterial.from_files(paths.ca_cert, paths.client_cert, paths.client_key)
    except FileNotFoundError as error:
        raise NotFoundError(
            f"{error.filename} is missing: {root} is not a complete local domain"
        ) from None
    across_hosts = addresses_of(paths)
    if across_hosts is not None:
        return list(across_hosts.hsas.values()), tls
    endpoints: list[str] = []
    for host in paths.configured_hosts():
        try:
            document = json.loads(paths.ready_file(host).read_text())
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
            f"no node of the domain in {root} is running (no ready file in {paths.run_dir}); "
            f"start them with `hsm-domain up {root}`"
        )
    return endpoints, tls
