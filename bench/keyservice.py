"""The key service: Encrypt, Decrypt, GenerateDataKey, ReEncrypt and CreateKey, as the floor.

What is measured, each at concurrency 1 and 16, with the audit log on (as always):
- against a one-node domain: `encrypt_1k` and `decrypt_1k` (1 KiB, a one-entry encryption
  context), `generate_data_key` (a 32-byte AES-256 data key), `re_encrypt_1k` (a 1 KiB
  ciphertext re-encrypted under a second key) and `create_key` (a new key: its record is
  sealed on the HSA and stored durably by the coordinator);
- against a three-node domain, the client spreading calls round-robin over the three HSAs:
  `encrypt_1k_3node`, `decrypt_1k_3node`, `generate_data_key_3node`.

Through key-service sessions (one node): `encrypt_1k_session` and `decrypt_1k_session`, the
same calls over one `KeyService.Session` stream per node (`bench._sessions.AioSession`, asyncio
tasks at every concurrency), each against the floor of sessions, `echo_1k_session`
(`Diagnostics.EchoSession` of 1 KiB, the same session machinery doing no work), paired as the
unary calls are with theirs: `<op>_session_c<N>_floor_ratio` and the rest below. A session
stream is opened for its run only (before the warm-up) and closed after it.

The floor itself (`echo_1k`: `Diagnostics.Echo` of 1 KiB on the one-node domain, same client)
is measured in the same rounds, a floor run right beside every run of a targeted operation
(Encrypt, Decrypt, GenerateDataKey, ReEncrypt). On this machine the CPU's speed moves by up to
2x within seconds, so the issue's ratios are taken round by round, from the two runs of a pair,
and summarised by their median over rounds (`paired_floor_figures`); the floor benchmark's own
run, minutes earlier, moved by up to ±25 %.

Figures per operation and concurrency N: `<op>_c<N>_p50_ms`, `_p95_ms`, `_p99_ms`,
`_ops_s`, and `_server_cpu_us_per_op` (utime + stime summed over every HSA process, over the
measured windows only; `create_key` also gives `_coordinator_cpu_us_per_op`). The runner adds
the ratios to the floor: for the paired operations, the median over rounds of each round's
ratio, `_floor_ratio` (throughput, goal >= 0.8, with `_floor_low_ratio` and `_floor_high_ratio`
for the lowest and highest round), `_p99_floor_ratio` (p99, goal <= 1.5) and `_cpu_floor_ratio`;
for the others (CreateKey, the 3-node figures) the runner's ratio of medians to the in-run
`echo_1k` at the same concurrency.
The floor is one HSA, so the 3-node ratios compare a whole 3-node domain with one node's Echo:
they show what spreading buys (or costs) on this machine, where every node shares the same
cores.

The client is the one the floor used at each concurrency (`echo_1k_c<N>_client`: N threads on
synchronous channels, or N asyncio tasks on `grpc.aio` channels), with raw stubs over one
reused mutual-TLS channel per node, so a ratio compares the server's work and nothing else.
Keys are used warm: they are cached on every node after the warm-up, and re-read from the
coordinator whenever the cache's TTL (2 s) has passed, as in production.

Full runs interleave the operations and repeat the rounds (5 rounds of 1.5 s per operation and
concurrency); CreateKey's rounds come after the others', since its durable writes slow the
machine for seconds after them. Latency percentiles pool every round, throughput is the median
of the rounds.
Quick mode: one round of 0.3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure, Target
from bench._load import LoadResult, aio_mtls_channel, round_robin, run_tasks, run_threads
from bench._proc import CpuMeter, per_op_us
from bench._sessions import AioEchoSession, AioSession
from bench._stats import median, paired_ratios, percentile
from deploy.init import COORDINATOR_NAME
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "keyservice"
TITLE: Final = "key service: Encrypt, Decrypt, GenerateDataKey, ReEncrypt, CreateKey; 1 and 3 HSAs"
FLOOR_RATIOS: Final = True

PAYLOAD_BYTES: Final = 1024
DATA_KEY_BYTES: Final = 32
CONCURRENCIES: Final = (1, 16)
CONTEXT: Final = {"purpose": "bench-keyservice"}
CALL_TIMEOUT: Final = 10.0
MAX_OPS: Final = 200_000
MAX_CREATES: Final = 5_000
THROUGHPUT_GOAL: Final = 0.8
P99_GOAL: Final = 1.5
# The data-plane operations the floor targets apply to (one node, like the floor).
TARGETED: Final = ("encrypt_1k", "decrypt_1k", "generate_data_key", "re_encrypt_1k")
FLOOR_ECHO: Final = "echo_1k"  # the in-run floor's figure prefix, as the floor benchmark's
FLOOR_ECHO_SESSION: Final = "echo_1k_session"  # the floor of sessions (EchoSession)
SESSION_ECHO: Final = "echo"  # `Operation.session` of the floor of sessions


def _targets() -> tuple[Target, ...]:
    targets: list[Target] = []
    for operation in TARGETED:
        for concurrency in CONCURRENCIES:
            prefix = f"{operation}_c{concurrency}"
            targets.append(
                Target(
                    f"{prefix}_floor_ratio",
                    ">=",
                    THROUGHPUT_GOAL,
                    f"{prefix} throughput >= 0.8 of the floor's",
                )
            )
            targets.append(
                Target(
                    f"{prefix}_p99_floor_ratio",
                    "<=",
                    P99_GOAL,
                    f"{prefix} p99 <= 1.5 times the floor's",
                )
            )
    return tuple(targets)


TARGETS: Final = _targets()

__all__ = [
    "CONCURRENCIES",
    "FLOOR_RATIOS",
    "NAME",
    "TARGETS",
    "TITLE",
    "FloorPair",
    "Measured",
    "Measurement",
    "Operation",
    "client_for",
    "measure",
    "paired_floor_figures",
    "run",
]


@dataclass(frozen=True)
class Operation:
    """One key-service call to measure: the figure prefix, the stub method, the request."""

    name: str
    method: str
    request: Message
    max_ops: int = MAX_OPS
    service: str = "KeyService"  # or "Diagnostics" (the floor's Echo)
    session: str = ""  # over a session: the SessionRequest field, or SESSION_ECHO (EchoSession)


@dataclass
class Cell:
    """Every measured round of one (operation, concurrency) and the CPU the servers used."""

    rounds: list[LoadResult] = field(default_factory=list)
    server_cpu_s: float = 0.0
    coordinator_cpu_s: float = 0.0

    def add(self, load: LoadResult, meters: CpuMeter) -> None:
        """Take one measured round and what it cost the HSAs and the coordinator."""
        self.rounds.append(load)
        self.server_cpu_s += meters.hsa_seconds
        self.coordinator_cpu_s += meters.coordinator_seconds

    def figures(self, prefix: str) -> dict[str, Figure]:
        """Pooled latency percentiles, median throughput, CPU per call."""
        pooled = LoadResult(concurrency=self.rounds[0].concurrency)
        for load in self.rounds:
            pooled.latencies_ns.extend(load.latencies_ns)
            pooled.errors += load.errors
        if not pooled.latencies_ns:
            first = next((r.first_error for r in self.rounds if r.first_error), "no error")
            raise RuntimeError(f"no {prefix} call succeeded: {first}")
        figures: dict[str, Figure] = dict(pooled.figures(prefix))
        figures[f"{prefix}_ops_s"] = median([r.ops_per_second for r in self.rounds])
        figures[f"{prefix}_server_cpu_us_per_op"] = self.server_cpu_s * 1e6 / pooled.operations
        return figures


@dataclass(frozen=True)
class Measured:
    """One closed-loop run and the HSAs' CPU seconds over it."""

    load: LoadResult
    server_cpu_s: float

    @property
    def p99_ms(self) -> float:
        """This run's p99 latency (NaN when no call succeeded)."""
        if not self.load.latencies_ns:
            return math.nan
        return percentile([v / 1e6 for v in self.load.latencies_ns], 99)

    @property
    def cpu_us_per_op(self) -> float:
        """The HSAs' CPU microseconds per call in this run (NaN when no call succeeded)."""
        return per_op_us(self.server_cpu_s, self.load.operations)


