"""The control workload of a chaos run: quorum-approved domain changes, one at a time.

`ControlClient` makes a change every `control_interval` seconds through the coordinator's
operator port (on a domain with replicas: every replica's address, one channel that fails
over, as `hsm-operator` uses it) with the demo operator tokens: rotate-domain-key,
add-operator (a fresh file token made in the run directory) and remove-operator of an
operator it added. The first operator proposes, the others approve until the coordinator
reports the proposal APPLIED. `nudge` starts the next change at once: the experiment calls it
when the leader replica is killed, so that a change is submitted while the leader is down.

A step whose answer was lost is followed with GetProposal until `resolve_timeout`. With
`WorkloadConfig.replicated` (a domain with replicas) a step is also sent again, with the same
signed bytes: the proposal and its proposer's approval when the coordinator does not know the
proposal, an approval it made before when the coordinator lacks it. These are the calls'
idempotency keys (docs/protocol.md, "Retries and idempotency"), so a resend is applied once.
And a proposal refused as stale (nothing applied: its base moved on, as when a replica that
lags answered the head) is proposed again on a newer head within the same operation
(`reproposed`; its result names the proposal that was applied).

Invariants: every change is one operation in the history (invoke, then exactly one of ok /
fail / unknown, `workload.classify`), carrying its proposal id, how many times a step was
sent again (`resent`), and, once APPLIED, its version and the state hash there; an approval is
signed once per operator and proposal and the same bytes are sent on every retry; every choice
is drawn from a seeded `random.Random`; a throwaway operator's passphrase is never kept.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from deploy._files import make_private_dir
from deploy.chaos.history import History
from deploy.chaos.workload import WorkloadConfig, classify
from deploy.localdomain import FAST_SCRYPT_N
from domain_core import crypto, quorum
from domain_core.changes import add_operator, remove_operator, rotate_domain_key
from domain_core.errors import (
    AlreadyExistsError,
    HsmDomainError,
    NotFoundError,
    UnavailableError,
)
from domain_core.model import NONCE_BYTES, Proposal, SealedState, make_operator
from domain_core.signers import SignatureAlgorithm, Signer
from domain_edge.client import CoordinatorClient, ProposalView
from domain_edge.file_tokens import create_file_token
from domain_proto import domain_pb2

__all__ = ["CHAOS_OPERATOR_PREFIX", "ControlClient"]

log = logging.getLogger(__name__)

CHAOS_OPERATOR_PREFIX: Final = "chaos-"
_RESOLVE_POLL: Final = 0.5
_HEAD_ATTEMPTS: Final = 6  # reads of the head before a change is given up (replicated)
_NUDGE_POLL: Final = 0.1
# A proposal refused as stale (its base moved on) is proposed again on the new head, this
# many times at most (a domain with replicas: a replica that lags may have given the head).
_REPROPOSALS: Final = 3
_STALE: Final = frozenset({"StaleProposalError", "stale"})


class _Settled(Exception):
    """A change reached its outcome (internal to `_Change`)."""

    def __init__(self, phase: str, result: dict[str, Any]) -> None:
        super().__init__(phase)
        self.phase = phase
        self.result = result


@dataclass
class _Change:
    """One proposal followed from its submission to its outcome."""

    client: CoordinatorClient
    proposal: Proposal
    signers: Sequence[tuple[str, Signer]]
    deadline: float
    resend: bool
    approvals: dict[str, domain_pb2.Approval] = field(default_factory=dict)
    resent: int = 0
    uncertain: str = ""

    def approval(self, signer: Signer) -> domain_pb2.Approval:
        """The operator's approval of the proposal, signed once and sent as is every time."""
        key_id = signer.public_key.key_id
        if key_id not in self.approvals:
            self.approvals[key_id] = quorum.approve(self.proposal, signer)
        return self.approvals[key_id]

    def _send(
        self, call: Callable[[], ProposalView], *, already_is_uncertain: bool = False
    ) -> ProposalView | None:
        """One call; None when its outcome is uncertain (then the proposal is read again)."""
        try:
            return call()
        except UnavailableError as error:
            self.uncertain = error.message
        except AlreadyExistsError as error:
            if not already_is_uncertain:
                raise _Settled(*classify(error)) from None
            self.uncertain = error.message
        except HsmDomainError as error:
            raise _Settled(*classify(error)) from None
        return None

    def submit(self) -> ProposalView | None:
        """Send the proposal with its proposer's approval (the same bytes every time)."""
        proposer = self.signers[0][1]
        approval = self.approval(proposer)
        return self._send(lambda: self.client.submit_proposal(self.proposal, approval))

    def read(self) -> ProposalView | None:
        """The proposal as the coordinator has it; sent again if it never arrived (resend)."""
        try:
            return self.client.get_proposal(self.proposal.id)
        except NotFoundError:
            if not self.resend:
                never = {"error": "NotFoundError", "detail": "never stored"}
                raise _Settled("fail", never) from None
            self.resent += 1
            view = self.submit()
            if view is None:
                time.sleep(_RESOLVE_POLL)  # not a busy loop on a coordinator that is down
            return view
        except UnavailableError as error:
            self.uncertain = error.message
            time.sleep(_RESOLVE_POLL)
            return None
        except HsmDomainError as error:
            raise _Settled(*classify(error)) from None

    def step(self, view: ProposalView) -> ProposalView | None:
        """From `view`: the outcome (raised), or the next approval sent, or None to read again."""
        if view.applied:
            raise _Settled(
                "ok", {"version": view.applied_version, "proposal_id": self.proposal.id.hex()}
            )
        if view.state != "pending":
            raise _Settled("fail", {"error": view.state, "detail": view.detail[:300]})
        if time.monotonic() > self.deadline:
            raise _Settled("unknown", {"error": "pending", "detail": view.detail[:300]})
        approver = next(
            (s for _, s in self.signers if s.public_key.key_id not in view.approved_by), None
        )
        if approver is None or len(view.approved_by) >= view.threshold:
            # Quorum is there; the coordinator retries the apply: follow it.
            time.sleep(_RESOLVE_POLL)
            return None
        if approver.public_key.key_id in self.approvals:
            self.resent += 1  # sent before, and its answer was lost
        approval = self.approval(approver)
        return self._send(lambda: self.client.submit_approval(approval), already_is_uncertain=True)

    def run(self) -> tuple[str, dict[str, Any]]:
        """Submit, approve until applied, and follow every uncertain step until settled."""
        try:
            view = self.submit()
            while True:
                if view is not None:
                    view = self.step(view)
                elif time.monotonic() > self.deadline:
                    detail = self.uncertain[:300]
                    return "unknown", {
                        "error": "UnavailableError",
                        "detail": detail,
                        "resent": self.resent,
                    }
                else:
                    view = self.read()
        except _Settled as settled:
            return settled.phase, {**settled.result, "resent": self.resent}


