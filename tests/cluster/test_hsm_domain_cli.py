"""The real `hsm-domain` executable: init, up (detached and in the foreground), status, down.

Every test runs the installed console script as a subprocess, as a person would. Processes
left behind by a failing test are stopped by the `domain_cleanup` fixture (pid and ready files
of every domain directory the test used, plus the `up` process group itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cluster import LocalCluster, local_cluster
from support.tools import console_script

from deploy import cluster
from deploy.init import init_domain, load_layout
from domain_core.chain import TrustedChain
from domain_core.changes import add_host
from domain_core.errors import UnavailableError
from domain_core.model import SealedState

pytestmark = pytest.mark.cluster
__all__ = ["local_cluster"]  # the fixture, imported for the tests below

UP_TIMEOUT = 60.0


def hsm_domain() -> str:
    """Path of the installed `hsm-domain` console script."""
    return console_script("hsm-domain")


def run(
    *args: str | Path, cwd: Path | None = None, timeout: float = UP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hsm_domain(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def next_steps(stdout: str) -> dict[str, str]:
    """The commands `up` printed under "what to try next", by what they do (`status`,
    `down`, ..., `activate`), each as a person would paste it."""
    lines = stdout.split("what to try next:\n", 1)[1].splitlines()
    commands: dict[str, str] = {}
    for line in (line.strip() for line in lines if line.startswith("  ")):
        if line.startswith("(or run `source "):
            commands["activate"] = line.split("`")[1]
        elif " --help " in line:
            command = line.split(" --help ")[0]
            commands[command.rpartition("/")[2]] = f"{command} --help"
        elif not line.startswith("Ctrl-C"):
            commands[line.split()[1]] = line
    return commands


def paste(command: str) -> subprocess.CompletedProcess[str]:
    """`command` pasted into a new login shell with an empty environment: no virtual
    environment on PATH, nothing inherited from this test."""
    return subprocess.run(
        ["env", "-i", "bash", "-lc", command],
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT,
        check=False,
    )


def recorded_pids(directory: Path) -> dict[str, int]:
    """Pids named by the pid and ready files of a domain directory."""
    pids: dict[str, int] = {}
    run_dir = directory / "run"
    if not run_dir.is_dir():
        return pids
    for path in run_dir.glob("*.pid"):
        pids[path.stem] = int(path.read_text())
    for path in run_dir.glob("*.json"):
        info = cluster.read_ready_file(path)
        if info is not None:
            pids.setdefault(path.stem, info.pid)
    return pids


def wait_gone(pids: dict[str, int], timeout: float = 10.0) -> list[str]:
    """Names of the processes still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [name for name, pid in pids.items() if cluster.is_alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


class Cleanup:
    """Remembers the domain directories and process groups a test started."""

    def __init__(self) -> None:
        self.directories: list[Path] = []
        self.groups: list[int] = []
        self.seen: dict[str, int] = {}

    def watch(self, directory: Path) -> Path:
        self.directories.append(directory)
        return directory

    def remember(self, directory: Path) -> dict[str, int]:
        pids = recorded_pids(directory)
        self.seen.update({f"{directory}:{name}": pid for name, pid in pids.items()})
        return pids

    def run(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for directory in self.directories:
            self.remember(directory)
        for pid in self.seen.values():
            if cluster.is_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def domain_cleanup() -> Iterator[Cleanup]:
    cleanup = Cleanup()
    yield cleanup
    cleanup.run()


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A domain made once for the module (fast scrypt); tests copy it before starting it."""
    directory = tmp_path_factory.mktemp("template") / "domain"
    init_domain(directory, scrypt_n=2**14)
    return directory


def test_init_creates_the_files_with_private_modes_and_a_genesis_that_verifies(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "demo"
    result = run("init", directory, "--nodes", "3", "--operators", "3", "--quorum", "2", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["nodes"] == ["hsa-1", "hsa-2", "hsa-3"]
    assert sorted(created["operators"]) == ["alice", "bob", "carol"]

    secrets = [
        *directory.glob("ca/*.key"),
        *directory.glob("coordinator/*.key"),
        *directory.glob("clients/*/*.key"),
        *directory.glob("nodes/*/identity/*.key"),
        *directory.glob("operators/*.token"),
        *directory.glob("operators/*.passphrase"),
    ]
    assert len(secrets) == 1 + 1 + 1 + 9 + 3 + 3
    assert {str(p): mode(p) for p in secrets} == {str(p): 0o600 for p in secrets}

    document = json.loads((directory / "domain.json").read_text())
    pinned = bytes.fromhex(document["genesis_hash"])
    assert created["genesis_hash"] == document["genesis_hash"]
    state = SealedState.from_bytes((directory / "genesis.state").read_bytes())
    chain = TrustedChain.from_genesis("local", pinned, state)
    assert chain.version == 1
    assert document["quorum"] == 2
    assert [o["name"] for o in document["operators"]] == ["alice", "bob", "carol"]

    again = run("init", directory)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1
    assert "holds a domain already" in again.stderr


def test_up_detached_status_and_down(
    initialised: Path, tmp_path: Path, domain_cleanup: Cleanup
) -> None:
    directory = domain_cleanup.watch(tmp_path / "domain")
    shutil.copytree(initialised, directory)

    began = time.monotonic()
    up = run("up", directory, "--detach")
    elapsed = time.monotonic() - began
    pids = domain_cleanup.remember(directory)
    print(f"hsm-domain up --detach reached healthy in {elapsed:.2f} s")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "coordinator serving at 127.0.0.1:" in up.stdout
    assert "3/3 nodes healthy on version 1" in up.stdout
    assert f"hsm-domain down {directory}" in up.stdout
    assert sorted(pids) == ["coordinator", "hsa-1", "hsa-2", "hsa-3"]
    assert all(cluster.is_alive(pid) for pid in pids.values())

    status = run("status", directory, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["all_healthy"] is True
    nodes = [p for p in report["processes"] if p["kind"] == "hsa"]
    assert [n["name"] for n in nodes] == ["hsa-1", "hsa-2", "hsa-3"]
    assert all(n["healthy"] and n["member"] and n["version"] == 1 for n in nodes)
    hashes = {n["state_hash"] for n in nodes}
    assert hashes == {report["genesis_hash"]}  # one state hash: the genesis
    assert report["coordinator"]["reachable"] is True
    assert report["coordinator"]["version"] == 1
    assert report["coordinator"]["pending_proposals"] == 0
    # What each HSA told the coordinator it has installed (each registers as it starts).
    expected = {h: (1, report["genesis_hash"]) for h in ("hsa-1", "hsa-2", "hsa-3")}
    deadline = time.monotonic() + 10
    while True:
        reported = report["coordinator"]["reported"]
        if {h: (r["version"], r["state_hash"]) for h, r in reported.items()} == expected:
            break
        assert time.monotonic() < deadline, reported
        time.sleep(0.2)
        report = json.loads(run("status", directory, "--json").stdout)
    assert {p["name"]: p["pid"] for p in report["processes"]} == pids

    text = run("status", directory)
    assert text.returncode == 0
    assert "all healthy" in text.stdout
    assert f"  hsa-2 reports version 1, state {report['genesis_hash'][:12]}" in text.stdout

    # What `up` says to try next works pasted into a new shell, as printed (issue 14).
    steps = next_steps(up.stdout)
    assert set(steps) >= {"status", "hsm-kms", "hsm-operator", "add-node", "down"}
    pasted = paste(steps["status"])
    assert pasted.returncode == 0, pasted.stdout + pasted.stderr
    assert "all healthy" in pasted.stdout
    for tool in ("hsm-kms", "hsm-operator"):
        pasted = paste(steps[tool])
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert f"usage: {tool}" in pasted.stdout
    if "activate" in steps:  # the tools run from a virtual environment: its activate works
        pasted = paste(f"{steps['activate']} && hsm-domain status {directory}")
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert "all healthy" in pasted.stdout

    again = run("up", directory, "--detach")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to start: every process runs already" in again.stdout
    assert "3/3 nodes healthy on version 1" in again.stdout
    assert recorded_pids(directory) == pids  # nothing restarted, nothing forgotten

    down = paste(steps["down"])
    assert down.returncode == 0, down.stderr
    assert "stopped 4 processes" in down.stdout
    assert wait_gone(pids) == []
    assert list((directory / "run").iterdir()) == []

    after = run("status", directory, "--json")
    assert after.returncode == 1
    assert all(not p["running"] for p in json.loads(after.stdout)["processes"])
    again = run("down", directory)
    assert again.returncode == 0
    assert "nothing is running" in again.stdout


def test_up_again_starts_exactly_what_is_not_running(
    initialised: Path, tmp_path: Path, domain_cleanup: Cleanup
) -> None:
    """Issue 13, item 14: one HSA crashed; `up` again starts that one and leaves the rest
    running, says which is which, and `down` still stops every process."""
    directory = domain_cleanup.watch(tmp_path / "domain")
    shutil.copytree(initialised, directory)
    first = run("up", directory, "--detach")
    assert first.returncode == 0, first.stdout + first.stderr
    pids = domain_cleanup.remember(directory)
    os.killpg(pids["hsa-2"], signal.SIGKILL)
    assert wait_gone({"hsa-2": pids["hsa-2"]}) == []

    again = run("up", directory, "--detach", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    report = json.loads(again.stdout)
    assert report["started"] == ["hsa-2"]
    kept = {n: p for n, p in pids.items() if n != "hsa-2"}
    assert report["already_running"] == kept
    assert report["version"] == 1
    now = domain_cleanup.remember(directory)
    assert {n: p for n, p in now.items() if n != "hsa-2"} == kept
    assert now["hsa-2"] != pids["hsa-2"]
    assert cluster.is_alive(now["hsa-2"])
    assert report["endpoints"]["hsa-2"]["pid"] == str(now["hsa-2"])
    assert run("status", directory).returncode == 0  # every process healthy again

    # The coordinator and a node down: the text output says what it started and what ran.
    os.killpg(now["coordinator"], signal.SIGKILL)
    os.killpg(now["hsa-3"], signal.SIGKILL)
    assert wait_gone({n: now[n] for n in ("coordinator", "hsa-3")}) == []
    text = run("up", directory, "--detach")
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"hsa-1 running already (pid {now['hsa-1']})" in text.stdout
    assert "coordinator serving at 127.0.0.1:" in text.stdout
    assert "2/2 nodes started" not in text.stdout  # only one node was down
    assert (
        f"started: coordinator, hsa-3; running already: hsa-1 (pid {now['hsa-1']}), "
        f"hsa-2 (pid {now['hsa-2']})"
    ) in text.stdout
    assert "3/3 nodes healthy on version 1" in text.stdout
    final = domain_cleanup.remember(directory)
    assert sorted(final) == ["coordinator", "hsa-1", "hsa-2", "hsa-3"]
    assert all(cluster.is_alive(pid) for pid in final.values())

    down = run("down", directory)
    assert down.returncode == 0, down.stderr
    assert "stopped 4 processes" in down.stdout
    assert wait_gone(final) == []
    assert list((directory / "run").iterdir()) == []


def test_up_is_refused_while_another_command_starts_processes(
    initialised: Path, tmp_path: Path, domain_cleanup: Cleanup
) -> None:
    """Two commands that check what runs and start the rest at once would start a process
    twice, and the second pid file would hide the first copy: the domain lock makes one wait."""
    directory = domain_cleanup.watch(tmp_path / "domain")
    shutil.copytree(initialised, directory)
    with cluster.domain_lock(load_layout(directory), "a test"):
        busy = run("up", directory, "--detach")
    assert busy.returncode == 1
    assert busy.stderr.count("\n") == 1, busy.stderr
    assert "is busy: another hsm-domain command" in busy.stderr
    assert recorded_pids(directory) == {}
    assert not (directory / "run").exists() or list((directory / "run").iterdir()) == []


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines of `process`'s stdout up to the one containing `marker` (fail on timeout/exit)."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not found.wait(timeout):
        raise AssertionError(f"no {marker!r} within {timeout:g} s; output so far: {lines}")
    return lines


def test_up_without_arguments_creates_hsm_cluster_and_stops_on_sigint(
    tmp_path: Path, domain_cleanup: Cleanup
) -> None:
    directory = domain_cleanup.watch(tmp_path / "hsm-cluster")
    began = time.monotonic()
    up = subprocess.Popen(
        [hsm_domain(), "up"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        start_new_session=True,
    )
    domain_cleanup.groups.append(up.pid)
    lines = _read_until(up, "nodes healthy on version 1", UP_TIMEOUT)
    print(f"hsm-domain up (with init) reached healthy in {time.monotonic() - began:.2f} s")
    assert any("initialised hsm-cluster: 3 nodes, 3 operators, quorum 2" in x for x in lines)
    assert "3/3 nodes healthy on version 1" in lines[-1]
    assert (directory / "domain.json").exists()
    pids = domain_cleanup.remember(directory)
    assert sorted(pids) == ["coordinator", "hsa-1", "hsa-2", "hsa-3"]
    assert all(cluster.is_alive(pid) for pid in pids.values())
    status = run("status", directory, "--json")
    assert status.returncode == 0, status.stdout + status.stderr

    up.send_signal(signal.SIGINT)
    stdout, stderr = up.communicate(timeout=30)
    assert up.returncode == 0, stderr
    assert "stopped" in stdout
    assert stderr == ""
    assert wait_gone(pids) == []
    assert list((directory / "run").iterdir()) == []
    layout = load_layout(directory)
    assert cluster.live_pids(layout) == {}


def test_ctrl_c_on_up_stops_only_what_that_up_started(
    initialised: Path, tmp_path: Path, domain_cleanup: Cleanup
) -> None:
    """A foreground `up` that restarted one crashed node owns that node only: Ctrl-C stops
    it and leaves the processes that ran before it (which `down` still stops)."""
    directory = domain_cleanup.watch(tmp_path / "domain")
    shutil.copytree(initialised, directory)
    assert run("up", directory, "--detach").returncode == 0
    pids = domain_cleanup.remember(directory)
    os.killpg(pids["hsa-3"], signal.SIGKILL)
    assert wait_gone({"hsa-3": pids["hsa-3"]}) == []
    up = subprocess.Popen(
        [hsm_domain(), "up", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        start_new_session=True,
    )
    domain_cleanup.groups.append(up.pid)
    lines = _read_until(up, "Ctrl-C here stops what this command started (hsa-3)", UP_TIMEOUT)
    text = "\n".join(lines)
    assert "3/3 nodes healthy on version 1" in text
    assert "started: hsa-3; running already: coordinator (pid" in text
    restarted = domain_cleanup.remember(directory)["hsa-3"]
    assert restarted != pids["hsa-3"]
    up.send_signal(signal.SIGINT)
    stdout, stderr = up.communicate(timeout=30)
    assert up.returncode == 0, stderr
    assert "SIGINT: stopping what this command started (hsa-3) ..." in stdout
    assert wait_gone({"hsa-3": restarted}) == []
    before = {n: p for n, p in pids.items() if n != "hsa-3"}
    assert cluster.live_pids(load_layout(directory)) == before
    down = run("down", directory)
    assert "stopped 3 processes" in down.stdout, down.stdout + down.stderr
    assert wait_gone(before) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--quorum", "5", "--operators", "3"), "--quorum"),
        (("--nodes", "0"), "--nodes"),
        (("--workers", "17"), "--workers must be between 0 and 16"),
        (("--quorum", "x"), "invalid int value"),
    ],
)
def test_bad_arguments_exit_with_a_one_line_message(
    tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    directory = tmp_path / "bad"
    result = run("init", directory, *args)
    assert result.returncode in (1, 2)
    assert needle in result.stderr
    assert result.stdout == ""
    if result.returncode == 2 and "usage:" not in result.stderr:
        assert result.stderr.count("\n") == 1
    assert not directory.exists()


def test_commands_on_a_directory_without_a_domain_fail_with_one_line(tmp_path: Path) -> None:
    for command in ("status", "down", "add-node"):
        result = run(command, tmp_path)
        assert result.returncode == 1, command
        assert result.stderr.count("\n") == 1, result.stderr
        assert "hsm-domain init" in result.stderr
    usage = run()
    assert usage.returncode == 2


def test_the_installed_script_shows_help_with_an_example() -> None:
    """(Every command's help is checked in-process by tests/unit/deploy/test_deploy_init.py.)"""
    result = run("up", "--help")
    assert result.returncode == 0
    assert "example:" in result.stdout
    assert "hsm-domain up" in result.stdout


def test_local_cluster_support_restarts_nodes_and_the_coordinator(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """tests/support/cluster.py, which the chaos tests build on, against real processes."""
    domain = local_cluster(nodes=3)
    statuses = domain.wait_converged()
    assert sorted(statuses) == ["hsa-1", "hsa-2", "hsa-3"]
    assert {s.version for s in statuses.values()} == {1}

    killed_pid = domain.processes["hsa-2"].pid
    assert domain.kill_node("hsa-2") == -signal.SIGKILL
    assert not cluster.is_alive(killed_pid)
    with pytest.raises(UnavailableError):
        domain.node_status("hsa-2", timeout=0.5)
    address = domain.address("hsa-1")
    domain.start_node("hsa-2")
    assert domain.node_status("hsa-2").healthy

    coordinator_address = domain.coordinator_address
    assert domain.stop_coordinator() == 0
    # The data plane does not need the coordinator: nodes stay healthy.
    assert domain.node_status("hsa-1").healthy
    domain.start_coordinator()
    assert domain.coordinator_address == coordinator_address  # its ports are pinned
    assert domain.stop_node("hsa-3") == 0
    domain.start_node("hsa-3")
    domain.wait_for(
        lambda: len(domain.wait_converged(hosts=("hsa-1", "hsa-2", "hsa-3"))) == 3,
        timeout=20,
        what="the three nodes to converge after restarts",
    )
    assert domain.address("hsa-1") == address
    signer = domain.operator_signer("alice")
    assert signer.public_key.key_id in {
        o.operator_id
        for o in SealedState.from_bytes(
            domain.layout.genesis_state.read_bytes()
        ).manifest.message.operators
    }
    pids = [p.pid for p in domain.processes.values()]
    domain.close()
    assert not any(cluster.is_alive(pid) for pid in pids)


def test_an_added_node_joins_after_a_quorum_approves_its_enrollment(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """add-node -> enrollment -> add-host proposal -> 2 of 3 approvals -> hsa-4 serves."""
    domain = local_cluster(nodes=2)
    host = domain.add_node()
    assert host.host_id == "hsa-3"
    waiting = domain.node_status("hsa-3")
    assert not waiting.member
    assert not waiting.healthy

    with domain.coordinator_client() as client:
        view = client.propose([add_host(host.raw)], domain.operator_signer("alice"), reason="grow")
        assert view.state == "pending"
        applied = client.approve(view.proposal_id, domain.operator_signer("bob"))
    domain.wait_for(
        lambda: client_applied(domain, applied.proposal_id), timeout=15, what="the proposal"
    )
    statuses = domain.wait_converged(hosts=("hsa-1", "hsa-2", "hsa-3"), timeout=20)
    assert {s.version for s in statuses.values()} == {2}
    assert statuses["hsa-3"].member

    report = json.loads(run("status", domain.directory, "--json").stdout)
    assert report["all_healthy"] is True
    assert report["coordinator"]["members"] == ["hsa-1", "hsa-2", "hsa-3"]


def client_applied(domain: LocalCluster, proposal_id: bytes) -> bool:
    with domain.coordinator_client() as client:
        return client.get_proposal(proposal_id).applied
