"""domain_core.transition: each invariant violation is its own error; results are exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from support.simulator import SimulatedDomain, new_host, new_operator

from domain_core import canonical, genesis, model, quorum, transition
from domain_core.errors import (
    DuplicateHostError,
    DuplicateOperatorError,
    HsmDomainError,
    InvalidSettingsError,
    LimitExceededError,
    MalformedMessageError,
    NoHostsError,
    ProposalError,
    QuorumNotMetError,
    QuorumUnreachableError,
    RotationNotDueError,
    ThresholdOutOfRangeError,
    UnknownHostError,
    UnknownOperatorError,
)
from domain_core.limits import MAX_PROPOSAL_LIFETIME_SECONDS, Limits
from domain_core.model import Proposal
from domain_core.signers import SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

ADD_HOST = domain_pb2.CHANGE_TYPE_ADD_HOST
DAY = 24 * 3600
MAX_LIFETIME = MAX_PROPOSAL_LIFETIME_SECONDS


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    """3 hosts, 3 operators, threshold 2, at genesis. Tests here never append states."""
    return SimulatedDomain.create()


def _next(
    sim: SimulatedDomain,
    changes: list[domain_pb2.Change],
    *,
    now: int | None = None,
    limits: Limits | None = None,
) -> domain_pb2.Manifest:
    """The next manifest for `changes`, approved by every current operator."""
    proposal = sim.propose(changes)
    approvals = sim.approve(proposal, sim.current_operator_indexes())
    kwargs = {"limits": limits} if limits is not None else {}
    manifest, _ = transition.next_manifest(
        sim.state_head(), proposal, approvals, now=sim.now if now is None else now, **kwargs
    )
    return manifest


def _host_like(sim: SimulatedDomain, host_id: str, **copy_from: str) -> domain_pb2.Change:
    """add-host for a fresh host `host_id`, with some fields copied from existing hosts."""
    fresh = new_host(sim.domain_id, host_id).record
    for field_name, source in copy_from.items():
        setattr(fresh, field_name, getattr(sim.hosts[source].record, field_name))
    return sim.add_host_change(host=fresh)


def _operator_named(sim: SimulatedDomain, name: str) -> domain_pb2.Change:
    return sim.add_operator_change(operator=new_operator(name).record)


def _existing_operator_renamed(sim: SimulatedDomain) -> domain_pb2.Change:
    record = domain_pb2.Operator()
    record.CopyFrom(sim.operators[0].record)
    record.name = "op0-again"
    return sim.add_operator_change(operator=record)


Changes = Callable[[SimulatedDomain], list[domain_pb2.Change]]

VIOLATIONS: list[tuple[str, Changes, type[HsmDomainError]]] = [
    (
        "remove every host",
        lambda s: [s.remove_host_change(h) for h in ("hsa-1", "hsa-2", "hsa-3")],
        NoHostsError,
    ),
    ("threshold above operators", lambda s: [s.set_quorum_change(4)], ThresholdOutOfRangeError),
    (
        "typed threshold above operators",
        lambda s: [s.set_quorum_change(4, ADD_HOST)],
        ThresholdOutOfRangeError,
    ),
    (
        "add operator, threshold above the new count",
        lambda s: [_operator_named(s, "erin"), s.set_quorum_change(5)],
        ThresholdOutOfRangeError,
    ),
    (
        "remove operators below threshold",
        lambda s: [s.remove_operator_change(1), s.remove_operator_change(2)],
        QuorumUnreachableError,
    ),
    (
        "remove operator below a typed threshold",
        lambda s: [s.set_quorum_change(3, ADD_HOST), s.remove_operator_change(2)],
        QuorumUnreachableError,
    ),
    ("duplicate host id", lambda s: [_host_like(s, "hsa-1")], DuplicateHostError),
    (
        "duplicate host signing key",
        lambda s: [_host_like(s, "hsa-8", signing_public_key="hsa-1")],
        DuplicateHostError,
    ),
    (
        "duplicate host agreement key",
        lambda s: [_host_like(s, "hsa-8", agreement_public_key="hsa-2")],
        DuplicateHostError,
    ),
    (
        "duplicate host TLS fingerprint",
        lambda s: [_host_like(s, "hsa-8", tls_certificate_fingerprint="hsa-3")],
        DuplicateHostError,
    ),
    (
        "same new host twice",
        lambda s: [s.add_host_change("hsa-20"), s.add_host_change("hsa-20")],
        DuplicateHostError,
    ),
    ("duplicate operator id", lambda s: [_existing_operator_renamed(s)], DuplicateOperatorError),
    ("duplicate operator name", lambda s: [_operator_named(s, "op1")], DuplicateOperatorError),
    ("remove unknown host", lambda s: [s.remove_host_change("hsa-77")], UnknownHostError),
    (
        "remove a host twice",
        lambda s: [s.remove_host_change("hsa-2"), s.remove_host_change("hsa-2")],
        UnknownHostError,
    ),
    (
        "remove unknown operator",
        lambda s: [s.remove_operator_change(new_operator("nobody").operator_id)],
        UnknownOperatorError,
    ),
    (
        "rotation interval too short",
        lambda s: [s.set_settings_change(key_rotation_interval_seconds=59)],
        InvalidSettingsError,
    ),
    (
        "zero generations retained",
        lambda s: [s.set_settings_change(key_generations_retained=0)],
        InvalidSettingsError,
    ),
    (
        # A rotation in the same proposal would drop the generation records are sealed under
        # before re-wrap could move them (issue 13, item 5).
        "one generation retained, with a rotation",
        lambda s: [
            s.set_settings_change(key_generations_retained=1),
            s.rotate_domain_key_change(),
        ],
        InvalidSettingsError,
    ),
    (
        "too many generations retained",
        lambda s: [s.set_settings_change(key_generations_retained=101)],
        InvalidSettingsError,
    ),
    (
        "proposal lifetime too short",
        lambda s: [s.set_settings_change(max_proposal_lifetime_seconds=59)],
        InvalidSettingsError,
    ),
    (
        "proposal lifetime too long",
        lambda s: [s.set_settings_change(max_proposal_lifetime_seconds=MAX_LIFETIME + 1)],
        InvalidSettingsError,
    ),
]


@pytest.mark.parametrize(
    ("changes", "error"),
    [pytest.param(changes, error, id=name) for name, changes, error in VIOLATIONS],
)
def test_invariant_violation(
    sim: SimulatedDomain, changes: Changes, error: type[HsmDomainError]
) -> None:
    with pytest.raises(error) as info:
        _next(sim, changes(sim))
    assert type(info.value) is error  # its own error type, not a sibling or the base


ALLOWED: list[tuple[str, Changes]] = [
    ("threshold = operators", lambda s: [s.set_quorum_change(3)]),
    ("threshold 1", lambda s: [s.set_quorum_change(1)]),
    ("remove one operator, threshold still reachable", lambda s: [s.remove_operator_change(2)]),
    (
        "lower threshold, then remove",
        lambda s: [
            s.set_quorum_change(1),
            s.remove_operator_change(1),
            s.remove_operator_change(2),
        ],
    ),
    (
        "remove, then lower threshold (checked at the end)",
        lambda s: [
            s.remove_operator_change(1),
            s.remove_operator_change(2),
            s.set_quorum_change(1),
        ],
    ),
    (
        "remove two of three hosts",
        lambda s: [s.remove_host_change("hsa-1"), s.remove_host_change("hsa-2")],
    ),
    (
        "add then remove a host",
        lambda s: [s.add_host_change("hsa-30"), s.remove_host_change("hsa-30")],
    ),
    ("typed threshold removed", lambda s: [s.set_quorum_change(0, ADD_HOST)]),
    (
        "settings at their bounds (low)",
        lambda s: [
            s.set_settings_change(
                key_rotation_interval_seconds=60,
                key_generations_retained=2,
                max_proposal_lifetime_seconds=60,
            )
        ],
    ),
    (
        "settings at their bounds (high)",
        lambda s: [
            s.set_settings_change(
                key_generations_retained=100, max_proposal_lifetime_seconds=MAX_LIFETIME
            )
        ],
    ),
]


@pytest.mark.parametrize("changes", [pytest.param(c, id=name) for name, c in ALLOWED])
def test_allowed_changes(sim: SimulatedDomain, changes: Changes) -> None:
    manifest = _next(sim, changes(sim))
    assert manifest.version == 2


def test_typed_thresholds_are_set_replaced_removed_and_kept_sorted(sim: SimulatedDomain) -> None:
    remove_host = domain_pb2.CHANGE_TYPE_REMOVE_HOST
    manifest = _next(
        sim, [sim.set_quorum_change(3, remove_host), sim.set_quorum_change(2, ADD_HOST)]
    )
    assert [(t.change_type, t.threshold) for t in manifest.quorum.change_thresholds] == [
        (ADD_HOST, 2),
        (remove_host, 3),
    ]
    assert manifest.quorum.threshold == 2
    manifest = _next(
        sim,
        [
            sim.set_quorum_change(3, remove_host),
            sim.set_quorum_change(1, remove_host),
            sim.set_quorum_change(3, ADD_HOST),
            sim.set_quorum_change(0, ADD_HOST),
        ],
    )
    assert [(t.change_type, t.threshold) for t in manifest.quorum.change_thresholds] == [
        (remove_host, 1)
    ]


def test_default_threshold_zero_cannot_even_be_proposed(sim: SimulatedDomain) -> None:
    with pytest.raises(MalformedMessageError, match="threshold of at least 1"):
        sim.propose([sim.set_quorum_change(0)])


def test_host_limit(sim: SimulatedDomain) -> None:
    with pytest.raises(LimitExceededError):
        _next(sim, [sim.add_host_change("hsa-40")], limits=Limits(max_hosts=3))
    _next(sim, [sim.add_host_change("hsa-40")], limits=Limits(max_hosts=4))


def test_operator_limit(sim: SimulatedDomain) -> None:
    change = _operator_named(sim, "frank")
    with pytest.raises(LimitExceededError):
        _next(sim, [change], limits=Limits(max_operators=3))


def test_genesis_without_threshold_is_out_of_range(sim: SimulatedDomain) -> None:
    # The empty pre-genesis state has threshold 0; a genesis that never sets one must fail.
    ops = sim.operators
    proposal = Proposal.create(
        domain_id="test",
        base_version=0,
        base_state_hash=canonical.ZERO_HASH,
        changes=[sim.add_host_change(host=sim.hosts["hsa-1"].record)]
        + [sim.add_operator_change(operator=o.record) for o in ops[:3]],
        proposer_id=ops[0].operator_id,
        created_at=sim.now,
        expires_at=sim.now + 600,
        nonce=bytes(16),
    )
    approvals = [quorum.approve(proposal, o.signer) for o in ops[:3]]
    with pytest.raises(ThresholdOutOfRangeError, match="at least 1"):
        transition.genesis_manifest(proposal, approvals, now=sim.now)


# --- rotation of the domain key -------------------------------------------------------------


def _generations(manifest: domain_pb2.Manifest) -> list[int]:
    return [g.generation for g in manifest.key_generations]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (lambda s: [s.remove_host_change("hsa-3")], [1, 2]),
        (lambda s: [s.rotate_domain_key_change()], [1, 2]),
        (lambda s: [s.remove_host_change("hsa-3"), s.rotate_domain_key_change()], [1, 2]),
        (lambda s: [s.remove_host_change("hsa-3"), s.remove_host_change("hsa-2")], [1, 2]),
        (lambda s: [s.add_host_change("hsa-50")], [1]),
        (lambda s: [s.set_quorum_change(3)], [1]),
        (lambda s: [_operator_named(s, "gina")], [1]),
    ],
    ids=["remove-host", "rotate", "both", "two removals", "add-host", "set-quorum", "add-op"],
)
def test_which_changes_add_a_generation(
    sim: SimulatedDomain, changes: Changes, expected: list[int]
) -> None:
    now = sim.now + 5
    manifest = _next(sim, changes(sim), now=now)
    assert _generations(manifest) == expected
    if len(expected) > 1:
        assert manifest.key_generations[-1].created_at == now
    assert manifest.key_generations[0] == sim.head.manifest.message.key_generations[0]


def test_generations_beyond_retained_are_dropped_oldest_first() -> None:
    settings = domain_pb2.DomainSettings(
        key_rotation_interval_seconds=DAY,
        key_generations_retained=3,
        max_proposal_lifetime_seconds=DAY,
    )
    sim = SimulatedDomain.create(settings=settings)
    history: list[dict[int, bytes]] = [sim.keys_at(sim.head, "hsa-1")]
    for expected in ([1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]):
        sim.advance(60)
        state = sim.transition([sim.rotate_domain_key_change()])
        assert _generations(state.manifest.message) == expected
        keys = sim.keys_at(state, "hsa-2")
        assert sorted(keys) == expected
        # Generations that stay keep their key; the new one is fresh.
        for generation in expected[:-1]:
            assert keys[generation] == history[-1][generation]
        assert keys[expected[-1]] not in history[-1].values()
        history.append(keys)


def test_lowering_retained_trims_at_the_next_rotation() -> None:
    sim = SimulatedDomain.create()
    for _ in range(3):
        sim.advance(60)
        sim.transition([sim.rotate_domain_key_change()])
    assert _generations(sim.head.manifest.message) == [1, 2, 3, 4]
    manifest = _next(
        sim, [sim.set_settings_change(key_generations_retained=2), sim.rotate_domain_key_change()]
    )
    assert _generations(manifest) == [4, 5]


def test_what_a_change_removes_and_retires() -> None:
    sim = SimulatedDomain.create()
    for _ in range(2):
        sim.advance(60)
        sim.transition([sim.rotate_domain_key_change()])
    before = sim.head.manifest.message
    after = _next(
        sim,
        [
            sim.remove_host_change("hsa-3"),
            sim.set_settings_change(key_generations_retained=2),
        ],
    )
    # Removing a host rotates: generations 1..3 become 3..4 with two kept.
    assert transition.removed_hosts(before, after) == {"hsa-3"}
    assert transition.retired_generations(before, after) == {1, 2}
    assert transition.removed_hosts(before, before) == frozenset()
    assert transition.retired_generations(before, before) == frozenset()


def test_apply_changes_reports_rotation_and_leaves_base_alone(sim: SimulatedDomain) -> None:
    base = sim.head.manifest.message
    before = base.SerializeToString(deterministic=True)
    proposal = sim.propose([sim.remove_host_change("hsa-2")])
    manifest, rotated = transition.apply_changes(base, proposal, now=sim.now)
    assert rotated
    assert [h.host_id for h in manifest.hosts] == ["hsa-1", "hsa-3"]
    assert base.SerializeToString(deterministic=True) == before
    _, rotated = transition.apply_changes(
        base, sim.propose([sim.set_quorum_change(3)]), now=sim.now
    )
    assert not rotated


# --- the resulting manifest ------------------------------------------------------------------


def test_next_manifest_metadata(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.add_host_change("hsa-60")], proposer=1)
    approvals = sim.approve(proposal, [1, 2])
    now = sim.now + 42
    manifest, result = transition.next_manifest(sim.state_head(), proposal, approvals, now=now)
    assert manifest.version == sim.head.version + 1
    assert manifest.previous_state_hash == sim.head.hash
    assert manifest.created_at == now
    assert manifest.proposal_id == proposal.id
    assert manifest.domain_id == "test"
    assert [h.host_id for h in manifest.hosts] == ["hsa-1", "hsa-2", "hsa-3", "hsa-60"]
    assert list(manifest.operators) == list(sim.head.manifest.message.operators)
    assert manifest.quorum == sim.head.manifest.message.quorum
    assert result.met
    assert set(result.approved_by) == {
        sim.operators[1].operator_id,
        sim.operators[2].operator_id,
    }


def test_next_manifest_is_deterministic(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.remove_host_change("hsa-3"), sim.set_quorum_change(1)])
    approvals = sim.approve(proposal, [0, 1])
    first, _ = transition.next_manifest(sim.state_head(), proposal, approvals, now=sim.now)
    second, _ = transition.next_manifest(sim.state_head(), proposal, approvals, now=sim.now)
    assert first == second
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True
    )
    sealed = sim.apply(proposal, approvals, append=False)
    assert sealed.manifest.message == first


def test_next_manifest_needs_quorum(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    with pytest.raises(QuorumNotMetError, match="1 of 2 approvals"):
        transition.next_manifest(
            sim.state_head(), proposal, sim.approve(proposal, [2]), now=sim.now
        )


def test_clock_behind_the_state_is_refused(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()], now=sim.now - 10)
    approvals = sim.approve(proposal, [0, 1])
    with pytest.raises(ProposalError, match="clock is behind"):
        transition.next_manifest(sim.state_head(), proposal, approvals, now=sim.now - 1)
    with pytest.raises(ProposalError, match="clock is behind"):
        transition.scheduled_rotation_manifest(sim.state_head(), now=sim.now - 1)


# --- scheduled rotation ----------------------------------------------------------------------


def test_scheduled_rotation_refused_before_due_and_accepted_at_due(sim: SimulatedDomain) -> None:
    due = transition.rotation_due_at(sim.head.manifest)
    assert due == sim.head.manifest.created_at + DAY
    with pytest.raises(RotationNotDueError, match="due in 1s"):
        transition.scheduled_rotation_manifest(sim.state_head(), now=due - 1)
    manifest = transition.scheduled_rotation_manifest(sim.state_head(), now=due)
    assert manifest.version == 2
    assert manifest.previous_state_hash == sim.head.hash
    assert manifest.created_at == due
    assert manifest.proposal_id == b""
    assert _generations(manifest) == [1, 2]
    assert manifest.key_generations[-1].created_at == due
    assert list(manifest.hosts) == list(sim.head.manifest.message.hosts)
    assert list(manifest.operators) == list(sim.head.manifest.message.operators)
    later = transition.scheduled_rotation_manifest(sim.state_head(), now=due + 1000)
    assert later.created_at == due + 1000


def test_scheduled_rotation_is_due_from_the_newest_generation() -> None:
    sim = SimulatedDomain.create()
    sim.advance(DAY // 2)
    sim.transition([sim.rotate_domain_key_change()])  # generation 2 at +12 h
    sim.advance(DAY // 2)  # generation 1 is a day old, generation 2 only half a day
    with pytest.raises(RotationNotDueError):
        transition.scheduled_rotation_manifest(sim.state_head(), now=sim.now)
    assert transition.rotation_due_at(sim.head.manifest) == sim.now + DAY // 2


# --- genesis ---------------------------------------------------------------------------------


def _genesis_parts(
    proposer: int = 0,
) -> tuple[SimulatedDomain, Proposal, list[domain_pb2.Approval]]:
    sim = SimulatedDomain.create()
    assert sim.ca is not None
    proposal = genesis.genesis_proposal(
        "test",
        [h.enrollment for h in sim.hosts.values()],
        [o.record for o in sim.operators[:3]],
        2,
        ca_certificate=sim.ca.certificate_der,
        proposer_id=(sim.operators[proposer] if proposer >= 0 else new_operator("x")).operator_id,
        now=sim.now,
    )
    return sim, proposal, sim.approve(proposal, [0, 1, 2])


def test_genesis_needs_every_operator() -> None:
    sim, proposal, approvals = _genesis_parts()
    manifest, result = transition.genesis_manifest(proposal, approvals, now=sim.now)
    assert result.threshold == 3
    assert result.met
    assert manifest.version == 1
    assert manifest.previous_state_hash == canonical.ZERO_HASH
    assert _generations(manifest) == [1]
    assert manifest.proposal_id == proposal.id
    assert manifest.quorum.threshold == 2
    for missing in range(3):
        partial = [a for i, a in enumerate(approvals) if i != missing]
        with pytest.raises(QuorumNotMetError, match="every operator"):
            transition.genesis_manifest(proposal, partial, now=sim.now)
    with pytest.raises(QuorumNotMetError):
        transition.genesis_manifest(
            proposal, [approvals[0], approvals[0], approvals[1]], now=sim.now
        )


def test_genesis_proposer_must_be_a_genesis_operator() -> None:
    sim, proposal, approvals = _genesis_parts(proposer=-1)
    with pytest.raises(ProposalError, match="proposer"):
        transition.genesis_manifest(proposal, approvals, now=sim.now)


def test_genesis_refuses_non_genesis_base_and_expiry() -> None:
    sim, proposal, approvals = _genesis_parts()
    with pytest.raises(ProposalError, match="expired"):
        transition.genesis_manifest(proposal, approvals, now=proposal.expires_at)
    not_genesis = sim.propose([sim.rotate_domain_key_change()])
    with pytest.raises(ProposalError, match="base version 0"):
        transition.genesis_manifest(not_genesis, sim.approve(not_genesis, [0, 1, 2]), now=sim.now)


def test_validate_settings_defaults_are_valid() -> None:
    transition.validate_settings(model.default_settings())
    weak = domain_pb2.DomainSettings()
    with pytest.raises(InvalidSettingsError):
        transition.validate_settings(weak)


def test_operator_algorithms_mix(sim: SimulatedDomain) -> None:
    algorithms = {o.signer.algorithm for o in sim.operators[:3]}
    assert algorithms == {SignatureAlgorithm.ED25519, SignatureAlgorithm.ECDSA_P256}