@dataclass(frozen=True)
class FloorPair:
    """An operation's run and the floor's, back to back in one round."""

    floor: Measured
    operation: Measured


def paired_floor_figures(pairs: Mapping[tuple[str, int], Sequence[FloorPair]]) -> dict[str, Figure]:
    """The ratios to the floor, round by round: for each paired `(operation, N)`,
    `<op>_c<N>_floor_ratio` (throughput, median of the rounds' ratios) with
    `_floor_low_ratio` / `_floor_high_ratio` (the lowest and highest round),
    `_p99_floor_ratio` and `_cpu_floor_ratio` (medians of the rounds' ratios).

    Each round's two runs are back to back, so the machine's speed divides out of its ratio
    (`bench._stats.paired_ratios`); the runner's ratio of medians (`add_floor_ratios`) is
    used only where no pair was measured.
    """
    figures: dict[str, Figure] = {}
    for (operation, concurrency), rounds in pairs.items():
        prefix = f"{operation}_c{concurrency}"
        throughput = paired_ratios(
            (p.operation.load.ops_per_second, p.floor.load.ops_per_second) for p in rounds
        )
        if throughput is not None:
            figures[f"{prefix}_floor_ratio"] = throughput.median
            figures[f"{prefix}_floor_low_ratio"] = throughput.low
            figures[f"{prefix}_floor_high_ratio"] = throughput.high
        p99 = paired_ratios((p.operation.p99_ms, p.floor.p99_ms) for p in rounds)
        if p99 is not None:
            figures[f"{prefix}_p99_floor_ratio"] = p99.median
        cpu = paired_ratios((p.operation.cpu_us_per_op, p.floor.cpu_us_per_op) for p in rounds)
        if cpu is not None:
            figures[f"{prefix}_cpu_floor_ratio"] = cpu.median
    return figures


