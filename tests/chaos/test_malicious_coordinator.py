"""A malicious coordinator against real HSAs: every lie is refused, logged, and survived.

The coordinator here is `support.malicious_coordinator.MaliciousCoordinatorServer`, holding
the real coordinator certificate of a domain made by `init_domain`, so hsa-1 and hsa-2 (real
`hsa-node` processes) take its pushes and follow its stream and pulls. It builds honest states
with the real hosts' and operators' keys (`forging_domain`) and then lies: an older state
(rollback), a state that skips versions, two different states for one version (fork), a state
signed by a host the domain does not trust, proposals with forged, duplicated, too few or
expired approvals, approvals of a removed operator, and sealed states with a flipped bit.

For every lie: the HSA refuses it with a client-error status, writes the reason to its log
(DIR/logs/<host>.log), stays healthy on its last good state (GetStatus version and hash
unchanged), keeps answering (Echo), and afterwards still accepts the honest next state.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2
from support.hsa_nodes import ROTATE, health_status
from support.malicious_coordinator import Attack, LogWatch, echo, wait_until
from support.simulator import flip_bit, forge_enrollment, new_host, noncanonical_encodings

from domain_core import crypto, quorum
from domain_core.errors import HsmDomainError
from domain_core.model import Proposal, SealedState
from domain_proto import domain_pb2

pytestmark = pytest.mark.chaos

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


# --- helpers ---------------------------------------------------------------------------------


def head_of(attack: Attack, host: str) -> tuple[int, bytes]:
    status = attack.server.status(attack.address(host))
    assert status.healthy, status.detail
    assert status.member, status.detail
    return status.version, status.state_hash


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_still_serving(attack: Attack, host: str, head: tuple[int, bytes]) -> None:
    """Healthy on `head`, SERVING, and answering calls."""
    assert head_of(attack, host) == head
    channel = attack.procs.channel(host, "demo-app")
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    echo(channel)


def expect_push_refused(
    attack: Attack,
    state: SealedState | domain_pb2.SealedState,
    code: grpc.StatusCode,
    reason: str,
    hosts: Sequence[str] | None = None,
) -> None:
    """Push `state` to each host: refused with `code` and `reason`, logged, nothing changed."""
    for host in hosts or attack.hosts:
        head = head_of(attack, host)
        log = LogWatch(attack.procs.log_path(host), whole=True)
        error = refused(lambda: attack.server.push(attack.address(host), state))  # noqa: B023
        assert error.code() == code, error.details()
        assert reason in error.details()
        log.wait_for(reason)
        assert_still_serving(attack, host, head)


def advance_honestly(attack: Attack, changes: Sequence[domain_pb2.Change] = ROTATE) -> SealedState:
    """An honest next state (quorum of the first operators), served and pushed to every HSA."""
    state = attack.sim.transition(list(changes))
    attack.server.serve(*attack.sim.states)
    for host in attack.hosts:
        response = attack.server.push(attack.address(host), state)
        assert (response.version, response.state_hash) == (state.version, state.hash)
        assert_still_serving(attack, host, (state.version, state.hash))
    return state


def approvals_by(
    attack: Attack, proposal: Proposal, names: Sequence[str]
) -> list[domain_pb2.Approval]:
    """Approvals of `proposal` by the operators with these names (alice, bob, carol)."""
    by_name = {o.name: o for o in attack.sim.operators}
    return [quorum.approve(proposal, by_name[n].signer) for n in names]


# --- the chain: rollback, version jumps, forks -------------------------------------------------


def test_an_older_state_is_refused(attack: Attack) -> None:
    v2 = advance_honestly(attack)
    v3 = advance_honestly(attack)

    expect_push_refused(attack, v2, FAILED_PRECONDITION, "older than the verified version 3")
    expect_push_refused(attack, attack.sim.genesis, FAILED_PRECONDITION, "refusing to go back")

    # The same lie on the stream and the pull: a coordinator that "lost" version 3. (The
    # stream sent these states before, when they were new; the refusal may be logged then.)
    logs = {h: LogWatch(attack.procs.log_path(h), whole=True) for h in attack.hosts}
    attack.server.chain.states_after_override = [attack.sim.genesis.message, v2.message]
    attack.server.serve(attack.sim.genesis, v2)
    for host in attack.hosts:
        logs[host].wait_for("refused state version 2 from coordinator stream: RollbackError")
        logs[host].wait_for("refused state version 2 from coordinator: RollbackError")
        assert_still_serving(attack, host, (3, v3.hash))

    attack.server.chain.states_after_override = None
    advance_honestly(attack)


def test_a_state_that_skips_versions_is_refused(attack: Attack) -> None:
    v2 = advance_honestly(attack)
    # A well-signed state (a trusted host's key) that claims version 4 right after version 2.
    proposal = attack.sim.propose(ROTATE)
    jump = attack.liar.forge(
        proposal,
        attack.sim.approve_quorum(proposal),
        mutate=lambda manifest: setattr(manifest, "version", 4),
    )
    assert jump.version == 4
    assert jump.manifest.message.previous_state_hash == v2.hash
    expect_push_refused(attack, jump, FAILED_PRECONDITION, "skips versions after 2")

    # Honest versions 3 and 4, but the coordinator withholds 3 everywhere.
    v3 = attack.sim.transition(ROTATE)
    v4 = attack.sim.transition(ROTATE)
    attack.server.serve(attack.sim.genesis, v2, v4)
    expect_push_refused(attack, v4, FAILED_PRECONDITION, "skips versions after 2")

    # Once it serves version 3, a push of version 4 fetches it first and installs both.
    attack.server.serve(*attack.sim.states)
    for host in attack.hosts:
        response = attack.server.push(attack.address(host), v4)
        assert (response.version, response.state_hash) == (4, v4.hash)
        assert_still_serving(attack, host, (4, v4.hash))
    assert v3.version == 3


def test_two_states_for_one_version_are_refused_as_a_fork(attack: Attack) -> None:
    v2 = advance_honestly(attack)
    # Another version 2, honestly sealed by hsa-2 for another quorum-approved proposal.
    genesis = attack.sim.genesis
    proposal = attack.sim.propose(ROTATE, base=genesis)
    other = attack.sim.apply(
        proposal, attack.sim.approve(proposal, [0, 2]), "hsa-2", base=genesis, append=False
    )
    assert other.version == 2
    assert other.hash != v2.hash
    expect_push_refused(attack, other, FAILED_PRECONDITION, "two different states claim version 2")

    # A version 3 that extends the other branch: its previous hash is not the verified v2.
    proposal = attack.sim.propose(ROTATE, base=other)
    on_other = attack.sim.apply(
        proposal, attack.sim.approve_quorum(proposal, other), base=other, append=False
    )
    expect_push_refused(attack, on_other, FAILED_PRECONDITION, "its previous hash differs")

    logs = {h: LogWatch(attack.procs.log_path(h)) for h in attack.hosts}
    attack.server.serve(attack.sim.genesis, other, on_other)
    for host in attack.hosts:
        logs[host].wait_for("from coordinator stream: ForkError")
        assert_still_serving(attack, host, (2, v2.hash))
    advance_honestly(attack)


# --- who signed it ---------------------------------------------------------------------------


def test_a_state_signed_by_a_host_the_domain_does_not_trust_is_refused(attack: Attack) -> None:
    honest = attack.sim.transition(ROTATE, append=False)
    rogue = attack.liar.sign_with_unknown_host(honest, "hsa-9")
    expect_push_refused(attack, rogue, PERMISSION_DENIED, "which the domain does not trust")

    # A trusted host's name on a signature by another key.
    stranger = new_host(attack.sim.domain_id, "hsa-1")
    impostor = attack.liar.resign(honest, stranger.signer, "hsa-1")
    expect_push_refused(attack, impostor, PERMISSION_DENIED, "signature of host hsa-1 does not")

    # The stream delivers the rogue state too; it is refused the same way.
    logs = {h: LogWatch(attack.procs.log_path(h)) for h in attack.hosts}
    attack.server.serve(attack.sim.genesis, rogue)
    for host in attack.hosts:
        logs[host].wait_for("from coordinator stream: UnknownSignerError")
        assert_still_serving(attack, host, (1, attack.sim.genesis.hash))

    attack.sim.states.append(honest)
    attack.server.serve(*attack.sim.states)
    for host in attack.hosts:
        wait_until(lambda: head_of(attack, host) == (2, honest.hash), f"{host} follows v2")  # noqa: B023


# --- host enrollments (issue 21) ----------------------------------------------------------


def test_a_host_that_proves_no_key_is_refused_by_apply_and_in_states(attack: Attack) -> None:
    """A new host enrolled with the domain CA; the attacker takes its certificate (public)
    and pairs it with their own keys, or names a random fingerprint and no certificate. With
    a quorum of genuine approvals, every HSA refuses to apply it and refuses the state a
    compromised producer sealed with it; the honest enrollment then applies."""
    domain_id = attack.sim.domain_id
    real = attack.sim.new_host("hsa-4")
    attacker = new_host(domain_id, "hsa-4")  # the attacker's own keys

    def forged(fingerprint: bytes, certificate: bytes) -> bytes:
        record = domain_pb2.Host()
        record.CopyFrom(attacker.record)
        record.tls_certificate_fingerprint = fingerprint
        return forge_enrollment(
            record,
            domain_id=domain_id,
            signer=attacker.signer,
            tls_signer=attacker.tls_signer,
            certificate=certificate,
        )

    cases = {
        "not signed by the key of its TLS certificate": forged(
            crypto.sha256(real.certificate), real.certificate
        ),
        "carries no TLS certificate": forged(crypto.random_bytes(32), b""),
    }
    for reason, enrollment in cases.items():
        proposal = attack.sim.propose([attack.sim.add_host_change(enrollment=enrollment)])
        approvals = approvals_by(attack, proposal, ["alice", "bob"])
        for host in attack.hosts:
            head = head_of(attack, host)
            log = LogWatch(attack.procs.log_path(host))
            error = refused(
                lambda: attack.server.apply(attack.address(host), proposal.raw, approvals)  # noqa: B023
            )
            assert error.code() == PERMISSION_DENIED, error.details()
            assert reason in error.details()
            log.wait_for("refused to apply a proposal: EnrollmentError: the enrollment of hsa-4")
            assert_still_serving(attack, host, head)
        state = attack.liar.forge(proposal, approvals)
        assert "hsa-4" in state.manifest.hosts_by_id
        expect_push_refused(attack, state, PERMISSION_DENIED, reason)

    advance_honestly(attack, [attack.sim.add_host_change(enrollment=real.enrollment)])


# --- approvals -------------------------------------------------------------------------------


def _expired_proposal(attack: Attack) -> Proposal:
    now = int(time.time())
    return attack.sim.propose(ROTATE, now=now - 7200, expires_in=3600)


def test_bad_approvals_are_refused_by_apply_and_in_states(attack: Attack) -> None:
    proposal = attack.sim.propose(ROTATE)
    alice, bob = approvals_by(attack, proposal, ["alice", "bob"])
    forged_bob = attack.liar.forged_approval(bob, signature=flip_bit(bob.signature, 9))
    by_carol_key = attack.liar.forged_approval(
        approvals_by(attack, proposal, ["carol"])[0], operator_id=bob.operator_id
    )
    other_proposal = attack.sim.propose(ROTATE)
    bob_on_other = approvals_by(attack, other_proposal, ["bob"])[0]
    cases = {
        "forged signature": [alice, forged_bob],
        "signed with another operator's key": [alice, by_carol_key],
        "an approval of another proposal": [
            alice,
            attack.liar.forged_approval(bob_on_other, proposal_id=proposal.id),
        ],
        "duplicated": [alice, alice],
        "too few": [alice],
        "none": [],
    }
    host = "hsa-1"
    address = attack.address(host)
    head = head_of(attack, host)
    log = LogWatch(attack.procs.log_path(host), whole=True)
    for what, approvals in cases.items():
        error = refused(lambda: attack.server.apply(address, proposal.raw, approvals))  # noqa: B023
        assert error.code() == FAILED_PRECONDITION, what
        expected = f"{min(len({a.operator_id for a in approvals}), 1)} of 2 approvals"
        if what == "none":
            expected = "0 of 2 approvals"
        assert expected in error.details(), (what, error.details())
        log.wait_for(f"refused to apply a proposal: QuorumNotMetError: {expected}")
        assert_still_serving(attack, host, head)

        # The same evidence in a state a trusted host signed (a compromised host colludes).
        forged = attack.liar.forge(proposal, approvals)
        expect_push_refused(attack, forged, FAILED_PRECONDITION, expected)

    expired = _expired_proposal(attack)
    approvals = approvals_by(attack, expired, ["alice", "bob"])
    log = LogWatch(attack.procs.log_path(host))
    error = refused(lambda: attack.server.apply(address, expired.raw, approvals))
    assert error.code() == FAILED_PRECONDITION
    assert "expired" in error.details()
    log.wait_for("refused to apply a proposal: ProposalExpiredError: proposal expired")
    forged = attack.liar.forge(expired, approvals)
    expect_push_refused(attack, forged, FAILED_PRECONDITION, "proposal expired")

    # The honest evidence still applies: the HSA seals it (without installing), and the
    # state it seals is accepted everywhere.
    sealed = SealedState.from_message(attack.server.apply(address, proposal.raw, [alice, bob]))
    assert sealed.version == 2
    attack.sim.states.append(sealed)
    attack.server.serve(*attack.sim.states)
    for target in attack.hosts:
        assert attack.server.push(attack.address(target), sealed).version == 2


def test_approvals_of_a_removed_operator_do_not_count(attack: Attack) -> None:
    carol = attack.sim.operators[2]
    v2 = advance_honestly(attack, [attack.sim.remove_operator_change(2)])
    assert carol.operator_id not in v2.manifest.operators_by_id

    proposal = attack.sim.propose(ROTATE)
    approvals = approvals_by(attack, proposal, ["alice", "carol"])
    host = "hsa-2"
    log = LogWatch(attack.procs.log_path(host))
    error = refused(lambda: attack.server.apply(attack.address(host), proposal.raw, approvals))
    assert error.code() == FAILED_PRECONDITION
    assert "1 of 2 approvals" in error.details()
    log.wait_for("refused to apply a proposal: QuorumNotMetError: 1 of 2 approvals")

    forged = attack.liar.forge(proposal, approvals)
    expect_push_refused(attack, forged, FAILED_PRECONDITION, "1 of 2 approvals")
    advance_honestly(attack)


def test_a_proposal_its_named_proposer_never_signed_is_refused(attack: Attack) -> None:
    """Issue 21, item 4: bob and carol approve a set-quorum 1 that names alice as its
    proposer; alice never signed it. Two approvals meet the threshold, but a proposal counts
    only with its proposer's own: ApplyProposal is refused, and so is the state a trusted
    host seals from it anyway, by every HSA's chain check."""
    proposal = attack.sim.propose([attack.sim.set_quorum_change(1)], proposer=0)
    approvals = approvals_by(attack, proposal, ["bob", "carol"])
    reason = "not signed by the proposer it names"
    host = "hsa-1"
    head = head_of(attack, host)
    log = LogWatch(attack.procs.log_path(host))
    error = refused(lambda: attack.server.apply(attack.address(host), proposal.raw, approvals))
    assert error.code() == FAILED_PRECONDITION
    assert "2 of 2 approvals" in error.details()
    assert reason in error.details()
    log.wait_for("refused to apply a proposal: QuorumNotMetError: 2 of 2 approvals")
    assert_still_serving(attack, host, head)

    forged = attack.liar.forge(proposal, approvals)
    expect_push_refused(attack, forged, FAILED_PRECONDITION, reason)
    # With alice's own approval it is an honest change.
    honest = attack.liar.forge(proposal, approvals_by(attack, proposal, ["alice", "bob"]))
    for target in attack.hosts:
        assert attack.server.push(attack.address(target), honest).version == 2


