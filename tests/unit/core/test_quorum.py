"""domain_core.quorum: only distinct current operators' valid approvals of this proposal count."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.simulator import SimulatedDomain, new_operator

from domain_core import quorum, transition
from domain_core.errors import (
    HsmDomainError,
    MalformedMessageError,
    ProposalExpiredError,
    QuorumNotMetError,
    QuorumUnreachableError,
    StaleProposalError,
    WrongDomainError,
)
from domain_core.model import Proposal, change_type_name, operator_public_key
from domain_core.signers import SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

ADD_HOST = domain_pb2.CHANGE_TYPE_ADD_HOST
REMOVE_HOST = domain_pb2.CHANGE_TYPE_REMOVE_HOST
ADD_OPERATOR = domain_pb2.CHANGE_TYPE_ADD_OPERATOR
SET_QUORUM = domain_pb2.CHANGE_TYPE_SET_QUORUM

# --- keys and approvals, made once per module ------------------------------------------------

SIM = SimulatedDomain.create(operators=5, threshold=3)
OPS = SIM.operators  # op0..op4, Ed25519 and ECDSA P-256 alternating
OUTSIDER = new_operator("mallory", SignatureAlgorithm.ECDSA_P256)
OTHER_DOMAIN = SimulatedDomain.create(domain_id="other", operators=1, threshold=1)

PROPOSAL = SIM.propose([SIM.rotate_domain_key_change()])
OTHER_PROPOSAL = SIM.propose([SIM.rotate_domain_key_change()])  # same content, other nonce
FOREIGN_PROPOSAL = Proposal.create(
    domain_id="other",
    base_version=PROPOSAL.base_version,
    base_state_hash=PROPOSAL.base_state_hash,
    changes=PROPOSAL.changes,
    proposer_id=PROPOSAL.proposer_id,
    created_at=PROPOSAL.created_at,
    expires_at=PROPOSAL.expires_at,
    nonce=PROPOSAL.message.nonce,
)

VALID = [quorum.approve(PROPOSAL, o.signer) for o in OPS]
OVER_OTHER = [quorum.approve(OTHER_PROPOSAL, o.signer) for o in OPS]
OVER_FOREIGN = [quorum.approve(FOREIGN_PROPOSAL, o.signer) for o in OPS]


def _approval(operator_id: str, proposal_id: bytes, signature: bytes) -> domain_pb2.Approval:
    return domain_pb2.Approval(
        proposal_id=proposal_id, operator_id=operator_id, signature=signature
    )


def _kind(spec: tuple[object, ...]) -> domain_pb2.Approval:
    """Build one approval from a table token."""
    kind = spec[0]
    i = int(spec[1]) if len(spec) > 1 else 0  # type: ignore[call-overload]
    op = OPS[i]
    if kind == "ok":
        return VALID[i]
    if kind == "outsider":  # a valid signature by a key that is no operator
        return quorum.approve(PROPOSAL, OUTSIDER.signer)
    if kind == "other-proposal":  # op signed another proposal; moved onto this one
        return _approval(op.operator_id, PROPOSAL.id, OVER_OTHER[i].signature)
    if kind == "other-proposal-as-is":  # op's approval of another proposal, unchanged
        return OVER_OTHER[i]
    if kind == "other-domain":  # op signed the same proposal for another domain
        return _approval(op.operator_id, PROPOSAL.id, OVER_FOREIGN[i].signature)
    if kind == "moved":  # signature bytes of op i's valid approval, attributed to op j
        j = int(spec[2])  # type: ignore[call-overload]
        return _approval(OPS[j].operator_id, PROPOSAL.id, VALID[i].signature)
    if kind == "cancel":  # op signed a cancel of this proposal, not an approval
        return _approval(
            op.operator_id, PROPOSAL.id, op.signer.sign(quorum.cancel_message(PROPOSAL.id))
        )
    if kind == "id-mismatch":  # valid signature over this proposal, but the id field lies
        return _approval(op.operator_id, OTHER_PROPOSAL.id, VALID[i].signature)
    if kind == "garbage":
        return _approval(op.operator_id, PROPOSAL.id, b"\x00" * 64)
    if kind == "empty":
        return _approval(op.operator_id, PROPOSAL.id, b"")
    if kind == "other-domain-operator":  # an operator of another domain
        return quorum.approve(PROPOSAL, OTHER_DOMAIN.operators[0].signer)
    raise AssertionError(f"unknown token {spec}")


def _count(
    approvals: Sequence[domain_pb2.Approval], threshold: int, n_operators: int = 5
) -> quorum.QuorumResult:
    operators = [o.record for o in OPS[:n_operators]]
    keys = {o.operator_id: operator_public_key(o) for o in operators}
    return quorum.count_approvals(operators, keys, PROPOSAL.id, approvals, threshold)


# --- table-driven cases ----------------------------------------------------------------------

Token = tuple[object, ...]
CASES: list[tuple[str, int, int, list[Token], int]] = [
    # (name, operators, threshold, approvals, expected count)
    ("exactly M", 3, 2, [("ok", 0), ("ok", 1)], 2),
    ("other M", 3, 2, [("ok", 2), ("ok", 0)], 2),
    ("all", 5, 5, [("ok", i) for i in range(5)], 5),
    ("M-1", 3, 2, [("ok", 1)], 1),
    ("none", 3, 1, [], 0),
    ("M-1 of 5", 5, 3, [("ok", 3), ("ok", 4)], 2),
    ("duplicate counts once", 3, 2, [("ok", 0), ("ok", 0)], 1),
    ("triple and one", 3, 2, [("ok", 0), ("ok", 0), ("ok", 0), ("ok", 1)], 2),
    ("outsider", 3, 2, [("ok", 0), ("outsider",)], 1),
    ("other domain's operator", 3, 2, [("ok", 0), ("other-domain-operator",)], 1),
    ("operator beyond this set", 2, 2, [("ok", 0), ("ok", 2)], 1),
    ("signature over other proposal", 3, 2, [("ok", 0), ("other-proposal", 1)], 1),
    ("approval of other proposal", 3, 2, [("ok", 0), ("other-proposal-as-is", 1)], 1),
    ("signature over other domain", 3, 2, [("ok", 0), ("other-domain", 1)], 1),
    ("signature moved to other op", 3, 2, [("ok", 0), ("moved", 0, 1)], 1),
    ("moved ecdsa to ed25519 op", 3, 2, [("ok", 2), ("moved", 1, 0)], 1),
    ("cancel is not approve", 3, 2, [("ok", 0), ("cancel", 1)], 1),
    ("id field lies", 3, 2, [("ok", 0), ("id-mismatch", 1)], 1),
    ("garbage signature", 3, 2, [("ok", 0), ("garbage", 1)], 1),
    ("empty signature", 3, 2, [("ok", 0), ("empty", 1)], 1),
    ("forgery before real one", 3, 2, [("garbage", 0), ("ok", 0), ("ok", 1)], 2),
    ("forgeries only", 3, 1, [("garbage", 0), ("moved", 0, 1), ("other-domain", 2)], 0),
    (
        "many forgeries, M real",
        5,
        3,
        [("outsider",), ("ok", 4), ("moved", 4, 3), ("ok", 1), ("cancel", 2), ("ok", 2)],
        3,
    ),
]


@pytest.mark.parametrize(
    ("n_operators", "threshold", "tokens", "expected"),
    [pytest.param(n, m, tokens, expected, id=name) for name, n, m, tokens, expected in CASES],
)
def test_quorum_table(n_operators: int, threshold: int, tokens: list[Token], expected: int) -> None:
    approvals = [_kind(t) for t in tokens]
    result = _count(approvals, threshold, n_operators)
    assert len(result.approved_by) == expected
    assert result.met is (expected >= threshold)
    assert result.needed == max(0, threshold - expected)
    assert result.threshold == threshold
    current = [o.operator_id for o in OPS[:n_operators]]
    assert set(result.approved_by) | set(result.missing) == set(current)
    assert not set(result.approved_by) & set(result.missing)
    # Ordered by the operator list, never by the submitted approvals.
    assert list(result.approved_by) == [o for o in current if o in result.approved_by]
    assert result.describe() == f"{expected} of {threshold} approvals"


def test_rejections_are_reported() -> None:
    result = _count([_kind(("outsider",)), _kind(("ok", 0)), _kind(("ok", 0))], 2)
    reasons = dict(result.rejected)
    assert reasons[OUTSIDER.operator_id] == "not an operator of this domain state"
    assert reasons[OPS[0].operator_id] == "duplicate approval ignored"
    result = _count([_kind(("id-mismatch", 1))], 1)
    assert result.rejected == ((OPS[1].operator_id, "the approval is for another proposal"),)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_any_m_distinct_operators_pass_and_m_minus_1_fail(m: int) -> None:
    rng = random.Random(m)
    for _ in range(5):
        chosen = rng.sample(range(5), m)
        assert _count([VALID[i] for i in chosen], m).met
        assert not _count([VALID[i] for i in chosen[:-1]], m).met


# --- votes to cancel: the same count, over the cancel message ---------------------------------

CANCELS = [quorum.cancel(PROPOSAL.id, o.signer) for o in OPS]


def _vote(spec: tuple[object, ...]) -> domain_pb2.CancelVote:
    kind = spec[0]
    i = int(spec[1]) if len(spec) > 1 else 0  # type: ignore[call-overload]
    if kind == "ok":
        return CANCELS[i]
    if kind == "approval":  # op's approval signature presented as a vote to cancel
        return domain_pb2.CancelVote(
            proposal_id=PROPOSAL.id, operator_id=OPS[i].operator_id, signature=VALID[i].signature
        )
    if kind == "other-proposal":  # op's vote to cancel another proposal, moved onto this one
        other = quorum.cancel(OTHER_PROPOSAL.id, OPS[i].signer)
        return domain_pb2.CancelVote(
            proposal_id=PROPOSAL.id, operator_id=OPS[i].operator_id, signature=other.signature
        )
    if kind == "other-proposal-as-is":
        return quorum.cancel(OTHER_PROPOSAL.id, OPS[i].signer)
    if kind == "outsider":
        return quorum.cancel(PROPOSAL.id, OUTSIDER.signer)
    raise AssertionError(f"unknown token {spec}")


CANCEL_CASES: list[tuple[str, int, int, list[Token], int]] = [
    # (name, operators, threshold, votes, expected count)
    ("two votes", 3, 2, [("ok", 1), ("ok", 2)], 2),
    ("one vote", 3, 2, [("ok", 1)], 1),
    ("duplicate vote counts once", 3, 2, [("ok", 1), ("ok", 1)], 1),
    ("approval is not a vote", 3, 2, [("ok", 1), ("approval", 2)], 1),
    ("vote moved from another proposal", 3, 2, [("ok", 1), ("other-proposal", 2)], 1),
    ("vote for another proposal", 3, 2, [("ok", 1), ("other-proposal-as-is", 2)], 1),
    ("outsider", 3, 2, [("ok", 1), ("outsider",)], 1),
    ("removed operator (beyond this set)", 2, 2, [("ok", 1), ("ok", 2)], 1),
]


@pytest.mark.parametrize(
    ("n_operators", "threshold", "tokens", "expected"),
    [pytest.param(n, m, t, e, id=name) for name, n, m, t, e in CANCEL_CASES],
)
def test_cancel_vote_table(
    n_operators: int, threshold: int, tokens: list[Token], expected: int
) -> None:
    operators = [o.record for o in OPS[:n_operators]]
    keys = {o.operator_id: operator_public_key(o) for o in operators}
    votes = [_vote(t) for t in tokens]
    result = quorum.count_cancel_votes(operators, keys, PROPOSAL.id, votes, threshold)
    assert len(result.approved_by) == expected
    assert result.met is (expected >= threshold)
    assert result.describe("votes to cancel") == f"{expected} of {threshold} votes to cancel"


def test_cancel_votes_need_the_proposals_threshold() -> None:
    sim = SimulatedDomain.create(
        operators=3,
        threshold=2,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
    )
    proposal = sim.propose([sim.remove_host_change("hsa-3")])
    votes = [quorum.cancel(proposal.id, sim.operators[i].signer) for i in (1, 2)]
    result = quorum.evaluate_cancel(sim.head.manifest, proposal, votes)
    assert (len(result.approved_by), result.threshold, result.met) == (2, 3, False)
    assert result.reason == "3: the remove-host threshold"


# --- removed operators -----------------------------------------------------------------------


def test_approval_from_removed_operator_does_not_count() -> None:
    sim = SimulatedDomain.create()  # 3 operators, threshold 2
    v1 = sim.head
    sim.transition([sim.remove_operator_change(2)], approvers=[0, 1])
    v2 = sim.head
    proposal = sim.propose([sim.rotate_domain_key_change()])
    approvals = sim.approve(proposal, [0, 2])
    # op2's signature is valid and would count under the old operator set ...
    assert len(quorum.evaluate(v1.manifest, proposal, approvals).approved_by) == 2
    # ... but op2 is not an operator of the state the proposal applies to.
    result = quorum.evaluate(v2.manifest, proposal, approvals)
    assert result.approved_by == (sim.operators[0].operator_id,)
    assert not result.met
    with pytest.raises(QuorumNotMetError, match="1 of 2 approvals"):
        quorum.verify_quorum(v2.manifest, v2.hash, proposal, approvals, now=sim.now)


# --- hypothesis properties ------------------------------------------------------------------

FORGERY_TOKENS: list[Token] = [
    ("outsider",),
    ("other-domain-operator",),
    *[
        (k, i)
        for k in ("other-proposal", "other-domain", "cancel", "id-mismatch", "garbage")
        for i in range(5)
    ],
    *[("moved", i, j) for i in range(5) for j in range(5) if i != j],
]
FORGERIES = [_kind(t) for t in FORGERY_TOKENS]


@settings(max_examples=100, deadline=None)
@given(
    valid=st.lists(st.integers(min_value=0, max_value=4), max_size=8),
    forged=st.lists(st.sampled_from(range(len(FORGERIES))), max_size=6),
    threshold=st.integers(min_value=1, max_value=5),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_count_is_distinct_valid_current_operators(
    valid: list[int], forged: list[int], threshold: int, seed: int
) -> None:
    approvals = [VALID[i] for i in valid] + [FORGERIES[f] for f in forged]
    random.Random(seed).shuffle(approvals)
    result = _count(approvals, threshold)
    expected = {OPS[i].operator_id for i in valid}
    assert set(result.approved_by) == expected
    assert len(result.approved_by) == len(expected)
    assert result.met is (len(expected) >= threshold)


@settings(max_examples=50, deadline=None)
@given(
    valid=st.sets(st.integers(min_value=0, max_value=4)),
    forged=st.lists(st.sampled_from(range(len(FORGERIES))), min_size=1, max_size=6),
)
def test_forgeries_never_add_and_order_never_matters(valid: set[int], forged: list[int]) -> None:
    honest = [VALID[i] for i in sorted(valid)]
    base = _count(honest, 1)
    mixed = honest + [FORGERIES[f] for f in forged]
    assert set(_count(mixed, 1).approved_by) == set(base.approved_by)
    assert _count(list(reversed(mixed)), 1).approved_by == base.approved_by


# --- the threshold a proposal needs (the rule against walk-arounds) ----------------------------

REMOVE_OPERATOR = domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR
_TYPES = {
    "add-host": ADD_HOST,
    "remove-host": REMOVE_HOST,
    "add-operator": ADD_OPERATOR,
    "remove-operator": REMOVE_OPERATOR,
    "set-quorum": SET_QUORUM,
}


def _policy(default: int, **typed: int) -> domain_pb2.QuorumPolicy:
    """A policy from a table row: `remove_host=3` is remove-host's own threshold."""
    types = {name.replace("_", "-"): value for name, value in typed.items()}
    return domain_pb2.QuorumPolicy(
        threshold=default,
        change_thresholds=[
            domain_pb2.ChangeThreshold(change_type=_TYPES[k], threshold=v)
            for k, v in sorted(types.items(), key=lambda kv: _TYPES[kv[0]])
        ],
    )


