"""Verifying the chain of sealed states from a pinned genesis (a TUF-style trust state).

A `TrustedChain` starts from the pinned domain id and genesis hash and accepts a state N+1
only if:
- its domain id is the pinned one and its version is exactly N+1 (lower: rollback; equal
  with another hash: fork; higher: gap, fetch the missing states first);
- its previous hash is the hash of N;
- it is signed by a host trusted in N, or, for a recover state, by the session host its
  quorum-approved proposal names;
- it carries a proposal with a quorum of N's operators and is exactly the manifest that the
  proposal produces from N, or it carries no proposal and is exactly a scheduled rotation of N
  that was due;
- its sealed secrets carry the recovery package its policy asks for, of the right shape
  (`recovery.check_package`: threshold, one share per enrolled recovery key, in order), and
  none when the policy asks for none.
It never goes back, and it remembers the hash of every version it accepted so that a
different state for a known version is reported as a fork.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from domain_core.errors import (
    BadSignatureError,
    ChainGapError,
    ForkError,
    FutureStateError,
    GenesisMismatchError,
    MalformedMessageError,
    RollbackError,
    TransitionMismatchError,
    UnknownSignerError,
    WrongDomainError,
)
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import SealedState
from domain_core.quorum import QuorumResult
from domain_core.recovery import check_package, recover_change
from domain_core.sealing import state_signing_message
from domain_core.transition import (
    StateHead,
    genesis_manifest,
    next_manifest,
    scheduled_rotation_manifest,
)


def _check_producer(state: SealedState, trusted_in: SealedState | None) -> None:
    """The producer must be a host of the previous state and of the state it produced.

    A host that the state removes must not produce it: it would know the new domain key.
    For genesis, the producer must be a genesis host.
    """
    manifest = trusted_in.manifest if trusted_in is not None else state.manifest
    producer = state.message.producer_host_id
    key = manifest.host_signing_key(producer)
    if key is None:
        raise UnknownSignerError(
            f"state version {state.version} is signed by host "
            f"{producer[:64]!r}, which the domain does not trust"
        )
    if producer not in state.manifest.hosts_by_id:
        raise UnknownSignerError(
            f"state version {state.version} is signed by host {producer!r}, which that state "
            "removes: a removed host must not produce the state that removes it"
        )
    try:
        key.verify(state.message.producer_signature, state_signing_message(state.hash))
    except BadSignatureError:
        raise BadSignatureError(
            f"state version {state.version}: the signature of host "
            f"{state.message.producer_host_id} does not verify"
        ) from None


def _check_evidence(state: SealedState) -> None:
    """The recovery package the policy asks for, and approvals without recovery shares."""
    check_package(state.manifest, state.secrets)
    if any(a.HasField("recovery_contribution") for a in state.approvals):
        raise MalformedMessageError(
            f"state version {state.version} keeps a recovery share in an approval: the session "
            "host drops them before it seals the state"
        )


def verify_genesis(state: SealedState, domain_id: str, genesis_hash: bytes) -> QuorumResult:
    """Verify a genesis state against the pinned domain id and hash."""
    if state.manifest.domain_id != domain_id:
        raise WrongDomainError(
            f"genesis is for domain {state.manifest.domain_id!r}, expected {domain_id!r}"
        )
    if state.version != 1:
        raise GenesisMismatchError(f"a genesis state has version 1, not {state.version}")
    if state.hash != genesis_hash:
        raise GenesisMismatchError(
            "the genesis state does not match the pinned genesis hash: wrong domain or forged"
        )
    if state.proposal is None:
        raise GenesisMismatchError("the genesis state carries no genesis proposal")
    _check_producer(state, None)
    _check_evidence(state)
    expected, result = genesis_manifest(
        state.proposal, state.approvals, now=state.manifest.created_at
    )
    if expected != state.manifest.message:
        raise TransitionMismatchError(
            "the genesis manifest is not what its genesis proposal produces"
        )
    return result


def verify_successor(
    head: SealedState,
    state: SealedState,
    *,
    now: int | None = None,
    max_clock_skew: int = DEFAULT_LIMITS.max_clock_skew_seconds,
) -> QuorumResult | None:
    """Verify that `state` is a valid direct successor of the verified `head`.

    The state's own `created_at` is the time its proposal's lifetime and a scheduled
    rotation's due date are judged at; with `now` (the verifier's clock) a state dated more
    than `max_clock_skew` seconds in the future is refused, so a producer cannot post-date a
    state to make a rotation due early or to stall honest producers.
    """
    if now is not None and state.manifest.created_at > now + max_clock_skew:
        raise FutureStateError(
            f"state version {state.version} is dated "
            f"{state.manifest.created_at - now}s in the future; check the clocks of this node "
            f"and of host {state.message.producer_host_id}"
        )
    if state.manifest.domain_id != head.manifest.domain_id:
        raise WrongDomainError(
            f"state is for domain {state.manifest.domain_id!r}, expected "
            f"{head.manifest.domain_id!r}"
        )
    if state.version != head.version + 1:
        raise ChainGapError(f"state version {state.version} does not follow {head.version}")
    if state.manifest.message.previous_state_hash != head.hash:
        raise ForkError(
            f"state version {state.version} does not follow the verified state "
            f"{head.version}: its previous hash differs (a fork)"
        )
    recover = recover_change(state.proposal) if state.proposal is not None else None
    # A recover state is produced by its session host, a host of that state only: the
    # operators' quorum over the proposal that names it is what it is trusted by.
    _check_producer(state, head if recover is None else None)
    if recover is not None and state.message.producer_host_id != recover.session_host_id:
        raise UnknownSignerError(
            f"state version {state.version} recovers the domain, so its producer is the "
            f"session host {recover.session_host_id}, not {state.message.producer_host_id}"
        )
    _check_evidence(state)
    now = state.manifest.created_at
    prior = StateHead(head.manifest, head.hash)
    result: QuorumResult | None
    if state.proposal is not None:
        if state.manifest.message.proposal_id != state.proposal.id:
            raise TransitionMismatchError(
                f"state version {state.version} names another proposal than it carries"
            )
        expected, result = next_manifest(prior, state.proposal, state.approvals, now=now)
    else:
        if state.approvals:
            raise TransitionMismatchError(
                f"state version {state.version} carries approvals but no proposal"
            )
        expected = scheduled_rotation_manifest(prior, now=now)
        result = None
    if expected != state.manifest.message:
        raise TransitionMismatchError(
            f"state version {state.version} is not what its "
            f"{'proposal' if state.proposal else 'scheduled rotation'} produces from version "
            f"{head.version}"
        )
    return result


class TrustedChain:
    """The verified chain of one domain, as far as this node knows it."""

    def __init__(self, domain_id: str, genesis_hash: bytes, head: SealedState) -> None:
        """Use `from_genesis` or `resume`; this constructor trusts `head` as given."""
        self.domain_id = domain_id
        self.genesis_hash = genesis_hash
        self._head = head
        self._known: dict[int, bytes] = {head.version: head.hash}

    @classmethod
    def from_genesis(
        cls, domain_id: str, genesis_hash: bytes, genesis: SealedState
    ) -> TrustedChain:
        """Start a chain from a genesis state that must match the pinned hash."""
        verify_genesis(genesis, domain_id, genesis_hash)
        return cls(domain_id, genesis_hash, genesis)

    @classmethod
    def resume(
        cls,
        domain_id: str,
        genesis_hash: bytes,
        trusted_head: SealedState,
        known_hashes: dict[int, bytes] | None = None,
    ) -> TrustedChain:
        """Resume from a state this node verified earlier and kept on its own disk."""
        if trusted_head.manifest.domain_id != domain_id:
            raise WrongDomainError("the stored state belongs to another domain")
        if trusted_head.version == 1 and trusted_head.hash != genesis_hash:
            raise GenesisMismatchError("the stored genesis does not match the pinned hash")
        chain = cls(domain_id, genesis_hash, trusted_head)
        if known_hashes:
            chain._known.update(known_hashes)
            chain._known[trusted_head.version] = trusted_head.hash
        return chain

    @property
    def head(self) -> SealedState:
        """The newest verified state."""
        return self._head

    @property
    def version(self) -> int:
        return self._head.version

    def known_hash(self, version: int) -> bytes | None:
        """The hash of a version this chain accepted, if it saw that version."""
        return self._known.get(version)

    def classify(self, state: SealedState) -> None:
        """Raise RollbackError/ForkError/ChainGapError for a state that is not N+1."""
        if state.manifest.domain_id != self.domain_id:
            raise WrongDomainError(
                f"state is for domain {state.manifest.domain_id!r}, expected {self.domain_id!r}"
            )
        known = self._known.get(state.version)
        if known is not None and known != state.hash:
            raise ForkError(
                f"two different states claim version {state.version}: a fork; "
                "keeping the verified one"
            )
        if state.version <= self.version:
            if known is None or state.version < self.version:
                raise RollbackError(
                    f"state version {state.version} is older than the verified version "
                    f"{self.version}: refusing to go back"
                )
        elif state.version > self.version + 1:
            raise ChainGapError(
                f"state version {state.version} skips versions after {self.version}: "
                "fetch the states in between first"
            )

    def update(self, state: SealedState, *, now: int | None = None) -> bool:
        """Accept the next state. True if the chain advanced; False if it is the current head.

        Pass `now` (this node's clock) for states that arrive from others; replaying states
        this node verified before needs no clock.

        Raises a ChainError (rollback, fork, gap, mismatch) or a signature/quorum error; the
        chain is unchanged whenever this raises.
        """
        if state.version == self.version and state.hash == self._head.hash:
            return False
        self.classify(state)
        verify_successor(self._head, state, now=now)
        self._head = state
        self._known[state.version] = state.hash
        return True

    def extend(self, states: Iterable[SealedState]) -> int:
        """Accept states in order, skipping ones already held; returns how many were new."""
        advanced = 0
        for state in states:
            if state.version < self.version and self._known.get(state.version) == state.hash:
                continue
            if self.update(state):
                advanced += 1
        return advanced


def verify_chain(
    domain_id: str,
    genesis_hash: bytes,
    states: Sequence[SealedState],
) -> TrustedChain:
    """Verify a whole chain, genesis first; returns the trusted chain at its last state."""
    if not states:
        raise GenesisMismatchError("an empty chain has no genesis")
    chain = TrustedChain.from_genesis(domain_id, genesis_hash, states[0])
    for state in states[1:]:
        if not chain.update(state):
            raise ForkError(f"state version {state.version} appears twice in the chain")
    return chain
