"""Hostile input against every RPC of every server: only client errors, no crash, no change.

One small domain for the module: a real `domain-coordinator` and two real `hsa-node`
processes. Every method of `Coordinator`, `HsaAdmin`, `HsaPeer`, `Diagnostics` and
`KeyService` gets, from a caller allowed to use it (so the input reaches the servicer):
(a) random bytes as the request body, through a raw channel with no serializer, so the server
parses the garbage (`support.fuzz.random_bodies`, crafted encodings first);
(b) hypothesis-generated messages that parse but are hostile (`support.fuzz.messages`);
(c) for the calls that verify signatures, mutants of a valid request, re-signed with the real
operators' and hosts' keys half of the time, so they get past the signature checks
(`support.fuzz.mutants`).

Every answer must be OK or a documented client error (`CLIENT_ERRORS`; UNAVAILABLE only from
the key service, which documents it); never INTERNAL, UNKNOWN or a timeout. Afterwards every
process is alive, its resident memory grew by less than `RSS_GROWTH_LIMIT_MB` in all and
stops growing under repeated rounds of the same load, and the domain state is unchanged (the
coordinator's head, each HSA's version and hash). Messages over `limits.max_message_bytes` are
refused with RESOURCE_EXHAUSTED; WatchStates streams are bounded (per host: a new one replaces
the host's oldest), and neither a stuck stream nor a half-open connection keeps anyone else
waiting. A bounded atheris run fuzzes the pure parsers of domain_core. The number of inputs
each server took is printed at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support.fuzz import messages, mutants, random_bodies, write_seed_corpus
from support.hsa_nodes import (
    COORDINATOR,
    REPO,
    Domain,
    Processes,
    copy_domain,
    make_domain_template,
)
from support.malicious_coordinator import forging_domain

from domain_core import canonical, quorum, sealing
from domain_core.chain import TrustedChain
from domain_core.errors import HsmDomainError
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import Proposal, SealedState, state_hash
from domain_core.signers import Signer
from domain_edge import transport
from domain_proto import domain_pb2, services_pb2

pytestmark = pytest.mark.integration

CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The key service documents UNAVAILABLE (no keys yet, the coordinator out of reach).
DOCUMENTED_UNAVAILABLE = frozenset({"KeyService"})
RANDOM_BODIES_PER_TARGET = 100
RANDOM_BODIES_STREAMING = 25
HYPOTHESIS_EXAMPLES = 60
HYPOTHESIS_EXAMPLES_STREAMING = 15
MUTANT_EXAMPLES = 200
ATHERIS_RUNS = 10_000
CALL_TIMEOUT = 10.0
STREAM_TIMEOUT = 0.1  # an accepted stream stays open: its deadline ends the call
RSS_GROWTH_LIMIT_MB = 150
RSS_ROUND_GROWTH_LIMIT_MB = 24
SERVICES = ("Coordinator", "HsaAdmin", "HsaPeer", "Diagnostics", "KeyService")
HSAS = ("hsa-1", "hsa-2")
ROTATE = [domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey())]
_BIG = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _BIG),
    ("grpc.max_receive_message_length", _BIG),
    ("grpc.enable_retries", 0),
]

METHODS: list[tuple[str, str]] = [
    (service, method.name)
    for service in SERVICES
    for method in services_pb2.DESCRIPTOR.services_by_name[service].methods
]


# --- the servers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One server, reached as one caller."""

    server: str  # "coordinator", "hsa-1", ...
    caller: str  # "hsa-3", "operator", "coordinator", "demo-app"
    channel: grpc.Channel


@dataclass
class Fleet:
    """The running domain, channels to it, and what the fuzzing did to it."""

    domain: Domain
    procs: Processes
    targets: dict[str, list[Target]]  # by service
    inputs: Counter[str] = field(default_factory=Counter)  # by server
    rss_before: dict[str, int] = field(default_factory=dict)
    heads_before: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    def pid(self, name: str) -> int:
        return self.procs.procs[name].pid


