"""A domain across hosts, each process on a "machine" of its own: a network namespace with its
own address, started from the bundle `hsm-domain init --host` wrote for it.

The operators and the application run from a fifth machine with the ceremony directory only
(`--cluster DIR`: addresses from domain.json). The test does a quorum change and KMS round
trips across the machines, pulls one HSA's cable, changes the domain and creates a key while it
is gone, plugs it back, and checks that it catches up and serves the key made without it;
then adds a fourth host from the bundle `hsm-domain add-node --host` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.netns import Network
from support.tools import console_script, json_output

pytestmark = pytest.mark.netns

_HOSTS = {"hsa-1": "10.231.0.11", "hsa-2": "10.231.0.12", "hsa-3": "10.231.0.13"}
_COORDINATOR = "10.231.0.10"
_CLIENT = "10.231.0.20"
_LATER = {"hsa-4": "10.231.0.14"}  # a host the operators add once the domain runs
_DEADLINE = 90.0


def _env() -> dict[str, str]:
    """The processes' environment: ours without a domain or token named, gRPC quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_CLUSTER", "HSM_TOKEN"))}
    return {**env, "GRPC_VERBOSITY": "ERROR", "HSM_LOG_FORMAT": "json"}


def _wait(what: str, check: Callable[[], Any], deadline: float = _DEADLINE) -> Any:
    """Poll `check` until it returns something true; fail naming `what` after `deadline`."""
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.5)


class _Client:
    """hsm-operator and hsm-kms run on the client machine against the ceremony directory."""

    def __init__(self, network: Network, directory: Path) -> None:
        self.network, self.directory = network, directory

    def run(self, tool: str, *args: str) -> Any:
        env = {**_env(), "HSM_CLUSTER": str(self.directory)}
        return self.network.run("client", [console_script(tool), *args], env)

    def json(self, tool: str, *args: str) -> Any:
        done = self.run(tool, *args, "--json")
        assert done.returncode == 0, f"{tool} {args}: {done.stdout}{done.stderr}"
        return json.loads(done.stdout)

    def token(self, name: str) -> tuple[str, ...]:
        operators = self.directory / "operators"
        return ("--token", str(operators / f"{name}.token"),
                "--passphrase-file", str(operators / f"{name}.passphrase"))  # fmt: skip

    def change(self, proposer: str, approvers: list[str], *change: str, everywhere: bool) -> int:
        """Propose `change`, approve it, wait until it is applied (`everywhere`: and every host
        reports it); the version it made."""
        proposed = self.json("hsm-operator", "propose", *change, *self.token(proposer), "--yes")
        proposal = proposed["proposal_id"]
        for name in approvers[:-1]:
            self.json("hsm-operator", "approve", proposal, *self.token(name), "--yes")
        last = ("--wait",) if everywhere else ()
        self.json("hsm-operator", "approve", proposal, *self.token(approvers[-1]), "--yes", *last)
        shown = _wait(
            "the change applied",
            lambda: (p := self.json("hsm-operator", "proposals", "show", proposal))["state"]
            == "applied" and p,
        )  # fmt: skip
        return int(shown["applied_version"])

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = self.json("hsm-operator", "domain", "status")
        return document

    def kms(self, *args: str, endpoint: str | None = None) -> Any:
        where = ("--endpoint", f"{_HOSTS[endpoint]}:7700") if endpoint else ()
        return self.json("hsm-kms", *where, *args)


def _start_domain(network: Network, directory: Path, logs: Path) -> None:
    """Start the coordinator and each HSA from its bundle on its machine; wait until each
    wrote its ready file."""
    started = [("coordinator", "domain-coordinator")] + [(h, "hsa-node") for h in _HOSTS]
    for name, tool in started:
        _start_process(network, logs, name, tool, directory / "bundles" / name)


def _start_process(network: Network, logs: Path, name: str, tool: str, bundle: Path) -> None:
    """Start `tool` from `bundle` on machine `name`; wait until it wrote its ready file."""
    log = (logs / f"{name}.log").open("wb")
    ready = logs / f"{name}.ready.json"
    argv = [console_script(tool), "--config", str(bundle / "config.json"), "--ready-file", ready]
    process = network.start(name, argv, log, _env())
    _wait(f"{name} to serve", partial(_ready_or_gone, ready, process))
    assert process.poll() is None, (logs / f"{name}.log").read_text()[-2000:]


def _ready_or_gone(ready: Path, process: subprocess.Popen[bytes]) -> bool:
    return ready.exists() or process.poll() is not None


def _hsa_versions(client: _Client) -> dict[str, int | None]:
    return {row["host_id"]: row["reported_version"] for row in client.status()["hosts"]}


def _scrape(network: Network, machine: str, port: int) -> dict[str, float]:
    """The samples a process serves on its address (metrics exposed), read from the client
    machine with prometheus-client's own parser."""
    url = f"http://{machine}:{port}/metrics"
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
    done = network.run("client", [sys.executable, "-c", code], _env())
    assert done.returncode == 0, done.stderr
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(done.stdout)
        for sample in family.samples
        if not sample.labels
    }


