"""Key service against the floor: Echo vs Encrypt vs Decrypt of 1 KiB on one HSA, same client.

    python -m bench.profile_keyservice                       # table on stdout
    python -m bench.profile_keyservice --json ks.json        # and every figure as JSON
    python -m bench.profile_keyservice --py-spy /tmp/enc.svg # and a flame graph of Encrypt
    python -m bench.profile_keyservice --in-process 5000 --cprofile  # the servicer alone

Starts one HSA and its coordinator (deploy.init + deploy.cluster, through `BenchDomain`) in a
temporary directory, creates one key, and measures `Diagnostics.Echo` (the floor: the same
process, server, mutual TLS and interceptors, no work), `KeyService.Encrypt` and
`KeyService.Decrypt` of 1 KiB with a one-entry encryption context, at concurrency 1 and 16.

Every call comes from the same client: N asyncio tasks on one `grpc.aio` channel with raw
stubs (measured to be the cheapest client here, which matters because client and server
share the machine's cores). Rounds are interleaved (floor, encrypt, decrypt, floor, ...) so
that a noisy neighbour hits all three alike; per operation the report gives the median over
rounds of throughput and of p50/p99 latency, their ratios to the floor's, and the server's
CPU per call (utime + stime of the HSA process from /proc/PID/stat, read by
`bench._proc.CpuMeter` over the measured windows only). Issue 7's targets: throughput >= 0.8
of the floor and p99 <= 1.5 times it.

`--in-process N` measures instead what the key service's own Python costs per call, without
gRPC: the real `KeyServiceServicer`, key cache, policy check, ciphertext code and audit log
(a file in the temporary directory), called N times in a row with the demo application's
certificate; the key is read once from an in-memory stand-in for the coordinator. It gives CPU
µs per call (best and median of 7 repeats) and, with `--cprofile`, where that time goes. On a
busy server the same code costs several times more (cold caches, GIL hand-offs between the
gRPC threads), so every µs found here is worth several there.

Invariants: every round is bounded in time and in calls; the domain is stopped and the
directory removed whatever happens (Ctrl-C and SIGTERM included); the key is a throwaway.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import asyncio
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import grpc

from bench._cluster import FAST_SCRYPT_N, BenchDomain
from bench._load import LoadResult, aio_mtls_channel, run_tasks
from bench._proc import CpuMeter
from bench._stats import median, percentile
from domain_core.limits import DEFAULT_LIMITS
from domain_edge.transport import CertificatePeerContext
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

__all__ = ["OPERATIONS", "Cell", "main", "measure"]

PAYLOAD_BYTES: Final = 1024
CONTEXT: Final = {"purpose": "profile-keyservice"}
OPERATIONS: Final = ("echo", "encrypt", "decrypt")
CALL_TIMEOUT: Final = 10.0
THROUGHPUT_TARGET: Final = 0.8
P99_TARGET: Final = 1.5


@dataclass
class Cell:
    """Every round of one (operation, concurrency): per-round figures and pooled CPU."""

    operation: str
    concurrency: int
    ops_s: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    first_error: str = ""
    server_cpu_s: float = 0.0

    def add(self, load: LoadResult, server_cpu_s: float) -> None:
        """Take one measured round."""
        ms = [v / 1e6 for v in load.latencies_ns]
        if ms:
            self.ops_s.append(load.ops_per_second)
            self.p50_ms.append(percentile(ms, 50))
            self.p99_ms.append(percentile(ms, 99))
        self.calls += load.operations
        self.errors += load.errors
        self.first_error = self.first_error or load.first_error
        self.server_cpu_s += server_cpu_s

    def summary(self) -> dict[str, float | int]:
        """Medians over the rounds and server CPU per call over all of them."""
        if not self.ops_s:
            raise RuntimeError(
                f"no {self.operation} call succeeded at concurrency {self.concurrency}: "
                f"{self.first_error or 'no error recorded'}"
            )
        return {
            "ops_s": median(self.ops_s),
            "p50_ms": median(self.p50_ms),
            "p99_ms": median(self.p99_ms),
            "server_cpu_us_per_op": self.server_cpu_s * 1e6 / self.calls,
            "calls": self.calls,
            "errors": self.errors,
            "rounds": len(self.ops_s),
        }


async def _measure_async(
    domain: BenchDomain,
    *,
    concurrencies: tuple[int, ...],
    rounds: int,
    seconds: float,
    max_ops: int,
    profile: Callable[[Callable[[], Awaitable[object]]], Awaitable[None]] | None,
) -> dict[tuple[str, int], Cell]:
    host = domain.hosts[0]
    pid = domain.pid(host)
    payload = os.urandom(PAYLOAD_BYTES)
    async with aio_mtls_channel(domain.address(host), domain.client_tls()) as channel:
        keys: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        diagnostics: Any = services_pb2_grpc.DiagnosticsStub(channel)  # type: ignore[no-untyped-call]
        created = await keys.CreateKey(
            services_pb2.CreateKeyRequest(description="profile-keyservice"), timeout=30.0
        )
        key_id = created.metadata.key_id
        encrypt = services_pb2.EncryptRequest(
            key_id=key_id, plaintext=payload, encryption_context=CONTEXT
        )
        blob = (await keys.Encrypt(encrypt, timeout=CALL_TIMEOUT)).ciphertext_blob
        decrypt = services_pb2.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT)
        echo = services_pb2.EchoMessage(payload=payload)
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "echo": lambda: diagnostics.Echo(echo, timeout=CALL_TIMEOUT),
            "encrypt": lambda: keys.Encrypt(encrypt, timeout=CALL_TIMEOUT),
            "decrypt": lambda: keys.Decrypt(decrypt, timeout=CALL_TIMEOUT),
        }
        cells = {(op, c): Cell(op, c) for c in concurrencies for op in OPERATIONS}
        for _ in range(rounds):
            for concurrency in concurrencies:
                for operation in OPERATIONS:
                    meter = CpuMeter([pid])
                    load = await run_tasks(
                        calls[operation],
                        concurrency=concurrency,
                        duration=seconds,
                        max_ops=max_ops,
                        on_start=meter.start,
                        on_stop=meter.stop,
                    )
                    cells[(operation, concurrency)].add(load, meter.hsa_seconds)
        if profile is not None:
            await profile(calls["encrypt"])
    return cells


def _py_spy(pid: int, output: Path, seconds: float) -> Callable[..., Awaitable[None]]:
    """A load of Encrypt at concurrency 16 while `py-spy record` samples the HSA."""

    async def run(call: Callable[[], Awaitable[object]]) -> None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [py_spy, "record", "-o", str(output), "--pid", str(pid)]
        command += ["--duration", str(int(seconds)), "--threads", "--nonblocking", "--gil"]
        # A .svg is a flame graph; anything else gets collapsed stacks (one line per stack).
        command += ["--format", "flamegraph" if output.suffix == ".svg" else "raw"]
        sampler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await run_tasks(call, concurrency=16, duration=seconds + 1.0, max_ops=10_000_000)
        finally:
            try:
                _, err = sampler.communicate(timeout=seconds + 30.0)
            except subprocess.TimeoutExpired:
                sampler.kill()
                _, err = sampler.communicate()
        if sampler.returncode != 0:
            print(f"py-spy failed: {err.decode(errors='replace')[-400:]}", file=sys.stderr)
        else:
            print(f"py-spy profile of Encrypt (c16) on the HSA: {output}", file=sys.stderr)

    return run


def measure(
    *,
    concurrencies: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    seconds: float = 3.0,
    max_ops: int = 100_000,
    py_spy: Path | None = None,
    py_spy_seconds: float = 10.0,
    directory: Path | None = None,
) -> dict[str, Any]:
    """Run the comparison in a fresh one-node domain; every figure as a JSON-ready dict."""
    if rounds < 1 or seconds <= 0 or max_ops < 1 or not concurrencies:
        raise ValueError("rounds, seconds, max_ops and concurrencies must be positive")
    with (
        tempfile.TemporaryDirectory(prefix="profile-keyservice-") as scratch,
        BenchDomain((directory or Path(scratch)) / "domain", nodes=1) as domain,
    ):
        pid = domain.pid(domain.hosts[0])
        print(f"HSA {domain.hosts[0]} is process {pid}", file=sys.stderr)
        profile = _py_spy(pid, py_spy, py_spy_seconds) if py_spy is not None else None
        started = time.perf_counter()
        cells = asyncio.run(
            _measure_async(
                domain,
                concurrencies=concurrencies,
                rounds=rounds,
                seconds=seconds,
                max_ops=max_ops,
                profile=profile,
            )
        )
        elapsed = time.perf_counter() - started
    figures: dict[str, Any] = {}
    for concurrency in concurrencies:
        floor = cells[("echo", concurrency)].summary()
        for operation in OPERATIONS:
            summary = cells[(operation, concurrency)].summary()
            if operation != "echo":
                summary["throughput_ratio"] = summary["ops_s"] / floor["ops_s"]
                summary["p99_ratio"] = summary["p99_ms"] / floor["p99_ms"]
                summary["cpu_ratio"] = (
                    summary["server_cpu_us_per_op"] / floor["server_cpu_us_per_op"]
                )
                summary["meets_targets"] = (
                    summary["throughput_ratio"] >= THROUGHPUT_TARGET
                    and summary["p99_ratio"] <= P99_TARGET
                )
            figures[f"{operation}_c{concurrency}"] = summary
    return {
        "command": " ".join(["python -m bench.profile_keyservice", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "load_average": os.getloadavg(),
        },
        "settings": {
            "payload_bytes": PAYLOAD_BYTES,
            "rounds": rounds,
            "seconds_per_round": seconds,
            "max_ops_per_round": max_ops,
            "client": "grpc.aio, one channel, raw stubs, N tasks",
        },
        "elapsed_s": round(elapsed, 1),
        "figures": figures,
    }


class _Records:
    """An in-memory stand-in for the coordinator's key-record calls (in-process mode)."""

    def __init__(self) -> None:
        self._records: dict[str, keys_pb2.KeyRecord] = {}

    def get(self, key_id: str, *, timeout: float | None = None) -> keys_pb2.KeyRecord | None:
        return self._records.get(key_id)

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        key_id = keys_pb2.KeyMetadata.FromString(record.metadata).key_id
        self._records[key_id] = record
        return expected_revision + 1


