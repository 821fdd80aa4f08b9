"""Who may call which method of the coordinator, and what a call costs: checked in one place.

`RULES` names, for every method of the `Coordinator` service, who may call it; the servicer
(`service.CoordinatorService`) is built from it, so every method runs `Admission.admit`
before anything else and a method without a rule cannot be served (the class refuses to be
built). Invariants:
- HSA-only methods need an `hsa` certificate of this domain (only the mutual-TLS port carries
  one) whose SHA-256 fingerprint is the one the head lists for that host: key records for
  hosts of the head only (`HostAccess.MEMBER`); `RegisterHsa` and `WatchStates` also for a
  host that a pending add-host or recover proposal at the head names with that very
  fingerprint (`HostAccess.MEMBER_OR_JOINING`). Nobody else, a removed host or a CA-issued
  certificate for another name or with another key included, gets anything but
  PERMISSION_DENIED naming the caller and why (logged at WARNING, throttled);
- every other call by anyone who is not such an HSA (the operator port, other identities on
  the mutual-TLS port; refused HSA-only calls too) is charged to a token bucket of its client
  address (`_quota.AddressQuota`): RESOURCE_EXHAUSTED "retry in N s" when it is empty, held
  a moment by a bounded number of threads, so a loop of reads cannot starve the HSAs. A page
  of proposals or states costs by what it may hold; the request fields that price depends on
  are checked before the charge;
- the hosts that pending add-host proposals name are read from the store a page at a time and
  remembered for at most a second (or until a proposal is submitted, or the head moves).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, cast

import grpc

from domain_coordinator import _requests as check
from domain_coordinator._quota import AddressQuota, client_address
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, ProposalRecord
from domain_core import crypto
from domain_core.errors import HsmDomainError, PermissionDeniedError, ResourceExhaustedError
from domain_core.limits import MAX_PROPOSAL_PAGE, Limits
from domain_core.model import Proposal, SealedState, added_host, recovered_hosts
from domain_core.pki import PeerIdentity, peer_identity
from domain_edge.throttled_log import ThrottledLog
from domain_proto import services_pb2

log = logging.getLogger(__name__)

_HSA_ONLY = "this call needs an HSA certificate"
_ADDITIONS_PAGE = 100  # pending proposals read at a time for the hosts they add
_PENDING_ADDITIONS_TTL_SECONDS = 1.0  # how long the hosts named by pending add-hosts are kept
# A refusal for an empty quota is held this long before it is sent, by at most this many
# threads at a time: a client looping on refusals then waits instead of costing CPU, and the
# threads left serve the HSAs.
_REFUSAL_HOLD_SECONDS = 1.0
_REFUSALS_HELD = 8


class HostAccess(enum.Enum):
    """Which HSAs an HSA-only call admits (see `Admission.host_refusal`)."""

    MEMBER = "hosts of the domain"
    MEMBER_OR_JOINING = "hosts of the domain and hosts being added"


@dataclass(frozen=True)
class Rule:
    """Who may call one method: the HSAs `hosts` admits, or (None) anyone, charged to the
    quota of their address unless they are an admitted HSA, `price(admission, request)`
    tokens a call (None: one)."""

    hosts: HostAccess | None = None
    price: Callable[[Admission, Any], float] | None = None


def _proposal_page_price(admission: Admission, request: services_pb2.ListProposalsRequest) -> float:
    """A ListProposals page costs by the proposals it may hold."""
    limit = check.page_size(request.limit, check.DEFAULT_PROPOSAL_PAGE, MAX_PROPOSAL_PAGE)
    check.proposal_page_token(request.page_token)
    available = admission.store.count_proposals(include_closed=request.include_closed)
    return 1.0 + min(limit, available) / admission.limits.coordinator_proposals_per_token


def _state_page_price(admission: Admission, request: services_pb2.StatesAfterRequest) -> float:
    """A GetStatesAfter page costs by the states in it: paging through the chain in a loop is
    the heaviest read there is."""
    maximum = admission.limits.max_states_per_response
    limit = check.page_size(request.limit, maximum, maximum)
    pages = max(min(limit, admission.chain.head.version - request.after_version), 0)
    return 1.0 + pages / admission.limits.coordinator_states_per_token


ANYONE: Final = Rule()
MEMBERS: Final = Rule(hosts=HostAccess.MEMBER)
MEMBERS_OR_JOINING: Final = Rule(hosts=HostAccess.MEMBER_OR_JOINING)

# Every method of the Coordinator service and who may call it (a test checks that the two
# lists are the same).
RULES: Final[Mapping[str, Rule]] = MappingProxyType(
    {
        "SubmitProposal": ANYONE,
        "SubmitApproval": ANYONE,
        "GetProposal": ANYONE,
        "ListProposals": Rule(price=_proposal_page_price),
        "CancelProposal": ANYONE,
        "GetLatestState": ANYONE,
        "GetStatesAfter": Rule(price=_state_page_price),
        "WatchStates": MEMBERS_OR_JOINING,
        "GetDomainStatus": ANYONE,
        "RegisterHsa": MEMBERS_OR_JOINING,
        "ListHsas": ANYONE,
        "GetAuditHeads": ANYONE,
        "GetKey": MEMBERS,
        "PutKey": MEMBERS,
        "ListKeyRecords": MEMBERS,
        "DeleteKeyRecord": MEMBERS,
    }
)


@dataclass(frozen=True)
class Caller:
    """An admitted call: its gRPC context, and the calling HSA's identity when the method's
    rule admits HSAs only (None for a method anyone may call)."""

    context: grpc.ServicerContext
    identity: PeerIdentity | None

    @property
    def host(self) -> PeerIdentity:
        """The calling HSA (for methods whose rule admits HSAs only)."""
        if self.identity is None:
            raise RuntimeError("this call was not admitted as an HSA's")
        return self.identity


@dataclass(frozen=True)
class _Addition:
    """A host that a pending add-host proposal names, with the certificate it names."""

    fingerprint: bytes
    proposal_id: bytes


@dataclass(eq=False, repr=False)
class PendingAdditions:
    """The hosts named by the add-host changes of pending proposals for the head."""

    chain: VerifiedChain
    store: CoordinatorStore
    limits: Limits
    now: Callable[[], int]
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _cached: tuple[float, int, dict[str, list[_Addition]]] | None = field(init=False, default=None)

    def named(self, host_id: str) -> list[_Addition]:
        """The pending additions of `host_id` (found again at most once a second)."""
        return self._all().get(host_id, [])

    def forget(self) -> None:
        """Read them again next time (a proposal was submitted)."""
        with self._lock:
            self._cached = None

    def _all(self) -> dict[str, list[_Addition]]:
        head_version = self.chain.head.version
        now = time.monotonic()
        with self._lock:
            cached = self._cached
            if (
                cached is not None
                and cached[1] == head_version
                and now - cached[0] < _PENDING_ADDITIONS_TTL_SECONDS
            ):
                return cached[2]
        head = self.chain.head
        wall = self.now()
        found: dict[str, list[_Addition]] = {}
        for record in self._pending_records():
            if wall >= record.expires_at or not _for_head(record, head):
                continue
            try:
                proposal = Proposal.from_bytes(record.proposal, self.limits)
            except HsmDomainError:
                continue
            if proposal.base_version != head.version or proposal.base_state_hash != head.hash:
                continue
            for change in proposal.changes:
                if change.HasField("add_host"):
                    joining = [added_host(change, proposal.domain_id)]
                elif change.HasField("recover"):
                    joining = recovered_hosts(change, proposal.domain_id)
                else:
                    continue
                for added in joining:
                    found.setdefault(added.host_id, []).append(
                        _Addition(bytes(added.tls_certificate_fingerprint), proposal.id)
                    )
        with self._lock:
            self._cached = (now, head.version, found)
        return found

    def _pending_records(self) -> Iterator[ProposalRecord]:
        """Every pending proposal, read a page at a time (newest first)."""
        before = 0
        while True:
            page = self.store.list_proposals(limit=_ADDITIONS_PAGE, before=before)
            yield from page
            if len(page) < _ADDITIONS_PAGE:
                return
            before = page[-1].seq


def _for_head(record: ProposalRecord, head: SealedState) -> bool:
    """Whether a stored proposal names the head as its base (from the stored columns)."""
    return record.base_version == head.version and crypto.constant_time_equal(
        record.base_state_hash, head.hash
    )


@dataclass(eq=False, repr=False)
class Admission:
    """Admits a call by its method's rule (`admit`), or refuses it before anything else runs."""

    chain: VerifiedChain
    store: CoordinatorStore
    additions: PendingAdditions
    limits: Limits
    stopping: threading.Event
    _quota: AddressQuota = field(init=False)
    _refusals_held: threading.BoundedSemaphore = field(
        init=False, default_factory=lambda: threading.BoundedSemaphore(_REFUSALS_HELD)
    )
    _throttled: ThrottledLog = field(init=False, default_factory=lambda: ThrottledLog(log))

    def __post_init__(self) -> None:
        self._quota = AddressQuota(
            self.limits.coordinator_reads_per_second,
            self.limits.coordinator_read_burst,
            what="calls to the coordinator",
        )

    def admit(self, rule: Rule, request: Any, context: grpc.ServicerContext) -> Caller:
        """The caller, if `rule` admits it (charging its quota if it is not an admitted HSA);
        PERMISSION_DENIED or RESOURCE_EXHAUSTED otherwise."""
        if rule.hosts is not None:
            return Caller(context, self._require_host(context, rule.hosts))
        cost = 1.0 if rule.price is None else rule.price(self, request)
        if context.peer_identities() is not None:  # a client certificate: maybe an HSA
            identity = peer_identity(cast(Mapping[str, Sequence[bytes]], context.auth_context()))
            if (
                identity.spiffe.kind == "hsa"
                and identity.spiffe.domain == self.chain.domain_id
                and not self.host_refusal(identity, HostAccess.MEMBER_OR_JOINING)
            ):
                return Caller(context, None)  # HSAs of the domain are never limited here
        self._charge(context, cost)
        return Caller(context, None)

    def _require_host(self, context: grpc.ServicerContext, access: HostAccess) -> PeerIdentity:
        """The calling HSA's identity, if `access` admits it; PERMISSION_DENIED for anyone else.

        The caller's certificate must be the one (SHA-256 of the DER) that the head lists for
        the host its SPIFFE id names; with MEMBER_OR_JOINING, also the one a pending add-host
        proposal at the head names for a host being added.
        """
        auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
        if not auth.get("x509_pem_cert"):
            self._charge(context)  # a refusal costs a caller's quota like any other call
            raise PermissionDeniedError(
                f"{_HSA_ONLY}; HSAs call it on the coordinator's mutual-TLS port"
            )
        identity = peer_identity(auth)
        if identity.spiffe.kind != "hsa" or identity.spiffe.domain != self.chain.domain_id:
            self._charge(context)
            raise PermissionDeniedError(f"{identity.spiffe.uri} may not call this: {_HSA_ONLY}")
        refusal = self.host_refusal(identity, access)
        if refusal:
            self._charge(context)
            self._throttled.warning(
                f"refused: {refusal}", key=f"refused:{identity.spiffe.uri}", again_if_changed=True
            )
            raise PermissionDeniedError(refusal)
        return identity

    def host_refusal(self, identity: PeerIdentity, access: HostAccess) -> str:
        """Why `access` does not admit this HSA identity; empty when it does."""
        name, uri = identity.spiffe.name, identity.spiffe.uri
        head = self.chain.head
        host = head.manifest.hosts_by_id.get(name)
        if host is not None:
            if crypto.constant_time_equal(host.tls_certificate_fingerprint, identity.fingerprint):
                return ""
            return (
                f"{uri} presents a TLS certificate (fingerprint {identity.fingerprint.hex()[:16]}) "
                f"that is not the one version {head.version} lists for host {name} "
                f"({bytes(host.tls_certificate_fingerprint).hex()[:16]}): only that certificate "
                f"acts as {name}"
            )
        additions = self.additions.named(name)
        joining = next(
            (
                a
                for a in additions
                if crypto.constant_time_equal(a.fingerprint, identity.fingerprint)
            ),
            None,
        )
        if joining is not None:
            if access is HostAccess.MEMBER_OR_JOINING:
                return ""
            return (
                f"{uri} is being added (pending proposal {joining.proposal_id.hex()[:16]}...) "
                f"but is not a host of the domain at version {head.version} yet: this call is "
                f"for {access.value}"
            )
        if additions:
            return (
                f"{uri} presents a TLS certificate (fingerprint {identity.fingerprint.hex()[:16]}) "
                f"that is not the one the pending proposal adding {name} names: this call is "
                f"for {access.value}"
            )
        return (
            f"{uri} is not a host of the domain at version {head.version} (removed, or never "
            f"added) and no pending proposal adds it: this call is for {access.value}"
        )

    def _charge(self, context: grpc.ServicerContext, cost: float = 1.0) -> None:
        """Take `cost` from the bucket of the caller's address; RESOURCE_EXHAUSTED when empty.

        The refusal is held up to `_REFUSAL_HOLD_SECONDS` first (by at most `_REFUSALS_HELD`
        threads), so that a client looping on refusals waits instead of spending CPU here.
        """
        try:
            self._quota.take(client_address(context.peer()), cost)
        except ResourceExhaustedError:
            # Hold the refusal: a client that loops on it waits rather than spends our CPU.
            if self._refusals_held.acquire(blocking=False):
                try:
                    self.stopping.wait(_REFUSAL_HOLD_SECONDS)
                finally:
                    self._refusals_held.release()
            raise