class ControlClient(threading.Thread):
    """Quorum-approved domain changes, one at a time, every `control_interval` seconds (or at
    once after a `nudge`)."""

    def __init__(
        self,
        operator_address: str,
        ca_pem: bytes,
        signers: Sequence[tuple[str, Signer]],
        token_dir: Path,
        history: History,
        config: WorkloadConfig,
        seed: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="chaos-control", daemon=True)
        if len(signers) < 1:
            raise ValueError("the control workload needs at least one operator token")
        self.process = "control"
        self._address = operator_address
        self._ca_pem = ca_pem
        self._signers = list(signers)
        self._token_dir = token_dir
        self._history = history
        self._config = config
        self._rng = random.Random(f"{seed}/control")  # noqa: S311 - a test schedule
        self._halt = stop
        self._wake = threading.Event()
        self._added = 0
        self.crashed: BaseException | None = None

    def nudge(self) -> None:
        """Start the next change now instead of at the end of the interval (if none is under
        way; otherwise right after it)."""
        self._wake.set()

    def _wait(self) -> bool:
        """Wait for the next change (the interval, or a nudge); False once stopped."""
        deadline = time.monotonic() + self._config.control_interval
        while not self._halt.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._wake.wait(min(left, _NUDGE_POLL)):
                self._wake.clear()
                return not self._halt.is_set()
        return False

    def run(self) -> None:
        try:
            with CoordinatorClient(
                self._address, self._ca_pem, timeout=self._config.operator_timeout
            ) as client:
                while self._wait():
                    self._one_change(client)
        except BaseException as error:
            self.crashed = error
            log.exception("the control workload crashed")

    def _head(self, client: CoordinatorClient) -> SealedState | None:
        """The coordinator's head (None if it cannot be read: then nothing is proposed); with
        `replicated`, read again a few times, as a replica takes over."""
        attempts = _HEAD_ATTEMPTS if self._config.replicated else 1
        for attempt in range(attempts):
            try:
                return client.latest_state()
            except HsmDomainError:
                if attempt + 1 < attempts and not self._halt.is_set():
                    time.sleep(_RESOLVE_POLL)
        return None

    def _one_change(self, client: CoordinatorClient) -> None:
        head = self._head(client)
        if head is None:
            return  # nothing was proposed: no operation to record
        chaos_operators = [
            o for o in head.manifest.message.operators if o.name.startswith(CHAOS_OPERATOR_PREFIX)
        ]
        if self._rng.random() < 0.5:
            self._change(client, head, "rotate-domain-key", [rotate_domain_key()], {})
        elif chaos_operators:
            target = chaos_operators[0]
            self._change(
                client,
                head,
                "remove-operator",
                [remove_operator(target.operator_id)],
                {"operator": target.name, "operator_id": target.operator_id},
            )
        else:
            self._added += 1
            name = f"{CHAOS_OPERATOR_PREFIX}{self._rng.getrandbits(32):08x}-{self._added}"
            path = self._token_dir / f"{name}.token"
            make_private_dir(path.parent)
            # A throwaway operator: its passphrase lives only here and is dropped at once.
            public_key = create_file_token(
                path,
                SignatureAlgorithm.ED25519,
                secrets.token_urlsafe(24).encode("ascii"),
                name=name,
                scrypt_n=FAST_SCRYPT_N,
            )
            operator = make_operator(name, public_key)
            self._change(
                client,
                head,
                "add-operator",
                [add_operator(operator)],
                {"operator": name, "operator_id": operator.operator_id},
            )

    def _proposal(self, head: SealedState, kind: str, changes: list[domain_pb2.Change]) -> Proposal:
        """A new proposal of `changes` on `head`, by the first operator."""
        proposer = self._signers[0][1]
        now = int(time.time())
        return Proposal.create(
            domain_id=head.manifest.domain_id,
            base_version=head.version,
            base_state_hash=head.hash,
            changes=changes,
            proposer_id=proposer.public_key.key_id,
            created_at=now,
            expires_at=now + 600,
            reason=f"chaos run: {kind}",
            nonce=crypto.random_bytes(NONCE_BYTES),
        )

    def _newer_head(self, client: CoordinatorClient, version: int) -> SealedState | None:
        """A head past `version` (a replica that lags may answer an older one: ask again)."""
        for _ in range(_HEAD_ATTEMPTS):
            head = self._head(client)
            if head is not None and head.version > version:
                return head
            time.sleep(_RESOLVE_POLL)
        return None

    def _change(
        self,
        client: CoordinatorClient,
        head: SealedState,
        kind: str,
        changes: list[domain_pb2.Change],
        details: dict[str, str],
    ) -> None:
        proposal = self._proposal(head, kind, changes)
        op_id = self._history.invoke(
            self.process,
            kind,
            proposal_id=proposal.id.hex(),
            base_version=head.version,
            proposer=self._signers[0][0],
            **details,
        )
        deadline = time.monotonic() + self._config.resolve_timeout
        reproposed = 0
        while True:
            change = _Change(client, proposal, self._signers, deadline, self._config.replicated)
            phase, result = change.run()
            stale = phase == "fail" and result.get("error") in _STALE
            if not (stale and self._config.replicated) or reproposed >= _REPROPOSALS:
                break
            # Nothing was applied: the base moved on (a lagging replica gave the head).
            fresh = self._newer_head(client, proposal.base_version)
            if fresh is None:
                break
            reproposed += 1
            proposal = self._proposal(fresh, kind, changes)
        if self._config.replicated:
            result["reproposed"] = reproposed
        if phase == "ok":
            result["state_hash"] = self._state_hash(client, int(result["version"]), proposal)
        self._history.complete(op_id, phase, **result)

    def _state_hash(self, client: CoordinatorClient, version: int, proposal: Proposal) -> str:
        """The hash of the acknowledged state (empty if it cannot be read now)."""
        try:
            states = client.states_after(version - 1, limit=1)
        except HsmDomainError:
            return ""
        if not states or states[0].version != version:
            return ""
        state = states[0]
        if state.proposal is None or state.proposal.id != proposal.id:
            return ""
        return state.hash.hex()
