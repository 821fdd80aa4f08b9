"""Host enrollments: an add-host counts only with proof of possession of every key it names.

The attacks are the ones of issue 21: a real host's TLS certificate (public: any TLS handshake
shows it) paired with the attacker's own signing and agreement keys; a host record with no
certificate at all; a certificate of another CA, of another host, of another kind. Each is
refused by `enrollment.verify_enrollment` and therefore by `transition.apply_changes`, which
every HSA runs (applying a proposal, and verifying a state through `chain.verify_successor`),
the coordinator runs on SubmitProposal and `hsm-operator` runs before it signs.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.simulator import SimHost, SimulatedDomain, flip_bit, forge_enrollment, new_ca

from domain_core import crypto, enrollment, genesis, model, pki, quorum, transition
from domain_core.errors import (
    EnrollmentError,
    HsmDomainError,
    InvalidSettingsError,
    MalformedMessageError,
    TokenError,
)
from domain_core.identity import HostIdentity
from domain_core.pki import DomainCA, SpiffeId
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.identity_files import AGREEMENT_KEY_FILE, load_host_identity, save_host_identity
from domain_proto import domain_pb2
from operator_tool._review import review, review_lines

pytestmark = pytest.mark.unit

DOMAIN = "local"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
T = int(NOW.timestamp())
CA = DomainCA.create(DOMAIN, now=NOW)


@dataclass
class Enrolled:
    """A new host made the way `hsm-domain add-node` makes one."""

    identity: HostIdentity
    certificate: bytes  # DER
    raw: bytes


def enroll(host_id: str = "hsa-4", ca: DomainCA = CA, spiffe: SpiffeId | None = None) -> Enrolled:
    identity = HostIdentity.generate(host_id)
    pem = ca.issue(spiffe or identity.spiffe_id(DOMAIN), identity.tls_public_key, now=NOW)
    certificate = pki.certificate_der(pem)
    return Enrolled(identity, certificate, enrollment.make_enrollment(identity, DOMAIN, pem))


def verify(
    raw: bytes, *, ca: DomainCA = CA, now: int | datetime = T
) -> enrollment.VerifiedEnrollment:
    return enrollment.verify_enrollment(
        raw, domain_id=DOMAIN, ca_certificate=ca.certificate_der, now=now
    )


def attacker_keys() -> tuple[InMemorySigner, bytes]:
    """An attacker's Ed25519 signing key and the X25519 key derived from it."""
    identity = HostIdentity.generate("attacker")
    return identity.signer, identity.agreement_public_key  # type: ignore[return-value]


def record(
    host_id: str,
    signing: InMemorySigner,
    agreement: bytes,
    fingerprint: bytes,
) -> domain_pb2.Host:
    return model.make_host(DOMAIN, host_id, signing.public_key, agreement, fingerprint)


# --- what an honest host makes verifies ---------------------------------------------------


def test_an_enrollment_made_by_add_node_verifies_and_names_its_keys() -> None:
    new = enroll()
    verified = verify(new.raw)
    assert verified.host_id == "hsa-4"
    assert verified.raw == new.raw
    assert verified.certificate == new.certificate
    assert verified.host.signing_public_key == new.identity.signing_public_key.spki_der
    assert verified.host.agreement_public_key == new.identity.agreement_public_key
    assert verified.host.tls_certificate_fingerprint == crypto.sha256(new.certificate)
    assert "hsa-4" in repr(verified)


def test_the_agreement_key_is_the_montgomery_form_of_the_signing_key() -> None:
    identity = HostIdentity.generate("hsa-1")
    raw = identity.signing_public_key.raw_ed25519()
    assert crypto.x25519_public_from_ed25519(raw) == identity.agreement_public_key
    # Whoever holds the signing key opens what is sealed to the agreement key.
    sealed = crypto.seal_to_host(identity.agreement_public_key, b"domain key")
    assert crypto.open_sealed_box(identity.agreement_private_key, sealed) == b"domain key"


def test_an_identity_whose_agreement_key_is_not_derived_is_refused(tmp_path: Path) -> None:
    identity = HostIdentity.generate("hsa-1")
    stray, _ = crypto.x25519_generate()
    with pytest.raises(ValueError, match="not the one derived from the signing key"):
        HostIdentity("hsa-1", identity.signer, stray, identity.tls_private_key)  # type: ignore[arg-type]
    save_host_identity(identity, tmp_path)
    (tmp_path / AGREEMENT_KEY_FILE).write_bytes(base64.b64encode(stray) + b"\n")
    with pytest.raises(TokenError, match="not the one derived"):
        load_host_identity(tmp_path)


# --- the attack of issue 21: a real certificate, the attacker's keys ----------------------


