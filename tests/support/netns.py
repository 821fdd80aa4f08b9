"""Linux network namespaces a test makes for itself: one "machine" per process of a domain.

`Network` makes a switch namespace holding a bridge, and for each machine a namespace with a
veth pair into the bridge and its own IPv4 address (plus loopback). Processes start inside a
machine's namespace (`ip netns exec`); `cut` and `heal` take a machine's link down and up on
the switch side, as pulling its cable would. `close` stops every process it started (SIGTERM,
then SIGKILL), kills anything left in its namespaces, and deletes them all with their
/etc/netns/<namespace> files (`ip netns exec` mounts a namespace's own `hosts` file over
/etc/hosts: `names` makes the machines' DNS names resolve): the test's fixture calls it also
when the test fails. Nothing is made in the caller's own namespace, and
every name carries a random prefix, so runs never meet each other or the host's network.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["Machine", "Network"]

_IP_TIMEOUT = 20.0
_STOP_SECONDS = 10.0


def _ip(*args: str) -> str:
    """Run `ip ARGS`; its output; AssertionError with ip's own words when it fails."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


@dataclass(frozen=True)
class Machine:
    """One namespace: its name, its address on the network, its link's name on the switch."""

    name: str
    namespace: str
    address: str
    link: str


@dataclass
class Network:
    """A switch and machines on 10.231.0.0/24, all in namespaces made (and removed) here."""

    prefix: str = field(default_factory=lambda: f"hsmt{secrets.token_hex(3)}")
    machines: dict[str, Machine] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def _namespace(self, name: str) -> str:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def open(self) -> Network:
        """Make the switch namespace and its bridge."""
        self._namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        return self

    def add(self, name: str, address: str, names: dict[str, str] | None = None) -> Machine:
        """A machine `name` with `address`/24 on eth0, linked to the switch; `names` (DNS name
        to address) is its /etc/hosts inside its namespace."""
        namespace = self._namespace(f"{self.prefix}-{name}")
        if names:
            etc = Path("/etc/netns") / namespace
            etc.mkdir(parents=True)
            lines = ["127.0.0.1 localhost", *(f"{ip} {host}" for host, ip in names.items())]
            (etc / "hosts").write_text("\n".join(lines) + "\n")
        link = f"v{len(self.machines) + 1}"
        _ip("-n", self.switch, "link", "add", link, "type", "veth", "peer", "name", "eth0",
            "netns", namespace)  # fmt: skip
        _ip("-n", self.switch, "link", "set", link, "master", "br0")
        _ip("-n", self.switch, "link", "set", link, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        machine = Machine(name, namespace, address, link)
        self.machines[name] = machine
        return machine

    def start(
        self, name: str, argv: Sequence[str | Path], log: IO[bytes], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside machine `name` (output to `log`); stopped by `close`."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.machines[name].namespace, *map(str, argv)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self.processes.append(process)
        return process

    def run(
        self, name: str, argv: Sequence[str | Path], env: dict[str, str], timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` to its end inside machine `name`; never raises for its exit status."""
        return subprocess.run(
            ["ip", "netns", "exec", self.machines[name].namespace, *map(str, argv)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def cut(self, name: str) -> None:
        """Take machine `name`'s link down at the switch (its cable pulled)."""
        _ip("-n", self.switch, "link", "set", self.machines[name].link, "down")

    def heal(self, name: str) -> None:
        """Bring machine `name`'s link back up."""
        _ip("-n", self.switch, "link", "set", self.machines[name].link, "up")

    def close(self) -> None:
        """Stop every process, kill whatever is left in the namespaces, delete them."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_SECONDS)
        for namespace in reversed(self._namespaces):
            pids = subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        self._namespaces.clear()
        with contextlib.suppress(OSError):  # only if empty: another user's files stay
            Path("/etc/netns").rmdir()

    def remaining(self) -> list[str]:
        """The namespaces (and /etc/netns files) of this network that still exist (none
        after `close`)."""
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=False
        ).stdout
        etc = Path("/etc/netns")
        files = [p.name for p in etc.iterdir()] if etc.is_dir() else []
        return [
            name
            for name in [line.split()[0] for line in listed.splitlines() if line] + files
            if name.startswith(self.prefix)
        ]
