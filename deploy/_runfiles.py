"""The run files of a local domain's processes: ready files, pid files, logs, the lock.

Invariants kept here:
- a pid file is trusted only while the process it names is alive and its command line still
  names the config file it was started with, or for an etcd member its data directory (a
  recycled pid is never signalled): `is_ours`;
- a ready file counts only once it is a complete document (a process writes it when serving);
- commands that check what runs and then start processes hold the domain's lock
  (`domain_lock`, an flock on DIR, one command at a time, released however the holder exits).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deploy.init import DomainLayout
from domain_core.errors import InvalidInputError

__all__ = [
    "ReadyInfo",
    "config_of",
    "domain_lock",
    "is_alive",
    "is_ours",
    "live_pids",
    "log_tail",
    "read_pid_file",
    "read_ready_file",
    "running_processes",
]

_LOG_TAIL_LINES: Final = 15


@dataclass(frozen=True)
class ReadyInfo:
    """What a process wrote to its ready file once serving."""

    name: str
    pid: int
    address: str
    operator_address: str = ""
    workers: tuple[str, ...] = ()  # an HSA's key service worker addresses, by index
    metrics: str = ""  # where the process serves its Prometheus metrics ("" for none)
    worker_metrics: tuple[str, ...] = ()  # where an HSA's workers serve theirs, by index


def read_ready_file(path: Path) -> ReadyInfo | None:
    """The ready file's content, or None if it is absent or not (yet) a complete document."""
    try:
        document = json.loads(Path(path).read_text())
        workers = document.get("workers", [])
        if not isinstance(workers, list):
            return None
        return ReadyInfo(
            name=str(document["name"]),
            pid=int(document["pid"]),
            address=str(document["address"]),
            operator_address=str(document.get("operator_address", "")),
            workers=tuple(str(w) for w in workers),
            metrics=str(document.get("metrics", "")),
            worker_metrics=tuple(str(m) for m in document.get("worker_metrics", [])),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> list[str]:
    """The last `lines` lines of a log file (empty if there is none)."""
    try:
        with Path(path).open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def read_pid_file(path: Path) -> int | None:
    """The pid a pid file names, or None (absent, unreadable, not a number)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        # The state is the field after the parenthesised command name.
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def stop_and_wait(pid: int, *, group: bool = False, timeout: float = 5.0) -> None:
    """SIGSTOP a process (its whole group with `group`) and return once every thread of it is
    stopped, or after `timeout`: the signal takes effect asynchronously, and a thread that is
    still running may answer one more request meanwhile (a pause must be silent at once)."""
    if group:
        os.killpg(pid, signal.SIGSTOP)
    else:
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _all_threads_stopped(pid):
        time.sleep(0.005)


def _all_threads_stopped(pid: int) -> bool:
    """Whether every thread of `pid` is stopped (or the process is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", "rb") as stat:
                state = stat.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended
        if state not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


def _runs_config(pid: int, config: Path) -> bool:
    """Whether process `pid` was started with `config` as an argument (checked where /proc
    exists)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        arguments = cmdline.read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return str(config).encode() in arguments


def config_of(layout: DomainLayout, name: str) -> Path:
    """The config file process `name` (a coordinator or a host id) runs with."""
    if name in layout.coordinators:
        return layout.coordinator_config_of(name)
    try:
        return layout.node_configs[name]
    except KeyError:
        raise InvalidInputError(
            f"{layout.root} has no node {name!r}; nodes: {', '.join(layout.node_configs)}"
        ) from None


def _command_marker(layout: DomainLayout, name: str) -> Path:
    """The path that the command line of process `name` names: its config file, or an etcd
    member's data directory."""
    if name in layout.etcd_members:
        return layout.etcd_member_dir(name)
    return config_of(layout, name)


def is_ours(layout: DomainLayout, name: str, pid: int | None) -> bool:
    """Whether `pid` is a live process running `name` of this domain (its config; for an etcd
    member, its data directory)."""
    return pid is not None and is_alive(pid) and _runs_config(pid, _command_marker(layout, name))


def running_processes(layout: DomainLayout) -> dict[str, int]:
    """Every process of the domain that runs, whoever started it (`up`, a test harness): named
    by its pid file or by its ready file (every process writes one once serving), alive and
    still running its config of this domain."""
    found: dict[str, int] = {}
    for name in layout.process_names:
        info = read_ready_file(layout.ready_file(name))
        for pid in (read_pid_file(layout.pid_file(name)), info.pid if info else None):
            if pid is not None and is_ours(layout, name, pid):
                found[name] = pid
    return found


def live_pids(layout: DomainLayout) -> dict[str, int]:
    """The processes named by pid files in DIR/run that are alive and still ours."""
    found: dict[str, int] = {}
    for name in layout.process_names:
        pid = read_pid_file(layout.pid_file(name))
        if pid is not None and is_ours(layout, name, pid):
            found[name] = pid
    return found


@contextlib.contextmanager
def domain_lock(layout: DomainLayout, command: str) -> Iterator[None]:
    """Hold the domain's lock while `command` checks what runs and starts processes.

    Refuses at once (InvalidInputError) while another command holds it. An flock on the domain
    directory: released when the holder exits, however it exits; the processes it starts do
    not inherit it (the descriptor is not inheritable and `_spawn` closes the others).
    """
    descriptor = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(
                f"{layout.root} is busy: another hsm-domain command (up, add-node --start or "
                f"chaos) is starting or running its processes; run {command} once it is done"
            ) from None
        yield
    finally:
        os.close(descriptor)
