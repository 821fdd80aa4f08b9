"""The etcd side of a chaos run on a domain with coordinator replicas: the members, and each
replica's links to them.

`EtcdSide` starts the domain's etcd members from their data directories (with pid files, as
`hsm-domain up` does, so `hsm-domain down DIR` stops them if the run dies), places one TCP
proxy (`deploy.chaos.proxy`) per replica and member, and points each replica's config `store`
at its own proxies while the run lasts:

    coordinator-1 ──▶ proxies c1/etcd-1, c1/etcd-2, c1/etcd-3 ──┐
    coordinator-2 ──▶ proxies c2/etcd-1, c2/etcd-2, c2/etcd-3 ──┼──▶ etcd-1, etcd-2, etcd-3
    coordinator-3 ──▶ proxies c3/etcd-1, c3/etcd-2, c3/etcd-3 ──┘

so cutting one replica's proxies cuts that replica off from etcd (its lease, its lock, its
reads and writes) and nothing else. It kills (SIGKILL) and restarts members, and asks etcd,
directly, which replica leads.

Invariants: a replica's config names its proxies before each of its starts, and the runner
restores every config byte for byte at the end; the leader is asked of the members directly
(never through a proxy); a member is restarted on its own data directory with the command line
it first ran with (it rejoins its cluster); `stop` resumes, then stops (SIGTERM, then SIGKILL)
every member this run started and closes every proxy, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import replace

from deploy import _domain_etcd
from deploy import etcd as members
from deploy._etcd_members import DomainEtcd
from deploy.chaos.proxy import LinkMode, TcpProxy
from deploy.init import DomainLayout
from domain_core.errors import UnavailableError
from domain_edge.config import CoordinatorConfig

__all__ = ["EtcdSide"]


class EtcdSide:
    """The etcd members of a chaos run and every replica's proxies to them."""

    def __init__(self, layout: DomainLayout, start_timeout: float) -> None:
        if layout.etcd is None:
            raise ValueError(f"{layout.root} has no etcd cluster")
        self.layout = layout
        self.domain_etcd: DomainEtcd = layout.etcd
        self.start_timeout = start_timeout
        self.processes: dict[str, members.EtcdProcess] = {}
        self.proxies: dict[str, list[TcpProxy]] = {}  # replica -> one proxy per member
        self.started: set[str] = set()  # every member this run started
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The members' names."""
        return list(self.domain_etcd.names)

    # --- members ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every member; return once all are healthy (ProcessStartError otherwise)."""

        def started(name: str, process: members.EtcdProcess) -> None:
            with self._lock:
                self.started.add(name)
                self.processes[name] = process

        _domain_etcd.start_members(self.layout, {}, timeout=self.start_timeout, on_start=started)

    def kill_member(self, name: str) -> None:
        """SIGKILL one member (its process group)."""
        with self._lock:
            process = self.processes.pop(name, None)
        if process is None:
            raise UnavailableError(f"etcd member {name} is not running")
        process.kill()

    def start_member(self, name: str) -> None:
        """Start one member again on its data; return once it is healthy."""
        member = self.domain_etcd.cluster.member(name)
        process = members.start_member(
            self.domain_etcd.cluster,
            member,
            self.layout.log_file(name),
            etcd=_domain_etcd.etcd_binary(),
            pid_file=self.layout.pid_file(name),
        )
        with self._lock:
            self.started.add(name)
            self.processes[name] = process
        members.wait_healthy([process], timeout=self.start_timeout)

    def leader(self) -> str:
        """The replica that leads, as the members say ("" if none; UnavailableError if etcd
        does not answer)."""
        return _domain_etcd.replica_leader(self.layout)

    # --- each replica's links -----------------------------------------------------------------

    def place_proxies(self, replicas: list[str]) -> None:
        """One proxy per replica and member (the caller saved the configs first)."""
        for replica in replicas:
            self.proxies[replica] = [
                TcpProxy(endpoint, name=f"chaos-proxy-{replica}-{member}").start()
                for member, endpoint in zip(
                    self.domain_etcd.names, self.domain_etcd.cluster.endpoints, strict=True
                )
            ]

    def store_spec(self, replica: str) -> str:
        """The `store` value that sends `replica`'s etcd traffic through its proxies."""
        endpoints = ",".join(p.address for p in self.proxies[replica])
        return f"etcd:{endpoints}/{self.domain_etcd.prefix}"

    def point_at_proxies(self, replica: str) -> None:
        """Make `replica`'s config name its own proxies (before every start of it)."""
        path = self.layout.coordinator_config_of(replica)
        config = CoordinatorConfig.load(path)
        spec = self.store_spec(replica)
        if config.store != spec:
            replace(config, store=spec).save(path)

    def cut(self, replica: str, mode: str) -> None:
        """Cut every etcd link of `replica` (refuse or blackhole)."""
        for proxy in self.proxies[replica]:
            proxy.cut(LinkMode(mode))

    def restore(self, replica: str) -> None:
        """Restore every etcd link of `replica`."""
        for proxy in self.proxies[replica]:
            proxy.restore()

    # --- tearing down -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every member this run started (SIGCONT first) and close every proxy."""
        with self._lock:
            processes = list(self.processes.values())
            self.processes.clear()
        for process in processes:
            if process.is_running():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGCONT)
        for process in processes:
            process.stop(grace=5.0)
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.close()
