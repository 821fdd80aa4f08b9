"""A malicious coordinator for chaos tests: a real `Coordinator` server that lies to real HSAs.

`MaliciousCoordinatorServer` listens on 127.0.0.1:0 with mutual TLS under the REAL coordinator
certificate of a domain made by `deploy.init.init_domain`, so `hsa-node` processes configured
to use it connect to it, and it calls their `HsaAdmin` (InstallState, ApplyProposal) as the
coordinator identity they accept. It serves whatever chain a test scripts (`serve`): on the
`WatchStates` stream (the whole script again each time it changes, whatever version the HSA
asked after: a rollback or a fork is delivered too), on `GetStatesAfter` and on
`GetLatestState`; it holds no key records. It keeps a registry for `RegisterHsa` and
`ListHsas`, so the HSAs gossip among themselves as they would with an honest coordinator.
Every other call is UNIMPLEMENTED.

`forging_domain(layout)` turns the domain on disk into a `support.simulator.SimulatedDomain`
holding the real hosts' and operators' keys (from the identity directories and the demo
passphrase files), so `SimulatedDomain` builds honest states for the real domain and
`support.simulator.MaliciousCoordinator` tampers with them.

Invariants: the server and every channel it opens are closed by `stop()` (also on leaving a
`with` block); nothing here changes the domain's files.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc

from deploy.init import COORDINATOR_NAME, DomainLayout, read_passphrase
from domain_core import transport
from domain_core.errors import NotFoundError
from domain_core.identity import HostIdentity
from domain_core.model import SealedState
from domain_core.pb import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc
from domain_core.signers import InMemorySigner, load_file_token
from domain_core.transport import TlsMaterial
from support.hsa_nodes import Domain, Processes
from support.simulator import MaliciousCoordinator, SimHost, SimOperator, SimulatedDomain

__all__ = [
    "Attack",
    "LogWatch",
    "MaliciousCoordinatorServer",
    "ScriptedChain",
    "coordinator_tls",
    "echo",
    "forging_domain",
    "wait_until",
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
    hosts: dict[str, SimHost] = {}
    for host_id in layout.genesis_nodes:
        identity = HostIdentity.load(layout.node_dir(host_id) / "identity")
        hosts[host_id] = SimHost(
            host_id=host_id,
            signer=cast(InMemorySigner, identity.signer),
            agreement_private_key=identity.agreement_private_key,
            agreement_public_key=identity.agreement_public_key,
            record=records[host_id],
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

    def GetLatestState(
        self, request: services_pb2.LatestStateRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        self.calls["GetLatestState"] += 1
        with self._changed:
            return self.states[-1] if self.states else domain_pb2.SealedState()

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        self.calls["GetStatesAfter"] += 1
        with self._changed:
            if self.states_after_override is not None:
                return services_pb2.StatesResponse(states=self.states_after_override)
            chosen = [s for s in self.states if _version_of(s) > request.after_version]
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
                sent_script, pending = self._script, list(self.states)
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
        with self._changed:
            endpoints = [
                services_pb2.HsaEndpoint(host_id=h, address=a)
                for h, a in sorted(self.registered.items())
            ]
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
        server = transport.make_server(max_workers=32)
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
                channel = transport.mtls_channel(address, self.tls)
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
                channel = transport.mtls_channel(address, self.tls)
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
