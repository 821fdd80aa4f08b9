"""The operator's diff renderer and proposal review, table-driven (no processes, no network).

`_render` turns two manifests into the before/after text and JSON that `proposals show`,
`approve` and `sign-offline` print; `_review` judges a proposal against verified states; the
offline export and approval files refuse what was altered.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.simulator import SimulatedDomain, forge_unchained_state, new_host, new_operator

from domain_core import changes, quorum, transition
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ChainGapError,
    FailedPreconditionError,
    ForkError,
    GenesisMismatchError,
    HsmDomainError,
    InvalidInputError,
    MalformedMessageError,
    ProposalExpiredError,
    QuorumNotMetError,
    StaleProposalError,
    UnknownSignerError,
)
from domain_core.model import Proposal, SealedState, default_settings
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_proto import domain_pb2
from operator_tool._render import (
    change_json,
    change_lines,
    change_short,
    diff_json,
    diff_lines,
    format_duration,
    manifest_diff,
    relative,
    table,
)
from operator_tool._review import review, review_json, review_lines, summary_json
from operator_tool._signing import parse_duration
from operator_tool.cli import main
from operator_tool.offline import (
    approval_document,
    export_document,
    read_approval_file,
    read_export_file,
    verify_bundle,
    write_document,
)

pytestmark = pytest.mark.unit

ED = domain_pb2.SIGNATURE_ALGORITHM_ED25519
P256 = domain_pb2.SIGNATURE_ALGORITHM_ECDSA_P256


# --- hand-made manifests (the renderer reads fields only, so fixed fake keys are fine) -------


def _host(host_id: str, seed: int) -> domain_pb2.Host:
    return domain_pb2.Host(
        host_id=host_id,
        signing_public_key=bytes([seed]) * 44,
        agreement_public_key=bytes([seed]) * 32,
        tls_certificate_fingerprint=bytes([seed]) * 32,
        spiffe_id=f"spiffe://t/hsa/{host_id}",
    )


def _groups(digest: hashlib._Hash) -> str:
    text = digest.hexdigest()
    return " ".join(text[i : i + 4] for i in range(0, 64, 4))


def _key(seed: int) -> str:
    return hashlib.sha256(bytes([seed]) * 44).hexdigest()[:16]


def _tls(seed: int) -> str:
    return (bytes([seed]) * 32).hex()[:16]


def _op(
    name: str, digit: str, algorithm: domain_pb2.SignatureAlgorithm = ED
) -> domain_pb2.Operator:
    return domain_pb2.Operator(operator_id=digit * 64, name=name, algorithm=algorithm)


def _manifest(
    hosts: list[domain_pb2.Host],
    operators: list[domain_pb2.Operator],
    threshold: int,
    per_type: dict[int, int] | None = None,
    generation: int = 1,
    settings: domain_pb2.DomainSettings | None = None,
) -> domain_pb2.Manifest:
    return domain_pb2.Manifest(
        domain_id="t",
        version=1,
        hosts=hosts,
        operators=operators,
        quorum=domain_pb2.QuorumPolicy(
            threshold=threshold,
            change_thresholds=[
                domain_pb2.ChangeThreshold(change_type=k, threshold=v)
                for k, v in sorted((per_type or {}).items())
            ],
        ),
        settings=settings or default_settings(),
        key_generations=[domain_pb2.KeyGeneration(generation=g) for g in range(1, generation + 1)],
    )


H1, H2, H3 = _host("hsa-1", 1), _host("hsa-2", 2), _host("hsa-3", 3)
ALICE, BOB, CAROL = _op("alice", "a"), _op("bob", "b"), _op("carol", "c", P256)
BASE = _manifest([H1, H2], [ALICE, BOB, CAROL], 2)

HOSTS_UNCHANGED = [
    "hosts: 2, unchanged",
    f"    hsa-1  tls {_tls(1)}  key {_key(1)}",
    f"    hsa-2  tls {_tls(2)}  key {_key(2)}",
]
OPERATORS_UNCHANGED = [
    "operators: 3, unchanged",
    "    alice  aaaa aaaa aaaa aaaa  ed25519",
    "    bob    bbbb bbbb bbbb bbbb  ed25519",
    "    carol  cccc cccc cccc cccc  ecdsa-p256",
]
QUORUM_UNCHANGED = ["quorum: unchanged", "    default: 2 of 3 operators"]
TAIL_UNCHANGED = ["settings: unchanged", "domain key: generation 1, unchanged"]


@dataclass(frozen=True)
class DiffCase:
    name: str
    after: domain_pb2.Manifest
    expected: list[str]


def _settings(**values: int) -> domain_pb2.DomainSettings:
    settings = default_settings()
    for key, value in values.items():
        setattr(settings, key, value)
    return settings


DIFF_CASES = [
    DiffCase(
        "nothing changes",
        BASE,
        HOSTS_UNCHANGED + OPERATORS_UNCHANGED + QUORUM_UNCHANGED + TAIL_UNCHANGED,
    ),
    DiffCase(
        "add an operator: the effective quorum changes with the operator count",
        _manifest([H1, H2], [ALICE, BOB, CAROL, _op("dave", "d", P256)], 2),
        [
            *HOSTS_UNCHANGED,
            "operators: 3 -> 4",
            "    alice  aaaa aaaa aaaa aaaa  ed25519",
            "    bob    bbbb bbbb bbbb bbbb  ed25519",
            "    carol  cccc cccc cccc cccc  ecdsa-p256",
            "  + dave   dddd dddd dddd dddd  ecdsa-p256",
            "quorum:",
            "  - default: 2 of 3 operators",
            "  + default: 2 of 4 operators",
            *TAIL_UNCHANGED,
        ],
    ),
    DiffCase(
        "remove a host: the domain key rotates",
        _manifest([H1], [ALICE, BOB, CAROL], 2, generation=2),
        [
            "hosts: 2 -> 1",
            f"    hsa-1  tls {_tls(1)}  key {_key(1)}",
            f"  - hsa-2  tls {_tls(2)}  key {_key(2)}",
            *OPERATORS_UNCHANGED,
            *QUORUM_UNCHANGED,
            "settings: unchanged",
            "domain key: generation 1 -> 2 (rotated: new key tokens are sealed under the new "
            "generation)",
        ],
    ),
    DiffCase(
        "a host keeps its id but gets another key: shown as removed and added",
        _manifest([H1, _host("hsa-2", 9)], [ALICE, BOB, CAROL], 2),
        [
            "hosts: 2, unchanged (members change)",
            f"    hsa-1  tls {_tls(1)}  key {_key(1)}",
            f"  - hsa-2  tls {_tls(2)}  key {_key(2)}",
            f"  + hsa-2  tls {_tls(9)}  key {_key(9)}",
            *OPERATORS_UNCHANGED,
            *QUORUM_UNCHANGED,
            *TAIL_UNCHANGED,
        ],
    ),
    DiffCase(
        "a per-change-type threshold",
        _manifest([H1, H2], [ALICE, BOB, CAROL], 2, {domain_pb2.CHANGE_TYPE_ADD_HOST: 3}),
        HOSTS_UNCHANGED
        + OPERATORS_UNCHANGED
        + [
            "quorum:",
            "    default: 2 of 3 operators",
            "  + add-host: 3 of 3 operators",
        ]
        + TAIL_UNCHANGED,
    ),
    DiffCase(
        "settings: only the changed values are listed",
        _manifest([H1, H2], [ALICE, BOB, CAROL], 2, settings=_settings(key_generations_retained=3)),
        HOSTS_UNCHANGED
        + OPERATORS_UNCHANGED
        + QUORUM_UNCHANGED
        + [
            "settings:",
            "  - key generations retained: 7",
            "  + key generations retained: 3",
            "domain key: generation 1, unchanged",
        ],
    ),
    DiffCase(
        "remove an operator, shorten the rotation interval",
        _manifest(
            [H1, H2], [ALICE, CAROL], 2, settings=_settings(key_rotation_interval_seconds=3600)
        ),
        [
            *HOSTS_UNCHANGED,
            "operators: 3 -> 2",
            "    alice  aaaa aaaa aaaa aaaa  ed25519",
            "  - bob    bbbb bbbb bbbb bbbb  ed25519",
            "    carol  cccc cccc cccc cccc  ecdsa-p256",
            "quorum:",
            "  - default: 2 of 3 operators",
            "  + default: 2 of 2 operators",
            "settings:",
            "  - key rotation interval: 24 h",
            "  + key rotation interval: 60 min",
            "domain key: generation 1, unchanged",
        ],
    ),
]


@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: c.name)
def test_diff_lines(case: DiffCase) -> None:
    assert diff_lines(manifest_diff(BASE, case.after)) == case.expected


@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: c.name)
def test_diff_json_holds_the_same_facts(case: DiffCase) -> None:
    diff = manifest_diff(BASE, case.after)
    document = diff_json(diff)
    assert document["hosts"]["added"] == [r.host_id for r in diff.hosts_added]
    assert document["hosts"]["removed"] == [r.host_id for r in diff.hosts_removed]
    assert document["operators"]["added"] == [r.operator_id for r in diff.operators_added]
    assert document["operators"]["removed"] == [r.operator_id for r in diff.operators_removed]
    assert [h["host_id"] for h in document["hosts"]["after"]] == [
        h.host_id for h in case.after.hosts
    ]
    assert document["quorum"]["after"]["threshold"] == case.after.quorum.threshold
    assert document["quorum"]["after"]["operators"] == len(case.after.operators)
    assert document["quorum"]["changed"] == ("quorum:" in case.expected)
    assert document["settings"]["changed"] == ("settings:" in case.expected)
    assert document["key_generation"]["rotated"] == diff.rotated
    assert diff.empty == (case.after is BASE)


# --- the changes a proposal carries ---------------------------------------------------------

NAMES = {"a" * 64: "alice", "b" * 64: "bob"}
CHANGE_CASES: list[tuple[str, domain_pb2.Change, list[str], str]] = [
    (
        "add-host",
        domain_pb2.Change(
            add_host=domain_pb2.AddHost(
                enrollment=domain_pb2.HostEnrollment(
                    host=H3.SerializeToString(deterministic=True)
                ).SerializeToString(deterministic=True)
            )
        ),
        [
            "add-host hsa-3",
            "  TLS certificate         SHA-256 " + " ".join(["0303"] * 16),
            "  signing key (Ed25519)   SHA-256 " + _groups(hashlib.sha256(bytes([3]) * 44)),
            "  agreement key (X25519)  SHA-256 " + _groups(hashlib.sha256(bytes([3]) * 32)),
            "  compare these fingerprints with the operator of hsa-3 out of band (in person or "
            "by phone, as for a new operator) before you approve: the host shows them when it "
            "is prepared (`hsm-domain add-node`)",
        ],
        "add-host hsa-3",
    ),
    (
        "remove-host",
        domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id="hsa-2")),
        ["remove-host hsa-2 (the domain key rotates with it)"],
        "remove-host hsa-2",
    ),
    (
        "add-operator",
        domain_pb2.Change(add_operator=domain_pb2.AddOperator(operator=_op("dave", "d", P256))),
        [
            "add-operator dave (ecdsa-p256)",
            "  fingerprint " + " ".join(["dddd"] * 16) + " (compare it with dave)",
        ],
        "add-operator dave",
    ),
    (
        "remove a known operator",
        domain_pb2.Change(remove_operator=domain_pb2.RemoveOperator(operator_id="b" * 64)),
        ["remove-operator bob (bbbb bbbb bbbb bbbb)"],
        "remove-operator bob",
    ),
    (
        "remove an unknown operator",
        domain_pb2.Change(remove_operator=domain_pb2.RemoveOperator(operator_id="e" * 64)),
        ["remove-operator unknown operator eeee eeee eeee eeee"],
        "remove-operator eeeeeeeeeeeeeeee",
    ),
    (
        "default threshold",
        domain_pb2.Change(set_quorum=domain_pb2.SetQuorum(threshold=3)),
        ["set-quorum: default threshold 3"],
        "set-quorum 3",
    ),
    (
        "per-type threshold",
        domain_pb2.Change(
            set_quorum=domain_pb2.SetQuorum(
                threshold=3, change_type=domain_pb2.CHANGE_TYPE_REMOVE_HOST
            )
        ),
        ["set-quorum: remove-host needs 3"],
        "set-quorum 3 --for remove-host",
    ),
    (
        "per-type threshold removed",
        domain_pb2.Change(
            set_quorum=domain_pb2.SetQuorum(
                threshold=0, change_type=domain_pb2.CHANGE_TYPE_ADD_HOST
            )
        ),
        ["set-quorum: add-host uses the default threshold again"],
        "set-quorum 0 --for add-host",
    ),
    (
        "settings",
        domain_pb2.Change(
            set_settings=domain_pb2.SetSettings(settings=_settings(key_generations_retained=2))
        ),
        [
            "set-settings: key rotation interval: 24 h, key generations retained: 2, "
            "longest proposal lifetime: 7 d"
        ],
        "set-settings",
    ),
    (
        "rotate",
        domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey()),
        ["rotate-domain-key now"],
        "rotate-domain-key",
    ),
    (
        "recovery threshold",
        domain_pb2.Change(set_quorum=domain_pb2.SetQuorum(threshold=2, recovery=True)),
        [
            "set-quorum: recovery threshold 2 (that many operators' recovery shares rebuild "
            "the domain)"
        ],
        "set-quorum 2 --recovery",
    ),
    (
        "recovery threshold off",
        domain_pb2.Change(set_quorum=domain_pb2.SetQuorum(threshold=0, recovery=True)),
        ["set-quorum: recovery threshold 0 (no recovery package any more)"],
        "set-quorum 0 --recovery",
    ),
    (
        "set-recovery-key",
        domain_pb2.Change(
            set_recovery_key=domain_pb2.SetRecoveryKey(
                operator_id="a" * 64,
                recovery_key=domain_pb2.RecoveryKey(
                    algorithm=domain_pb2.RECOVERY_ALGORITHM_X25519, public_key=b"\x05" * 32
                ).SerializeToString(deterministic=True),
                signature=b"\x01" * 64,
            )
        ),
        [
            "set-recovery-key for alice (aaaa aaaa aaaa aaaa) (x25519, a file token)",
            "  recovery key fingerprint f849 d673 25fa cf04 177b c663 b2dc 5440 "
            "5183 1c58 9ef5 81d4 12f2 eba4 4834 e77c "
            "(compare it with the operator's `hsm-operator recovery show`)",
        ],
        "set-recovery-key alice",
    ),
]


@pytest.mark.parametrize(
    ("change", "lines", "short"),
    [c[1:] for c in CHANGE_CASES],
    ids=[c[0] for c in CHANGE_CASES],
)
def test_change_lines(change: domain_pb2.Change, lines: list[str], short: str) -> None:
    assert change_lines([change], NAMES) == lines
    assert change_short([change], NAMES) == short
    (document,) = change_json([change], NAMES)
    assert document["summary"] == lines[0]
    if change.HasField("add_host"):
        assert document["detail"] == ""
        assert document["host_keys"]["host_id"] == "hsa-3"
        assert document["host_keys"]["sha256"]["TLS certificate"] == "03" * 32
    else:
        assert document["detail"] == (lines[1].strip() if len(lines) > 1 else "")


def test_changes_are_listed_in_order() -> None:
    changes = [c[1] for c in CHANGE_CASES[:3]]
    assert change_short(changes, NAMES) == "add-host hsa-3, remove-host hsa-2, add-operator dave"


# --- small formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (45, "45 s"),
        (119, "119 s"),
        (120, "2 min"),
        (3599, "59 min"),
        (7199, "119 min"),
        (7200, "2 h"),
        (7500, "2 h 5 min"),
        (86400, "24 h"),
        (172800, "2 d"),
        (7 * 86400 + 3600, "7 d 1 h"),
        (-5, "0 s"),
    ],
)
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("at", "now", "text"), [(160, 100, "in 60 s"), (100, 100, "in 0 s"), (88, 100, "12 s ago")]
)
def test_relative(at: int, now: int, text: str) -> None:
    assert relative(at, now) == text


def test_table_aligns_columns_without_trailing_blanks() -> None:
    assert table([["ID", "STATE", "X"], ["abc", "pending", ""], ["a", "s", "long"]], "  ") == [
        "  ID   STATE    X",
        "  abc  pending",
        "  a    s        long",
    ]
    assert table([]) == []


# --- review: judged against verified states --------------------------------------------------


@pytest.fixture
def sim() -> SimulatedDomain:
    return SimulatedDomain.create(operators=3, threshold=2)


def _states(sim: SimulatedDomain) -> dict[int, SealedState]:
    return {s.version: s for s in sim.states}


def test_review_pending_counts_only_valid_approvals(sim: SimulatedDomain) -> None:
    dave = new_operator("dave")
    proposal = sim.propose([sim.add_operator_change(operator=dave.record)])
    approvals = sim.approve(proposal, [0])
    # A relayed approval by someone who is not an operator does not count.
    approvals.append(quorum.approve(proposal, dave.signer))
    r = review(proposal, approvals, head=sim.head, states=_states(sim), now=sim.now)
    assert r.state == "pending"
    assert r.approved_by == (sim.operators[0].operator_id,)
    assert r.can_approve == (sim.operators[1].operator_id, sim.operators[2].operator_id)
    assert (r.threshold, r.needed) == (2, 1)
    assert r.diff is not None
    assert [o.name for o in r.diff.operators_added] == ["dave"]
    text = "\n".join(review_lines(r))
    assert "pending: 1 of 2 approvals, 1 more needed" in text
    assert "  + dave" in text
    assert "approved by      op0" in text
    assert "can approve      op1, op2" in text
    assert "not counted" in text
    document = review_json(r)
    assert document["approvals"] == 1
    assert document["needed"] == 1
    assert [a["name"] for a in document["can_approve"]] == ["op1", "op2"]
    assert document["diff"]["operators"]["added"] == [dave.operator_id]
    r.require_pending()
    r.require_can_sign(sim.operators[1].operator_id)
    with pytest.raises(AlreadyExistsError, match="already approved by you"):
        r.require_can_sign(sim.operators[0].operator_id)
    with pytest.raises(UnknownSignerError, match="you are not an operator of this domain"):
        r.require_can_sign(dave.operator_id)


def test_review_says_which_threshold_applies_and_why() -> None:
    sim = SimulatedDomain.create(
        operators=3,
        threshold=2,
        change_thresholds=[
            domain_pb2.ChangeThreshold(change_type=domain_pb2.CHANGE_TYPE_REMOVE_HOST, threshold=3)
        ],
    )
    lower = sim.propose([sim.set_quorum_change(2, domain_pb2.CHANGE_TYPE_REMOVE_HOST)])
    r = review(lower, sim.approve(lower, [0, 1]), head=sim.head, states=_states(sim), now=sim.now)
    reason = (
        "3: the highest threshold in the current policy (remove-host), because set-quorum "
        "changes who may approve or how many approvals are needed"
    )
    assert (r.threshold, r.needed, r.threshold_reason) == (3, 1, reason)
    text = "\n".join(review_lines(r))
    assert "pending: 2 of 3 approvals, 1 more needed" in text
    assert f"  threshold        {reason}" in text
    assert review_json(r)["threshold_reason"] == reason
    plain = sim.propose([sim.rotate_domain_key_change()])
    r = review(plain, [], head=sim.head, states=_states(sim), now=sim.now)
    assert "  threshold        2: the default threshold" in review_lines(r)


def test_review_counts_cancel_votes_itself(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    outsider = new_operator("mallory")
    as_approval = quorum.cancel(proposal.id, sim.operators[2].signer)
    as_approval.signature = sim.operators[2].signer.sign(quorum.approval_message(proposal.id))
    votes = [
        quorum.cancel(proposal.id, sim.operators[1].signer),
        quorum.cancel(proposal.id, outsider.signer),  # not an operator
        as_approval,  # an approval signature passed off as a cancel vote
    ]
    r = review(proposal, [], head=sim.head, states=_states(sim), now=sim.now, cancel_votes=votes)
    assert r.cancel_voted_by == (sim.operators[1].operator_id,)
    assert r.cancel_standing() == ("1 of 2 votes to cancel; the proposer alone may cancel at once")
    assert (
        "  cancel votes     1 of 2 votes to cancel; the proposer alone may cancel at once (op1)"
        in (review_lines(r))
    )
    assert summary_json(r)["cancel_votes"] == [
        {"operator_id": sim.operators[1].operator_id, "name": "op1"}
    ]


def test_review_applied_stale_expired(sim: SimulatedDomain) -> None:
    first = sim.propose([sim.rotate_domain_key_change()])
    second = sim.propose([sim.set_quorum_change(3)])
    sim.apply(second, sim.approve_quorum(second))
    states = _states(sim)
    applied = review(second, [], head=sim.head, states=states, now=sim.now)
    assert (applied.state, applied.applied_version) == ("applied", 2)
    assert applied.diff is not None
    assert applied.diff.quorum_changed
    with pytest.raises(FailedPreconditionError, match="applied as version 2"):
        applied.require_pending()

    stale = review(first, [], head=sim.head, states=states, now=sim.now)
    assert stale.state == "stale"
    assert stale.can_approve == ()
    with pytest.raises(
        StaleProposalError, match=r"^domain is at version 2, this proposal is for 1: propose again$"
    ):
        stale.require_pending()

    late = sim.propose([sim.rotate_domain_key_change()], expires_in=60)
    expired = review(late, [], head=sim.head, states=states, now=sim.now + 61)
    assert expired.state == "expired"
    with pytest.raises(ProposalExpiredError, match=r"expired at .* \(1 s ago\): propose again"):
        expired.require_pending()


def test_review_trusts_the_coordinator_only_to_close(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    states = _states(sim)
    # Claimed applied, but the verified chain does not hold it: still pending here.
    claimed = review(
        proposal, [], head=sim.head, states=states, now=sim.now, coordinator_state="applied"
    )
    assert claimed.state == "pending"
    cancelled = review(
        proposal,
        [],
        head=sim.head,
        states=states,
        now=sim.now,
        coordinator_state="cancelled",
        coordinator_detail="cancelled by operator op1",
    )
    with pytest.raises(
        FailedPreconditionError, match=r"^the proposal was cancelled by operator op1$"
    ):
        cancelled.require_pending()


def test_review_of_a_change_that_does_not_apply(sim: SimulatedDomain) -> None:
    proposal = sim.propose([sim.set_quorum_change(2)])
    # Its base is the genesis; show it against that even once the domain moved on.
    broken = sim.propose([domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id="hsa-9"))])
    r = review(broken, [], head=sim.head, states=_states(sim), now=sim.now)
    assert r.diff is None
    assert "the changes do not apply to version 1" in r.diff_error
    assert "hsa-9 is not in the domain" in "\n".join(review_lines(r))
    unknown_base = review(proposal, [], head=sim.head, states={}, now=sim.now)
    assert unknown_base.diff is None
    assert "not in the chain verified from your trust anchor" in unknown_base.diff_error


# --- offline files and durations -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("30 min", 1800), ("2h", 7200), ("7d", 604800)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "1w", "2.5h", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_duration(text)


def _export(sim: SimulatedDomain, tmp_path: Path, **changes: object) -> Path:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    document = export_document(
        proposal, list(sim.states), sim.approve(proposal, [0]), sim.now, sim.genesis_hash
    )
    document.update(changes)
    path = tmp_path / f"export-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(document))
    return path


def test_export_file_round_trip(sim: SimulatedDomain, tmp_path: Path) -> None:
    path = _export(sim, tmp_path)
    proposal, chain, approvals = read_export_file(path)
    assert [s.hash for s in chain] == [s.hash for s in sim.states]
    assert proposal.base_version == 1
    assert [a.operator_id for a in approvals] == [sim.operators[0].operator_id]
    r = review(proposal, approvals, head=sim.head, states={1: sim.head}, now=sim.now)
    assert r.approved_by == (sim.operators[0].operator_id,)
    bundle = verify_bundle(path, sim.genesis_hash)
    assert bundle.base.hash == sim.head.hash
    assert bundle.proposal.id == proposal.id


@pytest.mark.parametrize(
    ("changes", "cause"),
    [
        ({"format": "other"}, "format is not"),
        ({"version": 1}, "an export of version 1 carries no chain from the genesis"),
        ({"version": 3}, "version is not 2"),
        ({"chain": []}, "chain is not a list of states"),
        ({"chain": ["AAAA"]}, "chain[0] is not a domain state"),
        ({"genesis_hash": "00"}, "genesis_hash is not 64 hex characters"),
        ({"extra": 1}, "unexpected ['extra']"),
        ({"proposal_id": "00" * 32}, "do not hash to the proposal id"),
        ({"base_version": 7}, "differ from the proposal's own"),
        ({"domain_id": "other"}, "differ from the proposal's own"),
        ({"proposal": "not base64!"}, "not valid base64"),
        ({"approvals": [{"operator_id": "x"}]}, "needs operator_id and signature"),
    ],
)
def test_export_file_refusals(
    sim: SimulatedDomain, tmp_path: Path, changes: dict[str, object], cause: str
) -> None:
    with pytest.raises(HsmDomainError) as raised:
        read_export_file(_export(sim, tmp_path, **changes))
    assert cause in raised.value.message


def test_approval_file(sim: SimulatedDomain, tmp_path: Path) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    (approval,) = sim.approve(proposal, [1])
    path = tmp_path / "approval.json"
    write_document(path, approval_document(approval))
    assert read_approval_file(path) == approval
    with pytest.raises(AlreadyExistsError):
        write_document(path, approval_document(approval))
    document = json.loads(path.read_text())
    document["operator_id"] = "Z" * 64
    path.write_text(json.dumps(document))
    with pytest.raises(MalformedMessageError, match="operator_id is not 64 lowercase hex"):
        read_approval_file(path)


def test_an_approval_file_carries_a_recovery_share(sim: SimulatedDomain, tmp_path: Path) -> None:
    proposal = sim.propose([sim.rotate_domain_key_change()])
    (approval,) = sim.approve(proposal, [1])
    approval.recovery_contribution.CopyFrom(
        domain_pb2.RecoveryContribution(
            ephemeral_public_key=b"\x01" * 32, nonce=b"\x02" * 12, ciphertext=b"\x03" * 300
        )
    )
    path = tmp_path / "approval.json"
    write_document(path, approval_document(approval))
    assert read_approval_file(path) == approval
    document = json.loads(path.read_text())
    document["recovery_contribution"] = "not base64!"
    path.write_text(json.dumps(document))
    with pytest.raises(MalformedMessageError, match="recovery_contribution is not valid base64"):
        read_approval_file(path)
    document["recovery_contribution"] = base64.b64encode(b"\xff\xff\xff").decode()
    path.write_text(json.dumps(document))
    with pytest.raises(MalformedMessageError, match="is not a sealed recovery share"):
        read_approval_file(path)


# --- issue 21: what the operator signs is what they reviewed -------------------------------


def test_review_says_whether_the_proposer_signed(sim: SimulatedDomain) -> None:
    # Item 4: a proposal naming op0 as proposer, approved by op1 and op2 but never by op0.
    proposal = sim.propose([sim.set_quorum_change(1)], proposer=0)
    unsigned = review(
        proposal, sim.approve(proposal, [1, 2]), head=sim.head, states=_states(sim), now=sim.now
    )
    assert not unsigned.proposer_signed
    assert unsigned.needed == 1  # two of two, but the proposer's own approval is missing
    text = "\n".join(review_lines(unsigned))
    assert "pending: 2 of 2 approvals, but NOT SIGNED BY ITS PROPOSER: it cannot apply" in text
    assert "proposer  op0 (" in text
    assert "NOT SIGNED: no approval by this operator verifies under version 1" in text
    assert summary_json(unsigned)["proposer_signed"] is False
    with pytest.raises(BadSignatureError, match=r"names op0 .* as its proposer, but carries no"):
        unsigned.require_proposer_signed()

    signed = review(
        proposal, sim.approve(proposal, [0]), head=sim.head, states=_states(sim), now=sim.now
    )
    assert signed.proposer_signed
    signed.require_proposer_signed()
    lines = review_lines(signed)
    assert any(
        line.startswith("proposer  op0 (")
        and line.endswith("signed: their approval verifies under their key in version 1")
        for line in lines
    ), lines
    assert summary_json(signed)["proposer_signed"] is True


HOSTILE_TEXT = (
    "cancelled by op1\n\x1b[2Kproposal  rotate-domain-key\r\x1b[30;40mhidden\x1b[0m\u202eesrever"
)


def _assert_inert(text: str) -> None:
    for raw in ("\x1b", "\r", "\u202e", "\x9b"):
        assert raw not in text
    for line in text.split("\n"):
        assert line.isprintable(), line
    assert "rotate-domain-key\n" not in text


def test_review_escapes_what_the_coordinator_relays(sim: SimulatedDomain) -> None:
    # Item 5: a lying coordinator's detail and a relayed approval whose operator id carries
    # escapes reach the review as visible escapes, never as terminal codes or new lines.
    proposal = sim.propose([sim.rotate_domain_key_change()])
    junk = domain_pb2.Approval(
        proposal_id=proposal.id, operator_id="\x1b[2J\nop9", signature=b"\x01" * 64
    )
    cancelled = review(
        proposal,
        [*sim.approve(proposal, [0]), junk],
        head=sim.head,
        states=_states(sim),
        now=sim.now,
        coordinator_state="cancelled",
        coordinator_detail=HOSTILE_TEXT,
    )
    lines = review_lines(cancelled)
    text = "\n".join(lines)
    _assert_inert(text)
    assert "\\x1b[2Kproposal  rotate-domain-key\\r" in text
    # The relayed operator id, shown in the "not counted" line (in groups of four).
    assert "not counted      \\x1b[2J \\nop9 (not an operator" in text
    assert not any(line.startswith("proposal  rotate-domain-key") for line in lines)
    assert "\\u202eesrever" in text


def test_tables_and_change_lines_escape_every_cell() -> None:
    lines = table([["HOST", "ADDRESS"], ["hsa-1", "127.0.0.1:1\n\x1b[31mhsa-9  evil"]])
    _assert_inert("\n".join(lines))
    assert len(lines) == 2
    assert lines[1].endswith("127.0.0.1:1\\n\\x1b[31mhsa-9  evil")


def _bundle(
    tmp_path: Path,
    proposal: Proposal,
    chain: list[SealedState],
    approvals: list[domain_pb2.Approval],
    now: int,
    genesis_hash: bytes,
) -> Path:
    path = tmp_path / f"bundle-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(export_document(proposal, chain, approvals, now, genesis_hash)))
    return path


def test_an_unchained_state_is_refused_offline(sim: SimulatedDomain, tmp_path: Path) -> None:
    """Item 8: a forged "version 7" listing an attacker host, signed by that host (one of its
    own), with the real operators: an insider (op0) proposes against it. Before the fix
    `sign-offline` checked only that signature; now the chain from the pinned genesis must
    lead to it, whatever the bundle carries."""
    attacker = new_host(sim.domain_id, "hsa-66")
    forged = forge_unchained_state(sim.head, 7, attacker)
    assert forged.manifest.host_signing_key("hsa-66") is not None  # "signed by its own host"
    proposal = sim.propose([sim.rotate_domain_key_change()], base=forged, proposer=0)
    refusals = {
        "the forged state alone": (
            [forged],
            GenesisMismatchError,
            "a genesis state has version 1, not 7",
        ),
        "the genesis, then the forged state": (
            [sim.genesis, forged],
            ChainGapError,
            "state version 7 skips versions after 1",
        ),
        "the genesis, then a forged version 2": (
            [sim.genesis, forge_unchained_state(sim.head, 2, attacker)],
            ForkError,
            "does not follow the verified state 1",
        ),
        "the genesis, then a version 2 linked to it but signed by the attacker's host": (
            [
                sim.genesis,
                forge_unchained_state(sim.head, 2, attacker, previous_state_hash=sim.genesis.hash),
            ],
            UnknownSignerError,
            "signed by host 'hsa-66', which the domain does not trust",
        ),
    }
    for what, (chain, error, cause) in refusals.items():
        against = proposal
        if chain[-1].version != proposal.base_version:
            against = sim.propose([sim.rotate_domain_key_change()], base=chain[-1], proposer=0)
        path = _bundle(
            tmp_path, against, chain, sim.approve(against, [0]), sim.now, sim.genesis_hash
        )
        with pytest.raises(error) as raised:
            verify_bundle(path, sim.genesis_hash)
        assert cause in raised.value.message, what
        assert "do not sign anything it shows" in raised.value.message, what

    # A whole forged history from another genesis of the same domain id: the pin decides.
    other = SimulatedDomain.create(domain_id=sim.domain_id, operators=3, threshold=1)
    other.advance(60)
    other.transition([other.add_host_change("hsa-66")])
    theirs = other.propose([other.rotate_domain_key_change()], proposer=0)
    path = _bundle(
        tmp_path,
        theirs,
        list(other.states),
        other.approve(theirs, [0]),
        sim.now,
        other.genesis_hash,
    )
    verify_bundle(path, other.genesis_hash)  # it is a valid chain of *their* domain ...
    with pytest.raises(GenesisMismatchError, match="the genesis you pinned"):
        verify_bundle(path, sim.genesis_hash)  # ... not of the one this operator pinned


def test_an_honest_bundle_verifies_and_a_tampered_one_does_not(
    sim: SimulatedDomain, tmp_path: Path
) -> None:
    sim.advance(60)
    sim.transition([sim.add_host_change("hsa-4")])
    sim.advance(60)
    sim.transition([sim.set_quorum_change(3)], approvers=[0, 1, 2])
    proposal = sim.propose([sim.rotate_domain_key_change()], proposer=1)
    approvals = sim.approve(proposal, [1])
    honest = _bundle(tmp_path, proposal, list(sim.states), approvals, sim.now, sim.genesis_hash)
    bundle = verify_bundle(honest, sim.genesis_hash)
    assert (bundle.base.version, bundle.base.hash) == (3, sim.head.hash)
    r = review(
        bundle.proposal, bundle.approvals, head=bundle.base, states=bundle.states, now=sim.now
    )
    assert (r.state, r.threshold, r.proposer_signed) == ("pending", 3, True)

    missing = _bundle(
        tmp_path, proposal, [sim.states[0], sim.states[2]], approvals, sim.now, sim.genesis_hash
    )
    with pytest.raises(ChainGapError):
        verify_bundle(missing, sim.genesis_hash)
    # A state of the chain with its approvals taken out (they are not under its hash).
    stripped = SealedState.from_message(
        domain_pb2.SealedState(
            manifest=sim.states[1].message.manifest,
            secrets=sim.states[1].message.secrets,
            proposal=sim.states[1].message.proposal,
            producer_host_id=sim.states[1].message.producer_host_id,
            producer_signature=sim.states[1].message.producer_signature,
        )
    )
    chain = [sim.states[0], stripped, sim.states[2]]
    path = _bundle(tmp_path, proposal, chain, approvals, sim.now, sim.genesis_hash)
    with pytest.raises(QuorumNotMetError):
        verify_bundle(path, sim.genesis_hash)
    # The chain ends one state early: the proposal is not for its last state.
    short = _bundle(tmp_path, proposal, list(sim.states), approvals, sim.now, sim.genesis_hash)
    document = json.loads(short.read_text())
    document["chain"] = document["chain"][:-1]
    short.write_text(json.dumps(document))
    with pytest.raises(StaleProposalError, match="ends at version 2"):
        verify_bundle(short, sim.genesis_hash)


def test_the_operators_own_state_must_be_in_the_verified_chain(
    sim: SimulatedDomain, tmp_path: Path
) -> None:
    v1 = sim.head
    sim.advance(60)
    v2 = sim.transition([sim.rotate_domain_key_change()])
    proposal = sim.propose([sim.set_quorum_change(3)])
    path = _bundle(
        tmp_path, proposal, list(sim.states), sim.approve(proposal, [0]), sim.now, sim.genesis_hash
    )
    verify_bundle(path, sim.genesis_hash, own_state=(v1, "v1.state"))
    verify_bundle(path, sim.genesis_hash, own_state=(v2, "v2.state"))
    # Another version 2 (what the operator saw elsewhere): two histories.
    other = sim.propose([sim.set_quorum_change(1)], base=v1)
    other_v2 = sim.apply(other, sim.approve(other, [0, 1]), base=v1, append=False)
    with pytest.raises(ForkError, match="is not the state of that version in the verified"):
        verify_bundle(path, sim.genesis_hash, own_state=(other_v2, "mine.state"))
    # The operator has seen version 3 already: the proposal for version 2 is stale.
    sim.advance(60)
    v3 = sim.transition([sim.rotate_domain_key_change()])
    with pytest.raises(StaleProposalError, match="past this proposal's base version 2"):
        verify_bundle(path, sim.genesis_hash, own_state=(v3, "v3.state"))


@pytest.mark.parametrize("command", ["approve", "cancel"])
def test_signing_without_asking_needs_the_full_id(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Item 4: refused before anything is read or fetched (the domain directory is absent).
    missing = str(tmp_path / "no-such-domain")
    assert main([command, "9f704d9e", "--yes", "--cluster", missing]) == 2
    assert f"{command} --yes needs the full proposal id" in capsys.readouterr().err
    full = "9f704d9e" * 8
    assert main([command, full, "--yes", "--cluster", missing]) == 1  # then: no domain there
    assert "needs the full proposal id" not in capsys.readouterr().err


def test_the_diff_shows_an_enrolled_recovery_key_and_the_recovery_threshold() -> None:
    """An approver sees whose recovery key a change enrolls (its fingerprint) and the new
    recovery threshold, in the text and in the JSON."""
    sim = SimulatedDomain.create()
    enroll = changes.set_recovery_key(
        sim.operators[0].signer,
        domain_id=sim.domain_id,
        algorithm=RecoveryAlgorithm.X25519,
        public_key=b"\x05" * 32,
    )
    before = sim.head.manifest.message
    after, _ = transition.apply_changes(
        before, sim.propose([enroll, changes.set_quorum(1, recovery=True)]), now=sim.now
    )
    diff = manifest_diff(before, after)
    assert not diff.empty
    lines = diff_lines(diff)
    name = sim.operators[0].record.name
    short = " ".join(hashlib.sha256(b"\x05" * 32).hexdigest()[i : i + 4] for i in (0, 4, 8, 12))
    assert "recovery keys:" in lines
    assert f"  + {name}: x25519, a file token, {short}" in lines
    assert "  + recovery: 1 of 1 recovery keys" in lines
    document = diff_json(diff)
    assert document["recovery_keys"]["changed"] is True
    assert document["recovery_keys"]["after"] == {
        sim.operators[0].operator_id: f"x25519, a file token, {short}"
    }
    assert document["quorum"]["after"]["recovery_threshold"] == 1
