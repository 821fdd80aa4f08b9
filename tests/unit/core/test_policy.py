"""domain_core.policy: exact matching, no wildcards, and no policy that locks a key forever."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain_core import access
from domain_core.errors import InvalidInputError, LimitExceededError, PermissionDeniedError
from domain_core.limits import Limits
from domain_core.policy import (
    ALL_OPERATIONS,
    allowed,
    default_policy,
    operation_name,
    require,
    validate_policy,
)
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

DOMAIN = "prod.example"
APP = f"spiffe://{DOMAIN}/client/app"
OPS = f"spiffe://{DOMAIN}/client/ops"
AUDITOR = f"spiffe://{DOMAIN}/client/auditor"
KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"

ENCRYPT = keys_pb2.KEY_OPERATION_ENCRYPT
DECRYPT = keys_pb2.KEY_OPERATION_DECRYPT
DESCRIBE = keys_pb2.KEY_OPERATION_DESCRIBE
ADMIN = keys_pb2.KEY_OPERATION_ADMIN
UNSPECIFIED = keys_pb2.KEY_OPERATION_UNSPECIFIED


def _policy(*grants: tuple[list[str], Sequence[int]]) -> keys_pb2.KeyPolicy:
    policy = keys_pb2.KeyPolicy()
    for principals, operations in grants:
        grant = policy.grants.add()
        grant.principals.extend(principals)
        grant.operations.extend(operations)  # type: ignore[arg-type]
    return policy


POLICY = _policy(([APP], [ENCRYPT, DECRYPT]), ([OPS, AUDITOR], [DESCRIBE]), ([OPS], [ADMIN]))


@pytest.mark.parametrize(
    ("principal", "operation", "expected"),
    [
        (APP, ENCRYPT, True),
        (APP, DECRYPT, True),
        (APP, DESCRIBE, False),
        (APP, ADMIN, False),
        (OPS, DESCRIBE, True),
        (OPS, ADMIN, True),
        (OPS, ENCRYPT, False),  # ADMIN implies nothing else
        (AUDITOR, DESCRIBE, True),
        (AUDITOR, DECRYPT, False),
        (APP, UNSPECIFIED, False),
        (APP, 99, False),
        # exact match only: no prefixes, suffixes, case folding, other domains or kinds
        (APP.upper(), ENCRYPT, False),
        (APP + "2", ENCRYPT, False),
        (APP[:-1], ENCRYPT, False),
        (APP + "/", ENCRYPT, False),
        (f"spiffe://{DOMAIN}/hsa/app", ENCRYPT, False),
        ("spiffe://other.example/client/app", ENCRYPT, False),
        ("*", ENCRYPT, False),
        ("", ENCRYPT, False),
    ],
)
def test_allowed_is_exact(principal: str, operation: int, expected: bool) -> None:
    assert allowed(POLICY, principal, operation) is expected


def test_a_star_principal_is_not_a_wildcard() -> None:
    policy = _policy((["*"], list(ALL_OPERATIONS)))
    assert not allowed(policy, APP, ENCRYPT)
    assert allowed(policy, "*", ENCRYPT)  # only the literal string, which no client can be
    with pytest.raises(InvalidInputError):
        validate_policy(policy, domain_id=DOMAIN)


def test_default_policy_gives_the_creator_everything_and_nobody_else_anything() -> None:
    policy = default_policy(APP)
    validate_policy(policy, domain_id=DOMAIN)
    for operation in ALL_OPERATIONS:
        assert allowed(policy, APP, operation)
        assert not allowed(policy, OPS, operation)
    assert not allowed(policy, APP, UNSPECIFIED)
    assert set(ALL_OPERATIONS) == set(keys_pb2.KeyOperation.values()) - {UNSPECIFIED}
    with pytest.raises(ValueError, match="creator"):
        default_policy("")


def test_require_names_principal_operation_and_key() -> None:
    require(POLICY, APP, DECRYPT, KEY_ID)
    with pytest.raises(PermissionDeniedError) as info:
        require(POLICY, AUDITOR, DECRYPT, KEY_ID)
    assert str(info.value).startswith(f"principal {AUDITOR} may not decrypt with key {KEY_ID}; ")
    assert "PutKeyPolicy" in str(info.value)
    assert APP not in str(info.value)
    assert OPS not in str(info.value)
    with pytest.raises(PermissionDeniedError, match=f"principal {APP} may not administer with key"):
        require(POLICY, APP, ADMIN, KEY_ID)


_PRINCIPALS = [APP, OPS, AUDITOR, "*", "", APP.upper()]
_OPERATIONS = [*ALL_OPERATIONS, UNSPECIFIED, 99]


@settings(max_examples=200, deadline=None)
@given(
    grants=st.lists(
        st.tuples(
            st.lists(st.sampled_from(_PRINCIPALS), max_size=3),
            st.lists(st.sampled_from(_OPERATIONS), max_size=4),
        ),
        max_size=4,
    ),
    principal=st.sampled_from(_PRINCIPALS),
    operation=st.sampled_from(_OPERATIONS),
)
def test_a_keys_access_rules_decide_as_its_policy_does(
    grants: list[tuple[list[str], list[int]]], principal: str, operation: int
) -> None:
    policy = _policy(*grants)
    rules = access.access_rules(keys_pb2.KeyMetadata(key_id=KEY_ID, policy=policy))
    expected = allowed(policy, principal, operation)
    assert rules.allows(principal, operation, {}) is expected
    if expected:
        rules.require(principal, operation, KEY_ID, {})
    else:
        with pytest.raises(PermissionDeniedError) as via_set:
            rules.require(principal, operation, KEY_ID, {})
        with pytest.raises(PermissionDeniedError) as via_policy:
            require(policy, principal, operation, KEY_ID)
        assert str(via_set.value) == str(via_policy.value)


def test_access_rules_cannot_be_changed() -> None:
    granted = access.access_rules(keys_pb2.KeyMetadata(policy=POLICY)).outright
    assert dict(granted) == {
        APP: frozenset({ENCRYPT, DECRYPT}),
        OPS: frozenset({DESCRIBE, ADMIN}),
        AUDITOR: frozenset({DESCRIBE}),
    }
    with pytest.raises(TypeError):
        granted[APP] = frozenset(ALL_OPERATIONS)  # type: ignore[index]


def test_operation_names() -> None:
    assert operation_name(keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM) == "re-encrypt from"
    assert operation_name(keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY) == "generate data keys"
    assert operation_name(42) == "operation 42"


def _outright(policy: keys_pb2.KeyPolicy) -> dict[str, frozenset[int]]:
    """The operations each principal has outright, by the key's access rules."""
    return dict(access.access_rules(keys_pb2.KeyMetadata(policy=policy)).outright)