def _unparsed(raw: bytes) -> Proposal:
    """A `Proposal` around bytes that `Proposal.from_bytes` refuses (what a forger builds)."""
    message = domain_pb2.Proposal()
    message.ParseFromString(raw)
    return Proposal(raw=raw, message=message)


def _state_carrying(
    attack: Attack, honest: Proposal, raw: bytes, approvals: list[domain_pb2.Approval]
) -> domain_pb2.SealedState:
    """A state a trusted host sealed for the proposal `raw` (the changes of `honest`), naming
    its id in the manifest and carrying its bytes and approvals as evidence."""
    forged_id = _unparsed(raw).id

    def name_it(manifest: domain_pb2.Manifest) -> None:
        manifest.proposal_id = forged_id

    sealed = attack.liar.forge(honest, mutate=name_it)  # sealing parses: the honest one
    message = domain_pb2.SealedState()
    message.CopyFrom(sealed.message)
    message.proposal = raw  # not under the state hash: the producer's signature still holds
    del message.approvals[:]
    message.approvals.extend(approvals)
    return message


def test_proposals_outside_the_proposal_rules_are_refused(attack: Attack) -> None:
    """Issue 21, items 5 and 6: a proposal with unknown fields, in another encoding, past
    64 KiB, or with a reason that drives a terminal is refused by an HSA asked to apply it,
    and inside a state sealed by a trusted host, with its valid approvals."""
    sim = attack.sim
    proposal = sim.propose([sim.set_quorum_change(1)])
    cases = noncanonical_encodings(proposal)
    for name, reason in (
        ("a reason with a newline", "routine\nproposal  rotate-domain-key"),
        ("a reason with ANSI escapes", "routine\x1b[30;40m(hidden)\x1b[0m"),
        ("a reason with a bidi override", "routine \u202e1 mroqu-tes"),
    ):
        message = domain_pb2.Proposal()
        message.CopyFrom(proposal.message)
        message.reason = reason
        cases[name] = message.SerializeToString(deterministic=True)
    host = "hsa-2"
    address = attack.address(host)
    head = head_of(attack, host)
    for what, raw in cases.items():
        forged_proposal = _unparsed(raw)
        approvals = approvals_by(attack, forged_proposal, ["alice", "bob"])
        error = refused(lambda: attack.server.apply(address, raw, approvals))  # noqa: B023
        assert error.code() == INVALID_ARGUMENT, (what, error.details())
        assert_still_serving(attack, host, head)
        forged = _state_carrying(attack, proposal, raw, approvals)
        for target in attack.hosts:
            before = head_of(attack, target)
            error = refused(lambda: attack.server.push(attack.address(target), forged))  # noqa: B023
            assert error.code() == INVALID_ARGUMENT, (what, target, error.details())
            assert_still_serving(attack, target, before)
    advance_honestly(attack)


