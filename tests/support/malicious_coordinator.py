"""A malicious coordinator for chaos tests: a real `Coordinator` server that lies to real HSAs.

`MaliciousCoordinatorServer` listens on 127.0.0.1:0 with mutual TLS under the REAL coordinator
certificate of a domain made by `deploy.init.init_domain`, so `hsa-node` processes configured
to use it connect to it, and it calls their `HsaAdmin` (InstallState, ApplyProposal) as the
coordinator identity they accept. It serves whatever chain a test scripts (`serve`): on the
`WatchStates` stream (the whole script again each time it changes, whatever version the HSA
asked after: a rollback or a fork is delivered too), on `GetStatesAfter` and on
`GetLatestState`, except the versions it withholds from a given host (`withheld_after`); it
holds no key records. It keeps a registry for `RegisterHsa` and `ListHsas`, so the HSAs
gossip among themselves as they would with an honest coordinator, unless it lists other
addresses (or none) to a given host (`listed_for`).
Every other call is UNIMPLEMENTED.

`forging_domain(layout)` turns the domain on disk into a `support.simulator.SimulatedDomain`
holding the real hosts' and operators' keys and the domain CA (from the identity directories,
the demo passphrase files and `ca/`), so `SimulatedDomain` builds honest states for the real
domain and `support.simulator.MaliciousCoordinator` tampers with them.

`KeyRecordCoordinatorServer` is the same server with a key-record store (`KeyRecordStore`):
it keeps the records HSAs put honestly (compare-and-swap on revisions, as the real
coordinator), and a test makes it lie about one key (`lie`): GetKey and ListKeyRecords then
serve the scripted record instead, until `tell_truth`. The record forgers below it
(`swap_tokens`, `with_metadata`, `reseal`, `relabel_generation`, `flip_token_bit`) build the
lies from honest records.

`LyingOperatorPort` lies to operators instead: it serves the coordinator's operator port
(server-auth TLS under the real coordinator certificate, as `hsm-operator` expects), relays
every call to the real coordinator's operator port, and rewrites what a test scripts: the
proposals `ListProposals` lists and `GetProposal` serves, their details, the domain status and
the HSA list. It records every approval submitted through it.

Invariants: the server and every channel it opens are closed by `stop()` (also on leaving a
`with` block); nothing here changes the domain's files; a lie never changes the honest record
underneath it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc

from deploy.init import COORDINATOR_NAME, DomainLayout, read_passphrase
from domain_core import keytokens
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
)
from domain_core.model import SealedState, added_host
from domain_core.pki import certificate_der
from domain_core.signers import InMemorySigner
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.file_tokens import load_file_token
from domain_edge.identity_files import load_host_certificate, load_host_identity
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc
from support.hsa_nodes import Domain, Processes
from support.simulator import MaliciousCoordinator, SimHost, SimOperator, SimulatedDomain

__all__ = [
    "Attack",
    "KeyRecordChain",
    "KeyRecordCoordinatorServer",
    "KeyRecordStore",
    "LogWatch",
    "LyingOperatorPort",
    "MaliciousCoordinatorServer",
    "ScriptedChain",
    "backing_keys_of",
    "coordinator_tls",
    "echo",
    "flip_token_bit",
    "forging_domain",
    "relabel_generation",
    "reseal",
    "swap_tokens",
    "wait_until",
    "with_metadata",
]

CALL_TIMEOUT = 5.0
_WATCH_POLL_SECONDS = 0.2


def coordinator_tls(layout: DomainLayout) -> TlsMaterial:
    """The domain's real coordinator TLS identity (spiffe://<domain>/coordinator/coordinator)."""
    directory = layout.root / COORDINATOR_NAME
    return TlsMaterial.from_files(layout.ca_cert, directory / "tls.crt", directory / "tls.key")


