"""What an HSA keeps on its own disk: verified states, its last address, and its peers.

Layout of `data_dir` (created 0700):
- `states/<version, 12 digits>.state`: one serialized `SealedState` per verified version,
- `removal.state`: the verified state that removed this host (it stops following),
- `address`: the address the gRPC server last bound (reused on restart when free),
- `peers.json`: `{"peers": [{"host_id": ..., "address": ...}]}`, the other hosts at the
  address whose signed answer last verified (`hsa_node.peer_addresses.AddressBook`), so gossip works
  while the coordinator is down or lies about addresses;
- `worker-<i>.ready`: `{"pid": ..., "address": ..., "index": i}`, written by key service
  worker i once it serves (`hsa_node.worker`); `audit-worker-<i>.log` is its audit log.

Invariants:
- every file is written to a temp file (0600, O_EXCL) in the same directory, fsynced, renamed
  over its name, and the directory is fsynced: a reader sees the old or the new content;
- nothing read from here is believed without verification: states are replayed through the
  chain verifier at startup, so a tampered disk is detected, and peers are only addresses;
- only the main HSA process writes here: a key service worker opens the store read-only
  (`read_only=True`), and every write through such a store raises FailedPreconditionError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from domain_core.errors import FailedPreconditionError, LimitExceededError, MalformedMessageError
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_ADDRESS_FILE_BYTES,
    MAX_NODE_SMALL_FILE_BYTES,
    Limits,
)
from domain_core.model import SealedState
from domain_edge.files import read_limited, replace_file

__all__ = [
    "NodeStore",
    "Peer",
    "WorkerReady",
    "read_worker_ready",
    "worker_audit_file",
    "worker_ready_path",
    "write_atomically",
    "write_worker_ready",
]

STATES_DIR: Final = "states"
STATE_SUFFIX: Final = ".state"
REMOVAL_FILE: Final = "removal.state"
ADDRESS_FILE: Final = "address"
PEERS_FILE: Final = "peers.json"
_STATE_NAME: Final = re.compile(r"^(\d{12})\.state$")
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700


def write_atomically(path: Path, content: bytes, mode: int = _FILE_MODE) -> None:
    """Write `content` to `path` durably (temp file with `mode`, fsync, rename, fsync dir)."""
    replace_file(path, content, mode)


def worker_audit_file(index: int) -> str:
    """The file name of key service worker `index`'s audit log in the data directory."""
    return f"audit-worker-{index}.log"


def worker_ready_path(data_dir: Path, index: int) -> Path:
    """Where key service worker `index` writes its ready file."""
    return data_dir / f"worker-{index}.ready"


@dataclass(frozen=True)
class WorkerReady:
    """What a key service worker wrote to its ready file once serving (public content)."""

    pid: int
    address: str
    index: int
    metrics: str = ""  # where the worker serves its Prometheus metrics ("" for none)


def write_worker_ready(path: Path, ready: WorkerReady) -> None:
    """Write a worker's ready file atomically."""
    document = {
        "pid": ready.pid,
        "address": ready.address,
        "index": ready.index,
        "metrics": ready.metrics,
    }
    write_atomically(path, (json.dumps(document, sort_keys=True) + "\n").encode())


