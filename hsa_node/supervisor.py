"""The main HSA process's key service workers: start them, restart them, stop them.

`WorkerSupervisor` runs `python -m hsa_node worker --config FILE --index I` for I = 1..N
(`hsa_node.worker`), in the main process's process group, with stdin a pipe from the main
process (a worker stops when the pipe closes, so no worker outlives a main process that
died) and its log lines on the main process's stderr.

Invariants:
- `start` returns only once every worker wrote its ready file (naming its own pid), so the
  main process publishes the workers' addresses in its ready file only when all of them serve;
  a worker that exits or is not ready in `START_TIMEOUT_SECONDS` fails the start (the main
  process refuses to start, and the workers already running are stopped);
- a worker that exits while the HSA is not stopping is logged at WARNING and started again
  after a backoff (0.5 s doubling to 15 s; back to 0.5 s after a run of a minute); the
  published addresses drop it while it is down and take it back once it is ready again;
- `stop` sends SIGTERM to every worker, waits up to `STOP_GRACE_SECONDS`, then SIGKILLs the
  ones left and reaps them all: after it returns, no worker process is left.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from domain_core.errors import UnavailableError
from domain_edge.config import NodeConfig
from hsa_node.storage import read_worker_ready, worker_ready_path

__all__ = ["START_TIMEOUT_SECONDS", "STOP_GRACE_SECONDS", "WorkerSupervisor"]

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS: Final = 60.0
STOP_GRACE_SECONDS: Final = 3.0
_WATCH_SECONDS: Final = 0.1
_BACKOFF_FIRST: Final = 0.5
_BACKOFF_MAX: Final = 15.0
_STABLE_RUN_SECONDS: Final = 60.0


@dataclass
class _Slot:
    """One worker index: its current process, its address once ready, its restart backoff."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    address: str = ""
    metrics: str = ""  # where the worker serves its metrics
    backoff: float = _BACKOFF_FIRST
    restart_at: float | None = None
    restarts: int = 0


class WorkerSupervisor:
    """Starts, watches, restarts and stops the key service workers of one HSA."""

    def __init__(
        self,
        *,
        config_path: Path,
        config: NodeConfig,
        count: int,
        stopping: threading.Event,
        on_change: Callable[[Sequence[str]], None],
        verbose: bool = False,
    ) -> None:
        """`on_change(addresses)` is called (from the watch thread) when the set of ready
        workers changes after `start`; `stopping` set means the HSA is shutting down."""
        self._config_path = config_path
        self._data_dir = config.path(config.data_dir)
        self._slots = [_Slot(index=i) for i in range(1, count + 1)]
        self._stopping = stopping
        self._on_change = on_change
        self._verbose = verbose
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # --- starting ------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        # The previous ready file stays: the worker binds its address again when free, and
        # it counts as ready only once the file names the new process's pid.
        command = [
            sys.executable,
            "-m",
            "hsa_node",
            "worker",
            "--config",
            str(self._config_path),
            "--index",
            str(slot.index),
        ]
        if self._verbose:
            command.append("-v")
        slot.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command, stdin=subprocess.PIPE, close_fds=True
        )
        slot.started = time.monotonic()
        slot.address = ""
        slot.restart_at = None
        again = f", restart {slot.restarts}" if slot.restarts else ""
        log.info("started key service worker %d (pid %d%s)", slot.index, slot.process.pid, again)

    def _check_ready(self, slot: _Slot) -> bool:
        """Whether the slot's current process wrote its ready file (records the address)."""
        if slot.address:
            return True
        if slot.process is None:
            return False
        info = read_worker_ready(worker_ready_path(self._data_dir, slot.index))
        if info is None or info.pid != slot.process.pid:
            return False
        slot.address = info.address
        slot.metrics = info.metrics
        return True

    def start(self) -> list[str]:
        """Start every worker; return their addresses (by index) once all are ready.

        UnavailableError when one exits first or is not ready in time (the others are
        stopped). Returns early, with the addresses ready so far, if the HSA is stopping.
        """
        try:
            for slot in self._slots:
                self._spawn(slot)
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while not all(self._check_ready(slot) for slot in self._slots):
                for slot in self._slots:
                    code = slot.process.poll() if slot.process is not None else None
                    if code is not None:
                        raise UnavailableError(
                            f"key service worker {slot.index} exited with status {code} before "
                            "it was ready; its reason is in this log above"
                        )
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"the key service workers were not ready in {START_TIMEOUT_SECONDS:g} s"
                    )
                if self._stopping.wait(_WATCH_SECONDS):
                    break
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()
        return self.addresses()

    def addresses(self) -> list[str]:
        """The addresses of the workers that are ready now, by index."""
        with self._lock:
            return [slot.address for slot in self._slots if slot.address]

    def metrics_addresses(self) -> list[str]:
        """Where the ready workers serve their metrics, by index (those that serve them)."""
        with self._lock:
            return [slot.metrics for slot in self._slots if slot.address and slot.metrics]

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        with self._lock:
            return [
                slot.process.pid
                for slot in self._slots
                if slot.process is not None and slot.process.poll() is None
            ]

    # --- watching ------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closed.wait(_WATCH_SECONDS):
            if self._stopping.is_set():
                return
            changed = False
            with self._lock:
                for slot in self._slots:
                    changed |= self._tend(slot)
            if changed and not self._stopping.is_set():
                try:
                    self._on_change(self.addresses())
                except Exception:
                    log.exception("could not publish the key service workers' addresses")

    def _tend(self, slot: _Slot) -> bool:
        """Notice an exit, restart after the backoff, notice readiness; True if the set of
        ready addresses changed."""
        now = time.monotonic()
        if slot.process is not None:
            code = slot.process.poll()
            if code is None:
                was_ready = bool(slot.address)
                return self._check_ready(slot) and not was_ready
            if now - slot.started >= _STABLE_RUN_SECONDS:
                slot.backoff = _BACKOFF_FIRST
            log.warning(
                "key service worker %d (pid %d) exited with status %d; restarting it in %.1f s",
                slot.index,
                slot.process.pid,
                code,
                slot.backoff,
            )
            if slot.process.stdin is not None:
                slot.process.stdin.close()
            slot.process = None
            slot.restart_at = now + slot.backoff
            slot.backoff = min(_BACKOFF_MAX, slot.backoff * 2)
            had_address = bool(slot.address)
            slot.address = ""
            return had_address
        if slot.restart_at is not None and now >= slot.restart_at:
            slot.restarts += 1
            try:
                self._spawn(slot)
            except OSError as error:
                log.error("could not restart key service worker %d: %s", slot.index, error)
                slot.restart_at = now + slot.backoff
                slot.backoff = min(_BACKOFF_MAX, slot.backoff * 2)
        return False

    # --- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every worker, SIGKILL those left after the grace period, reap them all."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        with self._lock:
            processes = [slot.process for slot in self._slots if slot.process is not None]
            for slot in self._slots:
                slot.process, slot.address, slot.restart_at = None, "", None
        for process in processes:
            if process.poll() is None:
                _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "key service worker pid %d did not stop in %g s; killing it",
                    process.pid,
                    STOP_GRACE_SECONDS,
                )
                _signal(process, signal.SIGKILL)
                process.wait()
            if process.stdin is not None:
                process.stdin.close()
        if processes:
            log.info("stopped %d key service workers", len(processes))


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    """Send `signum` to a worker we started (a reaped or vanished one is skipped)."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signum)
