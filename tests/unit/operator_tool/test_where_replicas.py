"""`--cluster DIR` of a domain with coordinator replicas: the operator's client dials every
replica that wrote a ready file (one channel that fails over), not only the first
(`operator_tool._where.locate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from deploy.init import DomainLayout, init_domain
from deploy.localdomain import FAST_SCRYPT_N
from domain_core.errors import UnavailableError
from operator_tool._context import CommandContext
from operator_tool._where import locate

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    root = tmp_path_factory.mktemp("where") / "domain"
    return init_domain(root, nodes=1, operators=1, quorum=1, coordinators=3, scrypt_n=FAST_SCRYPT_N)


def _context(directory: Path) -> CommandContext:
    return CommandContext.from_args(argparse.Namespace(cluster=str(directory)), {})


def _ready(layout: DomainLayout, name: str, operator_address: str) -> None:
    layout.run_dir.mkdir(exist_ok=True)
    layout.ready_file(name).write_text(
        json.dumps(
            {"pid": 1, "name": name, "address": "127.0.0.1:1", "operator_address": operator_address}
        )
    )


def test_every_running_replica_is_dialled(replicated: DomainLayout) -> None:
    for name in replicated.coordinators:
        replicated.ready_file(name).unlink(missing_ok=True)
    with pytest.raises(UnavailableError, match=r"no coordinator of .* is running"):
        locate(_context(replicated.root))
    _ready(replicated, "coordinator-2", "127.0.0.1:4002")
    assert locate(_context(replicated.root)).coordinator == "127.0.0.1:4002"
    _ready(replicated, "coordinator-1", "127.0.0.1:4001")
    _ready(replicated, "coordinator-3", "127.0.0.1:4003")
    location = locate(_context(replicated.root))
    assert location.coordinator == "127.0.0.1:4001,127.0.0.1:4002,127.0.0.1:4003"
    assert location.anchor.genesis_hash == replicated.genesis_hash
