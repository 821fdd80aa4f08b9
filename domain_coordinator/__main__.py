"""`domain-coordinator --config FILE [--ready-file F]`: run one coordinator until SIGTERM/SIGINT.

Exit status 0 after a clean stop; 1 when it refuses to start (the reason on one line of
stderr: a config error, a genesis or stored chain that does not verify, a port in use).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from domain_coordinator.server import CoordinatorServer, write_ready_file
from domain_core.errors import HsmDomainError
from domain_edge.config import CoordinatorConfig
from domain_edge.logs import add_log_format_option, configure_logging

log = logging.getLogger("domain_coordinator")

EXAMPLE = """example:
  domain-coordinator --config DIR/coordinator/config.json --ready-file DIR/run/coordinator.json
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="domain-coordinator",
        description="Run the coordinator of an HSM domain: the untrusted relay and durable "
        "store of proposals, approvals, domain states and key records.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, type=Path, help="coordinator config.json")
    parser.add_argument(
        "--ready-file", type=Path, help="write this JSON file (pid, addresses) once serving"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    add_log_format_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the coordinator; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(
        "coordinator",
        verbose=args.verbose,
        log_format=args.log_format,
        text_format="%(asctime)s %(levelname)s coordinator: %(message)s",
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server: CoordinatorServer | None = None
    try:
        config = CoordinatorConfig.load(args.config)
        server = CoordinatorServer(config)
        addresses = server.start()
        if args.ready_file is not None:
            write_ready_file(args.ready_file, config.name, addresses)
        while not stop.wait(3600):
            pass
        log.info("stopping")
        return 0
    except HsmDomainError as error:
        print(f"domain-coordinator: refusing to start: {error}", file=sys.stderr)
        if args.verbose:
            log.exception("details")
        return 1
    except OSError as error:
        print(f"domain-coordinator: refusing to start: {error}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop(grace=2.0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
