"""domain_edge.cli: the one-line cause and the exit codes every CLI shares."""

from __future__ import annotations

import io

import pytest

from domain_core.errors import NotFoundError
from domain_edge.cli import exit_code, one_line, print_error

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