# --- damaged states --------------------------------------------------------------------------


def _flips(state: SealedState, count: int, seed: int) -> list[bytes]:
    """`count` single-bit flips of the serialized state, spread over every part."""
    raw = state.to_bytes()
    rng = random.Random(seed)
    bits = rng.sample(range(len(raw) * 8), count)
    return [flip_bit(raw, bit) for bit in bits]


def _structurally_valid(raw: bytes) -> SealedState | None:
    try:
        return SealedState.from_bytes(raw)
    except HsmDomainError:
        return None


def test_a_flipped_bit_anywhere_in_a_sealed_state_is_refused(attack: Attack) -> None:
    v2 = attack.sim.transition(ROTATE)
    host = "hsa-1"
    address = attack.address(host)
    genesis = (1, attack.sim.genesis.hash)
    log = LogWatch(attack.procs.log_path(host))
    reasons: set[str] = set()
    tried = 0
    for raw in _flips(v2, 400, seed=1):
        damaged = _structurally_valid(raw)
        if damaged is None:
            continue  # see test_a_sealed_state_that_does_not_parse_is_refused_and_logged
        tried += 1
        error = refused(lambda: attack.server.push(address, damaged))  # noqa: B023
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details())
        reasons.add(error.details())
    assert tried > 100
    assert head_of(attack, host) == genesis
    for reason in reasons:
        log.wait_for(reason)
    assert_still_serving(attack, host, genesis)
    attack.server.serve(*attack.sim.states)
    assert attack.server.push(address, v2).state_hash == v2.hash


