"""The `Coordinator` gRPC service: quorum flow, chain relay, HSA registry and key records.

The coordinator is an untrusted relay, but an honest one checks everything it can so that
operators get a clear answer early. Invariants:
- it serves only states it verified itself (`TrustedChain` from the pinned genesis): the
  head it reports, the states it streams and relays;
- a proposal is stored only after it parsed, targets the current head, is within its
  lifetime, passes the transition invariants, needs no more approvals than there are
  operators (`quorum.check_reachable`), and carries a valid approval by its proposer;
  an approval is stored only after its signature verified under a current operator's key, at
  most one per operator; both are durable before the caller gets an answer;
- the threshold reported for a proposal is `quorum.evaluate`'s, the rule every HSA applies
  (remembered per proposal, head and number of approvals and votes, which only ever grow);
- proposals are bounded and never read in bulk: `Limits.max_pending_proposals` pending in all,
  `max_pending_proposals_per_operator` of one proposer, `max_stored_proposals_per_operator` of
  one proposer in any state (counted by the store with the insert); `ListProposals` answers a
  page, newest first, within the message limit, charged to the caller's quota by its size;
  the sweeper finds expired and stale proposals, and those that may have a quorum, from the
  store's columns and loads only the latter; a closed proposal is purged after
  `proposal_retention_seconds` once it has expired (its bytes can never be stored again as
  new: they are refused as expired);
- only a proposal's proposer cancels it alone; another current operator's verified cancel
  signature is stored as a vote (one per operator, durable before the answer), and the
  proposal is cancelled once the votes of distinct current operators reach its threshold
  (`quorum.evaluate_cancel`). An approval is never withdrawn. (A coordinator can always drop
  a proposal; this keeps one operator, not the coordinator, from vetoing others.)
- a new state is stored only after it verified as the successor of the head
  (`verify_successor`), with a compare-and-swap on the version, in the same transaction that
  marks its proposal APPLIED; only then is it pushed to HSAs and streams;
- one apply or rotation runs at a time (`_apply_lock`); a lost compare-and-swap makes the
  proposal STALE and re-reads the chain from the store;
- the version and state hash listed for each HSA (`ListHsas`, `GetDomainStatus`) are that
  HSA's self-report (in `RegisterHsa`, or its answer to an `InstallState` push), relayed for
  operators to see; nothing here or anywhere else bases a trust decision on them (a report
  above the head only starts the repair below, which stores only what verifies);
- HSA-only calls need an `hsa` certificate of this domain (only the mutual-TLS port carries
  one) whose SHA-256 fingerprint is the one the head lists for that host (`_require_host`):
  key records (`GetKey`, `PutKey`, `ListKeyRecords`, `DeleteKeyRecord`) are for hosts of the
  head only; `RegisterHsa` and `WatchStates` also admit a host that a pending add-host
  proposal at the head names with that very fingerprint. Nobody else, a removed host or a
  CA-issued certificate for another name or with another key included, gets anything but
  PERMISSION_DENIED naming the caller and why; a host id is registered only by its own
  certificate. Only hosts of the head are asked to apply a proposal or a rotation;
- quotas: a host holds at most `Limits.max_watch_streams_per_host` WatchStates streams (a new
  one replaces its oldest) within the global cap; every other call by anyone who is not such
  an HSA (the operator port, other identities on the mutual-TLS port; refused HSA-only calls
  too) is charged to a token bucket of its client address (`_quota.AddressQuota`),
  RESOURCE_EXHAUSTED "retry in N s" when it is empty, held a moment by a bounded number of
  threads, so a loop of reads cannot starve the HSAs;
- a store behind the HSAs (a restored old copy: an HSA reports a version above the head) is
  logged at WARNING and shown in `GetDomainStatus.store_behind`, and repaired: the newer
  states are fetched from the HSAs that report them (`HsaAdmin.GetStatesAfter`), each
  verified as the successor of the head (`verify_successor`) before it is appended with the
  compare-and-swap; nothing an HSA says is stored unverified;
- an HSA's audit heads (signed checkpoints of its logs, reported with `RegisterHsa`) are kept
  per host and log only after they verified under that host's key in the verified head; a
  kept head is only ever raised: a lower one (a possible cut), one of another chain, or one
  with a bad signature is refused, logged at WARNING and named in the answer;
- errors are raised as `domain_core.errors` exceptions and mapped to statuses by the
  transport's interceptor, never aborted here;
- a key record is stored (`PutKey`) only if it verifies as far as a coordinator can verify
  without secrets: its metadata parses and names this domain and the key, it is signed by the
  calling host, that host is in the verified head and the signature verifies under its key
  from the head, and no token is under a generation the head has retired. It never replaces a
  stored record with a lower metadata version, nor with the same version and other metadata
  bytes (a re-wrap keeps the metadata and may change tokens and signature). A create counts
  the creator's live keys (`Limits.max_keys_per_principal`);
- fences: once a proposal that removes host H has its quorum (and until it is closed), H may
  not write key records (PERMISSION_DENIED), and no record is stored under a domain-key
  generation that a quorate proposal or a due scheduled rotation retires; the fence is set
  before any HSA is asked to produce the state, and checked with the write under one lock, so
  the records the producing HSA lists are all there are (`hsa_node.rewrap`);
- `DeleteKeyRecord` deletes only a stored record whose signature verifies and whose signed
  metadata says PENDING_DELETION with a date that has passed; a deleted record stays as a
  tombstone (never served, its id never created again) for `tombstone_seconds`, then it is
  purged;
- a change an HSA defers (UNAVAILABLE from an HSA that is serving: key records must move
  first) stays PENDING with the HSA's reason and is retried with a back-off (doubling up to
  `MAX_DEFER_SECONDS`), preferring the HSA that deferred it (it resumes its preparation).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import grpc
from google.protobuf.message import DecodeError

from domain_coordinator import _requests as check
from domain_coordinator._hsa import HsaConnections, describe_rpc_error, rpc_code, rpc_details
from domain_coordinator._quota import AddressQuota, WatchSlots, client_address
from domain_coordinator.store import (
    AuditHeadRecord,
    CoordinatorStore,
    HsaRecord,
    ProposalRecord,
    ProposalState,
)
from domain_core import crypto, keytokens, quorum, transition
from domain_core.chain import TrustedChain, verify_successor
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ConflictError,
    FailedPreconditionError,
    ForkError,
    HsmDomainError,
    InvalidInputError,
    MalformedMessageError,
    NotFoundError,
    PermissionDeniedError,
    ProposalExpiredError,
    ResourceExhaustedError,
    StaleProposalError,
    UnknownSignerError,
    VerificationError,
)
from domain_core.limits import DEFAULT_LIMITS, MAX_KEY_PAGE, MAX_PROPOSAL_PAGE, Limits
from domain_core.model import Manifest, Proposal, SealedState, added_host
from domain_core.pki import PeerIdentity, peer_identity
from domain_core.signers import PublicKey
from domain_edge.audit import (
    HSA_LOG_NAME,
    AuditHead,
    HeadOrder,
    compare_heads,
    describe_refusal,
)
from domain_edge.faults import unsafe_crash_point, warn_if_enabled
from domain_edge.throttled_log import ThrottledLog
from domain_proto import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = services_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
DEFAULT_MAX_STREAMS = 64
DEFAULT_SWEEP_INTERVAL_SECONDS = 2.0
DEFAULT_TOMBSTONE_SECONDS = 30 * 86_400
DEFAULT_PROPOSAL_RETENTION_SECONDS = 30 * 86_400
MAX_DEFER_SECONDS = 30.0
PURGE_INTERVAL_SECONDS = 3600.0
# How many proposals one sweep closes, or considers for applying, at most (the rest wait for
# the next sweep); both are found by the store without reading proposals.
_SWEEP_BATCH = 1000
_ADDITIONS_PAGE = 100  # pending proposals read at a time for the hosts they add
_EVALUATIONS_KEPT = 4096  # quorum counts of listed proposals remembered (`_evaluation`)
_HSA_ONLY = "this call needs an HSA certificate"
_PENDING_ADDITIONS_TTL_SECONDS = 1.0  # how long the hosts named by pending add-hosts are cached
_REPLACED_STREAM_WAIT_SECONDS = 2.0  # a replaced stream gives its global slot back within this
# A refusal for an empty quota is held this long before it is sent, by at most this many
# threads at a time: a client looping on refusals then waits instead of costing CPU, and the
# threads left serve the HSAs.
_REFUSAL_HOLD_SECONDS = 1.0
_REFUSALS_HELD = 8

_STATE_TO_PROTO: dict[ProposalState, services_pb2.ProposalState] = {
    ProposalState.PENDING: services_pb2.PROPOSAL_STATE_PENDING,
    ProposalState.APPLIED: services_pb2.PROPOSAL_STATE_APPLIED,
    ProposalState.EXPIRED: services_pb2.PROPOSAL_STATE_EXPIRED,
    ProposalState.CANCELLED: services_pb2.PROPOSAL_STATE_CANCELLED,
    ProposalState.STALE: services_pb2.PROPOSAL_STATE_STALE,
    ProposalState.REJECTED: services_pb2.PROPOSAL_STATE_REJECTED,
}
# HSA answers that mean "this proposal cannot apply", as opposed to "ask another HSA".
_REFUSALS = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class HostAccess(enum.Enum):
    """Which HSAs an HSA-only call admits (see `CoordinatorService._require_host`)."""

    MEMBER = "hosts of the domain"
    MEMBER_OR_JOINING = "hosts of the domain and hosts being added"


@dataclass(frozen=True)
class _Addition:
    """A host that a pending add-host proposal names, with the certificate it names."""

    fingerprint: bytes
    proposal_id: bytes


@dataclass(frozen=True)
class _Outcome:
    """What asking HSAs to produce the next state came to."""

    state: SealedState | None = None
    refused_by: str = ""
    reason: str = ""
    deferred_by: str = ""
    """A serving HSA that answered UNAVAILABLE: it prepares the change (key records first)."""


@dataclass
class _Deferral:
    """When to ask again for a change that an HSA deferred, and whom first."""

    retry_at: float
    delay: float
    host_id: str


@dataclass(frozen=True)
class _Fences:
    """Key-record writes refused while a change that would strand them is under way."""

    hosts: Mapping[str, str]
    """Host id -> why it is being removed."""
    generations: Mapping[int, str]
    """Domain-key generation -> why it is being retired."""


_NO_FENCES = _Fences({}, {})


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _believed_head(stored: AuditHeadRecord | None, key: PublicKey) -> AuditHead | None:
    """The stored head if it still verifies under the host's key (a host re-enrolled under
    the same id has a new key: its old heads no longer bind it), else None."""
    if stored is None:
        return None
    try:
        head = AuditHead.parse(stored.checkpoint)
        head.verify(key)
    except (MalformedMessageError, BadSignatureError):
        return None
    return head


def _stale_detail(head_version: int, proposal_version: int) -> str:
    return (
        f"domain is at version {head_version}, this proposal is for {proposal_version}: "
        "propose again"
    )


class CoordinatorService(services_pb2_grpc.CoordinatorServicer):
    """The servicer and the quorum flow behind it (see the module invariants)."""

    def __init__(
        self,
        *,
        chain: TrustedChain,
        store: CoordinatorStore,
        hsas: HsaConnections,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        max_streams: int = DEFAULT_MAX_STREAMS,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL_SECONDS,
        tombstone_seconds: int = DEFAULT_TOMBSTONE_SECONDS,
        proposal_retention_seconds: int = DEFAULT_PROPOSAL_RETENTION_SECONDS,
    ) -> None:
        self.domain_id = chain.domain_id
        self._chain = chain
        self._store = store
        self._hsas = hsas
        self._limits = limits
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._apply_lock = threading.RLock()
        self._chain_lock = threading.Lock()
        self._state_changed = threading.Condition()
        self._streams = threading.BoundedSemaphore(max_streams)
        self._watch_slots = WatchSlots(limits.max_watch_streams_per_host)
        self._quota = AddressQuota(
            limits.coordinator_reads_per_second,
            limits.coordinator_read_burst,
            what="calls to the coordinator",
        )
        self._refusals_held = threading.BoundedSemaphore(_REFUSALS_HELD)
        self._additions_lock = threading.Lock()
        self._additions: tuple[float, int, dict[str, list[_Addition]]] | None = None
        self._repairing = threading.Lock()
        self._repair_detail = ""
        self._stopping = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._throttled = ThrottledLog(log)
        self._tombstone_seconds = tombstone_seconds
        self._proposal_retention_seconds = proposal_retention_seconds
        self._evaluations: OrderedDict[tuple[bytes, bytes, int, int], tuple[int, str]] = (
            OrderedDict()
        )
        self._evaluations_lock = threading.Lock()
        self._fence_lock = threading.Lock()
        self._fences = _NO_FENCES
        self._deferrals: dict[str, _Deferral] = {}
        self._next_purge = 0.0
        self._refresh_fences()
        warn_if_enabled(log)

    # --- lifecycle -----------------------------------------------------------------------

    def start_background(self) -> None:
        """Start the sweeper: retries, expiry, staleness, scheduled rotation, chain refresh."""
        if self._sweeper is None:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="coordinator-sweeper", daemon=True
            )
            self._sweeper.start()

    def stop(self) -> None:
        """Stop the sweeper and end every WatchStates stream."""
        self._stopping.set()
        with self._state_changed:
            self._state_changed.notify_all()
        if self._sweeper is not None:
            self._sweeper.join(timeout=10)

    @property
    def head(self) -> SealedState:
        """The newest state this coordinator verified and stored."""
        with self._chain_lock:
            return self._chain.head

    def _now(self) -> int:
        return int(self._clock())

    # --- authorisation -------------------------------------------------------------------

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
        if identity.spiffe.kind != "hsa" or identity.spiffe.domain != self.domain_id:
            self._charge(context)
            raise PermissionDeniedError(f"{identity.spiffe.uri} may not call this: {_HSA_ONLY}")
        refusal = self._host_refusal(identity, access)
        if refusal:
            self._charge(context)
            self._throttled.warning(
                f"refused: {refusal}", key=f"refused:{identity.spiffe.uri}", again_if_changed=True
            )
            raise PermissionDeniedError(refusal)
        return identity

    def _host_refusal(self, identity: PeerIdentity, access: HostAccess) -> str:
        """Why `access` does not admit this HSA identity; empty when it does."""
        name, uri = identity.spiffe.name, identity.spiffe.uri
        head = self.head
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
        additions = self._pending_additions().get(name, [])
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

    def _pending_additions(self) -> dict[str, list[_Addition]]:
        """Hosts named by the add-host changes of pending proposals for the head (cached 1 s)."""
        head_version = self.head.version
        now = time.monotonic()
        with self._additions_lock:
            cached = self._additions
            if (
                cached is not None
                and cached[1] == head_version
                and now - cached[0] < _PENDING_ADDITIONS_TTL_SECONDS
            ):
                return cached[2]
        head = self.head
        wall = self._now()
        found: dict[str, list[_Addition]] = {}
        for record in self._pending_records():
            if wall >= record.expires_at or not self._for_head(record, head):
                continue
            try:
                proposal = Proposal.from_bytes(record.proposal, self._limits)
            except HsmDomainError:
                continue
            if proposal.base_version != head.version or proposal.base_state_hash != head.hash:
                continue
            for change in proposal.changes:
                if change.HasField("add_host"):
                    added = added_host(change, proposal.domain_id)
                    found.setdefault(added.host_id, []).append(
                        _Addition(bytes(added.tls_certificate_fingerprint), proposal.id)
                    )
        with self._additions_lock:
            self._additions = (now, head.version, found)
        return found

    def _pending_records(self) -> Iterator[ProposalRecord]:
        """Every pending proposal, read a page at a time (newest first)."""
        before = 0
        while True:
            page = self._store.list_proposals(limit=_ADDITIONS_PAGE, before=before)
            yield from page
            if len(page) < _ADDITIONS_PAGE:
                return
            before = page[-1].seq

    @staticmethod
    def _for_head(record: ProposalRecord, head: SealedState) -> bool:
        """Whether a stored proposal names the head as its base (from the stored columns)."""
        return record.base_version == head.version and crypto.constant_time_equal(
            record.base_state_hash, head.hash
        )

    def _forget_pending_additions(self) -> None:
        with self._additions_lock:
            self._additions = None

    def _admit(self, context: grpc.ServicerContext, cost: float = 1.0) -> None:
        """Charge a call to its client address's quota, unless an admitted HSA makes it.

        HSAs of the domain (and hosts being added) are never limited here; everyone else,
        whoever they are, shares the token bucket of their address.
        """
        if context.peer_identities() is not None:  # a client certificate: maybe an HSA
            identity = peer_identity(cast(Mapping[str, Sequence[bytes]], context.auth_context()))
            if (
                identity.spiffe.kind == "hsa"
                and identity.spiffe.domain == self.domain_id
                and not self._host_refusal(identity, HostAccess.MEMBER_OR_JOINING)
            ):
                return
        self._charge(context, cost)

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
                    self._stopping.wait(_REFUSAL_HOLD_SECONDS)
                finally:
                    self._refusals_held.release()
            raise

    # --- proposal records ----------------------------------------------------------------

    def _load(self, proposal_id: bytes) -> ProposalRecord:
        record = self._store.get_proposal(proposal_id)
        if record is None:
            raise NotFoundError(
                f"no proposal {proposal_id.hex()[:16]}... at this coordinator; check the id "
                "(list the pending proposals)"
            )
        return record

    def _close_if_due(self, record: ProposalRecord, now: int) -> ProposalRecord:
        """Expire or stale a pending proposal whose time or base has passed; the new record."""
        if record.state is not ProposalState.PENDING:
            return record
        closing = self._closing(
            record.expires_at, record.base_version, record.base_state_hash, self.head, now
        )
        if closing is None:
            return record
        state, detail = closing
        if self._store.set_proposal_state(record.proposal_id, state, detail, closed_at=now):
            log.info("proposal %s is %s: %s", record.proposal_id.hex()[:16], state.value, detail)
        return self._load(record.proposal_id)

    @staticmethod
    def _closing(
        expires_at: int, base_version: int, base_state_hash: bytes, head: SealedState, now: int
    ) -> tuple[ProposalState, str] | None:
        """The final state (and its detail) of a pending proposal whose time or base has
        passed, from its stored columns; None while it may still apply."""
        if now >= expires_at:
            return ProposalState.EXPIRED, f"expired at {_iso(expires_at)}"
        if base_version != head.version or not crypto.constant_time_equal(
            base_state_hash, head.hash
        ):
            return ProposalState.STALE, _stale_detail(head.version, base_version)
        return None

    def _close_due(self) -> None:
        """Expire or stale every pending proposal the clock or the head overtook: found by
        the store from indexed columns (nothing else is read), closed in one transaction."""
        now = self._now()
        head = self.head
        due = self._store.due_proposals(now, head.version, head.hash, _SWEEP_BATCH)
        closings = []
        for summary in due:
            closing = self._closing(
                summary.expires_at, summary.base_version, summary.base_state_hash, head, now
            )
            if closing is not None:
                closings.append((summary.proposal_id, *closing))
        if not closings:
            return
        closed = set(self._store.close_proposals(closings, now))
        for proposal_id, state, detail in closings:
            if proposal_id in closed:
                log.info("proposal %s is %s: %s", proposal_id.hex()[:16], state.value, detail)

    def _status(self, record: ProposalRecord) -> services_pb2.ProposalStatus:
        """The wire form of a stored proposal, with the threshold under the head's policy."""
        approvals = [domain_pb2.Approval.FromString(a) for a in record.approvals]
        threshold, standing = self._evaluation(record, approvals)
        detail = record.detail
        if record.state is ProposalState.PENDING and not detail:
            detail = standing
        return services_pb2.ProposalStatus(
            proposal_id=record.proposal_id,
            proposal=record.proposal,
            approvals=approvals,
            state=_STATE_TO_PROTO[record.state],
            threshold=threshold,
            applied_version=record.applied_version,
            detail=detail,
            cancel_votes=[domain_pb2.CancelVote.FromString(v) for v in record.cancel_votes],
        )

    def _evaluation(
        self, record: ProposalRecord, approvals: Sequence[domain_pb2.Approval]
    ) -> tuple[int, str]:
        """The threshold of a stored proposal under the head, and where its approvals (and
        votes to cancel) stand, in words: `quorum.evaluate`'s count, remembered per head and
        number of approvals and votes (neither is ever replaced or withdrawn), so that listing
        the same proposals again parses and verifies nothing again."""
        head = self.head
        key = (record.proposal_id, head.hash, len(record.approvals), len(record.cancel_votes))
        with self._evaluations_lock:
            known = self._evaluations.get(key)
            if known is not None:
                self._evaluations.move_to_end(key)
                return known
        proposal = Proposal.from_bytes(record.proposal, self._limits)
        result = quorum.evaluate(head.manifest, proposal, approvals)
        standing = result.describe() + (
            f"; {result.needed} more needed" if not result.met else "; quorum reached"
        )
        if record.cancel_votes:
            standing += f"; {self._cancel_standing(record)}"
        with self._evaluations_lock:
            self._evaluations[key] = (result.threshold, standing)
            while len(self._evaluations) > _EVALUATIONS_KEPT:
                self._evaluations.popitem(last=False)
        return result.threshold, standing

    @staticmethod
    def _refuse_closed(record: ProposalRecord) -> None:
        """Raise the error that explains why a closed proposal takes no more approvals."""
        state, detail = record.state, record.detail
        if state is ProposalState.APPLIED:
            raise FailedPreconditionError(
                f"the proposal was applied already (version {record.applied_version})"
            )
        if state is ProposalState.EXPIRED:
            raise ProposalExpiredError(f"the proposal {detail or 'expired'}; propose again")
        if state is ProposalState.STALE:
            raise StaleProposalError(detail or "the domain moved on: propose again")
        if state is ProposalState.CANCELLED:
            raise FailedPreconditionError(f"the proposal was {detail or 'cancelled'}")
        if state is ProposalState.REJECTED:
            raise FailedPreconditionError(
                f"the proposal was rejected: {detail}; change it and propose again"
            )

    def _operator_key(self, manifest: Manifest, operator_id: str) -> str:
        """The operator's name; UnknownSignerError if the id is not a current operator."""
        operator = manifest.operators_by_id.get(operator_id)
        if operator is None:
            raise UnknownSignerError(
                f"you are not an operator of this domain (operator id {operator_id[:16]}... is "
                f"not in version {manifest.version})"
            )
        return operator.name

    def _verify_approval(self, manifest: Manifest, approval: domain_pb2.Approval) -> str:
        """Verify an approval under the head's operators; returns the operator's name."""
        name = self._operator_key(manifest, approval.operator_id)
        key = manifest.operator_keys[approval.operator_id]
        try:
            quorum.verify_approval_signature(approval, approval.proposal_id, key)
        except BadSignatureError:
            raise BadSignatureError(
                f"the approval's signature does not verify under the key of operator {name}: "
                "sign this proposal's id with your own token"
            ) from None
        return name

    # --- quorum flow ---------------------------------------------------------------------

    def SubmitProposal(
        self, request: services_pb2.SubmitProposalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        self._admit(context)
        raw = check.serialized(request.proposal, "proposal", self._limits)
        if not request.HasField("proposer_approval"):
            raise InvalidInputError(
                "proposer_approval is missing: the proposer signs the proposal first"
            )
        approval = check.approval(request.proposer_approval, "proposer_approval")
        proposal = Proposal.from_bytes(raw, self._limits)
        now = self._now()
        head = self.head
        quorum.check_applicable(
            head.manifest,
            head.hash,
            proposal,
            now=now,
            max_skew=self._limits.max_clock_skew_seconds,
        )
        # The same invariants the HSA will enforce: refuse an impossible change up front,
        # and one that needs more approvals than there are operators to give them.
        transition.apply_changes(head.manifest.message, proposal, now=now, limits=self._limits)
        quorum.check_reachable(head.manifest, proposal)
        if approval.proposal_id != proposal.id:
            raise BadSignatureError("proposer_approval is for another proposal than the one sent")
        if approval.operator_id != proposal.proposer_id:
            raise InvalidInputError(
                "proposer_approval must be signed by the proposer named in the proposal "
                f"({proposal.proposer_id[:16]}...)"
            )
        name = self._verify_approval(head.manifest, approval)
        # The caps are counted by the store in the insert's own transaction.
        created = self._store.put_proposal(
            proposal.id,
            raw,
            proposal.created_at,
            proposal.expires_at,
            [(approval.operator_id, approval.SerializeToString(deterministic=True))],
            proposer=proposal.proposer_id,
            base_version=proposal.base_version,
            base_state_hash=proposal.base_state_hash,
            max_pending=self._limits.max_pending_proposals,
            max_pending_per_proposer=self._limits.max_pending_proposals_per_operator,
            max_stored_per_proposer=self._limits.max_stored_proposals_per_operator,
            now=now,
        )
        if not created:
            raise AlreadyExistsError(
                f"proposal {proposal.id.hex()[:16]}... was submitted already; approve it by its id"
            )
        self._forget_pending_additions()  # a host it adds may register and watch at once
        log.info(
            "proposal %s submitted by %s for version %d",
            proposal.id.hex()[:16],
            name,
            proposal.base_version,
        )
        return self._status(self._apply_if_met(proposal.id))

    def SubmitApproval(
        self, request: services_pb2.SubmitApprovalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        self._admit(context)
        if not request.HasField("approval"):
            raise InvalidInputError("approval is missing")
        approval = check.approval(request.approval)
        record = self._close_if_due(self._load(approval.proposal_id), self._now())
        self._refuse_closed(record)
        name = self._verify_approval(self.head.manifest, approval)
        added = self._store.add_approval(
            approval.proposal_id,
            approval.operator_id,
            approval.SerializeToString(deterministic=True),
        )
        if not added:
            raise AlreadyExistsError(
                f"already approved by you (operator {name}); one approval per operator counts"
            )
        unsafe_crash_point("after_approval_stored")
        log.info("proposal %s approved by %s", approval.proposal_id.hex()[:16], name)
        return self._status(self._apply_if_met(approval.proposal_id))

    def GetProposal(
        self, request: services_pb2.ProposalIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        self._admit(context)
        proposal_id = check.proposal_id(request.proposal_id)
        return self._status(self._close_if_due(self._load(proposal_id), self._now()))

    def ListProposals(
        self, request: services_pb2.ListProposalsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListProposalsResponse:
        """One page of proposals, newest first (pending ones, or all with `include_closed`).

        At most `limit` (default `check.DEFAULT_PROPOSAL_PAGE`, at most
        `MAX_PROPOSAL_PAGE`) and never more than fits in one message; `next_page_token`
        continues after the last one listed (empty: nothing older). A page costs the caller's
        quota by the proposals it may hold.
        """
        limit = check.page_size(request.limit, check.DEFAULT_PROPOSAL_PAGE, MAX_PROPOSAL_PAGE)
        before = check.proposal_page_token(request.page_token)
        available = self._store.count_proposals(include_closed=request.include_closed)
        self._admit(
            context, 1.0 + min(limit, available) / self._limits.coordinator_proposals_per_token
        )
        now = self._now()
        records = self._store.list_proposals(
            include_closed=request.include_closed, limit=limit + 1, before=before
        )
        response = services_pb2.ListProposalsResponse()
        budget = self._limits.max_message_bytes - 1024
        for index, record in enumerate(records[:limit]):
            if record.state is ProposalState.PENDING:
                record = self._close_if_due(record, now)
            status = self._status(record)
            size = status.ByteSize() + 16
            if size > budget and response.proposals:
                break  # the rest does not fit in one answer
            budget -= size
            response.proposals.append(status)
            if index + 1 < len(records):
                response.next_page_token = str(record.seq)
            else:
                response.next_page_token = ""
        return response

    def CancelProposal(
        self, request: services_pb2.CancelProposalRequest, context: grpc.ServicerContext
    ) -> services_pb2.ProposalStatus:
        """The proposer cancels at once; any other current operator's signature is a vote.

        Votes are stored like approvals (one per operator, durable before the answer) and
        cancel the proposal once those of distinct current operators reach the threshold the
        proposal needs to apply, so no single operator can veto another's proposal.
        """
        self._admit(context)
        proposal_id = check.proposal_id(request.proposal_id)
        operator_id = check.operator_id(request.operator_id)
        vote = domain_pb2.CancelVote(
            proposal_id=proposal_id,
            operator_id=operator_id,
            signature=check.signature(request.signature),
        )
        # The operators who may vote are those of the state the proposal is for: the head,
        # checked again below once the proposal is loaded (no apply runs meanwhile).
        with self._apply_lock:
            head = self.head
            manifest = head.manifest
            name = self._operator_key(manifest, operator_id)
            try:
                quorum.verify_cancel_signature(
                    vote, proposal_id, manifest.operator_keys[operator_id]
                )
            except BadSignatureError:
                raise BadSignatureError(
                    f"the cancel signature does not verify under the key of operator {name}: "
                    "sign the cancel message of this proposal with your own token"
                ) from None
            record = self._close_if_due(self._load(proposal_id), self._now())
            if record.state.closed:
                raise FailedPreconditionError(
                    f"the proposal is {record.state.value} already; there is nothing to cancel"
                )
            proposal = Proposal.from_bytes(record.proposal, self._limits)
            if proposal.base_state_hash != head.hash:
                raise ConflictError(
                    "the domain moved on while the cancel was checked; look at the proposal "
                    "again and retry"
                )
            if operator_id == proposal.proposer_id:
                detail = f"cancelled by operator {name}, who proposed it"
            else:
                if not self._store.add_cancel_vote(
                    proposal_id, operator_id, vote.SerializeToString(deterministic=True)
                ):
                    raise AlreadyExistsError(
                        f"you (operator {name}) voted to cancel this proposal already; "
                        f"{self._cancel_standing(self._load(proposal_id))}"
                    )
                record = self._load(proposal_id)
                votes = [domain_pb2.CancelVote.FromString(v) for v in record.cancel_votes]
                result = quorum.evaluate_cancel(manifest, proposal, votes)
                if not result.met:
                    log.info(
                        "proposal %s: %s voted to cancel (%s)",
                        proposal_id.hex()[:16],
                        name,
                        result.describe("votes to cancel"),
                    )
                    return self._status(record)
                voters = ", ".join(manifest.operators_by_id[i].name for i in result.approved_by)
                detail = f"cancelled by the votes of {result.describe('operators')}: {voters}"
            self._store.set_proposal_state(
                proposal_id, ProposalState.CANCELLED, detail, closed_at=self._now()
            )
        log.info("proposal %s %s", proposal_id.hex()[:16], detail)
        return self._status(self._load(proposal_id))

    def _cancel_standing(self, record: ProposalRecord) -> str:
        """Where the votes to cancel a pending proposal stand, in one phrase."""
        proposal = Proposal.from_bytes(record.proposal, self._limits)
        votes = [domain_pb2.CancelVote.FromString(v) for v in record.cancel_votes]
        result = quorum.evaluate_cancel(self.head.manifest, proposal, votes)
        return f"{result.describe('votes to cancel')}; the proposer alone may cancel at once"

    # --- applying ------------------------------------------------------------------------

    def _apply_if_met(self, proposal_id: bytes) -> ProposalRecord:
        """If the proposal has a quorum under the head, have an HSA apply it; the record."""
        with self._apply_lock:
            record = self._close_if_due(self._load(proposal_id), self._now())
            if record.state is not ProposalState.PENDING:
                self._deferrals.pop(proposal_id.hex(), None)
                return record
            head = self.head
            proposal = Proposal.from_bytes(record.proposal, self._limits)
            approvals = [domain_pb2.Approval.FromString(a) for a in record.approvals]
            result = quorum.evaluate(head.manifest, proposal, approvals)
            if not result.met:
                return record
            unsafe_crash_point("after_quorum_before_apply")
            # Before any HSA lists the key records to prepare the change: no more writes by a
            # host it removes, nor under a generation it retires.
            self._fence(head, proposal)
            # Send only the approvals that count, in the operators' order.
            counted = [a for a in approvals if a.operator_id in result.approved_by]
            # A host that the proposal removes must not produce the state that removes it.
            removed = {c.remove_host.host_id for c in proposal.changes if c.HasField("remove_host")}
            key = proposal.id.hex()
            deferral = self._deferrals.get(key)
            outcome = self._produce(
                head,
                "apply",
                lambda address, host_id: self._hsas.apply_proposal(
                    address, proposal.raw, counted, host_id=host_id
                ),
                expect_proposal=proposal.id,
                exclude=removed,
                prefer=deferral.host_id if deferral is not None else "",
            )
            if outcome.state is not None:
                self._deferrals.pop(key, None)
                unsafe_crash_point("after_apply_before_store")
                try:
                    self._store.append_state_and_close_proposal(
                        outcome.state.version,
                        outcome.state.to_bytes(),
                        proposal.id,
                        closed_at=self._now(),
                    )
                except ConflictError as error:
                    self._store.set_proposal_state(
                        proposal.id,
                        ProposalState.STALE,
                        f"another state was stored for version {outcome.state.version} first "
                        f"({error}): propose again",
                        closed_at=self._now(),
                    )
                    self._refresh_chain()
                    return self._load(proposal.id)
                log.info(
                    "proposal %s applied: version %d (%s)",
                    proposal.id.hex()[:16],
                    outcome.state.version,
                    outcome.state.hash.hex()[:16],
                )
                unsafe_crash_point("after_store_before_push")
                self._advance(outcome.state)
            elif outcome.refused_by:
                self._deferrals.pop(key, None)
                detail = f"{outcome.refused_by} refused to apply it: {outcome.reason}"
                self._store.set_proposal_state(
                    proposal.id, ProposalState.REJECTED, detail, closed_at=self._now()
                )
                log.warning("proposal %s rejected: %s", proposal.id.hex()[:16], detail)
            else:
                retry = self._defer(key, outcome)
                detail = (
                    f"no HSA could apply it yet: {outcome.reason}; the coordinator retries{retry}"
                )
                self._store.set_proposal_state(proposal.id, ProposalState.PENDING, detail)
                self._throttled.warning(
                    f"proposal {proposal.id.hex()[:16]}: {detail}",
                    key=f"apply:{proposal.id.hex()}",
                    again_if_changed=True,
                )
            return self._load(proposal.id)

    def _defer(self, key: str, outcome: _Outcome) -> str:
        """Remember when to try a deferred change again (back-off); " in N s" for messages,
        "" when the outcome was not a deferral (the next sweep retries)."""
        if not outcome.deferred_by:
            self._deferrals.pop(key, None)
            return ""
        previous = self._deferrals.get(key)
        delay = (
            self._sweep_interval
            if previous is None
            else min(previous.delay * 2, max(MAX_DEFER_SECONDS, self._sweep_interval))
        )
        self._deferrals[key] = _Deferral(time.monotonic() + delay, delay, outcome.deferred_by)
        return f" in {delay:.0f} s"

    def _due(self, key: str) -> bool:
        """Whether a change that may have been deferred should be tried now (the sweep)."""
        deferral = self._deferrals.get(key)
        return deferral is None or time.monotonic() >= deferral.retry_at

    # --- fences --------------------------------------------------------------------------

    def _strands(
        self, head: SealedState, manifest: domain_pb2.Manifest, why: str
    ) -> tuple[dict[str, str], dict[int, str]]:
        before = head.manifest.message
        return (
            dict.fromkeys(transition.removed_hosts(before, manifest), why),
            dict.fromkeys(transition.retired_generations(before, manifest), why),
        )

    def _proposal_fences(
        self, head: SealedState, proposal: Proposal
    ) -> tuple[dict[str, str], dict[int, str]]:
        """What a proposal would strand, from the head (nothing if it does not apply)."""
        try:
            manifest, _ = transition.apply_changes(
                head.manifest.message, proposal, now=self._now(), limits=self._limits
            )
        except HsmDomainError:
            return {}, {}
        return self._strands(
            head, manifest, f"proposal {proposal.id.hex()[:16]} reached its quorum"
        )

    def _rotation_fences(self, head: SealedState) -> tuple[dict[str, str], dict[int, str]]:
        """What the scheduled rotation would strand, once it is due (nothing before)."""
        try:
            manifest = transition.scheduled_rotation_manifest(
                transition.StateHead(head.manifest, head.hash), now=self._now()
            )
        except HsmDomainError:
            return {}, {}
        return self._strands(head, manifest, "the scheduled domain key rotation is due")

    def _fence(self, head: SealedState, proposal: Proposal | None) -> None:
        """Add the fences of one change (a proposal, or the scheduled rotation for None)."""
        hosts, generations = (
            self._proposal_fences(head, proposal)
            if proposal is not None
            else self._rotation_fences(head)
        )
        if not hosts and not generations:
            return
        with self._fence_lock:
            current = self._fences
            self._fences = _Fences(
                {**hosts, **current.hosts}, {**generations, **current.generations}
            )

    def _quorum_candidates(self) -> list[bytes]:
        """The pending proposals that may have a quorum: those with at least as many stored
        approvals as the head's default threshold (no proposal needs fewer, and every stored
        approval verified on arrival), found by the store without reading any proposal."""
        threshold = self.head.manifest.message.quorum.threshold
        return self._store.pending_with_approvals(threshold, _SWEEP_BATCH)

    def _refresh_fences(self, candidates: Sequence[bytes] | None = None) -> None:
        """Recompute the fences from the head, the quorate pending proposals and a due
        rotation (at start, and on every sweep: fences of closed changes go)."""
        with self._apply_lock:  # not between another call's fence and its apply
            self._refresh_fences_locked(
                self._quorum_candidates() if candidates is None else candidates
            )

    def _refresh_fences_locked(self, candidates: Sequence[bytes]) -> None:
        head = self.head
        hosts, generations = self._rotation_fences(head)
        for proposal_id in candidates:
            record = self._store.get_proposal(proposal_id)
            if record is None or record.state is not ProposalState.PENDING:
                continue
            try:
                proposal = Proposal.from_bytes(record.proposal, self._limits)
                approvals = [domain_pb2.Approval.FromString(a) for a in record.approvals]
                if not quorum.evaluate(head.manifest, proposal, approvals).met:
                    continue
            except (HsmDomainError, DecodeError):
                continue
            more_hosts, more_generations = self._proposal_fences(head, proposal)
            hosts.update(more_hosts)
            generations.update(more_generations)
        with self._fence_lock:
            self._fences = _Fences(hosts, generations)

    def _produce(
        self,
        head: SealedState,
        what: str,
        call: Callable[[str, str], domain_pb2.SealedState],
        *,
        expect_proposal: bytes | None,
        exclude: frozenset[str] | set[str] = frozenset(),
        prefer: str = "",
    ) -> _Outcome:
        """Ask registered hosts of `head` (but `exclude`), in random order (`prefer` first),
        for its successor (`call(address, host_id)`)."""
        members = head.manifest.hosts_by_id
        hsas = [
            h for h in self._store.list_hsas() if h.host_id in members and h.host_id not in exclude
        ]
        if not hsas:
            return _Outcome(reason="no HSA has registered with this coordinator")
        random.shuffle(hsas)
        hsas.sort(key=lambda h: h.host_id != prefer)
        reasons: list[str] = []
        deferred_by = ""
        for hsa in hsas:
            try:
                status = self._hsas.get_status(hsa.address, host_id=hsa.host_id)
            except grpc.RpcError as error:
                reasons.append(f"{hsa.host_id} is unreachable ({describe_rpc_error(error)})")
                continue
            if status.host_id != hsa.host_id:
                reasons.append(f"{hsa.address} now serves {status.host_id[:63]!r}")
                continue
            if not (status.healthy and status.member):
                reasons.append(f"{hsa.host_id} is not serving ({status.detail[:200]})")
                continue
            if status.version != head.version or status.state_hash != head.hash:
                reasons.append(f"{hsa.host_id} is at version {status.version}, not {head.version}")
                continue
            try:
                message = call(hsa.address, hsa.host_id)
            except grpc.RpcError as error:
                code = rpc_code(error)
                if code in _REFUSALS:
                    return _Outcome(
                        refused_by=hsa.host_id,
                        reason=rpc_details(error),
                    )
                if code is grpc.StatusCode.UNAVAILABLE and not deferred_by:
                    # A serving HSA that answers UNAVAILABLE prepares the change (key records
                    # must move first): it resumes where it stopped when asked again.
                    deferred_by = hsa.host_id
                reasons.append(f"{hsa.host_id}: {describe_rpc_error(error)}")
                continue
            try:
                state = SealedState.from_message(message, self._limits)
                verify_successor(head, state, now=self._now())
                got = state.proposal.id if state.proposal is not None else None
                if got != expect_proposal:
                    raise FailedPreconditionError("the state carries another proposal")
            except HsmDomainError as error:
                log.error(
                    "%s returned a state for %s that does not verify: %s", hsa.host_id, what, error
                )
                reasons.append(f"{hsa.host_id} returned a state that does not verify")
                continue
            return _Outcome(state=state)
        return _Outcome(reason="; ".join(reasons)[:1000], deferred_by=deferred_by)

    def _advance(self, state: SealedState, *, repairing: bool = False) -> None:
        """Accept a stored state: update the chain, stale the proposals it overtook, push it.

        While `repairing` (appending states fetched from the HSAs) only the chain moves; the
        repair closes proposals and pushes once it is done.
        """
        with self._chain_lock:
            self._chain.update(state)
        with self._state_changed:
            self._state_changed.notify_all()
        if not repairing:
            self._close_overtaken()
            self._push(state)

    def _close_overtaken(self) -> None:
        """Stale or expire the pending proposals that the head or the clock overtook."""
        self._close_due()

    def _push(self, state: SealedState) -> None:
        """Send InstallState to every registered host of `state`, each in its own thread.

        Hosts the state does not list (removed, or not yet added) are not pushed to; they
        pull when they want to follow.
        """
        members = state.manifest.hosts_by_id
        for hsa in self._store.list_hsas():
            if hsa.host_id not in members:
                continue
            threading.Thread(
                target=self._push_one,
                args=(hsa.host_id, hsa.address, state),
                name=f"push-{hsa.host_id}",
                daemon=True,
            ).start()

    def _push_one(self, host_id: str, address: str, state: SealedState) -> None:
        try:
            response = self._hsas.install_state(address, state.message, host_id=host_id)
        except grpc.RpcError as error:
            log.info(
                "pushing version %d to %s failed (%s); it will pull",
                state.version,
                host_id,
                describe_rpc_error(error),
            )
        except RuntimeError:
            pass  # shutting down
        else:
            log.info("pushed version %d to %s", state.version, host_id)
            unsafe_crash_point("during_push")
            self._record_report(host_id, response.version, response.state_hash, "InstallState")

    def _record_report(self, host_id: str, version: int, state_hash: bytes, how: str) -> None:
        """Keep the version an HSA acknowledged; a malformed one is logged and dropped."""
        try:
            version, state_hash = check.reported_state(version, state_hash)
        except InvalidInputError as error:
            log.warning("%s answered %s with a malformed version: %s", host_id, how, error)
            return
        if version:
            self._warn_if_fork(host_id, version, state_hash)
            with contextlib.suppress(RuntimeError):  # the store closed: shutting down
                self._store.record_hsa_version(host_id, version, state_hash, self._now())
            self._note_report(host_id, version, how)

    def _warn_if_fork(self, host_id: str, version: int, state_hash: bytes) -> None:
        """Log an HSA that reports another state than this coordinator's for a version."""
        with self._chain_lock:
            known = self._chain.known_hash(version)
        if known is not None and known != state_hash:
            self._throttled.warning(
                f"{host_id} reports state {state_hash.hex()[:16]} at version {version}, but "
                f"this coordinator's chain has {known.hex()[:16]} there: a fork; investigate",
                key=f"fork:{host_id}",
                again_if_changed=True,
            )

    # --- a store behind the HSAs -----------------------------------------------------------

    def _note_report(self, host_id: str, version: int, how: str) -> None:
        """An HSA reported `version`: if that is above the head, warn and start the repair."""
        if version <= self.head.version:
            return
        self._refresh_chain()  # another coordinator on a shared store may have stored it
        head_version = self.head.version
        if version <= head_version:
            return
        self._throttled.warning(
            f"store behind the HSAs: {host_id} reports version {version} ({how}), but this "
            f"coordinator's store is at version {head_version} (restored from an old copy?); "
            "fetching the newer states from the HSAs, verifying and appending them",
            key="store-behind",
            again_if_changed=True,
        )
        self._start_repair()

    def _store_behind(self, head: SealedState, hsas: Sequence[HsaRecord]) -> str:
        """What `GetDomainStatus.store_behind` says: empty unless an HSA reports a newer version."""
        ahead = sorted(
            ((h.version, h.host_id) for h in hsas if h.version > head.version), reverse=True
        )
        if not ahead:
            return ""
        reports = ", ".join(f"{host} reports version {version}" for version, host in ahead[:8])
        repair = self._repair_detail or "fetching the newer states from them"
        return (
            f"store behind the HSAs: {reports}; this coordinator's store is at version "
            f"{head.version}; {repair}"
        )

    def _start_repair(self) -> None:
        """Run `_repair` in a thread of its own, unless one runs already."""
        if self._stopping.is_set() or not self._repairing.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self._repair()
            except Exception:
                log.exception("repairing the store from the HSAs failed; retrying later")
            finally:
                self._repairing.release()

        threading.Thread(target=run, name="coordinator-repair", daemon=True).start()

    def _repair(self) -> None:
        """Fetch the states HSAs report beyond the head, verify them and append them.

        Each state must verify as the successor of the head (`verify_successor`, the check
        applied to a state an HSA produced) before the store's compare-and-swap appends it;
        a pending proposal that a fetched state carries is closed as APPLIED with it.
        """
        with self._apply_lock:
            self._refresh_chain()
            start = self.head.version
            sources = sorted(
                (h for h in self._store.list_hsas() if h.version > start),
                key=lambda h: h.version,
                reverse=True,
            )
            if not sources:
                self._repair_detail = ""
                return
            failures: list[str] = []
            for source in sources:
                if source.version <= self.head.version or self._stopping.is_set():
                    continue
                try:
                    self._fetch_from(source)
                except grpc.RpcError as error:
                    failures.append(f"{source.host_id}: {describe_rpc_error(error)}")
                except HsmDomainError as error:
                    log.error(
                        "%s served a state that does not verify after version %d: %s",
                        source.host_id,
                        self.head.version,
                        error,
                    )
                    failures.append(f"{source.host_id} served a state that does not verify")
                except RuntimeError:
                    return  # shutting down
            head = self.head
            if head.version > start:
                log.info(
                    "repaired the store from the HSAs: versions %d to %d verified and stored",
                    start + 1,
                    head.version,
                )
                self._close_overtaken()
                self._push(head)
            if head.version >= sources[0].version:
                self._repair_detail = ""
                return
            self._repair_detail = (
                f"the repair stopped at version {head.version}: "
                + ("; ".join(failures) or "no HSA served the newer states")
            )[:1000]
            self._throttled.warning(
                f"store behind the HSAs: {self._repair_detail}", key="repair", again_if_changed=True
            )

    def _fetch_from(self, source: HsaRecord) -> None:
        """Page through `source`'s states after the head; verify and append each one."""
        while not self._stopping.is_set():
            head = self.head
            messages = self._hsas.get_states_after(
                source.address, head.version, host_id=source.host_id
            )
            advanced = False
            for message in messages:
                state = SealedState.from_message(message, self._limits)
                with self._chain_lock:
                    known = self._chain.known_hash(state.version)
                if known is not None:
                    if known != state.hash:
                        raise ForkError(
                            f"{source.host_id} holds another state for version {state.version} "
                            "than this coordinator's chain: a fork; investigate"
                        )
                    continue
                verify_successor(self.head, state, now=self._now())
                if not self._append_fetched(state):
                    return  # another coordinator stored one first; the sweeper tries again
                advanced = True
            if not advanced:
                return

    def _append_fetched(self, state: SealedState) -> bool:
        """Store a verified successor of the head (compare-and-swap); False if it lost."""
        carried = state.proposal.id if state.proposal is not None else None
        record = self._store.get_proposal(carried) if carried is not None else None
        try:
            if carried is not None and record is not None and not record.state.closed:
                self._store.append_state_and_close_proposal(
                    state.version, state.to_bytes(), carried
                )
            else:
                self._store.append_state(state.version, state.to_bytes())
        except ConflictError:
            self._refresh_chain()
            return False
        log.info(
            "stored version %d (%s), fetched from the HSAs and verified",
            state.version,
            state.hash.hex()[:16],
        )
        self._advance(state, repairing=True)
        return True

    def _refresh_chain(self) -> None:
        """Verify and adopt states another coordinator stored (a shared store)."""
        while True:
            head = self.head
            batch = self._store.states_after(head.version, self._limits.max_states_per_response)
            if not batch:
                return
            for raw in batch:
                try:
                    state = SealedState.from_bytes(raw, self._limits)
                    with self._chain_lock:
                        self._chain.update(state)
                except HsmDomainError as error:
                    self._throttled.warning(
                        f"the store holds a state after version {self.head.version} that does "
                        f"not verify: {error}; not serving it",
                        key="refresh",
                        again_if_changed=True,
                    )
                    return
                with self._state_changed:
                    self._state_changed.notify_all()
                log.info("adopted version %d from the store", state.version)

    def _rotate_if_due(self) -> None:
        """Scheduled rotation: when due, an HSA rotates the domain key; verify, store, push.

        An HSA defers it while key records under the generation it retires are re-wrapped;
        the rotation then waits (logged, with the reason, and retried with a back-off).
        """
        now = self._now()
        if transition.rotation_due_at(self.head.manifest) > now:
            self._deferrals.pop("rotation", None)
            return
        if not self._due("rotation"):
            return
        with self._apply_lock:
            head = self.head
            if transition.rotation_due_at(head.manifest) > now:
                return
            self._fence(head, None)
            deferral = self._deferrals.get("rotation")
            outcome = self._produce(
                head,
                "rotation",
                lambda address, host_id: self._hsas.rotate_domain_key(address, host_id=host_id),
                expect_proposal=None,
                prefer=deferral.host_id if deferral is not None else "",
            )
            if outcome.state is None:
                retry = self._defer("rotation", outcome) if not outcome.refused_by else ""
                reason = (
                    f"{outcome.refused_by} refused: {outcome.reason}"
                    if outcome.refused_by
                    else outcome.reason
                )
                what = "waits" if outcome.deferred_by else "failed"
                self._throttled.warning(
                    f"scheduled domain key rotation is due but {what}: {reason}"
                    + (f"; retrying{retry}" if retry else ""),
                    key="rotation",
                    again_if_changed=True,
                )
                return
            self._deferrals.pop("rotation", None)
            try:
                self._store.append_state(outcome.state.version, outcome.state.to_bytes())
            except ConflictError:
                self._refresh_chain()
                return
            log.info(
                "scheduled rotation stored: version %d, domain key generation %d",
                outcome.state.version,
                outcome.state.manifest.current_generation,
            )
            self._advance(outcome.state)

    def sweep_once(self) -> None:
        """One pass of the sweeper: adopt stored states, repair from HSAs if behind, close the
        proposals whose expiry or base passed, retry those that may have a quorum (deferred
        ones after their back-off), rotate, purge old tombstones and closed proposals.

        It reads no proposal that is not quorate-looking: expiry and staleness come from the
        store's indexed columns, and only proposals with enough approvals stored are loaded.
        """
        self._refresh_chain()
        head = self.head
        if any(h.version > head.version for h in self._store.list_hsas()):
            self._start_repair()
        self._close_due()
        candidates = self._quorum_candidates()
        self._refresh_fences(candidates)
        waiting = {c.hex() for c in candidates}
        for key in set(self._deferrals) - waiting - {"rotation"}:
            self._deferrals.pop(key, None)
        for proposal_id in candidates:
            if self._due(proposal_id.hex()):
                self._apply_if_met(proposal_id)
        self._rotate_if_due()
        self._purge()

    def _purge(self) -> None:
        """Hourly: remove the tombstones of keys deleted longer ago than their waiting period,
        and the proposals closed longer ago than the retention period that have expired."""
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
        self.purge_closed_proposals()
        purged = self._store.purge_deleted_keys(self._now() - self._tombstone_seconds)
        if purged:
            log.info(
                "purged %d deleted key records, deleted more than %d days ago",
                purged,
                self._tombstone_seconds // 86_400,
            )

    def purge_closed_proposals(self) -> int:
        """Delete the proposals (approvals and votes to cancel with them) that were closed
        more than the retention period ago and have expired by this coordinator's clock; how
        many. An expired proposal cannot be submitted again, so a purged one stays closed."""
        now = self._now()
        purged = self._store.purge_closed_proposals(now - self._proposal_retention_seconds, now)
        if purged:
            log.info(
                "purged %d proposals closed more than %d days ago",
                purged,
                self._proposal_retention_seconds // 86_400,
            )
        return purged

    def _sweep_loop(self) -> None:
        while not self._stopping.wait(self._sweep_interval):
            try:
                self.sweep_once()
            except Exception:
                log.exception("the coordinator's sweep failed; retrying")

    # --- the chain -----------------------------------------------------------------------

    def GetLatestState(
        self, request: services_pb2.LatestStateRequest, context: grpc.ServicerContext
    ) -> domain_pb2.SealedState:
        self._admit(context)
        return self.head.message

    def _verified_after(self, after_version: int, limit: int) -> list[bytes]:
        """Stored states after a version, but none past this coordinator's verified head."""
        head_version = self.head.version
        count = min(limit, head_version - after_version)
        if count <= 0:
            return []
        return self._store.states_after(after_version, count)

    def GetStatesAfter(
        self, request: services_pb2.StatesAfterRequest, context: grpc.ServicerContext
    ) -> services_pb2.StatesResponse:
        maximum = self._limits.max_states_per_response
        limit = check.page_size(request.limit, maximum, maximum)
        # A page costs by the states in it: paging through the chain in a loop is the
        # heaviest read there is.
        pages = max(min(limit, self.head.version - request.after_version), 0)
        self._admit(context, 1.0 + pages / self._limits.coordinator_states_per_token)
        response = services_pb2.StatesResponse()
        budget = self._limits.max_message_bytes - 1024
        for raw in self._verified_after(request.after_version, limit):
            if len(raw) + 16 > budget and response.states:
                break  # the caller asks again after the last state it got
            budget -= len(raw) + 16
            response.states.append(domain_pb2.SealedState.FromString(raw))
        return response

    def WatchStates(
        self, request: services_pb2.WatchStatesRequest, context: grpc.ServicerContext
    ) -> Iterator[domain_pb2.SealedState]:
        identity = self._require_host(context, HostAccess.MEMBER_OR_JOINING)
        host_id = identity.spiffe.name
        slot, replaced = self._watch_slots.open(host_id)
        if replaced is not None:
            log.info("%s opened another WatchStates stream; its oldest one is replaced", host_id)
            with self._state_changed:
                self._state_changed.notify_all()
        # A replaced stream gives its global slot back as soon as it wakes up.
        wait = _REPLACED_STREAM_WAIT_SECONDS if replaced is not None else None
        if not self._streams.acquire(blocking=wait is not None, timeout=wait):
            self._watch_slots.close(slot)
            raise ResourceExhaustedError(
                "too many WatchStates streams are open; poll GetStatesAfter or retry later"
            )
        try:
            log.info("%s watches states after version %d", host_id, request.after_version)
            last = request.after_version
            while not self._stopping.is_set() and context.is_active():
                if slot.replaced.is_set():
                    raise ResourceExhaustedError(
                        f"this WatchStates stream of {host_id} was replaced by a newer one: a "
                        f"host holds at most {self._limits.max_watch_streams_per_host}"
                    )
                batch = self._verified_after(last, self._limits.max_states_per_response)
                if batch:
                    for raw in batch:
                        yield domain_pb2.SealedState.FromString(raw)
                        last += 1
                    continue
                # Up to date: a host removed meanwhile (it got the state that removed it) or
                # whose addition was dropped gives its slot back.
                refusal = self._host_refusal(identity, HostAccess.MEMBER_OR_JOINING)
                if refusal:
                    raise PermissionDeniedError(refusal)
                with self._state_changed:
                    if (
                        self.head.version <= last
                        and not self._stopping.is_set()
                        and not slot.replaced.is_set()
                    ):
                        self._state_changed.wait(timeout=1.0)
        finally:
            self._streams.release()
            self._watch_slots.close(slot)

    def GetDomainStatus(
        self, request: services_pb2.DomainStatusRequest, context: grpc.ServicerContext
    ) -> services_pb2.DomainStatusResponse:
        self._admit(context)
        head = self.head
        hsas = self._store.list_hsas()
        return services_pb2.DomainStatusResponse(
            domain_id=self.domain_id,
            version=head.version,
            state_hash=head.hash,
            hsas=self._endpoints(hsas),
            pending_proposals=self._store.count_proposals(),
            store_behind=self._store_behind(head, hsas),
        )

    # --- HSA registry --------------------------------------------------------------------

    def _endpoints(self, hsas: Sequence[HsaRecord] | None = None) -> list[services_pb2.HsaEndpoint]:
        """Every registered HSA with the version it last reported (relayed, not verified)."""
        return [
            services_pb2.HsaEndpoint(
                host_id=h.host_id,
                address=h.address,
                version=h.version,
                state_hash=h.state_hash,
                reported_at=h.reported_at,
            )
            for h in (self._store.list_hsas() if hsas is None else hsas)
        ]

    def RegisterHsa(
        self, request: services_pb2.RegisterHsaRequest, context: grpc.ServicerContext
    ) -> services_pb2.RegisterHsaResponse:
        identity = self._require_host(context, HostAccess.MEMBER_OR_JOINING)
        host_id = check.host_id(request.host_id)
        address = check.address(request.address)
        if host_id != identity.spiffe.name:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} may not register as host {host_id}: the host id must "
                "match the certificate"
            )
        version, state_hash = check.reported_state(request.version, request.state_hash)
        heads = check.audit_heads(request.audit_heads)
        if version:
            self._warn_if_fork(host_id, version, state_hash)
        previous = {h.host_id: h.address for h in self._store.list_hsas()}.get(host_id)
        self._store.register_hsa(host_id, address, self._now(), version, state_hash)
        refused = self._keep_audit_heads(host_id, heads)
        if previous != address:
            log.info("%s registered at %s", host_id, address)
            if previous is not None and previous not in {
                h.address for h in self._store.list_hsas()
            }:
                self._hsas.forget(previous)
        self._note_report(host_id, version, "RegisterHsa")
        return services_pb2.RegisterHsaResponse(
            version=self.head.version, refused_audit_heads=refused
        )

    def ListHsas(
        self, request: services_pb2.ListHsasRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListHsasResponse:
        self._admit(context)
        return services_pb2.ListHsasResponse(hsas=self._endpoints())

    # --- audit heads ---------------------------------------------------------------------

    def _keep_audit_heads(self, host_id: str, heads: Sequence[bytes]) -> list[str]:
        """Keep each reported head that raises the stored one; why the others were refused
        (each refusal also logged, throttled)."""
        key = self.head.manifest.host_signing_key(host_id)
        refused = []
        for raw in heads:
            reason = self._keep_audit_head(host_id, raw, key)
            if reason:
                refused.append(reason)
                if key is not None:  # (a host being added reports again once a member)
                    where = " ".join(reason.split()[:2]).rstrip(":")  # "hsa-1 audit.log"
                    self._throttled.warning(reason, key=f"audit-head:{where}")
        return refused

    def _keep_audit_head(self, host_id: str, raw: bytes, key: PublicKey | None) -> str:
        """Store one head if it verifies and is above the stored one; "" or why not."""
        try:
            head = AuditHead.parse(raw)
        except MalformedMessageError as error:
            return f"{host_id}: an audit head that is not a signed checkpoint ({error}): refused"
        if head.host != host_id or not HSA_LOG_NAME.fullmatch(head.log):
            return f"{host_id}: {head.describe()[:160]} is not a head of {host_id}'s logs: refused"
        if key is None:
            return (
                f"{head.describe()}: {host_id} is not a host of version {self.head.version}, "
                "so its head cannot be verified: refused (reported again once it is a member)"
            )
        try:
            head.verify(key)
        except BadSignatureError as error:
            return f"{error}: refused"
        for _ in range(3):  # compare-and-swap: a concurrent report may have raised it
            stored = self._store.get_audit_head(host_id, head.log)
            known = _believed_head(stored, key)
            order = compare_heads(known, head)
            if order is HeadOrder.SAME:
                return ""
            if order is not HeadOrder.NEWER and known is not None:
                return describe_refusal(known, head)
            record = AuditHeadRecord(host_id, head.log, head.seq, head.raw, self._now())
            if self._store.put_audit_head(record, stored.checkpoint if stored else None):
                if known is None and stored is not None:
                    log.info(
                        "%s: the stored head does not verify under the host's current key; "
                        "replaced by %s",
                        host_id,
                        head.describe(),
                    )
                return ""
        return f"{head.describe()}: the stored head kept changing meanwhile; report it again"

    def GetAuditHeads(
        self, request: services_pb2.AuditHeadsRequest, context: grpc.ServicerContext
    ) -> services_pb2.AuditHeadsResponse:
        """The highest audit head stored per host and log (public: every reader verifies
        each under the host's key)."""
        self._admit(context)
        host_id = check.host_id(request.host_id) if request.host_id else ""
        response = services_pb2.AuditHeadsResponse()
        budget = self._limits.max_message_bytes - 1024
        for record in self._store.list_audit_heads(host_id):
            budget -= len(record.checkpoint) + 16
            if budget < 0:
                break
            response.heads.append(services_pb2.AuditHead(checkpoint=record.checkpoint))
        return response

    # --- key records ---------------------------------------------------------------------

    def GetKey(
        self, request: services_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.KeyRecord:
        self._require_host(context, HostAccess.MEMBER)
        key_id = check.key_id(request.key_id)
        entry = self._store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        record = keys_pb2.KeyRecord.FromString(entry.record)
        record.revision = entry.revision
        return record

    def PutKey(
        self, request: services_pb2.PutKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.PutKeyResponse:
        """Store a key record that verifies as far as a coordinator can tell (see the module
        invariants), with a compare-and-swap on its revision (0: create)."""
        identity = self._require_host(context, HostAccess.MEMBER)
        record = request.record
        key_id, raw, metadata = check.key_record(record, self.domain_id, self._limits)
        caller = identity.spiffe.name
        head = self.head
        self._check_record_signature(record, key_id, head, writer=caller)
        generations = {t.domain_key_generation for t in record.tokens}
        oldest = head.manifest.message.key_generations[0].generation
        if generations and min(generations) < oldest:
            # A lagging HSA: no HSA could open it (a newer generation than the head's may be a
            # state this coordinator has not adopted yet; the HSAs judge those).
            raise FailedPreconditionError(
                f"the record of key {key_id} is sealed under domain key generation "
                f"{min(generations)}, which the domain retired (it holds {oldest} and newer at "
                f"version {head.version}): the writing HSA is behind; it catches up, retry"
            )
        with self._fence_lock:
            fences = self._fences
            if caller in fences.hosts:
                raise PermissionDeniedError(
                    f"{caller} is being removed from the domain ({fences.hosts[caller]}): it "
                    "may not write key records; use another HSA"
                )
            retiring = sorted(generations & fences.generations.keys())
            if retiring:
                raise FailedPreconditionError(
                    f"the record of key {key_id} is sealed under domain key generation "
                    f"{retiring[0]}, which is being retired "
                    f"({fences.generations[retiring[0]]}): the writing HSA is behind; it "
                    "catches up, retry"
                )
            expected = request.expected_revision
            if expected:
                self._check_replacement(key_id, expected, metadata, record.metadata)
            revision = self._store.put_key(
                key_id,
                raw,
                expected,
                creator=metadata.creator if expected == 0 else "",
                creator_limit=self._limits.max_keys_per_principal,
            )
        log.info(
            "key %s stored at revision %d (metadata version %d) by %s",
            key_id,
            revision,
            metadata.metadata_version,
            caller,
        )
        return services_pb2.PutKeyResponse(revision=revision)

    def _check_record_signature(
        self, record: keys_pb2.KeyRecord, key_id: str, head: SealedState, *, writer: str = ""
    ) -> None:
        """The record is signed by a host of the head (by `writer`, if given), and the
        signature verifies under that host's key from the head."""
        signer = record.signer_host_id
        if writer and signer != writer:
            raise PermissionDeniedError(
                f"the record of key {key_id} is signed by {signer[:64]!r}, not by {writer}, "
                "which puts it: an HSA writes only records it signed itself"
            )
        try:
            keytokens.verify_key_record_signature(
                record, self.domain_id, head.manifest.host_signing_keys
            )
        except UnknownSignerError:
            raise UnknownSignerError(
                f"the record of key {key_id} is signed by {signer[:64]!r}, which is not a host "
                f"of the domain at version {head.version}"
            ) from None
        except BadSignatureError:
            raise BadSignatureError(
                f"the signature of {signer} over the record of key {key_id} does not verify"
            ) from None

    def _check_replacement(
        self, key_id: str, expected: int, metadata: keys_pb2.KeyMetadata, metadata_bytes: bytes
    ) -> None:
        """Refuse to replace the stored record (at revision `expected`) with an older
        metadata version, or with other metadata bytes at the same version."""
        entry = self._store.get_key(key_id)
        if entry is None or entry.revision != expected:
            return  # the store's compare-and-swap answers
        try:
            stored_bytes = keys_pb2.KeyRecord.FromString(entry.record).metadata
            stored = keys_pb2.KeyMetadata.FromString(stored_bytes)
        except DecodeError:
            return  # a damaged record may be replaced by one that verifies
        new, old = metadata.metadata_version, stored.metadata_version
        if new < old:
            raise FailedPreconditionError(
                f"key {key_id} is at metadata version {old} here; a record with version {new} "
                "would roll it back: read the key again"
            )
        if new == old and metadata_bytes != stored_bytes:
            raise FailedPreconditionError(
                f"key {key_id} has other metadata at version {new} here; a change must raise "
                "the metadata version: read the key again"
            )

    def ListKeyRecords(
        self, request: services_pb2.ListKeyRecordsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeyRecordsResponse:
        self._require_host(context, HostAccess.MEMBER)
        limit = check.page_size(request.limit, check.DEFAULT_KEY_PAGE, MAX_KEY_PAGE)
        after = check.key_id(request.page_token, "page_token") if request.page_token else ""
        entries = self._store.list_keys(limit + 1, after)
        response = services_pb2.ListKeyRecordsResponse()
        budget = self._limits.max_message_bytes - 1024
        last_key = ""
        for entry in entries[:limit]:
            if len(entry.record) + 32 > budget and response.records:
                response.next_page_token = last_key  # the rest does not fit in one answer
                return response
            budget -= len(entry.record) + 32
            record = keys_pb2.KeyRecord.FromString(entry.record)
            record.revision = entry.revision
            response.records.append(record)
            last_key = entry.key_id
        if len(entries) > limit:
            response.next_page_token = last_key
        return response

    def DeleteKeyRecord(
        self, request: services_pb2.DeleteKeyRecordRequest, context: grpc.ServicerContext
    ) -> services_pb2.DeleteKeyRecordResponse:
        """Delete a key whose scheduled deletion date has passed (compare-and-swap).

        The stored record must be signed by a host of the head (its signature verifying under
        that host's key) and its signed metadata must say PENDING_DELETION with a deletion
        date that has passed by this coordinator's clock. The record is kept as a tombstone
        for the waiting period (`tombstone_seconds`), then purged.
        """
        identity = self._require_host(context, HostAccess.MEMBER)
        key_id = check.key_id(request.key_id)
        if request.expected_revision == 0:
            raise InvalidInputError(
                "expected_revision is missing: give the revision of the record you read"
            )
        entry = self._store.get_key(key_id)
        if entry is None:
            raise NotFoundError(f"key {key_id} does not exist")
        if entry.revision != request.expected_revision:
            raise ConflictError(
                f"key {key_id} is at revision {entry.revision}, not "
                f"{request.expected_revision}: it changed meanwhile; read it again and retry"
            )
        metadata = keys_pb2.KeyMetadata()
        try:
            record = keys_pb2.KeyRecord.FromString(entry.record)
            metadata.ParseFromString(record.metadata)
        except DecodeError:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} does not parse; not deleting it"
            ) from None
        try:
            self._check_record_signature(record, key_id, self.head)
        except VerificationError as error:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} is not signed by a host of the domain "
                f"({error.message}); not deleting it"
            ) from None
        now = self._now()
        if metadata.key_id != key_id or metadata.domain_id != self.domain_id:
            raise FailedPreconditionError(
                f"the stored record of key {key_id} names another key or domain; not deleting it"
            )
        if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
            raise FailedPreconditionError(f"key {key_id} is not pending deletion")
        if metadata.deletion_at > now:
            raise FailedPreconditionError(
                f"key {key_id} is scheduled for deletion at {_iso(metadata.deletion_at)}, "
                "which has not passed yet"
            )
        self._store.delete_key(key_id, request.expected_revision, now)
        log.info(
            "key %s deleted at revision %d by %s (scheduled for %s); kept as a tombstone for "
            "%d days",
            key_id,
            request.expected_revision,
            identity.spiffe.name,
            _iso(metadata.deletion_at),
            self._tombstone_seconds // 86_400,
        )
        return services_pb2.DeleteKeyRecordResponse()
