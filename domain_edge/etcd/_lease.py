"""Leases: granted by the cluster, kept alive in the background, revoked or lost.

Invariants:
- a lease is refreshed every third of its TTL, through any member that answers;
- `alive` is conservative: it turns False no later than the cluster can expire the lease (the
  local deadline runs from when a refresh was *sent*, and the cluster's from when it
  *arrived*), so a holder that checks `alive` before it acts never acts on a lease the
  cluster has already let go (up to the time its act takes: compare-and-swap the act itself);
- a lease the cluster reports gone, or one not refreshed before its deadline, is lost for good:
  `on_lost` runs once, in a thread of its own, and the keep-alive stops;
- `revoke` stops the keep-alive and revokes the lease (keys attached to it go at once);
  revoking a lease the cluster no longer has is not an error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import grpc
from aetcd import rpc

from domain_edge.etcd._client import REQUIRE_LEADER, EtcdClient

_SMALLEST_INTERVAL: Final = 0.2


class Lease:
    """A granted lease and its background keep-alive (see the module invariants)."""

    def __init__(
        self,
        client: EtcdClient,
        lease_id: int,
        ttl: int,
        granted_at: float,
        on_lost: Callable[[], None] | None,
    ) -> None:
        self.client = client
        self.id = lease_id
        self.ttl = ttl
        self._on_lost = on_lost
        self._expires = granted_at + ttl
        self._lost = threading.Event()
        self._stopped = threading.Event()
        self._task = client.loop.submit(self._keep_alive())

    def __repr__(self) -> str:
        return f"Lease({self.id:x}, ttl={self.ttl}, alive={self.alive})"

    @property
    def alive(self) -> bool:
        """Whether the lease is surely still held (see the module invariants)."""
        return not self._lost.is_set() and time.monotonic() < self._expires

    def remaining(self) -> float:
        """Seconds until the local deadline (0 once lost)."""
        return max(0.0, self._expires - time.monotonic()) if self.alive else 0.0

    async def _refresh(self) -> int:
        """Refresh once through any member; the TTL the cluster granted (<= 0: it is gone)."""

        async def call(member: Any, timeout: float) -> int:
            request = rpc.LeaseKeepAliveRequest(ID=self.id)
            replies = member.leasestub.LeaseKeepAlive(
                iter([request]), timeout=timeout, metadata=REQUIRE_LEADER
            )
            async for reply in replies:
                return int(reply.TTL)
            raise TimeoutError("the keep-alive stream ended without an answer")

        ttl, _ = await self.client.failover("a lease refresh", call, resend_unknown=True)
        return ttl

    async def _keep_alive(self) -> None:
        interval = max(_SMALLEST_INTERVAL, self.ttl / 3)
        while not self._stopped.is_set():
            await asyncio.sleep(interval)
            if self._stopped.is_set():
                return
            if self.client.closed:  # nobody can refresh it any more: it lapses
                self._lose()
                return
            sent = time.monotonic()
            try:
                ttl = await self._refresh()
            except Exception:  # no member answers now: the deadline decides
                ttl = None
            if ttl is not None and ttl > 0:
                self._expires = sent + ttl
            elif ttl is not None or time.monotonic() >= self._expires:
                self._lose()
                return

    def _lose(self) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        if self._on_lost is not None:
            threading.Thread(target=self._on_lost, name="etcd-lease-lost", daemon=True).start()

    def revoke(self) -> None:
        """Stop refreshing and revoke the lease (its keys go at once)."""
        self._stopped.set()
        self._task.cancel()
        self._lost.set()

        async def call(member: Any, timeout: float) -> None:
            try:
                await member.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=self.id), timeout=timeout, metadata=REQUIRE_LEADER
                )
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.NOT_FOUND:  # gone already: fine
                    raise

        async def revoke() -> None:
            await self.client.failover("a lease revocation", call, resend_unknown=True)

        self.client.run(revoke())


def grant_lease(
    client: EtcdClient, ttl: int, *, on_lost: Callable[[], None] | None = None
) -> Lease:
    """A new lease of `ttl` seconds, kept alive in the background until revoked or lost."""
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
        raise ValueError("a lease TTL is a whole number of seconds, at least 1")

    async def call(member: Any, timeout: float) -> Any:
        return await member.leasestub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=ttl), timeout=timeout, metadata=REQUIRE_LEADER
        )

    async def grant() -> tuple[Any, float]:
        sent = time.monotonic()
        # Sent again after an unknown outcome: a lease granted but never heard of expires alone.
        response, _ = await client.failover("a lease grant", call, resend_unknown=True)
        return response, sent

    response, sent = client.run(grant())
    if response.error:
        raise RuntimeError(f"etcd refused the lease: {str(response.error)[:200]}")
    return Lease(client, int(response.ID), int(response.TTL), sent, on_lost)
