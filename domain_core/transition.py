"""The state transition function: (state, proposal, approvals, now) -> next manifest.

Invariants every resulting manifest keeps (each violation is its own error type):
- at least one trusted host; 1 <= every threshold <= number of operators;
- no duplicate host id, host key, agreement key, TLS fingerprint, operator id or operator name;
- removing a host rotates the domain key in the same transition;
- at least 2 domain-key generations are retained, so a rotation never drops the generation
  that key records are sealed under before re-wrap moves them (HSAs also refuse a transition
  that drops a generation a stored record still uses: `hsa_node.rewrap`);
- a proposal applies only with a quorum of the *current* operators (genesis: all of them),
  counted against `quorum.required_threshold` (so a change to who may approve, or how many
  must, needs the highest threshold of the old and the new policy), and only with its named
  proposer's own valid approval among them;
- version + 1, previous hash = hash of the current state, created_at never goes back;
- every manifest pins a domain CA certificate for its domain (`DomainSettings.
  domain_ca_certificate`), set by the genesis proposal and never changed after;
- a host is added only through an enrollment that verifies (`enrollment.verify_enrollment`)
  against that CA at the transition's time: it proves possession of the host's signing,
  agreement and TLS keys and binds them to the host id.

The function is deterministic: every verifier recomputes the manifest from the previous state
and the proposal and compares it with the one it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from domain_core import canonical
from domain_core.enrollment import verify_enrollment
from domain_core.errors import (
    DuplicateHostError,
    DuplicateOperatorError,
    HsmDomainError,
    InvalidSettingsError,
    LimitExceededError,
    NoHostsError,
    ProposalError,
    QuorumNotMetError,
    QuorumUnreachableError,
    RotationNotDueError,
    ThresholdOutOfRangeError,
    UnknownHostError,
    UnknownOperatorError,
)
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_GENERATIONS_RETAINED,
    MAX_PROPOSAL_LIFETIME_SECONDS,
    MIN_GENERATIONS_RETAINED,
    MIN_PROPOSAL_LIFETIME_SECONDS,
    MIN_ROTATION_INTERVAL_SECONDS,
    Limits,
)
from domain_core.model import (
    Manifest,
    Proposal,
    added_host,
    change_type_name,
    change_type_of,
    default_settings,
    operator_public_key,
    recovered_hosts,
    recovery_key_of,
)
from domain_core.pki import check_domain_ca
from domain_core.quorum import (
    QuorumResult,
    apply_set_quorum,
    check_applicable,
    count_approvals,
    verify_quorum,
)
from domain_core.recovery_shares import enrollment_signing_input
from domain_proto import domain_pb2


@dataclass(frozen=True)
class StateHead:
    """The verified head of a chain: its manifest and state hash."""

    manifest: Manifest
    state_hash: bytes


def validate_settings(settings: domain_pb2.DomainSettings) -> None:
    """Raise InvalidSettingsError if domain settings are outside their allowed ranges."""
    if settings.key_rotation_interval_seconds < MIN_ROTATION_INTERVAL_SECONDS:
        raise InvalidSettingsError(
            f"key rotation interval must be at least {MIN_ROTATION_INTERVAL_SECONDS}s"
        )
    if (
        not MIN_GENERATIONS_RETAINED
        <= settings.key_generations_retained
        <= MAX_GENERATIONS_RETAINED
    ):
        raise InvalidSettingsError(
            f"key generations retained must be {MIN_GENERATIONS_RETAINED} to "
            f"{MAX_GENERATIONS_RETAINED} (a rotation keeps the generation that key records are "
            f"sealed under until re-wrap moves them), not {settings.key_generations_retained}"
        )
    if not (
        MIN_PROPOSAL_LIFETIME_SECONDS
        <= settings.max_proposal_lifetime_seconds
        <= MAX_PROPOSAL_LIFETIME_SECONDS
    ):
        raise InvalidSettingsError(
            f"proposal lifetime must be {MIN_PROPOSAL_LIFETIME_SECONDS}s to "
            f"{MAX_PROPOSAL_LIFETIME_SECONDS}s"
        )


def removed_hosts(before: domain_pb2.Manifest, after: domain_pb2.Manifest) -> frozenset[str]:
    """Host ids that `before` trusts and `after` no longer does."""
    return frozenset(h.host_id for h in before.hosts) - {h.host_id for h in after.hosts}


def retired_generations(before: domain_pb2.Manifest, after: domain_pb2.Manifest) -> frozenset[int]:
    """Domain-key generations that `before` holds and `after` drops (no HSA keeps them)."""
    return frozenset(g.generation for g in before.key_generations) - {
        g.generation for g in after.key_generations
    }


def _add_host(manifest: domain_pb2.Manifest, host: domain_pb2.Host) -> None:
    for existing in manifest.hosts:
        if existing.host_id == host.host_id:
            raise DuplicateHostError(f"host {host.host_id} is already in the domain")
        if existing.signing_public_key == host.signing_public_key:
            raise DuplicateHostError(
                f"host {host.host_id} has the same signing key as host {existing.host_id}"
            )
        if existing.agreement_public_key == host.agreement_public_key:
            raise DuplicateHostError(
                f"host {host.host_id} has the same agreement key as host {existing.host_id}"
            )
        if existing.tls_certificate_fingerprint == host.tls_certificate_fingerprint:
            raise DuplicateHostError(
                f"host {host.host_id} has the same TLS certificate as host {existing.host_id}"
            )
    manifest.hosts.append(host)


def _remove_host(manifest: domain_pb2.Manifest, host_id: str) -> None:
    for index, host in enumerate(manifest.hosts):
        if host.host_id == host_id:
            del manifest.hosts[index]
            return
    raise UnknownHostError(f"host {host_id} is not in the domain; check `domain status`")


def _add_operator(manifest: domain_pb2.Manifest, operator: domain_pb2.Operator) -> None:
    for existing in manifest.operators:
        if existing.operator_id == operator.operator_id:
            raise DuplicateOperatorError(
                f"operator {operator.operator_id[:16]} ({existing.name}) is already in the domain"
            )
        if existing.name == operator.name:
            raise DuplicateOperatorError(f"an operator named {operator.name!r} already exists")
    manifest.operators.append(operator)


def _remove_operator(manifest: domain_pb2.Manifest, operator_id: str) -> None:
    for index, operator in enumerate(manifest.operators):
        if operator.operator_id == operator_id:
            del manifest.operators[index]
            return
    raise UnknownOperatorError(
        f"operator {operator_id[:16]} is not in the domain; check `domain status`"
    )


def _set_recovery_key(manifest: domain_pb2.Manifest, change: domain_pb2.SetRecoveryKey) -> None:
    """Enroll an operator's recovery key, which the operator signed as theirs."""
    for operator in manifest.operators:
        if operator.operator_id == change.operator_id:
            break
    else:
        raise UnknownOperatorError(
            f"operator {change.operator_id[:16]} is not in the domain; check `domain status`"
        )
    operator_public_key(operator).verify(
        change.signature,
        enrollment_signing_input(manifest.domain_id, operator.operator_id, change.recovery_key),
    )
    operator.recovery_key.CopyFrom(recovery_key_of(change))