def _c(token: str) -> domain_pb2.Change:
    """One change from a table token: "set-quorum remove-host=2", "set-quorum 3", ..."""
    kind, _, argument = token.partition(" ")
    if kind == "set-quorum":
        target, _, value = argument.rpartition("=")
        return SIM.set_quorum_change(int(value or argument), _TYPES[target] if target else 0)
    if kind == "add-operator":
        return domain_pb2.Change(add_operator=domain_pb2.AddOperator(operator=OUTSIDER.record))
    if kind == "remove-operator":
        return SIM.remove_operator_change(OPS[4].operator_id)
    if kind == "remove-host":
        return SIM.remove_host_change("hsa-3")
    if kind == "add-host":
        return SIM.add_host_change(enrollment=SIM.hosts["hsa-1"].enrollment)
    if kind == "set-settings":
        return SIM.set_settings_change(key_generations_retained=5)
    if kind == "rotate":
        return SIM.rotate_domain_key_change()
    raise AssertionError(f"unknown token {token}")


GOVERNANCE = "change who may approve or how many approvals are needed"
THRESHOLD_CASES: list[tuple[str, domain_pb2.QuorumPolicy, list[str], int, str]] = [
    # (name, current policy, changes, threshold, reason)
    ("plain change: default", _policy(2), ["rotate"], 2, "2: the default threshold"),
    ("untyped change", _policy(2, remove_host=3), ["add-host"], 2, "2: the default threshold"),
    ("typed change", _policy(2, remove_host=3), ["remove-host"], 3, "3: the remove-host threshold"),
    ("mixed plain", _policy(2, remove_host=3), ["add-host", "remove-host"], 3,
     "3: the remove-host threshold"),
    ("a type threshold never lowers", _policy(3, add_host=1), ["add-host"], 3,
     "3: the default threshold"),
    ("tie of default and type", _policy(3, add_host=3), ["add-host"], 3,
     "3: the default, add-host thresholds"),
    ("settings are not governance", _policy(2, remove_host=3), ["set-settings"], 2,
     "2: the default threshold"),
    # Walk-around 1 of issue 13: two approvals lower remove-host's threshold.
    ("lower a type threshold", _policy(2, remove_host=3), ["set-quorum remove-host=2"], 3,
     "3: the highest threshold in the current policy (remove-host), because set-quorum "
     "changes who may approve or how many approvals are needed"),
    ("drop a type threshold", _policy(2, remove_host=3), ["set-quorum remove-host=0"], 3,
     "3: the highest threshold in the current policy (remove-host), because set-quorum"),
    ("lower it and use it at once", _policy(2, remove_host=3),
     ["set-quorum remove-host=2", "remove-host"], 3, "in the current policy (remove-host)"),
    # Walk-around 2 of issue 13: two approvals add a puppet whose approval makes the third.
    ("add a puppet operator", _policy(2, remove_host=3), ["add-operator"], 3,
     "3: the highest threshold in the policy (remove-host), because add-operator changes"),
    ("add a puppet and remove", _policy(2, remove_host=3), ["add-operator", "remove-host"], 3,
     "3: the highest threshold in the policy (remove-host)"),
    ("shrink the operator set", _policy(2, remove_host=3), ["remove-operator"], 3,
     "3: the highest threshold in the policy (remove-host), because remove-operator"),
    ("lower the default while a type stays", _policy(2, remove_host=3), ["set-quorum 1"], 3,
     "in the policy (remove-host)"),
    ("a typed governance threshold is no way around", _policy(2, remove_host=3, add_operator=1),
     ["add-operator"], 3, "in the policy (remove-host)"),
    ("set-quorum's own threshold", _policy(2, set_quorum=3), ["set-quorum 1"], 3,
     "in the policy (set-quorum)"),
    # Raising a threshold needs the new one: two of three cannot hand the third a veto.
    ("raise the default", _policy(2), ["set-quorum 3"], 3,
     "3: the highest threshold in the policy this proposal sets (default), because set-quorum"),
    ("raise a type", _policy(2), ["set-quorum remove-host=3"], 3,
     "in the policy this proposal sets (remove-host)"),
    ("raise to the current highest", _policy(2, remove_host=3), ["set-quorum 3"], 3,
     "in the policy (remove-host)"),
    ("several governance changes", _policy(2), ["add-operator", "remove-operator"], 2,
     "2: the highest threshold in the policy (default), because add-operator and "
     f"remove-operator {GOVERNANCE}"),
    ("add and raise past the operators", _policy(2, remove_host=3),
     ["add-operator", "set-quorum remove-host=4"], 4,
     "in the policy this proposal sets (remove-host)"),
    ("governance with a plain change", _policy(1),
     ["rotate", "set-quorum add-host=2"], 2, "in the policy this proposal sets (add-host)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "tokens", "expected", "reason"),
    [pytest.param(p, t, e, r, id=name) for name, p, t, e, r in THRESHOLD_CASES],
)
def test_required_threshold_table(
    policy: domain_pb2.QuorumPolicy, tokens: list[str], expected: int, reason: str
) -> None:
    need = quorum.required_threshold(policy, [_c(t) for t in tokens])
    assert need.threshold == expected
    assert need.reason.startswith(f"{expected}: "), need.reason
    assert reason in need.reason, need.reason


def test_policy_after_is_what_the_transition_makes() -> None:
    """The "new policy" the rule looks at is exactly the policy the transition writes."""
    sim = SimulatedDomain.create(
        operators=4,
        threshold=2,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
    )
    changes = [
        sim.set_quorum_change(3),
        sim.set_quorum_change(2, REMOVE_HOST),
        sim.set_quorum_change(4, ADD_HOST),
        sim.set_quorum_change(0, ADD_HOST),
        sim.set_quorum_change(4, SET_QUORUM),
    ]
    proposal = sim.propose(changes)
    after = quorum.policy_after(sim.head.manifest.message.quorum, proposal.changes)
    made, _ = transition.apply_changes(sim.head.manifest.message, proposal, now=sim.now)
    assert after == made.quorum


# Walk-arounds tried as an attacker would: two colluding operators of three (default 2,
# remove-host 3) search every sequence of up to three proposals of up to two changes each
# that they alone can get applied (their own approvals, and those of any operator they
# added), looking for one that removes a host.


def _search_for_removal_with_two(depth: int) -> tuple[list[list[list[str]]], int]:
    """Every sequence found that removes a host, and how many proposals could be applied."""
    sim = SimulatedDomain.create(
        operators=3,
        threshold=2,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
    )
    victim = sim.operators[2].operator_id  # the honest operator
    puppets = [new_operator(f"puppet{i}", SignatureAlgorithm.ED25519) for i in range(2)]
    colluders = {sim.operators[0].operator_id, sim.operators[1].operator_id}
    colluders |= {p.operator_id for p in puppets}
    singles: dict[str, domain_pb2.Change] = {"remove-host": sim.remove_host_change("hsa-3")}
    for value in (1, 2, 3):
        singles[f"set-quorum {value}"] = sim.set_quorum_change(value)
    for kind in (REMOVE_HOST, ADD_OPERATOR, REMOVE_OPERATOR, SET_QUORUM):
        for value in (0, 1, 2, 3):
            label = f"set-quorum {change_type_name(kind)}={value}"
            singles[label] = sim.set_quorum_change(value, kind)
    for puppet in puppets:
        singles[f"add {puppet.name}"] = domain_pb2.Change(
            add_operator=domain_pb2.AddOperator(operator=puppet.record)
        )
    singles["remove victim"] = sim.remove_operator_change(victim)
    singles["rotate"] = sim.rotate_domain_key_change()
    proposals = [[name] for name in singles] + [[a, b] for a in singles for b in singles if a != b]

    def key(manifest: domain_pb2.Manifest) -> bytes:
        return (
            manifest.quorum.SerializeToString(deterministic=True)
            + b"|"
            + b",".join(o.operator_id.encode() for o in manifest.operators)
        )

    found: list[list[list[str]]] = []
    applied = 0
    frontier: list[tuple[domain_pb2.Manifest, list[list[str]]]] = [(sim.head.manifest.message, [])]
    seen = {key(sim.head.manifest.message)}
    for _ in range(depth):
        following: list[tuple[domain_pb2.Manifest, list[list[str]]]] = []
        for manifest, path in frontier:
            present = {o.operator_id for o in manifest.operators}
            for names in proposals:
                changes = [singles[n] for n in names]
                need = quorum.required_threshold(manifest.quorum, changes)
                if len(present & colluders) < need.threshold:
                    continue  # the honest operator's approval would be needed
                try:
                    after, _ = transition.apply_changes(manifest, sim.propose(changes), now=sim.now)
                except HsmDomainError:
                    continue
                applied += 1
                if "remove-host" in names:
                    found.append([*path, names])
                    continue
                if key(after) not in seen:
                    seen.add(key(after))
                    following.append((after, [*path, names]))
        frontier = following
    return found, applied


def test_no_sequence_of_proposals_removes_a_host_with_two_of_three() -> None:
    found, applied = _search_for_removal_with_two(depth=3)
    assert found == []
    assert applied > 0  # the two can still make the changes the default quorum allows


def test_proposal_needs_highest_threshold_of_its_changes() -> None:
    sim = SimulatedDomain.create(
        operators=4,
        threshold=2,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
    )
    plain = sim.propose([sim.rotate_domain_key_change()])
    quorum.verify_quorum(
        sim.head.manifest, sim.head.hash, plain, sim.approve(plain, [0, 1]), now=sim.now
    )
    mixed = sim.propose([sim.add_host_change("hsa-4"), sim.remove_host_change("hsa-3")])
    with pytest.raises(QuorumNotMetError, match="2 of 3 approvals") as info:
        quorum.verify_quorum(
            sim.head.manifest, sim.head.hash, mixed, sim.approve(mixed, [0, 1]), now=sim.now
        )
    assert "add-host, remove-host (needs 3: the remove-host threshold)" in str(info.value)
    result = quorum.verify_quorum(
        sim.head.manifest, sim.head.hash, mixed, sim.approve(mixed, [0, 1, 3]), now=sim.now
    )
    assert result.met
    assert (result.threshold, result.reason) == (3, "3: the remove-host threshold")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param(["set-quorum remove-host=2"], id="lower remove-host"),
        pytest.param(["add-operator"], id="add a puppet"),
        pytest.param(["set-quorum remove-host=2", "remove-host"], id="lower and remove"),
        pytest.param(
            ["set-quorum remove-host=2", "remove-operator"], id="remove the honest operator"
        ),
    ],
)
def test_governance_with_two_approvals_does_not_apply(changes: list[str]) -> None:
    """Through transition.next_manifest: what every HSA verifies before it accepts a state."""
    sim = SimulatedDomain.create(
        operators=3,
        threshold=2,
        change_thresholds=[domain_pb2.ChangeThreshold(change_type=REMOVE_HOST, threshold=3)],
    )
    built = {
        "set-quorum remove-host=2": sim.set_quorum_change(2, REMOVE_HOST),
        "add-operator": sim.add_operator_change("puppet"),
        "remove-host": sim.remove_host_change("hsa-3"),
        "remove-operator": sim.remove_operator_change(2),
    }
    proposal = sim.propose([built[c] for c in changes])
    with pytest.raises(QuorumNotMetError, match=r"2 of 3 approvals.*because"):
        sim.apply(proposal, sim.approve(proposal, [0, 1]))
    assert sim.version == 1
    state = sim.apply(proposal, sim.approve(proposal, [0, 1, 2]))
    assert state.version == 2


