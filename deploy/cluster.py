"""Start, watch and stop the processes of a local domain (the coordinators and the HSAs).

Invariants kept here:
- every process runs in its own session (its own process group), with stdout and stderr in
  `DIR/logs/<name>.log`, and is stopped by signalling its whole group: SIGTERM, then SIGKILL
  after a grace period, so no grandchild survives;
- a process counts as started only when it has written its ready file (whose pid must be the
  process's) and answers health checks SERVING; if it dies first, the error names its log file
  and quotes the log's last lines;
- a pid file is trusted only while the process it names is alive and its command line still
  names the config file it was started with (a recycled pid is never signalled; the run files
  and the domain lock are `deploy._runfiles`, re-exported here);
- the run files (pid, ready) of a process that is alive and ours are never removed: they are
  the only record of a detached process, and `hsm-domain down` finds it through them
  (`remove_run_files` skips them, whoever asks);
- commands that check what runs and then start processes (`up`, `add-node --start`, `chaos`)
  do so under the domain's lock (`domain_lock`, an flock on DIR held by one command at a
  time), so no process is ever started twice and a second copy's pid file never replaces the
  first's;
- a coordinator's ports are pinned in its config after its first start, so that a restarted
  coordinator comes back where the HSAs already look for it; every node config names the
  mutual-TLS address of every coordinator that has started (comma-separated: the replicas of
  a domain on etcd), written under one lock, so two replicas starting at once cannot leave a
  node config naming only one of them;
- processes stop in the reverse order of kinds: nodes, coordinators, then etcd members (the
  etcd cluster of a domain on etcd is started by `deploy._domain_etcd`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Final

import grpc

from deploy._files import make_private_dir, replace_file
from deploy._runfiles import (
    ReadyInfo,
    config_of,
    domain_lock,
    is_alive,
    is_ours,
    live_pids,
    log_tail,
    read_pid_file,
    read_ready_file,
)
from deploy.init import DomainLayout
from domain_core.errors import UnavailableError
from domain_edge import transport
from domain_edge.config import CoordinatorConfig, NodeConfig
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc

__all__ = [
    "COORDINATOR_MODULE",
    "NODE_MODULE",
    "ProcessStartError",
    "ReadyInfo",
    "client_tls",
    "coordinator_addresses",
    "coordinator_channel",
    "coordinator_operator_addresses",
    "coordinator_operator_channel",
    "domain_lock",
    "is_alive",
    "live_pids",
    "log_tail",
    "node_channel",
    "node_status",
    "process_channel",
    "read_ready_file",
    "remove_run_files",
    "set_coordinator_address",
    "start_coordinator",
    "start_node",
    "stop_pid",
    "stop_process",
    "stop_recorded",
    "wait_converged",
    "wait_healthy",
]

COORDINATOR_MODULE: Final = "domain_coordinator"
NODE_MODULE: Final = "hsa_node"
STOP_GRACE_SECONDS: Final = 5.0
DEFAULT_START_TIMEOUT: Final = 30.0
_POLL_SECONDS: Final = 0.05
# Held while a coordinator's config and the node configs are rewritten after its start.
_CONFIG_WRITES: Final = threading.Lock()


class ProcessStartError(UnavailableError):
    """A process of the domain did not come up; `log_tail` holds the last lines of its log."""

    def __init__(self, message: str, log_file: Path, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.log_file = log_file
        self.log_tail = list(log_tail)


# --- TLS and channels -------------------------------------------------------------------------


def client_tls(layout: DomainLayout) -> TlsMaterial:
    """The demo application's TLS identity (a CA-certified client: may call GetStatus)."""
    return TlsMaterial.from_files(layout.ca_cert, layout.client_cert, layout.client_key)


def node_channel(layout: DomainLayout, address: str, host_id: str) -> grpc.Channel:
    """A mutual-TLS channel to the HSA `host_id` (and no other server), as the demo client."""
    return transport.mtls_channel(address, client_tls(layout), transport.hsa_host(host_id))


def coordinator_channel(layout: DomainLayout, address: str) -> grpc.Channel:
    """A mutual-TLS channel to the coordinator's HSA-facing listener, as the demo client."""
    return transport.mtls_channel(address, client_tls(layout), transport.COORDINATOR)


def process_channel(layout: DomainLayout, name: str, address: str) -> grpc.Channel:
    """A mutual-TLS channel to process `name` (a coordinator or a host id) of the domain."""
    if name in layout.coordinators:
        return coordinator_channel(layout, address)
    return node_channel(layout, address, name)


