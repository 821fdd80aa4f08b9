"""Fences: key-record writes refused while a change that would strand them is under way.

Invariants: once a proposal that removes host H has its quorum (and until it is closed), H may
not write key records, and no record is stored under a domain-key generation that a quorate
proposal or a due scheduled rotation retires. A change's fence is set before any HSA is asked
to produce its state (`fence`), and a write is checked against the fences and stored only if
they are still the ones it was checked against (`current`, then a compare of their revision in
the write's own transaction), so the records the producing HSA lists are all there are
(`hsa_node.rewrap`). The fences are recomputed from the head, the quorate pending proposals
and a due rotation at start and on every sweep (`refresh`), so those of closed changes go.

The fences live in the store (`CoordinatorStore.get_fences`), shared by every replica: a
change of them is a compare-and-swap on their revision, and a key write names the revision it
was checked against (`put_key(fences_revision=...)`), so a write checked on one replica never
lands after another replica fenced it (`FencesChangedError`: re-read, check again). Each
replica keeps the last fences it read; a notice that another replica changed them
(`mark_stale`) or a refused write makes it read them again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from domain_coordinator._checked import CheckedProposal
from domain_coordinator._coordination import WriteLock
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalState
from domain_core import transition
from domain_core.errors import ConflictError, HsmDomainError
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
_SET_ATTEMPTS = 16  # compare-and-swap rounds against other replicas before giving up

log = logging.getLogger(__name__)


def encode_fences(fences: FenceSet) -> bytes:
    """The stored form of a fence set: canonical JSON."""
    document = {
        "hosts": dict(sorted(fences.hosts.items())),
        "generations": {str(g): why for g, why in sorted(fences.generations.items())},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def decode_fences(value: bytes) -> FenceSet:
    """A stored fence set (none for b""); ValueError when the bytes are not one."""
    if not value:
        return _NO_FENCES
    document = json.loads(value)
    hosts, generations = document["hosts"], document["generations"]
    if not isinstance(hosts, dict) or not isinstance(generations, dict):
        raise ValueError("fences are two objects")
    return FenceSet(
        {str(h): str(why) for h, why in hosts.items()},
        {int(g): str(why) for g, why in generations.items()},
    )


@dataclass(eq=False, repr=False)
class Fences:
    """The current fences, set by the changes under way (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    limits: Limits
    now: Callable[[], int]
    writes: WriteLock
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _fences: FenceSet = field(init=False, default=_NO_FENCES)
    _revision: int = field(init=False, default=-1)  # -1: not read yet, or stale

    def current(self) -> tuple[FenceSet, int]:
        """The fences as last read and their stored revision: check a write against them and
        make it naming the revision (`put_key(fences_revision=...)`). The store refuses the
        write if a fence was set since, on this replica or another (FencesChangedError), so
        writes are checked in parallel and none lands after a fence it was not checked
        against."""
        with self._lock:
            if self._revision < 0:
                self._read()
            return self._fences, self._revision

    def mark_stale(self) -> None:
        """Read the fences again before the next write is checked (another replica changed
        them, or a write found them changed)."""
        with self._lock:
            self._revision = -1

    def _read(self) -> None:
        """Take the stored fences (with `_lock` held)."""
        record = self.store.get_fences()
        try:
            fences = decode_fences(record.value)
        except (ValueError, KeyError, TypeError, AttributeError):
            # Only a hostile or broken store holds these; the next refresh writes them anew.
            log.warning(
                "the stored fences (revision %d) do not parse; ignoring them", record.revision
            )
            fences = _NO_FENCES
        self._fences, self._revision = fences, record.revision

    def _change(self, change: Callable[[FenceSet], FenceSet]) -> None:
        """Store `change(current)` with a compare-and-swap, re-reading after a lost race."""
        with self._lock:
            for _ in range(_SET_ATTEMPTS):
                self._read()
                wanted = change(self._fences)
                if wanted == self._fences:
                    return
                try:
                    revision = self.store.set_fences(encode_fences(wanted), self._revision)
                except ConflictError:
                    continue
                self._fences, self._revision = wanted, revision
                return
            raise ConflictError(
                "the fences changed on every attempt (other coordinator replicas keep changing "
                "them); retry"
            )

    def fence(self, head: SealedState, proposal: Proposal | None) -> None:
        """Add the fences of one change (a proposal, or the scheduled rotation for None)."""
        hosts, generations = (
            self._proposal_fences(head, proposal)
            if proposal is not None
            else self._rotation_fences(head)
        )
        if not hosts and not generations:
            return
        self._change(
            lambda current: FenceSet(
                {**hosts, **current.hosts}, {**generations, **current.generations}
            )
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
            computed = FenceSet(hosts, generations)
            self._change(lambda _: computed)
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
