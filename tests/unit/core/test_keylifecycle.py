"""domain_core.keylifecycle: which state changes a key allows, what a rotation keeps, when the
upkeep acts, and which records a domain change strands."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain_core import keylifecycle
from domain_core.errors import FailedPreconditionError, InvalidInputError, LimitExceededError
from domain_core.keylifecycle import (
    DAY_SECONDS,
    TransitionTarget,
    apply_change,
    cancel_deletion,
    deletion_due,
    needs_upkeep,
    new_key,
    put_policy,
    require_enabled,
    rotate,
    rotate_automatically,
    rotate_backing_key,
    rotation_due,
    schedule_deletion,
    set_state,
)
from domain_core.limits import MAX_BACKING_VERSIONS, Limits
from domain_core.policy import default_policy
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

DOMAIN = "prod.example"
APP = f"spiffe://{DOMAIN}/client/app"
OPS = f"spiffe://{DOMAIN}/client/ops"
KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
NOW = 1_700_000_000

ENABLED = keys_pb2.KEY_STATE_ENABLED
DISABLED = keys_pb2.KEY_STATE_DISABLED
PENDING = keys_pb2.KEY_STATE_PENDING_DELETION


def _metadata(state: keys_pb2.KeyState = ENABLED, **fields: object) -> keys_pb2.KeyMetadata:
    metadata = keys_pb2.KeyMetadata(
        key_id=KEY_ID,
        state=state,
        current_backing_version=1,
        metadata_version=4,
        domain_id=DOMAIN,
        policy=default_policy(APP),
    )
    if state == PENDING:
        metadata.deletion_at = NOW + 7 * DAY_SECONDS
    for name, value in fields.items():
        if isinstance(value, keys_pb2.RotationSettings):
            getattr(metadata, name).CopyFrom(value)
        else:
            setattr(metadata, name, value)
    return metadata


def _record(*generations: int, signer: str = "hsa-1") -> keys_pb2.KeyRecord:
    return keys_pb2.KeyRecord(
        metadata=_metadata().SerializeToString(),
        signer_host_id=signer,
        tokens=[
            keys_pb2.KeyToken(key_id=KEY_ID, backing_version=i + 1, domain_key_generation=g)
            for i, g in enumerate(generations)
        ],
    )


# --- using a key ---------------------------------------------------------------------------


def test_only_an_enabled_key_may_be_used_and_the_refusal_says_how_to_use_it_again() -> None:
    require_enabled(_metadata(ENABLED))
    with pytest.raises(FailedPreconditionError, match="disabled; enable it with EnableKey"):
        require_enabled(_metadata(DISABLED))
    with pytest.raises(
        FailedPreconditionError,
        match=r"pending deletion \(deletion on 2023-11-21T22:13:20Z\); cancel the deletion",
    ):
        require_enabled(_metadata(PENDING))
    with pytest.raises(FailedPreconditionError, match=r"unknown state \(0\)"):
        require_enabled(_metadata(keys_pb2.KEY_STATE_UNSPECIFIED))


# --- the state machine, as a table ---------------------------------------------------------

StateChange = Callable[[keys_pb2.KeyMetadata], bool]
CHANGES: dict[str, StateChange] = {
    "enable": lambda m: set_state(m, ENABLED),
    "disable": lambda m: set_state(m, DISABLED),
    "schedule": lambda m: schedule_deletion(m, 7, NOW),
    "cancel": cancel_deletion,
}
STATES = (ENABLED, DISABLED, PENDING)


def _change(name: str) -> keylifecycle.KeyChange:
    return lambda metadata, _keys, _now: CHANGES[name](metadata)


# (state before, change, state after; None: nothing changes)
ALLOWED: list[tuple[keys_pb2.KeyState, str, keys_pb2.KeyState | None]] = [
    (ENABLED, "enable", None),
    (DISABLED, "enable", ENABLED),
    (ENABLED, "disable", DISABLED),
    (DISABLED, "disable", None),
    (ENABLED, "schedule", PENDING),
    (DISABLED, "schedule", PENDING),
    (PENDING, "cancel", DISABLED),
]
# (state before, change, what the refusal says)
REFUSED: list[tuple[keys_pb2.KeyState, str, str]] = [
    (PENDING, "enable", "cancel the deletion first"),
    (PENDING, "disable", "cancel the deletion first"),
    (PENDING, "schedule", "its deletion is scheduled already"),
    (ENABLED, "cancel", "is not pending deletion"),
    (DISABLED, "cancel", "is not pending deletion"),
]


def test_the_tables_cover_every_state_and_change_once() -> None:
    allowed = {(before, change) for before, change, _ in ALLOWED}
    refused = {(before, change) for before, change, _ in REFUSED}
    assert not allowed & refused
    assert allowed | refused == {(state, change) for state in STATES for change in CHANGES}


@pytest.mark.parametrize(("before", "change", "after"), ALLOWED)
def test_the_state_of_a_key_moves_only_along_its_edges(
    before: keys_pb2.KeyState, change: str, after: keys_pb2.KeyState | None
) -> None:
    current = _metadata(before)
    changed = apply_change(current, {1: b"k" * 32}, _change(change), NOW)
    assert current == _metadata(before), "the input is never modified"
    if after is None:
        assert changed is None
        return
    assert changed is not None
    metadata, keys = changed
    assert metadata.state == after
    assert metadata.metadata_version == current.metadata_version + 1
    assert keys == {1: b"k" * 32}


@pytest.mark.parametrize(("before", "change", "refusal"), REFUSED)
def test_every_other_edge_is_refused_as_failed_precondition_naming_the_key(
    before: keys_pb2.KeyState, change: str, refusal: str
) -> None:
    current = _metadata(before)
    with pytest.raises(FailedPreconditionError, match=refusal) as raised:
        apply_change(current, {}, _change(change), NOW)
    assert KEY_ID in raised.value.message
    assert current == _metadata(before)


def test_scheduling_a_deletion_sets_its_date_within_7_to_30_days() -> None:
    metadata = _metadata(ENABLED)
    assert schedule_deletion(metadata, 30, NOW)
    assert (metadata.state, metadata.deletion_at) == (PENDING, NOW + 30 * DAY_SECONDS)
    for days in (6, 31, 0, -1):
        untouched = _metadata(ENABLED)
        with pytest.raises(InvalidInputError, match="between 7 and 30, not"):
            schedule_deletion(untouched, days, NOW)
        assert untouched == _metadata(ENABLED)


def test_the_window_is_checked_before_the_state_so_a_bad_window_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError):
        schedule_deletion(_metadata(PENDING), 99, NOW)


def test_cancelling_a_deletion_clears_its_date_and_leaves_the_key_disabled() -> None:
    metadata = _metadata(PENDING)
    assert cancel_deletion(metadata)
    assert (metadata.state, metadata.deletion_at) == (DISABLED, 0)


# --- policies ------------------------------------------------------------------------------


def test_a_policy_change_is_validated_and_a_same_policy_changes_nothing() -> None:
    metadata = _metadata()
    assert not put_policy(metadata, default_policy(APP), domain_id=DOMAIN)
    assert put_policy(metadata, default_policy(OPS), domain_id=DOMAIN)
    assert metadata.policy == default_policy(OPS)
    with pytest.raises(InvalidInputError, match="policy is empty"):
        put_policy(metadata, None, domain_id=DOMAIN)
    # a policy of another domain's principals, or one that locks the key, never goes in
    with pytest.raises(InvalidInputError):
        put_policy(metadata, default_policy("spiffe://other/client/app"), domain_id=DOMAIN)
    no_admin = keys_pb2.KeyPolicy(
        grants=[keys_pb2.PolicyGrant(principals=[APP], operations=[keys_pb2.KEY_OPERATION_ENCRYPT])]
    )
    with pytest.raises(InvalidInputError):
        put_policy(metadata, no_admin, domain_id=DOMAIN)
    assert metadata.policy == default_policy(OPS)


# --- rotation ------------------------------------------------------------------------------


def test_a_rotation_adds_a_fresh_version_and_keeps_every_older_one() -> None:
    current = _metadata(rotation=keys_pb2.RotationSettings(enabled=True, period_days=90))
    current.rotation.next_rotation_at = NOW - 1
    keys = {1: b"\x01" * 32}
    changed = apply_change(current, keys, rotate, NOW)
    assert changed is not None
    metadata, rotated = changed
    assert metadata.current_backing_version == 2
    assert rotated[1] == keys[1]
    assert len(rotated[2]) == 32
    assert rotated[2] != keys[1]
    assert keys == {1: b"\x01" * 32}, "the input is never modified"
    # on demand: the schedule stays where it was
    assert metadata.rotation.next_rotation_at == NOW - 1


def test_an_automatic_rotation_moves_the_schedule_one_period_on() -> None:
    current = _metadata(rotation=keys_pb2.RotationSettings(enabled=True, period_days=90))
    current.rotation.next_rotation_at = NOW - 1
    metadata, keys = rotate_automatically(current, {1: b"\x01" * 32}, NOW)
    assert metadata.rotation.next_rotation_at == NOW + 90 * DAY_SECONDS
    assert (metadata.current_backing_version, sorted(keys)) == (2, [1, 2])
    assert metadata.metadata_version == current.metadata_version + 1
    assert current.current_backing_version == 1


@pytest.mark.parametrize("state", [DISABLED, PENDING])
def test_only_an_enabled_key_rotates(state: keys_pb2.KeyState) -> None:
    keys = {1: b"\x01" * 32}
    with pytest.raises(FailedPreconditionError):
        rotate_backing_key(_metadata(state), keys, NOW)
    assert keys == {1: b"\x01" * 32}


def test_a_key_holds_at_most_max_backing_versions() -> None:
    metadata = _metadata(current_backing_version=MAX_BACKING_VERSIONS)
    keys: dict[int, bytes] = {}
    with pytest.raises(FailedPreconditionError, match="create a new key and re-encrypt"):
        rotate_backing_key(metadata, keys, NOW)
    assert keys == {}
    assert metadata.current_backing_version == MAX_BACKING_VERSIONS


# --- a new key -----------------------------------------------------------------------------


def test_a_new_key_without_a_policy_belongs_to_its_creator_alone() -> None:
    key = new_key(
        description="orders",
        key_policy=None,
        enable_rotation=True,
        rotation_period_days=0,
        creator=APP,
        domain_id=DOMAIN,
    )
    metadata = key.metadata(KEY_ID, NOW)
    assert metadata.policy == default_policy(APP)
    assert (metadata.state, metadata.current_backing_version, metadata.metadata_version) == (
        ENABLED,
        1,
        1,
    )
    assert (metadata.creator, metadata.domain_id, metadata.created_at) == (APP, DOMAIN, NOW)
    assert metadata.rotation.period_days == keylifecycle.DEFAULT_ROTATION_PERIOD_DAYS
    assert metadata.rotation.next_rotation_at == NOW + 365 * DAY_SECONDS
    assert new_key(
        description="",
        key_policy=keys_pb2.KeyPolicy(),  # no grants: the default too
        enable_rotation=False,
        rotation_period_days=90,
        creator=OPS,
        domain_id=DOMAIN,
    ).metadata(KEY_ID, NOW).rotation == keys_pb2.RotationSettings(enabled=False, period_days=90)


def test_a_new_key_is_checked_in_order_description_policy_period() -> None:
    def ask(
        description: str = "", key_policy: keys_pb2.KeyPolicy | None = None, period: int = 0
    ) -> keylifecycle.NewKey:
        return new_key(
            description=description,
            key_policy=key_policy,
            enable_rotation=False,
            rotation_period_days=period,
            creator=APP,
            domain_id=DOMAIN,
            limits=Limits(max_key_description_chars=10),
        )

    foreign = default_policy("spiffe://other/client/app")
    with pytest.raises(LimitExceededError, match="description is 11 characters; the limit is 10"):
        ask("x" * 11, foreign, 5)
    with pytest.raises(InvalidInputError, match="other"):
        ask("", foreign, 5)
    for period in (89, 2561, -1):
        with pytest.raises(InvalidInputError, match="between 90 and 2560"):
            ask(period=period)
    assert ask(period=2560).rotation_period_days == 2560


# --- upkeep --------------------------------------------------------------------------------


def test_deletion_and_rotation_fall_due_at_their_dates_only() -> None:
    pending = _metadata(PENDING)
    assert not deletion_due(pending, pending.deletion_at - 1)
    assert deletion_due(pending, pending.deletion_at)
    assert not deletion_due(_metadata(DISABLED), NOW + 10**9)
    rotating = _metadata(rotation=keys_pb2.RotationSettings(enabled=True, next_rotation_at=NOW))
    assert not rotation_due(rotating, NOW - 1)
    assert rotation_due(rotating, NOW)
    rotating.rotation.enabled = False
    assert not rotation_due(rotating, NOW)
    unscheduled = _metadata(rotation=keys_pb2.RotationSettings(enabled=True))
    assert not rotation_due(unscheduled, NOW), "next_rotation_at 0 is no schedule"
    disabled = _metadata(DISABLED, rotation=rotating.rotation)
    disabled.rotation.enabled = True
    assert not rotation_due(disabled, NOW), "a disabled key does not rotate"


def test_the_upkeep_looks_closer_only_at_old_tokens_or_due_dates() -> None:
    fresh = _metadata()
    assert not needs_upkeep(_record(3, 3), fresh, 3, NOW)
    assert needs_upkeep(_record(3, 2), fresh, 3, NOW), "a token under an older generation"
    assert not needs_upkeep(_record(4), fresh, 3, NOW), "a newer generation is not ours to move"
    pending = _metadata(PENDING)
    assert not needs_upkeep(_record(3), pending, 3, pending.deletion_at - 1)
    assert needs_upkeep(_record(3), pending, 3, pending.deletion_at)
    due = _metadata(rotation=keys_pb2.RotationSettings(enabled=True, next_rotation_at=NOW))
    assert needs_upkeep(_record(3), due, 3, NOW)


def test_a_change_strands_records_of_removed_signers_and_retired_generations() -> None:
    nothing = TransitionTarget()
    assert not nothing
    assert not nothing.strands(_record(1, signer="hsa-2"))
    removal = TransitionTarget(removed_hosts=frozenset({"hsa-2"}))
    assert removal.strands(_record(5, signer="hsa-2"))
    assert not removal.strands(_record(5, signer="hsa-1"))
    retirement = TransitionTarget(retired_generations=frozenset({1}))
    assert retirement.strands(_record(2, 1, 2))
    assert not retirement.strands(_record(2, 3))


@given(st.integers(min_value=0, max_value=2**31), st.integers(min_value=1, max_value=999))
def test_every_change_that_changes_something_bumps_the_metadata_version_by_one(
    version: int, backing: int
) -> None:
    current = _metadata(metadata_version=version, current_backing_version=backing)
    changed = apply_change(current, {}, rotate, NOW)
    assert changed is not None
    assert changed[0].metadata_version == version + 1
    assert current.metadata_version == version
