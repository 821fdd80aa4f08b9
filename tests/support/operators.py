"""`hsm-operator` run as operators run it, against one local cluster (`Operators`), and a
private SoftHSM2 token for an operator who holds their key in hardware.

The environment passed on drops the caller's `HSM_TOKEN*`, `HSM_RECOVERY*`, `HSM_PKCS11*`,
`HSM_CLUSTER` and `HSM_COORDINATOR` (a test names everything itself); stdin is not a terminal,
so nothing may be prompted for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.cluster import LocalCluster

__all__ = ["HSM_OPERATOR", "Operators"]

HSM_OPERATOR = Path(sys.executable).parent / "hsm-operator"


@dataclass
class Operators:
    """Runs `hsm-operator` against one cluster, as its operators would."""

    cluster: LocalCluster
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, cluster: bool = True
    ) -> subprocess.CompletedProcess[str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                (
                    "HSM_TOKEN",
                    "HSM_RECOVERY",
                    "HSM_PKCS11",
                    "HSM_CLUSTER",
                    "HSM_COORDINATOR",
                )
            )
        }
        if cluster:
            base["HSM_CLUSTER"] = str(self.cluster.directory)
        return subprocess.run(
            [str(HSM_OPERATOR), *args],
            env={**base, **self.env, **(env or {})},
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,  # no terminal: nothing may be prompted for
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, **kwargs: Any) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.stdout

    def json(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.ok(*args, "--json", **kwargs))
        return document

    def refused(self, *args: str, status: int = 1, **kwargs: Any) -> str:
        """Run a command that must fail with `status`; return its one-line cause."""
        result = self.run(*args, **kwargs)
        assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines, result
        if status == 1:
            assert len(lines) == 1, lines
            assert lines[0].startswith("hsm-operator: error: ")
        return lines[-1]

    def token(self, name: str) -> tuple[str, ...]:
        token, passphrase = self.cluster.layout.operator_tokens[name]
        return ("--token", str(token), "--passphrase-file", str(passphrase))

    def propose(self, name: str, *args: str) -> dict[str, Any]:
        return self.json("propose", *args, *self.token(name), "--yes")

    def status(self) -> dict[str, Any]:
        return self.json("domain", "status")

    def softhsm_token(
        self, softhsm2_util: str, directory: Path, label: str, pin: str, so_pin: str
    ) -> Path:
        """Initialise a SoftHSM2 token `label` in its own token directory (this runner's
        commands use it from now on); the path of a 0600 file holding its PIN."""
        tokens = directory / "tokens"
        tokens.mkdir(parents=True)
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        self.env["SOFTHSM2_CONF"] = str(conf)
        subprocess.run(
            [softhsm2_util, "--init-token", "--free", "--label", label,
             "--so-pin", so_pin, "--pin", pin],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True,
            timeout=60,
        )  # fmt: skip
        pin_file = self.workdir / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        return pin_file