def _recover(manifest: domain_pb2.Manifest, proposal: Proposal, change: domain_pb2.Change) -> None:
    """Add the new hosts of a recovery; the lost ones stay until a remove-host moves their
    key records (the domain keys are the ones the session host rebuilt: no rotation here)."""
    if len(proposal.changes) != 1:
        raise ProposalError("a recover change is alone in its proposal")
    if manifest.quorum.recovery_threshold == 0:
        raise ProposalError(
            f"version {manifest.version} of domain {manifest.domain_id} carries no recovery "
            "package (its recovery threshold is 0): it cannot be recovered from this state"
        )
    for host in recovered_hosts(change, manifest.domain_id):
        _add_host(manifest, host)


def _add_generation(manifest: domain_pb2.Manifest, now: int) -> None:
    """Append a new domain key generation; keep only the newest `retained` generations."""
    newest = manifest.key_generations[-1].generation if manifest.key_generations else 0
    manifest.key_generations.append(domain_pb2.KeyGeneration(generation=newest + 1, created_at=now))
    retained = manifest.settings.key_generations_retained
    excess = len(manifest.key_generations) - retained
    if excess > 0:
        del manifest.key_generations[:excess]


def _set_settings(manifest: domain_pb2.Manifest, settings: domain_pb2.DomainSettings) -> None:
    """Replace the settings; the domain CA a state pins is set once (genesis), then kept."""
    pinned = manifest.settings.domain_ca_certificate
    if pinned and settings.domain_ca_certificate != pinned:
        raise InvalidSettingsError(
            "set-settings must keep the domain CA certificate: it is pinned at genesis and "
            "every host enrollment is verified against it (build the settings from the "
            "current ones)"
        )
    manifest.settings.CopyFrom(settings)


