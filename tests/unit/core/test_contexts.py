"""Golden values of every domain-separation label (`domain_core.contexts`), and the rule that
no other module spells one out."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
from support.repository import ROOT, production_modules, relative

from domain_core import contexts
from domain_core.contexts import PayloadType

pytestmark = pytest.mark.unit


# Part of the wire and file formats: a change here breaks every signature, token, ciphertext,
# envelope and audit log made before it.
GOLDEN_CONTEXTS = {
    "AUDIT_RECORD_CONTEXT": "68736d2d646f6d61696e2f76312061756469742d7265636f726400",
    "ENCRYPT_INFO": "68736d2d646f6d61696e2f763120656e637279707400",
    "ENVELOPE_CONTEXT": "68736d2d646f6d61696e2f763120656e76656c6f706500",
    "GRANT_TOKEN_CONTEXT": "68736d2d646f6d61696e2f7631206772616e742d746f6b656e00",
    "GRANT_TOKEN_KEY_CONTEXT": "68736d2d646f6d61696e2f7631206772616e742d746f6b656e2d6b657900",
    "HASH_CONTEXT": "68736d2d646f6d61696e2f76312064696765737400",
    "IMPORT_TOKEN_CONTEXT": "68736d2d646f6d61696e2f763120696d706f72742d746f6b656e00",
    "IMPORT_TOKEN_KEY_CONTEXT": "68736d2d646f6d61696e2f763120696d706f72742d746f6b656e2d6b657900",
    "KEY_TOKEN_CONTEXT": "68736d2d646f6d61696e2f7631206b65792d746f6b656e00",
    "KEY_TOKEN_KEY_CONTEXT": "68736d2d646f6d61696e2f7631206b65792d746f6b656e2d6b657900",
    "MATERIAL_COMMITMENT_CONTEXT": (
        "68736d2d646f6d61696e2f7631206d6174657269616c2d636f6d6d69746d656e7400"
    ),
    "RECOVERY_SHARE_INFO": "68736d2d646f6d61696e2f7631207265636f766572792d736861726500",
    "SIGNATURE_CONTEXT": "68736d2d646f6d61696e2f7631207369676e617475726500",
}
GOLDEN_PAYLOAD_TYPES = {
    "MANIFEST": "manifest",
    "SEALED_STATE": "sealed-state",
    "PROPOSAL_APPROVAL": "proposal-approval",
    "PROPOSAL_CANCEL": "proposal-cancel",
    "HOST_ENROLLMENT": "host-enrollment",
    "AUDIT_CHECKPOINT": "audit-checkpoint",
    "KEY_RECORD": "key-record",
    "HEAD_CONFIRMATION": "head-confirmation",
    "KEY_FLOORS": "key-floors",
    "CREATE_KEY_ID": "create-key-id",
    "RECOVERY_SHARE": "recovery-share",
    "RECOVERY_SECRETS": "recovery-secrets",
    "RECOVERY_KEY_ENROLLMENT": "recovery-key-enrollment",
    "RECOVERY_CONTRIBUTION": "recovery-contribution",
}


def _labels() -> dict[str, bytes]:
    return {name: getattr(contexts, name) for name in contexts.__all__ if name != "PayloadType"}


def test_every_context_has_its_golden_bytes() -> None:
    assert {name: value.hex() for name, value in _labels().items()} == GOLDEN_CONTEXTS


def test_the_golden_bytes_read_as_their_purpose() -> None:
    assert contexts.HASH_CONTEXT == b"hsm-domain/v1 digest\x00"
    assert contexts.SIGNATURE_CONTEXT == b"hsm-domain/v1 signature\x00"
    assert contexts.KEY_TOKEN_CONTEXT == b"hsm-domain/v1 key-token\x00"
    assert contexts.KEY_TOKEN_KEY_CONTEXT == b"hsm-domain/v1 key-token-key\x00"
    assert contexts.ENCRYPT_INFO == b"hsm-domain/v1 encrypt\x00"
    assert contexts.ENVELOPE_CONTEXT == b"hsm-domain/v1 envelope\x00"
    assert contexts.AUDIT_RECORD_CONTEXT == b"hsm-domain/v1 audit-record\x00"
    assert contexts.RECOVERY_SHARE_INFO == b"hsm-domain/v1 recovery-share\x00"


def test_every_payload_type_has_its_golden_value() -> None:
    assert {t.name: t.value for t in PayloadType} == GOLDEN_PAYLOAD_TYPES


def test_no_label_is_a_prefix_of_another() -> None:
    labels = list(_labels().values())
    assert len(set(labels)) == len(labels)
    for a, b in itertools.permutations(labels, 2):
        assert not b.startswith(a)
    for label in labels:
        assert label.startswith(b"hsm-domain/v1 ")
        assert label.endswith(b"\x00")
        assert label.count(b"\x00") == 1


def _spelled_labels(path: Path) -> list[int]:
    """Lines of `path` with a bytes or str literal that starts like a context label."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes | str):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            if text.startswith("hsm-domain/v"):
                lines.append(node.lineno)
    return lines


def test_only_contexts_spells_out_a_label() -> None:
    home = ROOT / "domain_core" / "contexts.py"
    offenders = [
        f"{relative(path)}:{line}"
        for path in production_modules()
        if path != home
        for line in _spelled_labels(path)
    ]
    assert offenders == [], "import domain-separation labels from domain_core.contexts"
    assert len(_spelled_labels(home)) == len(GOLDEN_CONTEXTS)