def forging_domain(layout: DomainLayout, now: int | None = None) -> SimulatedDomain:
    """A `SimulatedDomain` of the real domain on disk: its genesis and every private key.

    Operators are listed in genesis order (alice, bob, carol, ...); hosts are the genesis
    hosts. The simulated clock starts at `now` (default: the real time), because real HSAs
    refuse states dated more than the clock skew ahead of their own clock.
    """
    genesis = SealedState.from_bytes(layout.genesis_state.read_bytes())
    records = genesis.manifest.hosts_by_id
    assert genesis.proposal is not None
    enrollments = {
        added_host(c, layout.domain_id).host_id: c.add_host.enrollment
        for c in genesis.proposal.changes
        if c.HasField("add_host")
    }
    hosts: dict[str, SimHost] = {}
    for host_id in layout.genesis_nodes:
        identity_dir = layout.node_dir(host_id) / "identity"
        identity = load_host_identity(identity_dir)
        hosts[host_id] = SimHost(
            host_id=host_id,
            signer=cast(InMemorySigner, identity.signer),
            agreement_private_key=identity.agreement_private_key,
            agreement_public_key=identity.agreement_public_key,
            record=records[host_id],
            enrollment=enrollments[host_id],
            tls_signer=cast(InMemorySigner, identity.tls_signer),
            certificate=certificate_der(load_host_certificate(identity, identity_dir)),
        )
    operators_by_id = genesis.manifest.operators_by_id
    operators: list[SimOperator] = []
    for record in genesis.manifest.message.operators:
        token, passphrase = layout.operator_tokens[record.name]
        signer = load_file_token(token, read_passphrase(passphrase))
        if signer.public_key.key_id not in operators_by_id:
            raise RuntimeError(f"the token of {record.name} is not the genesis operator's")
        operators.append(SimOperator(record.name, signer, record))
    sim = SimulatedDomain(
        domain_id=layout.domain_id,
        hosts=hosts,
        operators=operators,
        now=int(time.time()) if now is None else now,
        ca=load_domain_ca(layout.root / "ca"),
    )
    sim.states.append(genesis)
    return sim


def _version_of(state: domain_pb2.SealedState) -> int:
    """The version a state claims (0 when its manifest does not parse)."""
    manifest = domain_pb2.Manifest()
    try:
        manifest.ParseFromString(state.manifest)
    except Exception:
        return 0
    return int(manifest.version)


