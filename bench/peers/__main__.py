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
import sys
from pathlib import Path

import bench.peers as peers
from bench._core import BenchConfig, Benchmark, Report
from bench.peers._report import write_markdown
from bench.report import run_cli

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


def _write_docs(report: Report, config: BenchConfig, docs: Path, name: str) -> None:
    """Write the side-by-side page to `docs`."""
    write_markdown(report, docs, name)
    config.log(f"wrote {docs}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON and the page when asked."""
    arguments = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(arguments)
    benchmark = Benchmark(peers)
    docs: Path | None = (
        None if args.no_docs else args.docs or (None if args.quick else DEFAULT_DOCS)
    )
    return run_cli(
        "bench.peers",
        [benchmark.name],
        {benchmark.name: benchmark},
        command=" ".join(["python -m bench.peers", *arguments]),
        quick=args.quick,
        keep=args.keep,
        json_path=args.json,
        write_docs=None
        if docs is None
        else lambda report, config: _write_docs(report, config, docs, benchmark.name),
        scratch_prefix="hsm-bench-peers-",
        stopped="server",
    )


if __name__ == "__main__":
    sys.exit(main())
