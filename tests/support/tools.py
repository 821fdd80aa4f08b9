"""The installed console scripts (`hsm-domain`, `hsm-operator`, `hsm-kms`), run in tests as a
person runs them: a process of its own, text output, bounded in time.

`run_tool` passes the caller's environment on without `HSM_CLUSTER` and `HSM_TOKEN*` (a test
names its domain with `cluster=`), with gRPC's chatter off; `json_output` runs a command with
`--json` and returns what it printed, parsed, after checking it succeeded; `one_line_error`
checks that a refusal is the one line a CLI promises and returns it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["console_script", "json_output", "one_line_error", "run_tool"]

DEFAULT_TIMEOUT = 120.0


def console_script(name: str) -> str:
    """The path of console script `name`: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"the {name} console script is not installed: pip install -e '.[test]'"
    return found


def run_tool(
    name: str,
    *arguments: str | Path,
    cluster: Path | None = None,
    cwd: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run `name ARGUMENTS` (with HSM_CLUSTER=`cluster` when given); never raises for a
    non-zero exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_CLUSTER", "HSM_TOKEN"))}
    if cluster is not None:
        env["HSM_CLUSTER"] = str(cluster)
    return subprocess.run(
        [console_script(name), *map(str, arguments)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "GRPC_VERBOSITY": "ERROR"},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def json_output(name: str, *arguments: str | Path, **options: Any) -> Any:
    """Run `name ARGUMENTS --json`, check it exited 0, and parse what it printed."""
    result = run_tool(name, *arguments, "--json", **options)
    assert result.returncode == 0, f"{name} {arguments}: {result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The one line a refused command printed on stderr, after checking its exit status."""
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]