def client_for(floor: Mapping[str, Figure], concurrency: int) -> str:
    """The client kind the floor used at `concurrency` (sync threads at 1 and asyncio tasks
    above, when the floor was not measured)."""
    chosen = floor.get(f"echo_1k_c{concurrency}_client")
    if chosen in ("sync", "async"):
        return str(chosen)
    return "sync" if concurrency == 1 else "async"


def _round_robin(stubs: Sequence[dict[str, Any]], operation: Operation) -> Callable[[], Any]:
    """A call of `operation` on the next node in turn (one stub per node and service)."""
    methods = [getattr(stub[operation.service], operation.method) for stub in stubs]
    return round_robin(methods, operation.request, CALL_TIMEOUT)


def _stubs(channel: grpc.Channel | grpc.aio.Channel) -> dict[str, Any]:
    """The key service's and the floor's stubs over one channel."""
    return {
        "KeyService": services_pb2_grpc.KeyServiceStub(channel),  # type: ignore[no-untyped-call]
        "Diagnostics": services_pb2_grpc.DiagnosticsStub(channel),  # type: ignore[no-untyped-call]
    }


class _Clients:
    """Raw KeyService stubs over one channel per node, for each client kind, made once.

    The `grpc.aio` channels live on one event loop (`asyncio.Runner`) for every run.
    """

    def __init__(self, domain: BenchDomain, kinds: set[str], runner: asyncio.Runner) -> None:
        self._runner = runner
        self._sync: list[grpc.Channel] = []
        self._aio: list[grpc.aio.Channel] = []
        self.stubs: dict[str, list[dict[str, Any]]] = {}
        if "sync" in kinds:
            self._sync = [domain.node_channel(host) for host in domain.hosts]
            self.stubs["sync"] = [_stubs(c) for c in self._sync]
        if "async" in kinds:
            tls = domain.client_tls()
            addresses = [domain.address(host) for host in domain.hosts]

            async def connect() -> list[grpc.aio.Channel]:
                return [aio_mtls_channel(address, tls) for address in addresses]

            self._aio = runner.run(connect())
            self.stubs["async"] = [_stubs(c) for c in self._aio]

    def load(
        self,
        client: str,
        operation: Operation,
        *,
        concurrency: int,
        duration: float,
        warmup: float,
        meters: CpuMeter,
    ) -> LoadResult:
        """One closed-loop run of `operation` from `concurrency` callers of kind `client`
        (asyncio tasks over session streams, whatever `client`, for a session operation)."""
        bounds: dict[str, Any] = {
            "concurrency": concurrency,
            "duration": duration,
            "max_ops": operation.max_ops,
            "warmup": warmup,
            "on_start": meters.start,
            "on_stop": meters.stop,
        }
        if operation.session:
            return self._runner.run(self._over_sessions(operation, bounds))
        call = _round_robin(self.stubs[client], operation)
        if client == "sync":
            return run_threads(call, **bounds)
        return self._runner.run(run_tasks(call, **bounds))

    async def _over_sessions(self, operation: Operation, bounds: dict[str, Any]) -> LoadResult:
        """The run of a session operation over one stream per node, opened for this run."""
        request: Any = operation.request
        field_name = operation.session
        turn = itertools.count()
        async with contextlib.AsyncExitStack() as stack:
            if field_name == SESSION_ECHO:
                opened = [AioEchoSession(channel).open() for channel in self._aio]
                echoes = [await stack.enter_async_context(s) for s in opened]

                def call() -> Awaitable[object]:
                    echo = echoes[next(turn) % len(echoes)]
                    return echo.echo(request.payload, CALL_TIMEOUT)

            else:
                streams = [AioSession(channel).open() for channel in self._aio]
                sessions = [await stack.enter_async_context(s) for s in streams]

                def call() -> Awaitable[object]:
                    session = sessions[next(turn) % len(sessions)]
                    return session.call(field_name, request, CALL_TIMEOUT)

            return await run_tasks(call, **bounds)

    def close(self) -> None:
        """Close every channel."""
        for channel in self._sync:
            channel.close()
        aio = self._aio

        async def close() -> None:
            for channel in aio:
                await channel.close(None)

        self._runner.run(close())


