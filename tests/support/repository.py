"""Where things are in the repository, for tests that read files or check rules over the source.

The production packages are the ones `pyproject.toml` installs, less the generated protobuf
code (`domain_proto`), which no rule of ours applies to.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
VECTORS = TESTS / "vectors"
PRODUCTION_PACKAGES = (
    "domain_core",
    "domain_edge",
    "hsa_node",
    "domain_coordinator",
    "operator_tool",
    "deploy",
    "kms_tool",
)


def production_modules() -> list[Path]:
    """Every Python module of the production packages, sorted."""
    return sorted(
        path for package in PRODUCTION_PACKAGES for path in (ROOT / package).rglob("*.py")
    )


def relative(path: Path) -> str:
    """`path` relative to the repository root, with forward slashes."""
    return path.relative_to(ROOT).as_posix()