def coordinator_operator_channel(layout: DomainLayout, operator_address: str) -> grpc.Channel:
    """A server-authenticated TLS channel to the coordinator's operator listener (several
    comma-separated addresses: one channel over the replicas, `transport.channel_target`)."""
    return transport.secure_channel(
        operator_address, layout.ca_cert.read_bytes(), transport.COORDINATOR
    )


# --- starting ---------------------------------------------------------------------------------


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["GRPC_VERBOSITY"] = "ERROR"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(module: str, config: Path, ready_file: Path, log_file: Path) -> subprocess.Popen[bytes]:
    make_private_dir(log_file.parent)
    make_private_dir(ready_file.parent)
    ready_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        module,
        "--config",
        str(config),
        "--ready-file",
        str(ready_file),
    ]
    with log_file.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {module}\n".encode())
        log.flush()
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_environment(),
            start_new_session=True,
            close_fds=True,
        )


def _fail(name: str, process: subprocess.Popen[bytes], log_file: Path, why: str) -> None:
    """Stop `process` and raise ProcessStartError naming its log and quoting its tail."""
    stop_process(process, grace=1.0)
    raise ProcessStartError(f"{name} {why}; see {log_file}", log_file, log_tail(log_file))


def _wait_ready(
    name: str,
    process: subprocess.Popen[bytes],
    ready_file: Path,
    log_file: Path,
    deadline: float,
) -> ReadyInfo:
    while True:
        info = read_ready_file(ready_file)
        if info is not None:
            if info.pid != process.pid:
                _fail(
                    name,
                    process,
                    log_file,
                    f"wrote a ready file naming pid {info.pid}, not its own pid {process.pid}",
                )
            return info
        code = process.poll()
        if code is not None:
            raise ProcessStartError(
                f"{name} exited with status {code} before it was ready; see {log_file}",
                log_file,
                log_tail(log_file),
            )
        if time.monotonic() > deadline:
            _fail(name, process, log_file, f"wrote no ready file to {ready_file} in time")
        time.sleep(_POLL_SECONDS)


def wait_healthy(
    layout: DomainLayout,
    address: str,
    *,
    name: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log_file: Path | None = None,
) -> None:
    """Poll the standard health check of process `name` (the coordinator or a host id) at
    `address` (mutual TLS) until it says SERVING."""
    deadline = time.monotonic() + timeout
    log_file = log_file or layout.log_file(name)
    with process_channel(layout, name, address) as channel:
        while True:
            if transport.check_health(channel, timeout=1.0):
                return
            if process is not None and process.poll() is not None:
                raise ProcessStartError(
                    f"{name} exited with status {process.returncode} before it was healthy; "
                    f"see {log_file}",
                    log_file,
                    log_tail(log_file),
                )
            if time.monotonic() > deadline:
                if process is not None:
                    _fail(name, process, log_file, f"was not healthy at {address} in {timeout:g} s")
                raise UnavailableError(f"{name or address} is not healthy after {timeout:g} s")
            time.sleep(_POLL_SECONDS * 2)


def _port_is_free(address: str) -> bool:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def _prepare_coordinator_config(path: Path) -> None:
    """Unpin a pinned coordinator port that something else took meanwhile (fall back to 0)."""
    config = CoordinatorConfig.load(path)
    listen = config.listen if _port_is_free(config.listen) else "127.0.0.1:0"
    operator_listen = (
        config.operator_listen if _port_is_free(config.operator_listen) else "127.0.0.1:0"
    )
    if (listen, operator_listen) != (config.listen, config.operator_listen):
        replace(config, listen=listen, operator_listen=operator_listen).save(path)


def _pin_coordinator_ports(path: Path, info: ReadyInfo) -> None:
    config = CoordinatorConfig.load(path)
    if (config.listen, config.operator_listen) != (info.address, info.operator_address):
        replace(config, listen=info.address, operator_listen=info.operator_address).save(path)


def _pinned(address: str) -> bool:
    return not address.endswith(":0")


def coordinator_addresses(layout: DomainLayout) -> str:
    """The mutual-TLS addresses of every coordinator that has started once (pinned in its
    config), comma-separated, in the order of `layout.coordinators`."""
    found = []
    for name in layout.coordinators:
        path = layout.coordinator_config_of(name)
        if path.exists():
            listen = CoordinatorConfig.load(path).listen
            if _pinned(listen):
                found.append(listen)
    return ",".join(found)


