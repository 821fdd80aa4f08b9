"""The committed generated protobuf code must match what proto/ generates now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from support.repository import ROOT

pytestmark = pytest.mark.unit


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    gen = _load_generator()
    fresh = tmp_path / "_generated"
    gen.generate(fresh)
    assert gen.stale_files(fresh, gen.OUT) == []


def test_stale_check_notices_a_changed_file(tmp_path: Path) -> None:
    gen = _load_generator()
    fresh = tmp_path / "_generated"
    gen.generate(fresh)
    target = next(fresh.rglob("domain_pb2.py"))
    target.write_text(target.read_text() + "\n# edited by hand\n")
    stale = gen.stale_files(fresh, gen.OUT)
    assert stale == [str(target.relative_to(fresh))]
