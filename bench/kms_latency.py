"""Encrypt and Decrypt latency of 1 KiB through the key service client, 1 and 16 callers.

    python -m bench.kms_latency                  # a fresh 3-node local domain in a temp dir
    python -m bench.kms_latency --ops 500 --json kms.json

Starts a coordinator and three HSAs (`bench._cluster.BenchDomain`) in a temporary directory,
creates one key, and measures, per mode, operation and concurrency, throughput and p50/p99
latency of calls spread over the three HSAs:

- `threads`: `KeyClient` (the library applications use: round-robin, deadlines, retry rules)
  shared by N threads;
- `asyncio`: N coroutines on `grpc.aio` channels (one per HSA, the same mutual TLS
  identity), round-robin, without KeyClient's retry layer: what an asyncio client could get.

Each cell is bounded by a number of calls (`--ops`) and a time budget (`--seconds`), after a
short warm-up; `--rounds R` repeats all cells interleaved and reports medians (this machine is
shared and noisy). The domain is stopped and the directory removed whatever happens. Client and
servers share this machine's cores, so the client's own cost is part of every figure.

As a module of the `python -m bench` runner (NAME, TITLE, run) the figures are
`<mode>_<op>_1k_3node_c<N>_*` with modes `keyclient`, `sync_raw` and `async_raw`, and their
ratios to the floor (a one-node Echo, so these compare a 3-node domain and a client library
with the bare transport): full runs take every mode, 3 rounds of at most 1,000 calls or 5 s
per cell; quick runs only `keyclient`, one round of at most 150 calls or 0.5 s per cell.
`bench.keyservice` measures the servers' side (raw stubs, server CPU); this measures what an
application gets through the client library.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import asyncio
import itertools
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._stats import percentile
from domain_core.limits import DEFAULT_LIMITS
from domain_edge.kms_client import KeyClient
from domain_edge.transport import (
    ANY_HSA,
    TlsMaterial,
    channel_credentials,
    mtls_channel,
    server_name_option,
)
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "kms_latency"
TITLE: Final = "Encrypt/Decrypt 1 KiB through KeyClient and raw stubs, 3 HSAs, 1 and 16 callers"
FLOOR_RATIOS: Final = True

PAYLOAD_BYTES = 1024
CONTEXT = {"bench": "kms-latency"}
WARMUP_CALLS = 30
NODES = 3
# Figure names of the modes (`<mode>_<op>_1k_3node_c<N>_*`).
FIGURE_MODES: Final = {"threads": "keyclient", "sync-raw": "sync_raw", "asyncio": "async_raw"}

__all__ = [
    "FLOOR_RATIOS",
    "MODES",
    "NAME",
    "TITLE",
    "Cell",
    "Endpoints",
    "figures_of",
    "main",
    "measure",
    "run",
]


@dataclass(frozen=True)
class Cell:
    """The figures of one (mode, operation, concurrency)."""

    mode: str
    operation: str
    concurrency: int
    calls: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_us: float
    """CPU time of this (client) process per call, all threads, in microseconds."""


def _cell(
    mode: str,
    operation: str,
    concurrency: int,
    latencies: list[float],
    elapsed: float,
    cpu: float,
) -> Cell:
    if not latencies:
        raise RuntimeError(f"no {operation} call completed ({mode}, {concurrency} callers)")
    ms = [latency * 1000 for latency in latencies]
    return Cell(
        mode=mode,
        operation=operation,
        concurrency=concurrency,
        calls=len(ms),
        seconds=round(elapsed, 3),
        throughput=round(len(ms) / elapsed, 1),
        p50_ms=round(percentile(ms, 50), 3),
        p99_ms=round(percentile(ms, 99), 3),
        mean_ms=round(statistics.fmean(ms), 3),
        client_cpu_us=round(cpu / len(ms) * 1e6, 1),
    )


# --- the domain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Where the HSAs of a running domain listen, and the demo application's TLS identity."""

    addresses: list[str]
    tls: TlsMaterial

    @classmethod
    def of(cls, domain: BenchDomain) -> Endpoints:
        """The endpoints of every node of `domain`."""
        return cls([domain.address(host) for host in domain.hosts], domain.client_tls())


# --- threads through KeyClient ---------------------------------------------------------------


def _run_threads(
    call: Callable[[], object], concurrency: int, ops: int, seconds: float
) -> tuple[list[float], float]:
    """`ops` calls (or fewer, when `seconds` run out) from `concurrency` threads."""
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def worker(latencies: list[float]) -> None:
        try:
            while next(counter) < ops and time.monotonic() < deadline:
                started = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - started)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(r,)) for r in results]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return [latency for r in results for latency in r], elapsed