def coordinator_operator_addresses(layout: DomainLayout) -> str:
    """The operator addresses of the coordinators that wrote a ready file and run,
    comma-separated ("" when none runs): a channel over them fails over between replicas."""
    found = []
    for name in layout.coordinators:
        info = read_ready_file(layout.ready_file(name))
        if info is not None and info.operator_address and is_alive(info.pid):
            found.append(info.operator_address)
    return ",".join(found)


def set_coordinator_address(layout: DomainLayout, address: str) -> None:
    """Write the coordinator's mutual-TLS address (or every replica's, comma-separated) into
    every node config that differs."""
    for path in layout.node_configs.values():
        config = NodeConfig.load(path)
        if config.coordinator != address:
            replace(config, coordinator=address).save(path)


def _write_pid_file(layout: DomainLayout, name: str, pid: int) -> None:
    make_private_dir(layout.run_dir)
    replace_file(layout.pid_file(name), f"{pid}\n".encode())


def start_coordinator(
    layout: DomainLayout,
    *,
    name: str | None = None,
    log_dir: Path | None = None,
    ready_file: Path | None = None,
    detach: bool = False,
    timeout: float = DEFAULT_START_TIMEOUT,
) -> subprocess.Popen[bytes]:
    """Start coordinator `name` (default: the domain's only one); return once it is ready and
    its mutual-TLS port is SERVING.

    Afterwards its ports are pinned in its config and every node config names the addresses
    of every coordinator started so far. With `detach`, its pid is recorded in
    DIR/run/<name>.pid.
    """
    if name is None:
        if len(layout.coordinators) != 1:
            raise ValueError(f"say which coordinator: {', '.join(layout.coordinators)}")
        name = layout.coordinators[0]
    if name not in layout.coordinators:
        raise ValueError(f"{layout.root} has no coordinator {name!r}")
    config = layout.coordinator_config_of(name)
    log_file = (log_dir or layout.log_dir) / f"{name}.log"
    ready = ready_file or layout.ready_file(name)
    with _CONFIG_WRITES:
        _prepare_coordinator_config(config)
    deadline = time.monotonic() + timeout
    process = _spawn(COORDINATOR_MODULE, config, ready, log_file)
    if detach:
        _write_pid_file(layout, name, process.pid)
    info = _wait_ready(name, process, ready, log_file, deadline)
    wait_healthy(
        layout,
        info.address,
        timeout=max(0.5, deadline - time.monotonic()),
        process=process,
        name=name,
        log_file=log_file,
    )
    with _CONFIG_WRITES:
        if info.operator_address:
            _pin_coordinator_ports(config, info)
        set_coordinator_address(layout, coordinator_addresses(layout) or info.address)
    return process


def start_node(
    layout: DomainLayout,
    host_id: str,
    *,
    log_dir: Path | None = None,
    ready_file: Path | None = None,
    detach: bool = False,
    timeout: float = DEFAULT_START_TIMEOUT,
    wait_for_health: bool = True,
) -> subprocess.Popen[bytes]:
    """Start one HSA; return once it is ready and (unless told not to wait) SERVING.

    A node that is not (yet) a member of the domain never becomes SERVING: start it with
    `wait_for_health=False`. With `detach`, its pid goes to DIR/run/<host>.pid.
    """
    config = config_of(layout, host_id)
    log_file = (log_dir or layout.log_dir) / f"{host_id}.log"
    ready = ready_file or layout.ready_file(host_id)
    deadline = time.monotonic() + timeout
    process = _spawn(NODE_MODULE, config, ready, log_file)
    if detach:
        _write_pid_file(layout, host_id, process.pid)
    info = _wait_ready(host_id, process, ready, log_file, deadline)
    if wait_for_health:
        wait_healthy(
            layout,
            info.address,
            timeout=max(0.5, deadline - time.monotonic()),
            process=process,
            name=host_id,
            log_file=log_file,
        )
    return process


# --- stopping ---------------------------------------------------------------------------------


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def stop_process(
    process: subprocess.Popen[bytes], *, grace: float = STOP_GRACE_SECONDS, kill: bool = False
) -> int:
    """Stop a process we started, with its group; return its exit status.

    SIGTERM (SIGKILL at once if `kill`), then SIGKILL after `grace` seconds.
    """
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    # Whatever the leader did, leave nothing of its group behind.
    _signal_group(process.pid, signal.SIGKILL)
    return process.returncode


