"""Shared fixtures, and the CI rule that no test may be skipped.

A test that needs an external tool (softhsm2-util, libsofthsm2.so, etcd) asks for it with
`require_tool`: when the tool is missing the test skips, or fails when `HSM_REQUIRE_ALL=1`.
Under `HSM_REQUIRE_ALL=1` (set by `.ci/run`) every skip, wherever it comes from (a skip mark,
`pytest.skip` in a test or fixture, `pytest.importorskip` at import), is reported as a failure,
so a green CI run means that every test ran. Real etcd clusters (`etcd_cluster`,
`etcd_factory`) are fixtures here so that every folder shares the session's one.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from support.etcd import LocalEtcd

REQUIRE_ALL_ENV = "HSM_REQUIRE_ALL"

# Shared libraries are not on PATH: where to look for them, after the environment variable.
_LIBRARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "libsofthsm2.so": (
        "HSM_SOFTHSM2_MODULE",
        (
            "/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/*/softhsm/libsofthsm2.so",
            "/usr/lib64/softhsm/libsofthsm2.so",
            "/usr/local/lib/softhsm/libsofthsm2.so",
            "/opt/homebrew/lib/softhsm/libsofthsm2.so",
        ),
    ),
}

_SKIPS_FAILED = pytest.StashKey[int]()


def require_all() -> bool:
    """True when skipping is not allowed (`HSM_REQUIRE_ALL=1`, as in CI)."""
    return os.environ.get(REQUIRE_ALL_ENV) == "1"


def find_tool(name: str) -> str | None:
    """Path of an executable on PATH, or of a known shared library; None if absent."""
    if name in _LIBRARIES:
        env_var, patterns = _LIBRARIES[name]
        configured = os.environ.get(env_var)
        if configured:
            return configured if os.path.isfile(configured) else None
        for pattern in patterns:
            for path in sorted(glob.glob(pattern)):
                if os.path.isfile(path):
                    return path
        return None
    return shutil.which(name)


def require_tool(name: str, why: str) -> str:
    """Return the path of `name`; skip the test if it is missing (fail under HSM_REQUIRE_ALL=1).

    `why` says what the test needs the tool for; it ends up in the skip or failure message.
    """
    path = find_tool(name)
    if path is not None:
        return path
    message = f"{name} not found (needed to {why}); `bash scripts/test.sh` installs it on Debian"
    if require_all():
        pytest.fail(f"{REQUIRE_ALL_ENV}=1 and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(name="require_tool")
def _require_tool_fixture() -> Callable[[str, str], str]:
    """Fixture form of `require_tool`, for tests that cannot import from conftest."""
    return require_tool


@pytest.fixture
def softhsm2_util_bin() -> str:
    """Path of softhsm2-util (initialises SoftHSM2 tokens)."""
    return require_tool("softhsm2-util", "initialise SoftHSM2 tokens")


@pytest.fixture
def softhsm2_module() -> str:
    """Path of the SoftHSM2 PKCS#11 module, libsofthsm2.so."""
    return require_tool("libsofthsm2.so", "load the SoftHSM2 PKCS#11 module")


@pytest.fixture(scope="session")
def etcd_bin() -> str:
    """Path of etcd (the etcd store's tests run real clusters: `support.etcd`)."""
    return require_tool("etcd", "run a real etcd cluster for the etcd store's tests")


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory, etcd_bin: str) -> Iterator[LocalEtcd]:
    """One real 3-member etcd cluster for the whole session, shared under fresh key prefixes
    (`support.etcd.fresh_prefix`); never faulted (see `etcd_factory`)."""
    from support.etcd import local_etcd

    with local_etcd(tmp_path_factory.mktemp("etcd"), 3, etcd_bin) as local:
        yield local


@pytest.fixture
def etcd_factory(tmp_path: Path, etcd_bin: str) -> Iterator[Callable[[int], LocalEtcd]]:
    """Start etcd clusters of N members for one test (to kill, pause, restart); all are
    stopped after it."""
    from support.etcd import cluster_factory

    make, stop_all = cluster_factory(tmp_path, etcd_bin)
    try:
        yield make
    finally:
        stop_all()


@pytest.fixture
def fixed_now() -> datetime:
    """A fixed, timezone-aware UTC time for tests that pass the clock in (`now=`)."""
    return datetime(2026, 1, 1, tzinfo=UTC)


def pytest_configure(config: pytest.Config) -> None:
    # gRPC reads GRPC_VERBOSITY when its core starts, which can happen as early as collection.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


@pytest.fixture(autouse=True, scope="session")
def _grpc_quiet() -> None:
    """Silence gRPC's handshake-failure logging here and in every process a test starts."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


# What a test finds in the environment about the processes it starts: a test (or code a test
# runs in this process, such as a tool's `main`) that changes it leaves it to every later test
# of the same worker; `domain_edge.logs.configure_logging` sets HSM_LOG_FORMAT, and a JSON one
# left behind made later tests' processes log JSON where text was read.
_INHERITED_ENV = ("HSM_LOG_FORMAT", "HSM_CLUSTER")


@pytest.fixture(autouse=True)
def _inherited_env_restored() -> Iterator[None]:
    """Restore the variables of `_INHERITED_ENV` after each test, as they were before it."""
    before = {name: os.environ.get(name) for name in _INHERITED_ENV}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_instead_of_skip(
    config: pytest.Config, report: pytest.TestReport | pytest.CollectReport
) -> None:
    config.stash[_SKIPS_FAILED] = config.stash.get(_SKIPS_FAILED, 0) + 1
    report.outcome = "failed"
    report.longrepr = (
        f"{REQUIRE_ALL_ENV}=1 forbids skipped tests, and this was skipped: {_skip_reason(report)}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # Fixtures read the outcome in their teardown (e.g. to print a server's log on failure).
    setattr(item, f"rep_{report.when}", report)
    # An xfail is reported as skipped with `wasxfail`; it is an expected failure, not a skip.
    if report.skipped and require_all() and not hasattr(report, "wasxfail"):
        _fail_instead_of_skip(item.config, report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    # A module-level `pytest.skip(allow_module_level=True)` or `pytest.importorskip`.
    if report.skipped and require_all():
        _fail_instead_of_skip(collector.config, report)
    return report


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    count = config.stash.get(_SKIPS_FAILED, 0)
    if count:
        terminalreporter.write_line(
            f"{REQUIRE_ALL_ENV}=1: {count} skip(s) reported as failures", red=True
        )
