"""Real etcd members on this host's loopback: the command line, start, health, stop, faults.

The coordinator's etcd store (`domain_coordinator.etcd_store`) needs an etcd cluster; for a
local domain `hsm-domain up` runs one from the system's `etcd` binary (Debian `etcd-server`),
and the tests run their own. This module knows how to launch and handle the members; which
ports and directories they get is the caller's choice (etcd needs fixed ports on its command
line, so they are chosen before the start); `EtcdMember` and `EtcdCluster` (what the members
are, their command line) live in `deploy._etcd_members` and are re-exported here.

Invariants kept here:
- members listen only on 127.0.0.1, for clients and for peers (plain HTTP: etcd's traffic
  stays on the host's loopback);
- a member's data directory is created 0700 (etcd refuses looser ones) and holds nothing but
  etcd's own files;
- a member runs in its own session (process group), with stdout and stderr appended to its
  log file; stopping it is SIGTERM, then SIGKILL after a grace period (`deploy.cluster`);
- a member counts as started only once its `/health` answers healthy; if it dies or the
  deadline passes first, the error names its log file and quotes the log's tail;
- a pid file is trusted only while the process it names is alive and its command line still
  names the member's data directory (a recycled pid is never signalled);
- a restarted member (a data directory that holds one) rejoins its cluster: etcd then ignores
  the `--initial-cluster` flags, so one command line serves the first start and every later one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from deploy._etcd_members import LOOPBACK, EtcdCluster, EtcdMember
from deploy._files import make_private_dir
from deploy._runfiles import is_alive, log_tail, read_pid_file, stop_and_wait
from deploy.cluster import ProcessStartError, stop_process

__all__ = [
    "LOOPBACK",
    "EtcdCluster",
    "EtcdMember",
    "EtcdProcess",
    "MemberHealth",
    "member_health",
    "pid_of",
    "start_member",
    "wait_healthy",
]

DEFAULT_START_TIMEOUT: Final = 30.0
_HEALTH_TIMEOUT: Final = 2.0
_POLL_SECONDS: Final = 0.05


@dataclass
class EtcdProcess:
    """A member this process started: the child, its log, and the faults tests inject."""

    member: EtcdMember
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM (etcd shuts down cleanly), SIGKILL after `grace`; the exit status."""
        self.resume()  # a stopped process cannot act on SIGTERM
        return stop_process(self.process, grace=grace)

    def kill(self) -> int:
        """SIGKILL: a crash, nothing flushed beyond what etcd synced; the exit status."""
        return stop_process(self.process, kill=True)

    def pause(self) -> None:
        """SIGSTOP: alive but silent (its peers and clients see timeouts, not a refusal)."""
        if self.is_running():
            stop_and_wait(self.process.pid)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self.is_running():
            os.kill(self.process.pid, signal.SIGCONT)

    def log_tail(self) -> list[str]:
        return log_tail(self.log_file)


def start_member(
    cluster: EtcdCluster,
    member: EtcdMember,
    log_file: Path,
    *,
    etcd: str = "etcd",
    pid_file: Path | None = None,
) -> EtcdProcess:
    """Start one member (not waiting for it: see `wait_healthy`); write its pid file if given."""
    make_private_dir(member.data_dir)
    make_private_dir(log_file.parent)
    with log_file.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {member.name}\n".encode())
        log.flush()
        process = subprocess.Popen(  # noqa: S603 - the etcd binary, our own arguments, no shell
            cluster.command(member, etcd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    if pid_file is not None:
        make_private_dir(pid_file.parent)
        pid_file.write_text(f"{process.pid}\n")
    return EtcdProcess(member, process, log_file)


@dataclass(frozen=True)
class MemberHealth:
    """What one member's `/health` said: healthy, or why not."""

    name: str
    endpoint: str
    healthy: bool
    detail: str


def member_health(member: EtcdMember, timeout: float = _HEALTH_TIMEOUT) -> MemberHealth:
    """Ask one member's `/health` (healthy: it has a leader and no alarm), bounded by `timeout`."""
    connection = http.client.HTTPConnection(LOOPBACK, member.client_port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read(4096)
    except (OSError, http.client.HTTPException) as error:
        return MemberHealth(member.name, member.endpoint, False, f"unreachable: {error}")
    finally:
        connection.close()
    try:
        document = json.loads(body)
        healthy = response.status == 200 and str(document.get("health")) == "true"
        reason = str(document.get("reason", "")) or f"HTTP {response.status}"
    except (ValueError, AttributeError):
        return MemberHealth(member.name, member.endpoint, False, "unreadable /health answer")
    return MemberHealth(member.name, member.endpoint, healthy, "healthy" if healthy else reason)


def wait_healthy(processes: Sequence[EtcdProcess], timeout: float = DEFAULT_START_TIMEOUT) -> None:
    """Return once every member is healthy; ProcessStartError (naming the log, quoting its
    tail) when one exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    waiting = list(processes)
    while waiting:
        for started in list(waiting):
            if not started.is_running():
                raise ProcessStartError(
                    f"etcd member {started.member.name} exited with status "
                    f"{started.process.returncode} while starting; see {started.log_file}",
                    started.log_file,
                    started.log_tail(),
                )
            if member_health(started.member, timeout=0.5).healthy:
                waiting.remove(started)
        if not waiting:
            return
        if time.monotonic() > deadline:
            late = waiting[0]
            raise ProcessStartError(
                f"etcd member {late.member.name} was not healthy within {timeout:.0f} s "
                f"(its peers may be down: a member needs a majority); see {late.log_file}",
                late.log_file,
                late.log_tail(),
            )
        time.sleep(_POLL_SECONDS)


def pid_of(member: EtcdMember, pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive and runs this member's data directory."""
    pid = read_pid_file(pid_file)
    if pid is None or not is_alive(pid):
        return None
    with contextlib.suppress(OSError):
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return pid if str(member.data_dir).encode() in arguments else None
    return None
