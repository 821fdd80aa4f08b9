"""The HSAs' audit heads (signed checkpoints of their logs) kept at the coordinator.

Invariants: a head reported with `RegisterHsa` is kept per host and log only after it
verified under that host's key in the verified head; a kept head is only ever raised (with a
compare-and-swap on the stored checkpoint): a lower one (a possible cut), one of another
chain, one of another host or a non-member, or one with a bad signature is refused, logged at
WARNING (throttled) and named in the answer. A stored head that no longer verifies under the
host's current key (it re-enrolled under the same id) binds nothing and is replaced. Anyone
may read the heads: every reader verifies each under the host's key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import AuditHeadRecord, CoordinatorStore
from domain_core.errors import BadSignatureError, MalformedMessageError
from domain_core.limits import Limits
from domain_core.signers import PublicKey
from domain_edge.audit import HSA_LOG_NAME, AuditHead, HeadOrder, compare_heads, describe_refusal
from domain_edge.throttled_log import ThrottledLog
from domain_proto import services_pb2

log = logging.getLogger(__name__)


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


@dataclass(eq=False, repr=False)
class AuditHeadBook:
    """The highest verified audit head per host and log (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    limits: Limits
    now: Callable[[], int]
    _throttled: ThrottledLog = field(init=False, default_factory=lambda: ThrottledLog(log))

    def keep(self, host_id: str, heads: Sequence[bytes]) -> list[str]:
        """Keep each reported head that raises the stored one; why the others were refused
        (each refusal also logged, throttled)."""
        key = self.chain.head.manifest.host_signing_key(host_id)
        refused = []
        for raw in heads:
            reason = self._keep_one(host_id, raw, key)
            if reason:
                refused.append(reason)
                if key is not None:  # (a host being added reports again once a member)
                    where = " ".join(reason.split()[:2]).rstrip(":")  # "hsa-1 audit.log"
                    self._throttled.warning(reason, key=f"audit-head:{where}")
        return refused

    def _keep_one(self, host_id: str, raw: bytes, key: PublicKey | None) -> str:
        """Store one head if it verifies and is above the stored one; "" or why not."""
        try:
            head = AuditHead.parse(raw)
        except MalformedMessageError as error:
            return f"{host_id}: an audit head that is not a signed checkpoint ({error}): refused"
        if head.host != host_id or not HSA_LOG_NAME.fullmatch(head.log):
            return f"{host_id}: {head.describe()[:160]} is not a head of {host_id}'s logs: refused"
        if key is None:
            return (
                f"{head.describe()}: {host_id} is not a host of version "
                f"{self.chain.head.version}, so its head cannot be verified: refused "
                "(reported again once it is a member)"
            )
        try:
            head.verify(key)
        except BadSignatureError as error:
            return f"{error}: refused"
        for _ in range(3):  # compare-and-swap: a concurrent report may have raised it
            stored = self.store.get_audit_head(host_id, head.log)
            known = _believed_head(stored, key)
            order = compare_heads(known, head)
            if order is HeadOrder.SAME:
                return ""
            if order is not HeadOrder.NEWER and known is not None:
                return describe_refusal(known, head)
            record = AuditHeadRecord(host_id, head.log, head.seq, head.raw, self.now())
            if self.store.put_audit_head(record, stored.checkpoint if stored else None):
                if known is None and stored is not None:
                    log.info(
                        "%s: the stored head does not verify under the host's current key; "
                        "replaced by %s",
                        host_id,
                        head.describe(),
                    )
                return ""
        return f"{head.describe()}: the stored head kept changing meanwhile; report it again"

    def listing(self, host_id: str) -> services_pb2.AuditHeadsResponse:
        """The highest head stored per host and log (only `host_id`'s if given), within the
        message limit."""
        response = services_pb2.AuditHeadsResponse()
        budget = self.limits.max_message_bytes - 1024
        for record in self.store.list_audit_heads(host_id):
            budget -= len(record.checkpoint) + 16
            if budget < 0:
                break
            response.heads.append(services_pb2.AuditHead(checkpoint=record.checkpoint))
        return response
