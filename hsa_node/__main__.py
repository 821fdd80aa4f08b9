"""`hsa-node --config FILE [--ready-file F] [--workers N]`: run one HSA until SIGTERM or SIGINT.

`--log-format json` logs one JSON object per line (`domain_edge.logs`); workers inherit it.
`--workers N` (default: `key_service_workers` of the config) starts N key service worker
processes beside it; each runs as `hsa-node worker --config FILE --index I`, a mode meant only
for the main HSA process to use (`hsa_node.worker`, `hsa_node.supervisor`).

Exit status 0 after a clean stop, 1 when the node refuses to start (the reason is one line
on stderr; `-v` adds the traceback and debug logging), 2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from domain_core.errors import HsmDomainError
from domain_edge.config import NodeConfig, check_worker_count
from domain_edge.logs import add_log_format_option, configure_logging
from hsa_node.server import serve
from hsa_node.worker import serve_worker

_PROG = "hsa-node"
_EXAMPLE = """example:
  hsa-node --config DIR/nodes/hsa-1/config.json --ready-file DIR/run/hsa-1.json
  hsa-node --config DIR/nodes/hsa-1/config.json --workers 2
"""
_WORKER = "worker"


def _worker_count(text: str) -> int:
    try:
        return check_worker_count(int(text))
    except (ValueError, HsmDomainError) as error:
        raise argparse.ArgumentTypeError(
            getattr(error, "message", f"{text!r} is not a whole number")
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Run one HSA of an HSM domain (a hardened security appliance).",
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="the node's config.json")
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write {pid, address, name, workers} here (atomically) once serving",
    )
    parser.add_argument(
        "--workers",
        type=_worker_count,
        default=None,
        metavar="N",
        help="key service worker processes (0-16; default: key_service_workers of the config)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    add_log_format_option(parser)
    return parser


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{_PROG} {_WORKER}",
        description=(
            "Run key service worker I of an HSA (started by the main HSA process, which it "
            "follows; it stops when the main process's pipe on its stdin closes)."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, help="the node's config.json")
    parser.add_argument("--index", required=True, type=int, help="the worker's number, from 1")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    add_log_format_option(parser)
    return parser


def _run(name: str, verbose: bool, log_format: str, run: Callable[[threading.Event], None]) -> int:
    """Run `run(stop)` with SIGTERM and SIGINT setting `stop`; the exit status."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    configure_logging(
        name,
        verbose=verbose,
        log_format=log_format,
        text_format=f"%(asctime)s {name} %(name)s %(levelname)s %(message)s",
    )
    log = logging.getLogger("hsa_node")
    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        run(stop)
    except (HsmDomainError, OSError) as error:
        log.error("refusing to start: %s: %s", type(error).__name__, error, exc_info=verbose)
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _worker_main(argv: list[str]) -> int:
    args = _worker_parser().parse_args(argv)
    try:
        config = NodeConfig.load(args.config)
    except HsmDomainError as error:
        print(f"{_PROG} {_WORKER}: {error}", file=sys.stderr)
        return 1
    return _run(
        f"{config.host_id}/worker-{args.index}",
        args.verbose,
        args.log_format,
        lambda stop: serve_worker(config, args.index, stop),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the HSA named by `--config` (or, with `worker` first, one of its key service
    workers); returns the process exit status."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == [_WORKER]:
        return _worker_main(arguments[1:])
    args = _parser().parse_args(arguments)
    try:
        config = NodeConfig.load(args.config)
        if args.workers is not None:
            config = dataclasses.replace(config, key_service_workers=args.workers)
    except HsmDomainError as error:
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1
    return _run(
        config.host_id,
        args.verbose,
        args.log_format,
        lambda stop: serve(
            config, args.ready_file, stop, config_path=args.config, verbose=args.verbose
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
