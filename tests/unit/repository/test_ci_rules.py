"""The rules of tests/conftest.py: skips become failures under HSM_REQUIRE_ALL=1, tools are found.

Each case runs a small test suite, with a copy of our conftest, in a fresh pytest session.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from support.repository import TESTS

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.unit

REQUIRE_ALL_ENV = "HSM_REQUIRE_ALL"

CONFTEST = TESTS / "conftest.py"

SKIPPING_SUITE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("no softhsm2 here")
"""


# Hypothesis's plugin costs about a second per in-process session and plays no part here.
FAST = ("-p", "no:hypothesispytest")


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory holding our conftest, with HSM_REQUIRE_ALL unset."""
    monkeypatch.delenv(REQUIRE_ALL_ENV, raising=False)
    pytester.makeconftest(CONFTEST.read_text())
    return pytester


def test_skip_passes_without_require_all(suite: pytest.Pytester) -> None:
    suite.makepyfile(SKIPPING_SUITE)
    result = suite.runpytest(*FAST, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*no softhsm2 here*"])


def test_skip_fails_under_require_all(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    suite.makepyfile(SKIPPING_SUITE)
    result = suite.runpytest(*FAST)
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*HSM_REQUIRE_ALL=1 forbids skipped tests, and this was skipped: no softhsm2 here*",
            "*HSM_REQUIRE_ALL=1: 1 skip(s) reported as failures*",
        ]
    )


def test_other_values_do_not_require_all(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_ALL_ENV, "0")
    suite.makepyfile(SKIPPING_SUITE)
    suite.runpytest(*FAST).assert_outcomes(passed=1, skipped=1)


def test_every_kind_of_skip_fails_under_require_all(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    suite.makepyfile(
        """
        import pytest

        @pytest.fixture
        def needs_something():
            pytest.skip("fixture skipped")

        @pytest.mark.skip(reason="marked")
        def test_mark():
            pass

        @pytest.mark.skipif(True, reason="condition")
        def test_skipif():
            pass

        def test_in_fixture(needs_something):
            pass

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_expected_failure():
            assert False
        """
    )
    result = suite.runpytest(*FAST)
    # Skips in setup (marks, fixtures) are reported as errors; xfail is not a skip.
    result.assert_outcomes(errors=3, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_module_level_skip_fails_under_require_all(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    suite.makepyfile(
        test_a="""
        import pytest
        pytest.importorskip("no_such_module_for_hsm_tests")

        def test_never_runs():
            pass
        """
    )
    assert suite.runpytest(*FAST).ret == pytest.ExitCode.NO_TESTS_COLLECTED
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    result = suite.runpytest(*FAST)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*forbids skipped tests*no_such_module_for_hsm_tests*"])


REQUIRE_TOOL_SUITE = """
def test_missing_tool(require_tool):
    require_tool("no-such-tool-for-hsm-tests", "check the rule")

def test_present_tool(require_tool):
    assert require_tool("sh", "check the rule").endswith("/sh")
"""


def test_require_tool_skips_when_missing(suite: pytest.Pytester) -> None:
    suite.makepyfile(REQUIRE_TOOL_SUITE)
    result = suite.runpytest(*FAST, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["*no-such-tool-for-hsm-tests not found (needed to check the rule)*"]
    )


def test_require_tool_fails_when_missing_under_require_all(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REQUIRE_ALL_ENV, "1")
    suite.makepyfile(REQUIRE_TOOL_SUITE)
    result = suite.runpytest(*FAST)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*HSM_REQUIRE_ALL=1 and no-such-tool-for-hsm-tests not found*"])


def test_library_found_through_environment(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = suite.path / "libsofthsm2.so"
    monkeypatch.setenv("HSM_SOFTHSM2_MODULE", str(module))
    suite.makepyfile(
        f"""
        def test_module(softhsm2_module):
            assert softhsm2_module == {str(module)!r}
        """
    )
    # Configured but absent: not looked for elsewhere.
    suite.runpytest(*FAST).assert_outcomes(skipped=1)
    module.write_bytes(b"")
    suite.runpytest(*FAST).assert_outcomes(passed=1)


def test_fixed_now_is_utc_new_year_2026(fixed_now: datetime) -> None:
    assert fixed_now == datetime(2026, 1, 1, tzinfo=UTC)
    assert fixed_now.utcoffset() == timedelta(0)


def test_grpc_verbosity_is_error() -> None:
    assert os.environ.get("GRPC_VERBOSITY") == "ERROR"
