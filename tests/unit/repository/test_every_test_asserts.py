"""CI rule: every test checks something.

A test function passes this rule when its body (or a function it calls, defined anywhere under
tests/, followed through further calls) holds an `assert`, a `pytest.raises`, `pytest.warns`
or `pytest.fail`, or calls a method whose name starts with `assert` (pytester's
`assert_outcomes`, a mock's `assert_called_once_with`) or matches output lines
(`fnmatch_lines`). A test that only shows that nothing raises fails it, unless it is listed
in NEVER_CRASH with the reason that "nothing but the expected errors is raised" is its claim.

Helpers are matched by name, so a helper that asserts lends its name to every function of that
name: the rule catches tests that check nothing at all, not every weak check.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator

import pytest
from support.repository import TESTS, relative

pytestmark = pytest.mark.unit

NEVER_CRASH: dict[str, str] = {
    "tests/unit/core/test_model.py::test_arbitrary_bytes_never_crash_parsers": (
        "property: any bytes give a Proposal, Manifest or SealedState or an InvalidInputError"
    ),
    "tests/unit/core/test_model.py::test_damaged_valid_bytes_never_crash_parsers": (
        "property: valid bytes with a flipped bit, a cut or a changed byte never crash a parser"
    ),
}

_PYTEST_CHECKS = frozenset({"raises", "warns", "fail", "deprecated_call"})
_ASSERTING_PREFIXES = ("assert", "fnmatch_lines", "re_match_lines", "no_fnmatch_line")

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _called_names(function: Function) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                yield node.func.id, node
            elif isinstance(node.func, ast.Attribute):
                yield node.func.attr, node


def _checks_directly(function: Function) -> bool:
    if any(isinstance(node, ast.Assert) for node in ast.walk(function)):
        return True
    for name, call in _called_names(function):
        func = call.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "pytest"
            and func.attr in _PYTEST_CHECKS
        ):
            return True
        if name.startswith(_ASSERTING_PREFIXES):
            return True
    return False


def _functions(tree: ast.AST) -> Iterator[Function]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _asserting_names(trees: list[ast.Module]) -> set[str]:
    """Names of the functions under tests/ that check something, directly or through calls."""
    by_name: dict[str, list[Function]] = {}
    for tree in trees:
        for function in _functions(tree):
            by_name.setdefault(function.name, []).append(function)
    checking = {name for name, defs in by_name.items() if any(map(_checks_directly, defs))}
    grew = True
    while grew:
        grew = False
        for name, defs in by_name.items():
            if name not in checking and any(
                called in checking for d in defs for called, _ in _called_names(d)
            ):
                checking.add(name)
                grew = True
    return checking


@functools.cache
def _tests_that_check_nothing() -> list[str]:
    sources = {path: ast.parse(path.read_text()) for path in sorted(TESTS.rglob("*.py"))}
    checking = _asserting_names(list(sources.values()))
    found = []
    for path, tree in sources.items():
        if not path.name.startswith("test_"):
            continue  # support code, conftest, vector generators: not collected as tests
        for function in _functions(tree):
            if not function.name.startswith("test_"):
                continue
            if _checks_directly(function) or any(
                called in checking for called, _ in _called_names(function)
            ):
                continue
            found.append(f"{relative(path)}::{function.name}")
    return found


def test_every_test_checks_something() -> None:
    unchecked = [t for t in _tests_that_check_nothing() if t not in NEVER_CRASH]
    assert unchecked == [], (
        "these tests only show that nothing raises: assert what the call returned or changed "
        "(or, for a never-crash property, list it in NEVER_CRASH with the reason)"
    )


def test_the_never_crash_list_is_current() -> None:
    # An entry whose test now asserts (or is gone) is removed, so the list stays a review.
    assert sorted(set(NEVER_CRASH) - set(_tests_that_check_nothing())) == []


def test_the_rule_sees_a_test_that_checks_nothing() -> None:
    tree = ast.parse(
        "def helper(x):\n    assert x\n\n"
        "def test_checks(): helper(1)\n\n"
        "def test_raises():\n    with pytest.raises(ValueError): int('x')\n\n"
        "def test_nothing(): int('1')\n"
    )
    checking = _asserting_names([tree])
    verdicts = {
        f.name: _checks_directly(f) or any(n in checking for n, _ in _called_names(f))
        for f in _functions(tree)
        if f.name.startswith("test_")
    }
    assert verdicts == {"test_checks": True, "test_raises": True, "test_nothing": False}