# --- validation ----------------------------------------------------------------------------


def test_valid_policy_passes_unchanged() -> None:
    before = POLICY.SerializeToString(deterministic=True)
    assert validate_policy(POLICY, domain_id=DOMAIN) is None
    assert POLICY.SerializeToString(deterministic=True) == before
    assert _outright(POLICY) == {
        APP: frozenset({ENCRYPT, DECRYPT}),
        OPS: frozenset({DESCRIBE, ADMIN}),
        AUDITOR: frozenset({DESCRIBE}),
    }


def test_valid_policy_passes_at_its_limits() -> None:
    # POLICY has 3 grants, at most 2 principals in one: it passes at exactly those limits and
    # is refused one below, so "passes" is not "nothing is checked".
    exact = Limits(max_policy_grants=3, max_principals_per_grant=2)
    assert validate_policy(POLICY, domain_id=DOMAIN, limits=exact) is None
    with pytest.raises(LimitExceededError, match="3 grants"):
        validate_policy(POLICY, domain_id=DOMAIN, limits=Limits(max_policy_grants=2))
    with pytest.raises(LimitExceededError):
        validate_policy(POLICY, domain_id=DOMAIN, limits=Limits(max_principals_per_grant=1))


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (keys_pb2.KeyPolicy(), "gives no principal KEY_OPERATION_ADMIN"),
        (_policy(([APP], [ENCRYPT, DECRYPT])), "gives no principal KEY_OPERATION_ADMIN"),
        (_policy(([APP], [ADMIN]), ([], [ENCRYPT])), "grant 2 names no principal"),
        (_policy(([APP], [ADMIN]), ([OPS], [])), "grant 2 names no operation"),
        (_policy(([APP], [ADMIN, UNSPECIFIED])), "names operation 0"),
        (_policy(([APP], [ADMIN, 99])), "names operation 99"),
        (_policy(([f"spiffe://{DOMAIN}/hsa/node-1"], [ADMIN])), "not a client of this domain"),
        (_policy(([f"spiffe://{DOMAIN}/coordinator/c"], [ADMIN])), "not a client of this domain"),
        (_policy((["spiffe://other.example/client/app"], [ADMIN])), "not a client of this domain"),
        (_policy(([f"spiffe://{DOMAIN}/client/App"], [ADMIN])), "is not a client id"),
        (_policy(([f"spiffe://{DOMAIN}/client/app/x"], [ADMIN])), "is not a client id"),
        (_policy(([f"https://{DOMAIN}/client/app"], [ADMIN])), "is not a client id"),
        (_policy((["app"], [ADMIN])), "is not a client id"),
        (_policy(([""], [ADMIN])), "is not a client id"),
    ],
)
def test_invalid_policies_are_refused_with_a_reason(
    policy: keys_pb2.KeyPolicy, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        validate_policy(policy, domain_id=DOMAIN)


def test_policy_limits() -> None:
    limits = Limits(max_policy_grants=3, max_principals_per_grant=2)
    validate_policy(
        _policy(([APP, OPS], [ADMIN]), ([APP], [ENCRYPT]), ([OPS], [DECRYPT])),
        domain_id=DOMAIN,
        limits=limits,
    )
    with pytest.raises(LimitExceededError, match="has 4 grants; the limit is 3"):
        validate_policy(_policy(*[([APP], [ADMIN])] * 4), domain_id=DOMAIN, limits=limits)
    with pytest.raises(LimitExceededError, match="grant 1 has 3 principals; the limit is 2"):
        validate_policy(_policy(([APP, OPS, AUDITOR], [ADMIN])), domain_id=DOMAIN, limits=limits)
    # The defaults from Limits apply without an argument.
    many = _policy(*[([APP], [ADMIN])] * (Limits().max_policy_grants + 1))
    with pytest.raises(LimitExceededError):
        validate_policy(many, domain_id=DOMAIN)


def _maximal_policy(name_chars: int = 60) -> keys_pb2.KeyPolicy:
    """What the review stored: every grant full (64 x 64 principals with long names)."""
    limits = Limits()
    number = iter(range(10**6))
    return _policy(
        *[
            (
                [
                    f"spiffe://{DOMAIN}/client/{'p' * (name_chars - 10)}{next(number):010d}"
                    for _ in range(limits.max_principals_per_grant)
                ],
                list(ALL_OPERATIONS),
            )
            for _ in range(limits.max_policy_grants)
        ]
    )


def test_a_policy_is_capped_at_32_kib_serialized() -> None:
    """Issue 21 item 7: a policy within every count limit (64 grants of 64 principals) was
    333 KB, and every HSA that used the key kept 2.37 MB of it in memory."""
    maximal = _maximal_policy()
    assert maximal.ByteSize() > 300_000
    with pytest.raises(LimitExceededError, match=r"key policy is \d+ bytes; the limit is 32768"):
        validate_policy(maximal, domain_id=DOMAIN)
    # Just over and just at the limit: the serialized size decides, whatever the counts.
    at_most = Limits().max_policy_bytes
    principals: list[str] = []

    def spread(names: list[str]) -> keys_pb2.KeyPolicy:
        grants = [names[i : i + 64] for i in range(0, len(names), 64)]
        return _policy(([APP], [ADMIN]), *[(g, [ENCRYPT]) for g in grants])

    while spread(principals).ByteSize() <= at_most:
        principals.append(f"spiffe://{DOMAIN}/client/app-{len(principals):05d}")
    over = spread(principals)
    assert len(over.grants) <= Limits().max_policy_grants
    with pytest.raises(LimitExceededError, match=f"key policy is {over.ByteSize()} bytes"):
        validate_policy(over, domain_id=DOMAIN)
    validate_policy(spread(principals[:-1]), domain_id=DOMAIN)
    with pytest.raises(LimitExceededError, match="the limit is 100 bytes"):
        validate_policy(POLICY, domain_id=DOMAIN, limits=Limits(max_policy_bytes=100))


def test_grants_share_one_set_per_distinct_operations() -> None:
    granted = _outright(_maximal_policy(20))
    assert len(granted) == 64 * 64
    assert len({id(operations) for operations in granted.values()}) == 1
