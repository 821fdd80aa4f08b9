"""Tests across Linux network namespaces: root and `ip` (iproute2) are required (under
`HSM_REQUIRE_ALL=1` a missing one fails the test); every namespace a test makes is removed
afterwards, also when it fails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from support.netns import Network


@pytest.fixture
def network(require_tool: Callable[[str, str], str]) -> Iterator[Network]:
    """A switch namespace with a bridge; the test adds its machines. Removed afterwards."""
    require_tool("ip", "make network namespaces (iproute2)")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    made = Network()
    try:
        yield made.open()
    finally:
        made.close()
        assert made.remaining() == [], "a namespace of the test was left behind"
