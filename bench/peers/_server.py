"""A peer server that we start ourselves (OpenBao, PyKMIP): one process, always stopped.

Both foreign peers are one command line run on 127.0.0.1 in a scratch directory; this module
holds what starting and stopping them share, so that the two cannot drift: the server runs in
a new session (its own process group) with stdin closed and stdout and stderr in one log
file; start-up polls the peer's own readiness check and stops polling as soon as the process
exits; a server that exits is reported with its exit status and the tail of its log.

Invariants: from `start()` on, the server is stopped when the `with` block ends, when start-up
fails in any way (Ctrl-C included), and at interpreter exit; stopping sends SIGTERM to the
whole process group and SIGKILL after a grace period (`deploy.cluster.stop_process`), so
helper processes go too; `stop()` is idempotent.
"""

from __future__ import annotations

import atexit
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from bench._core import BenchError
from bench.peers._common import wait_until
from deploy import cluster as runner

__all__ = ["LOG_TAIL_CHARS", "STOP_GRACE_SECONDS", "PeerServer"]

STOP_GRACE_SECONDS: Final = 5.0
LOG_TAIL_CHARS: Final = 600


class PeerServer(ABC):
    """The life cycle of a peer server process; a subclass makes it ready in `_start`.

    `_start` runs the server with `_spawn` and waits for it with `_wait_ready`; everything
    else (the `with` protocol, stopping on failure and at exit, the server's pids) is here.
    """

    def __init__(self, directory: Path, *, start_timeout: float) -> None:
        self.directory = Path(directory)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._output: Path | None = None

    @property
    @abstractmethod
    def label(self) -> str:
        """Figure prefix of this peer (see `bench.peers._common.Peer`)."""

    @abstractmethod
    def _start(self) -> None:
        """Start the server and make it ready for calls (the subclass's part of `start`)."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start the server and make it ready; stopped again if anything fails on the way."""
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and its process group (idempotent)."""
        if self.process is not None:
            runner.stop_process(self.process, grace=STOP_GRACE_SECONDS)
            self.process = None
        atexit.unregister(self.stop)

    def server_pids(self) -> list[int]:
        """The server's root process (helpers it starts are its children, measured with it)."""
        if self.process is None or self.process.poll() is not None:
            raise BenchError(f"{self.label} is not running")
        return [self.process.pid]

    def _spawn(
        self, command: Sequence[str], *, env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Run `command` in the server's directory, in its own process group, output to `log`."""
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                list(command),
                cwd=self.directory,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._output = log
        return self.process

    def _wait_ready(self, ready: Callable[[], bool], *, what: str) -> bool:
        """Poll `ready` until it holds (True) or the server has exited (False); BenchError
        naming `what` after `start_timeout` seconds."""
        process = self.process
        if process is None:
            raise BenchError(f"{what} was not started")
        wait_until(
            lambda: process.poll() is not None or ready(), timeout=self.start_timeout, what=what
        )
        return process.poll() is None

    def _exit_error(self, what: str) -> BenchError:
        """The error for a server that exited: its status and the tail of its log."""
        status = self.process.returncode if self.process is not None else None
        tail = self._output.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self._output else ""
        return BenchError(f"{what} exited with {status}: {tail}")