@dataclass
class ScriptedChain(services_pb2_grpc.CoordinatorServicer):
    """The `Coordinator` servicer: serves the scripted states, records what it was asked."""

    states: list[domain_pb2.SealedState] = field(default_factory=list)
    # When set, GetStatesAfter answers with exactly these states, whatever was asked.
    states_after_override: list[domain_pb2.SealedState] | None = None
    # Per calling host: the highest version it is served (streams, pulls, latest): withheld.
    withheld_after: dict[str, int] = field(default_factory=dict)
    # Per calling host: what ListHsas answers it (host id, address), instead of the registry.
    listed_for: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    registered: dict[str, str] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    sent_on_streams: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _script: int = 1  # +1 per `serve`: streams resend the whole script when it changes

    # --- scripting -----------------------------------------------------------------------

    def serve(self, states: Sequence[SealedState | domain_pb2.SealedState]) -> None:
        """Serve exactly these states from now on; every open stream sends all of them again."""
        messages = [s.message if isinstance(s, SealedState) else s for s in states]
        with self._changed:
            self.states = list(messages)
            self._script += 1
            self._changed.notify_all()

    def stop(self) -> None:
        """End every stream."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    # --- the chain -----------------------------------------------------------------------

    def _served_to(self, context: grpc.ServicerContext) -> list[domain_pb2.SealedState]:
        """The scripted states the caller may see (all, unless some are withheld from it);
        call with the condition held."""
        try:
            host = transport.caller(context).spiffe.name
        except Exception:
            host = ""
        limit = self.withheld_after.get(host)
        if limit is None:
            return list(self.states)
        return [s for s in self.states if _version_of(s) <= limit]

    def GetLatestState(
        self, request: services_pb2.LatestStateRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        self.calls["GetLatestState"] += 1
        with self._changed:
            served = self._served_to(context)
            return served[-1] if served else domain_pb2.SealedState()

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        self.calls["GetStatesAfter"] += 1
        with self._changed:
            if self.states_after_override is not None:
                return services_pb2.StatesResponse(states=self.states_after_override)
            served = self._served_to(context)
            chosen = [s for s in served if _version_of(s) > request.after_version]
        return services_pb2.StatesResponse(states=chosen[: request.limit or 100])

    def WatchStates(
        self, request: services_pb2.WatchStatesRequest, context: grpc.ServicerContext
    ) -> Iterator[domain_pb2.SealedState]:
        self.calls["WatchStates"] += 1
        sent_script = 0
        while context.is_active():
            with self._changed:
                if self._stopping:
                    return
                if sent_script == self._script:
                    self._changed.wait(_WATCH_POLL_SECONDS)
                    continue
                sent_script, pending = self._script, self._served_to(context)
            for state in pending:
                self.sent_on_streams += 1
                yield state

    def GetDomainStatus(
        self, request: services_pb2.DomainStatusRequest, context: grpc.ServicerContext
    ) -> services_pb2.DomainStatusResponse:
        self.calls["GetDomainStatus"] += 1
        with self._changed:
            version = _version_of(self.states[-1]) if self.states else 0
        return services_pb2.DomainStatusResponse(version=version)

    # --- key records: none ----------------------------------------------------------------

    def GetKey(
        self, request: services_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.KeyRecord:
        self.calls["GetKey"] += 1
        raise NotFoundError(f"key {request.key_id[:80]} does not exist")

    def ListKeyRecords(
        self, request: services_pb2.ListKeyRecordsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeyRecordsResponse:
        self.calls["ListKeyRecords"] += 1
        return services_pb2.ListKeyRecordsResponse()

    # --- the registry --------------------------------------------------------------------

    def RegisterHsa(
        self, request: services_pb2.RegisterHsaRequest, context: grpc.ServicerContext
    ) -> services_pb2.RegisterHsaResponse:
        self.calls["RegisterHsa"] += 1
        with self._changed:
            self.registered[request.host_id] = request.address
            version = _version_of(self.states[-1]) if self.states else 0
        return services_pb2.RegisterHsaResponse(version=version)

    def ListHsas(
        self, request: services_pb2.ListHsasRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListHsasResponse:
        self.calls["ListHsas"] += 1
        try:
            caller = transport.caller(context).spiffe.name
        except Exception:
            caller = ""
        with self._changed:
            listed = self.listed_for.get(caller)
            entries = sorted(self.registered.items()) if listed is None else listed
            endpoints = [services_pb2.HsaEndpoint(host_id=h, address=a) for h, a in entries]
        return services_pb2.ListHsasResponse(hsas=endpoints)


class MaliciousCoordinatorServer:
    """A running `ScriptedChain` with the real coordinator certificate, and HsaAdmin calls."""

    def __init__(self, layout: DomainLayout) -> None:
        self.layout = layout
        self.tls = coordinator_tls(layout)
        self.chain = ScriptedChain()
        self.address = ""
        self._server: grpc.Server | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> str:
        """Serve on 127.0.0.1:0 (mutual TLS); returns the bound address."""
        # As the real coordinator's HSA port: room for every HSA's WatchStates stream.
        server = transport.make_server(
            max_workers=32, streams=transport.StreamLimits(per_peer=4, total=64, blocking=32)
        )
        services_pb2_grpc.add_CoordinatorServicer_to_server(self.chain, server)  # type: ignore[no-untyped-call]
        port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(self.tls))
        server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        """End the streams, stop the server, close every channel."""
        self.chain.stop()
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()

    def __enter__(self) -> MaliciousCoordinatorServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- scripting -----------------------------------------------------------------------

    def serve(self, *states: SealedState | domain_pb2.SealedState) -> None:
        """Serve these states as the chain (streams, pulls, latest)."""
        self.chain.serve(states)

    def wait_registered(self, hosts: Sequence[str], timeout: float = 15.0) -> dict[str, str]:
        """Wait until every host in `hosts` called RegisterHsa; their addresses."""
        deadline = time.monotonic() + timeout
        while True:
            registered = dict(self.chain.registered)
            if set(hosts) <= set(registered):
                return {h: registered[h] for h in hosts}
            if time.monotonic() > deadline:
                raise AssertionError(f"only {sorted(registered)} registered, not all of {hosts}")
            time.sleep(0.05)

    # --- calling HSAs as the coordinator ---------------------------------------------------

    def _admin(self, address: str) -> Any:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = transport.mtls_channel(address, self.tls, transport.ANY_HSA)
                self._channels[address] = channel
        return services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]

    def push(
        self, address: str, state: SealedState | domain_pb2.SealedState
    ) -> services_pb2.InstallStateResponse:
        """InstallState on the HSA at `address` (raises grpc.RpcError when it refuses)."""
        message = state.message if isinstance(state, SealedState) else state
        response: services_pb2.InstallStateResponse = self._admin(address).InstallState(
            services_pb2.InstallStateRequest(state=message), timeout=CALL_TIMEOUT
        )
        return response

    def push_raw(self, address: str, state_bytes: bytes) -> bytes:
        """InstallState with a request whose `state` field holds `state_bytes` verbatim.

        For bit flips that no longer parse: the request is built on the wire (field 1,
        length-delimited), so the HSA is the first to parse the damaged bytes.
        """
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = transport.mtls_channel(address, self.tls, transport.ANY_HSA)
                self._channels[address] = channel
        call = channel.unary_unary("/hsmdomain.v1.HsaAdmin/InstallState")
        body = b"\x0a" + _varint(len(state_bytes)) + state_bytes
        return cast(bytes, call(body, timeout=CALL_TIMEOUT))

    def apply(
        self, address: str, proposal: bytes, approvals: Sequence[domain_pb2.Approval]
    ) -> domain_pb2.SealedState:
        """ApplyProposal on the HSA at `address` (raises grpc.RpcError when it refuses)."""
        state: domain_pb2.SealedState = self._admin(address).ApplyProposal(
            services_pb2.ApplyProposalRequest(proposal=proposal, approvals=list(approvals)),
            timeout=CALL_TIMEOUT,
        )
        return state

    def status(self, address: str) -> services_pb2.HsaStatus:
        """GetStatus of the HSA at `address`."""
        status: services_pb2.HsaStatus = self._admin(address).GetStatus(
            services_pb2.HsaStatusRequest(), timeout=CALL_TIMEOUT
        )
        return status


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# --- what a test holds -------------------------------------------------------------------------


@dataclass
class Attack:
    """Real HSAs following a malicious coordinator, and the tools to lie to them."""

    domain: Domain
    procs: Processes
    server: MaliciousCoordinatorServer
    sim: SimulatedDomain  # the real domain's keys: builds honest states
    liar: MaliciousCoordinator  # tampers with them
    hosts: tuple[str, ...]

    def address(self, host: str) -> str:
        """Where `host` listens."""
        return self.procs.addresses[host]


class LogWatch:
    """What a process wrote to its log since this watch was made (or, `whole`, ever).

    HSAs write a repeated message at most once a minute, so a refusal that repeats an
    earlier one is found only in the whole log.
    """

    def __init__(self, path: Path, *, whole: bool = False) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() and not whole else 0

    def text(self) -> str:
        """The log written since the watch began."""
        with self.path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def contains(self, needle: str, timeout: float = 5.0) -> bool:
        """Whether `needle` appears within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.text():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def wait_for(self, needle: str, timeout: float = 5.0) -> None:
        """Fail unless `needle` appears within `timeout` seconds."""
        if not self.contains(needle, timeout):
            tail = "\n".join(self.text().splitlines()[-15:])
            raise AssertionError(f"{self.path.name} does not say {needle!r}; it says:\n{tail}")


