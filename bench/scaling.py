"""Scaling: how throughput grows with HSA nodes and with an HSA's worker processes.

On a 2-core machine the client and every server share the same cores, so ops/s alone cannot
show scaling: the benchmark also reports the CPU seconds the client (this process) and the
servers (every HSA process, its worker processes included) used in the measured windows,
and from them the throughput per server CPU second and per machine CPU second. A design that
scales keeps `ops_per_server_cpu_s` flat as nodes or workers are added: then more cores give
proportionally more throughput, whatever this box can show.

Configurations, each a fresh domain: 1, 2 and 3 nodes with no workers (the client spreads
calls round-robin over the nodes), and one node with 1 and 2 worker processes (the client
spreads over the node's address and its workers'), and one node with 4 workers in full runs.
In each: `Diagnostics.Echo` (the floor), `KeyService.Encrypt` of 1 KiB, and the same Encrypt
through one key-service session per endpoint (`encrypt_1k_session`, batched as KeyClient
batches), at concurrency 16 from N asyncio tasks on one `grpc.aio` channel per endpoint (the
cheapest client here), interleaved rounds.

Figures per configuration `n<nodes>_w<workers>` and operation (`echo_1k`, `encrypt_1k`,
`encrypt_1k_session`):
`scaling_<op>_<config>_ops_s` (median over rounds), `_p50_ms`, `_p99_ms`,
`_server_cpu_us_per_op`, `_client_cpu_us_per_op`, `_ops_per_server_cpu_s`,
`_ops_per_cpu_s` (client and servers together) and `_cores_busy` (client + servers CPU
seconds per wall second).

Invariants: every run is bounded in time and calls; each domain is stopped whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Curve, Figure
from bench._load import LoadResult, aio_mtls_channel, round_robin, run_tasks
from bench._proc import CpuMeter
from bench._sessions import AioSession
from bench._stats import median
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "scaling"
TITLE: Final = "scaling with nodes and worker processes (Echo and Encrypt 1 KiB, c16, CPU)"

PAYLOAD_BYTES: Final = 1024
CONCURRENCY: Final = 16
CONTEXT: Final = {"purpose": "bench-scaling"}
CALL_TIMEOUT: Final = 10.0
MAX_OPS: Final = 200_000
# (nodes, worker processes per node); quick runs keep the two ends of each axis.
CONFIGURATIONS: Final = ((1, 0), (2, 0), (3, 0), (1, 1), (1, 2), (1, 4))
QUICK_CONFIGURATIONS: Final = ((1, 0), (3, 0), (1, 2))
# Echo (the floor), unary Encrypt, and Encrypt through one key-service session per endpoint.
OPERATIONS: Final = ("echo_1k", "encrypt_1k", "encrypt_1k_session")

__all__ = ["CONFIGURATIONS", "NAME", "TITLE", "run"]


@dataclass
class _Window:
    """The measured rounds of one operation in one configuration, with the CPU used."""

    rounds: list[LoadResult] = field(default_factory=list)
    wall_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0

    def figures(self, prefix: str) -> dict[str, Figure]:
        pooled = LoadResult(concurrency=CONCURRENCY)
        for load in self.rounds:
            pooled.latencies_ns.extend(load.latencies_ns)
            pooled.errors += load.errors
        if not pooled.latencies_ns:
            first = next((r.first_error for r in self.rounds if r.first_error), "no error")
            raise RuntimeError(f"no {prefix} call succeeded: {first}")
        operations = pooled.operations
        figures: dict[str, Figure] = dict(pooled.figures(prefix))
        figures.update(
            {
                f"{prefix}_ops_s": median([r.ops_per_second for r in self.rounds]),
                f"{prefix}_server_cpu_us_per_op": self.server_cpu_s * 1e6 / operations,
                f"{prefix}_client_cpu_us_per_op": self.client_cpu_s * 1e6 / operations,
                f"{prefix}_ops_per_server_cpu_s": operations / self.server_cpu_s,
                f"{prefix}_ops_per_cpu_s": operations / (self.server_cpu_s + self.client_cpu_s),
                f"{prefix}_cores_busy": (self.server_cpu_s + self.client_cpu_s) / self.wall_s,
            }
        )
        return figures


def _key(domain: BenchDomain) -> str:
    with domain.node_channel(domain.hosts[0]) as channel:
        stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        response = stub.CreateKey(
            services_pb2.CreateKeyRequest(description="bench scaling"), timeout=CALL_TIMEOUT
        )
    return str(response.metadata.key_id)


def measure_configuration(
    domain: BenchDomain, *, rounds: int, duration: float, warmup: float
) -> dict[str, _Window]:
    """Echo and Encrypt at concurrency 16 over every key endpoint of `domain`, interleaved."""
    payload = os.urandom(PAYLOAD_BYTES)
    key_id = _key(domain)
    endpoints = [address for host in domain.hosts for address in domain.key_endpoints(host)]
    tls = domain.client_tls()
    windows: dict[str, _Window] = {name: _Window() for name in OPERATIONS}

    async def main() -> None:
        channels: list[grpc.aio.Channel] = [aio_mtls_channel(a, tls) for a in endpoints]
        stack = contextlib.AsyncExitStack()
        try:
            sessions = [await stack.enter_async_context(AioSession(c).open()) for c in channels]
            encrypt_request = services_pb2.EncryptRequest(
                key_id=key_id, plaintext=payload, encryption_context=CONTEXT
            )
            turn = itertools.count()

            def session_encrypt() -> Any:
                session = sessions[next(turn) % len(sessions)]
                return session.call("encrypt", encrypt_request, CALL_TIMEOUT)

            echo = [
                services_pb2_grpc.DiagnosticsStub(c).Echo  # type: ignore[no-untyped-call]
                for c in channels
            ]
            encrypt = [
                services_pb2_grpc.KeyServiceStub(c).Encrypt  # type: ignore[no-untyped-call]
                for c in channels
            ]
            calls = {
                "echo_1k": round_robin(
                    echo, services_pb2.EchoMessage(payload=payload), CALL_TIMEOUT
                ),
                "encrypt_1k": round_robin(encrypt, encrypt_request, CALL_TIMEOUT),
                "encrypt_1k_session": session_encrypt,
            }
            for round_ in range(rounds):
                names = list(calls) if round_ % 2 == 0 else list(reversed(calls))
                for name in names:
                    nodes = [domain.pid(host) for host in domain.hosts]  # and their workers
                    meters = CpuMeter(nodes, client=os.getpid())
                    load = await run_tasks(
                        calls[name],
                        concurrency=CONCURRENCY,
                        duration=duration,
                        max_ops=MAX_OPS,
                        warmup=warmup,
                        on_start=meters.start,
                        on_stop=meters.stop,
                    )
                    window = windows[name]
                    window.rounds.append(load)
                    window.wall_s += meters.wall_s
                    window.client_cpu_s += meters.client_seconds
                    window.server_cpu_s += meters.hsa_seconds
        finally:
            await stack.aclose()
            for channel in channels:
                await channel.close(None)

    asyncio.run(main())
    return windows


def run(config: BenchConfig) -> dict[str, Figure]:
    """Every configuration in turn; figures and two curves for the runner."""
    rounds = int(config.pick(1, 3))
    duration = float(config.pick(0.5, 2.0))
    warmup = float(config.pick(0.2, 0.3))
    configurations = QUICK_CONFIGURATIONS if config.quick else CONFIGURATIONS
    figures: dict[str, Figure] = {"scaling_concurrency": CONCURRENCY}
    for nodes, workers in configurations:
        label = f"n{nodes}_w{workers}"
        directory = config.directory(f"scaling-{label}")
        with BenchDomain(directory, nodes=nodes, workers=workers) as domain:
            windows = measure_configuration(domain, rounds=rounds, duration=duration, warmup=warmup)
        for operation, window in windows.items():
            measured = window.figures(f"scaling_{operation}_{label}")
            figures.update(measured)
            config.log(
                f"   {nodes} node(s), {workers} worker(s), {operation}: "
                f"{measured[f'scaling_{operation}_{label}_ops_s']:,.0f} ops/s, server "
                f"{measured[f'scaling_{operation}_{label}_server_cpu_us_per_op']:.0f} us/op, "
                f"client {measured[f'scaling_{operation}_{label}_client_cpu_us_per_op']:.0f} "
                "us/op"
            )
    _curves(config, figures, configurations)
    return figures


def _curves(
    config: BenchConfig, figures: dict[str, Figure], configurations: Sequence[tuple[int, int]]
) -> None:
    """Throughput and throughput per server CPU second, against nodes and against workers."""
    for axis, points in (
        ("nodes", [(n, w) for n, w in configurations if w == 0]),
        ("worker processes", [(n, w) for n, w in configurations if n == 1]),
    ):
        if len(points) < 2:
            continue
        xs = [float(n if axis == "nodes" else w) for n, w in points]
        series: dict[str, tuple[list[float], list[float]]] = {}
        for operation in OPERATIONS:
            for measure, what in (("ops_s", "ops/s"), ("ops_per_server_cpu_s", "ops/server CPU s")):
                ys = [float(figures[f"scaling_{operation}_n{n}_w{w}_{measure}"]) for n, w in points]
                series[f"{operation} {what}"] = (xs, ys)
        config.add_curve(
            f"scaling_{axis.split()[0]}",
            Curve(
                title=f"Throughput against {axis} (concurrency {CONCURRENCY}, one 2-core box)",
                x_label=axis,
                y_label="operations per second / per server CPU second",
                series=series,
            ),
        )
