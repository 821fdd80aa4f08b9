"""domain_edge.cli: the one-line cause and the exit codes every CLI shares."""

from __future__ import annotations

import io
import sys
import sysconfig
from pathlib import Path

import pytest

from domain_core.errors import NotFoundError
from domain_edge.cli import console_command, exit_code, one_line, print_error, shell_path

pytestmark = pytest.mark.unit


def test_a_domain_error_is_its_message_optionally_with_its_status() -> None:
    error = NotFoundError("key 1b4e does not exist")
    assert one_line(error) == "key 1b4e does not exist"
    assert one_line(error, with_status=True) == "key 1b4e does not exist [NOT_FOUND]"


def test_an_os_error_is_its_text_and_file() -> None:
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == (
        "No such file or directory: /x/y"
    )
    assert one_line(PermissionError(13, "Permission denied")) == "Permission denied"
    assert one_line(OSError("no errno here")) == "no errno here"


def test_the_cause_is_always_one_line() -> None:
    assert one_line(ValueError("first\n  second\tthird ")) == "first second third"
    assert one_line(RuntimeError()) == "RuntimeError"


def test_a_relayed_message_cannot_drive_the_terminal() -> None:
    # Issue 21, item 5: a server's message is relayed text (a coordinator's refusal).
    forged = NotFoundError(
        "no such proposal\x1b[2K\r\u202ehsm-operator: approved\x1b[30;40m (hidden)"
    )
    line = one_line(forged)
    for raw in ("\x1b", "\r", "\u202e"):
        assert raw not in line
    assert line.isprintable()
    assert "\\x1b[2K" in line
    assert "\\u202e" in line
    out = io.StringIO()
    print_error("hsm-operator", forged, stream=out)
    assert out.getvalue().count("\n") == 1
    assert "\x1b" not in out.getvalue()


@pytest.mark.parametrize(("code", "expected"), [(None, 0), (0, 0), (2, 2), ("usage", 2)])
def test_exit_code_follows_argparse(code: int | str | None, expected: int) -> None:
    assert exit_code(SystemExit(code)) == expected


def test_print_error_prints_one_line_and_the_traceback_only_when_verbose() -> None:
    try:
        raise NotFoundError("no such\nthing")
    except NotFoundError as error:
        quiet, loud = io.StringIO(), io.StringIO()
        print_error("tool", error, stream=quiet)
        print_error("tool", error, verbose=True, stream=loud)
    assert quiet.getvalue() == "tool: error: no such thing\n"
    assert "Traceback (most recent call last)" in loud.getvalue()
    assert loud.getvalue().endswith("tool: error: no such thing\n")


def test_a_printed_command_names_a_virtual_environments_script_by_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new shell has no virtual environment on its PATH: `hsm-domain` alone would fail.
    scripts = tmp_path / ".venv" / "bin"
    scripts.mkdir(parents=True)
    (scripts / "hsm-domain").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / ".venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.chdir(tmp_path)
    assert console_command("hsm-domain") == ".venv/bin/hsm-domain"
    monkeypatch.chdir(scripts)
    assert console_command("hsm-domain") == "./hsm-domain"  # a path, never a PATH lookup
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert console_command("hsm-domain") == str(scripts / "hsm-domain")
    assert console_command("hsm-kms") == "hsm-kms"  # not installed there: the bare name
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    assert console_command("hsm-domain") == "hsm-domain"  # not a venv: on PATH already


def test_a_printed_path_is_relative_when_under_the_working_directory_and_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert shell_path(tmp_path) == "."
    assert shell_path(tmp_path / "hsm-cluster") == "hsm-cluster"
    assert shell_path(Path("/elsewhere/my domain")) == "'/elsewhere/my domain'"