def test_raising_past_the_current_operators_is_unreachable() -> None:
    sim = SimulatedDomain.create(operators=3, threshold=2)
    proposal = sim.propose([sim.add_operator_change("dave"), sim.set_quorum_change(4)])
    with pytest.raises(QuorumUnreachableError, match=r"needs 4: .*only the 3 current operators"):
        quorum.check_reachable(sim.head.manifest, proposal)
    with pytest.raises(QuorumUnreachableError, match="add the operators in one proposal"):
        sim.apply(proposal, sim.approve(proposal, [0, 1, 2, 3]))


# --- check_applicable --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def advanced() -> SimulatedDomain:
    """A domain at version 2 (genesis + one transition), never changed by tests."""
    sim = SimulatedDomain.create()
    sim.advance(10)
    sim.transition([sim.rotate_domain_key_change()])
    return sim


def _check(sim: SimulatedDomain, proposal: Proposal, now: int | None = None) -> None:
    quorum.check_applicable(
        sim.head.manifest, sim.head.hash, proposal, now=sim.now if now is None else now
    )


def test_applicable_proposal_passes(advanced: SimulatedDomain) -> None:
    _check(advanced, advanced.propose([advanced.rotate_domain_key_change()]))


def test_wrong_domain(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], domain_id="other")
    with pytest.raises(WrongDomainError, match="'other'"):
        _check(advanced, p)


