"""domain_core.limits: configurable limits, and the token buckets behind the CreateKey quota."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from domain_core.errors import InvalidInputError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge.config import CoordinatorConfig, NodeConfig
from domain_edge.rate_limit import RateLimiter

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_defaults_are_those_of_a_real_kms() -> None:
    # AWS KMS: CreateKey 5 requests per second per account (bursts allowed), 100,000 keys.
    assert DEFAULT_LIMITS.create_key_per_second == 5.0
    assert DEFAULT_LIMITS.create_key_burst == 50
    assert DEFAULT_LIMITS.max_keys_per_principal == 100_000


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(5.0, 3, clock=clock)
    assert [limiter.acquire("app") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("app")
    assert wait == pytest.approx(0.2)
    assert limiter.acquire("other") == 0.0  # one bucket per principal
    clock.now += 0.2
    assert limiter.acquire("app") == 0.0
    assert limiter.acquire("app") > 0
    clock.now += 100  # saves at most the burst
    assert [limiter.acquire("app") for _ in range(4)][-1] > 0


def test_a_refused_call_takes_no_token() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.acquire("app") == 0.0
    for _ in range(5):
        assert limiter.acquire("app") > 0
    clock.now += 1.0
    assert limiter.acquire("app") == 0.0


def test_the_buckets_are_bounded_and_thread_safe() -> None:
    limiter = RateLimiter(1.0, 10, max_names=100)
    for index in range(1000):
        limiter.acquire(f"p{index}")
    assert len(limiter._buckets) == 100
    granted: list[float] = []
    barrier = threading.Barrier(8)

    def take() -> None:
        barrier.wait()
        granted.extend(limiter.acquire("shared") for _ in range(5))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(1 for w in granted if w == 0.0) == 10  # exactly the burst, not more


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_keys_per_principal": 0}, "must be above 0"),
        ({"max_keys_per_principal": 2.5}, "whole number"),
        ({"create_key_per_second": "fast"}, "must be a number"),
        ({"create_key_burst": True}, "whole number"),
        ({"no_such_limit": 1}, "unknown limit 'no_such_limit'"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        DEFAULT_LIMITS.with_overrides(overrides)


def test_configs_carry_limit_overrides(tmp_path: Path) -> None:
    base = {
        "domain_id": "local",
        "genesis_hash": "00" * 32,
        "tls": {"ca": "ca.crt", "cert": "tls.crt", "key": "tls.key"},
    }
    node = {
        **base,
        "host_id": "hsa-1",
        "identity_dir": "identity",
        "data_dir": "data",
        "genesis_state": "genesis.state",
        "limits": {"create_key_per_second": 20, "create_key_burst": 100},
    }
    path = tmp_path / "node.json"
    path.write_text(json.dumps(node))
    limits = NodeConfig.load(path).effective_limits()
    assert (limits.create_key_per_second, limits.create_key_burst) == (20.0, 100)
    assert limits.max_message_bytes == Limits().max_message_bytes
    assert NodeConfig.load(path).key_cache_mib == 512
    path.write_text(json.dumps({**node, "key_cache_mib": 64}))
    assert NodeConfig.load(path).key_cache_mib == 64
    for bad in (0, 65_537, 1.5, True, "64"):
        path.write_text(json.dumps({**node, "key_cache_mib": bad}))
        with pytest.raises(InvalidInputError, match="key_cache_mib must be a whole number"):
            NodeConfig.load(path)
    coordinator = {
        **base,
        "name": "coordinator",
        "genesis_state": "genesis.state",
        "key_tombstone_days": 7,
        "proposal_retention_days": 90,
        "limits": {"max_keys_per_principal": 10, "max_pending_proposals_per_operator": 4},
    }
    path.write_text(json.dumps(coordinator))
    config = CoordinatorConfig.load(path)
    assert config.effective_limits().max_keys_per_principal == 10
    assert config.effective_limits().max_pending_proposals_per_operator == 4
    assert (config.key_tombstone_days, config.proposal_retention_days) == (7, 90)
    for bad, message in (
        ({"limits": {"max_keys_per_principal": -1}}, "above 0"),
        ({"limits": [1]}, "JSON object"),
        ({"key_tombstone_days": 0}, "key_tombstone_days"),
        ({"proposal_retention_days": 0}, "proposal_retention_days must be"),
        ({"proposal_retention_days": 4000}, "proposal_retention_days must be"),
    ):
        path.write_text(json.dumps({**coordinator, **bad}))
        with pytest.raises(InvalidInputError, match=message):
            CoordinatorConfig.load(path)
