"""Watches: the changes to a key range from a revision on, handed to a callback in a thread.

Invariants:
- events reach the callback in revision order, in batches (whatever arrived while the callback
  ran), on one thread of the watch's own: a slow callback never holds up the event loop or
  another watch;
- a watch outlives the loss of the member it streams from: it resumes on another member from
  the revision it got to (re-delivering that revision's events rather than losing any), so no
  change is missed, only possibly seen twice; if the cluster no longer holds that history
  (compacted), the callback is told so (`WatchBatch.compacted`: re-read everything) and the
  watch goes on from the oldest revision it has;
- the watch asks for a member with a leader (`REQUIRE_LEADER`): a member cut off from the
  majority ends the stream and the watch moves on;
- `cancel` stops the stream and the thread; no callback starts after it returns (one that is
  running may finish); an exception from the callback is logged and the watch goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aetcd

from domain_edge.etcd._client import EtcdClient
from domain_edge.etcd._types import prefix_end

log = logging.getLogger(__name__)

_RESUME_PAUSE: Final = 0.2


@dataclass(frozen=True)
class WatchEvent:
    """One change: a key written (with its new value) or deleted, at `mod_revision`."""

    key: bytes
    value: bytes
    deleted: bool
    mod_revision: int


@dataclass(frozen=True)
class WatchBatch:
    """Changes in revision order; `compacted`: some were lost to compaction before these."""

    events: tuple[WatchEvent, ...]
    compacted: bool = False


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"compacted at {revision}")
        self.revision = revision


class Watch:
    """A running watch (see the module invariants); `cancel` ends it."""

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        end: bytes,
        start_revision: int,
        on_batch: Callable[[WatchBatch], None],
    ) -> None:
        self._client = client
        self._key, self._end = key, end
        self._next = start_revision
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[WatchBatch | None] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._deliver, name="etcd-watch", daemon=True)
        self._thread.start()
        self._task = client.loop.submit(self._stream())

    async def _open(self, member: Any, timeout: float) -> Any:
        try:
            return await member.watch(self._key, range_end=self._end, start_revision=self._next)
        except aetcd.RevisionCompactedError as error:
            raise _Compacted(int(error.compacted_revision)) from error

    async def _stream(self) -> None:
        while not self._cancelled.is_set() and not self._client.closed:
            try:
                stream, _ = await self._client.failover("a watch", self._open, resend_unknown=True)
                try:
                    async for event in stream:
                        self._queue.put(WatchBatch((self._event(event),)))
                finally:
                    await stream.cancel()
            except _Compacted as compacted:
                self._next = compacted.revision
                self._queue.put(WatchBatch((), compacted=True))
                continue
            except asyncio.CancelledError:
                return
            except Exception as error:  # no member now: resume shortly
                log.debug("etcd watch interrupted, resuming: %s", error)
            await asyncio.sleep(_RESUME_PAUSE)

    def _event(self, event: Any) -> WatchEvent:
        revision = int(event.kv.mod_revision)
        # Resume at this revision, not after it: its other events may not have arrived yet.
        self._next = max(self._next, revision)
        return WatchEvent(
            bytes(event.kv.key), bytes(event.kv.value), event.kind == "DELETE", revision
        )

    def _deliver(self) -> None:
        while True:
            first = self._queue.get()
            if first is None or self._cancelled.is_set():
                return
            batches = [first]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                batches.append(more)
            merged = WatchBatch(
                tuple(e for b in batches for e in b.events), any(b.compacted for b in batches)
            )
            try:
                self._on_batch(merged)
            except Exception:
                log.exception("an etcd watch callback failed; the watch goes on")

    def cancel(self) -> None:
        """End the watch (idempotent)."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        self._task.cancel()
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)


def watch_prefix(
    client: EtcdClient, prefix: bytes, start_revision: int, on_batch: Callable[[WatchBatch], None]
) -> Watch:
    """Watch every key under `prefix` from `start_revision` (the revision after a read, so
    that nothing between the read and the watch is missed)."""
    return Watch(client, prefix, prefix_end(prefix), start_revision, on_batch)


def watch_key(
    client: EtcdClient, key: bytes, start_revision: int, on_batch: Callable[[WatchBatch], None]
) -> Watch:
    """Watch one key from `start_revision`."""
    return Watch(client, key, b"", start_revision, on_batch)
