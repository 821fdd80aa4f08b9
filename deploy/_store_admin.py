"""Running the coordinator's store tool (`python -m domain_coordinator.store_admin`) for
`hsm-domain backup`, `restore` and `store migrate`.

The store is the coordinator's code, and the launcher never imports the coordinator (an
import rule); so, as it starts the coordinator itself, the launcher runs the store tool as a
process of our own interpreter and reads its JSON lines.

Invariants: the tool's progress lines reach the caller's `progress` (escaped: relayed text);
its last line is its answer, and a refusal becomes an `HsmDomainError` with the tool's
one-line cause; a tool that stops without an answer is an error naming its exit status and
the last line it wrote to stderr; no line longer than `MAX_STORE_TOOL_LINE_BYTES` is read
into memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Final

from domain_core.display import escape
from domain_core.errors import HsmDomainError
from domain_core.limits import MAX_STORE_TOOL_LINE_BYTES

__all__ = ["StoreToolError", "run_store_tool"]

_MODULE: Final = "domain_coordinator.store_admin"
_STDERR_TAIL: Final = 4096


class StoreToolError(HsmDomainError):
    """The coordinator's store tool refused or failed; its cause is the message."""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["GRPC_VERBOSITY"] = "ERROR"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_store_tool(arguments: Sequence[str], progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the store tool with `arguments`; its result (a JSON object), or StoreToolError."""
    command = [sys.executable, "-m", _MODULE, *arguments]
    answer: dict[str, Any] | None = None
    with tempfile.TemporaryFile() as errors:
        with subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=_environment(),
            close_fds=True,
        ) as process:
            if process.stdout is None:  # stdout=PIPE above
                raise RuntimeError("the store tool's stdout is not a pipe")
            while line := process.stdout.readline(MAX_STORE_TOOL_LINE_BYTES):
                try:
                    document = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(document, dict):
                    continue
                if "progress" in document:
                    progress(escape(str(document["progress"])))
                elif "ok" in document:
                    answer = document
            status = process.wait()
        errors.seek(0, os.SEEK_END)
        errors.seek(max(0, errors.tell() - _STDERR_TAIL))
        tail = errors.read().decode("utf-8", "replace").strip().splitlines()
    if answer is None:
        last = tail[-1] if tail else "nothing on stderr"
        raise StoreToolError(f"the store tool stopped without an answer (exit {status}): {last}")
    if not answer.get("ok"):
        raise StoreToolError(str(answer.get("error", "the store tool refused")))
    result = answer.get("result")
    return result if isinstance(result, dict) else {}