def measure_in_process(calls: int, *, cprofile: bool = False) -> dict[str, Any]:
    """CPU µs per Encrypt and Decrypt of the key service alone (see the module docstring)."""
    import cProfile
    import io
    import pstats

    from deploy import cluster as runner
    from deploy.init import init_domain
    from domain_core.keytokens import RecordSigner
    from domain_edge.audit import AUDIT_LOG_FILE, AuditLog
    from domain_edge.config import NodeConfig
    from hsa_node.keycache import KeyCache
    from hsa_node.keyfloors import FLOOR_FILE, MetadataVersionFloor
    from hsa_node.keyservice import KeyServiceServicer
    from hsa_node.server import load_node

    if calls < 1:
        raise ValueError("--in-process needs a positive number of calls")
    with tempfile.TemporaryDirectory(prefix="profile-keyservice-") as scratch:
        layout = init_domain(Path(scratch) / "domain", nodes=1, scrypt_n=FAST_SCRYPT_N)
        node = load_node(NodeConfig.load(next(iter(layout.node_configs.values())))).node
        data = Path(scratch) / "keyservice"
        data.mkdir()
        audit = AuditLog(
            data / AUDIT_LOG_FILE,
            host_id=node.host_id,
            signer=node.identity.signer,
            background=True,  # as the HSA opens it
        )
        floor = MetadataVersionFloor(data / FLOOR_FILE)
        try:
            cache = KeyCache(
                domain_id=node.domain_id,
                domain_keys=node.domain_keys,
                records=_Records(),  # type: ignore[arg-type]
                floor=floor,
                signer=RecordSigner(node.domain_id, node.host_id, node.identity.signer),
                ttl=1e9,
            )
            # Quotas too large to run out: a loop of calls from one principal is far over
            # the default 10,000/s, and a refusal would measure the refusal instead.
            unlimited = dataclasses.replace(
                DEFAULT_LIMITS,
                crypto_requests_per_second=1e12,
                crypto_request_burst=10**12,
            )
            servicer = KeyServiceServicer(node=node, cache=cache, audit=audit, limits=unlimited)
            context: Any = CertificatePeerContext(runner.client_tls(layout).cert_pem)
            created = servicer.CreateKey(services_pb2.CreateKeyRequest(), context)
            encrypt = services_pb2.EncryptRequest(
                key_id=created.metadata.key_id,
                plaintext=os.urandom(PAYLOAD_BYTES),
                encryption_context=CONTEXT,
            )
            blob = servicer.Encrypt(encrypt, context).ciphertext_blob
            decrypt = services_pb2.DecryptRequest(ciphertext_blob=blob, encryption_context=CONTEXT)
            operations: dict[str, Callable[[], object]] = {
                "encrypt": lambda: servicer.Encrypt(encrypt, context),
                "decrypt": lambda: servicer.Decrypt(decrypt, context),
            }
            figures: dict[str, Any] = {}
            for name, call in operations.items():
                for _ in range(min(calls, 200)):
                    call()
                repeats = []
                for _ in range(7):
                    began = time.process_time()
                    for _ in range(calls):
                        call()
                    repeats.append((time.process_time() - began) * 1e6 / calls)
                figures[f"{name}_cpu_us_per_call_best"] = min(repeats)
                figures[f"{name}_cpu_us_per_call_median"] = median(repeats)
                if cprofile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(calls):
                        call()
                    profiler.disable()
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
                    print(f"--- {name}: cProfile, {calls} calls, by own time", file=sys.stderr)
                    print(out.getvalue(), file=sys.stderr)
        finally:
            floor.close()
            audit.close()
    return {
        "command": " ".join(["python -m bench.profile_keyservice", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "settings": {"calls_per_repeat": calls, "repeats": 7, "payload_bytes": PAYLOAD_BYTES},
        "figures": figures,
    }


def render(result: dict[str, Any]) -> str:
    """The figures as a Markdown table (ratios are to the floor at the same concurrency)."""
    lines = [
        "| operation | c | ops/s | p50 ms | p99 ms | server CPU µs/op | ops/s ÷ floor "
        "(≥ 0.8) | p99 ÷ floor (≤ 1.5) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in result["figures"].items():
        operation, _, concurrency = name.rpartition("_c")
        ratio = f"{s['throughput_ratio']:.2f}" if "throughput_ratio" in s else "floor"
        p99 = f"{s['p99_ratio']:.2f}" if "p99_ratio" in s else "floor"
        lines.append(
            f"| {operation} | {concurrency} | {s['ops_s']:,.0f} | {s['p50_ms']:.2f} | "
            f"{s['p99_ms']:.2f} | {s['server_cpu_us_per_op']:.0f} | {ratio} | {p99} | "
            f"{s['errors']} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_keyservice",
        description="Echo (the floor) vs Encrypt vs Decrypt of 1 KiB on one local HSA.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds per measured round (default 3)"
    )
    parser.add_argument(
        "--max-ops", type=int, default=100_000, help="calls per round at most (default 100000)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 16],
        help="concurrent callers (default 1 16)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="FILE",
        help="after the rounds, profile the HSA under Encrypt (c16) with py-spy: a flame "
        "graph for a .svg, else collapsed stacks",
    )
    parser.add_argument(
        "--py-spy-seconds", type=float, default=10.0, help="how long py-spy samples (default 10)"
    )
    parser.add_argument(
        "--in-process",
        type=int,
        default=0,
        metavar="N",
        help="measure the key service alone, without gRPC: N calls per repeat (see above)",
    )
    parser.add_argument(
        "--cprofile", action="store_true", help="with --in-process: where the time goes"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write JSON if asked; 0 on success, 1 when a benchmark failed."""
    args = _parser().parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(143)  # unwinds through BenchDomain.stop

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    if args.in_process:
        try:
            result = measure_in_process(args.in_process, cprofile=args.cprofile)
        finally:
            signal.signal(signal.SIGTERM, previous)
        for name, value in result["figures"].items():
            print(f"{name}: {value:.1f}")
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    try:
        result = measure(
            concurrencies=tuple(args.concurrency),
            rounds=args.rounds,
            seconds=args.seconds,
            max_ops=args.max_ops,
            py_spy=args.py_spy,
            py_spy_seconds=args.py_spy_seconds,
        )
    except (RuntimeError, ValueError) as error:
        print(f"profile_keyservice: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render(result))
    print(f"({result['elapsed_s']} s; {result['command']})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