def _channel(address: str, domain: Domain, who: str | None) -> grpc.Channel:
    ca = domain.layout.ca_cert.read_bytes()
    if who is None:
        credentials = transport.channel_credentials(ca)
    else:
        tls = domain.tls(who)
        credentials = transport.channel_credentials(ca, tls.cert_pem, tls.key_pem)
    return grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _heads(fleet: Fleet) -> dict[str, tuple[int, bytes]]:
    coordinator = fleet.targets["Coordinator"][0].channel
    status = coordinator.unary_unary(
        "/hsmdomain.v1.Coordinator/GetDomainStatus",
        request_serializer=services_pb2.DomainStatusRequest.SerializeToString,
        response_deserializer=services_pb2.DomainStatusResponse.FromString,
    )(services_pb2.DomainStatusRequest(), timeout=CALL_TIMEOUT)
    heads = {COORDINATOR: (status.version, status.state_hash)}
    for host in HSAS:
        node = fleet.procs.status(host)
        assert node.healthy, node.detail
        heads[host] = (node.version, node.state_hash)
    return heads


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    template = make_domain_template(tmp_path_factory.mktemp("fuzz-template") / "d")
    domain = copy_domain(template, tmp_path_factory.mktemp("fuzz") / "d")
    procs = Processes(domain)
    channels: list[grpc.Channel] = []
    try:
        procs.start(COORDINATOR)
        domain.configure_nodes(coordinator=procs.addresses[COORDINATOR])
        procs.start(*HSAS)

        def target(server: str, caller: str) -> Target:
            address = procs.operator_address if caller == "operator" else procs.addresses[server]
            channel = _channel(address, domain, None if caller == "operator" else caller)
            channels.append(channel)
            return Target(server, caller, channel)

        targets = {
            "Coordinator": [target(COORDINATOR, "hsa-3"), target(COORDINATOR, "operator")],
            "HsaAdmin": [target(h, COORDINATOR) for h in HSAS],
            "HsaPeer": [target(h, "hsa-3") for h in HSAS],
            "Diagnostics": [target(h, "demo-app") for h in HSAS],
            "KeyService": [target(h, "demo-app") for h in HSAS],
        }
        fleet = Fleet(domain, procs, targets)
        _wait_registered(fleet)
        fleet.heads_before = _heads(fleet)
        fleet.rss_before = {n: _rss_kib(fleet.pid(n)) for n in (COORDINATOR, *HSAS)}
        yield fleet
        _report(request, fleet)
    finally:
        for channel in channels:
            channel.close()
        procs.kill_all()


def _wait_registered(fleet: Fleet) -> None:
    list_hsas = fleet.targets["Coordinator"][0].channel.unary_unary(
        "/hsmdomain.v1.Coordinator/ListHsas",
        request_serializer=services_pb2.ListHsasRequest.SerializeToString,
        response_deserializer=services_pb2.ListHsasResponse.FromString,
    )
    deadline = time.monotonic() + 20
    while {h.host_id for h in list_hsas(services_pb2.ListHsasRequest(), timeout=5).hsas} != set(
        HSAS
    ):
        assert time.monotonic() < deadline, "the HSAs did not register"
        time.sleep(0.1)


def _report(request: pytest.FixtureRequest, fleet: Fleet) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"  {name}: {count} inputs" for name, count in sorted(fleet.inputs.items())]
    text = "\nfuzz inputs per server:\n" + "\n".join(lines) + "\n"
    if reporter is not None:
        reporter.write(text)
    else:
        sys.stderr.write(text)


# --- calling ---------------------------------------------------------------------------------


def _streaming(service: str, method: str) -> bool:
    return bool(
        services_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method].server_streaming
    )


