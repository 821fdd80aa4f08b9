"""The audit log alone: the cost of one record, appended and verified (no domain, no network).

Appends records shaped like an Encrypt call's (SPIFFE principal, key id, two-entry encryption
context) to a fresh `AuditLog` in a temporary directory, as the HSA opens it (background
checkpoints: signed, fsynced and written to the head file every 1000 records or 1 s of
activity by the log's own thread, none on the appending threads), from one thread
(`append_1_thread_per_s`, per-append latency percentiles `append_p50_ms`...) and from 4 threads
(`append_4_threads_per_s`); then verifies the log (`verify_records_per_s`) and gives the bytes
per record. This is the part every Encrypt/Decrypt pays for. 50,000 records (5,000 in quick
mode).

    python -m bench.audit_append [--records N] [--threads T] [--json FILE]

It is also a module of the `python -m bench` runner (NAME, TITLE, run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from bench._core import BenchConfig, Figure
from bench._stats import summarize_ms
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.audit import AuditLog, verify_audit_log

__all__ = ["NAME", "TITLE", "main", "measure", "run"]

NAME: Final = "audit_append"
TITLE: Final = "audit log: append one record (1 and 4 threads), verify the log"

HOST: Final = "hsa-1"
THREADS: Final = 4


def _append(log: AuditLog, i: int) -> None:
    log.append(
        principal="spiffe://local/client/demo-app",
        operation="Encrypt",
        key_id="0f9c2a71-5d1e-4c39-9a57-3be0d1c2e4f8",
        encryption_context={"order": str(i), "tenant": "acme"},
    )


def measure(directory: Path, records: int, threads: int) -> dict[str, Figure]:
    """Every figure for `records` appends from one thread and from `threads` threads."""
    signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
    if records < threads or threads < 1:
        raise ValueError("records and threads must be positive, with records >= threads")
    figures: dict[str, Figure] = {"records": records, "threads": threads}

    path = directory / "single.log"
    latencies: list[int] = []
    with AuditLog(path, host_id=HOST, signer=signer, background=True) as log:
        began = time.perf_counter()
        for i in range(records):
            start = time.perf_counter_ns()
            _append(log, i)
            latencies.append(time.perf_counter_ns() - start)
        elapsed = time.perf_counter() - began
    figures["append_1_thread_per_s"] = records / elapsed
    figures["append_1_thread_mean_us"] = elapsed / records * 1e6
    figures.update(summarize_ms(latencies, "append"))
    size = path.stat().st_size
    figures["record_bytes"] = size / records

    began = time.perf_counter()
    report = verify_audit_log(path, signer.public_key, host_id=HOST)
    elapsed = time.perf_counter() - began
    if not report.ok:
        raise RuntimeError(f"the benchmark's own log does not verify: {report.reason}")
    figures["verify_records_per_s"] = records / elapsed
    figures["checkpoints"] = report.checkpoints

    path = directory / "threads.log"
    per_thread = records // threads
    with AuditLog(path, host_id=HOST, signer=signer, background=True) as log:

        def work() -> None:
            for i in range(per_thread):
                _append(log, i)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        began = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - began
    figures[f"append_{threads}_threads_per_s"] = per_thread * threads / elapsed
    report = verify_audit_log(path, signer.public_key, host_id=HOST)
    if not report.ok:
        raise RuntimeError(f"the threaded log does not verify: {report.reason}")
    return figures


def run(config: BenchConfig) -> dict[str, Figure]:
    """The `python -m bench` entry: 5,000 records in quick mode, 50,000 in a full run."""
    directory = config.directory(NAME)
    directory.mkdir(parents=True)
    return measure(directory, int(config.pick(5_000, 50_000)), THREADS)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print it, and write `--json` if asked."""
    parser = argparse.ArgumentParser(prog="python -m bench.audit_append", description=__doc__)
    parser.add_argument("--records", type=int, default=50_000, help="appends (default 50000)")
    parser.add_argument(
        "--threads", type=int, default=THREADS, help=f"threads in the second run ({THREADS})"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.records < args.threads:
        parser.error("--threads must be at least 1 and --records at least --threads")
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        figures = measure(Path(tmp), args.records, args.threads)
    for name, value in figures.items():
        print(f"{name:<34} {value:,.3f}" if isinstance(value, float) else f"{name:<34} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
