"""Text a person reads on a terminal: what may be shown as is, and the one escaping function.

Text an operator reads comes from messages others wrote (a proposal's reason, an operator's
name) or relayed (the coordinator's details, an HSA's status, an error message from a
server). A terminal obeys control characters in that text: a newline forges lines, an ANSI
escape repaints or hides them, a bidi override reorders them. Invariants:
- `printable` is the one rule for free text in a signed message (`domain_core.model` refuses
  anything else at parse time): letters, marks, digits, punctuation, symbols and the plain
  space; no control character (C0, DEL, C1), no line or paragraph separator, no format
  character (bidi overrides and isolates, zero-width characters, the byte order mark), no
  private-use, surrogate or unassigned code point (Python's `str.isprintable`);
- `escape` turns every other character into a visible `repr`-style escape (`\\n`, `\\x1b`,
  `\\u202e`), so what it returns holds no character a terminal acts on; it is the identity on
  printable text. Every operator-facing renderer (`operator_tool`, `deploy`'s status, the
  CLIs' one-line errors) passes text from a message or a server through it;
- `escape_lines` is `escape` for a block the program laid out itself: its own line breaks
  stay, everything else is escaped (the last line of defence at each output).
"""

from __future__ import annotations

__all__ = ["escape", "escape_lines", "hex_groups", "printable"]

_NAMED: dict[str, str] = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> bool:
    """True if `text` shows as itself on a terminal (see the module docstring)."""
    return text.isprintable()


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every character that is not printable written as a visible escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def escape_lines(text: str) -> str:
    """`escape` on each line of a block laid out by this program; its line breaks stay."""
    return "\n".join(escape(line) for line in text.split("\n"))


def hex_groups(hex_text: str) -> str:
    """Hex digits in groups of four ("95a5 fa77 ..."), for comparing fingerprints by eye or
    reading them aloud."""
    return " ".join(hex_text[i : i + 4] for i in range(0, len(hex_text), 4))
