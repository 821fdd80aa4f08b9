"""`hsa-node --config FILE [--ready-file F]`: run one HSA until SIGTERM or SIGINT.

Exit status 0 after a clean stop, 1 when the node refuses to start (the reason is one line
on stderr; `-v` adds the traceback and debug logging), 2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from domain_core.config import NodeConfig
from domain_core.errors import HsmDomainError
from hsa_node.server import serve

_PROG = "hsa-node"
_EXAMPLE = """example:
  hsa-node --config DIR/nodes/hsa-1/config.json --ready-file DIR/run/hsa-1.json
"""


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
        help="write {pid, address, name} here (atomically) once serving",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    return parser


def _configure_logging(host_id: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {host_id} %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the HSA named by `--config`; returns the process exit status."""
    args = _parser().parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        config = NodeConfig.load(args.config)
    except HsmDomainError as error:
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1
    _configure_logging(config.host_id, args.verbose)
    log = logging.getLogger("hsa_node")
    previous = {
        signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        serve(config, args.ready_file, stop)
    except (HsmDomainError, OSError) as error:
        log.error("refusing to start: %s: %s", type(error).__name__, error, exc_info=args.verbose)
        print(f"{_PROG}: {error}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