def bench_threads(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """Encrypt and Decrypt through one shared KeyClient."""
    payload = os.urandom(PAYLOAD_BYTES)
    cells = []
    with KeyClient(
        domain.addresses,
        ca_pem=domain.tls.ca_pem,
        cert_pem=domain.tls.cert_pem,
        key_pem=domain.tls.key_pem,
    ) as client:
        operations: dict[str, Callable[[], object]] = {
            "encrypt": lambda: client.encrypt(key_id, payload, CONTEXT),
            "decrypt": lambda: client.decrypt(blob, CONTEXT),
        }
        for name, call in operations.items():
            _run_threads(call, concurrency, WARMUP_CALLS, seconds)
            cpu = time.process_time()
            latencies, elapsed = _run_threads(call, concurrency, ops, seconds)
            cpu = time.process_time() - cpu
            cells.append(_cell("threads", name, concurrency, latencies, elapsed, cpu))
    return cells


def _requests(
    key_id: str, blob: bytes
) -> tuple[services_pb2.EncryptRequest, services_pb2.DecryptRequest]:
    payload = os.urandom(PAYLOAD_BYTES)
    return (
        services_pb2.EncryptRequest(key_id=key_id, plaintext=payload, encryption_context=CONTEXT),
        services_pb2.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT),
    )


def bench_sync_raw(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """The same calls on plain sync stubs (no KeyClient): the library's own cost shows as
    the difference from `threads`."""
    tls = domain.tls
    channels = [mtls_channel(a, tls, ANY_HSA) for a in domain.addresses]
    stubs: list[Any] = [
        services_pb2_grpc.KeyServiceStub(c)  # type: ignore[no-untyped-call]
        for c in channels
    ]
    turn = itertools.count()
    encrypt, decrypt = _requests(key_id, blob)

    def stub() -> Any:
        return stubs[next(turn) % len(stubs)]

    operations: dict[str, Callable[[], object]] = {
        "encrypt": lambda: stub().Encrypt(encrypt, timeout=5.0),
        "decrypt": lambda: stub().Decrypt(decrypt, timeout=5.0),
    }
    cells = []
    try:
        for name, call in operations.items():
            _run_threads(call, concurrency, WARMUP_CALLS, seconds)
            cpu = time.process_time()
            latencies, elapsed = _run_threads(call, concurrency, ops, seconds)
            cpu = time.process_time() - cpu
            cells.append(_cell("sync-raw", name, concurrency, latencies, elapsed, cpu))
    finally:
        for channel in channels:
            channel.close()
    return cells


# --- asyncio with grpc.aio -------------------------------------------------------------------


async def _run_async(
    call: Callable[[], Awaitable[object]], concurrency: int, ops: int, seconds: float
) -> tuple[list[float], float]:
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    latencies: list[float] = []

    async def worker() -> None:
        while next(counter) < ops and time.monotonic() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def _bench_async(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    credentials = channel_credentials(domain.tls.ca_pem, domain.tls.cert_pem, domain.tls.key_pem)
    options = [
        ("grpc.enable_retries", 0),
        *DEFAULT_LIMITS.grpc_options(),
        server_name_option(domain.tls.ca_pem, ANY_HSA),
    ]
    channels = [grpc.aio.secure_channel(a, credentials, options=options) for a in domain.addresses]
    stubs: list[Any] = [
        services_pb2_grpc.KeyServiceStub(c)  # type: ignore[no-untyped-call]
        for c in channels
    ]
    turn = itertools.count()
    encrypt, decrypt = _requests(key_id, blob)

    def stub() -> Any:
        return stubs[next(turn) % len(stubs)]

    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "encrypt": lambda: stub().Encrypt(encrypt, timeout=5.0),
        "decrypt": lambda: stub().Decrypt(decrypt, timeout=5.0),
    }
    cells = []
    try:
        for name, call in operations.items():
            await _run_async(call, concurrency, WARMUP_CALLS, seconds)
            cpu = time.process_time()
            latencies, elapsed = await _run_async(call, concurrency, ops, seconds)
            cpu = time.process_time() - cpu
            cells.append(_cell("asyncio", name, concurrency, latencies, elapsed, cpu))
    finally:
        for channel in channels:
            await channel.close(None)
    return cells


def bench_asyncio(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """Encrypt and Decrypt from coroutines on grpc.aio channels."""
    return asyncio.run(_bench_async(domain, key_id, blob, concurrency, ops, seconds))


# --- main ------------------------------------------------------------------------------------

MODES: dict[str, Callable[[Endpoints, str, bytes, int, int, float], list[Cell]]] = {
    "threads": bench_threads,
    "sync-raw": bench_sync_raw,
    "asyncio": bench_asyncio,
}


def _medians(cells: list[Cell]) -> list[Cell]:
    """One cell per (mode, operation, concurrency): the medians over the rounds."""
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.mode, cell.operation, cell.concurrency), []).append(cell)
    return [
        Cell(
            mode=mode,
            operation=operation,
            concurrency=concurrency,
            calls=sum(c.calls for c in group),
            seconds=round(sum(c.seconds for c in group), 3),
            throughput=round(statistics.median(c.throughput for c in group), 1),
            p50_ms=round(statistics.median(c.p50_ms for c in group), 3),
            p99_ms=round(statistics.median(c.p99_ms for c in group), 3),
            mean_ms=round(statistics.median(c.mean_ms for c in group), 3),
            client_cpu_us=round(statistics.median(c.client_cpu_us for c in group), 1),
        )
        for (mode, operation, concurrency), group in groups.items()
    ]


