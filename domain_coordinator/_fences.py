"""Fences: key-record writes refused while a change that would strand them is under way.

Invariants: once a proposal that removes host H has its quorum (and until it is closed), H may
not write key records, and no record is stored under a domain-key generation that a quorate
proposal or a due scheduled rotation retires. A change's fence is set before any HSA is asked
to produce its state (`fence`), and a write is checked against the fences with the write
under one lock (`held`), so the records the producing HSA lists are all there are
(`hsa_node.rewrap`). The fences are recomputed from the head, the quorate pending proposals
and a due rotation at start and on every sweep (`refresh`), so those of closed changes go.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from domain_coordinator._checked import CheckedProposal
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalState
from domain_core import transition
from domain_core.errors import HsmDomainError
from domain_core.limits import Limits
from domain_core.model import Proposal, SealedState
from domain_proto import domain_pb2


@dataclass(frozen=True)
class FenceSet:
    """Key-record writes refused while a change that would strand them is under way."""

    hosts: Mapping[str, str]
    """Host id -> why it is being removed."""
    generations: Mapping[int, str]
    """Domain-key generation -> why it is being retired."""


_NO_FENCES = FenceSet({}, {})
_Strands = tuple[dict[str, str], dict[int, str]]


@dataclass(eq=False, repr=False)
class Fences:
    """The current fences, set by the changes under way (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    limits: Limits
    now: Callable[[], int]
    writes: threading.RLock
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _fences: FenceSet = field(init=False, default=_NO_FENCES)

    @contextmanager
    def held(self) -> Iterator[FenceSet]:
        """The fences, held (no change sets a fence) until the block ends: check a write
        against them and make it inside."""
        with self._lock:
            yield self._fences

    def fence(self, head: SealedState, proposal: Proposal | None) -> None:
        """Add the fences of one change (a proposal, or the scheduled rotation for None)."""
        hosts, generations = (
            self._proposal_fences(head, proposal)
            if proposal is not None
            else self._rotation_fences(head)
        )
        if not hosts and not generations:
            return
        with self._lock:
            current = self._fences
            self._fences = FenceSet(
                {**hosts, **current.hosts}, {**generations, **current.generations}
            )

    def refresh(self, candidates: Sequence[bytes]) -> dict[bytes, CheckedProposal]:
        """Recompute the fences from the head, the candidates that have a quorum and a due
        rotation; the pending candidates, parsed and counted (for the sweep to apply)."""
        with self.writes:  # not between another call's fence and its apply
            head = self.chain.head
            hosts, generations = self._rotation_fences(head)
            counted: dict[bytes, CheckedProposal] = {}
            for proposal_id in candidates:
                record = self.store.get_proposal(proposal_id)
                if record is None or record.state is not ProposalState.PENDING:
                    continue
                try:
                    view = CheckedProposal.from_record(record, self.limits)
                    met = view.approvals_under(head).met
                except (HsmDomainError, DecodeError):
                    continue
                counted[proposal_id] = view
                if not met:
                    continue
                more_hosts, more_generations = self._proposal_fences(head, view.proposal)
                hosts.update(more_hosts)
                generations.update(more_generations)
            with self._lock:
                self._fences = FenceSet(hosts, generations)
            return counted

    @staticmethod
    def _strands(head: SealedState, manifest: domain_pb2.Manifest, why: str) -> _Strands:
        before = head.manifest.message
        return (
            dict.fromkeys(transition.removed_hosts(before, manifest), why),
            dict.fromkeys(transition.retired_generations(before, manifest), why),
        )

    def _proposal_fences(self, head: SealedState, proposal: Proposal) -> _Strands:
        """What a proposal would strand, from the head (nothing if it does not apply)."""
        try:
            manifest, _ = transition.apply_changes(
                head.manifest.message, proposal, now=self.now(), limits=self.limits
            )
        except HsmDomainError:
            return {}, {}
        return self._strands(
            head, manifest, f"proposal {proposal.id.hex()[:16]} reached its quorum"
        )

    def _rotation_fences(self, head: SealedState) -> _Strands:
        """What the scheduled rotation would strand, once it is due (nothing before)."""
        try:
            manifest = transition.scheduled_rotation_manifest(
                transition.StateHead(head.manifest, head.hash), now=self.now()
            )
        except HsmDomainError:
            return {}, {}
        return self._strands(head, manifest, "the scheduled domain key rotation is due")