@dataclass
class Measurement:
    """What `measure` found: every (operation, concurrency)'s rounds, and the floor pairs."""

    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    pairs: dict[tuple[str, int], list[FloorPair]] = field(default_factory=dict)


def _schedule(
    operations: Sequence[Operation], floors: Mapping[str, Operation], round_: int
) -> list[tuple[Operation, ...]]:
    """One round's runs in order, grouped: an operation with a floor (`floors`, by operation
    name) with a run of it right beside it (before it in even rounds, after it in odd ones),
    any other operation alone. The order of the operations alternates from round to round."""
    order = operations if round_ % 2 == 0 else list(reversed(operations))
    groups: list[tuple[Operation, ...]] = []
    for operation in order:
        floor = floors.get(operation.name)
        if floor is None:
            groups.append((operation,))
        else:
            groups.append((floor, operation) if round_ % 2 == 0 else (operation, floor))
    return groups


def measure(
    domain: BenchDomain,
    operations: Sequence[Operation],
    *,
    clients: dict[int, str],
    rounds: int,
    duration: float,
    warmup: float,
    log: Callable[[str], None],
    floors: Mapping[str, Operation] | None = None,
) -> Measurement:
    """Run every operation at every concurrency in `clients`, `rounds` times, interleaved;
    with `floors` (a floor by operation name), a run of its floor beside each such operation
    in every round (a `FloorPair`), each also pooled into the floor's own cell."""
    found = Measurement()
    floors = floors or {}
    kinds = set(clients.values()) | ({"async"} if any(op.session for op in operations) else set())
    with asyncio.Runner() as runner:
        stubs = _Clients(domain, kinds, runner)

        def run(operation: Operation, client: str, concurrency: int) -> Measured:
            meters = CpuMeter(
                [domain.pid(host) for host in domain.hosts],
                coordinator=domain.pid(COORDINATOR_NAME),
            )
            load = stubs.load(
                client,
                operation,
                concurrency=concurrency,
                duration=duration,
                warmup=warmup,
                meters=meters,
            )
            found.cells.setdefault((operation.name, concurrency), Cell()).add(load, meters)
            failed = f", {load.errors} failed: {load.first_error}" * bool(load.errors)
            log(
                f"   {operation.name} {'session' if operation.session else client} c{concurrency}: "
                f"{load.ops_per_second:,.0f} ops/s{failed}"
            )
            return Measured(load, meters.hsa_seconds)

        try:
            for round_ in range(rounds):
                for concurrency, client in clients.items():
                    for group in _schedule(operations, floors, round_):
                        runs = {op.name: run(op, client, concurrency) for op in group}
                        if len(group) == 2:
                            (name,) = (op.name for op in group if op.name in floors)
                            found.pairs.setdefault((name, concurrency), []).append(
                                FloorPair(floor=runs[floors[name].name], operation=runs[name])
                            )
        finally:
            stubs.close()
    return found


def _create_key(stub: Any, description: str) -> str:
    response = stub.CreateKey(
        services_pb2.CreateKeyRequest(description=description), timeout=CALL_TIMEOUT
    )
    return str(response.metadata.key_id)