def test_old_base_version_is_stale(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], base=advanced.genesis)
    with pytest.raises(StaleProposalError) as info:
        _check(advanced, p)
    assert str(info.value) == "domain is at version 2, this proposal is for 1: propose again"


def test_future_base_version_is_stale(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], base_version=3)
    with pytest.raises(StaleProposalError, match="at version 2, this proposal is for 3"):
        _check(advanced, p)


def test_same_version_other_hash_is_stale(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], base_state_hash=b"\x01" * 32)
    with pytest.raises(StaleProposalError, match="another state hash"):
        _check(advanced, p)


def test_expired(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], expires_in=600)
    _check(advanced, p, now=p.expires_at - 1)
    with pytest.raises(ProposalExpiredError):
        _check(advanced, p, now=p.expires_at)
    with pytest.raises(ProposalExpiredError, match="expired 100s ago"):
        _check(advanced, p, now=p.expires_at + 100)


def test_lifetime_longer_than_settings(advanced: SimulatedDomain) -> None:
    lifetime = advanced.head.manifest.message.settings.max_proposal_lifetime_seconds
    _check(advanced, advanced.propose([advanced.rotate_domain_key_change()], expires_in=lifetime))
    p = advanced.propose([advanced.rotate_domain_key_change()], expires_in=lifetime + 1)
    with pytest.raises(MalformedMessageError, match="shorter expiry"):
        _check(advanced, p)


