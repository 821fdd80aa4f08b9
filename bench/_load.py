"""Closed-loop load generators: N callers, each calling again as soon as its call returns.

Two clients, because in Python the client is often the bottleneck and the two behave
differently: `run_threads` (N threads sharing one synchronous gRPC channel, as a typical
application does) and `run_tasks` (N asyncio tasks on one `grpc.aio` channel). Both return a
`LoadResult` with every call's latency, so percentiles and throughput come from one place.

Invariants: every run is bounded both in time (`duration` seconds) and in count (`max_ops`
calls), so no benchmark loop can run away; a warm-up phase (not measured) comes first; failed
calls are counted, not timed, and the first failure's message is kept for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench._stats import summarize_ms
from domain_core.limits import DEFAULT_LIMITS
from domain_edge import transport
from domain_edge.transport import TlsMaterial

__all__ = ["LoadResult", "aio_mtls_channel", "round_robin", "run_tasks", "run_threads"]


def round_robin(
    methods: Sequence[Callable[..., Any]], request: Any, timeout: float
) -> Callable[[], Any]:
    """A call of `request` on the next of `methods` (one per endpoint) in turn."""
    if len(methods) == 1:
        only = methods[0]
        return lambda: only(request, timeout=timeout)
    turn = itertools.count()
    count = len(methods)
    return lambda: methods[next(turn) % count](request, timeout=timeout)


@dataclass
class LoadResult:
    """What one measured run did: latencies of the successful calls, failures, elapsed time."""

    concurrency: int
    latencies_ns: list[int] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0
    first_error: str = ""

    @property
    def operations(self) -> int:
        """Successful calls."""
        return len(self.latencies_ns)

    @property
    def ops_per_second(self) -> float:
        """Successful calls per second of wall-clock time."""
        return self.operations / self.elapsed if self.elapsed > 0 else 0.0

    def figures(self, prefix: str) -> dict[str, float | int]:
        """`<prefix>_p50_ms`, p95, p99, mean, max, `<prefix>_ops_s` and `<prefix>_errors`."""
        out: dict[str, float | int] = dict(summarize_ms(self.latencies_ns, prefix))
        out[f"{prefix}_ops_s"] = self.ops_per_second
        out[f"{prefix}_errors"] = self.errors
        return out


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = getattr(error, "code", lambda: None)()
        details = getattr(error, "details", lambda: "")()
        return f"{getattr(code, 'name', 'ERROR')}: {str(details)[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"


def run_threads(
    call: Callable[[], object],
    *,
    concurrency: int,
    duration: float,
    max_ops: int,
    warmup: float = 0.3,
    on_start: Callable[[], object] | None = None,
    on_stop: Callable[[], object] | None = None,
) -> LoadResult:
    """Run `call` from `concurrency` threads for `duration` s (at most `max_ops` calls).

    `on_start` and `on_stop` run at the edges of the measured window (after the warm-up),
    e.g. to read a server's CPU time.
    """
    if concurrency < 1 or duration <= 0 or max_ops < 1:
        raise ValueError("concurrency, duration and max_ops must be positive")
    result = LoadResult(concurrency=concurrency)
    lock = threading.Lock()
    stop = threading.Event()
    measuring = threading.Event()
    budget = [max_ops]

    def worker() -> None:
        local: list[int] = []
        errors = 0
        first = ""
        while not stop.is_set():
            began = time.perf_counter_ns()
            try:
                call()
            except Exception as error:
                if measuring.is_set():
                    errors += 1
                    first = first or _describe(error)
                continue
            took = time.perf_counter_ns() - began
            if measuring.is_set():
                local.append(took)
                if len(local) % 64 == 0:
                    with lock:
                        budget[0] -= 64
                        if budget[0] <= 0:
                            stop.set()
        with lock:
            result.latencies_ns.extend(local)
            result.errors += errors
            result.first_error = result.first_error or first

    threads = [
        threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warmup)
        if on_start is not None:
            on_start()
        measuring.set()
        began = time.perf_counter()
        stop.wait(duration)
        stop.set()
        result.elapsed = time.perf_counter() - began
        measuring.clear()  # calls still in flight end after the measured window
        if on_stop is not None:
            on_stop()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30.0)
    return result


async def run_tasks(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    duration: float,
    max_ops: int,
    warmup: float = 0.3,
    on_start: Callable[[], object] | None = None,
    on_stop: Callable[[], object] | None = None,
) -> LoadResult:
    """Run `call` from `concurrency` asyncio tasks for `duration` s (at most `max_ops` calls).

    `on_start` and `on_stop` (plain functions) run at the edges of the measured window.
    """
    if concurrency < 1 or duration <= 0 or max_ops < 1:
        raise ValueError("concurrency, duration and max_ops must be positive")
    result = LoadResult(concurrency=concurrency)
    stop = asyncio.Event()
    state = {"measuring": False}

    async def worker() -> None:
        while not stop.is_set():
            began = time.perf_counter_ns()
            try:
                await call()
            except Exception as error:
                if state["measuring"]:
                    result.errors += 1
                    result.first_error = result.first_error or _describe(error)
                continue
            if state["measuring"]:
                result.latencies_ns.append(time.perf_counter_ns() - began)
                if len(result.latencies_ns) >= max_ops:
                    stop.set()

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        if on_start is not None:
            on_start()
        state["measuring"] = True
        began = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration)
        stop.set()
        result.elapsed = time.perf_counter() - began
        state["measuring"] = False
        if on_stop is not None:
            on_stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30.0)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
    return result


def aio_mtls_channel(address: str, tls: TlsMaterial) -> grpc.aio.Channel:
    """A `grpc.aio` mutual-TLS channel to an HSA's key service, with the same credentials,
    limits and expected server (any HSA of the domain) as the sync one.

    Create it inside the running event loop that uses it.
    """
    credentials = transport.channel_credentials(tls.ca_pem, tls.cert_pem, tls.key_pem)
    options = [
        *DEFAULT_LIMITS.grpc_options(),
        transport.server_name_option(tls.ca_pem, transport.ANY_HSA),
    ]
    return grpc.aio.secure_channel(address, credentials, options=options)
