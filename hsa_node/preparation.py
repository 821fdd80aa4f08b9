"""Before a domain change that would strand key records: move them first.

Before this HSA produces a domain state that removes hosts or retires domain-key generations
(`prepare_transition`, called by `HsaAdmin.ApplyProposal` and `RotateDomainKey` through the
key upkeep, `hsa_node.rewrap.KeyMaintainer`), it lists every stored record and moves each one
the change would strand (`keylifecycle.TransitionTarget`): a record signed by a host the
change removes is re-wrapped and signed again by this host, a record with a token under a
generation the change retires is re-wrapped to the current one. Only once a whole listing
finds nothing left to move may the state be produced; until then the HSA answers
`TransitionDeferredError` (UNAVAILABLE, with counts) and the coordinator retries. So no state
makes a stored, readable record unreadable: after the state that removes host H, no record
H signed remains for a member to accept, and none is lost.

Invariants:
- every write is a compare-and-swap on the revision that was read; a lost one re-reads the
  record and tries again (at most 3 times), and a record deleted or moved by someone else
  meanwhile counts as moved;
- a record is moved only if it verifies here (signature, tokens, floor), and is signed again
  by this host; records that do not verify on this HSA cannot be moved and are unreadable
  already, so they do not hold a change up (they are counted and logged);
- a preparation resumes where the previous call stopped (one listing per change, in pages,
  bounded in time per call), counts only for the change it was made for (its proposal id, or
  the scheduled rotation, and the state version), and is trusted for 120 s after it finished;
  one preparation runs at a time;
- a record written while a preparation runs is not stranded by the change: the coordinator
  refuses writes by a host being removed and under a generation being retired.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from domain_core import keytokens
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    TransitionDeferredError,
    UnavailableError,
)
from domain_core.keylifecycle import TransitionTarget
from domain_edge.throttled_log import ThrottledLog
from domain_proto import keys_pb2
from hsa_node.keycache import KeyCache
from hsa_node.keyrecords import parse_metadata
from hsa_node.node import DomainKeys, DomainNode

__all__ = ["DEFAULT_PREPARE_BUDGET_SECONDS", "TransitionPreparer"]

# The upkeep's lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.rewrap")

# A transition's preparation works this long per call (the coordinator's HSA call deadline is
# 10 s), then answers "deferred" and resumes at the next call.
DEFAULT_PREPARE_BUDGET_SECONDS: Final = 4.0
# A finished preparation is trusted for this long; after that a change lists the records again.
_PREPARATION_VALID_SECONDS: Final = 120.0
DEFAULT_PREPARE_PAGE_SIZE: Final = 1000
_MOVE_ATTEMPTS: Final = 3


@dataclass
class _Preparation:
    """One listing of every record for one change, resumable across calls."""

    target: TransitionTarget
    version: int
    """The domain state version the change applies to."""
    change: str
    """Which change (a proposal id, or the scheduled rotation): a finished preparation counts
    only for the change it was made for, whose fence at the coordinator held throughout."""
    page_token: str = ""
    done: bool = False
    listed: int = 0
    stranded: int = 0
    """Records the change would strand, seen so far."""
    moved: int = 0
    unreadable: int = 0
    """Stranded records that do not verify here: unreadable already, they cannot be moved."""
    left: int = 0
    """Stranded records not moved (lost races, the coordinator did not answer): list again."""
    by_signer: dict[str, int] = field(default_factory=dict)
    by_generation: dict[int, int] = field(default_factory=dict)
    finished_at: float = 0.0

    def note(self, record: keys_pb2.KeyRecord) -> None:
        """Count a stranded record by what strands it."""
        self.stranded += 1
        signer = record.signer_host_id
        if signer in self.target.removed_hosts:
            self.by_signer[signer] = self.by_signer.get(signer, 0) + 1
        for generation in {t.domain_key_generation for t in record.tokens}:
            if generation in self.target.retired_generations:
                self.by_generation[generation] = self.by_generation.get(generation, 0) + 1

    def describe(self) -> str:
        """What strands records, with counts (for the deferral message and the log)."""
        parts = [
            f"{count} key records are still signed by {host}, which this change removes"
            for host, count in sorted(self.by_signer.items())
        ]
        parts += [
            f"{count} key records are still sealed under domain key generation {generation}, "
            "which this change retires"
            for generation, count in sorted(self.by_generation.items())
        ]
        return "; ".join(parts)


class TransitionPreparer:
    """Moves the key records a domain change would strand (see the module invariants)."""

    def __init__(
        self,
        *,
        node: DomainNode,
        cache: KeyCache,
        budget: float = DEFAULT_PREPARE_BUDGET_SECONDS,
        page_size: int = DEFAULT_PREPARE_PAGE_SIZE,
    ) -> None:
        """`budget`: seconds of work per call; `page_size`: records listed per page."""
        if page_size < 1:
            raise ValueError("page sizes must be at least 1")
        self._node = node
        self._cache = cache
        self._records = cache.records
        self._prepare_budget = budget
        self._prepare_page_size = page_size
        self._preparation: _Preparation | None = None
        self._prepare_lock = threading.Lock()
        self._throttled = ThrottledLog(log)

    def prepare_transition(self, target: TransitionTarget, version: int, change: str) -> None:
        """Make sure no stored record is stranded by `change` (a proposal id, or "rotation")
        to the state `version`: move
        (re-wrap and sign again) every record `target` strands, for up to the preparation
        budget of this call; return once a whole listing found nothing left to move.

        Raises TransitionDeferredError (UNAVAILABLE: the coordinator retries) while records
        are left, with counts; the next call resumes the listing where this one stopped.
        """
        if not target:
            return
        if not self._prepare_lock.acquire(timeout=self._prepare_budget):
            raise TransitionDeferredError(
                "this HSA is preparing another change of the domain; the coordinator retries"
            )
        try:
            self._prepare_locked(target, version, change)
        finally:
            self._prepare_lock.release()

    def _prepare_locked(self, target: TransitionTarget, version: int, change: str) -> None:
        prep = self._preparation
        now = time.monotonic()
        if (
            prep is None
            or (prep.target, prep.version, prep.change) != (target, version, change)
            or (prep.done and (prep.left or now - prep.finished_at > _PREPARATION_VALID_SECONDS))
        ):
            prep = _Preparation(target=target, version=version, change=change)
            self._preparation = prep
        if prep.done:
            return
        deadline = now + self._prepare_budget
        while True:
            keys = self._node.domain_keys()
            try:
                records, next_token = self._records.list(self._prepare_page_size, prep.page_token)
            except UnavailableError as error:
                raise TransitionDeferredError(
                    f"cannot list the key records to prepare this change ({error.message}); "
                    "the coordinator retries"
                ) from None
            for record in records:
                prep.listed += 1
                if target.strands(record):
                    prep.note(record)
                    self._move(record, keys, prep)
            prep.page_token = next_token
            if not next_token:
                break
            if time.monotonic() >= deadline:
                detail = prep.describe()
                message = (
                    f"preparing this change: {prep.listed} key records listed so far, "
                    f"{prep.moved} moved"
                    + (f" ({detail}; re-signing and re-wrapping them first)" if detail else "")
                    + ": the coordinator retries"
                )
                self._throttled.warning(message)
                raise TransitionDeferredError(message)
        prep.done, prep.finished_at = True, time.monotonic()
        if prep.left:
            detail = prep.describe()
            message = (
                f"{prep.left} of {prep.stranded} stranded key records could not be moved yet "
                f"({detail}); re-signing and re-wrapping them first: the coordinator retries"
            )
            self._throttled.warning(message)
            raise TransitionDeferredError(message)
        if prep.stranded:
            log.info(
                "%d key records moved (by this HSA, or meanwhile by another) before the change "
                "to version %d (%s); %d could not be moved because they do not verify here "
                "(unreadable already)",
                prep.moved,
                version + 1,
                prep.describe(),
                prep.unreadable,
            )

    def _move(self, record: keys_pb2.KeyRecord, keys: DomainKeys, prep: _Preparation) -> None:
        """Re-wrap one stranded record to the current generation and sign it as this host
        (a compare-and-swap; re-read and retry on a lost race)."""
        current: keys_pb2.KeyRecord | None = record
        for _ in range(_MOVE_ATTEMPTS):
            if current is None or not prep.target.strands(current):
                prep.moved += 1  # deleted, or moved by someone else meanwhile
                return
            metadata = parse_metadata(current)
            key_id = metadata.key_id if metadata is not None else ""
            try:
                if metadata is None:
                    raise FailedPreconditionError("its metadata does not parse")
                self._cache.verify(current, key_id, remember=False)
            except FailedPreconditionError:
                prep.unreadable += 1  # logged by the cache's verification
                return
            except UnavailableError:
                break  # this node is behind: look again at the next call
            moved = keytokens.rewrap_record(
                current, keys.keys, keys.generation, key_id, signer=self._cache.signer
            )
            try:
                self._records.put(moved, current.revision)
            except NotFoundError:
                prep.moved += 1
                return
            except ConflictError:
                try:
                    current = self._records.get(key_id)
                except UnavailableError:
                    break
                continue
            except (FailedPreconditionError, UnavailableError) as error:
                self._throttled.info(f"could not move key record {key_id}: {error}")
                break
            self._cache.mark_stale(key_id)
            prep.moved += 1
            return
        prep.left += 1
