"""What HSAs report about their state: relayed, checked for forks, and a store behind repaired.

Invariants:
- the version and state hash listed for each HSA (`ListHsas`, `GetDomainStatus`) are that
  HSA's self-report (in `RegisterHsa`, or its answer to an `InstallState` push), relayed for
  operators to see; nothing here or anywhere else bases a trust decision on them (a report
  above the head only starts the repair below, which stores only what verifies);
- an HSA that reports another state than this coordinator's chain has for a version is
  logged at WARNING as a fork (throttled);
- a store behind the HSAs (a restored old copy: an HSA reports a version above the head) is
  logged at WARNING and shown in `GetDomainStatus.store_behind`, and repaired: the newer
  states are fetched from the HSAs that report them (`HsaAdmin.GetStatesAfter`), each
  verified as the successor of the head (`verify_successor`) before it is appended with the
  compare-and-swap; nothing an HSA says is stored unverified. One repair runs at a time, as
  a change of the chain (under the coordinator's write lock); a pending proposal that a
  fetched state carries is closed as APPLIED with it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from domain_coordinator import _requests as check
from domain_coordinator._coordination import WriteLock
from domain_coordinator._hsa import HsaConnections, describe_rpc_error
from domain_coordinator._proposals import ProposalBook
from domain_coordinator._publish import Pusher
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, HsaRecord
from domain_core.chain import verify_successor
from domain_core.errors import ConflictError, ForkError, HsmDomainError, InvalidInputError
from domain_core.limits import Limits
from domain_core.model import SealedState
from domain_edge.throttled_log import ThrottledLog

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False, repr=False)
class HsaReports:
    """HSAs' reports of their state, fork warnings, and the repair of a store behind them."""

    chain: VerifiedChain
    store: CoordinatorStore
    hsas: HsaConnections
    book: ProposalBook
    pusher: Pusher
    limits: Limits
    now: Callable[[], int]
    writes: WriteLock
    stopping: threading.Event
    _repairing: threading.Lock = field(init=False, default_factory=threading.Lock)
    _repair_detail: str = field(init=False, default="")
    _throttled: ThrottledLog = field(init=False, default_factory=lambda: ThrottledLog(log))

    def record_report(self, host_id: str, version: int, state_hash: bytes, how: str) -> None:
        """Keep the version an HSA acknowledged; a malformed one is logged and dropped."""
        try:
            version, state_hash = check.reported_state(version, state_hash)
        except InvalidInputError as error:
            log.warning("%s answered %s with a malformed version: %s", host_id, how, error)
            return
        if version:
            self.warn_if_fork(host_id, version, state_hash)
            with contextlib.suppress(RuntimeError):  # the store closed: shutting down
                self.store.record_hsa_version(host_id, version, state_hash, self.now())
            self.note_report(host_id, version, how)

    def warn_if_fork(self, host_id: str, version: int, state_hash: bytes) -> None:
        """Log an HSA that reports another state than this coordinator's for a version."""
        known = self.chain.known_hash(version)
        if known is not None and known != state_hash:
            self._throttled.warning(
                f"{host_id} reports state {state_hash.hex()[:16]} at version {version}, but "
                f"this coordinator's chain has {known.hex()[:16]} there: a fork; investigate",
                key=f"fork:{host_id}",
                again_if_changed=True,
            )

    def note_report(self, host_id: str, version: int, how: str) -> None:
        """An HSA reported `version`: if that is above the head, warn and start the repair."""
        if version <= self.chain.head.version:
            return
        self.chain.refresh()  # another coordinator on a shared store may have stored it
        head_version = self.chain.head.version
        if version <= head_version:
            return
        self._throttled.warning(
            f"store behind the HSAs: {host_id} reports version {version} ({how}), but this "
            f"coordinator's store is at version {head_version} (restored from an old copy?); "
            "fetching the newer states from the HSAs, verifying and appending them",
            key="store-behind",
            again_if_changed=True,
        )
        self.start_repair()

    def store_behind(self, head: SealedState, hsas: Sequence[HsaRecord]) -> str:
        """What `GetDomainStatus.store_behind` says: empty unless an HSA reports a newer version."""
        ahead = sorted(
            ((h.version, h.host_id) for h in hsas if h.version > head.version), reverse=True
        )
        if not ahead:
            return ""
        reports = ", ".join(f"{host} reports version {version}" for version, host in ahead[:8])
        repair = self._repair_detail or "fetching the newer states from them"
        return (
            f"store behind the HSAs: {reports}; this coordinator's store is at version "
            f"{head.version}; {repair}"
        )

    def start_repair(self) -> None:
        """Run the repair in a thread of its own, unless one runs already."""
        if self.stopping.is_set() or not self._repairing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self._repair()
            except Exception:
                log.exception("repairing the store from the HSAs failed; retrying later")
            finally:
                self._repairing.release()

        threading.Thread(target=run, name="coordinator-repair", daemon=True).start()

    def _repair(self) -> None:
        """Fetch the states HSAs report beyond the head, verify them and append them.

        Each state must verify as the successor of the head (`verify_successor`, the check
        applied to a state an HSA produced) before the store's compare-and-swap appends it;
        a pending proposal that a fetched state carries is closed as APPLIED with it.
        """
        with self.writes:
            self.chain.refresh()
            start = self.chain.head.version
            sources = sorted(
                (h for h in self.store.list_hsas() if h.version > start),
                key=lambda h: h.version,
                reverse=True,
            )
            if not sources:
                self._repair_detail = ""
                return
            failures: list[str] = []
            for source in sources:
                if source.version <= self.chain.head.version or self.stopping.is_set():
                    continue
                try:
                    self._fetch_from(source)
                except grpc.RpcError as error:
                    failures.append(f"{source.host_id}: {describe_rpc_error(error)}")
                except HsmDomainError as error:
                    log.error(
                        "%s served a state that does not verify after version %d: %s",
                        source.host_id,
                        self.chain.head.version,
                        error,
                    )
                    failures.append(f"{source.host_id} served a state that does not verify")
                except RuntimeError:
                    return  # shutting down
            self._repaired(start, sources[0].version, failures)

    def _repaired(self, start: int, highest: int, failures: Sequence[str]) -> None:
        """After a repair: close what the new head overtook, push it, and say how far it got."""
        head = self.chain.head
        if head.version > start:
            log.info(
                "repaired the store from the HSAs: versions %d to %d verified and stored",
                start + 1,
                head.version,
            )
            self.book.close_due()
            self.pusher.push(head, self.record_report)
        if head.version >= highest:
            self._repair_detail = ""
            return
        self._repair_detail = (
            f"the repair stopped at version {head.version}: "
            + ("; ".join(failures) or "no HSA served the newer states")
        )[:1000]
        self._throttled.warning(
            f"store behind the HSAs: {self._repair_detail}", key="repair", again_if_changed=True
        )

    def _fetch_from(self, source: HsaRecord) -> None:
        """Page through `source`'s states after the head; verify and append each one."""
        while not self.stopping.is_set():
            head = self.chain.head
            messages = self.hsas.get_states_after(
                source.address, head.version, host_id=source.host_id
            )
            advanced = False
            for message in messages:
                state = SealedState.from_message(message, self.limits)
                known = self.chain.known_hash(state.version)
                if known is not None:
                    if known != state.hash:
                        raise ForkError(
                            f"{source.host_id} holds another state for version {state.version} "
                            "than this coordinator's chain: a fork; investigate"
                        )
                    continue
                verify_successor(self.chain.head, state, now=self.now())
                if not self._append_fetched(state):
                    return  # another coordinator stored one first; the sweeper tries again
                advanced = True
            if not advanced:
                return

    def _append_fetched(self, state: SealedState) -> bool:
        """Store a verified successor of the head (compare-and-swap); False if it lost."""
        carried = state.proposal.id if state.proposal is not None else None
        record = self.store.get_proposal(carried) if carried is not None else None
        try:
            if carried is not None and record is not None and not record.state.closed:
                self.store.append_state_and_close_proposal(state.version, state.to_bytes(), carried)
            else:
                self.store.append_state(state.version, state.to_bytes())
        except ConflictError:
            self.chain.refresh()
            return False
        log.info(
            "stored version %d (%s), fetched from the HSAs and verified",
            state.version,
            state.hash.hex()[:16],
        )
        self.chain.adopt(state)  # the repair closes proposals and pushes once it is done
        return True