def test_a_sealed_state_that_does_not_parse_is_refused_and_logged(attack: Attack) -> None:
    """Damaged bytes that no longer parse: INVALID_ARGUMENT, and the refusal is in the log.

    Covers InstallState (the outer message or a signed part no longer parses) and the
    coordinator stream.
    """
    v2 = attack.sim.transition(ROTATE)
    host = "hsa-1"
    address = attack.address(host)
    genesis = (1, attack.sim.genesis.hash)
    outcomes: list[str] = []
    reasons: set[str] = set()
    log = LogWatch(attack.procs.log_path(host))
    for raw in [r for r in _flips(v2, 400, seed=2) if _structurally_valid(r) is None][:40]:
        error = refused(lambda: attack.server.push_raw(address, raw))  # noqa: B023
        if error.code() != INVALID_ARGUMENT:
            outcomes.append(f"status {error.code().name}: {error.details()}")
        else:
            reasons.add(error.details())
    assert head_of(attack, host) == genesis
    log.contains("a line that is never written", timeout=1.0)  # let the log catch up
    outcomes += [f"InstallState not logged: {r}" for r in sorted(reasons) if r not in log.text()]

    # On the stream and the pull: a state whose manifest does not parse.
    broken = domain_pb2.SealedState()
    broken.CopyFrom(v2.message)
    broken.manifest = b"\xff" + broken.manifest
    log = LogWatch(attack.procs.log_path(host))
    attack.server.serve(attack.sim.genesis, broken)
    if not log.contains("manifest does not parse", timeout=3.0):
        outcomes.append(
            "a state from the coordinator (stream, pull) that does not parse: not logged"
        )
    assert_still_serving(attack, host, genesis)
    assert not outcomes, "\n".join(sorted(set(outcomes)))