def test_a_real_hosts_certificate_with_the_attackers_keys_is_refused() -> None:
    """The certificate is public (a TLS handshake shows it); the key behind it is not."""
    real = enroll()
    signing, agreement = attacker_keys()
    forged_record = record("hsa-4", signing, agreement, crypto.sha256(real.certificate))
    own_tls = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256)
    for tls_signer in (None, own_tls, real.identity.signer):
        forged = forge_enrollment(
            forged_record,
            domain_id=DOMAIN,
            signer=signing,
            tls_signer=tls_signer,
            certificate=real.certificate,
        )
        with pytest.raises(EnrollmentError, match="not signed by the key of its TLS certificate"):
            verify(forged)


def test_the_attackers_own_agreement_key_is_refused_even_with_every_signature() -> None:
    """Issue 21 verbatim: the attacker's X25519 key (not derived), everything else genuine
    and signed by the real host's keys (as if the host were tricked into signing)."""
    real = enroll()
    _, stray = crypto.x25519_generate()
    host = record(
        "hsa-4",
        real.identity.signer,  # type: ignore[arg-type]
        stray,
        crypto.sha256(real.certificate),
    )
    forged = forge_enrollment(
        host,
        domain_id=DOMAIN,
        signer=real.identity.signer,
        tls_signer=real.identity.tls_signer,
        certificate=real.certificate,
    )
    with pytest.raises(EnrollmentError, match="agreement key is not the one derived"):
        verify(forged)


def test_a_random_fingerprint_without_a_certificate_is_refused() -> None:
    signing, agreement = attacker_keys()
    host = record("hsa-4", signing, agreement, crypto.random_bytes(32))
    forged = forge_enrollment(host, domain_id=DOMAIN, signer=signing)
    with pytest.raises(EnrollmentError, match="carries no TLS certificate"):
        verify(forged)


# --- each proof missing or wrong ----------------------------------------------------------


def _resigned(
    new: Enrolled,
    *,
    signer: object = "own",
    tls_signer: object = "own",
    certificate: bytes | None = None,
    host: domain_pb2.Host | None = None,
) -> bytes:
    parsed = domain_pb2.HostEnrollment.FromString(new.raw)
    return forge_enrollment(
        host or domain_pb2.Host.FromString(parsed.host),
        domain_id=DOMAIN,
        signer=new.identity.signer if signer == "own" else signer,  # type: ignore[arg-type]
        tls_signer=new.identity.tls_signer if tls_signer == "own" else tls_signer,  # type: ignore[arg-type]
        certificate=new.certificate if certificate is None else certificate,
    )


PROOFS: dict[str, tuple[Callable[[Enrolled], bytes], str]] = {
    "signing proof missing": (
        lambda n: _resigned(n, signer=None),
        "not signed by the signing key it names",
    ),
    "signing proof by another Ed25519 key": (
        lambda n: _resigned(n, signer=InMemorySigner.generate(SignatureAlgorithm.ED25519)),
        "not signed by the signing key it names",
    ),
    "signing proof by the TLS key": (
        lambda n: _resigned(n, signer=n.identity.tls_signer),
        "not signed by the signing key it names",
    ),
    "TLS proof missing": (
        lambda n: _resigned(n, tls_signer=None),
        "not signed by the key of its TLS certificate",
    ),
    "TLS proof by another P-256 key": (
        lambda n: _resigned(n, tls_signer=InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256)),
        "not signed by the key of its TLS certificate",
    ),
    "TLS proof by the signing key": (
        lambda n: _resigned(n, tls_signer=n.identity.signer),
        "not signed by the key of its TLS certificate",
    ),
}


@pytest.mark.parametrize("case", list(PROOFS))
def test_each_proof_of_possession_missing_or_wrong_fails(case: str) -> None:
    build, reason = PROOFS[case]
    new = enroll()
    verify(_resigned(new))  # re-signed with the right keys it verifies
    with pytest.raises(EnrollmentError, match=reason):
        verify(build(new))


def test_signatures_over_another_domain_do_not_count() -> None:
    """The digest binds the domain id: signatures made for domain "other" fail in "local"."""
    new = enroll()
    parsed = domain_pb2.HostEnrollment.FromString(new.raw)
    message = enrollment.enrollment_signing_input("other", parsed.host, new.certificate)
    parsed.signature = new.identity.signer.sign(message)
    parsed.tls_signature = new.identity.tls_signer.sign(message)
    with pytest.raises(EnrollmentError, match="not signed by the signing key"):
        verify(parsed.SerializeToString(deterministic=True))


def test_a_small_order_signing_key_is_refused() -> None:
    identity_point = bytes([1]) + bytes(31)
    spki = bytes.fromhex("302a300506032b6570032100") + identity_point
    host = domain_pb2.Host(
        host_id="hsa-4",
        signing_public_key=spki,
        agreement_public_key=bytes(32),
        tls_certificate_fingerprint=bytes(32),
        spiffe_id=model.host_spiffe_id(DOMAIN, "hsa-4"),
    )
    with pytest.raises(EnrollmentError, match="not a valid Ed25519 key"):
        verify(forge_enrollment(host, domain_id=DOMAIN))


