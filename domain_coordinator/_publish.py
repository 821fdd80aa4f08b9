"""Making a stored state known: adopted by the verified chain, then pushed to the HSAs.

Invariants: a state is published only after it was stored (with the compare-and-swap on the
version) and verified as the successor of the head; publishing adopts it (WatchStates streams
wake), closes the pending proposals it overtook, then pushes it (`InstallState`) to every
registered host it lists, each in a thread of its own. Hosts it does not list (removed, or
not yet added) are not pushed to; they pull when they want to follow. What an HSA answers to
a push is handed to the caller's sink (`HsaReports.record_report`), never believed here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from domain_coordinator._hsa import HsaConnections, describe_rpc_error
from domain_coordinator._proposals import ProposalBook
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore
from domain_core.model import SealedState
from domain_edge.faults import unsafe_crash_point

log = logging.getLogger(__name__)

# What an HSA answered to a push: (host id, version, state hash, how it was reported).
AnswerSink = Callable[[str, int, bytes, str], None]


@dataclass(eq=False, repr=False)
class Pusher:
    """Sends InstallState to the registered hosts of a state, each in its own thread."""

    store: CoordinatorStore
    hsas: HsaConnections

    def push(self, state: SealedState, answers: AnswerSink) -> None:
        """Push `state` to every registered host it lists; each answer goes to `answers`."""
        members = state.manifest.hosts_by_id
        for hsa in self.store.list_hsas():
            if hsa.host_id not in members:
                continue
            threading.Thread(
                target=self._push_one,
                args=(hsa.host_id, hsa.address, state, answers),
                name=f"push-{hsa.host_id}",
                daemon=True,
            ).start()

    def _push_one(
        self, host_id: str, address: str, state: SealedState, answers: AnswerSink
    ) -> None:
        try:
            response = self.hsas.install_state(address, state.message, host_id=host_id)
        except grpc.RpcError as error:
            log.info(
                "pushing version %d to %s failed (%s); it will pull",
                state.version,
                host_id,
                describe_rpc_error(error),
            )
        except RuntimeError:
            pass  # shutting down
        else:
            log.info("pushed version %d to %s", state.version, host_id)
            unsafe_crash_point("during_push")
            answers(host_id, response.version, response.state_hash, "InstallState")


@dataclass(eq=False, repr=False)
class Publisher:
    """Publishes a state this coordinator produced and stored (see the module invariants)."""

    chain: VerifiedChain
    book: ProposalBook
    pusher: Pusher
    answers: AnswerSink

    def advance(self, state: SealedState) -> None:
        """Adopt a stored state, push it, then stale the proposals it overtook (the pushes go
        out first: the HSAs wait for nothing the store has to find)."""
        self.chain.adopt(state)
        self.pusher.push(state, self.answers)
        self.book.close_due()
