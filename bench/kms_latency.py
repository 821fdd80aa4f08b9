"""Encrypt and Decrypt latency of 1 KiB through the key service client, 1 and 16 callers.

    python -m bench.kms_latency                  # a fresh 3-node local domain in a temp dir
    python -m bench.kms_latency --ops 500 --json kms.json

Starts a coordinator and three HSAs (`bench._cluster.BenchDomain`) in a temporary directory,
creates one key, and measures, per mode, operation and concurrency, throughput and p50/p99
latency of calls spread over the three HSAs:

- `threads` (figures `keyclient`): `KeyClient` (the library applications use: round-robin,
  deadlines, retry rules) shared by N threads, with its default: every data-plane call over
  one key-service session per HSA (`KeyService.Session`);
- `threads-unary` (`keyclient_unary`): the same with `KeyClient(sessions=False)`, unary calls;
- `sync-raw` (`sync_raw`): N threads on plain sync unary stubs, one channel per HSA;
- `asyncio` (`async_raw`): N coroutines on `grpc.aio` unary stubs (one channel per HSA, the
  same mutual TLS identity), round-robin, without KeyClient's retry layer;
- `asyncio-keyclient` (`async_keyclient`): `AsyncKeyClient` (the asyncio library, same rules
  as `KeyClient`) shared by N coroutines, over its sessions;
- `asyncio-session` (`async_session_raw`): N coroutines on raw `grpc.aio` session streams
  (`bench._sessions.AioSession`, one session per HSA channel, written separately from the
  library so that the yardstick does not move with it), round-robin: what the servers give
  through sessions, the yardstick of the clients (issue 18: at least 0.9 of it).

Each cell is bounded by a number of calls (`--ops`) and a time budget (`--seconds`), after a
short warm-up; `--rounds R` repeats all cells interleaved and reports medians (this machine is
shared and noisy). The domain is stopped and the directory removed whatever happens. Client and
servers share this machine's cores, so the client's own cost is part of every figure.

As a module of the `python -m bench` runner (NAME, TITLE, run) the figures are
`<mode>_<op>_1k_3node_c<N>_*` with the figure modes above, and their ratios to the floor (a
one-node unary Echo, so these compare a 3-node domain and a client library with the bare
transport); `keyclient_over_session_raw_<op>_c<N>_ratio` is KeyClient's throughput over the
raw session streams', and `async_keyclient_over_session_raw_...` AsyncKeyClient's, each the
median of each round's ratio (`_low_ratio` / `_high_ratio`: the lowest and highest round),
measured right after one another. Full runs take every mode, 3 rounds of at most 1,000 calls
or 5 s per cell; quick runs only the two clients and `async_session_raw` (what the ratios
need), one round of at most 150 calls or 0.5 s per cell.
`bench.keyservice` measures the servers' side (raw stubs, server CPU); this measures what an
application gets through the client library.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import asyncio
import contextlib
import itertools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import grpc

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure, Target
from bench._kms_cells import Cell, measure_async, measure_threads, medians, table
from bench._sessions import AioSession
from bench._stats import paired_ratios
from domain_core.limits import DEFAULT_LIMITS
from domain_edge.kms_client import AsyncKeyClient, KeyClient
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
NODES = 3
# Figure names of the modes (`<mode>_<op>_1k_3node_c<N>_*`).
FIGURE_MODES: Final = {
    "threads": "keyclient",
    "threads-unary": "keyclient_unary",
    "sync-raw": "sync_raw",
    "asyncio": "async_raw",
    "asyncio-session": "async_session_raw",
    "asyncio-keyclient": "async_keyclient",
}
# The clients' throughput over raw session streams' (issue 18: at least 0.9 at 16 callers).
CLIENT_MODES: Final = {"threads": "KeyClient", "asyncio-keyclient": "AsyncKeyClient"}
SESSION_RAW_MODE: Final = "asyncio-session"
CLIENT_GOAL: Final = 0.9
TARGETS: Final = tuple(
    Target(
        f"{FIGURE_MODES[mode]}_over_session_raw_{operation}_c16_ratio",
        ">=",
        CLIENT_GOAL,
        f"{client} {operation} through 3 HSAs at 16 callers: at least 0.9 of raw session "
        "streams' throughput (median of each round's ratio)",
    )
    for mode, client in CLIENT_MODES.items()
    for operation in ("encrypt", "decrypt")
)

__all__ = [
    "FLOOR_RATIOS",
    "MODES",
    "NAME",
    "TARGETS",
    "TITLE",
    "Cell",
    "Endpoints",
    "figures_of",
    "main",
    "measure",
    "run",
    "session_ratio_figures",
]


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


def bench_threads(
    domain: Endpoints,
    key_id: str,
    blob: bytes,
    concurrency: int,
    ops: int,
    seconds: float,
    *,
    sessions: bool = True,
) -> list[Cell]:
    """Encrypt and Decrypt through one shared KeyClient (its sessions, or unary calls)."""
    payload = os.urandom(PAYLOAD_BYTES)
    mode = "threads" if sessions else "threads-unary"
    with KeyClient(
        domain.addresses,
        ca_pem=domain.tls.ca_pem,
        cert_pem=domain.tls.cert_pem,
        key_pem=domain.tls.key_pem,
        sessions=sessions,
    ) as client:
        operations: dict[str, Callable[[], object]] = {
            "encrypt": lambda: client.encrypt(key_id, payload, CONTEXT),
            "decrypt": lambda: client.decrypt(blob, CONTEXT),
        }
        return measure_threads(mode, operations, concurrency, ops, seconds)


def bench_threads_unary(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """`bench_threads` with `KeyClient(sessions=False)`: unary calls."""
    return bench_threads(domain, key_id, blob, concurrency, ops, seconds, sessions=False)


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
    try:
        return measure_threads("sync-raw", operations, concurrency, ops, seconds)
    finally:
        for channel in channels:
            channel.close()


# --- asyncio with grpc.aio -------------------------------------------------------------------


def _aio_channels(domain: Endpoints) -> list[grpc.aio.Channel]:
    """One `grpc.aio` channel per HSA, without gRPC's own retries (inside the event loop)."""
    credentials = channel_credentials(domain.tls.ca_pem, domain.tls.cert_pem, domain.tls.key_pem)
    options = [
        ("grpc.enable_retries", 0),
        *DEFAULT_LIMITS.grpc_options(),
        server_name_option(domain.tls.ca_pem, ANY_HSA),
    ]
    return [grpc.aio.secure_channel(a, credentials, options=options) for a in domain.addresses]