# --- the certificate ----------------------------------------------------------------------


def test_a_certificate_from_another_ca_fails() -> None:
    rogue = DomainCA.create(DOMAIN, now=NOW)  # same domain name, another key
    new = enroll(ca=rogue)
    verify(new.raw, ca=rogue)
    with pytest.raises(EnrollmentError, match="does not verify against the domain CA"):
        verify(new.raw)


def test_a_certificate_naming_another_host_fails() -> None:
    """hsa-9 holds a certificate the CA issued for hsa-1 (over hsa-9's own TLS key)."""
    new = enroll("hsa-9", spiffe=SpiffeId(DOMAIN, "hsa", "hsa-1"))
    with pytest.raises(EnrollmentError, match="names spiffe://local/hsa/hsa-1, expected"):
        verify(new.raw)


def test_a_client_certificate_fails() -> None:
    new = enroll("hsa-9", spiffe=SpiffeId(DOMAIN, "client", "hsa-9"))
    with pytest.raises(EnrollmentError, match="names spiffe://local/client/hsa-9"):
        verify(new.raw)


def test_another_hosts_certificate_swapped_in_fails() -> None:
    new, other = enroll("hsa-4"), enroll("hsa-5")
    with pytest.raises(EnrollmentError, match="fingerprints differ"):
        verify(_resigned(new, certificate=other.certificate))


def test_a_certificate_outside_its_validity_fails() -> None:
    new = enroll()
    with pytest.raises(EnrollmentError, match="expired"):
        verify(new.raw, now=NOW + timedelta(days=400))
    with pytest.raises(EnrollmentError, match="not valid before"):
        verify(new.raw, now=NOW - timedelta(days=1))


def test_an_enrollment_for_another_domain_is_malformed_here() -> None:
    with pytest.raises(MalformedMessageError, match="SPIFFE id"):
        enrollment.verify_enrollment(
            enroll().raw, domain_id="other", ca_certificate=CA.certificate_der, now=T
        )


def test_the_address_is_a_hint_outside_the_signatures() -> None:
    new = enroll()
    parsed = domain_pb2.HostEnrollment.FromString(new.raw)
    parsed.address = "10.0.0.9:7443"
    assert verify(parsed.SerializeToString(deterministic=True)).address == "10.0.0.9:7443"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_bit_of_an_enrollment_is_refused(data: st.DataObject) -> None:
    raw = GOOD.raw
    # The address hint is empty here, so every bit belongs to a signed or parsed part.
    bit = data.draw(st.integers(min_value=0, max_value=len(raw) * 8 - 1))
    with pytest.raises(HsmDomainError):
        verify(flip_bit(raw, bit))


GOOD = enroll("hsa-7")


# --- every verifier: transition (HSAs, coordinator), chain, genesis, the review -------------


def _attack_enrollment(sim: SimulatedDomain, host_id: str) -> bytes:
    """The issue's attack against a simulated domain: a genuinely enrolled host's certificate
    with the attacker's keys."""
    real = sim.new_host(host_id)
    signing, agreement = attacker_keys()
    forged = record(host_id, signing, agreement, crypto.sha256(real.certificate))
    forged.spiffe_id = model.host_spiffe_id(sim.domain_id, host_id)
    return forge_enrollment(
        forged,
        domain_id=sim.domain_id,
        signer=signing,
        tls_signer=InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256),
        certificate=real.certificate,
    )


def test_no_hsa_applies_nor_accepts_a_state_with_an_unproven_host() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    forged = _attack_enrollment(sim, "hsa-4")
    proposal = sim.propose([sim.add_host_change(enrollment=forged)])
    approvals = sim.approve_quorum(proposal)
    with pytest.raises(EnrollmentError):
        transition.next_manifest(sim.state_head(), proposal, approvals, now=sim.now)
    # A producer that skipped the check (a compromised host) seals the state anyway.
    manifest = sim.manifest_after(None, mutate=lambda m: None)
    manifest.key_generations.pop()
    manifest.hosts.append(model.parse_enrollment(forged, DOMAIN)[1])
    manifest.proposal_id = proposal.id
    state = sim.seal(
        manifest, base=sim.head, producer="hsa-1", proposal=proposal, approvals=approvals
    )
    with pytest.raises(EnrollmentError, match="not signed by the key of its TLS certificate"):
        sim.chain().update(state)
    # The honest enrollment of the same host goes through.
    honest = sim.transition([sim.add_host_change("hsa-5")])
    assert "hsa-5" in honest.manifest.hosts_by_id
    assert sim.chain().version == 2


