"""The floor: `Diagnostics.Echo` of 1 KiB against one HSA, over the production server stack.

Echo is served by the same process, the same gRPC server (thread pool, error-mapping
interceptor, limits), the same mutual TLS as the key service, and does no work; so what it
costs is the least any key-service call can cost, and every key-service figure is also given
as a ratio to it (`<op>_c<N>_floor_ratio`).

Measured at concurrency 1 and 16 with two clients: N threads on one synchronous channel, and N
asyncio tasks on one `grpc.aio` channel (the client shares the 2 cores with the server, so the
client matters). The better of the two (higher throughput) is the floor, `echo_1k_c<N>_*`;
both are reported as `echo_1k_sync_c<N>_*` and `echo_1k_async_c<N>_*`. Server CPU per call is
utime + stime of the HSA's process tree (one process: no workers here), client CPU that of
this process; both read from /proc by `bench._proc.CpuMeter`, over the measured window only.
Full runs interleave the clients and repeat the rounds (3 rounds of 3 s per client and
concurrency); latency percentiles pool every round, throughput is the median of the rounds.
Quick mode: one round of 1 s.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Final

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._load import LoadResult, aio_mtls_channel, run_tasks, run_threads
from bench._proc import CpuMeter
from bench._stats import median
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "floor"
TITLE: Final = "transport floor: Diagnostics.Echo 1 KiB, mutual TLS, one HSA"

PAYLOAD_BYTES: Final = 1024
CONCURRENCIES: Final = (1, 16)
CLIENTS: Final = ("sync", "async")
CALL_TIMEOUT: Final = 10.0
MAX_OPS: Final = 200_000

__all__ = ["CLIENTS", "CONCURRENCIES", "NAME", "TITLE", "EchoRun", "echo_run", "run"]


@dataclass
class EchoRun:
    """One measured run of Echo: the load result and the server's and client's CPU seconds."""

    load: LoadResult
    server_cpu_s: float
    client_cpu_s: float


def echo_run(
    domain: BenchDomain,
    host: str,
    *,
    client: str,
    concurrency: int,
    duration: float,
    payload: bytes,
) -> EchoRun:
    """Run Echo against `host` with the `sync` or `async` client; CPU measured on both sides."""
    meter = CpuMeter([domain.pid(host)], client=os.getpid())
    request = services_pb2.EchoMessage(payload=payload)
    if client == "sync":
        with domain.node_channel(host) as channel:
            stub: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
            load = run_threads(
                lambda: stub.Echo(request, timeout=CALL_TIMEOUT),
                concurrency=concurrency,
                duration=duration,
                max_ops=MAX_OPS,
                on_start=meter.start,
                on_stop=meter.stop,
            )
    elif client == "async":
        tls = domain.client_tls()
        address = domain.address(host)

        async def main() -> LoadResult:
            async with aio_mtls_channel(address, tls) as channel:
                aio_stub: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
                return await run_tasks(
                    lambda: aio_stub.Echo(request, timeout=CALL_TIMEOUT),
                    concurrency=concurrency,
                    duration=duration,
                    max_ops=MAX_OPS,
                    on_start=meter.start,
                    on_stop=meter.stop,
                )

        load = asyncio.run(main())
    else:
        raise ValueError(f"unknown client {client!r}; use sync or async")
    if load.operations == 0:
        raise RuntimeError(
            f"no Echo call succeeded ({client}, concurrency {concurrency}): {load.first_error}"
        )
    return EchoRun(load, meter.hsa_seconds, meter.client_seconds)


def _figures(prefix: str, runs: list[EchoRun]) -> dict[str, Figure]:
    pooled = LoadResult(concurrency=runs[0].load.concurrency)
    for run_ in runs:
        pooled.latencies_ns.extend(run_.load.latencies_ns)
        pooled.errors += run_.load.errors
    figures: dict[str, Figure] = dict(pooled.figures(prefix))
    figures[f"{prefix}_ops_s"] = median([r.load.ops_per_second for r in runs])
    operations = sum(r.load.operations for r in runs)
    figures[f"{prefix}_server_cpu_us_per_op"] = sum(r.server_cpu_s for r in runs) * 1e6 / operations
    figures[f"{prefix}_client_cpu_us_per_op"] = sum(r.client_cpu_s for r in runs) * 1e6 / operations
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """Measure the floor; figures for each client and the better of the two per concurrency."""
    duration = float(config.pick(1.0, 3.0))
    rounds = int(config.pick(1, 3))
    payload = os.urandom(PAYLOAD_BYTES)
    runs: dict[tuple[str, int], list[EchoRun]] = {}
    with BenchDomain(config.directory("floor"), nodes=1) as domain:
        host = domain.hosts[0]
        for round_ in range(rounds):
            for concurrency in CONCURRENCIES:
                for client in CLIENTS if round_ % 2 == 0 else tuple(reversed(CLIENTS)):
                    result = echo_run(
                        domain,
                        host,
                        client=client,
                        concurrency=concurrency,
                        duration=duration,
                        payload=payload,
                    )
                    runs.setdefault((client, concurrency), []).append(result)
                    config.log(
                        f"   echo {client} c{concurrency}: {result.load.ops_per_second:,.0f} ops/s"
                    )
    figures: dict[str, Figure] = {"echo_payload_bytes": PAYLOAD_BYTES}
    for concurrency in CONCURRENCIES:
        best_client = ""
        best_ops = -1.0
        for client in CLIENTS:
            prefix = f"echo_1k_{client}_c{concurrency}"
            client_figures = _figures(prefix, runs[(client, concurrency)])
            figures.update(client_figures)
            ops = float(client_figures[f"{prefix}_ops_s"])
            if ops > best_ops:
                best_client, best_ops = client, ops
            latencies = [v / 1e6 for r in runs[(client, concurrency)] for v in r.load.latencies_ns]
            config.add_samples("floor", f"{client} client, concurrency {concurrency}", latencies)
        source = f"echo_1k_{best_client}_c{concurrency}_"
        for key, value in list(figures.items()):
            if key.startswith(source):
                figures[f"echo_1k_c{concurrency}_{key[len(source) :]}"] = value
        figures[f"echo_1k_c{concurrency}_client"] = best_client
    return figures
