"""Background upkeep of the key records on every HSA: re-wrap, automatic rotation, deletion.

A `KeyMaintainer` thread pages through the coordinator's key records (`ListKeyRecords`) and,
for each record that verifies:
- deletes it (`DeleteKeyRecord`) when it is PENDING_DELETION and its deletion date passed;
- rotates it (a new backing version) when it is ENABLED, automatic rotation is on, and its
  next rotation date passed;
- re-wraps it (`keytokens.rewrap_record`) when any token is sealed under an older domain key
  generation than the current one, so that old generations can be retired, and signs it again
  as this host. A node that has not installed the newest generation yet leaves records sealed
  under it alone (it never re-wraps a record to an older generation).

Before this HSA produces a domain state that removes hosts or retires domain-key generations
(`prepare_transition`, called by `HsaAdmin.ApplyProposal` and `RotateDomainKey`), it lists
every stored record and moves each one the change would strand: a record signed by a host
the change removes is re-wrapped and signed again by this host, a record with a token under a
generation the change retires is re-wrapped to the current one. Only once a whole listing
finds nothing left to move may the state be produced; until then the HSA answers
`TransitionDeferredError` (UNAVAILABLE, with counts) and the coordinator retries. So no state
makes a stored, readable record unreadable: after the state that removes host H, no record
H signed remains for a member to accept, and none is lost.

Invariants:
- every write is a compare-and-swap on the revision that was read; losing one is fine
  (another HSA did the same work, or someone changed the key: the next pass looks again);
- work per tick is bounded (one page of `page_size` records); a pass over all keys starts
  when the domain key generation changes (re-wrap promptly after a rotation) and otherwise
  every `pass_interval` seconds, at a random key id, wrapping around;
- HSAs share the work instead of racing for it: a pass first handles only this host's shard
  of the keys (SHA-256 of the key id modulo the number of hosts in the verified domain
  state, by position of this host among them). If it saw work in other shards, a takeover
  pass over every key follows after a delay (at least `takeover_delay`, and as long as the
  shard pass took), so the keys of an HSA that is down are handled too;
- a record that does not verify is never written (it is logged at WARNING by the cache's
  verification); a record is verified (signature and tokens) only when, by what it claims, it
  needs work, so a pass over records that need none costs no signature checks; nothing secret
  is logged;
- a transition's preparation resumes where the previous call stopped (one listing per
  change, in pages, bounded in time per call); records that do not verify on this HSA cannot
  be moved and are unreadable already, so they do not hold a change up (they are counted and
  logged); a record written while a preparation runs is not stranded by the change: the
  coordinator refuses writes by a host being removed and under a generation being retired;
- automatic rotations and deletions are audited, as this host; re-wraps change no key and are
  logged as a summary per pass;
- upkeep writes records, so like key administration it waits while the HSA has not taken a
  peer's key floors or no peer confirmed its head within the bound (`keyservice.PeerGate`):
  a head kept stale by the coordinator never gets records re-sealed under its generation.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from domain_core import ciphertext, keytokens
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    HsmDomainError,
    NotFoundError,
    TransitionDeferredError,
    UnavailableError,
)
from domain_proto import keys_pb2
from hsa_node._logging import ThrottledLog
from hsa_node.keycache import KeyCache, iso_date, parse_metadata
from hsa_node.keyservice import AuditSink, PeerGate, rotate_backing_key
from hsa_node.node import DomainKeys, DomainNode

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_PASS_INTERVAL_SECONDS",
    "DEFAULT_PREPARE_BUDGET_SECONDS",
    "DEFAULT_TAKEOVER_DELAY_SECONDS",
    "KeyMaintainer",
    "PassReport",
    "TransitionTarget",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE: Final = 100
DEFAULT_TICK_SECONDS: Final = 1.0
DEFAULT_PASS_INTERVAL_SECONDS: Final = 60.0
DEFAULT_TAKEOVER_DELAY_SECONDS: Final = 5.0
# Between two pages of the same pass: enough to yield to the data plane.
_BUSY_TICK_SECONDS: Final = 0.01
_PROGRESS_EVERY_SECONDS: Final = 10.0
# A transition's preparation works this long per call (the coordinator's HSA call deadline is
# 10 s), then answers "deferred" and resumes at the next call.
DEFAULT_PREPARE_BUDGET_SECONDS: Final = 4.0
# A finished preparation is trusted for this long; after that a change lists the records again.
_PREPARATION_VALID_SECONDS: Final = 120.0
_PREPARE_PAGE_SIZE: Final = 1000
_MOVE_ATTEMPTS: Final = 3


@dataclass(frozen=True)
class TransitionTarget:
    """What a domain change would strand: hosts it removes and generations it retires."""

    removed_hosts: frozenset[str] = frozenset()
    retired_generations: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.removed_hosts or self.retired_generations)

    def strands(self, record: keys_pb2.KeyRecord) -> bool:
        """Whether `record` (unverified) would be unreadable after the change."""
        return record.signer_host_id in self.removed_hosts or any(
            t.domain_key_generation in self.retired_generations for t in record.tokens
        )


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


@dataclass
class PassReport:
    """What one pass over the key records did."""

    generation: int
    full: bool = False
    """A takeover pass (every key), not a pass over this host's shard."""
    listed: int = 0
    """Records read from the coordinator (any shard)."""
    scanned: int = 0
    """Records of this pass's shard (every record, in a takeover pass)."""
    rewrapped: int = 0
    rotated: int = 0
    deleted: int = 0
    conflicts: int = 0
    failed: int = 0
    elsewhere: int = 0
    """Keys of other hosts' shards that needed work (a takeover pass follows)."""
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        """How long the pass took (so far, if it is running)."""
        return (self.finished or time.monotonic()) - self.started

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"{'takeover' if self.full else 'shard'} pass: scanned {self.scanned}, re-wrapped "
            f"{self.rewrapped} to domain key generation {self.generation}, rotated "
            f"{self.rotated}, deleted {self.deleted}, {self.conflicts} lost to concurrent "
            f"writers, {self.failed} refused, {self.elsewhere} left to other HSAs"
        )

    def add(self, other: PassReport) -> PassReport:
        """The sum of two passes' counts (for `run_pass`)."""
        return PassReport(
            generation=other.generation,
            full=other.full,
            listed=self.listed + other.listed,
            scanned=self.scanned + other.scanned,
            rewrapped=self.rewrapped + other.rewrapped,
            rotated=self.rotated + other.rotated,
            deleted=self.deleted + other.deleted,
            conflicts=self.conflicts + other.conflicts,
            failed=self.failed + other.failed,
            elsewhere=other.elsewhere,
            started=self.started,
            finished=other.finished,
        )


