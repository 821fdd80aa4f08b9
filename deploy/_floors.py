"""What the running HSAs of a local domain know of each key: their key metadata floors.

Before a restore loads an older backup, `hsm-domain restore` asks every running HSA for its
floors (`HsaPeer.GetKeyFloors`, the call its peers make) and compares them with the backup's
key records (`FloorCheck.compare`): a key whose floor is above the backup's record, or that the
backup lacks entirely, would be rolled back by the restore; the HSAs refuse such a record
(their floors), and the command lists these keys.

An HSA that is not running cannot be asked; its floor file on this machine
(DIR/nodes/HOST/data/key_versions.db, the HSA's own table) is read instead, read-only.

Invariants: every answer of a running HSA is believed only once verified: its states are
checked from the pinned genesis (`chain.TrustedChain`, as the HSAs check each other's), and
each page of floors must be signed by that host, under its key in the newest verified state,
over a fresh nonce (`domain_core.peering.verify_key_floors`). The HSA is asked as itself (its
own TLS identity in DIR/nodes/HOST/identity: only a host of its state may call GetKeyFloors).
A floor file is read without writing to it (SQLite `mode=ro`, `query_only`), and only for an
HSA with no live process. An HSA that is unreachable, or whose answer or file does not
verify or read, is named with the reason and left out; it never stops the others. At most
`MAX_FLOORS_TAKEN` floors are taken in all.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from deploy._runfiles import read_ready_file, running_processes
from deploy.init import DomainLayout
from domain_core import peering
from domain_core.backup import KeyFacts
from domain_core.chain import TrustedChain
from domain_core.errors import HsmDomainError, LimitExceededError
from domain_core.limits import MAX_FLOORS_PER_PAGE, MAX_FLOORS_TAKEN
from domain_core.model import SealedState
from domain_edge import transport
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc

__all__ = ["FloorCheck", "KeyBehind"]

_DEADLINE: Final = 10.0
_STATES_PAGE: Final = 100
_FLOOR_FILE: Final = "key_versions.db"  # hsa_node.keyfloors.FLOOR_FILE
_DIGEST_BYTES: Final = 32


@dataclass(frozen=True)
class KeyBehind:
    """A key whose newest version a backup lacks: what the backup holds and what an HSA knows."""

    key_id: str
    backup_version: int  # 0: the backup has no record of this key at all
    newest_version: int
    known_by: str
    same_version_other_metadata: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "backup_version": self.backup_version or None,
            "newest_version": self.newest_version,
            "known_by": self.known_by,
            "conflict": self.same_version_other_metadata,
        }


@dataclass
class FloorCheck:
    """The floors of a domain's running HSAs, and the keys a backup lacks the newest of."""

    layout: DomainLayout
    genesis: SealedState
    asked: dict[str, str] = field(default_factory=dict)  # host -> what came of asking it
    floors: dict[str, tuple[int, bytes, str]] = field(default_factory=dict)
    behind: list[KeyBehind] = field(default_factory=list)
    head_version: int = 0  # the newest state the HSAs showed (verified)

    def collect(self) -> None:
        """Ask every running HSA for its floors (see the module invariants)."""
        running = running_processes(self.layout)
        chain = TrustedChain.from_genesis(
            self.layout.domain_id, self.layout.genesis_hash, self.genesis
        )
        reachable: dict[str, Any] = {}
        with self._stubs(running) as stubs:
            for host, stub in stubs.items():
                try:
                    self._extend(chain, stub)
                    reachable[host] = stub
                except (grpc.RpcError, HsmDomainError) as error:
                    self.asked[host] = f"its states could not be verified: {_reason(error)}"
            self.head_version = chain.version
            for host, stub in reachable.items():
                try:
                    taken = self._take_floors(host, stub, chain.head)
                    self.asked[host] = f"{taken} floors (asked)"
                except (grpc.RpcError, HsmDomainError) as error:
                    self.asked[host] = f"its floors could not be taken: {_reason(error)}"
        for host in self.layout.node_configs:
            if host not in running:
                self.asked[host] = self._read_floor_file(host)

    def _read_floor_file(self, host: str) -> str:
        """Take the floors in a stopped HSA's own file; what came of it."""
        path = self.layout.node_data_dir(host) / _FLOOR_FILE
        if not path.is_file():
            return "not running, no floor file"
        taken = 0
        try:
            db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
            try:
                db.execute("PRAGMA query_only = ON")
                rows = db.execute("SELECT key_id, metadata_version, metadata_hash FROM floors")
                for key_id, version, digest in rows:
                    if isinstance(version, int) and len(bytes(digest)) == _DIGEST_BYTES:
                        self._take(str(key_id), version, bytes(digest), f"{host} (its file)")
                        taken += 1
            finally:
                db.close()
        except (sqlite3.Error, HsmDomainError) as error:
            return f"not running; its floor file could not be read: {error}"
        return f"not running; {taken} floors read from its file"

    def _take(self, key_id: str, version: int, digest: bytes, host: str) -> None:
        """Keep the highest floor of each key (and who holds it)."""
        known = self.floors.get(key_id)
        if known is None or version > known[0]:
            if known is None and len(self.floors) >= MAX_FLOORS_TAKEN:
                raise LimitExceededError(f"more than {MAX_FLOORS_TAKEN} key floors")
            self.floors[key_id] = (version, digest, host)

    @contextmanager
    def _stubs(self, running: dict[str, int]) -> Iterator[dict[str, Any]]:
        channels: list[grpc.Channel] = []
        stubs: dict[str, Any] = {}
        try:
            for host in self.layout.node_configs:
                info = read_ready_file(self.layout.ready_file(host))
                if host not in running:
                    continue
                if info is None:
                    self.asked[host] = "running, but it wrote no ready file (yet)"
                    continue
                identity = self.layout.node_identity_dir(host)
                tls = TlsMaterial.from_files(
                    self.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
                )
                channel = transport.mtls_channel(info.address, tls, transport.hsa_host(host))
                channels.append(channel)
                stubs[host] = services_pb2_grpc.HsaPeerStub(channel)  # type: ignore[no-untyped-call]
            yield stubs
        finally:
            for channel in channels:
                channel.close()

    @staticmethod
    def _extend(chain: TrustedChain, stub: Any) -> None:
        """Verify and add the states this HSA holds beyond `chain` (from the pinned genesis)."""
        while True:
            request = services_pb2.StatesAfterRequest(
                after_version=chain.version, limit=_STATES_PAGE
            )
            answer = stub.GetStatesAfter(request, timeout=_DEADLINE)
            if not answer.states:
                return
            for message in answer.states:
                chain.update(SealedState.from_message(message), now=int(time.time()))

    def _take_floors(self, host: str, stub: Any, head: SealedState) -> int:
        epoch, after, taken = b"", 0, 0
        while True:
            nonce = peering.new_nonce()
            answer = stub.GetKeyFloors(
                services_pb2.KeyFloorsRequest(
                    nonce=nonce, epoch=epoch, after_sequence=after, limit=MAX_FLOORS_PER_PAGE
                ),
                timeout=_DEADLINE,
            )
            page = peering.verify_key_floors(
                answer, manifest=head.manifest, nonce=nonce, self_host_id=host, from_self=True
            )
            for floor in page.floors:
                taken += 1
                self._take(
                    floor.key_id, int(floor.metadata_version), bytes(floor.metadata_hash), host
                )
            if not page.more:
                return taken
            epoch, after = bytes(page.epoch), int(page.next_sequence)

    def compare(self, facts: KeyFacts) -> None:
        """One key record of the backup (verified), against the floors taken (`on_key`)."""
        known = self.floors.pop(facts.key_id, None)
        if known is None:
            return
        version, digest, host = known
        if version > facts.metadata_version:
            self.behind.append(KeyBehind(facts.key_id, facts.metadata_version, version, host))
        elif version == facts.metadata_version and digest != facts.metadata_hash:
            self.behind.append(KeyBehind(facts.key_id, facts.metadata_version, version, host, True))

    def finish(self) -> list[KeyBehind]:
        """After the backup's last key: the keys it lacks entirely join the list; by key id."""
        for key_id, (version, _, host) in self.floors.items():
            self.behind.append(KeyBehind(key_id, 0, version, host))
        self.floors.clear()
        self.behind.sort(key=lambda k: k.key_id)
        return self.behind


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        return f"{code.name if code else 'UNKNOWN'}: {error.details()}"
    return str(error)
