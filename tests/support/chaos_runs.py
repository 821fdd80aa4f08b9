"""Running the real `hsm-domain chaos` command in tests, and checking what it left behind.

`run_chaos` runs it as a user does (the installed console script, its own session, killed
with its whole group if it overruns); `processes_using` finds any process still running a
file of the domain directory. `INVARIANTS` are the invariants every run checks (a domain with
replicas adds the store's, `deploy.chaos.store_checks`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Final

import pytest

from deploy import cluster
from support.tools import console_script

__all__ = ["INVARIANTS", "RUN_TIMEOUT", "hsm_domain", "processes_using", "run_chaos"]

RUN_TIMEOUT: Final = 180.0
INVARIANTS: Final = frozenset(
    {
        "ciphertexts-decrypt",
        "decrypts-correct",
        "keys-work",
        "versions-in-chain",
        "versions-monotonic",
        "no-forks",
        "convergence",
        "availability",
    }
)


def hsm_domain() -> str:
    """Path of the installed `hsm-domain` console script."""
    return console_script("hsm-domain")


def processes_using(directory: Path) -> list[int]:
    """Pids of live processes whose command line names a file under `directory`."""
    needle = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes() and cluster.is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def run_chaos(*args: str | Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `hsm-domain chaos ...` in its own session; kill the session if it overruns."""
    with subprocess.Popen(
        [hsm_domain(), "chaos", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        start_new_session=True,
    ) as process:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            pytest.fail(f"hsm-domain chaos ran over {timeout} s; its output:\n{out}")
        return subprocess.CompletedProcess(process.args, process.returncode, out, "")
