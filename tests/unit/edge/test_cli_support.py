"""domain_edge.cli: what every CLI shares: the one-line cause, the exit codes, the progress
helpers and the commands printed for a person to paste."""

from __future__ import annotations

import io
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from domain_core.errors import NotFoundError
from domain_edge.cli import (
    Progress,
    Spinner,
    console_command,
    exit_code,
    one_line,
    print_error,
    shell_path,
)

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


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_per_step_in_a_log_and_one_updating_line_on_a_terminal() -> None:
    log = io.StringIO()
    progress = Progress(log)
    progress.step("starting ...")
    progress.done("started")
    progress.clear()
    assert log.getvalue() == "starting ...\nstarted\n"

    terminal = _Terminal()
    progress = Progress(terminal)
    progress.step("1/3")
    progress.step("2/3")
    progress.done("3/3 started")
    progress.done("ready")
    assert terminal.getvalue() == "\r\x1b[K1/3\r\x1b[K2/3\r\x1b[K3/3 started\nready\n"

    quiet = io.StringIO()
    progress = Progress(quiet, quiet=True)
    progress.step("x")
    progress.done("y")
    assert quiet.getvalue() == ""


def test_progress_updates_a_log_only_every_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    log = io.StringIO()
    progress = Progress(log, every=5.0)
    progress.update("a")
    now[0] += 1
    progress.update("b")  # too soon: not written
    now[0] += 5
    progress.update("c")
    assert log.getvalue() == "a\nc\n"


def test_a_spinner_escapes_what_it_waits_for_and_repeats_nothing_in_a_log() -> None:
    log = io.StringIO()
    spinner = Spinner(log)
    spinner.update("1 of 2 approvals")
    spinner.update("1 of 2 approvals")
    spinner.update("hsa-2\x1b[2J behind")
    spinner.done()
    assert log.getvalue() == ("waiting: 1 of 2 approvals\nwaiting: hsa-2\\x1b[2J behind\n")
    terminal = _Terminal()
    spinner = Spinner(terminal)
    spinner.update("a")
    spinner.update("b")
    spinner.done()
    assert terminal.getvalue() == "\r| a\x1b[K\r/ b\x1b[K\r\x1b[K"
