"""The quorum-flow client of the coordinator: propose, review, approve, cancel, read the chain.

Used by the operator CLI and by tests. Invariants:
- one channel per client, reused; every call carries a deadline;
- only idempotent calls are retried (tenacity, a few attempts with short backoff) and only on
  UNAVAILABLE, or also on DEADLINE_EXCEEDED when `address` names several replicas (a hung
  replica answers nothing; the next attempt goes to another one): reads, and submissions and
  approvals, whose idempotency key is what they carry (the proposal id and the signed
  approval: a replica that has them stored answers with the proposal as it stands, never
  storing them twice). A vote to cancel is not retried;
- `address` may name several replicas (host:port,host:port): one channel over all of them
  (`transport.channel_target`) fails over to a replica that is up;
- `approve` signs only a proposal whose bytes it checked against the id it was asked to
  approve (SHA-256), so a coordinator cannot swap what an operator signs;
- the coordinator is untrusted: states it returns are parsed and structurally validated here
  (`SealedState`), and HSAs verify the chain; nothing here trusts a state for its content;
- every gRPC failure comes back as the matching `domain_core.errors` class with the server's
  message, so a CLI prints one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import grpc
import tenacity

from domain_core import canonical, crypto, quorum
from domain_core.changes import (
    add_host,
    add_operator,
    remove_host,
    remove_operator,
    rotate_domain_key,
    set_quorum,
    set_settings,
)
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    FailedPreconditionError,
    HsmDomainError,
    InvalidCiphertextError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    StaleProposalError,
    UnauthenticatedError,
    UnavailableError,
)
from domain_core.limits import DEFAULT_LIMITS, MAX_LISTED_PROPOSALS, Limits
from domain_core.model import NONCE_BYTES, Proposal, SealedState
from domain_core.signers import Signer
from domain_edge.transport import (
    COORDINATOR,
    error_kind,
    secure_channel,
    split_addresses,
    wrong_server,
)
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "CoordinatorClient",
    "ProposalView",
    "add_host",
    "add_operator",
    "error_from_rpc",
    "remove_host",
    "remove_operator",
    "rotate_domain_key",
    "set_quorum",
    "set_settings",
]

DEFAULT_PROPOSAL_LIFETIME_SECONDS = 3600
READ_ATTEMPTS = 3
PROPOSAL_PAGE = 200  # proposals asked for per ListProposals call (the coordinator's maximum)

_ERRORS_BY_CODE: dict[grpc.StatusCode, type[HsmDomainError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: StaleProposalError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UnavailableError,
}

_STATE_NAMES: dict[int, str] = {
    services_pb2.PROPOSAL_STATE_PENDING: "pending",
    services_pb2.PROPOSAL_STATE_APPLIED: "applied",
    services_pb2.PROPOSAL_STATE_EXPIRED: "expired",
    services_pb2.PROPOSAL_STATE_CANCELLED: "cancelled",
    services_pb2.PROPOSAL_STATE_STALE: "stale",
    services_pb2.PROPOSAL_STATE_REJECTED: "rejected",
}


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    call = cast(Any, error)
    code = call.code() if hasattr(call, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


def error_from_rpc(
    error: grpc.RpcError,
    address: str,
    *,
    peer: str = "the coordinator",
    overrides: Mapping[grpc.StatusCode, type[HsmDomainError]] | None = None,
    expected: str | None = None,
) -> HsmDomainError:
    """The `domain_core.errors` exception a failed call stands for, with the server's message.

    A server whose certificate the channel refused (`transport.wrong_server`: not the expected
    kind or host) is UnauthenticatedError, saying it is not `expected` (default: `peer`).
    `peer` names the server in messages ("the coordinator", "the HSA"); `overrides` replaces
    the class of some codes for a service whose codes mean something else (ABORTED is a stale
    proposal at the coordinator, a lost compare-and-swap at the key service). The fixed
    "invalid ciphertext" message comes back as `InvalidCiphertextError`, with no more detail;
    an error kind the server named (`transport.error_kind`) as its class, if the status fits.
    """
    code = _code(error)
    call = cast(Any, error)
    details = str(call.details() if hasattr(call, "details") else "") or ""
    if wrong_server(code, details):
        return UnauthenticatedError(
            f"the server at {address} is not {expected or peer}: the TLS handshake refused its "
            "certificate (it is another identity's, or a certificate issued without the server "
            "names: reissue it); nothing was sent to it"
        )
    codes = {**_ERRORS_BY_CODE, **overrides} if overrides else _ERRORS_BY_CODE
    cls = codes.get(code, HsmDomainError) if code is not None else HsmDomainError
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        what = "is unreachable" if code is grpc.StatusCode.UNAVAILABLE else "did not answer in time"
        return cls(f"{peer} at {address} {what} ({details[:200]}); check that it runs")
    if cls is HsmDomainError:
        name = code.name if code is not None else "UNKNOWN"
        return HsmDomainError(f"{peer} at {address} failed: {name}: {details[:300]}")
    if issubclass(InvalidCiphertextError, cls) and details == InvalidCiphertextError().message:
        return InvalidCiphertextError()
    kind = error_kind(error)
    if kind is not None and issubclass(kind, cls):
        cls = kind
    return cls(details or f"{peer} refused the call ({code.name if code else '?'})")


_RETRIED_ALONE: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
_RETRIED_REPLICATED: frozenset[grpc.StatusCode] = _RETRIED_ALONE | {
    grpc.StatusCode.DEADLINE_EXCEEDED
}


def _retried(codes: frozenset[grpc.StatusCode]) -> Callable[[BaseException], bool]:
    """Whether an idempotent call that failed with `error` is worth another attempt."""

    def check(error: BaseException) -> bool:
        return isinstance(error, grpc.RpcError) and _code(error) in codes

    return check


@dataclass(frozen=True)
class ProposalView:
    """A proposal as the coordinator reports it, with its bytes checked against its id."""

    proposal_id: bytes
    proposal: Proposal
    state: str  # pending, applied, expired, cancelled, stale, rejected
    approvals: tuple[domain_pb2.Approval, ...]
    threshold: int
    applied_version: int
    detail: str
    cancel_votes: tuple[domain_pb2.CancelVote, ...] = ()

    @classmethod
    def from_status(
        cls, status: services_pb2.ProposalStatus, limits: Limits = DEFAULT_LIMITS
    ) -> ProposalView:
        """Parse a ProposalStatus; BadSignatureError if its bytes do not hash to its id."""
        if canonical.proposal_id(status.proposal) != status.proposal_id:
            raise BadSignatureError(
                "the coordinator returned proposal bytes that do not match the proposal id"
            )
        return cls(
            proposal_id=status.proposal_id,
            proposal=Proposal.from_bytes(status.proposal, limits),
            state=_STATE_NAMES.get(status.state, "unknown"),
            approvals=tuple(status.approvals),
            threshold=status.threshold,
            applied_version=status.applied_version,
            detail=status.detail,
            cancel_votes=tuple(status.cancel_votes),
        )

    @property
    def approved_by(self) -> tuple[str, ...]:
        """Operator ids of the approvals the coordinator holds (each verified on arrival)."""
        return tuple(a.operator_id for a in self.approvals)

    @property
    def applied(self) -> bool:
        """True once the proposal produced a stored state."""
        return self.state == "applied"


class CoordinatorClient:
    """A client of one coordinator (use as a context manager, or call `close`)."""

    def __init__(
        self,
        address: str,
        ca_pem: bytes,
        *,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        timeout: float = 5.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if (cert_pem is None) != (key_pem is None):
            raise ValueError("give both cert_pem and key_pem, or neither")
        self.address = address
        self._timeout = timeout
        replicated = len(split_addresses(address)) > 1
        self._retry_on = _retried(_RETRIED_REPLICATED if replicated else _RETRIED_ALONE)
        self._limits = limits
        self._channel = secure_channel(
            address, ca_pem, COORDINATOR, cert_pem=cert_pem, key_pem=key_pem, limits=limits
        )
        self._stub: Any = services_pb2_grpc.CoordinatorStub(  # type: ignore[no-untyped-call]
            self._channel
        )

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    # --- calls ---------------------------------------------------------------------------

    def _call(self, method: str, request: Any) -> Any:
        """One call with the deadline; failures become domain errors."""
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    def _read(self, method: str, request: Any) -> Any:
        """An idempotent call (a read, or a submission or approval: the coordinator answers a
        replayed one as it stands, `QuorumFlow._replayed`), retried a few times on UNAVAILABLE
        (and, with several replicas, DEADLINE_EXCEEDED); with several replicas the channel
        sends each attempt to the next one that is up."""
        call: Callable[[Any], Any] = getattr(self._stub, method)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self._retry_on),
            stop=tenacity.stop_after_attempt(READ_ATTEMPTS),
            wait=tenacity.wait_exponential(multiplier=0.1, max=1.0),
            reraise=True,
        )
        try:
            return retrying(call, request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.address) from None

    # --- the chain -----------------------------------------------------------------------

    def latest_state(self) -> SealedState:
        """The coordinator's newest state (structurally valid; verify it before trusting it)."""
        message = self._read("GetLatestState", services_pb2.LatestStateRequest())
        return SealedState.from_message(message, self._limits)

    def states_after(self, version: int, limit: int = 0) -> list[SealedState]:
        """States after `version`, oldest first (one page; ask again after the last one)."""
        response = self._read(
            "GetStatesAfter", services_pb2.StatesAfterRequest(after_version=version, limit=limit)
        )
        return [SealedState.from_message(s, self._limits) for s in response.states]

    def domain_status(self) -> services_pb2.DomainStatusResponse:
        """Domain id, head version and hash, registered HSAs, number of pending proposals."""
        status: services_pb2.DomainStatusResponse = self._read(
            "GetDomainStatus", services_pb2.DomainStatusRequest()
        )
        return status

    def list_hsas(self) -> list[services_pb2.HsaEndpoint]:
        """The HSAs registered with the coordinator."""
        response = self._read("ListHsas", services_pb2.ListHsasRequest())
        return list(response.hsas)

    # --- the quorum flow -----------------------------------------------------------------

    def propose(
        self,
        changes: Iterable[domain_pb2.Change],
        signer: Signer,
        *,
        reason: str = "",
        expires_in: int = DEFAULT_PROPOSAL_LIFETIME_SECONDS,
        now: int | None = None,
    ) -> ProposalView:
        """Build a proposal against the latest state, sign it as its proposer, and submit it."""
        head = self.latest_state()
        created_at = int(time.time()) if now is None else now
        proposal = Proposal.create(
            domain_id=head.manifest.domain_id,
            base_version=head.version,
            base_state_hash=head.hash,
            changes=list(changes),
            proposer_id=signer.public_key.key_id,
            created_at=created_at,
            expires_at=created_at + expires_in,
            reason=reason,
            nonce=crypto.random_bytes(NONCE_BYTES),
        )
        return self.submit_proposal(proposal, quorum.approve(proposal, signer))

    def submit_proposal(self, proposal: Proposal, approval: domain_pb2.Approval) -> ProposalView:
        """Submit a signed proposal with its proposer's approval (e.g. signed offline)."""
        status = self._read(
            "SubmitProposal",
            services_pb2.SubmitProposalRequest(proposal=proposal.raw, proposer_approval=approval),
        )
        return self._view(status, proposal.id)

    def get_proposal(self, proposal_id: bytes) -> ProposalView:
        """A proposal by id, its bytes checked against the id."""
        status = self._read("GetProposal", services_pb2.ProposalIdRequest(proposal_id=proposal_id))
        return self._view(status, proposal_id)

    def list_proposals(
        self, include_closed: bool = False, *, limit: int = MAX_LISTED_PROPOSALS
    ) -> list[ProposalView]:
        """The newest `limit` pending proposals (and closed ones when asked), listed oldest
        first: the coordinator's pages, fetched until there are no more or `limit` is reached."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        views: list[ProposalView] = []
        token = ""
        while len(views) < limit:
            page, token = self.proposals_page(
                include_closed, limit=min(limit - len(views), PROPOSAL_PAGE), page_token=token
            )
            views.extend(page)
            # A page that lists nothing ends the listing: an honest coordinator never sends an
            # empty page with a token, and a dishonest one cannot keep this loop going.
            if not token or not page:
                break
        views.reverse()
        return views[-limit:]

    def proposals_page(
        self, include_closed: bool = False, *, limit: int = 0, page_token: str = ""
    ) -> tuple[list[ProposalView], str]:
        """One page of proposals, newest first, and the token for the next (older) page ("":
        none). `limit` 0 asks for the coordinator's default page size."""
        response = self._read(
            "ListProposals",
            services_pb2.ListProposalsRequest(
                include_closed=include_closed, limit=limit, page_token=page_token
            ),
        )
        views = [ProposalView.from_status(s, self._limits) for s in response.proposals]
        return views, str(response.next_page_token)

    def approve(self, proposal_id: bytes, signer: Signer) -> ProposalView:
        """Fetch a proposal, check its bytes hash to `proposal_id`, sign and submit."""
        view = self.get_proposal(proposal_id)
        if view.proposal.id != proposal_id:
            raise BadSignatureError("the coordinator returned another proposal than asked for")
        return self.submit_approval(quorum.approve(view.proposal, signer))

    def submit_approval(self, approval: domain_pb2.Approval) -> ProposalView:
        """Submit an approval (e.g. signed offline with `quorum.approve`)."""
        status = self._read("SubmitApproval", services_pb2.SubmitApprovalRequest(approval=approval))
        return self._view(status, approval.proposal_id)

    def cancel(self, proposal_id: bytes, signer: Signer) -> ProposalView:
        """Cancel a pending proposal: the proposer's signature cancels it at once, any other
        current operator's is a vote, which cancels once the votes reach its threshold."""
        vote = quorum.cancel(proposal_id, signer)
        status = self._call(
            "CancelProposal",
            services_pb2.CancelProposalRequest(
                proposal_id=vote.proposal_id,
                operator_id=vote.operator_id,
                signature=vote.signature,
            ),
        )
        return self._view(status, proposal_id)

    def _view(self, status: services_pb2.ProposalStatus, proposal_id: bytes) -> ProposalView:
        view = ProposalView.from_status(status, self._limits)
        if view.proposal_id != proposal_id:
            raise BadSignatureError("the coordinator answered about another proposal")
        return view
