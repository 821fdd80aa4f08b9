"""CI rule: the unit tests mirror the packages, and every test module's name is unique.

Unit tests live in one folder per package they test (`core` for domain_core, `edge` for
domain_edge, `coordinator` for domain_coordinator, the others by their package's name) or in
`repository` for rules over the whole repository. The test folders have no `__init__.py`, so
pytest imports each test module by its file name: two files of one name would collide.
"""

from __future__ import annotations

from collections import Counter

import pytest
from support.repository import ROOT, TESTS

pytestmark = pytest.mark.unit

UNIT_FOLDERS = {
    "core": "domain_core",
    "edge": "domain_edge",
    "hsa_node": "hsa_node",
    "coordinator": "domain_coordinator",
    "operator_tool": "operator_tool",
    "deploy": "deploy",
    "bench": "bench",
    "repository": None,
}


def test_unit_tests_live_in_a_folder_per_package() -> None:
    unit = TESTS / "unit"
    assert sorted(p.name for p in unit.glob("test_*.py")) == []
    folders = {p.name for p in unit.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders <= set(UNIT_FOLDERS), folders - set(UNIT_FOLDERS)
    for package in UNIT_FOLDERS.values():
        assert package is None or (ROOT / package / "__init__.py").is_file()


def test_every_test_module_name_is_unique() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