def read_worker_ready(path: Path) -> WorkerReady | None:
    """A worker's ready file; None if absent or not a complete document."""
    try:
        document = json.loads(read_limited(path, MAX_NODE_SMALL_FILE_BYTES))
        return WorkerReady(
            pid=int(document["pid"]),
            address=str(document["address"]),
            index=int(document["index"]),
            metrics=str(document.get("metrics", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, LimitExceededError):
        return None


@dataclass(frozen=True)
class Peer:
    """Another HSA of the domain and where it answered last (an address, not a trust)."""

    host_id: str
    address: str


class NodeStore:
    """The files of one HSA's `data_dir`."""

    def __init__(
        self, data_dir: Path, limits: Limits = DEFAULT_LIMITS, *, read_only: bool = False
    ) -> None:
        """Open `data_dir`, creating it (0700) unless `read_only`, which needs it to exist."""
        self.data_dir = data_dir
        self.states_dir = data_dir / STATES_DIR
        self.read_only = read_only
        self._limits = limits
        if read_only:
            if not self.states_dir.is_dir():
                raise FailedPreconditionError(
                    f"{self.states_dir} does not exist; the main HSA process creates it: start "
                    "the HSA, not a worker on its own"
                )
            return
        for directory in (self.data_dir, self.states_dir):
            directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            directory.chmod(_DIR_MODE)

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise FailedPreconditionError(
                f"{self.data_dir} is open read-only here (a key service worker); only the main "
                f"HSA process writes {what}"
            )

    # --- states --------------------------------------------------------------------------

    def state_path(self, version: int) -> Path:
        """Where the state of `version` is kept."""
        return self.states_dir / f"{version:012d}{STATE_SUFFIX}"

    def save_state(self, state: SealedState) -> None:
        """Persist a verified state (durable when this returns)."""
        self._writable("states")
        write_atomically(self.state_path(state.version), state.to_bytes())

    def has_state(self, version: int) -> bool:
        """Whether a state file for `version` exists (one stat: cheap enough to poll)."""
        return self.state_path(version).is_file()

    def removal_stamp(self) -> tuple[int, int] | None:
        """(mtime in ns, size) of the stored removing state, None without one (cheap to poll)."""
        try:
            stat = (self.data_dir / REMOVAL_FILE).stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def stored_versions(self) -> list[int]:
        """Versions with a state file, ascending."""
        versions = []
        for entry in self.states_dir.iterdir():
            match = _STATE_NAME.match(entry.name)
            if match:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def load_state(self, version: int) -> SealedState:
        """Parse the stored state of `version` (not verified: the caller replays it)."""
        path = self.state_path(version)
        state = SealedState.from_bytes(path.read_bytes(), self._limits)
        if state.version != version:
            raise MalformedMessageError(f"{path} holds version {state.version}, not {version}")
        return state

    def save_removal(self, state: SealedState) -> None:
        """Keep the verified state that removed this host, so a restart still knows it."""
        self._writable("the removal state")
        write_atomically(self.data_dir / REMOVAL_FILE, state.to_bytes())

    def load_removal(self) -> SealedState | None:
        """The stored removing state, if any (not verified: the caller checks it)."""
        path = self.data_dir / REMOVAL_FILE
        if not path.exists():
            return None
        return SealedState.from_bytes(path.read_bytes(), self._limits)

    # --- address and peers ---------------------------------------------------------------

    def load_address(self) -> str | None:
        """The address the server bound last time, if remembered."""
        path = self.data_dir / ADDRESS_FILE
        try:
            text = read_limited(path, MAX_ADDRESS_FILE_BYTES).decode("ascii").strip()
        except (FileNotFoundError, UnicodeDecodeError, LimitExceededError):
            return None
        return text or None

    def save_address(self, address: str) -> None:
        """Remember the bound address for the next start."""
        self._writable("the address")
        write_atomically(self.data_dir / ADDRESS_FILE, address.encode("ascii") + b"\n")

    def load_peers(self) -> list[Peer]:
        """The cached peer list; empty when missing or unreadable (it is only a hint)."""
        path = self.data_dir / PEERS_FILE
        try:
            document = json.loads(read_limited(path, MAX_NODE_SMALL_FILE_BYTES))
        except (FileNotFoundError, ValueError, UnicodeDecodeError, LimitExceededError):
            return []
        entries = document.get("peers") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            return []
        peers = []
        for entry in entries:
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("host_id"), str)
                and isinstance(entry.get("address"), str)
                and entry["address"]
            ):
                peers.append(Peer(host_id=entry["host_id"], address=entry["address"]))
        return peers

    def save_peers(self, peers: list[Peer]) -> None:
        """Replace the cached peer list."""
        self._writable("the peer list")
        document = {
            "peers": [
                {"host_id": p.host_id, "address": p.address}
                for p in sorted(peers, key=lambda p: p.host_id)
            ]
        }
        write_atomically(
            self.data_dir / PEERS_FILE,
            (json.dumps(document, indent=2, sort_keys=True) + "\n").encode(),
        )
