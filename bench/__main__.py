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
import sys
from pathlib import Path

from bench import BENCHMARK_MODULES
from bench._core import BenchConfig, Benchmark, Report, load_benchmarks
from bench.report import PlotsUnavailable, run_cli, write_markdown, write_plots

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


def _docs_target(args: argparse.Namespace) -> Path | None:
    if args.no_docs:
        return None
    if args.docs is not None:
        return Path(args.docs)
    if args.command == "all" and not args.quick:
        return DEFAULT_DOCS
    return None


def _write_docs(
    report: Report,
    config: BenchConfig,
    docs: Path,
    draw_plots: bool,
    available: dict[str, Benchmark],
) -> None:
    """Write the markdown report to `docs` and, unless told not to, the plots beside it."""
    plots: dict[str, list[Path]] = {}
    if draw_plots:
        try:
            plots = write_plots(config, docs.parent / "bench", report.results)
        except PlotsUnavailable as error:
            config.log(f"bench: {error}")
    descriptions = {name: available[name].module.__doc__ or "" for name in report.results}
    write_markdown(report, docs, descriptions, plots)
    config.log(
        f"wrote {docs}" + (f" and {sum(len(p) for p in plots.values())} plots" if plots else "")
    )


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
    docs = _docs_target(args)
    return run_cli(
        "bench",
        list(available) if args.command == "all" else list(args.names),
        available,
        command=" ".join(["python -m bench", *arguments]),
        quick=args.quick,
        keep=args.keep,
        json_path=args.json,
        write_docs=None
        if docs is None
        else lambda report, config: _write_docs(report, config, docs, not args.no_plots, available),
        scratch_prefix="hsm-bench-",
        stopped="domain",
    )


if __name__ == "__main__":
    sys.exit(main())