def _check_domain_ca(manifest: domain_pb2.Manifest) -> None:
    try:
        check_domain_ca(manifest.settings.domain_ca_certificate, manifest.domain_id)
    except HsmDomainError as error:
        raise InvalidSettingsError(
            f"the domain settings must pin the domain CA certificate: {error.message}"
        ) from None


def _check_invariants(
    manifest: domain_pb2.Manifest, removed_operators: bool, limits: Limits
) -> None:
    if not manifest.hosts:
        raise NoHostsError("the change would leave the domain with no trusted host; keep one")
    if len(manifest.hosts) > limits.max_hosts:
        raise LimitExceededError(f"a domain holds at most {limits.max_hosts} hosts")
    if len(manifest.operators) > limits.max_operators:
        raise LimitExceededError(f"a domain holds at most {limits.max_operators} operators")
    count = len(manifest.operators)
    thresholds = [("default", manifest.quorum.threshold)] + [
        (change_type_name(t.change_type), t.threshold) for t in manifest.quorum.change_thresholds
    ]
    for label, threshold in thresholds:
        if threshold < 1:
            raise ThresholdOutOfRangeError(f"the {label} threshold must be at least 1")
        if threshold > count:
            if removed_operators:
                raise QuorumUnreachableError(
                    f"after the change {count} operators would remain but the {label} "
                    f"threshold is {threshold}: lower the threshold first"
                )
            raise ThresholdOutOfRangeError(
                f"the {label} threshold {threshold} is above the {count} operators"
            )
    recovery = manifest.quorum.recovery_threshold
    enrolled = sum(1 for o in manifest.operators if o.HasField("recovery_key"))
    if recovery > enrolled:
        if removed_operators:
            raise QuorumUnreachableError(
                f"after the change {enrolled} recovery keys would remain but the recovery "
                f"threshold is {recovery}: lower the recovery threshold first"
            )
        raise ThresholdOutOfRangeError(
            f"the recovery threshold {recovery} is above the {enrolled} enrolled recovery keys "
            "(each operator enrolls theirs with set-recovery-key first)"
        )
    validate_settings(manifest.settings)
    _check_domain_ca(manifest)


