"""Golden vectors: the signed formats must not change by accident."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from domain_core import crypto, quorum
from domain_core.model import Proposal
from domain_core.signers import PublicKey, SignatureAlgorithm

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).resolve().parents[1] / "vectors"


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


def test_committed_proposal_bytes_still_parse_under_the_proposal_rules() -> None:
    # Issue 21, item 6: canonical bytes, no unknown field, at most 64 KiB, printable reason;
    # the golden proposal was serialized deterministically, so the rule changes no vector.
    committed = json.loads((VECTORS / "canonical.json").read_text())
    raw = bytes.fromhex(committed["proposal_bytes"])
    proposal = Proposal.from_bytes(raw)
    assert proposal.id.hex() == committed["proposal_id"]
    assert proposal.raw == raw