def test_future_dated(advanced: SimulatedDomain) -> None:
    skew = 300
    ok = advanced.propose([advanced.rotate_domain_key_change()], now=advanced.now + skew)
    _check(advanced, ok)
    p = advanced.propose([advanced.rotate_domain_key_change()], now=advanced.now + skew + 1)
    with pytest.raises(MalformedMessageError, match="future"):
        _check(advanced, p)


def test_verify_quorum_message(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], expires_in=3600)
    with pytest.raises(QuorumNotMetError) as info:
        quorum.verify_quorum(
            advanced.head.manifest,
            advanced.head.hash,
            p,
            advanced.approve(p, [0]),
            now=advanced.now,
        )
    message = str(info.value)
    assert "1 of 2 approvals" in message
    assert "rotate-domain-key" in message
    assert "1 more needed" in message
    assert "expires in 60 min" in message


def test_verify_quorum_checks_applicability_first(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], base=advanced.genesis)
    with pytest.raises(StaleProposalError):
        quorum.verify_quorum(
            advanced.head.manifest,
            advanced.head.hash,
            p,
            advanced.approve(p, [0, 1, 2]),
            now=advanced.now,
        )


# --- messages signed ---------------------------------------------------------------------------


def test_approve_signs_domain_separated_id() -> None:
    approval = VALID[1]
    assert approval.proposal_id == PROPOSAL.id
    assert approval.operator_id == OPS[1].operator_id
    OPS[1].signer.public_key.verify(approval.signature, quorum.approval_message(PROPOSAL.id))
    assert quorum.approval_message(PROPOSAL.id) != quorum.cancel_message(PROPOSAL.id)


