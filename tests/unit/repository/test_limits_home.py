"""CI rule: every input limit lives in `domain_core.limits`.

A module-level `MAX_*` or `MIN_*` constant anywhere else in the production packages fails
this test, unless it is listed below with the reason it is not an input limit (the limits
module's docstring names the same kinds).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support.repository import ROOT, production_modules, relative

from domain_core import limits

pytestmark = pytest.mark.unit

LIMITS_MODULE = "domain_core/limits.py"

NOT_INPUT_LIMITS: dict[str, dict[str, str]] = {
    "domain_core/keytokens.py": {
        "_MAX_U32": "the largest u32 of the token encoding",
        "MAX_KEY_MATERIAL_BYTES": "the largest material a token seals (an HSA's own keys, "
        "never a caller's input)",
    },
    "domain_core/ciphertext.py": {
        "_MAX_U32": "the largest u32 of the blob encoding",
        "_MAX_KEY_ID_BYTES": "a key id's length is one byte in the blob format",
    },
    "domain_core/envelope.py": {"_MAX_CHUNKS": "the chunk counter is a u32 in every nonce"},
    "hsa_node/keysession.py": {
        "_MAX_ANSWERS_PER_MESSAGE": "how many answers the HSA packs into one message it sends"
    },
    "domain_edge/kms_client/_session.py": {
        "_MAX_CALLS_PER_MESSAGE": "how many calls the client packs into one message it sends"
    },
    "domain_core/recovery_shares.py": {"MAX_SHARES": "SLIP-39 allows at most 16 group members"},
    "kms_tool/_args.py": {"_MAX_U32": "the largest u32 a backing version can be"},
    "domain_coordinator/_requests.py": {
        "MAX_REPORTED_VERSION": "what the store's 64-bit integer columns hold"
    },
    "domain_coordinator/_store_records.py": {
        "MAX_STORED_INTEGER": "what a 64-bit signed integer column holds"
    },
    "domain_core/backup.py": {"_MAX_STORED": "what the store's 64-bit integer columns hold"},
    "domain_coordinator/_producer.py": {
        "MAX_DEFER_SECONDS": "back-off tuning of the coordinator's retries"
    },
    "domain_coordinator/server.py": {
        "MAX_CONCURRENT_RPCS": "the sizing of the coordinator's server, set where it is built"
    },
    "domain_edge/kms_client/_retry.py": {"_MAX_DOUBLINGS": "back-off tuning of client retries"},
    "domain_edge/kms_client/_core.py": {
        "_MAX_CHECKED_CONTEXTS": "a client's memory of contexts it checked, not an input"
    },
    "domain_edge/metrics.py": {
        "_MAX_METHODS": "label sets a process keeps: its servers' own methods, not an input"
    },
    "domain_edge/transport/_interceptor.py": {
        "_MAX_WRAPPED_METHODS": "a cache of the server's own methods"
    },
    "domain_edge/audit/_encoding.py": {
        name: "an audit record's clipping width: longer values are cut, never refused"
        for name in (
            "_MAX_PRINCIPAL",
            "_MAX_OPERATION",
            "_MAX_KEY_ID",
            "_MAX_RESULT",
            "_MAX_DETAIL",
            "_MAX_CONTEXT_ENTRIES",
            "_MAX_CONTEXT_KEY",
            "_MAX_CONTEXT_VALUE",
        )
    },
}


def _bound_names(path: Path) -> list[str]:
    """Module-level names of `path` that look like a bound (`MAX_...`, `_MIN_...`)."""
    names = []
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name):
                bare = target.id.lstrip("_")
                if bare.startswith(("MAX_", "MIN_")):
                    names.append(target.id)
    return names


def test_every_input_limit_lives_in_limits() -> None:
    found: dict[str, list[str]] = {}
    for path in production_modules():
        where = relative(path)
        if where == LIMITS_MODULE:
            continue
        unlisted = [n for n in _bound_names(path) if n not in NOT_INPUT_LIMITS.get(where, {})]
        if unlisted:
            found[where] = unlisted
    assert found == {}, (
        "move these input limits to domain_core/limits.py (or, if one is not an input limit, "
        "list it in NOT_INPUT_LIMITS with the reason)"
    )


def test_the_allowlist_names_only_what_exists() -> None:
    # A stale entry would let a new constant of that name slip in unreviewed.
    stale = [
        f"{where}:{name}"
        for where, names in NOT_INPUT_LIMITS.items()
        for name in names
        if name not in _bound_names(ROOT / where)
    ]
    assert stale == []


def test_fixed_limits_are_positive_and_ordered() -> None:
    bounds = {n: getattr(limits, n) for n in dir(limits) if n.startswith(("MAX_", "MIN_"))}
    assert len(bounds) > 50
    assert all(isinstance(v, int | float) and v > 0 for v in bounds.values()), bounds
    for name, value in bounds.items():
        if name.startswith("MIN_"):
            assert value <= bounds.get("MAX_" + name[4:], value), name
