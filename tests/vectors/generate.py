"""Generate the golden vectors of the wire formats from fixed keys and fixed inputs.

Run `python tests/vectors/generate.py` to rewrite tests/vectors/canonical.json; the test
tests/unit/core/test_vectors.py regenerates them in memory and compares byte for byte, so a change
of a signed format (context strings, digests, proposal encoding, sealing) cannot go unnoticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core import canonical, crypto, enrollment, model, quorum
from domain_core.contexts import PayloadType
from domain_core.signers import InMemorySigner
from domain_proto import domain_pb2

OUT = Path(__file__).with_name("canonical.json")


def fixed_signers() -> dict[str, InMemorySigner]:
    """Two operator keys from fixed secrets (never use these anywhere else)."""
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    p256 = ec.derive_private_key(
        0x1F2E3D4C5B6A79880102030405060708090A0B0C0D0E0F101112131415161718, ec.SECP256R1()
    )
    return {"ed25519": InMemorySigner(ed), "ecdsa-p256": InMemorySigner(p256)}


def host_enrollment() -> dict[str, Any]:
    """An enrollment's derived agreement key, signing input and both signatures, from fixed
    keys. The "certificate" is fixed bytes: the signing input covers bytes, and certificate
    checks are not a wire format."""
    seed = bytes(range(64, 96))
    signer = InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    tls = InMemorySigner(
        ec.derive_private_key(
            0x2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C4D5E6F708192A3B4C5D6E7F80910, ec.SECP256R1()
        )
    )
    agreement = crypto.x25519_public_from_ed25519(signer.public_key.raw_ed25519())
    certificate = b"certificate DER bytes"
    host = model.make_host(
        "vectors", "hsa-1", signer.public_key, agreement, crypto.sha256(certificate)
    )
    host_bytes = host.SerializeToString(deterministic=True)
    message = enrollment.enrollment_signing_input("vectors", host_bytes, certificate)
    return {
        "domain_id": "vectors",
        "signing_seed": seed.hex(),
        "signing_public_key": signer.public_key.spki_der.hex(),
        "agreement_private_key": crypto.x25519_private_from_ed25519_seed(seed).hex(),
        "agreement_public_key": agreement.hex(),
        "tls_public_key": tls.public_key.spki_der.hex(),
        "host_bytes": host_bytes.hex(),
        "certificate": certificate.hex(),
        "signing_input": message.hex(),
        "signature": signer.sign(message).hex(),
        "tls_signature": tls.sign(message).hex(),
    }


def build() -> dict[str, Any]:
    """Every vector, as hex strings."""
    signers = fixed_signers()
    operators = [model.make_operator(name, s.public_key) for name, s in sorted(signers.items())]
    proposal = model.Proposal.create(
        domain_id="vectors",
        base_version=7,
        base_state_hash=bytes(range(32)),
        changes=[
            domain_pb2.Change(remove_operator=domain_pb2.RemoveOperator(operator_id="ab" * 32)),
            domain_pb2.Change(set_quorum=domain_pb2.SetQuorum(threshold=2)),
            domain_pb2.Change(rotate_domain_key=domain_pb2.RotateDomainKey()),
        ],
        proposer_id=operators[0].operator_id,
        created_at=1_767_225_600,
        expires_at=1_767_229_200,
        reason="golden vector",
        nonce=bytes(16),
    )
    approvals = {name: quorum.approve(proposal, s) for name, s in sorted(signers.items())}
    manifest_bytes = b"manifest bytes"
    secrets_bytes = b"sealed secrets bytes"
    key = bytes(range(100, 132))
    nonce = bytes(range(12))
    sealed = crypto.aes_gcm_seal(key, b"domain secrets", b"associated data", nonce)
    return {
        "operators": {
            o.name: {"operator_id": o.operator_id, "public_key": o.public_key.hex()}
            for o in operators
        },
        "proposal_bytes": proposal.raw.hex(),
        "proposal_id": proposal.id.hex(),
        "approval_signing_input": quorum.approval_message(proposal.id).hex(),
        "approval_signatures": {name: a.signature.hex() for name, a in approvals.items()},
        "cancel_signing_input": quorum.cancel_message(proposal.id).hex(),
        "manifest_digest": canonical.digest(PayloadType.MANIFEST, manifest_bytes).hex(),
        "state_hash": model.state_hash(manifest_bytes, secrets_bytes).hex(),
        "host_enrollment": host_enrollment(),
        "aes_gcm": {
            "key": key.hex(),
            "nonce": nonce.hex(),
            "plaintext": b"domain secrets".hex(),
            "associated_data": b"associated data".hex(),
            "ciphertext_and_tag": sealed.hex(),
        },
    }


def main() -> int:
    """Write the vectors file."""
    OUT.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
