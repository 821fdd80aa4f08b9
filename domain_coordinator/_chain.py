"""Building the coordinator's verified chain at startup, from the store and the pinned genesis.

Invariants: the coordinator serves only states it verified itself, from the pinned genesis
hash on; a store whose genesis is not the pinned one, or that holds any state that does not
verify as the successor of the one before it, is refused with the version and the reason.
An empty store gets the pinned genesis (after it verifies) as version 1.
"""

from __future__ import annotations

import contextlib

from domain_coordinator.store import CoordinatorStore
from domain_core.chain import TrustedChain
from domain_core.errors import ChainError, ConflictError, HsmDomainError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState

_PAGE = 100


class StoredChainError(ChainError):
    """The coordinator's store holds a chain that does not verify; it refuses to serve it."""


def _parse(raw: bytes, version: int, limits: Limits) -> SealedState:
    try:
        state = SealedState.from_bytes(raw, limits)
    except HsmDomainError as error:
        raise StoredChainError(
            f"stored state version {version} is not a valid state ({error}); "
            "the store was damaged or edited"
        ) from None
    if state.version != version:
        raise StoredChainError(
            f"stored state version {version} claims to be version {state.version}: "
            "the store was damaged or edited"
        )
    return state


def load_chain(
    store: CoordinatorStore,
    domain_id: str,
    genesis_hash: bytes,
    genesis_raw: bytes,
    limits: Limits = DEFAULT_LIMITS,
) -> TrustedChain:
    """Verify the stored chain from the pinned genesis (storing genesis in an empty store)."""
    try:
        genesis = SealedState.from_bytes(genesis_raw, limits)
        TrustedChain.from_genesis(domain_id, genesis_hash, genesis)
    except HsmDomainError as error:
        raise StoredChainError(f"the genesis state file does not verify: {error}") from None
    if store.latest_version() == 0:
        # Another coordinator on the same store may store it first: it is verified below.
        with contextlib.suppress(ConflictError):
            store.append_state(1, genesis_raw)
    stored_genesis = store.get_state(1)
    if stored_genesis is None:
        raise StoredChainError("the store holds states but no genesis (version 1)")
    first = _parse(stored_genesis, 1, limits)
    if first.hash != genesis_hash:
        raise StoredChainError(
            "stored state version 1 is not the pinned genesis state: the store belongs to "
            "another domain or was edited"
        )
    chain = TrustedChain.from_genesis(domain_id, genesis_hash, first)
    while True:
        batch = store.states_after(chain.version, _PAGE)
        if not batch:
            return chain
        for raw in batch:
            version = chain.version + 1
            state = _parse(raw, version, limits)
            try:
                chain.update(state)
            except HsmDomainError as error:
                raise StoredChainError(
                    f"stored state version {version} does not verify after version "
                    f"{chain.version}: {error}"
                ) from None