def _operations(
    domain: BenchDomain, *, suffix: str, full_set: bool
) -> tuple[dict[str, Operation], list[Operation]]:
    """The floors by operation name (in the full set) and the calls to measure on `domain`,
    with the keys and ciphertexts they need (made here, through the first node)."""
    payload = os.urandom(PAYLOAD_BYTES)
    with domain.node_channel(domain.hosts[0]) as channel:
        stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        key_id = _create_key(stub, "bench keyservice")
        blob = stub.Encrypt(
            services_pb2.EncryptRequest(
                key_id=key_id, plaintext=payload, encryption_context=CONTEXT
            ),
            timeout=CALL_TIMEOUT,
        ).ciphertext_blob
        destination = _create_key(stub, "bench keyservice re-encrypt destination")
    # The floors, beside the key service's runs on the same node and client: the ratios then
    # compare calls made seconds apart (`paired_floor_figures`), not minutes.
    echo = services_pb2.EchoMessage(payload=payload)
    floor = Operation(FLOOR_ECHO, "Echo", echo, service="Diagnostics")
    session_floor = Operation(
        FLOOR_ECHO_SESSION, "EchoSession", echo, service="Diagnostics", session=SESSION_ECHO
    )
    encrypt = services_pb2.EncryptRequest(
        key_id=key_id, plaintext=payload, encryption_context=CONTEXT
    )
    decrypt = services_pb2.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT)
    operations = [
        Operation(f"encrypt_1k{suffix}", "Encrypt", encrypt),
        Operation(f"decrypt_1k{suffix}", "Decrypt", decrypt),
        Operation(
            f"generate_data_key{suffix}",
            "GenerateDataKey",
            services_pb2.GenerateDataKeyRequest(
                key_id=key_id, encryption_context=CONTEXT, number_of_bytes=DATA_KEY_BYTES
            ),
        ),
    ]
    if not full_set:
        return {}, operations
    sessions = [
        Operation("encrypt_1k_session", "Encrypt", encrypt, session="encrypt"),
        Operation("decrypt_1k_session", "Decrypt", decrypt, session="decrypt"),
    ]
    operations += [
        *sessions,
        Operation(
            f"re_encrypt_1k{suffix}",
            "ReEncrypt",
            services_pb2.ReEncryptRequest(
                ciphertext_blob=blob,
                source_encryption_context=CONTEXT,
                destination_key_id=destination,
                destination_encryption_context=CONTEXT,
            ),
        ),
        Operation(
            f"create_key{suffix}",
            "CreateKey",
            services_pb2.CreateKeyRequest(description="bench keyservice create"),
            max_ops=MAX_CREATES,
        ),
    ]
    floors = {op.name: floor for op in operations if op.name in TARGETED}
    floors |= {op.name: session_floor for op in sessions}
    return floors, operations


def _figures(found: Measurement) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    for (operation, concurrency), cell in found.cells.items():
        prefix = f"{operation}_c{concurrency}"
        figures.update(cell.figures(prefix))
        if operation.startswith("create_key"):
            operations = sum(r.operations for r in cell.rounds)
            figures[f"{prefix}_coordinator_cpu_us_per_op"] = per_op_us(
                cell.coordinator_cpu_s, operations
            )
    figures.update(paired_floor_figures(found.pairs))
    return figures


def _plot_samples(config: BenchConfig, cells: dict[tuple[str, int], Cell]) -> None:
    """Latency distributions: one plot per concurrency for one node (with the floor measured
    in the same rounds), one for three nodes."""
    for (operation, concurrency), cell in cells.items():
        latencies = [v / 1e6 for load in cell.rounds for v in load.latencies_ns]
        if operation.endswith("_3node"):
            config.add_samples("keyservice_3node", f"{operation} c{concurrency}", latencies)
            continue
        label = {
            FLOOR_ECHO: "floor (Echo, same rounds)",
            FLOOR_ECHO_SESSION: "floor of sessions (EchoSession, same rounds)",
        }.get(operation, operation)
        config.add_samples(f"keyservice_c{concurrency}", label, latencies)


def run(config: BenchConfig) -> dict[str, Figure]:
    """Measure the key service on one node and on three; figures for the runner."""
    rounds = int(config.pick(1, 5))
    duration = float(config.pick(0.3, 1.5))
    warmup = float(config.pick(0.15, 0.3))
    clients = {c: client_for(config.floor, c) for c in CONCURRENCIES}
    figures: dict[str, Figure] = {
        "payload_bytes": PAYLOAD_BYTES,
        "data_key_bytes": DATA_KEY_BYTES,
    }
    for concurrency, client in clients.items():
        figures[f"client_c{concurrency}"] = client
    found = Measurement()
    for nodes, suffix in ((1, ""), (3, "_3node")):
        with BenchDomain(config.directory(f"keyservice-{nodes}"), nodes=nodes) as domain:
            floors, operations = _operations(domain, suffix=suffix, full_set=nodes == 1)
            # CreateKey's durable writes slow the machine for seconds after them, so its rounds
            # come after the data plane's, never between a pair of runs.
            data_plane = [op for op in operations if not op.name.startswith("create_key")]
            creates = [op for op in operations if op.name.startswith("create_key")]
            for batch, beside in ((data_plane, floors), (creates, {})):
                if not batch:
                    continue
                measured = measure(
                    domain,
                    batch,
                    clients=clients,
                    rounds=rounds,
                    duration=duration,
                    warmup=warmup,
                    log=config.log,
                    floors=beside,
                )
                found.cells.update(measured.cells)
                found.pairs.update(measured.pairs)
    figures.update(_figures(found))  # one node, then three; c1 then c16 in each
    _plot_samples(config, found.cells)
    return figures