@pytest.mark.parametrize("naming", ["ip", "dns"])
def test_a_domain_across_namespaces_changes_serves_and_heals_a_cut_link(
    network: Network, tmp_path: Path, naming: str
) -> None:
    """`ip`: each process is named by its IP and listens on it; `dns`: by a DNS name (each
    machine's /etc/hosts), listening on every interface and advertising the name."""
    machines = {"coordinator": _COORDINATOR, **_HOSTS, "client": _CLIENT}
    names = {f"{name}.hsm.test": address for name, address in {**machines, **_LATER}.items()}
    for name, address in machines.items():
        network.add(name, address, names if naming == "dns" else None)
    named = {
        m: f"{m}.hsm.test" if naming == "dns" else a for m, a in {**machines, **_LATER}.items()
    }
    directory, logs = tmp_path / "domain", tmp_path / "logs"
    logs.mkdir()
    made = json_output(
        "hsm-domain", "init", directory, "--coordinator", named["coordinator"],
        "--expose-metrics", *[f"--host={name}={named[name]}" for name in _HOSTS],
    )  # fmt: skip
    assert set(made["bundles"]) == {*_HOSTS, "coordinator"}
    assert not (directory / "nodes").exists(), "host keys must exist once, in the bundles"
    _start_domain(network, directory, logs)
    client = _Client(network, directory)

    # Every HSA registers the address it listens on, on its own machine.
    registered = _wait(
        "every HSA registered",
        lambda: (s := client.status()) and all(h["registered"] for h in s["hosts"]) and s,
    )
    assert {h["host_id"]: h["address"] for h in registered["hosts"]} == {
        name: f"{named[name]}:7700" for name in _HOSTS
    }

    # KMS round trips across machines: encrypted through one HSA, decrypted through another.
    key_id = _wait(
        "the key service to create a key",
        lambda: (d := client.run("hsm-kms", "create-key", "--json")).returncode == 0
        and json.loads(d.stdout)["key_id"],
    )  # fmt: skip
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"across three machines")
    blob = tmp_path / "secret.blob"
    for encrypt_on, decrypt_on in [("hsa-1", "hsa-2"), ("hsa-2", "hsa-3"), ("hsa-3", "hsa-1")]:
        client.kms("encrypt", "--key-id", key_id, "--in", str(secret), "--out", str(blob),
                   endpoint=encrypt_on)  # fmt: skip
        back = tmp_path / f"back-{decrypt_on}.txt"
        client.kms("decrypt", "--in", str(blob), "--out", str(back), endpoint=decrypt_on)
        assert back.read_bytes() == secret.read_bytes()

    # A quorum change across machines: proposed and approved from the client machine.
    version = client.change("alice", ["bob", "carol"], "set-quorum", "3", everywhere=True)
    assert client.status()["quorum"]["threshold"] == 3
    _wait("every HSA at the new version",
          lambda: set(_hsa_versions(client).values()) == {version})  # fmt: skip
    samples = _scrape(network, _HOSTS["hsa-1"], 9700)
    assert samples["hsm_domain_version"] == version

    # hsa-3's cable is pulled: it cannot be reached, the others go on without it.
    network.cut("hsa-3")
    hsa_3 = ("--endpoint", f"{_HOSTS['hsa-3']}:7700")
    refused = client.run("hsm-kms", *hsa_3, "--timeout", "3", "encrypt", "--key-id", key_id,
                         "--in", str(secret), "--out", "-")  # fmt: skip
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    cut_version = client.change("alice", ["bob", "carol"], "set-quorum", "2", everywhere=False)
    assert cut_version == version + 1
    made_without = client.kms("create-key", endpoint="hsa-1")["key_id"]
    client.kms("encrypt", "--key-id", made_without, "--in", str(secret), "--out", str(blob),
               endpoint="hsa-2")  # fmt: skip
    assert _hsa_versions(client)["hsa-3"] == version

    # Plugged back: hsa-3 catches up and serves the key made while it was gone.
    network.heal("hsa-3")
    _wait("hsa-3 caught up", lambda: _hsa_versions(client)["hsa-3"] == cut_version)
    back = tmp_path / "back-healed.txt"
    _wait(
        "hsa-3 to decrypt under the key made without it",
        lambda: client.run("hsm-kms", *hsa_3, "decrypt", "--in", str(blob), "--out", str(back),
                           "--json").returncode == 0,
    )  # fmt: skip
    assert back.read_bytes() == secret.read_bytes()
    assert _scrape(network, _HOSTS["hsa-3"], 9700)["hsm_domain_version"] == cut_version

    # A host added later: its bundle from `add-node --host`, started on a machine of its own,
    # added by a quorum; it learns the keys from its peers and serves them.
    network.add("hsa-4", _LATER["hsa-4"], names if naming == "dns" else None)
    added = json_output("hsm-domain", "add-node", directory, f"--host=hsa-4={named['hsa-4']}")
    _start_process(network, logs, "hsa-4", "hsa-node", Path(added["bundle"]))
    enrollment = added["enrollment"]
    client.change("alice", ["bob"], "add-host", "--enrollment", enrollment, everywhere=True)
    back = tmp_path / "back-added.txt"
    _wait(
        "hsa-4 to decrypt",
        lambda: client.run("hsm-kms", "--endpoint", f"{_LATER['hsa-4']}:7700", "decrypt",
                           "--in", str(blob), "--out", str(back), "--json").returncode == 0,
    )  # fmt: skip
    assert back.read_bytes() == secret.read_bytes()
