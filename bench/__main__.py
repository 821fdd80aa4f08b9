"""`python -m bench`: run the benchmarks, print a table, write JSON, docs and plots.

    python -m bench all                      # full run: table, docs/benchmarks.md, docs/bench/*.png
    python -m bench all --quick --json b.json  # CI smoke: < 2 min on 2 cores, no docs, no plots
    python -m bench run floor propagation    # some benchmarks (the floor comes along if needed)
    python -m bench list                     # what there is

Exit status 0 when every selected benchmark produced its figures (targets are reported, not
enforced), 1 when one failed, 2 for bad usage. Every domain a benchmark starts is stopped at
the end, on Ctrl-C and on SIGTERM; the scratch directory is removed unless `--keep`.
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

from bench import BENCHMARK_MODULES
from bench._core import BenchConfig, BenchError, load_benchmarks, run_benchmarks
from bench.report import (
    PlotsUnavailable,
    print_report,
    write_json,
    write_markdown,
    write_plots,
)

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_DOCS = REPOSITORY / "docs" / "benchmarks.md"
_EPILOG = """examples:
  python -m bench all                        full run; writes docs/benchmarks.md, docs/bench/
  python -m bench all --quick --json b.json  CI smoke run (< 2 min on 2 cores), no docs
  python -m bench run floor memory           selected benchmarks only
  python -m bench list                       the benchmarks there are
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of a local hsm-domain (real processes, mutual TLS).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--quick", action="store_true", help="small sizes and short runs (CI smoke, < 2 min)"
        )
        p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
        p.add_argument(
            "--docs",
            type=Path,
            metavar="FILE",
            help="write the markdown report to FILE, plots beside it in bench/ "
            "(default for a full `all`: docs/benchmarks.md)",
        )
        p.add_argument("--no-docs", action="store_true", help="write no markdown and no plots")
        p.add_argument("--no-plots", action="store_true", help="write the markdown without plots")
        p.add_argument("--keep", action="store_true", help="keep the scratch directory")

    p = sub.add_parser("all", help="run every benchmark", epilog=_EPILOG)
    common(p)
    p = sub.add_parser("run", help="run the named benchmarks", epilog=_EPILOG)
    p.add_argument("names", nargs="+", metavar="NAME", help="benchmark names (see list)")
    common(p)
    sub.add_parser("list", help="list the benchmarks")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _docs_target(args: argparse.Namespace) -> Path | None:
    if args.no_docs:
        return None
    if args.docs is not None:
        return Path(args.docs)
    if args.command == "all" and not args.quick:
        return DEFAULT_DOCS
    return None


def main(argv: list[str] | None = None) -> int:
    """Run what the command line asks for; the exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(arguments)
    try:
        available = load_benchmarks(BENCHMARK_MODULES)
    except (ImportError, TypeError) as error:
        print(f"bench: cannot load the benchmarks: {error}", file=sys.stderr)
        return 1
    if args.command == "list":
        for name, benchmark in available.items():
            print(f"{name:14} {benchmark.title}")
        return 0
    selected = list(available) if args.command == "all" else list(args.names)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    work_dir = Path(tempfile.mkdtemp(prefix="hsm-bench-"))
    config = BenchConfig(quick=args.quick, work_dir=work_dir, log=_log)
    began = time.monotonic()
    try:
        report = run_benchmarks(
            selected,
            available,
            config,
            command=" ".join(["python -m bench", *arguments]),
        )
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every domain it started was stopped", file=sys.stderr)
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
    docs = _docs_target(args)
    if docs is not None:
        plots: dict[str, list[Path]] = {}
        if not args.no_plots:
            try:
                plots = write_plots(config, docs.parent / "bench", report.results)
            except PlotsUnavailable as error:
                _log(f"bench: {error}")
        descriptions = {name: available[name].module.__doc__ or "" for name in report.results}
        write_markdown(report, docs, descriptions, plots)
        _log(
            f"wrote {docs}" + (f" and {sum(len(p) for p in plots.values())} plots" if plots else "")
        )
    _log(f"bench: {time.monotonic() - began:.1f} s in all")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
