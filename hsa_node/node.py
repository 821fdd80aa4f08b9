"""The state of one HSA: its verified chain, its domain keys (in memory), its membership.

Invariants:
- every state reaches the chain through `DomainNode.offer`, whatever path brought it
  (InstallState, the coordinator stream, the pull, gossip); `offer` verifies it against the
  verified head (`TrustedChain`), persists it, and only then reports success;
- a state is installed only if this host can open its domain keys (when it is a member), so
  the node never holds a head it cannot serve from;
- the domain keys exist only in memory, unsealed from the verified head;
- a verified state that no longer lists this host is not installed: the node stops following
  (member False, NOT_SERVING), keeps its last state, and remembers the removing state on disk;
- a refused state leaves the node unchanged and is logged with its reason;
- a verified state that lists this host's id with keys other than this host's (signing key,
  agreement key or TLS certificate) is refused, logged at ERROR, and the status says so
  (unhealthy, first in the detail) until a state that fits this host is installed: the
  domain trusts someone else under this host's name and an operator must act;
- a fork seen with a peer (`record_fork`: the peer holds another state for a version this
  node holds) changes nothing in the chain: the node keeps serving its verified chain (the
  data plane must not stop because a peer is wrong), stays healthy, and says so in its status
  detail until it restarts; each fork is logged at ERROR once;
- a node over a read-only store (a key service worker) verifies and installs states exactly
  the same way but persists nothing: the main HSA process alone writes the data directory;
- where the HSA stands with its peers (`PeerStanding`, set by `hsa_node.peering`: the key
  service waiting for floors, a head no peer confirmed) is shown in the status detail and
  flags and never changes the chain or `healthy`; the health listeners hear when the key
  service starts or stops waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from domain_core import sealing
from domain_core.chain import TrustedChain, verify_successor
from domain_core.errors import (
    ChainError,
    ChainGapError,
    FailedPreconditionError,
    HsmDomainError,
    RollbackError,
    UnavailableError,
)
from domain_core.identity import HostIdentity
from domain_core.limits import DEFAULT_LIMITS, MAX_FORKS_KEPT, Limits
from domain_core.model import SealedState
from domain_core.pki import certificate_fingerprint
from domain_core.signers import PublicKey
from domain_edge.faults import unsafe_crash_point
from domain_edge.throttled_log import ThrottledLog
from domain_proto import domain_pb2
from hsa_node.storage import NodeStore

__all__ = ["DomainKeys", "DomainNode", "NodeStatus", "PeerStanding", "StoredStateError"]

log = logging.getLogger(__name__)


class StoredStateError(ChainError):
    """A state on this node's own disk does not verify: the data directory was changed."""


@dataclass(frozen=True)
class NodeStatus:
    """What `GetStatus` reports."""

    host_id: str
    domain_id: str
    version: int
    state_hash: bytes
    healthy: bool
    domain_key_generation: int
    member: bool
    detail: str
    key_service_waiting: bool = False
    head_unconfirmed: bool = False


@dataclass(frozen=True)
class PeerStanding:
    """Where this HSA stands with its peers (`hsa_node.peering` reports it): each field is
    empty, or says why the key service waits / why the head counts as unconfirmed."""

    key_service_waiting: str = ""
    head_unconfirmed: str = ""


@dataclass(frozen=True)
class DomainKeys:
    """The domain keys this node holds, by generation, and the one new key tokens use; with
    the hosts whose key records it accepts (the verified head's hosts and their signing keys)
    and the hosts its chain has removed (`former_hosts`)."""

    generation: int
    keys: dict[int, bytes]
    host_keys: Mapping[str, PublicKey] = field(default_factory=dict)
    former_hosts: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"DomainKeys(generation={self.generation}, generations={sorted(self.keys)})"


@dataclass(frozen=True)
class SigningSnapshot:
    """The verified head and its domain keys, taken together under the node's lock."""

    head: SealedState
    keys: dict[int, bytes]

    def __repr__(self) -> str:
        return f"SigningSnapshot(version={self.head.version}, generations={sorted(self.keys)})"