def test_a_chain_verified_after_the_certificates_expired_still_verifies() -> None:
    """Certificates are judged at the state's own time, so every verifier agrees forever."""
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    sim.transition([sim.add_host_change("hsa-4")])
    sim.advance(5 * 365 * 24 * 3600)
    assert sim.chain().version == 2


def test_the_domain_ca_is_pinned_by_the_genesis_and_never_replaced() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    settings = domain_pb2.DomainSettings()
    settings.CopyFrom(sim.head.manifest.message.settings)
    settings.domain_ca_certificate = new_ca(DOMAIN).certificate_der
    change = domain_pb2.Change(set_settings=domain_pb2.SetSettings(settings=settings))
    with pytest.raises(InvalidSettingsError, match="must keep the domain CA"):
        sim.transition([change])
    settings.domain_ca_certificate = b""
    with pytest.raises(InvalidSettingsError, match="must keep the domain CA"):
        sim.transition([change])
    sim.transition([sim.set_settings_change(key_generations_retained=3)])  # keeps it


def _genesis(hosts: list[SimHost], ca_der: bytes, sim: SimulatedDomain) -> None:
    proposal = genesis.genesis_proposal(
        DOMAIN,
        [h.enrollment for h in hosts],
        [o.record for o in sim.operators],
        2,
        ca_certificate=ca_der,
        proposer_id=sim.operators[0].operator_id,
        now=sim.now,
    )
    approvals = [quorum.approve(proposal, o.signer) for o in sim.operators]
    transition.genesis_manifest(proposal, approvals, now=sim.now)


def test_genesis_hosts_are_enrolled_under_the_ca_the_genesis_pins() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    assert sim.ca is not None
    hosts = list(sim.hosts.values())
    _genesis(hosts, sim.ca.certificate_der, sim)
    with pytest.raises(EnrollmentError, match="does not verify against the domain CA"):
        _genesis(hosts, new_ca(DOMAIN).certificate_der, sim)
    with pytest.raises(InvalidSettingsError, match="pin the domain CA"):
        _genesis(hosts, b"", sim)
    with pytest.raises(InvalidSettingsError, match="trust domain spiffe://local"):
        _genesis(hosts, new_ca("other").certificate_der, sim)
    leaf = pki.certificate_der(
        sim.ca.issue(
            SpiffeId(DOMAIN, "hsa", "x"),
            ec.generate_private_key(ec.SECP256R1()).public_key(),
            now=NOW,
        )
    )
    with pytest.raises(InvalidSettingsError, match="not a CA certificate"):
        _genesis(hosts, leaf, sim)


def test_the_review_shows_the_fingerprints_and_asks_for_an_out_of_band_check() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    new = sim.new_host("hsa-4")
    proposal = sim.propose([sim.add_host_change(enrollment=new.enrollment)])
    r = review(proposal, [], head=sim.head, states={1: sim.head}, now=sim.now)
    text = "\n".join(review_lines(r))
    for label, digest in enrollment.host_key_fingerprints(new.record):
        hexed = digest.hex()
        assert f"{label}" in text
        assert " ".join(hexed[i : i + 4] for i in range(0, 64, 4)) in text
    assert "compare these fingerprints with the operator of hsa-4 out of band" in text
    assert "enrollment: verified here against the domain CA of version 1" in text
    r.require_enrollments_verify()


def test_the_review_of_a_forged_enrollment_says_so_and_nothing_can_be_signed() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    proposal = sim.propose([sim.add_host_change(enrollment=_attack_enrollment(sim, "hsa-4"))])
    r = review(proposal, [], head=sim.head, states={1: sim.head}, now=sim.now)
    text = "\n".join(review_lines(r))
    assert "enrollment: DOES NOT VERIFY, do not approve" in text
    assert "hsa-4: the enrollment of hsa-4 is not signed by the key of its TLS certificate" in text
    with pytest.raises(EnrollmentError, match="refusing to sign"):
        r.require_enrollments_verify()
    # Without a verified base state there is no CA to verify against: refused as well.
    stale = review(proposal, [], head=sim.head, states={}, now=sim.now)
    with pytest.raises(EnrollmentError, match="domain CA is unknown"):
        stale.require_enrollments_verify()


def test_an_applied_add_host_is_judged_at_its_state_time_in_later_reviews() -> None:
    sim = SimulatedDomain.create(domain_id=DOMAIN)
    state = sim.transition([sim.add_host_change("hsa-4")])
    assert state.proposal is not None
    sim.advance(2 * 365 * 24 * 3600)  # the host's certificate has expired since
    r = review(
        state.proposal,
        list(state.approvals),
        head=state,
        states={1: sim.genesis, 2: state},
        now=sim.now,
    )
    assert r.state == "applied"
    assert r.enrollment_problems == ()
