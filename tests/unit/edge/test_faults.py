"""The test-only fault injection hook: off by default, loud when on, strict about names.

The crash itself (SIGKILL at the point) is exercised with real processes in
tests/chaos/test_crash_durability.py.
"""

from __future__ import annotations

import logging

import pytest

from domain_edge import faults

pytestmark = pytest.mark.unit


def test_off_unless_the_environment_names_points() -> None:
    assert faults._read_environment({}) == frozenset()
    assert faults._read_environment({faults.ENVIRONMENT_VARIABLE: ""}) == frozenset()
    assert faults._read_environment(
        {faults.ENVIRONMENT_VARIABLE: " during_push, after_store_before_push ,"}
    ) == {"during_push", "after_store_before_push"}


def test_this_test_process_has_no_fault_point() -> None:
    assert faults.enabled_points() == frozenset()
    for name in faults.FAULT_POINTS:
        faults.unsafe_crash_point(name)  # returns: nothing is enabled here


def test_an_unknown_point_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.unsafe_crash_point("after_lunch")


def test_a_process_with_points_says_so_and_names_unknown_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test_faults")
    faults.warn_if_enabled(logger)
    assert not caplog.records

    monkeypatch.setattr(faults, "_ENABLED", frozenset({"during_push", "typo_point"}))
    with caplog.at_level(logging.WARNING, logger="test_faults"):
        faults.warn_if_enabled(logger)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "UNSAFE test-only fault injection is ON" in record.getMessage()
    assert "during_push" in record.getMessage()
    assert "unknown point names ignored: typo_point" in record.getMessage()