class DomainNode:
    """The verified chain, domain keys and membership of one HSA, behind one lock."""

    def __init__(
        self,
        *,
        identity: HostIdentity,
        tls_certificate_pem: bytes,
        store: NodeStore,
        chain: TrustedChain,
        states: Sequence[SealedState],
        keys: Mapping[int, bytes],
        removed_at: int | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Use `open`; this constructor trusts its arguments to be verified and consistent."""
        self.clock = clock  # judges how far in the future an offered state may be dated
        self._identity = identity
        self._tls_fingerprint = certificate_fingerprint(tls_certificate_pem)
        self._store = store
        self._chain = chain
        self._states = list(states)
        self._keys = dict(keys)
        self._removed_at = removed_at
        self._lock = threading.RLock()
        self._listeners: list[Callable[[bool], None]] = []
        self._forks: dict[tuple[int, str], None] = {}  # (version, peer host id), in order seen
        self._hosts_seen = {h.host_id for s in self._states for h in s.manifest.message.hosts}
        self._standing = PeerStanding()
        self._standing_source: Callable[[], None] | None = None
        self._throttled = ThrottledLog(log)
        self._identity_conflict = ""  # set when a verified state lists our id with other keys

    # --- startup -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        *,
        domain_id: str,
        genesis_hash: bytes,
        genesis: SealedState,
        identity: HostIdentity,
        tls_certificate_pem: bytes,
        store: NodeStore,
    ) -> DomainNode:
        """Verify genesis against the pin, replay the stored states, unseal the head's keys.

        Raises GenesisMismatchError/WrongDomainError for a genesis that is not the pinned
        one, StoredStateError for a stored state that does not verify, and TokenError-like
        errors when this host's identity does not match its record in the verified head.
        """
        chain = TrustedChain.from_genesis(domain_id, genesis_hash, genesis)
        states = [genesis]
        versions = store.stored_versions()
        if 1 in versions:
            stored = _load_stored(store, 1)
            if stored.hash != genesis.hash:
                raise StoredStateError(
                    f"{store.state_path(1)} is not the pinned genesis state; the data directory "
                    "was changed: restore it or remove its states/ folder to refetch"
                )
        elif not store.read_only:
            store.save_state(genesis)
        for version in (v for v in versions if v > 1):
            state = _load_stored(store, version)
            try:
                chain.update(state)
            except HsmDomainError as error:
                raise StoredStateError(
                    f"{store.state_path(version)} does not verify after version "
                    f"{chain.version} ({type(error).__name__}: {error}); the data directory was "
                    f"changed or damaged: remove the state files from version {version} on to "
                    "fetch them again from the domain"
                ) from None
            states.append(state)
        head = chain.head
        removed_at = _stored_removal(store, head, identity.host_id)
        keys: dict[int, bytes] = {}
        record = head.manifest.hosts_by_id.get(identity.host_id)
        if record is not None:
            _check_identity_matches(identity, tls_certificate_pem, record, head.version)
            try:
                keys = sealing.unseal_state(head, identity.host_id, identity.agreement_private_key)
            except HsmDomainError:
                raise StoredStateError(
                    f"the domain keys of the stored state version {head.version} do not open "
                    "with this host's agreement key; the identity or the data directory is not "
                    "this host's"
                ) from None
        return cls(
            identity=identity,
            tls_certificate_pem=tls_certificate_pem,
            store=store,
            chain=chain,
            states=states,
            keys=keys,
            removed_at=removed_at,
        )

    # --- reading -------------------------------------------------------------------------

    @property
    def host_id(self) -> str:
        """This host's id."""
        return self._identity.host_id

    @property
    def domain_id(self) -> str:
        """The pinned domain id."""
        return self._chain.domain_id

    @property
    def identity(self) -> HostIdentity:
        """This host's keys (the signer seals states)."""
        return self._identity

    @property
    def head(self) -> SealedState:
        """The newest verified and installed state."""
        with self._lock:
            return self._chain.head

    @property
    def version(self) -> int:
        """The version of the installed head."""
        with self._lock:
            return self._chain.version

    @property
    def removed_at(self) -> int | None:
        """The version of the verified state that removed this host, if one did."""
        with self._lock:
            return self._removed_at

    @property
    def member(self) -> bool:
        """True while the verified head lists this host and no later state removed it."""
        with self._lock:
            return self._is_member_locked()

    @property
    def serving(self) -> bool:
        """True when this host is a member and holds its domain keys."""
        with self._lock:
            return self._is_member_locked() and bool(self._keys)

    def _is_member_locked(self) -> bool:
        return (
            self._removed_at is None
            and self._identity.host_id in self._chain.head.manifest.hosts_by_id
        )

    def status(self) -> NodeStatus:
        """The status reported to anyone who asks (public information only)."""
        source = self._standing_source
        if source is not None:
            source()  # the standing as of now (a bound may have passed since the last report)
        with self._lock:
            head = self._chain.head
            member = self._is_member_locked()
            healthy = member and bool(self._keys) and not self._identity_conflict
            if self._identity_conflict:
                detail = self._identity_conflict
            elif self._removed_at is not None:
                detail = (
                    f"removed from the domain at version {self._removed_at}; "
                    f"stopped following at version {head.version}"
                )
            elif not member:
                detail = f"not a host of the domain at version {head.version}; following the chain"
            elif not self._keys:
                detail = "the domain keys are not unsealed"
            else:
                standing = self._standing
                detail = "; ".join(
                    part
                    for part in (
                        self._fork_detail_locked(),
                        standing.head_unconfirmed,
                        standing.key_service_waiting,
                    )
                    if part
                )
            return NodeStatus(
                host_id=self._identity.host_id,
                domain_id=self._chain.domain_id,
                version=head.version,
                state_hash=head.hash,
                healthy=healthy,
                domain_key_generation=head.manifest.current_generation,
                member=member,
                detail=detail,
                key_service_waiting=healthy and bool(self._standing.key_service_waiting),
                head_unconfirmed=healthy and bool(self._standing.head_unconfirmed),
            )

    @property
    def standing(self) -> PeerStanding:
        """Where this HSA stands with its peers, as last reported."""
        with self._lock:
            return self._standing

    def report_standing_with(self, source: Callable[[], None]) -> None:
        """Have `source()` (which calls `set_standing`) refresh the standing before every
        `status`."""
        self._standing_source = source

    def set_standing(self, standing: PeerStanding) -> None:
        """Record where this HSA stands with its peers (shown in the status detail; the health
        listeners hear of it when the key service starts or stops waiting)."""
        with self._lock:
            before, self._standing = self._standing, standing
            if bool(before.key_service_waiting) != bool(standing.key_service_waiting):
                self._notify_locked()

    def record_fork(self, version: int, peer_host_id: str) -> None:
        """Remember that peer `peer_host_id` holds another state than ours for `version`.

        The chain is not touched: this node keeps serving the chain it verified. The fork is
        logged at ERROR the first time it is seen and shown in the status detail.
        """
        with self._lock:
            if (version, peer_host_id) in self._forks or len(self._forks) >= MAX_FORKS_KEPT:
                return
            self._forks[(version, peer_host_id)] = None
            ours = self._chain.known_hash(version)
        log.error(
            "fork detected at version %d with peer %s: it holds another state for that version "
            "than this host (%s); keeping the verified chain and serving it: investigate which "
            "states the coordinator handed out",
            version,
            peer_host_id,
            ours.hex()[:16] if ours is not None else "not held here",
        )

    def _fork_detail_locked(self) -> str:
        if not self._forks:
            return ""
        version, peer = next(iter(self._forks))
        more = len(self._forks) - 1
        also = f" (and {more} more)" if more else ""
        return f"fork detected at version {version} with peer {peer}{also}: investigate"

    def signing_snapshot(self) -> SigningSnapshot:
        """The head and a copy of its domain keys, to compute and seal a successor.

        Raises FailedPreconditionError when this host cannot seal (not a member, no keys).
        """
        with self._lock:
            if not self._is_member_locked() or not self._keys:
                raise FailedPreconditionError(
                    f"{self._identity.host_id} is not a serving member of the domain at version "
                    f"{self._chain.version}; ask another HSA"
                )
            return SigningSnapshot(head=self._chain.head, keys=dict(self._keys))

    def domain_keys(self) -> DomainKeys:
        """A copy of the domain keys of the head, for sealing and opening key tokens.

        Raises UnavailableError when this host cannot serve keys (not a member, no keys).
        """
        with self._lock:
            if not self._is_member_locked() or not self._keys:
                raise UnavailableError(
                    f"{self._identity.host_id} is not serving (not a member of the domain at "
                    f"version {self._chain.version}, or its domain keys are not unsealed); "
                    "use another HSA"
                )
            manifest = self._chain.head.manifest
            return DomainKeys(
                generation=manifest.current_generation,
                keys=dict(self._keys),
                host_keys=manifest.host_signing_keys,
                former_hosts=frozenset(self._hosts_seen - manifest.hosts_by_id.keys()),
            )

    def states_after(self, after_version: int, limit: int) -> list[SealedState]:
        """Verified states with versions above `after_version`, oldest first, at most `limit`."""
        if limit <= 0:
            return []
        with self._lock:
            # self._states[i] has version i + 1 (the chain is contiguous from genesis).
            return self._states[after_version : after_version + limit]

    def is_peer(self, fingerprint: bytes, host_id: str) -> bool:
        """True if the verified head trusts a host with this id and TLS fingerprint."""
        with self._lock:
            record = self._chain.head.manifest.hosts_by_id.get(host_id)
        return record is not None and record.tls_certificate_fingerprint == fingerprint

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(serving)` now and whenever serving may have changed."""
        with self._lock:
            self._listeners.append(listener)
            serving = self._is_member_locked() and bool(self._keys)
        listener(serving)

    # --- the one way in ------------------------------------------------------------------

    def parse_offered(
        self, message: domain_pb2.SealedState, *, source: str, limits: Limits = DEFAULT_LIMITS
    ) -> SealedState:
        """Parse a state offered by `source`; one that does not parse is refused and logged."""
        try:
            return SealedState.from_message(message, limits)
        except HsmDomainError as error:
            self._throttled.warning(
                f"refused a state from {source} that does not parse: {type(error).__name__}: "
                f"{error}; keeping version {self.version}"
            )
            raise

    def offer(self, state: SealedState, *, source: str = "", quiet_repeats: bool = False) -> bool:
        """Verify, persist (unless the store is read-only) and install `state` if it is the
        next one.

        True if the chain advanced; False if the state is the head already, or if this host
        was removed (by this state or an earlier one). Raises the verification error for a
        refused state (ChainGapError: fetch the missing states first); the node is unchanged.
        With `quiet_repeats` (the sync paths, where another path may have been faster), an
        older state this node installed already is refused with an INFO line, not a WARNING.
        """
        origin = f" from {source}" if source else ""
        with self._lock:
            if self._removed_at is not None:
                return False
            head = self._chain.head
            if state.version == head.version and state.hash == head.hash:
                return False
            was_member = self._is_member_locked()
            try:
                self._chain.classify(state)
                verify_successor(head, state, now=int(self.clock()))
            except ChainGapError as error:
                self._throttled.info(f"state version {state.version}{origin}: {error}")
                raise
            except RollbackError as error:
                repeat = self._chain.known_hash(state.version) == state.hash
                self._refused(state, origin, error, quiet=quiet_repeats and repeat)
                raise
            except HsmDomainError as error:
                self._refused(state, origin, error)
                raise
            listed = self._identity.host_id in state.manifest.hosts_by_id
            if was_member and not listed:
                if not self._store.read_only:
                    self._store.save_removal(state)
                self._removed_at = state.version
                self._keys = {}
                log.warning(
                    "removed from the domain at version %d; stopping to follow", state.version
                )
                self._notify_locked()
                return False
            keys: dict[int, bytes] = {}
            if listed:
                record = state.manifest.hosts_by_id[self._identity.host_id]
                mismatched = _identity_mismatch(self._identity, self._tls_fingerprint, record)
                if mismatched:
                    self._identity_conflict = _conflict_text(
                        self._identity.host_id, mismatched, state.version
                    )
                    self._throttled.log(
                        logging.ERROR,
                        self._identity_conflict,
                        key=f"identity conflict at version {state.version}",
                    )
                    raise FailedPreconditionError(self._identity_conflict)
                try:
                    keys = sealing.unseal_state(
                        state, self._identity.host_id, self._identity.agreement_private_key
                    )
                except HsmDomainError as error:
                    self._refused(state, origin, error)
                    raise
            if not self._store.read_only:
                self._store.save_state(state)
                unsafe_crash_point("hsa_install_after_persist")
            self._chain.update(state)
            self._identity_conflict = ""
            self._states.append(state)
            self._hosts_seen.update(h.host_id for h in state.manifest.message.hosts)
            self._keys = keys
            log.info(
                "installed state version %d (%s)%s, domain key generation %d",
                state.version,
                state.hash.hex()[:16],
                origin,
                state.manifest.current_generation,
            )
            self._notify_locked()
            return True

    def _refused(
        self, state: SealedState, origin: str, error: HsmDomainError, *, quiet: bool = False
    ) -> None:
        self._throttled.log(
            logging.INFO if quiet else logging.WARNING,
            f"refused state version {state.version}{origin}: {type(error).__name__}: {error}; "
            f"keeping version {self._chain.version}",
        )

    def _notify_locked(self) -> None:
        serving = self._is_member_locked() and bool(self._keys)
        for listener in self._listeners:
            try:
                listener(serving)
            except Exception:
                log.exception("health listener failed")


def _load_stored(store: NodeStore, version: int) -> SealedState:
    try:
        return store.load_state(version)
    except HsmDomainError as error:
        raise StoredStateError(
            f"{store.state_path(version)} is not a valid state ({error}); the data directory "
            f"was changed or damaged: remove the state files from version {version} on"
        ) from None


def _stored_removal(store: NodeStore, head: SealedState, host_id: str) -> int | None:
    """The version of a stored, verified state that removes this host from `head`, if any."""
    try:
        removal = store.load_removal()
    except HsmDomainError as error:
        log.warning("ignoring the stored removal state: %s: %s", type(error).__name__, error)
        return None
    if removal is None:
        return None
    try:
        verify_successor(head, removal)
    except HsmDomainError as error:
        log.warning(
            "ignoring the stored removal state (version %d): %s: %s",
            removal.version,
            type(error).__name__,
            error,
        )
        return None
    if host_id in removal.manifest.hosts_by_id or host_id not in head.manifest.hosts_by_id:
        return None
    return removal.version


def _identity_mismatch(
    identity: HostIdentity, tls_fingerprint: bytes, record: domain_pb2.Host
) -> list[str]:
    """Which of this host's keys differ from its record in a state (empty: they all match)."""
    mismatched = []
    if record.signing_public_key != identity.signing_public_key.spki_der:
        mismatched.append("signing key")
    if record.agreement_public_key != identity.agreement_public_key:
        mismatched.append("agreement key")
    if record.tls_certificate_fingerprint != tls_fingerprint:
        mismatched.append("TLS certificate")
    return mismatched


def _conflict_text(host_id: str, mismatched: Sequence[str], version: int) -> str:
    return (
        f"IDENTITY CONFLICT: the verified state version {version} lists host {host_id} with "
        f"another {', '.join(mismatched)} than this host's: the domain trusts someone else "
        f"under this host's name, and this host cannot install it. Compare the fingerprints "
        f"(`hsm-operator domain status`) with this host's; if the domain's record is not this "
        f"host, remove it (`propose remove-host {host_id}`) and enroll this host again"
    )


def _check_identity_matches(
    identity: HostIdentity, tls_certificate_pem: bytes, record: domain_pb2.Host, version: int
) -> None:
    """Refuse to run as a host whose keys differ from its record in the verified state."""
    mismatched = _identity_mismatch(identity, certificate_fingerprint(tls_certificate_pem), record)
    if mismatched:
        raise FailedPreconditionError(
            f"this host's {', '.join(mismatched)} differ from host {identity.host_id} in the "
            f"domain state version {version}: wrong identity directory for this config, or "
            "the domain enrolled someone else under this name"
        )