@dataclass
class _Pass:
    """Where a pass is: it starts after `start` and wraps around to `start`."""

    report: PassReport
    start: str
    wrapped: bool = False
    page_token: str = ""
    last_progress: float = field(default_factory=time.monotonic)


class KeyMaintainer:
    """The background thread of key-record upkeep (see the module invariants)."""

    def __init__(
        self,
        *,
        node: DomainNode,
        cache: KeyCache,
        audit: AuditSink | None = None,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        pass_interval: float = DEFAULT_PASS_INTERVAL_SECONDS,
        takeover_delay: float = DEFAULT_TAKEOVER_DELAY_SECONDS,
        page_size: int = DEFAULT_PAGE_SIZE,
        prepare_budget: float = DEFAULT_PREPARE_BUDGET_SECONDS,
        prepare_page_size: int = _PREPARE_PAGE_SIZE,
        peers: PeerGate | None = None,
    ) -> None:
        """`peers`: upkeep writes records, so it waits, as key administration does, for the
        key floors and a confirmed head (None only outside an HSA)."""
        if page_size < 1 or prepare_page_size < 1:
            raise ValueError("page sizes must be at least 1")
        self._peers = peers
        self._node = node
        self._cache = cache
        self._records = cache.records
        self._audit = audit
        self._clock = clock
        self._tick_seconds = tick_seconds
        self._pass_interval = pass_interval
        self._takeover_delay = takeover_delay
        self._takeover_at: float | None = None
        self._page_size = page_size
        self._principal = node.identity.spiffe_id(node.domain_id).uri
        self._pass: _Pass | None = None
        self._last_generation = 0
        self._last_pass_end = float("-inf")
        self.last_report: PassReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttled = ThrottledLog(log)
        self._prepare_budget = prepare_budget
        self._prepare_page_size = prepare_page_size
        self._preparation: _Preparation | None = None
        self._prepare_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="key-upkeep", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the record it is working on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                busy = self.tick()
            except UnavailableError as error:
                self._throttled.info(f"key upkeep paused: {error}")
            except Exception:
                log.exception("key upkeep: unexpected error")
            self._stop.wait(_BUSY_TICK_SECONDS if busy else self._tick_seconds)

    # --- one step ------------------------------------------------------------------------

    def run_pass(self) -> PassReport:
        """Run a whole pass now, and the takeover pass it calls for at once (for tests and
        benchmarks); the sum of their counts."""
        self._last_pass_end = float("-inf")
        while self.tick():
            pass
        report = self.last_report
        if report is None:
            raise RuntimeError("no pass ran")
        if self._takeover_at is not None:
            self._takeover_at = float("-inf")
            while self.tick():
                pass
            if self.last_report is not None and self.last_report is not report:
                report = report.add(self.last_report)
        return report

    def _start_pass(self, generation: int) -> _Pass | None:
        """The pass to run now, if one is due."""
        now = time.monotonic()
        if self._takeover_at is not None and now >= self._takeover_at:
            self._takeover_at = None
            log.info("taking over the key upkeep of other HSAs' shards")
            full = True
        elif (
            generation != self._last_generation or now - self._last_pass_end >= self._pass_interval
        ):
            if generation != self._last_generation and self._last_generation:
                log.info("re-wrapping key tokens to domain key generation %d", generation)
            full = False
        else:
            return None
        return _Pass(
            report=PassReport(generation=generation, full=full), start=ciphertext.new_key_id()
        )

    def _shard(self) -> tuple[int, int]:
        """(this host's position, number of hosts) in the verified domain state."""
        hosts = sorted(self._node.head.manifest.hosts_by_id)
        return (hosts.index(self._node.host_id) if self._node.host_id in hosts else 0), max(
            len(hosts), 1
        )

    def tick(self) -> bool:
        """Process one page of records; True while a pass is under way.

        Raises UnavailableError when this node is not serving or the coordinator cannot be
        reached (the pass resumes where it stopped at the next tick).
        """
        keys = self._node.domain_keys()
        if self._peers is not None:
            try:
                self._peers.require_ready()
                self._peers.require_head_confirmed("key upkeep")
            except UnavailableError:
                raise UnavailableError(
                    "waiting for this HSA's peers (key floors not taken yet, or no peer "
                    "confirmed its domain state within head_confirmation_seconds)"
                ) from None
        if self._pass is not None and self._pass.report.generation != keys.generation:
            log.info(
                "domain key generation %d is current now; restarting the key pass",
                keys.generation,
            )
            self._pass = None
            self._takeover_at = None
        if self._pass is None:
            self._pass = self._start_pass(keys.generation)
            if self._pass is None:
                return False
        current = self._pass
        shard = None if current.report.full else self._shard()
        records, next_token = self._records.list(
            self._page_size, current.page_token or ("" if current.wrapped else current.start)
        )
        finished = False
        for record in records:
            metadata = parse_metadata(record)
            current.report.listed += 1
            if current.wrapped and metadata is not None and metadata.key_id > current.start:
                finished = True
                break
            if shard is not None and metadata is not None and not _in_shard(metadata, *shard):
                if _needs_work(record, metadata, keys.generation, int(self._clock())):
                    current.report.elsewhere += 1
                continue
            self._maintain(record, metadata, keys, current.report)
        if not finished:
            if next_token:
                current.page_token = next_token
            elif not current.wrapped:
                current.wrapped, current.page_token = True, ""
            else:
                finished = True
        if finished:
            self._finish(current)
            return False
        now = time.monotonic()
        if now - current.last_progress >= _PROGRESS_EVERY_SECONDS:
            current.last_progress = now
            log.info("key pass under way: %s", current.report.describe())
        return True

    def _finish(self, current: _Pass) -> None:
        report = current.report
        report.finished = time.monotonic()
        self._pass = None
        self._last_generation = report.generation
        self._last_pass_end = time.monotonic()
        self.last_report = report
        worked = report.rewrapped or report.rotated or report.deleted or report.elsewhere
        level = logging.INFO if worked else logging.DEBUG
        log.log(level, "key pass done in %.1f s: %s", report.seconds, report.describe())
        if report.elsewhere and not report.full:
            delay = max(self._takeover_delay, report.seconds)
            self._takeover_at = time.monotonic() + delay
            log.info(
                "%d keys of other HSAs' shards need upkeep; taking them over in %.0f s unless "
                "their HSAs do it first",
                report.elsewhere,
                delay,
            )

    # --- before a change that strands records --------------------------------------------

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

    # --- one record ----------------------------------------------------------------------

    def _maintain(
        self,
        record: keys_pb2.KeyRecord,
        metadata: keys_pb2.KeyMetadata | None,
        keys: DomainKeys,
        report: PassReport,
    ) -> None:
        report.scanned += 1
        if metadata is None:
            report.failed += 1
            self._throttled.warning("the coordinator listed a key record that does not parse")
            return
        key_id = metadata.key_id
        if any(t.domain_key_generation > keys.generation for t in record.tokens):
            return  # sealed under a newer generation than this node has installed: it is behind
        now = int(self._clock())
        if not _needs_work(record, metadata, keys.generation, now):
            return  # nothing to do by what it claims; verified (signature, tokens) only to act
        try:
            verified, backing_keys = self._cache.verify(record, key_id, remember=False)
        except (FailedPreconditionError, UnavailableError):
            report.failed += 1  # the cache logged why
            return
        try:
            if (
                verified.state == keys_pb2.KEY_STATE_PENDING_DELETION
                and verified.deletion_at <= now
            ):
                self._records.delete(key_id, record.revision)
                self._cache.forget(key_id)
                report.deleted += 1
                log.info(
                    "deleted key %s (deletion was scheduled for %s)",
                    key_id,
                    iso_date(verified.deletion_at),
                )
                self._audited(
                    "DeleteKey", key_id, f"scheduled for {iso_date(verified.deletion_at)}"
                )
            elif (
                verified.state == keys_pb2.KEY_STATE_ENABLED
                and verified.rotation.enabled
                and 0 < verified.rotation.next_rotation_at <= now
            ):
                rotated = keys_pb2.KeyMetadata()
                rotated.CopyFrom(verified)
                rotate_backing_key(rotated, backing_keys, now, automatic=True)
                rotated.metadata_version = verified.metadata_version + 1
                self._cache.store(rotated, backing_keys, record.revision)
                report.rotated += 1
                log.info(
                    "rotated key %s automatically to backing version %d",
                    key_id,
                    rotated.current_backing_version,
                )
                self._audited(
                    "RotateKey",
                    key_id,
                    f"automatic rotation to backing version {rotated.current_backing_version}",
                )
            elif keytokens.needs_rewrap(record, keys.generation):
                rewrapped = keytokens.rewrap_record(
                    record, keys.keys, keys.generation, key_id, signer=self._cache.signer
                )
                self._records.put(rewrapped, record.revision)
                self._cache.mark_stale(key_id)
                report.rewrapped += 1
        except (ConflictError, NotFoundError):
            report.conflicts += 1
        except FailedPreconditionError as error:
            # e.g. the coordinator's clock says the deletion is not due yet
            report.failed += 1
            self._throttled.info(f"key upkeep of {key_id}: {error}")

    def _audited(self, operation: str, key_id: str, detail: str) -> None:
        if self._audit is None:
            return
        try:
            self._audit.append(
                principal=self._principal, operation=operation, key_id=key_id, detail=detail
            )
        except HsmDomainError as error:
            log.error("could not audit %s of key %s: %s", operation, key_id, error)


def _in_shard(metadata: keys_pb2.KeyMetadata, position: int, hosts: int) -> bool:
    """Whether a key belongs to the shard of the host at `position` among `hosts`."""
    digest = hashlib.sha256(metadata.key_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % hosts == position


def _needs_work(
    record: keys_pb2.KeyRecord, metadata: keys_pb2.KeyMetadata, generation: int, now: int
) -> bool:
    """Whether a record (not verified: this only decides whether to look closer, and to take
    over) needs upkeep: a token under an older generation, a due deletion or rotation."""
    if any(t.domain_key_generation < generation for t in record.tokens):
        return True
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        return 0 < metadata.deletion_at <= now
    return (
        metadata.state == keys_pb2.KEY_STATE_ENABLED
        and metadata.rotation.enabled
        and 0 < metadata.rotation.next_rotation_at <= now
    )
