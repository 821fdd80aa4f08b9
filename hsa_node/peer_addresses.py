"""Where each peer of an HSA may listen: hints, and the address whose answer verified.

Addresses are only hints (the coordinator's `ListHsas`, the cached `peers.json`, the node
config's `peer_addresses`, and the address a peer gives when it calls): every answer that
matters is signed by the answering host's key from this HSA's own head (`domain_core.peering`),
so an address that leads elsewhere costs a call and nothing more.

Invariants: an address is "verified" for a host once an answer from it verified under that
host's key; a verified address is tried first and kept in `peers.json` (so a restarted HSA
reaches its peers whatever the coordinator says), and one address is verified for at most
one host; hints never replace a verified address; at most 8 hints are kept per host.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from domain_core.limits import MAX_ADDRESS_HINTS_PER_HOST
from hsa_node.storage import NodeStore, Peer

__all__ = ["AddressBook"]

# These lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.peering")


class AddressBook:
    """Where each peer may listen: hints by host, and the address that last answered for it.

    An address is "verified" for a host once an answer from it verified under that host's
    key; verified addresses are tried first and kept in `peers.json` (so a restarted HSA
    reaches its peers whatever the coordinator says). Hints never replace a verified address.
    """

    def __init__(self, store: NodeStore, configured: Sequence[str] = ()) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._saving = threading.Lock()
        self._verified: dict[str, str] = {}
        self._hints: dict[str, list[str]] = {}
        self._configured = list(dict.fromkeys(configured))
        for peer in store.load_peers():
            self._add_hint_locked(peer.host_id, peer.address)

    def _add_hint_locked(self, host_id: str, address: str, *, first: bool = False) -> bool:
        hints = self._hints.setdefault(host_id, [])
        if address in hints:
            if first and hints[0] != address:
                hints.remove(address)
                hints.insert(0, address)
            return False
        hints.insert(0, address) if first else hints.append(address)
        del hints[MAX_ADDRESS_HINTS_PER_HOST:]
        return True

    def hint(self, host_id: str, address: str, *, first: bool = False) -> bool:
        """Note that `host_id` may listen at `address`; True if that is new."""
        if not address:
            return False
        with self._lock:
            return self._add_hint_locked(host_id, address, first=first)

    def candidates(self, host_id: str) -> list[str]:
        """Addresses to try for `host_id`, best first."""
        with self._lock:
            taken = {a for h, a in self._verified.items() if h != host_id}
            ordered = [self._verified[host_id]] if host_id in self._verified else []
            ordered += self._hints.get(host_id, [])
            ordered += self._configured
            return [a for a in dict.fromkeys(ordered) if a not in taken]

    def best(self, host_id: str) -> str | None:
        """The address to call `host_id` at now (verified first), if any."""
        found = self.candidates(host_id)
        return found[0] if found else None

    def verified(self, host_id: str, address: str) -> None:
        """An answer from `address` verified as `host_id`: try it first from now on."""
        with self._lock:
            if self._verified.get(host_id) == address:
                return
            for other in [h for h, a in self._verified.items() if a == address]:
                del self._verified[other]
            self._verified[host_id] = address
            self._add_hint_locked(host_id, address, first=True)
        log.info("peer %s answers at %s", host_id, address)
        if self._store.read_only:
            return
        with self._saving:  # the last file written holds the newest list, whatever the order
            with self._lock:
                peers = [Peer(host_id=h, address=a) for h, a in sorted(self._verified.items())]
            try:
                self._store.save_peers(peers)
            except OSError as error:
                log.warning("could not save the peer list: %s", error)

    def failed(self, host_id: str, address: str) -> None:
        """An answer from `address` did not verify as `host_id`'s: stop preferring it. (An
        address that does not answer stays: a host restarted on its address comes back.)"""
        with self._lock:
            if self._verified.get(host_id) == address:
                del self._verified[host_id]
            hints = self._hints.get(host_id, [])
            if address in hints:
                hints.remove(address)
                hints.append(address)

    def addresses(self) -> set[str]:
        """Every address known for anyone."""
        with self._lock:
            known = set(self._verified.values()) | set(self._configured)
            for hints in self._hints.values():
                known.update(hints)
            return known