async def _bench_async(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    channels = _aio_channels(domain)
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
    try:
        return await measure_async("asyncio", operations, concurrency, ops, seconds)
    finally:
        for channel in channels:
            await channel.close(None)


async def _bench_async_session(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    channels = _aio_channels(domain)
    turn = itertools.count()
    encrypt, decrypt = _requests(key_id, blob)
    try:
        async with contextlib.AsyncExitStack() as stack:
            sessions = [await stack.enter_async_context(AioSession(c).open()) for c in channels]

            def session() -> AioSession:
                return sessions[next(turn) % len(sessions)]

            operations: dict[str, Callable[[], Awaitable[object]]] = {
                "encrypt": lambda: session().call("encrypt", encrypt, 5.0),
                "decrypt": lambda: session().call("decrypt", decrypt, 5.0),
            }
            return await measure_async("asyncio-session", operations, concurrency, ops, seconds)
    finally:
        for channel in channels:
            await channel.close(None)


async def _bench_async_keyclient(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    payload = os.urandom(PAYLOAD_BYTES)
    async with AsyncKeyClient(
        domain.addresses,
        ca_pem=domain.tls.ca_pem,
        cert_pem=domain.tls.cert_pem,
        key_pem=domain.tls.key_pem,
    ) as client:
        operations: dict[str, Callable[[], Awaitable[object]]] = {
            "encrypt": lambda: client.encrypt(key_id, payload, CONTEXT),
            "decrypt": lambda: client.decrypt(blob, CONTEXT),
        }
        return await measure_async("asyncio-keyclient", operations, concurrency, ops, seconds)


def bench_asyncio_keyclient(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """Encrypt and Decrypt from coroutines through one shared AsyncKeyClient."""
    return asyncio.run(_bench_async_keyclient(domain, key_id, blob, concurrency, ops, seconds))


def bench_asyncio(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """Encrypt and Decrypt from coroutines on grpc.aio channels."""
    return asyncio.run(_bench_async(domain, key_id, blob, concurrency, ops, seconds))


def bench_asyncio_session(
    domain: Endpoints, key_id: str, blob: bytes, concurrency: int, ops: int, seconds: float
) -> list[Cell]:
    """Encrypt and Decrypt from coroutines over raw session streams, one per HSA."""
    return asyncio.run(_bench_async_session(domain, key_id, blob, concurrency, ops, seconds))


# --- main ------------------------------------------------------------------------------------

MODES: dict[str, Callable[[Endpoints, str, bytes, int, int, float], list[Cell]]] = {
    "threads": bench_threads,
    "asyncio-session": bench_asyncio_session,  # between the clients: the ratios' yardstick
    "asyncio-keyclient": bench_asyncio_keyclient,
    "threads-unary": bench_threads_unary,
    "sync-raw": bench_sync_raw,
    "asyncio": bench_asyncio,
}
# Quick runs: only what the `*_over_session_raw_*` ratios need.
QUICK_MODES: Final = ("threads", SESSION_RAW_MODE, "asyncio-keyclient")


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
                found = MODES[mode](endpoints, key_id, blob, concurrency, ops, seconds)
                cells += [replace(cell, round=round_number) for cell in found]
    return cells


def figures_of(cells: Sequence[Cell]) -> dict[str, Figure]:
    """The medians of `cells` as runner figures, `<mode>_<op>_1k_3node_c<N>_*`."""
    figures: dict[str, Figure] = {"payload_bytes": PAYLOAD_BYTES, "nodes": NODES}
    for cell in medians(list(cells)):
        prefix = f"{FIGURE_MODES[cell.mode]}_{cell.operation}_1k_3node_c{cell.concurrency}"
        figures[f"{prefix}_p50_ms"] = cell.p50_ms
        figures[f"{prefix}_p99_ms"] = cell.p99_ms
        figures[f"{prefix}_mean_ms"] = cell.mean_ms
        figures[f"{prefix}_ops_s"] = cell.throughput
        figures[f"{prefix}_client_cpu_us_per_op"] = cell.client_cpu_us
    figures.update(session_ratio_figures(cells))
    return figures


def session_ratio_figures(cells: Sequence[Cell]) -> dict[str, Figure]:
    """`<client>_over_session_raw_<op>_c<N>_ratio`: a client's throughput (`keyclient`:
    KeyClient on threads, `async_keyclient`: AsyncKeyClient) over the raw session streams'
    (`asyncio-session`), the median of each round's ratio, with `_low_ratio` / `_high_ratio`
    (the lowest and highest round); only where a round measured both."""
    by_round = {(c.mode, c.operation, c.concurrency, c.round): c for c in cells}
    rounds: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for (mode, operation, concurrency, round_), cell in by_round.items():
        raw = by_round.get((SESSION_RAW_MODE, operation, concurrency, round_))
        if mode in CLIENT_MODES and raw is not None:
            pair = (cell.throughput, raw.throughput)
            rounds.setdefault((mode, operation, concurrency), []).append(pair)
    figures: dict[str, Figure] = {}
    for (mode, operation, concurrency), pairs in sorted(rounds.items()):
        spread = paired_ratios(pairs)
        if spread is None:
            continue
        name = f"{FIGURE_MODES[mode]}_over_session_raw_{operation}_c{concurrency}"
        figures[f"{name}_ratio"] = spread.median
        figures[f"{name}_low_ratio"] = spread.low
        figures[f"{name}_high_ratio"] = spread.high
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry (see the module docstring for what quick mode leaves out)."""
    with BenchDomain(config.directory(NAME), nodes=NODES) as domain:
        cells = measure(
            domain,
            modes=config.pick(list(QUICK_MODES), list(MODES)),
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
    summary = medians(cells)
    ratios = session_ratio_figures(cells)
    print(table(summary))
    for name, value in ratios.items():
        print(f"{name} {value:.3f}")
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
            "ratios": ratios,
            "every_round": [asdict(c) for c in cells],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
