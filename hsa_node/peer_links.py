"""Calling the other HSAs of the domain: channels, what a round saw of a peer, signed floor pages.

Shared by the main process's peering (`hsa_node.peering`, `hsa_node.floor_exchange`) and a key
service worker's (`hsa_node.worker_peering`), which calls only its own main process.

Invariants:
- the peers of an HSA are the hosts of its verified head other than itself (`peers_of`),
  never a list the coordinator gives;
- a channel's TLS handshake accepts only the HSA it is for (`transport.hsa_host`), and what
  it answers still counts only once its signature verified: a floor page counts only if
  signed over this call's fresh nonce by a host of this HSA's head (`get_key_floors`,
  `domain_core.peering.verify_key_floors`);
- channels are reused per (address, host) and closed once their address is no longer kept;
- what a peer says in an error is cut to 160 characters before it reaches a message.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc

from domain_core import peering as signed
from domain_core.limits import Limits
from domain_core.model import Manifest, SealedState
from domain_edge import transport
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc
from hsa_node.node import DomainNode

__all__ = ["HsaLinks", "PeerView", "floor_message", "get_key_floors", "peers_of", "rpc_reason"]

_SHOWN: Final = 160


def rpc_reason(error: grpc.RpcError) -> str:
    """The "CODE: details" of a failed call, the details cut short."""
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    details = call.details() if hasattr(call, "details") else str(error)
    return f"{code.name if code is not None else 'ERROR'}: {str(details)[:_SHOWN]}"


def floor_message(floor: Any) -> services_pb2.KeyFloor:
    """A floor (anything with key_id, metadata_version, metadata_hash) as a message."""
    return services_pb2.KeyFloor(
        key_id=floor.key_id,
        metadata_version=floor.metadata_version,
        metadata_hash=floor.metadata_hash,
    )


def peers_of(node: DomainNode) -> tuple[SealedState, list[str]] | None:
    """(head, its other hosts), or None when this HSA is not a serving member."""
    if not node.serving:
        return None
    head = node.head
    return head, sorted(h for h in head.manifest.hosts_by_id if h != node.host_id)


@dataclass
class PeerView:
    """One peer in one round: where it answered and what it signed, or why not."""

    host_id: str
    address: str = ""
    head: signed.PeerHead | None = None
    error: str = ""

    def describe(self) -> str:
        """One line for the status and the log."""
        if self.head is not None:
            partial = "" if self.head.floors_complete else " (its key floors are not complete)"
            return f"{self.host_id} is at version {self.head.version}{partial}"
        return f"{self.host_id}: {self.error or 'no answer'}"


class HsaLinks:
    """Mutual-TLS channels to HSAs of this domain, one per (address, host), reused."""

    def __init__(
        self, tls: TlsMaterial, limits: Limits, keep: Callable[[], Collection[str]]
    ) -> None:
        """`keep`: the addresses whose channels stay open when a new channel is made."""
        self._tls = tls
        self._limits = limits
        self._keep = keep
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str], grpc.Channel] = {}  # (address, host)

    def channel(self, address: str, host: str) -> grpc.Channel:
        """A reused channel to `address` whose TLS handshake accepts only the HSA `host`
        (answers are still checked by their signatures); channels to addresses no longer
        kept are closed."""
        with self._lock:
            channel = self._channels.get((address, host))
            if channel is None:
                known = self._keep()
                for stale in [key for key in self._channels if key[0] not in known]:
                    self._channels.pop(stale).close()
                channel = transport.mtls_channel(
                    address, self._tls, transport.hsa_host(host), self._limits
                )
                self._channels[(address, host)] = channel
            return channel

    def stub(self, address: str, host: str) -> Any:
        """An HsaPeer stub over `channel(address, host)`."""
        return services_pb2_grpc.HsaPeerStub(self.channel(address, host))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
        for channel in channels:
            channel.close()


def get_key_floors(
    stub: Any,
    *,
    manifest: Manifest,
    self_host_id: str,
    timeout: float,
    from_self: bool = False,
    **request: Any,
) -> tuple[services_pb2.KeyFloors, services_pb2.KeyFloorPage]:
    """Ask an HSA for a signed page of key floors (`request`: the KeyFloorsRequest's fields
    other than the nonce) and verify it: (the answer, its page).

    grpc.RpcError when the call fails; a domain error when the answer does not verify.
    """
    nonce = signed.new_nonce()
    answer: services_pb2.KeyFloors = stub.GetKeyFloors(
        services_pb2.KeyFloorsRequest(nonce=nonce, **request), timeout=timeout
    )
    page = signed.verify_key_floors(
        answer, manifest=manifest, nonce=nonce, self_host_id=self_host_id, from_self=from_self
    )
    return answer, page