def apply_changes(
    base: domain_pb2.Manifest, proposal: Proposal, *, now: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[domain_pb2.Manifest, bool]:
    """Apply a proposal's changes in order to a copy of `base`; returns (manifest, rotated).

    Every add-host enrollment is verified against the domain CA of the result (the base's,
    which no change may replace; the genesis proposal's own) at `now`.
    """
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(base)
    rotate = False
    removed_operators = False
    enrollments: list[bytes] = []
    for change in proposal.changes:
        kind = change_type_of(change)
        if kind == domain_pb2.CHANGE_TYPE_ADD_HOST:
            _add_host(manifest, added_host(change, manifest.domain_id))
            enrollments.append(change.add_host.enrollment)
        elif kind == domain_pb2.CHANGE_TYPE_REMOVE_HOST:
            _remove_host(manifest, change.remove_host.host_id)
            rotate = True
        elif kind == domain_pb2.CHANGE_TYPE_ADD_OPERATOR:
            _add_operator(manifest, change.add_operator.operator)
        elif kind == domain_pb2.CHANGE_TYPE_REMOVE_OPERATOR:
            _remove_operator(manifest, change.remove_operator.operator_id)
            removed_operators = True
        elif kind == domain_pb2.CHANGE_TYPE_SET_QUORUM:
            apply_set_quorum(manifest.quorum, change.set_quorum)
        elif kind == domain_pb2.CHANGE_TYPE_SET_SETTINGS:
            _set_settings(manifest, change.set_settings.settings)
        elif kind == domain_pb2.CHANGE_TYPE_ROTATE_DOMAIN_KEY:
            rotate = True
        elif kind == domain_pb2.CHANGE_TYPE_SET_RECOVERY_KEY:
            _set_recovery_key(manifest, change.set_recovery_key)
        elif kind == domain_pb2.CHANGE_TYPE_RECOVER:
            _recover(manifest, proposal, change)
            enrollments.extend(change.recover.enrollments)
    _check_invariants(manifest, removed_operators, limits)
    for enrollment in enrollments:
        verify_enrollment(
            enrollment,
            domain_id=manifest.domain_id,
            ca_certificate=manifest.settings.domain_ca_certificate,
            now=now,
        )
    if rotate:
        _add_generation(manifest, now)
    return manifest, rotate


def _empty_manifest(domain_id: str) -> domain_pb2.Manifest:
    return domain_pb2.Manifest(
        domain_id=domain_id,
        version=0,
        previous_state_hash=canonical.ZERO_HASH,
        quorum=domain_pb2.QuorumPolicy(threshold=0),
        settings=default_settings(),
    )


def genesis_manifest(
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    now: int,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[domain_pb2.Manifest, QuorumResult]:
    """Genesis: the proposal builds the domain from nothing and every listed operator signs."""
    if proposal.base_version != 0 or proposal.base_state_hash != canonical.ZERO_HASH:
        raise ProposalError("a genesis proposal has base version 0 and a zero base hash")
    if now >= proposal.expires_at:
        raise ProposalError("the genesis proposal has expired; run the ceremony again")
    base = _empty_manifest(proposal.domain_id)
    # The genesis proposal must set the default threshold itself; the empty state has 0.
    manifest, _ = apply_changes(base, proposal, now=now, limits=limits)
    operator_keys = {o.operator_id: operator_public_key(o) for o in manifest.operators}
    if proposal.proposer_id not in operator_keys:
        raise ProposalError("the genesis proposer is not one of the genesis operators")
    everyone = len(manifest.operators)
    result = count_approvals(
        manifest.operators,
        operator_keys,
        proposal.id,
        approvals,
        everyone,
        f"{everyone}: genesis needs every operator it names",
        proposer_id=proposal.proposer_id,
    )
    if not result.met:
        raise QuorumNotMetError(
            f"genesis needs every operator's approval: {len(result.approved_by)} of "
            f"{len(manifest.operators)}"
        )
    del manifest.key_generations[:]
    manifest.key_generations.append(domain_pb2.KeyGeneration(generation=1, created_at=now))
    manifest.version = 1
    manifest.previous_state_hash = canonical.ZERO_HASH
    manifest.created_at = now
    manifest.proposal_id = proposal.id
    return manifest, result


def next_manifest(
    head: StateHead,
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    now: int,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[domain_pb2.Manifest, QuorumResult]:
    """The manifest that an approved proposal produces from the head of the chain."""
    current = head.manifest
    if now < current.created_at:
        raise ProposalError(
            "this node's clock is behind the current domain state; fix the clock and retry"
        )
    # The proposal must target this state; then the invariants (their errors say the most
    # precise thing about an impossible change); then the quorum under the current operators.
    check_applicable(current, head.state_hash, proposal, now=now)
    manifest, _ = apply_changes(current.message, proposal, now=now, limits=limits)
    result = verify_quorum(current, head.state_hash, proposal, approvals, now=now)
    manifest.version = current.version + 1
    manifest.previous_state_hash = head.state_hash
    manifest.created_at = now
    manifest.proposal_id = proposal.id
    return manifest, result


def rotation_due_at(manifest: Manifest) -> int:
    """When the current domain key generation becomes due for scheduled rotation."""
    return (
        manifest.message.key_generations[-1].created_at
        + manifest.message.settings.key_rotation_interval_seconds
    )


def scheduled_rotation_manifest(head: StateHead, *, now: int) -> domain_pb2.Manifest:
    """The next manifest of a scheduled rotation (no proposal): refused before it is due."""
    current = head.manifest
    if now < current.created_at:
        raise ProposalError(
            "this node's clock is behind the current domain state; fix the clock and retry"
        )
    due = rotation_due_at(current)
    if now < due:
        raise RotationNotDueError(
            f"domain key rotation is due in {due - now}s; a quorum-approved "
            "rotate-domain-key proposal can rotate earlier"
        )
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(current.message)
    _add_generation(manifest, now)
    manifest.version = current.version + 1
    manifest.previous_state_hash = head.state_hash
    manifest.created_at = now
    manifest.proposal_id = b""
    return manifest
