"""Background upkeep of the key records on every HSA: re-wrap, automatic rotation, deletion.

A `KeyMaintainer` thread pages through the coordinator's key records (`ListKeyRecords`) and,
for each record that verifies:
- deletes it (`DeleteKeyRecord`) when it is PENDING_DELETION and its deletion date passed;
- rotates it (a new backing version) when it is ENABLED, automatic rotation is on, and its
  next rotation date passed;
- deletes its imported material (back to PENDING_IMPORT) when the material's expiry passed
  (`keyimport.material_expired`), as DeleteImportedKeyMaterial does;
- re-wraps it (`keytokens.rewrap_record`) when any token is sealed under an older domain key
  generation than the current one, so that old generations can be retired, and signs it again
  as this host. A node that has not installed the newest generation yet leaves records sealed
  under it alone (it never re-wraps a record to an older generation).

When a record needs work is `domain_core.keylifecycle`'s rule (`needs_upkeep`,
`deletion_due`, `rotation_due`). Before this HSA produces a domain state that removes hosts
or retires domain-key generations, the maintainer's `prepare_transition` moves the records
the change would strand first (`hsa_node.preparation`).

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
- automatic rotations and deletions are audited, as this host; re-wraps change no key and are
  logged as a summary per pass;
- upkeep writes records, so like key administration it waits while the HSA has not taken a
  peer's key floors or no peer confirmed its head within the bound (`keycalls.PeerGate`):
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

from domain_core import ciphertext, keyimport, keylifecycle, keytokens
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    HsmDomainError,
    NotFoundError,
    UnavailableError,
)
from domain_core.keylifecycle import TransitionTarget, iso_date
from domain_edge.throttled_log import ThrottledLog
from domain_proto import keys_pb2
from hsa_node.keycache import KeyCache
from hsa_node.keycalls import AuditSink, PeerGate
from hsa_node.keyrecords import parse_metadata
from hsa_node.node import DomainKeys, DomainNode
from hsa_node.preparation import (
    DEFAULT_PREPARE_BUDGET_SECONDS,
    DEFAULT_PREPARE_PAGE_SIZE,
    TransitionPreparer,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_PASS_INTERVAL_SECONDS",
    "DEFAULT_PREPARE_BUDGET_SECONDS",
    "DEFAULT_TAKEOVER_DELAY_SECONDS",
    "KeyMaintainer",
    "PassReport",
]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE: Final = 100
DEFAULT_TICK_SECONDS: Final = 1.0
DEFAULT_PASS_INTERVAL_SECONDS: Final = 60.0
DEFAULT_TAKEOVER_DELAY_SECONDS: Final = 5.0
# Between two pages of the same pass: enough to yield to the data plane.
_BUSY_TICK_SECONDS: Final = 0.01
_PROGRESS_EVERY_SECONDS: Final = 10.0


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
    expired: int = 0
    """Keys whose imported material expired (and was deleted)."""
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
            f"{self.rotated}, deleted {self.deleted}, expired the imported material of "
            f"{self.expired}, {self.conflicts} lost to concurrent "
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
            expired=self.expired + other.expired,
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

    def progress(self) -> tuple[PassReport | None, PassReport | None]:
        """(the pass running now, the last one finished), for the metrics (counts only)."""
        current = self._pass
        return (current.report if current is not None else None), self.last_report

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
        prepare_page_size: int = DEFAULT_PREPARE_PAGE_SIZE,
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
        self._preparer = TransitionPreparer(
            node=node, cache=cache, budget=prepare_budget, page_size=prepare_page_size
        )

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
                if keylifecycle.needs_upkeep(record, metadata, keys.generation, int(self._clock())):
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
        worked = (
            report.rewrapped or report.rotated or report.deleted or report.expired
        ) or report.elsewhere
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
        to the state `version` (`TransitionPreparer.prepare_transition`); raises
        TransitionDeferredError while records are left."""
        self._preparer.prepare_transition(target, version, change)

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
        if not keylifecycle.needs_upkeep(record, metadata, keys.generation, now):
            return  # nothing to do by what it claims; verified (signature, tokens) only to act
        try:
            verified, backing_keys = self._cache.verify(record, key_id, remember=False)
        except (FailedPreconditionError, UnavailableError):
            report.failed += 1  # the cache logged why
            return
        try:
            if keylifecycle.deletion_due(verified, now):
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
            elif keylifecycle.rotation_due(verified, now):
                rotated, backing_keys = keylifecycle.rotate_automatically(
                    verified, backing_keys, now
                )
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
            elif keyimport.material_expired(verified, now):
                expired = keylifecycle.apply_change(
                    verified, backing_keys, keyimport.delete_material, now
                )
                if expired is None:  # material_expired says there is some: cannot happen
                    return
                self._cache.store(expired[0], expired[1], record.revision)
                report.expired += 1
                log.info("key %s: its imported material expired and was deleted", key_id)
                self._audited(
                    "DeleteImportedKeyMaterial",
                    key_id,
                    f"the material expired on {iso_date(verified.material_expires_at)}",
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