def stop_pid(pid: int, *, grace: float = STOP_GRACE_SECONDS) -> bool:
    """Stop a process group we did not start as a child (from a pid file). True if it stopped."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_alive(pid):
        if time.monotonic() > deadline:
            _signal_group(pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 2.0
            while is_alive(pid) and time.monotonic() < kill_deadline:
                time.sleep(_POLL_SECONDS)
            break
        time.sleep(_POLL_SECONDS)
    _signal_group(pid, signal.SIGKILL)
    return not is_alive(pid)


def remove_run_files(layout: DomainLayout, names: Iterable[str]) -> None:
    """Remove the pid and ready files of these processes, but never one that names a process
    that is still alive and ours (it is that process's only record)."""
    for name in names:
        if not is_ours(layout, name, read_pid_file(layout.pid_file(name))):
            layout.pid_file(name).unlink(missing_ok=True)
        info = read_ready_file(layout.ready_file(name))
        if not is_ours(layout, name, info.pid if info is not None else None):
            layout.ready_file(name).unlink(missing_ok=True)


def stop_recorded(
    layout: DomainLayout,
    *,
    grace: float = STOP_GRACE_SECONDS,
    progress: Callable[[str], None] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, int]:
    """Stop every process named by a live pid file (nodes first, then the coordinators, then
    the etcd members; only `names` if given); clean their run files. Returns them."""
    wanted = set(layout.process_names if names is None else names)
    running = {n: pid for n, pid in live_pids(layout).items() if n in wanted}
    order = [*layout.node_configs, *layout.coordinators, *layout.etcd_members]
    for name in order:
        if name in running:
            stopped = stop_pid(running[name], grace=grace)
            if progress is not None:
                state = "stopped" if stopped else "did not stop"
                progress(f"{name} (pid {running[name]}) {state}")
    remove_run_files(layout, [n for n in layout.process_names if n in wanted])
    return running


# --- observing --------------------------------------------------------------------------------


def node_status(
    layout: DomainLayout, host_id: str, *, timeout: float = 2.0
) -> services_pb2.HsaStatus:
    """HsaAdmin.GetStatus of one node (from its ready file's address); UnavailableError if down."""
    info = read_ready_file(layout.ready_file(host_id))
    if info is None:
        raise UnavailableError(f"{host_id} is not running (no ready file)")
    with node_channel(layout, info.address, host_id) as channel:
        try:
            stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
            status: services_pb2.HsaStatus = stub.GetStatus(
                services_pb2.HsaStatusRequest(), timeout=timeout
            )
            return status
        except grpc.RpcError as error:
            raise UnavailableError(
                f"{host_id} at {info.address} does not answer: {error.code().name}"
            ) from None


def wait_converged(
    layout: DomainLayout,
    timeout: float = 30.0,
    hosts: Iterable[str] | None = None,
) -> dict[str, services_pb2.HsaStatus]:
    """Wait until the nodes (default: all of the layout) are healthy on one version and hash,
    with their key services ready (key floors taken from a peer)."""
    wanted = list(hosts) if hosts is not None else list(layout.node_configs)
    if not wanted:
        return {}
    deadline = time.monotonic() + timeout
    last = "no node answered yet"
    while True:
        statuses: dict[str, services_pb2.HsaStatus] = {}
        problems: list[str] = []
        for host in wanted:
            try:
                status = node_status(layout, host, timeout=1.0)
            except UnavailableError as error:
                problems.append(error.message)
                continue
            statuses[host] = status
            if not status.healthy:
                problems.append(f"{host} is not healthy: {status.detail or 'no detail'}")
            elif status.key_service_waiting:
                problems.append(f"{host}'s key service is not ready: {status.detail}")
        heads = {(s.version, s.state_hash) for s in statuses.values()}
        if not problems and len(heads) == 1:
            return statuses
        if len(heads) > 1:
            versions = ", ".join(f"{h}: v{s.version}" for h, s in statuses.items())
            problems.append(f"nodes disagree ({versions})")
        last = "; ".join(problems)
        if time.monotonic() > deadline:
            raise UnavailableError(f"nodes did not converge in {timeout:g} s: {last}")
        time.sleep(_POLL_SECONDS * 2)
