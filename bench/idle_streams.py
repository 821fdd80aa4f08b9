"""Encrypt and CreateKey p99 while 500 idle streams are open and unauthenticated reads loop.

    python -m bench.idle_streams                   # a fresh 2-node local domain in a temp dir
    python -m bench.idle_streams --rounds 5 --json idle.json

Issue 21 item 2: idle health `Watch` and reflection streams once held a server thread each,
so 100 of them on the coordinator's operator port (no certificate needed) stopped both of its
ports, and 16 from an application certificate stopped an HSA's Encrypt. This measures what an
application gets while someone tries that again.

A fresh local domain (`bench._cluster.BenchDomain`, two HSAs; one in quick mode). Each round
measures Encrypt (1 KiB) and CreateKey in three phases: quiet; with 500 idle streams open;
with the streams and a loop of unauthenticated reads. One caller, raw stubs as the demo
application, round-robin over the HSAs, a 5 s deadline per call; a call that fails counts with
the time it took (so a call stuck at its deadline shows in p99) and in `_errors`. The idle
streams are opened and left alone (never read, never ended): half on the coordinator's operator
port without a certificate, half on hsa-1 as the demo application, each half reflection and
health `Watch`. The read loop: `GetDomainStatus`, `ListProposals`, `GetLatestState`,
`ListHsas` in turn on the operator port, two threads, in a process of its own so that it does
not take this client's interpreter from the measured calls (it still takes the machine's CPU).

Figures, for `<op>` in `encrypt_1k` and `create_key` and `<phase>` in `quiet`, `streams`
(idle streams only) and `attack` (streams and the read loop): `<op>_<phase>_p50_ms` and
`_p99_ms` (medians over rounds), `<op>_<phase>_errors` (all rounds), `<op>_streams_p99_ratio`
and `<op>_attack_p99_ratio` (that phase's p99 / the quiet p99, taken round by round, median;
the issue's target: <= 2 under attack); `idle_streams_opened` and `idle_streams_open` (still
open once the attack settled: the servers refuse the rest at once), `unauthenticated_reads_per_s`
and `unauthenticated_read_errors` (refused or failed reads). Quick: one round of 200 Encrypt and
60 CreateKey calls per phase; full: three rounds of 1,000 and 300. Client and servers share
this machine's cores; on a busy machine the ratios say more than the milliseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure, Target
from bench._stats import percentile
from domain_edge import transport
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "idle_streams"
TITLE: Final = (
    "Encrypt and CreateKey p99 with 500 idle streams open and unauthenticated reads looping"
)
TARGETS: Final = (
    Target(
        "encrypt_1k_attack_p99_ratio",
        "<=",
        2.0,
        "Encrypt p99 with 500 idle streams and a read loop within 2x of quiet (issue 21)",
    ),
    Target(
        "create_key_attack_p99_ratio",
        "<=",
        2.0,
        "CreateKey p99 with 500 idle streams and a read loop within 2x of quiet (issue 21)",
    ),
)

IDLE_STREAMS: Final = 500
CALL_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 5.0
READ_THREADS: Final = 2
SETTLE_SECONDS: Final = 1.0
PAYLOAD: Final = os.urandom(1024)
CONTEXT: Final = {"bench": "idle-streams"}
OPERATIONS: Final = ("encrypt_1k", "create_key")

__all__ = ["NAME", "TARGETS", "TITLE", "Phase", "Round", "figures_of", "main", "measure", "run"]


# --- measured calls --------------------------------------------------------------------------


@dataclass
class Phase:
    """One operation's calls in one phase of one round: latencies (ms) and failures."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    def p(self, q: float) -> float:
        """The q-th percentile of the latencies (failed calls included, at what they took)."""
        return percentile(self.latencies_ms, q)


def _timed(call: Callable[[], object], count: int) -> Phase:
    """`count` calls one after the other; every call is timed, failed ones too."""
    phase = Phase()
    for _ in range(count):
        began = time.perf_counter()
        try:
            call()
        except grpc.RpcError as error:
            phase.errors += 1
            phase.first_error = phase.first_error or f"{error.code().name}: {error.details()}"
        phase.latencies_ms.append((time.perf_counter() - began) * 1000)
    return phase


