"""Producing the next domain state: the successor a host seals over its verified head.

A producing HSA works in two steps, so that it can act between them (move the key records the
change would strand: `hsa_node.producer`):
1. `for_proposal` (a quorum-approved proposal: `transition.next_manifest`) or
   `for_scheduled_rotation` (a due scheduled rotation: `transition.scheduled_rotation_manifest`)
   computes the next manifest, a `Successor`, which says what it removes and retires;
2. `seal` seals the domain keys for that manifest (`sealing.next_domain_keys`: listed
   generations kept, new ones created, dropped ones gone) to the manifest's hosts and signs
   the state as the producing host (`sealing.seal_state`).

A recover proposal is produced in one step by its session host, which holds no domain key of
its own: `seal_recovery` rebuilds the keys from the operators' contributions
(`recovery.rebuild_keys`, checked against the chain) and seals the state.

Pure: no I/O, no gRPC, no threads; the clock is passed in.

Invariants:
- every rule of the transition holds (`domain_core.transition`: quorum of the current
  operators, invariants, version + 1, previous hash, time never going back); a scheduled
  rotation is refused before it is due;
- a host never produces a state that removes it (FailedPreconditionError naming it: another
  HSA must apply the proposal), checked before anything is sealed;
- the sealed state carries the proposal and the approvals it was produced from, and the
  domain keys of exactly the generations its manifest lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from domain_core import crypto, recovery, sealing
from domain_core.errors import FailedPreconditionError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import Proposal, SealedState
from domain_core.quorum import QuorumResult
from domain_core.signers import Signer
from domain_core.transition import (
    StateHead,
    next_manifest,
    removed_hosts,
    retired_generations,
    scheduled_rotation_manifest,
)
from domain_proto import domain_pb2

__all__ = [
    "Successor",
    "for_proposal",
    "for_scheduled_rotation",
    "seal",
    "seal_recovery",
]


@dataclass(frozen=True)
class Successor:
    """The next manifest over `head`, not sealed yet, and what it was made from."""

    head: SealedState
    manifest: domain_pb2.Manifest
    proposal: Proposal | None = None
    """None for a scheduled rotation."""
    approvals: tuple[domain_pb2.Approval, ...] = ()
    quorum: QuorumResult | None = None
    """The quorum the proposal met (None for a scheduled rotation)."""

    def describe(self) -> str:
        """One line for the log: the quorum the proposal met, or that it is a rotation."""
        return self.quorum.describe() if self.quorum is not None else "scheduled rotation"

    @property
    def version(self) -> int:
        """The version of the state this successor becomes."""
        return int(self.manifest.version)

    @property
    def removed_hosts(self) -> frozenset[str]:
        """Hosts the head trusts and this successor no longer does."""
        return removed_hosts(self.head.manifest.message, self.manifest)

    @property
    def retired_generations(self) -> frozenset[int]:
        """Domain-key generations the head holds and this successor drops."""
        return retired_generations(self.head.manifest.message, self.manifest)


def for_proposal(
    head: SealedState,
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    producer_host_id: str,
    now: int,
    limits: Limits = DEFAULT_LIMITS,
) -> Successor:
    """The successor an approved proposal makes of `head`, if `producer_host_id` may seal it
    (FailedPreconditionError when the proposal removes that host)."""
    approvals = tuple(approvals)
    manifest, quorum = next_manifest(
        StateHead(head.manifest, head.hash), proposal, approvals, now=now, limits=limits
    )
    if all(h.host_id != producer_host_id for h in manifest.hosts):
        raise FailedPreconditionError(
            f"this proposal removes {producer_host_id}, which therefore cannot seal the next "
            "state; ask another HSA to apply it"
        )
    return Successor(head, manifest, proposal, approvals, quorum)


def for_scheduled_rotation(head: SealedState, *, now: int) -> Successor:
    """The successor of a scheduled domain key rotation (RotationNotDueError before it is
    due)."""
    return Successor(
        head, scheduled_rotation_manifest(StateHead(head.manifest, head.hash), now=now)
    )


def seal(
    successor: Successor,
    current_keys: Mapping[int, bytes],
    *,
    producer_host_id: str,
    producer: Signer,
) -> SealedState:
    """Seal `successor` with the domain keys its manifest lists (from `current_keys`, the
    head's, plus fresh ones) and sign it as the producing host."""
    return sealing.seal_state(
        successor.manifest,
        sealing.next_domain_keys(current_keys, successor.manifest),
        producer_host_id=producer_host_id,
        producer=producer,
        proposal=successor.proposal,
        approvals=successor.approvals,
    )


def seal_recovery(
    states: Sequence[SealedState],
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    producer_host_id: str,
    producer: Signer,
    session_public_key: bytes,
    agree: Callable[[bytes], bytes],
    now: int,
    limits: Limits = DEFAULT_LIMITS,
) -> SealedState:
    """The state a quorum-approved recover proposal makes of the newest of `states` (the
    verified chain), sealed by its session host `producer_host_id` with the domain keys
    rebuilt from the contributions of the approvals that count; the approvals it keeps carry
    no share."""
    recover = recovery.recover_change(proposal)
    if recover is None:
        raise FailedPreconditionError("this proposal recovers nothing")
    head = states[-1]
    manifest, quorum = next_manifest(
        StateHead(head.manifest, head.hash), proposal, approvals, now=now, limits=limits
    )
    if recover.session_host_id != producer_host_id:
        raise FailedPreconditionError(
            f"the session host of this recovery is {recover.session_host_id}, not "
            f"{producer_host_id}: only it holds the session key"
        )
    if not crypto.constant_time_equal(recover.session_public_key, session_public_key):
        raise FailedPreconditionError(
            f"{producer_host_id} holds another recovery session key than this proposal names: "
            "the session was opened again or abandoned; contribute to the current one"
        )
    counted = [a for a in approvals if a.operator_id in quorum.approved_by]
    keys = recovery.rebuild_keys(
        states, proposal.id, counted, session_public_key=session_public_key, agree=agree
    )
    kept = [
        domain_pb2.Approval(
            proposal_id=a.proposal_id, operator_id=a.operator_id, signature=a.signature
        )
        for a in counted
    ]
    return sealing.seal_state(
        manifest,
        keys,
        producer_host_id=producer_host_id,
        producer=producer,
        proposal=proposal,
        approvals=kept,
    )