def call(fleet: Fleet, target: Target, service: str, method: str, body: bytes) -> grpc.StatusCode:
    """Send `body` as the request, unparsed; the status code the server answered with."""
    fleet.inputs[target.server] += 1
    path = f"/hsmdomain.v1.{service}/{method}"
    try:
        if _streaming(service, method):
            stream = target.channel.unary_stream(path)(body, timeout=STREAM_TIMEOUT)
            for _ in stream:
                pass
        else:
            target.channel.unary_unary(path)(body, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and _streaming(service, method):
            return grpc.StatusCode.OK  # the stream was accepted and stayed open
        return code
    return grpc.StatusCode.OK


def allowed(service: str, code: grpc.StatusCode) -> bool:
    if code == grpc.StatusCode.OK or code in CLIENT_ERRORS:
        return True
    return code == grpc.StatusCode.UNAVAILABLE and service in DOCUMENTED_UNAVAILABLE


class Outcomes:
    """Answers outside the allowed set, grouped by (method, caller, code)."""

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()
        self.examples: dict[str, bytes] = {}

    def record(
        self, service: str, method: str, target: Target, code: grpc.StatusCode, body: bytes
    ) -> None:
        if allowed(service, code):
            return
        key = f"{service}/{method} as {target.caller} on {target.server}: {code.name}"
        self.bad[key] += 1
        self.examples.setdefault(key, body[:24])

    def check(self) -> None:
        assert not self.bad, "answers outside the documented client errors:\n" + "\n".join(
            f"  {key} x{count} (e.g. body {self.examples[key]!r}...)"
            for key, count in sorted(self.bad.items())
        )


def _still_alive(fleet: Fleet) -> None:
    for name, proc in fleet.procs.procs.items():
        assert proc.poll() is None, f"{name} died:\n{fleet.procs.log_text(name)[-3000:]}"


# --- (a) random bytes --------------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_random_bytes_to_every_rpc(fleet: Fleet, service: str) -> None:
    outcomes = Outcomes()
    for method in services_pb2.DESCRIPTOR.services_by_name[service].methods:
        streaming = _streaming(service, method.name)
        count = RANDOM_BODIES_STREAMING if streaming else RANDOM_BODIES_PER_TARGET
        seed = zlib.crc32(method.full_name.encode())
        for target in fleet.targets[service]:
            for body in random_bodies(seed, count):
                code = call(fleet, target, service, method.name, body)
                outcomes.record(service, method.name, target, code, body)
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    outcomes.check()


# --- (b) hostile messages ----------------------------------------------------------------------


def _fuzz(
    fleet: Fleet,
    service: str,
    method: str,
    strategy: st.SearchStrategy[Any],
    examples: int,
    targets: list[Target] | None = None,
) -> Outcomes:
    outcomes = Outcomes()
    chosen = targets or fleet.targets[service][:1]

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(message: Any) -> None:
        if message is None:
            return
        body = message.SerializeToString()
        for target in chosen:
            code = call(fleet, target, service, method, body)
            outcomes.record(service, method, target, code, body)

    run()
    return outcomes


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m}" for s, m in METHODS])
def test_hostile_messages_to_every_rpc(fleet: Fleet, service: str, method: str) -> None:
    descriptor = services_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    examples = HYPOTHESIS_EXAMPLES_STREAMING if descriptor.server_streaming else HYPOTHESIS_EXAMPLES
    outcomes = _fuzz(fleet, service, method, messages(descriptor.input_type), examples)
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    outcomes.check()


# --- (c) mutants of valid requests, re-signed ----------------------------------------------------


def _approval(signer: Signer, raw_proposal: bytes) -> domain_pb2.Approval:
    proposal_id = canonical.proposal_id(raw_proposal)
    return domain_pb2.Approval(
        proposal_id=proposal_id,
        operator_id=signer.public_key.key_id,
        signature=signer.sign(quorum.approval_message(proposal_id)),
    )


@pytest.fixture(scope="module")
def valid(fleet: Fleet) -> dict[str, Any]:
    """Valid requests for the current head (genesis) and the keys to re-sign mutants."""
    sim = forging_domain(fleet.domain.layout)
    proposal = sim.propose(ROTATE)
    approvals = sim.approve(proposal, [0, 1])
    next_state = sim.apply(proposal, approvals, append=False)
    return {"sim": sim, "proposal": proposal, "approvals": approvals, "next": next_state}


def test_mutated_apply_requests(fleet: Fleet, valid: dict[str, Any]) -> None:
    sim = valid["sim"]
    signers = [sim.operators[0].signer, sim.operators[1].signer]
    base = services_pb2.ApplyProposalRequest(
        proposal=valid["proposal"].raw, approvals=valid["approvals"]
    )

    def resign(message: Any) -> None:
        del message.approvals[:]
        message.approvals.extend(_approval(s, message.proposal) for s in signers)

    outcomes = _fuzz(fleet, "HsaAdmin", "ApplyProposal", mutants(base, resign), MUTANT_EXAMPLES)
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    outcomes.check()


def test_mutated_proposal_submissions(fleet: Fleet, valid: dict[str, Any]) -> None:
    sim = valid["sim"]
    by_id = {o.operator_id: o.signer for o in sim.operators}
    proposal: Proposal = valid["proposal"]
    base = services_pb2.SubmitProposalRequest(
        proposal=proposal.raw, proposer_approval=valid["approvals"][0]
    )

    def resign(message: Any) -> None:
        parsed = domain_pb2.Proposal()
        try:
            parsed.ParseFromString(message.proposal)
        except Exception:
            return
        signer = by_id.get(parsed.proposer_id, sim.operators[0].signer)
        message.proposer_approval.CopyFrom(_approval(signer, message.proposal))

    outcomes = _fuzz(
        fleet,
        "Coordinator",
        "SubmitProposal",
        mutants(base, resign),
        MUTANT_EXAMPLES,
        targets=fleet.targets["Coordinator"],
    )
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    outcomes.check()


