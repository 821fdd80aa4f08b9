"""Many pending proposals: SubmitProposal latency, the sweeper's CPU, and ListProposals loops.

    python -m bench.proposals                       # 1,000 pending proposals, 1 HSA
    python -m bench.proposals --proposals 200 --json p.json

Issue 21 item 6: the coordinator loaded every pending proposal on each SubmitProposal (the last
200 of 1,000 took 4.8 s), re-read, re-parsed and re-verified all of them every 2 s in its
sweeper, and four unauthenticated clients looping ListProposals took CreateKey from 10 to 760 ms.
This measures the same things on a fresh one-HSA domain (`bench._cluster.BenchDomain`, three
operators, quorum 2):

1. `proposals` proposals are submitted one after the other, round robin over the operators
   (each a rotate-domain-key with a reason of `REASON_CHARS` characters: about 1.3 KiB, the size
   of a real add-host with its certificate fingerprint and keys), so each stays pending with
   one approval. The coordinator's read quota and per-operator cap are lifted for this phase
   (the submissions measure the store, not the quota). Figures: `submit_first_100_p50_ms`,
   `submit_last_200_p50_ms`, `submit_last_200_p99_ms` and `submit_last_200_total_s`.
2. The coordinator is left idle for `IDLE_SECONDS` (its sweeper runs every 2 s): its CPU
   (utime + stime from /proc) gives `sweeper_cpu_percent` and `sweeper_cpu_ms_per_pass`.
3. The coordinator restarts with its default limits (the quota on); CreateKey through the HSA
   (the demo application, one caller, `creates` calls, each storing a key record at the
   coordinator) is measured quiet, then while `LOOPS` processes loop ListProposals without a
   certificate on the operator port (for `LOOP_SECONDS` at least, so that the loops are past
   their quota's burst for most of it): `create_key_quiet_p50_ms` / `_p99_ms`,
   `create_key_loops_p50_ms` / `_p99_ms`, `list_loops_served_per_s` and
   `list_loops_refused_per_s` (all loops together), and `coordinator_cpu_percent_under_loops`.

Quick mode: 100 proposals (the "last 200" figures then cover the last half), 4 s idle, 30
CreateKey calls per phase, 3 s of loops. Client and servers share this machine's cores: a busy
machine moves the milliseconds; compare runs made side by side.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import grpc

from bench._cluster import BenchDomain
from bench._core import BenchConfig, Figure
from bench._proc import cpu_seconds
from bench._stats import percentile
from deploy.init import COORDINATOR_NAME, DomainLayout
from domain_core.limits import DEFAULT_LIMITS
from domain_edge import transport
from domain_edge.client import rotate_domain_key
from domain_edge.config import CoordinatorConfig
from domain_proto import services_pb2, services_pb2_grpc

NAME: Final = "proposals"
TITLE: Final = "1,000 pending proposals: SubmitProposal, the sweeper, ListProposals loops"

REASON_CHARS: Final = 1000
IDLE_SECONDS: Final = 10.0
LOOP_SECONDS: Final = 10.0
LOOPS: Final = 4
CALL_TIMEOUT: Final = 10.0
SETTLE_SECONDS: Final = 1.0
_UNLIMITED: Final = 1_000_000

__all__ = ["NAME", "TITLE", "main", "measure", "run"]


class ProposalDomain(BenchDomain):
    """A BenchDomain whose coordinator starts with its read quota and proposal caps lifted."""

    def init(self) -> DomainLayout:
        layout = super().init()
        _set_coordinator_limits(layout, lifted=True)
        return layout


def _set_coordinator_limits(layout: DomainLayout, *, lifted: bool) -> None:
    """Lift the quota and caps that would refuse the submissions, or restore the defaults."""
    path = layout.coordinator_config
    config = CoordinatorConfig.load(path)
    limits: dict[str, float] = {}
    if lifted:
        names = {f.name for f in dataclasses.fields(DEFAULT_LIMITS)}
        wanted = {
            "coordinator_reads_per_second": float(_UNLIMITED),
            "coordinator_read_burst": _UNLIMITED,
            "max_pending_proposals": _UNLIMITED,
            "max_pending_proposals_per_operator": _UNLIMITED,
        }
        limits = {k: v for k, v in wanted.items() if k in names}
    dataclasses.replace(config, limits=limits).save(path)


def _p(values: list[float], q: float) -> float:
    return round(percentile(values, q), 3) if values else float("nan")


def submit_all(domain: BenchDomain, count: int, log: Any) -> list[float]:
    """Submit `count` proposals, round robin over the operators; each one's latency (ms)."""
    client = domain.coordinator_client()
    signers = [domain.operator_signer(i) for i in range(len(domain.layout.operator_tokens))]
    reason = ("r" * (REASON_CHARS - 12)) + " (benchmark)"
    latencies: list[float] = []
    for index in range(count):
        began = time.perf_counter()
        client.propose([rotate_domain_key()], signers[index % len(signers)], reason=reason)
        latencies.append((time.perf_counter() - began) * 1000)
        if (index + 1) % 200 == 0:
            log(f"   {index + 1} proposals pending; the last took {latencies[-1]:.1f} ms")
    return latencies


