"""Several coordinator replicas behind one channel: the target and options it is dialled with."""

from __future__ import annotations

import uuid

import grpc
import pytest

from domain_core import ciphertext
from domain_core.errors import InvalidInputError
from domain_edge.kms_client import retryable
from domain_edge.transport import channel_target, split_addresses

pytestmark = pytest.mark.unit


def test_one_address_is_dialled_as_given() -> None:
    assert channel_target("127.0.0.1:7000") == ("127.0.0.1:7000", [])
    assert channel_target("localhost:7000") == ("localhost:7000", [])


def test_several_addresses_become_one_round_robin_channel() -> None:
    target, options = channel_target("127.0.0.1:7000, 127.0.0.1:7001,127.0.0.2:7002")
    assert target == "ipv4:127.0.0.1:7000,127.0.0.1:7001,127.0.0.2:7002"
    assert options == [("grpc.lb_policy_name", "round_robin")]
    target, _ = channel_target("[::1]:7000,[::1]:7001")
    assert target == "ipv6:[::1]:7000,[::1]:7001"
    target, _ = channel_target("localhost:7000,127.0.0.1:7001")
    assert target.startswith(("ipv4:127.0.0.1:7000,", "ipv6:"))


@pytest.mark.parametrize(
    "bad",
    ["", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:7000,", ":7000", "a:b"],
)
def test_malformed_address_lists_are_refused_with_the_part(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="host:port"):
        split_addresses(bad)


def test_too_many_addresses_and_mixed_families_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="1 to 16 addresses"):
        split_addresses(",".join(f"127.0.0.1:{7000 + i}" for i in range(17)))
    with pytest.raises(InvalidInputError, match="all as IPv4 or all as IPv6"):
        channel_target("127.0.0.1:7000,[::1]:7001")


def test_an_idempotency_key_names_one_key_per_principal() -> None:
    key = str(uuid.uuid4())
    first = ciphertext.idempotent_key_id("d", "spiffe://d/client/a", key)
    assert first == ciphertext.idempotent_key_id("d", "spiffe://d/client/a", key)
    assert ciphertext.validate_key_id(first) == first
    assert uuid.UUID(first).version == 4
    others = {
        ciphertext.idempotent_key_id("d", "spiffe://d/client/b", key),
        ciphertext.idempotent_key_id("e", "spiffe://d/client/a", key),
        ciphertext.idempotent_key_id("d", "spiffe://d/client/a", key + "x"),
    }
    assert first not in others
    assert len(others) == 3


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "caf\u00e9", "tab\there"])
def test_bad_idempotency_keys_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="idempotency key is 1 to 64 printable"):
        ciphertext.idempotent_key_id("d", "p", bad)


def test_a_create_with_an_idempotency_key_is_retried_like_a_read() -> None:
    lost = (grpc.StatusCode.UNAVAILABLE, "connection reset")
    assert retryable("CreateKey", *lost)
    assert retryable("CreateKey", grpc.StatusCode.DEADLINE_EXCEEDED, "")
    assert not retryable("CreateKey", grpc.StatusCode.PERMISSION_DENIED, "no")
    assert not retryable("RotateKey", *lost)
