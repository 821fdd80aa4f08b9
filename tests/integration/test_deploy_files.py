"""The deployment files (issue 17, item 2), checked as the tools that use them check them.

systemd: every unit under `deploy/systemd/` passes `systemd-analyze verify` with no warning
(its commands pointed at this checkout's console scripts and the system's etcd, as an install
would point them at /opt/hsm-domain), runs as the unprivileged `hsm-domain` user with the
hardening the docs promise, and `sysusers.d/hsm-domain.conf` creates that user
(`systemd-sysusers --root`)."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
INSTANCES = {"hsa-node": "hsa-1", "domain-coordinator": "coordinator", "hsm-etcd": "etcd-1"}
HARDENING = {
    "User": "hsm-domain",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "StateDirectoryMode": "0700",
    "UMask": "0077",
}


def _units() -> list[Path]:
    units = sorted(SYSTEMD.glob("*@.service"))
    assert {u.name.removesuffix("@.service") for u in units} == set(INSTANCES)
    return units


def test_every_unit_verifies_without_a_warning(require_tool: object, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "verify the systemd units")  # type: ignore[operator]
    etcd = require_tool("etcd", "verify the etcd member's unit")  # type: ignore[operator]
    scripts = Path(sys.executable).parent
    instantiated = []
    for unit in _units():
        base = unit.name.removesuffix("@.service")
        text = unit.read_text().replace("/opt/hsm-domain/bin/", f"{scripts}/")
        text = text.replace("/usr/bin/etcd ", f"{etcd} ")
        path = tmp_path / f"{base}@{INSTANCES[base]}.service"
        path.write_text(text)
        instantiated.append(str(path))
    result = subprocess.run(
        [analyze, "verify", *instantiated],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # a warning is a defect too


def test_a_broken_unit_is_caught(require_tool: object, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "verify the systemd units")  # type: ignore[operator]
    unit = (SYSTEMD / "hsa-node@.service").read_text()
    unit = unit.replace("/opt/hsm-domain/bin/", f"{Path(sys.executable).parent}/")
    broken = tmp_path / "hsa-node@hsa-1.service"
    broken.write_text(unit.replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    result = subprocess.run(
        [analyze, "verify", str(broken)],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert "Failed to parse protect system value" in result.stderr  # the check above can fail


@pytest.mark.parametrize("unit", _units(), ids=lambda p: p.name)
def test_every_unit_runs_unprivileged_and_hardened(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    service = parser["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, (unit.name, key)
    assert service["StateDirectory"] == "hsm-domain/%i"
    assert "${STATE_DIRECTORY}" in service["ExecStart"]


def test_the_service_user_is_created(require_tool: object, tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers", "check the sysusers.d file")  # type: ignore[operator]
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "sysusers.d" / "hsm-domain.conf")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    entry = next(
        line for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        if line.startswith("hsm-domain:")
    )  # fmt: skip
    _, _, uid, _, _, home, shell = entry.split(":")
    assert int(uid) < 1000  # a system user
    assert (home, shell) == ("/var/lib/hsm-domain", "/usr/sbin/nologin")