def _create_keys(domain: BenchDomain, count: int, min_seconds: float = 0.0) -> list[float]:
    """At least `count` CreateKey calls through the first HSA, one after the other, going on
    until `min_seconds` have passed; latencies (ms)."""
    host = domain.hosts[0]
    with transport.mtls_channel(
        domain.address(host), domain.client_tls(), transport.hsa_host(host)
    ) as channel:
        stub: Any = services_pb2_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        request = services_pb2.CreateKeyRequest(description="proposals benchmark")
        stub.CreateKey(request, timeout=CALL_TIMEOUT)  # warm up the channel
        latencies: list[float] = []
        started = time.perf_counter()
        while len(latencies) < count or time.perf_counter() - started < min_seconds:
            began = time.perf_counter()
            stub.CreateKey(request, timeout=CALL_TIMEOUT)
            latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def list_loop(address: str, ca_file: Path) -> None:
    """Loop ListProposals on the operator port until SIGTERM; print the counts as JSON."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    channel = transport.secure_channel(address, ca_file.read_bytes(), transport.COORDINATOR)
    stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
    counts: Counter[str] = Counter()
    began = time.monotonic()
    while not stop.is_set():
        try:
            stub.ListProposals(services_pb2.ListProposalsRequest(), timeout=CALL_TIMEOUT)
            counts["served"] += 1
        except grpc.RpcError as error:
            key = "refused" if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"
            counts[key] += 1
    channel.close()
    report = dict(counts) | {"seconds": round(time.monotonic() - began, 3)}
    print(json.dumps(report), flush=True)


def _with_loops(
    domain: BenchDomain, work_dir: Path, creates: int, seconds: float
) -> dict[str, Any]:
    """CreateKey latencies while `LOOPS` processes loop ListProposals; what the loops got."""
    ca_file = work_dir / "ca.crt"
    ca_file.write_bytes(domain.ca_pem())
    loops = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.proposals",
                "list-loop",
                domain.coordinator_operator_address,
                str(ca_file),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(LOOPS)
    ]
    try:
        time.sleep(SETTLE_SECONDS)
        coordinator = domain.pid(COORDINATOR_NAME)
        cpu_before, wall_before = cpu_seconds(coordinator), time.monotonic()
        latencies = _create_keys(domain, creates, seconds)
        cpu = cpu_seconds(coordinator) - cpu_before
        wall = time.monotonic() - wall_before
    finally:
        reports = []
        for loop in loops:
            loop.send_signal(signal.SIGTERM)
        for loop in loops:
            output, _ = loop.communicate(timeout=60)
            lines = output.strip().splitlines()
            if lines:
                reports.append(json.loads(lines[-1]))
    seconds = max((r.get("seconds", 0.0) for r in reports), default=0.0) or 1.0
    return {
        "latencies": latencies,
        "cpu_percent": 100.0 * cpu / wall,
        "served_per_s": sum(r.get("served", 0) for r in reports) / seconds,
        "refused_per_s": sum(r.get("refused", 0) for r in reports) / seconds,
        "failed": sum(r.get("failed", 0) for r in reports),
    }


def measure(
    domain: BenchDomain,
    work_dir: Path,
    *,
    proposals: int,
    idle_seconds: float,
    creates: int,
    log: Any,
    loop_seconds: float = LOOP_SECONDS,
) -> dict[str, Figure]:
    """The three phases of the module docstring on a started ProposalDomain."""
    figures: dict[str, Figure] = {"proposals_pending": proposals}
    log(f"   submitting {proposals} proposals")
    submits = submit_all(domain, proposals, log)
    last = submits[-min(200, max(1, proposals // 2)) :]
    figures["submit_first_100_p50_ms"] = _p(submits[:100], 50)
    figures["submit_last_200_p50_ms"] = _p(last, 50)
    figures["submit_last_200_p99_ms"] = _p(last, 99)
    figures["submit_last_200_total_s"] = round(sum(last) / 1000, 3)

    log(f"   the coordinator idle for {idle_seconds:g} s (its sweeper runs every 2 s)")
    time.sleep(SETTLE_SECONDS)
    coordinator = domain.pid(COORDINATOR_NAME)
    before = cpu_seconds(coordinator)
    time.sleep(idle_seconds)
    used = cpu_seconds(coordinator) - before
    figures["sweeper_cpu_percent"] = round(100.0 * used / idle_seconds, 2)
    figures["sweeper_cpu_ms_per_pass"] = round(1000.0 * used / (idle_seconds / 2.0), 2)

    log("   restarting the coordinator with its default limits")
    _set_coordinator_limits(domain.layout, lifted=False)
    domain.stop_coordinator()
    domain.start_coordinator()
    domain.wait_registered(domain.hosts)
    log(f"   CreateKey x{creates}, quiet")
    quiet = _create_keys(domain, creates)
    figures["create_key_quiet_p50_ms"] = _p(quiet, 50)
    figures["create_key_quiet_p99_ms"] = _p(quiet, 99)
    log(f"   CreateKey x{creates}, with {LOOPS} unauthenticated ListProposals loops")
    loops = _with_loops(domain, work_dir, creates, loop_seconds)
    figures["create_key_loops_p50_ms"] = _p(loops["latencies"], 50)
    figures["create_key_loops_p99_ms"] = _p(loops["latencies"], 99)
    figures["coordinator_cpu_percent_under_loops"] = round(loops["cpu_percent"], 1)
    figures["list_loops_served_per_s"] = round(loops["served_per_s"], 1)
    figures["list_loops_refused_per_s"] = round(loops["refused_per_s"], 1)
    figures["list_loops_failed"] = loops["failed"]
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry (see the module docstring for quick mode)."""
    directory = config.directory(NAME)
    with ProposalDomain(directory / "domain", nodes=1) as domain:
        return measure(
            domain,
            directory,
            proposals=int(config.pick(100, 1000)),
            idle_seconds=float(config.pick(4.0, IDLE_SECONDS)),
            creates=int(config.pick(30, 200)),
            log=config.log,
            loop_seconds=float(config.pick(3.0, LOOP_SECONDS)),
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures (or, as `list-loop`, one attacker's loop)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["list-loop"] and len(arguments) == 3:
        list_loop(arguments[1], Path(arguments[2]))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.proposals",
        description="SubmitProposal, the sweeper and ListProposals loops with many proposals",
    )
    parser.add_argument("--proposals", type=int, default=1000, help="pending proposals")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="idle seconds")
    parser.add_argument("--creates", type=int, default=200, help="CreateKey calls per phase")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    args = parser.parse_args(arguments)
    if min(args.proposals, args.creates) < 1 or args.idle <= 0:
        parser.error("--proposals, --creates and --idle must be positive")

    def log(message: str) -> None:
        print(message.strip(), file=sys.stderr, flush=True)

    def stop(*_: object) -> None:
        raise SystemExit(143)  # so that the domain is stopped on the way out

    signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="proposals-") as scratch:
        work = Path(scratch)
        with ProposalDomain(work / "domain", nodes=1) as domain:
            figures = measure(
                domain,
                work,
                proposals=args.proposals,
                idle_seconds=args.idle,
                creates=args.creates,
                log=log,
            )
    for key, value in figures.items():
        print(f"{key:40} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