class Application:
    """The demo application's raw KeyService stubs, one per HSA, called in turn."""

    def __init__(self, domain: BenchDomain) -> None:
        tls = domain.client_tls()
        self._channels = [
            transport.mtls_channel(domain.address(h), tls, transport.hsa_host(h))
            for h in domain.hosts
        ]
        self._stubs: list[Any] = [
            services_pb2_grpc.KeyServiceStub(c)  # type: ignore[no-untyped-call]
            for c in self._channels
        ]
        self._turn = 0
        created = self._next().CreateKey(
            services_pb2.CreateKeyRequest(description="idle streams benchmark"),
            timeout=CALL_TIMEOUT,
        )
        self._encrypt = services_pb2.EncryptRequest(
            key_id=created.metadata.key_id, plaintext=PAYLOAD, encryption_context=CONTEXT
        )

    def _next(self) -> Any:
        self._turn += 1
        return self._stubs[self._turn % len(self._stubs)]

    def encrypt(self) -> None:
        self._next().Encrypt(self._encrypt, timeout=CALL_TIMEOUT)

    def create_key(self) -> None:
        self._next().CreateKey(
            services_pb2.CreateKeyRequest(description="idle streams benchmark"),
            timeout=CALL_TIMEOUT,
        )

    def measure(self, encrypts: int, creates: int) -> dict[str, Phase]:
        """Warm up, then every operation once as a phase."""
        _timed(self.encrypt, 10)
        return {
            "encrypt_1k": _timed(self.encrypt, encrypts),
            "create_key": _timed(self.create_key, creates),
        }

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


# --- the attack ------------------------------------------------------------------------------