# --- the proposer's own signature (issue 21, item 4) -----------------------------------------


@pytest.mark.parametrize(
    ("threshold", "proposer", "approvers", "met"),
    [
        (1, 0, [0], True),  # the proposer alone, at threshold 1
        (1, 0, [1], False),  # someone else alone: alice's name on a change she never signed
        (1, 0, [1, 2, 3, 4], False),  # every other operator still is not the proposer
        (3, 0, [1, 2, 3], False),
        (3, 0, [0, 1, 2], True),
        (3, 4, [0, 1, 2], False),
        (3, 4, [4, 0, 1], True),
        (5, 2, [0, 1, 2, 3, 4], True),
    ],
)
def test_a_proposal_counts_only_with_its_proposers_own_approval(
    threshold: int, proposer: int, approvers: list[int], met: bool
) -> None:
    sim = SimulatedDomain.create(operators=5, threshold=threshold)
    proposal = sim.propose([sim.rotate_domain_key_change()], proposer=proposer)
    approvals = sim.approve(proposal, approvers)
    result = quorum.evaluate(sim.head.manifest, proposal, approvals)
    assert result.proposer_id == proposal.proposer_id
    assert result.proposer_approved is (proposer in approvers)
    assert result.met is met
    if not result.proposer_approved:
        assert result.needed >= 1
    if met:
        quorum.verify_quorum(sim.head.manifest, sim.head.hash, proposal, approvals, now=sim.now)
    else:
        with pytest.raises(QuorumNotMetError):
            quorum.verify_quorum(sim.head.manifest, sim.head.hash, proposal, approvals, now=sim.now)


