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
ALLOWED: dict[str, str] = {
    "domain_coordinator/service.py": "CoordinatorService, being split by responsibility "
    "(issue 14 part B)",
    "domain_coordinator/sqlite_store.py": "the store, being split with the coordinator "
    "(issue 14 part B)",
    "deploy/cli.py": "hsm-domain's CLI, being moved to the shared CLI skeleton (issue 14)",
    "deploy/cli.py::_parser": "hsm-domain's parser, to be built from per-command functions "
    "(issue 14 CLI skeleton)",
    "deploy/cluster.py": "the local cluster launcher, being shrunk with the layout module "
    "(issue 14)",
    "deploy/init.py::_build": "domain creation, being split with the layout module (issue 14)",
    "deploy/chaos/runner.py": "the chaos runner, being shrunk (issue 14 deploy sizes)",
    "deploy/chaos/runner.py::_experiment": "the chaos experiment loop, being split (issue 14 "
    "deploy sizes)",
    "deploy/chaos/cli.py::register": "the chaos CLI parser, to be built from per-command "
    "functions (issue 14 CLI skeleton)",
    "kms_tool/cli.py": "hsm-kms's CLI, being moved to the shared CLI skeleton (issue 14)",
    "kms_tool/cli.py::build_parser": "hsm-kms's parser, to be built from per-command functions "
    "(issue 14 CLI skeleton)",
    "operator_tool/proposal_commands.py::register": "hsm-operator's proposal parsers, to be "
    "built from per-command functions (issue 14 CLI skeleton)",
    "operator_tool/_review.py::review": "the review screen of a proposal, being shrunk "
    "(issue 14 operator_tool sizes)",
    "operator_tool/domain_commands.py::_status": "the domain status screen, being shrunk "
    "(issue 14 operator_tool sizes)",
}

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