def test_mutated_states_to_install(fleet: Fleet, valid: dict[str, Any]) -> None:
    """Mutants of a valid next state, re-signed by hsa-1 half of the time; a mutant that
    still verifies here (so the HSA may rightly install it) is not sent."""
    sim = valid["sim"]
    producer = sim.hosts["hsa-1"]
    operators = [sim.operators[0].signer, sim.operators[1].signer]
    genesis: SealedState = sim.genesis
    base = services_pb2.InstallStateRequest(state=valid["next"].message)

    def resign(message: Any) -> None:
        state = message.state
        if state.proposal:
            del state.approvals[:]
            state.approvals.extend(_approval(s, state.proposal) for s in operators)
        digest = state_hash(state.manifest, state.secrets)
        state.producer_signature = producer.signer.sign(sealing.state_signing_message(digest))

    def still_valid(message: Any) -> bool:
        try:
            state = SealedState.from_message(message.state)
            chain = TrustedChain.from_genesis(sim.domain_id, genesis.hash, genesis)
            chain.update(state, now=int(time.time()))
            sealing.unseal_state(state, "hsa-1", producer.agreement_private_key)
        except HsmDomainError:
            return False
        return True

    strategy = mutants(base, resign).map(lambda m: None if still_valid(m) else m)
    outcomes = _fuzz(fleet, "HsaAdmin", "InstallState", strategy, MUTANT_EXAMPLES)
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    outcomes.check()


# --- limits ------------------------------------------------------------------------------------


def test_oversized_messages_are_refused_by_limit(fleet: Fleet) -> None:
    over = DEFAULT_LIMITS.max_message_bytes + 1
    cases = [
        ("Diagnostics", "Echo", services_pb2.EchoMessage(payload=b"x" * over)),
        ("HsaAdmin", "ApplyProposal", services_pb2.ApplyProposalRequest(proposal=b"p" * over)),
        (
            "Coordinator",
            "SubmitProposal",
            services_pb2.SubmitProposalRequest(proposal=b"p" * over),
        ),
    ]
    for service, method, message in cases:
        for target in fleet.targets[service]:
            code = call(fleet, target, service, method, message.SerializeToString())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (service, method, target.caller)
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before


def _echo_in_time(fleet: Fleet, host: str, deadline: float = 5.0) -> None:
    echo = fleet.targets["Diagnostics"][HSAS.index(host)].channel.unary_unary(
        "/hsmdomain.v1.Diagnostics/Echo",
        request_serializer=services_pb2.EchoMessage.SerializeToString,
        response_deserializer=services_pb2.EchoMessage.FromString,
    )
    assert echo(services_pb2.EchoMessage(payload=b"ping"), timeout=deadline).payload == b"ping"


def _domain_status_in_time(channel: grpc.Channel, deadline: float = 5.0) -> int:
    status = channel.unary_unary(
        "/hsmdomain.v1.Coordinator/GetDomainStatus",
        request_serializer=services_pb2.DomainStatusRequest.SerializeToString,
        response_deserializer=services_pb2.DomainStatusResponse.FromString,
    )(services_pb2.DomainStatusRequest(), timeout=deadline)
    return int(status.version)