class Attack:
    """Idle streams on the operator port and on hsa-1, and a read loop in another process."""

    def __init__(self, domain: BenchDomain, work_dir: Path, *, reads: bool = True) -> None:
        self._domain = domain
        self._reads = reads
        self._quiet = threading.Event()
        self.calls: list[Any] = []
        self._channels: list[grpc.Channel] = []
        self._reader: subprocess.Popen[str] | None = None
        self._ca_file = work_dir / "ca.crt"
        self._ca_file.write_bytes(domain.ca_pem())

    def __enter__(self) -> Attack:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        domain = self._domain
        operator = transport.secure_channel(
            domain.coordinator_operator_address, domain.ca_pem(), transport.COORDINATOR
        )
        application = transport.mtls_channel(
            domain.address(domain.hosts[0]), domain.client_tls(), transport.ANY_HSA
        )
        self._channels = [operator, application]
        for channel in self._channels:
            self._open(channel, IDLE_STREAMS // len(self._channels))
        if not self._reads:
            time.sleep(SETTLE_SECONDS)
            return
        self._reader = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.idle_streams",
                "read-loop",
                domain.coordinator_operator_address,
                str(self._ca_file),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(SETTLE_SECONDS)

    def _open(self, channel: grpc.Channel, count: int) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

        def silence() -> Iterator[reflection_pb2.ServerReflectionRequest]:
            self._quiet.wait()  # a request stream that sends nothing while the attack lasts
            yield from ()

        for index in range(count):
            if index % 2:
                self.calls.append(reflect.ServerReflectionInfo(silence()))
            else:
                self.calls.append(health.Watch(health_pb2.HealthCheckRequest(service="")))

    def open_streams(self) -> int:
        """Streams the servers still hold open (the rest were refused)."""
        return sum(1 for call in self.calls if call.is_active())

    def stop_reader(self) -> dict[str, float]:
        """Stop the read loop; what it counted (reads, errors, seconds)."""
        reader, self._reader = self._reader, None
        if reader is None:
            return {}
        reader.send_signal(signal.SIGTERM)
        output, _ = reader.communicate(timeout=30)
        try:
            counts: dict[str, float] = json.loads(output.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {}
        return counts

    def __exit__(self, *exc: object) -> None:
        self.stop_reader()
        self._quiet.set()
        for call in self.calls:
            call.cancel()
        for channel in self._channels:
            channel.close()
        time.sleep(SETTLE_SECONDS)  # the servers see the streams end


def read_loop(address: str, ca_file: Path) -> None:
    """Unauthenticated reads on the operator port until SIGTERM; prints the counts as JSON."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    channel = transport.secure_channel(address, ca_file.read_bytes(), transport.COORDINATOR)
    stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
    reads: list[Callable[[], object]] = [
        lambda: stub.GetDomainStatus(services_pb2.DomainStatusRequest(), timeout=READ_TIMEOUT),
        lambda: stub.ListProposals(services_pb2.ListProposalsRequest(), timeout=READ_TIMEOUT),
        lambda: stub.GetLatestState(services_pb2.LatestStateRequest(), timeout=READ_TIMEOUT),
        lambda: stub.ListHsas(services_pb2.ListHsasRequest(), timeout=READ_TIMEOUT),
    ]
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def loop() -> None:
        done: Counter[str] = Counter()
        index = 0
        while not stop.is_set():
            try:
                reads[index % len(reads)]()
                done["reads"] += 1
            except grpc.RpcError:
                done["errors"] += 1
            index += 1
        with lock:
            counts.update(done)

    began = time.monotonic()
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(READ_THREADS)]
    for thread in threads:
        thread.start()
    while not stop.wait(0.2):
        pass
    for thread in threads:
        thread.join(timeout=READ_TIMEOUT + 5)
    channel.close()
    report = {"reads": counts["reads"], "errors": counts["errors"]}
    print(json.dumps(report | {"seconds": round(time.monotonic() - began, 3)}), flush=True)


# --- rounds and figures ----------------------------------------------------------------------


@dataclass
class Round:
    """One round: quiet and under attack, per operation; what the attack held and read."""

    quiet: dict[str, Phase]
    streams: dict[str, Phase]
    attack: dict[str, Phase]
    streams_open: int
    reads: dict[str, float]


def measure(
    domain: BenchDomain,
    work_dir: Path,
    *,
    rounds: int,
    encrypts: int,
    creates: int,
    log: Callable[[str], None],
) -> list[Round]:
    """`rounds` rounds of quiet then attacked phases on a running domain."""
    application = Application(domain)
    done: list[Round] = []
    try:
        for number in range(1, rounds + 1):
            log(f"   round {number}: quiet")
            quiet = application.measure(encrypts, creates)
            log(f"   round {number}: {IDLE_STREAMS} idle streams")
            with Attack(domain, work_dir, reads=False) as attack:
                streams = application.measure(encrypts, creates)
            log(f"   round {number}: {IDLE_STREAMS} idle streams and a read loop")
            with Attack(domain, work_dir) as attack:
                attacked = application.measure(encrypts, creates)
                streams_open = attack.open_streams()
                reads = attack.stop_reader()
            done.append(Round(quiet, streams, attacked, streams_open, reads))
    finally:
        application.close()
    return done


def figures_of(rounds: Sequence[Round]) -> dict[str, Figure]:
    """The runner's figures (see the module docstring): medians over rounds; ratios taken
    round by round, then their median (the machine's speed changes between rounds)."""
    if not rounds:
        raise ValueError("no round was measured")
    figures: dict[str, Figure] = {
        "idle_streams_opened": IDLE_STREAMS,
        "idle_streams_open": min(r.streams_open for r in rounds),
        "rounds": len(rounds),
    }
    for operation in OPERATIONS:
        for phase in ("quiet", "streams", "attack"):
            samples = [getattr(r, phase)[operation] for r in rounds]
            for q in (50, 99):
                figures[f"{operation}_{phase}_p{q}_ms"] = round(
                    statistics.median(s.p(q) for s in samples), 3
                )
            figures[f"{operation}_{phase}_errors"] = sum(s.errors for s in samples)
        for phase in ("streams", "attack"):
            ratios = [getattr(r, phase)[operation].p(99) / r.quiet[operation].p(99) for r in rounds]
            figures[f"{operation}_{phase}_p99_ratio"] = round(statistics.median(ratios), 3)
        first_error = next(
            (r.attack[operation].first_error for r in rounds if r.attack[operation].first_error), ""
        )
        if first_error:
            figures[f"{operation}_attack_first_error"] = first_error[:200]
    seconds = sum(r.reads.get("seconds", 0.0) for r in rounds)
    figures["unauthenticated_reads_per_s"] = round(
        sum(r.reads.get("reads", 0.0) for r in rounds) / seconds if seconds else 0.0, 1
    )
    figures["unauthenticated_read_errors"] = int(sum(r.reads.get("errors", 0.0) for r in rounds))
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry (see the module docstring for quick mode)."""
    directory = config.directory(NAME)
    with BenchDomain(directory / "domain", nodes=int(config.pick(1, 2))) as domain:
        rounds = measure(
            domain,
            directory,
            rounds=int(config.pick(1, 3)),
            encrypts=int(config.pick(200, 1000)),
            creates=int(config.pick(60, 300)),
            log=config.log,
        )
    return figures_of(rounds)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures (or, as `read-loop`, the attacker's reads)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["read-loop"] and len(arguments) == 3:
        read_loop(arguments[1], Path(arguments[2]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.idle_streams",
        description="Encrypt and CreateKey p99, quiet and with 500 idle streams and a read loop",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--nodes", type=int, default=2, help="HSAs (default 2)")
    parser.add_argument("--encrypts", type=int, default=1000, help="Encrypt calls per phase")
    parser.add_argument("--creates", type=int, default=300, help="CreateKey calls per phase")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(arguments)
    if min(args.rounds, args.nodes, args.encrypts, args.creates) < 1:
        parser.error("--rounds, --nodes, --encrypts and --creates must be positive")

    def log(message: str) -> None:
        print(message.strip(), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="idle-streams-") as scratch:
        work = Path(scratch)
        with BenchDomain(work / "domain", nodes=args.nodes) as domain:
            rounds = measure(
                domain,
                work,
                rounds=args.rounds,
                encrypts=args.encrypts,
                creates=args.creates,
                log=log,
            )
    figures = figures_of(rounds)
    for key, value in figures.items():
        print(f"{key:40} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
