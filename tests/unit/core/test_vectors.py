"""Golden vectors: the signed formats must not change by accident."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest
from support.repository import VECTORS

from domain_core import crypto, enrollment, quorum
from domain_core.model import Proposal
from domain_core.signers import PublicKey, SignatureAlgorithm

pytestmark = pytest.mark.unit


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("vector_generator", VECTORS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vector_generator"] = module
    spec.loader.exec_module(module)
    return module


def test_regenerated_vectors_match_committed_bytes() -> None:
    committed = json.loads((VECTORS / "canonical.json").read_text())
    assert _generator().build() == committed


def test_committed_signatures_verify_under_committed_keys() -> None:
    committed = json.loads((VECTORS / "canonical.json").read_text())
    message = bytes.fromhex(committed["approval_signing_input"])
    for name, algorithm in (
        ("ed25519", SignatureAlgorithm.ED25519),
        ("ecdsa-p256", SignatureAlgorithm.ECDSA_P256),
    ):
        key = PublicKey(algorithm, bytes.fromhex(committed["operators"][name]["public_key"]))
        key.verify(bytes.fromhex(committed["approval_signatures"][name]), message)
    assert message == quorum.approval_message(bytes.fromhex(committed["proposal_id"]))


def test_committed_aes_gcm_vector_opens() -> None:
    v = json.loads((VECTORS / "canonical.json").read_text())["aes_gcm"]
    plaintext = crypto.aes_gcm_open(
        bytes.fromhex(v["key"]),
        bytes.fromhex(v["ciphertext_and_tag"]),
        bytes.fromhex(v["associated_data"]),
        bytes.fromhex(v["nonce"]),
    )
    assert plaintext == bytes.fromhex(v["plaintext"])


def test_committed_enrollment_vector_verifies() -> None:
    """The enrollment signing input binds domain id, host bytes and certificate; both of the
    host's keys signed it; the agreement key is the signing key's Montgomery form."""
    v = json.loads((VECTORS / "canonical.json").read_text())["host_enrollment"]
    message = bytes.fromhex(v["signing_input"])
    assert message == enrollment.enrollment_signing_input(
        v["domain_id"], bytes.fromhex(v["host_bytes"]), bytes.fromhex(v["certificate"])
    )
    signing = PublicKey(SignatureAlgorithm.ED25519, bytes.fromhex(v["signing_public_key"]))
    signing.verify(bytes.fromhex(v["signature"]), message)
    tls = PublicKey(SignatureAlgorithm.ECDSA_P256, bytes.fromhex(v["tls_public_key"]))
    tls.verify(bytes.fromhex(v["tls_signature"]), message)
    agreement = bytes.fromhex(v["agreement_public_key"])
    assert crypto.x25519_public_from_ed25519(signing.raw_ed25519()) == agreement
    seed = bytes.fromhex(v["signing_seed"])
    assert crypto.x25519_private_from_ed25519_seed(seed).hex() == v["agreement_private_key"]
    assert crypto.x25519_public_from_private(bytes.fromhex(v["agreement_private_key"])) == agreement


def test_committed_proposal_bytes_still_parse_under_the_proposal_rules() -> None:
    # Issue 21, item 6: canonical bytes, no unknown field, at most 64 KiB, printable reason;
    # the golden proposal was serialized deterministically, so the rule changes no vector.
    committed = json.loads((VECTORS / "canonical.json").read_text())
    raw = bytes.fromhex(committed["proposal_bytes"])
    proposal = Proposal.from_bytes(raw)
    assert proposal.id.hex() == committed["proposal_id"]
    assert proposal.raw == raw