# --- time ------------------------------------------------------------------------------------


def test_a_post_dated_state_and_an_early_rotation_are_refused(attack: Attack) -> None:
    # Well signed by a trusted host, quorum-approved, but dated an hour ahead of the HSAs.
    later = int(time.time()) + 3600
    proposal = attack.sim.propose(ROTATE, now=later)
    post_dated = attack.liar.forge(proposal, attack.sim.approve_quorum(proposal), now=later)
    expect_push_refused(attack, post_dated, FAILED_PRECONDITION, "in the future")

    # A scheduled rotation (no proposal, no approvals) long before it is due.
    early = attack.liar.forge(None)
    expect_push_refused(attack, early, FAILED_PRECONDITION, "domain key rotation is due in")
    advance_honestly(attack)


# --- equivocation ----------------------------------------------------------------------------


def test_an_equivocating_coordinator_is_caught_by_gossip(attack: Attack) -> None:
    """Two valid versions 2, one pushed to each HSA, the stream and the pull serving neither.

    Each HSA accepts the one it is given (both are quorum-approved and honestly sealed), so
    the domain is split. The HSAs gossip: each must notice that its peer holds another state
    for the version it holds, and log the fork.
    """
    genesis = attack.sim.genesis
    first = attack.sim.transition(ROTATE, append=False)
    proposal = attack.sim.propose(ROTATE, base=genesis, proposer=1)
    second = attack.sim.apply(
        proposal, attack.sim.approve(proposal, [1, 2]), "hsa-2", base=genesis, append=False
    )
    assert first.hash != second.hash
    logs = {h: LogWatch(attack.procs.log_path(h)) for h in attack.hosts}
    # Both at once: gossip runs every 0.3 s, and pushed one after the other on a loaded machine
    # the second HSA could take the first state from its peer before its own push arrives.
    with ThreadPoolExecutor(max_workers=2) as pool:
        installed = list(
            pool.map(
                lambda pushed: attack.server.push(attack.address(pushed[0]), pushed[1]),
                [("hsa-1", first), ("hsa-2", second)],
            )
        )
    assert [r.state_hash for r in installed] == [first.hash, second.hash]

    # Gossip runs every 0.3 s here: ten rounds are plenty.
    caught = {h: logs[h].contains("ForkError", timeout=3.0) for h in attack.hosts}
    assert any(caught.values()), (
        "a split domain went unnoticed: hsa-1 holds version 2 "
        f"{first.hash.hex()[:16]}, hsa-2 holds version 2 {second.hash.hex()[:16]}, "
        "and gossip between them logged no fork"
    )
