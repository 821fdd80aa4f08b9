"""CI rule: no production module over 600 lines, no function over 80.

Generated code (`domain_proto`) is not ours and not counted. A function's lines run from its
first decorator to its last line, docstring included; a nested function counts on its own and
inside its parent. What still exceeds a limit is listed below with the reason; an entry that no
longer exceeds its limit fails the second test, so the list only shrinks.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.repository import production_modules, relative

pytestmark = pytest.mark.unit

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# "path" for a module, "path::Class.function" for a function -> why it is still that long.
# Empty: nothing exceeds the limits since issue 14 (parts B and D split the last offenders).
ALLOWED: dict[str, str] = {}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")


def _function_lines(function: Function) -> int:
    first = min([function.lineno, *(d.lineno for d in function.decorator_list)])
    return (function.end_lineno or function.lineno) - first + 1


def _oversized(path: Path) -> dict[str, int]:
    """What in `path` exceeds its limit: the module and each function, with its lines."""
    text = path.read_text()
    where = relative(path)
    found = {}
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found[where] = lines
    for name, function in _functions(ast.parse(text, filename=str(path))):
        length = _function_lines(function)
        if length > MAX_FUNCTION_LINES:
            found[f"{where}::{name}"] = length
    return found


@functools.cache
def _all_oversized() -> dict[str, int]:
    found: dict[str, int] = {}
    for path in production_modules():
        found.update(_oversized(path))
    return found


def test_no_module_or_function_is_too_long() -> None:
    unlisted = {name: lines for name, lines in _all_oversized().items() if name not in ALLOWED}
    assert unlisted == {}, (
        f"split these (modules at most {MAX_MODULE_LINES} lines, functions at most "
        f"{MAX_FUNCTION_LINES}), or list them in ALLOWED with the reason"
    )


def test_the_allowlist_only_names_what_is_still_too_long() -> None:
    assert sorted(set(ALLOWED) - set(_all_oversized())) == []


def test_the_rule_measures_functions_with_their_decorators() -> None:
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    source = f"@decorator\ndef long():\n{body}\n\n\nclass C:\n    def short(self):\n        pass\n"
    functions = dict(_functions(ast.parse(source)))
    assert _function_lines(functions["long"]) == MAX_FUNCTION_LINES + 1
    assert _function_lines(functions["C.short"]) == 2
