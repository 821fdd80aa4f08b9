"""The registry of HSA addresses: who registered where, and what each last reported.

Invariants: a host id is registered only by its own certificate (the caller's SPIFFE name);
the version and state hash it reports with its registration are relayed, never believed
(`_reports`); its audit heads are kept only if they verify (`_audit_heads`); a channel to an
address no HSA uses any more is closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from domain_coordinator._audit_heads import AuditHeadBook
from domain_coordinator._hsa import HsaConnections
from domain_coordinator._reports import HsaReports
from domain_coordinator._verified_chain import VerifiedChain
from domain_coordinator.store import CoordinatorStore, HsaRecord
from domain_core.errors import PermissionDeniedError
from domain_core.pki import PeerIdentity
from domain_proto import services_pb2

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False, repr=False)
class HsaRegistry:
    """Registers HSAs and lists them (see the module invariants)."""

    chain: VerifiedChain
    store: CoordinatorStore
    hsas: HsaConnections
    reports: HsaReports
    audit_heads: AuditHeadBook
    now: Callable[[], int]

    @staticmethod
    def check_registrant(identity: PeerIdentity, host_id: str) -> None:
        """PERMISSION_DENIED unless the calling HSA registers its own host id."""
        if host_id != identity.spiffe.name:
            raise PermissionDeniedError(
                f"{identity.spiffe.uri} may not register as host {host_id}: the host id must "
                "match the certificate"
            )

    def register(
        self, host_id: str, address: str, reported: tuple[int, bytes], heads: Sequence[bytes]
    ) -> services_pb2.RegisterHsaResponse:
        """Record where an HSA (`check_registrant`) listens, with the state it reports and its
        audit heads; the head's version, and the heads refused."""
        version, state_hash = reported
        if version:
            self.reports.warn_if_fork(host_id, version, state_hash)
        previous = {h.host_id: h.address for h in self.store.list_hsas()}.get(host_id)
        self.store.register_hsa(host_id, address, self.now(), version, state_hash)
        refused = self.audit_heads.keep(host_id, heads)
        if previous != address:
            log.info("%s registered at %s", host_id, address)
            if previous is not None and previous not in {h.address for h in self.store.list_hsas()}:
                self.hsas.forget(previous)
        self.reports.note_report(host_id, version, "RegisterHsa")
        return services_pb2.RegisterHsaResponse(
            version=self.chain.head.version, refused_audit_heads=refused
        )

    def endpoints(self, hsas: Sequence[HsaRecord] | None = None) -> list[services_pb2.HsaEndpoint]:
        """Every registered HSA with the version it last reported (relayed, not verified)."""
        return [
            services_pb2.HsaEndpoint(
                host_id=h.host_id,
                address=h.address,
                version=h.version,
                state_hash=h.state_hash,
                reported_at=h.reported_at,
            )
            for h in (self.store.list_hsas() if hsas is None else hsas)
        ]