def echo(channel: grpc.Channel, payload: bytes = b"still serving") -> None:
    """Diagnostics.Echo answers with the payload (fails otherwise)."""
    stub = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
    response = stub.Echo(services_pb2.EchoMessage(payload=payload), timeout=CALL_TIMEOUT)
    assert response.payload == payload


def wait_until(condition: Any, what: str, timeout: float = 15.0) -> None:
    """Poll `condition()` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# --- key records: an honest store that lies on request ---------------------------------------


def _key_id_of(record: keys_pb2.KeyRecord) -> str:
    """The key id a record's metadata names (InvalidInputError when it does not parse)."""
    metadata = keys_pb2.KeyMetadata()
    try:
        metadata.ParseFromString(record.metadata)
    except Exception:
        raise InvalidInputError("record.metadata does not parse") from None
    if not metadata.key_id:
        raise InvalidInputError("record.metadata names no key")
    return metadata.key_id


class KeyRecordStore:
    """Key records as an honest coordinator keeps them, plus scripted lies about some keys.

    Honest part: `put` creates (expected revision 0) or replaces a record with a
    compare-and-swap on its revision, `get` returns it with its revision, `list` pages by key
    id, `delete` removes it with a compare-and-swap. Lies: `lie(key_id, record)` makes GetKey
    and ListKeyRecords serve `record` for `key_id` (with the honest revision unless the lie
    sets one) while the honest record stays stored underneath; `tell_truth` ends lies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, keys_pb2.KeyRecord] = {}
        self._lies: dict[str, keys_pb2.KeyRecord] = {}
        self.puts: Counter[str] = Counter()

    # --- scripting -------------------------------------------------------------------------

    def honest(self, key_id: str) -> keys_pb2.KeyRecord:
        """A copy of the honest record of `key_id`, with its revision (KeyError if none)."""
        with self._lock:
            record = keys_pb2.KeyRecord()
            record.CopyFrom(self._records[key_id])
            return record

    def honest_records(self) -> list[keys_pb2.KeyRecord]:
        """Copies of every honest record."""
        with self._lock:
            return [self._copy(r) for r in self._records.values()]

    def lie(self, key_id: str, record: keys_pb2.KeyRecord) -> None:
        """Serve `record` for `key_id` on GetKey and ListKeyRecords from now on."""
        with self._lock:
            lie = self._copy(record)
            if not lie.revision and key_id in self._records:
                lie.revision = self._records[key_id].revision
            self._lies[key_id] = lie

    def tell_truth(self, key_id: str | None = None) -> None:
        """Stop lying about `key_id` (or about every key)."""
        with self._lock:
            if key_id is None:
                self._lies.clear()
            else:
                self._lies.pop(key_id, None)

    @staticmethod
    def _copy(record: keys_pb2.KeyRecord) -> keys_pb2.KeyRecord:
        copy = keys_pb2.KeyRecord()
        copy.CopyFrom(record)
        return copy

    def _served(self, key_id: str) -> keys_pb2.KeyRecord | None:
        record = self._lies.get(key_id)
        if record is None:
            record = self._records.get(key_id)
        return self._copy(record) if record is not None else None

    # --- the coordinator's calls -----------------------------------------------------------

    def get(self, key_id: str) -> keys_pb2.KeyRecord:
        """What GetKey answers (NotFoundError when there is neither a record nor a lie)."""
        with self._lock:
            record = self._served(key_id)
        if record is None:
            raise NotFoundError(f"key {key_id[:80]} does not exist")
        return record

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        """Store honestly with a compare-and-swap; the new revision."""
        key_id = _key_id_of(record)
        with self._lock:
            current = self._records.get(key_id)
            if expected_revision == 0 and current is not None:
                raise AlreadyExistsError(f"key {key_id} exists already")
            if expected_revision != 0:
                if current is None:
                    raise NotFoundError(f"key {key_id} does not exist")
                if current.revision != expected_revision:
                    raise ConflictError(
                        f"key {key_id} is at revision {current.revision}, not "
                        f"{expected_revision}: it changed meanwhile; read it again and retry"
                    )
            stored = self._copy(record)
            stored.revision = (current.revision if current is not None else 0) + 1
            self._records[key_id] = stored
            self.puts[key_id] += 1
            return int(stored.revision)

    def list(self, limit: int, after: str) -> tuple[list[keys_pb2.KeyRecord], str]:
        """One page in key-id order (lies in place of the honest records), and the next token."""
        limit = limit or 100
        with self._lock:
            ids = sorted(set(self._records) | set(self._lies))
            chosen = [k for k in ids if k > after]
            page = chosen[:limit]
            records = [r for r in (self._served(k) for k in page) if r is not None]
        return records, (page[-1] if len(chosen) > limit else "")

    def delete(self, key_id: str, expected_revision: int) -> None:
        """Delete honestly with a compare-and-swap."""
        with self._lock:
            current = self._records.get(key_id)
            if current is None:
                raise NotFoundError(f"key {key_id} does not exist")
            if current.revision != expected_revision:
                raise ConflictError(
                    f"key {key_id} is at revision {current.revision}, not {expected_revision}"
                )
            del self._records[key_id]
            self._lies.pop(key_id, None)


@dataclass
class KeyRecordChain(ScriptedChain):
    """`ScriptedChain` that also serves key records from a `KeyRecordStore`."""

    keys: KeyRecordStore = field(default_factory=KeyRecordStore)

    def GetKey(
        self, request: services_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.KeyRecord:
        self.calls["GetKey"] += 1
        return self.keys.get(request.key_id)

    def PutKey(
        self, request: services_pb2.PutKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.PutKeyResponse:
        self.calls["PutKey"] += 1
        revision = self.keys.put(request.record, request.expected_revision)
        return services_pb2.PutKeyResponse(revision=revision)

    def ListKeyRecords(
        self, request: services_pb2.ListKeyRecordsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeyRecordsResponse:
        self.calls["ListKeyRecords"] += 1
        records, next_token = self.keys.list(request.limit, request.page_token)
        return services_pb2.ListKeyRecordsResponse(records=records, next_page_token=next_token)

    def DeleteKeyRecord(
        self, request: services_pb2.DeleteKeyRecordRequest, context: grpc.ServicerContext
    ) -> services_pb2.DeleteKeyRecordResponse:
        self.calls["DeleteKeyRecord"] += 1
        self.keys.delete(request.key_id, request.expected_revision)
        return services_pb2.DeleteKeyRecordResponse()


class KeyRecordCoordinatorServer(MaliciousCoordinatorServer):
    """`MaliciousCoordinatorServer` whose chain also keeps key records and lies about them."""

    def __init__(self, layout: DomainLayout) -> None:
        super().__init__(layout)
        self.chain: KeyRecordChain = KeyRecordChain()

    @property
    def keys(self) -> KeyRecordStore:
        """The key records it serves (honest ones, and the lies a test scripts)."""
        return self.chain.keys


# --- forging key records -------------------------------------------------------------------------


def _metadata(record: keys_pb2.KeyRecord) -> keys_pb2.KeyMetadata:
    return keys_pb2.KeyMetadata.FromString(record.metadata)


def swap_tokens(
    record: keys_pb2.KeyRecord, other: keys_pb2.KeyRecord, *, relabel: bool = True
) -> keys_pb2.KeyRecord:
    """`record`'s metadata with `other`'s tokens; `relabel` makes the tokens name `record`'s
    key (as a careful liar would), else they still name the other key."""
    forged = keys_pb2.KeyRecord(
        metadata=record.metadata,
        revision=record.revision,
        signer_host_id=record.signer_host_id,
        signature=record.signature,  # kept: a careful liar would
    )
    key_id = _metadata(record).key_id
    for token in other.tokens:
        forged.tokens.add().CopyFrom(token)
        if relabel:
            forged.tokens[-1].key_id = key_id
    return forged


def with_metadata(
    record: keys_pb2.KeyRecord, mutate: Callable[[keys_pb2.KeyMetadata], None]
) -> keys_pb2.KeyRecord:
    """The record with its metadata edited by `mutate` and the original tokens kept."""
    metadata = _metadata(record)
    mutate(metadata)
    forged = keys_pb2.KeyRecord()
    forged.CopyFrom(record)
    forged.metadata = metadata.SerializeToString(deterministic=True)
    return forged


def backing_keys_of(
    record: keys_pb2.KeyRecord, domain_keys: Mapping[int, bytes]
) -> dict[int, bytes]:
    """The backing keys of an honest record, opened with the domain keys (for secrecy checks
    and for `reseal`)."""
    _, keys = keytokens.verify_key_record(record, domain_keys, _metadata(record).key_id)
    return keys


def reseal(
    record: keys_pb2.KeyRecord,
    domain_keys: Mapping[int, bytes],
    mutate: Callable[[keys_pb2.KeyMetadata], None],
    generation: int | None = None,
    *,
    signer: keytokens.RecordSigner,
) -> keys_pb2.KeyRecord:
    """The record with edited metadata and valid tokens over it, sealed with the real domain
    key (`generation`, default the newest held) and signed by `signer`: what only someone
    holding the domain keys and a member host's signing key could write (an insider), to reach
    the checks behind the signature and token checks."""
    backing = backing_keys_of(record, domain_keys)
    metadata = _metadata(record)
    mutate(metadata)
    generation = max(domain_keys) if generation is None else generation
    forged = keys_pb2.KeyRecord(revision=record.revision)
    metadata_bytes = metadata.SerializeToString(deterministic=True)
    forged.metadata = metadata_bytes
    for version, key in sorted(backing.items()):
        forged.tokens.add().CopyFrom(
            keytokens.wrap_backing_key(
                domain_keys[generation],
                generation,
                metadata_bytes,
                metadata.key_id,
                version,
                key,
            )
        )
    return signer.sign(forged)


def relabel_generation(record: keys_pb2.KeyRecord, generation: int) -> keys_pb2.KeyRecord:
    """The record with every token claiming domain key generation `generation`."""
    forged = keys_pb2.KeyRecord()
    forged.CopyFrom(record)
    for token in forged.tokens:
        token.domain_key_generation = generation
    return forged


def flip_token_bit(
    record: keys_pb2.KeyRecord, index: int, part: str, bit: int
) -> keys_pb2.KeyRecord:
    """The record with one bit flipped in token `index`: `part` is "ciphertext", "nonce" or
    "key_id" (bytes or text, `bit` counted from the start), or "backing_version" (an int)."""
    forged = keys_pb2.KeyRecord()
    forged.CopyFrom(record)
    token = forged.tokens[index]
    if part == "backing_version":
        token.backing_version ^= 1 << bit
    elif part == "key_id":
        raw = bytearray(token.key_id.encode())
        raw[bit // 8] ^= 1 << (bit % 8)
        token.key_id = raw.decode(errors="replace")
    elif part in ("ciphertext", "nonce"):
        raw = bytearray(getattr(token, part))
        raw[bit // 8] ^= 1 << (bit % 8)
        setattr(token, part, bytes(raw))
    else:
        raise ValueError(f"no token part {part!r}")
    return forged


# --- lying to operators ------------------------------------------------------------------------


@dataclass
class _Script:
    """What `LyingOperatorPort` changes in what it relays (None: relay as is)."""

    # ListProposals answers exactly these (each also served by GetProposal by its id).
    listed: list[services_pb2.ProposalStatus] | None = None
    # Proposals GetProposal serves by id, whatever the real coordinator holds.
    served: dict[bytes, services_pb2.ProposalStatus] = field(default_factory=dict)
    # Applied in place to every ProposalStatus relayed (listed, served, or the real one).
    status: Callable[[services_pb2.ProposalStatus], None] | None = None
    domain_status: Callable[[services_pb2.DomainStatusResponse], None] | None = None
    hsas: Callable[[services_pb2.ListHsasResponse], None] | None = None


class LyingOperatorPort(services_pb2_grpc.CoordinatorServicer):
    """An operator port in front of the real coordinator's, rewriting what a test scripts."""

    def __init__(self, layout: DomainLayout, real_operator_address: str) -> None:
        self.layout = layout
        self.script = _Script()
        self.approvals: list[domain_pb2.Approval] = []  # every approval submitted through it
        self.address = ""
        self._tls = coordinator_tls(layout)
        self._channel = transport.secure_channel(
            real_operator_address, layout.ca_cert.read_bytes(), transport.COORDINATOR
        )
        self._real: Any = services_pb2_grpc.CoordinatorStub(self._channel)  # type: ignore[no-untyped-call]
        self._server: grpc.Server | None = None
        self._lock = threading.Lock()

    def start(self) -> str:
        """Serve on 127.0.0.1:0 (server-auth TLS, as the real operator port); the address."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        services_pb2_grpc.add_CoordinatorServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        port = server.add_secure_port(
            "127.0.0.1:0", transport.server_credentials(self._tls, server_auth_only=True)
        )
        server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        """Stop the server and close the channel to the real coordinator."""
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None
        self._channel.close()

    def __enter__(self) -> LyingOperatorPort:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- relaying --------------------------------------------------------------------------

    def _relay(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return getattr(self._real, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")

    def _rewrite(self, status: services_pb2.ProposalStatus) -> services_pb2.ProposalStatus:
        out = services_pb2.ProposalStatus()
        out.CopyFrom(status)
        if self.script.status is not None:
            self.script.status(out)
        return out

    def SubmitProposal(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._rewrite(self._relay("SubmitProposal", request, context))

    def SubmitApproval(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            approval = domain_pb2.Approval()
            approval.CopyFrom(request.approval)
            self.approvals.append(approval)
        served = self.script.served.get(bytes(request.approval.proposal_id))
        if served is not None:  # it "takes" the approval of a proposal it made up
            return self._rewrite(served)
        return self._rewrite(self._relay("SubmitApproval", request, context))

    def GetProposal(self, request: Any, context: grpc.ServicerContext) -> Any:
        served = self.script.served.get(bytes(request.proposal_id))
        if served is None and self.script.listed is not None:
            served = next(
                (p for p in self.script.listed if p.proposal_id == request.proposal_id), None
            )
        if served is not None:
            return self._rewrite(served)
        return self._rewrite(self._relay("GetProposal", request, context))

    def ListProposals(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.script.listed is not None:
            listed = list(self.script.listed)
        else:
            listed = list(self._relay("ListProposals", request, context).proposals)
        return services_pb2.ListProposalsResponse(proposals=[self._rewrite(p) for p in listed])

    def CancelProposal(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._rewrite(self._relay("CancelProposal", request, context))

    def GetLatestState(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._relay("GetLatestState", request, context)

    def GetStatesAfter(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._relay("GetStatesAfter", request, context)

    def GetDomainStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        status = self._relay("GetDomainStatus", request, context)
        if self.script.domain_status is not None:
            self.script.domain_status(status)
        return status

    def ListHsas(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self._relay("ListHsas", request, context)
        if self.script.hsas is not None:
            self.script.hsas(response)
        return response