def test_a_forged_or_foreign_proposer_approval_does_not_stand_in_for_it() -> None:
    sim = SimulatedDomain.create(operators=3, threshold=1)
    proposal = sim.propose([sim.set_quorum_change(1)], proposer=0)
    bob = sim.approve(proposal, [1])[0]
    alice_key = sim.operators[0].operator_id
    cases = {
        "bob's signature under alice's id": _approval(alice_key, proposal.id, bob.signature),
        "alice's signature of another proposal": sim.approve(
            sim.propose([sim.set_quorum_change(1)], proposer=0), [0]
        )[0],
        "alice's signature with a flipped bit": _approval(
            alice_key,
            proposal.id,
            bytes([sim.approve(proposal, [0])[0].signature[0] ^ 1])
            + sim.approve(proposal, [0])[0].signature[1:],
        ),
    }
    for what, forged in cases.items():
        with pytest.raises(QuorumNotMetError) as info:
            quorum.verify_quorum(
                sim.head.manifest, sim.head.hash, proposal, [bob, forged], now=sim.now
            )
        assert "not signed by the proposer it names" in str(info.value), what
        assert alice_key[:16] in str(info.value), what


def test_the_refusal_says_the_proposer_did_not_sign(advanced: SimulatedDomain) -> None:
    p = advanced.propose([advanced.rotate_domain_key_change()], proposer=0)
    with pytest.raises(QuorumNotMetError) as info:
        quorum.verify_quorum(
            advanced.head.manifest,
            advanced.head.hash,
            p,
            advanced.approve(p, [1, 2]),
            now=advanced.now,
        )
    message = str(info.value)
    assert message.startswith("2 of 2 approvals for rotate-domain-key")
    assert "not signed by the proposer it names" in message
    assert "1 more needed" in message


def test_cancel_votes_need_no_proposer() -> None:
    sim = SimulatedDomain.create(operators=3, threshold=2)
    proposal = sim.propose([sim.rotate_domain_key_change()], proposer=0)
    votes = [quorum.cancel(proposal.id, sim.operators[i].signer) for i in (1, 2)]
    result = quorum.evaluate_cancel(sim.head.manifest, proposal, votes)
    assert result.proposer_id == ""
    assert result.met
