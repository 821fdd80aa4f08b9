"""The genesis ceremony as functions.

The genesis proposal builds the domain from nothing (base version 0, zero base hash): it adds
every host (each by its enrollment, verified like any later add-host), every operator, sets
the quorum, and pins the domain CA certificate in the settings. Every genesis operator signs
it; one genesis host seals the first state, generating domain key generation 1. The hash of
that state is the trust anchor every HSA pins, so the CA that later enrollments must chain to
is pinned with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from domain_core import canonical, crypto
from domain_core.model import NONCE_BYTES, Proposal, SealedState, default_settings
from domain_core.sealing import next_domain_keys, seal_state
from domain_core.signers import Signer
from domain_core.transition import genesis_manifest
from domain_proto import domain_pb2

GENESIS_LIFETIME_SECONDS = 24 * 3600


def genesis_proposal(
    domain_id: str,
    enrollments: Sequence[bytes],
    operators: Sequence[domain_pb2.Operator],
    threshold: int,
    *,
    ca_certificate: bytes,
    proposer_id: str,
    now: int,
    settings: domain_pb2.DomainSettings | None = None,
    change_thresholds: Sequence[domain_pb2.ChangeThreshold] = (),
    reason: str = "genesis",
) -> Proposal:
    """The proposal that creates a domain with these hosts (their enrollments), operators,
    quorum and settings, pinning `ca_certificate` (DER) as the domain CA."""
    pinned = domain_pb2.DomainSettings()
    pinned.CopyFrom(settings or default_settings())
    pinned.domain_ca_certificate = ca_certificate
    changes = [domain_pb2.Change(add_host=domain_pb2.AddHost(enrollment=e)) for e in enrollments]
    changes += [
        domain_pb2.Change(add_operator=domain_pb2.AddOperator(operator=o)) for o in operators
    ]
    changes.append(domain_pb2.Change(set_quorum=domain_pb2.SetQuorum(threshold=threshold)))
    changes += [
        domain_pb2.Change(
            set_quorum=domain_pb2.SetQuorum(threshold=t.threshold, change_type=t.change_type)
        )
        for t in change_thresholds
    ]
    changes.append(domain_pb2.Change(set_settings=domain_pb2.SetSettings(settings=pinned)))
    return Proposal.create(
        domain_id=domain_id,
        base_version=0,
        base_state_hash=canonical.ZERO_HASH,
        changes=changes,
        proposer_id=proposer_id,
        created_at=now,
        expires_at=now + GENESIS_LIFETIME_SECONDS,
        reason=reason,
        nonce=crypto.random_bytes(NONCE_BYTES),
    )


def seal_genesis(
    proposal: Proposal,
    approvals: Sequence[domain_pb2.Approval],
    *,
    producer_host_id: str,
    producer: Signer,
    now: int,
) -> SealedState:
    """Verify the ceremony's approvals (all operators) and seal the first state.

    This generates domain key generation 1, so it belongs on an HSA (or in the process that
    holds the genesis hosts' keys during a local `hsm-domain init`).
    """
    manifest, _ = genesis_manifest(proposal, approvals, now=now)
    keys = next_domain_keys({}, manifest)
    return seal_state(
        manifest,
        keys,
        producer_host_id=producer_host_id,
        producer=producer,
        proposal=proposal,
        approvals=approvals,
    )
