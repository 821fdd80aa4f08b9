"""The coordinator's quotas as a library: the token bucket per address and the stream slots."""

from __future__ import annotations

import re

import pytest

from domain_coordinator._quota import AddressQuota, WatchSlots, client_address
from domain_core.errors import ResourceExhaustedError

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/run/coordinator.sock", "unix:/run/coordinator.sock"),
        ("nothing", "nothing"),
    ],
)
def test_client_address_drops_the_port(peer: str, address: str) -> None:
    assert client_address(peer) == address


def test_a_burst_then_refusals_that_say_when_to_retry() -> None:
    clock = Clock()
    quota = AddressQuota(rate=2.0, burst=5, what="reads", clock=clock)
    for _ in range(5):
        quota.take("10.0.0.1")
    with pytest.raises(ResourceExhaustedError) as refused:
        quota.take("10.0.0.1")
    assert re.fullmatch(
        r"too many reads from 10\.0\.0\.1: at most 2 a second \(bursts of 5\); retry in 1 s",
        refused.value.message,
    )
    # Another address has its own bucket.
    quota.take("10.0.0.2")
    # Refused calls cost nothing: half a second later one token is back.
    clock.now += 0.5
    quota.take("10.0.0.1")
    with pytest.raises(ResourceExhaustedError):
        quota.take("10.0.0.1")


def test_an_expensive_call_is_admitted_once_and_paid_for_after() -> None:
    clock = Clock()
    quota = AddressQuota(rate=1.0, burst=10, clock=clock)
    quota.take("a", cost=25.0)  # 10 - 25 = -15: admitted, in debt
    with pytest.raises(ResourceExhaustedError) as refused:
        quota.take("a")
    assert refused.value.message.endswith("retry in 16 s")
    clock.now += 15.9
    with pytest.raises(ResourceExhaustedError):
        quota.take("a")
    clock.now += 0.2
    quota.take("a")


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    clock = Clock()
    quota = AddressQuota(rate=100.0, burst=3, clock=clock)
    quota.take("a")
    clock.now += 3600
    for _ in range(3):
        quota.take("a")
    with pytest.raises(ResourceExhaustedError):
        quota.take("a")


def test_the_number_of_addresses_kept_is_bounded() -> None:
    clock = Clock()
    quota = AddressQuota(rate=1.0, burst=1, clock=clock, max_addresses=2)
    quota.take("a")
    quota.take("b")
    with pytest.raises(ResourceExhaustedError):
        quota.take("a")  # "a" is now the most recently used
    quota.take("c")  # forgets "b", the least recently used
    quota.take("b")  # a forgotten address starts with a full bucket, like a new one
    with pytest.raises(ResourceExhaustedError):
        quota.take("c")


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_quota_needs_a_rate_and_a_burst(rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match="positive rate"):
        AddressQuota(rate=rate, burst=burst)


def test_a_host_holds_at_most_its_slots_and_a_new_stream_replaces_its_oldest() -> None:
    slots = WatchSlots(per_host=2)
    first, replaced = slots.open("hsa-1")
    assert replaced is None
    second, replaced = slots.open("hsa-1")
    assert replaced is None
    other, _ = slots.open("hsa-2")
    third, replaced = slots.open("hsa-1")
    assert replaced is first
    assert first.replaced.is_set()
    assert not second.replaced.is_set()
    assert not third.replaced.is_set()
    assert not other.replaced.is_set()
    assert (slots.count("hsa-1"), slots.count("hsa-2")) == (2, 1)
    slots.close(first)  # already gone: nothing changes
    assert slots.count("hsa-1") == 2
    slots.close(second)
    slots.close(third)
    slots.close(other)
    assert (slots.count("hsa-1"), slots.count("hsa-2")) == (0, 0)
    with pytest.raises(ValueError, match="at least one stream slot"):
        WatchSlots(per_host=0)
