"""`python -m bench.peers`: the side-by-side benchmark alone, with its own report page.

    python -m bench.peers                        # full run; writes docs/benchmarks-peers.md
    python -m bench.peers --quick --json p.json  # short run, no docs
    python -m bench.peers --docs /tmp/peers.md   # the page somewhere else

Exit status 0 when the figures were measured (targets are reported, not enforced), 1 when
the benchmark failed, 130 on Ctrl-C. Every server it started is stopped on the way out (also
on SIGTERM); the scratch directory is removed unless `--keep`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # after GRPC_VERBOSITY, which grpc reads when it is imported
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import bench.peers as peers
from bench._core import BenchConfig, Benchmark, run_benchmarks
from bench.peers._report import write_markdown
from bench.report import print_report, write_json

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_DOCS = REPOSITORY / "docs" / "benchmarks-peers.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description="Encrypt/Decrypt of 1 KiB: hsm-domain vs OpenBao transit and PyKMIP, "
        "all started here on 127.0.0.1, measured in the same run.",
        epilog="examples:\n  python -m bench.peers\n  python -m bench.peers --quick --json p.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="one round of 1 s cells")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    parser.add_argument(
        "--docs",
        type=Path,
        metavar="FILE",
        help="write the markdown page to FILE (default for a full run: docs/benchmarks-peers.md)",
    )
    parser.add_argument("--no-docs", action="store_true", help="write no markdown")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON and the page when asked."""
    arguments = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(arguments)
    benchmark = Benchmark(peers)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    work_dir = Path(tempfile.mkdtemp(prefix="hsm-bench-peers-"))
    config = BenchConfig(quick=args.quick, work_dir=work_dir, log=_log)
    began = time.monotonic()
    try:
        report = run_benchmarks(
            [benchmark.name],
            {benchmark.name: benchmark},
            config,
            command=" ".join(["python -m bench.peers", *arguments]),
        )
    except KeyboardInterrupt:
        print("bench.peers: interrupted; every server it started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            _log(f"scratch directory kept: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print_report(report)
    if args.json is not None:
        write_json(report, args.json)
        _log(f"wrote {args.json}")
    docs = None if args.no_docs else args.docs or (None if args.quick else DEFAULT_DOCS)
    if docs is not None:
        write_markdown(report, docs, benchmark.name)
        _log(f"wrote {docs}")
    _log(f"bench.peers: {time.monotonic() - began:.1f} s in all")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