def _table(cells: list[Cell]) -> str:
    header = ("mode", "op", "callers", "calls", "ops/s", "p50 ms", "p99 ms", "client us")
    lines = ["{:<9} {:<8} {:>7} {:>6} {:>8} {:>8} {:>8} {:>9}".format(*header)]
    for c in cells:
        lines.append(
            f"{c.mode:<9} {c.operation:<8} {c.concurrency:>7} {c.calls:>6} {c.throughput:>8.1f} "
            f"{c.p50_ms:>8.2f} {c.p99_ms:>8.2f} {c.client_cpu_us:>9.0f}"
        )
    return "\n".join(lines)


def measure(
    domain: BenchDomain,
    *,
    modes: Sequence[str],
    concurrencies: Sequence[int],
    ops: int,
    seconds: float,
    rounds: int,
    log: Callable[[str], None],
) -> list[Cell]:
    """Every (mode, operation, concurrency) cell, `rounds` times interleaved, on a running
    domain (one key is created first); every round's cells."""
    endpoints = Endpoints.of(domain)
    with KeyClient(
        endpoints.addresses,
        ca_pem=endpoints.tls.ca_pem,
        cert_pem=endpoints.tls.cert_pem,
        key_pem=endpoints.tls.key_pem,
    ) as client:
        key_id = client.create_key(description="kms latency benchmark").key_id
        blob = client.encrypt(key_id, os.urandom(PAYLOAD_BYTES), CONTEXT)
    cells: list[Cell] = []
    for round_number in range(1, rounds + 1):
        for concurrency in concurrencies:
            for mode in modes:
                log(f"   round {round_number}: {mode}, {concurrency} caller(s)")
                cells += MODES[mode](endpoints, key_id, blob, concurrency, ops, seconds)
    return cells


def figures_of(cells: Sequence[Cell]) -> dict[str, Figure]:
    """The medians of `cells` as runner figures, `<mode>_<op>_1k_3node_c<N>_*`."""
    figures: dict[str, Figure] = {"payload_bytes": PAYLOAD_BYTES, "nodes": NODES}
    for cell in _medians(list(cells)):
        prefix = f"{FIGURE_MODES[cell.mode]}_{cell.operation}_1k_3node_c{cell.concurrency}"
        figures[f"{prefix}_p50_ms"] = cell.p50_ms
        figures[f"{prefix}_p99_ms"] = cell.p99_ms
        figures[f"{prefix}_mean_ms"] = cell.mean_ms
        figures[f"{prefix}_ops_s"] = cell.throughput
        figures[f"{prefix}_client_cpu_us_per_op"] = cell.client_cpu_us
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry (see the module docstring for what quick mode leaves out)."""
    with BenchDomain(config.directory(NAME), nodes=NODES) as domain:
        cells = measure(
            domain,
            modes=config.pick(["threads"], list(MODES)),
            concurrencies=(1, 16),
            ops=int(config.pick(150, 1000)),
            seconds=float(config.pick(0.5, 5.0)),
            rounds=int(config.pick(1, 3)),
            log=config.log,
        )
    return figures_of(cells)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON when asked."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.kms_latency",
        description="Encrypt/Decrypt latency of 1 KiB through KeyClient against a 3-node domain",
    )
    parser.add_argument("--ops", type=int, default=2000, help="calls per cell (default 2000)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="time budget per cell (default 10)"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16], help="callers (default 1 16)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=sorted(MODES), default=list(MODES), help="client styles"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every cell, interleaved; the table shows medians (default 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(argv)
    if args.ops < 1 or args.seconds <= 0 or args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--ops, --seconds, --rounds and --concurrency must be positive")

    def log(message: str) -> None:
        print(message.strip(), file=sys.stderr, flush=True)

    started = time.monotonic()
    log(f"starting a {NODES}-node local domain ...")
    with (
        tempfile.TemporaryDirectory(prefix="kms-latency-") as scratch,
        BenchDomain(Path(scratch) / "domain", nodes=NODES) as domain,
    ):
        cells = measure(
            domain,
            modes=args.modes,
            concurrencies=args.concurrency,
            ops=args.ops,
            seconds=args.seconds,
            rounds=args.rounds,
            log=log,
        )
    summary = _medians(cells)
    print(_table(summary))
    if args.json:
        document = {
            "benchmark": "kms_latency",
            "payload_bytes": PAYLOAD_BYTES,
            "nodes": NODES,
            "ops_per_cell": args.ops,
            "seconds_per_cell": args.seconds,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
            },
            "total_seconds": round(time.monotonic() - started, 1),
            "rounds": args.rounds,
            "cells": [asdict(c) for c in summary],
            "every_round": [asdict(c) for c in cells],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
