"""The chain relay: pages of verified states, and the WatchStates streams of the HSAs.

Invariants:
- only states this coordinator verified are served (`VerifiedChain.stored_after`), a page
  within the message limit;
- a host holds at most `Limits.max_watch_streams_per_host` WatchStates streams (a new one
  replaces its oldest, which ends RESOURCE_EXHAUSTED) within the global cap (`max_streams`;
  beyond it RESOURCE_EXHAUSTED); a replaced stream gives its global slot back within
  `_REPLACED_STREAM_WAIT_SECONDS`;
- a stream of a host that is no longer admitted (removed, or its add-host dropped) ends
  PERMISSION_DENIED once it delivered the head (the removed host gets the state that removes
  it); every stream ends when the coordinator stops.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from domain_coordinator._admission import Admission, HostAccess
from domain_coordinator._quota import WatchSlots
from domain_coordinator._verified_chain import VerifiedChain
from domain_core.errors import PermissionDeniedError, ResourceExhaustedError
from domain_core.limits import Limits
from domain_core.pki import PeerIdentity
from domain_proto import domain_pb2, services_pb2

log = logging.getLogger(__name__)

_REPLACED_STREAM_WAIT_SECONDS = 2.0  # a replaced stream gives its global slot back within this


@dataclass(kw_only=True, eq=False, repr=False)
class StateRelay:
    """Serves the verified chain: pages of states and WatchStates streams."""

    chain: VerifiedChain
    admission: Admission
    limits: Limits
    max_streams: int
    stopping: threading.Event
    _streams: threading.BoundedSemaphore = field(init=False)
    _watch_slots: WatchSlots = field(init=False)

    def __post_init__(self) -> None:
        self._streams = threading.BoundedSemaphore(self.max_streams)
        self._watch_slots = WatchSlots(self.limits.max_watch_streams_per_host)

    def page(self, after_version: int, limit: int) -> services_pb2.StatesResponse:
        """Verified states after a version, as many as fit in one answer (the caller asks
        again after the last one it got)."""
        response = services_pb2.StatesResponse()
        budget = self.limits.max_message_bytes - 1024
        for raw in self.chain.stored_after(after_version, limit):
            if len(raw) + 16 > budget and response.states:
                break  # the caller asks again after the last state it got
            budget -= len(raw) + 16
            response.states.append(domain_pb2.SealedState.FromString(raw))
        return response

    def watch(
        self, identity: PeerIdentity, after_version: int, context: grpc.ServicerContext
    ) -> Iterator[domain_pb2.SealedState]:
        """Every verified state after `after_version`, then each new one as it is adopted."""
        host_id = identity.spiffe.name
        slot, replaced = self._watch_slots.open(host_id)
        if replaced is not None:
            log.info("%s opened another WatchStates stream; its oldest one is replaced", host_id)
            self.chain.wake()
        # A replaced stream gives its global slot back as soon as it wakes up.
        wait = _REPLACED_STREAM_WAIT_SECONDS if replaced is not None else None
        if not self._streams.acquire(blocking=wait is not None, timeout=wait):
            self._watch_slots.close(slot)
            raise ResourceExhaustedError(
                "too many WatchStates streams are open; poll GetStatesAfter or retry later"
            )
        try:
            log.info("%s watches states after version %d", host_id, after_version)
            last = after_version
            while not self.stopping.is_set() and context.is_active():
                if slot.replaced.is_set():
                    raise ResourceExhaustedError(
                        f"this WatchStates stream of {host_id} was replaced by a newer one: a "
                        f"host holds at most {self.limits.max_watch_streams_per_host}"
                    )
                batch = self.chain.stored_after(last, self.limits.max_states_per_response)
                if batch:
                    for raw in batch:
                        yield domain_pb2.SealedState.FromString(raw)
                        last += 1
                    continue
                # Up to date: a host removed meanwhile (it got the state that removed it) or
                # whose addition was dropped gives its slot back.
                refusal = self.admission.host_refusal(identity, HostAccess.MEMBER_OR_JOINING)
                if refusal:
                    raise PermissionDeniedError(refusal)
                self.chain.wait_for_more(
                    last,
                    lambda: not self.stopping.is_set() and not slot.replaced.is_set(),
                    timeout=1.0,
                )
        finally:
            self._streams.release()
            self._watch_slots.close(slot)
