"""domain_core.display: what a terminal shows as is, and the one escaping function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_core.display import escape, escape_lines, printable

pytestmark = pytest.mark.unit

# What issue 21 (item 5) used to forge reviews, and its cousins.
HOSTILE = {
    "newline": "a\nb",
    "carriage return": "a\rb",
    "ANSI colour": "\x1b[30;40mhidden\x1b[0m",
    "ANSI erase line": "\x1b[2K\x1b[1A",
    "OSC title": "\x1b]0;title\x07",
    "C1 CSI": "\x9b2J",
    "bidi override": "\u202eabc\u202c",
    "bidi isolate": "\u2066abc\u2069",
    "zero-width joiner": "a\u200db",
    "byte order mark": "\ufeffa",
    "line separator": "a\u2028b",
    "paragraph separator": "a\u2029b",
    "tab": "a\tb",
    "NUL": "a\x00b",
    "DEL": "a\x7fb",
    "tag character": "a\U000e0041b",
    "private use": "a\ue000b",
    "lone surrogate": "a\ud800b",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_text_is_not_printable_and_escapes_to_plain_ascii_marks(case: str) -> None:
    text = HOSTILE[case]
    assert not printable(text)
    shown = escape(text)
    assert printable(shown)
    for raw in ("\x1b", "\n", "\r"):
        assert raw not in shown
    assert all(c.isprintable() for c in shown)
    assert "\\" in shown  # the escape is visible


def test_escapes_look_like_python_reprs() -> None:
    assert escape("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert escape("\x1b[31m") == "\\x1b[31m"
    assert escape("\u202e") == "\\u202e"
    assert escape("\U000e0041") == "\\U000e0041"


@pytest.mark.parametrize(
    "text", ["", "alice", "Zoë «routine» 日本語 🔑", "a b", "C:\\path", "x" * 1000]
)
def test_printable_text_is_unchanged(text: str) -> None:
    assert printable(text)
    assert escape(text) == text


def test_escape_lines_keeps_the_programs_own_line_breaks_only() -> None:
    block = "proposal  abc\nreason    x\x1b[8my\u202ez"
    assert escape_lines(block) == "proposal  abc\nreason    x\\x1b[8my\\u202ez"


@given(st.text())
def test_escape_never_leaves_anything_a_terminal_acts_on(text: str) -> None:
    shown = escape(text)
    assert shown.isprintable()
    assert escape(shown) == shown
    assert escape_lines(text).replace("\n", "").isprintable()