def test_watch_streams_are_bounded_and_stuck_ones_block_nobody(fleet: Fleet) -> None:
    channel = _channel(fleet.procs.addresses[COORDINATOR], fleet.domain, "hsa-3")
    watch = channel.unary_stream(
        "/hsmdomain.v1.Coordinator/WatchStates",
        request_serializer=services_pb2.WatchStatesRequest.SerializeToString,
        response_deserializer=domain_pb2.SealedState.FromString,
    )
    held: list[Any] = []
    try:
        # More streams than the coordinator's global cap (64), all from one host: each new one
        # replaces that host's oldest (the coordinator's per-host slots), and one that comes
        # while the replaced ones are still closing may be refused by the server's per-caller
        # stream cap (StreamLimits): either way the host never holds more than its slots.
        refused: list[grpc.StatusCode] = []
        for _ in range(200):
            stream = watch(services_pb2.WatchStatesRequest(after_version=0), timeout=60)
            fleet.inputs[COORDINATOR] += 1
            try:
                next(stream)  # genesis; then the stream waits, and this client never reads
            except grpc.RpcError as error:
                refused.append(error.code())
                continue
            held.append(stream)
        assert set(refused) <= {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(held) >= 2, f"only {len(held)} of 200 streams were admitted"
        deadline = time.monotonic() + 10
        per_host = DEFAULT_LIMITS.max_watch_streams_per_host
        while sum(s.is_active() for s in held) > per_host:
            assert time.monotonic() < deadline, "replaced streams stayed open"
            time.sleep(0.05)
        replaced = held[0]
        with pytest.raises(grpc.RpcError) as ended:
            next(replaced)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert all(s.is_active() for s in held[-per_host:])
        # Everyone else is served meanwhile, well within their deadlines.
        other = _channel(fleet.procs.addresses[COORDINATOR], fleet.domain, "hsa-1")
        try:
            assert _domain_status_in_time(other) == 1
        finally:
            other.close()
        for host in HSAS:
            _echo_in_time(fleet, host)
    finally:
        for stream in held:
            stream.cancel()
    # The slots come back once the stuck streams are gone.
    stream = watch(services_pb2.WatchStatesRequest(after_version=0), timeout=5)
    assert next(stream).manifest
    stream.cancel()
    channel.close()


def test_half_open_connections_block_nobody(fleet: Fleet) -> None:
    """Connections that never finish their TLS handshake cost the servers nothing visible."""
    sockets: list[socket.socket] = []
    try:
        for name in (COORDINATOR, *HSAS):
            host, port = fleet.procs.addresses[name].rsplit(":", 1)
            for _ in range(50):
                sock = socket.create_connection((host, int(port)), timeout=2)
                sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello start
                sockets.append(sock)
        assert _domain_status_in_time(fleet.targets["Coordinator"][1].channel) == 1
        for host in HSAS:
            _echo_in_time(fleet, host)
            assert fleet.procs.status(host).healthy
    finally:
        for sock in sockets:
            sock.close()


# --- the pure parsers, with atheris ---------------------------------------------------------


def _run_atheris(corpus: Path, runs: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """The harness of support.fuzz in its own process (libFuzzer exits when it is done)."""
    artifacts = corpus.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "support.fuzz", f"--runs={runs}"]
    return subprocess.run(
        [*command, f"--artifacts={artifacts}", *extra, str(corpus)],
        cwd=REPO / "tests",
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )


def test_parsers_survive_atheris(fleet: Fleet, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    write_seed_corpus(corpus, fleet.domain.layout.genesis_state.read_bytes())
    result = _run_atheris(corpus, ATHERIS_RUNS)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Done {ATHERIS_RUNS} runs" in result.stdout

    # The harness does catch a parser that raises something else than a domain error.
    (corpus / "planted").write_bytes(b"\x00BUG!")
    planted = _run_atheris(corpus, 100, "--plant-bug")
    assert planted.returncode != 0
    assert "RuntimeError: planted bug" in planted.stdout
    assert list((tmp_path / "artifacts").glob("crash-*"))


# --- afterwards -------------------------------------------------------------------------------


def _hostile_round(fleet: Fleet, seed: int) -> None:
    """The same mix of garbage, hostile and oversized requests to every server."""
    over = services_pb2.EchoMessage(payload=b"x" * (DEFAULT_LIMITS.max_message_bytes + 1))
    for service, method in METHODS:
        if _streaming(service, method):
            continue
        for target in fleet.targets[service]:
            for body in random_bodies(seed, 8):
                call(fleet, target, service, method, body)
    for target in fleet.targets["Diagnostics"]:
        call(fleet, target, "Diagnostics", "Echo", over.SerializeToString())


def test_memory_stops_growing_under_repeated_hostile_load(fleet: Fleet) -> None:
    """After a first round (caches, allocator high-water marks), more rounds add ~nothing."""
    names = (COORDINATOR, *HSAS)
    _hostile_round(fleet, seed=1)
    warm = {n: _rss_kib(fleet.pid(n)) for n in names}
    for _ in range(2):
        _hostile_round(fleet, seed=1)
    after = {n: _rss_kib(fleet.pid(n)) for n in names}
    for name in names:
        growth_mb = (after[name] - warm[name]) / 1024
        print(f"{name}: VmRSS {warm[name] // 1024} MiB -> {after[name] // 1024} MiB over 2 rounds")
        assert growth_mb < RSS_ROUND_GROWTH_LIMIT_MB, f"{name} grew by {growth_mb:.0f} MiB"
    _still_alive(fleet)


def test_every_server_survived_unchanged_with_bounded_memory(fleet: Fleet) -> None:
    _still_alive(fleet)
    assert _heads(fleet) == fleet.heads_before
    for name, before in fleet.rss_before.items():
        after = _rss_kib(fleet.pid(name))
        growth_mb = (after - before) / 1024
        print(f"{name}: VmRSS {before // 1024} MiB -> {after // 1024} MiB")
        assert growth_mb < RSS_GROWTH_LIMIT_MB, f"{name} grew by {growth_mb:.0f} MiB"
    assert sum(fleet.inputs.values()) > 0
