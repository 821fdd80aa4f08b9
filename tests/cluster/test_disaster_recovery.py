"""Disaster recovery (issue 16) with the real tools against a real local domain.

Operators make recovery keys (two in files, one on a SoftHSM2 token), enroll them through
quorum proposals (each enrolment shows the key's fingerprint, to compare with `recovery show`)
and set a recovery threshold; from then on every state the HSAs produce carries a recovery
package whose shares, opened with the operators' keys, rebuild that state's domain keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.operators import HSM_OPERATOR, Operators

from domain_core import crypto
from domain_core.errors import FailedPreconditionError
from domain_core.model import SealedState
from domain_core.recovery import open_operator_share, open_package
from domain_edge.recovery_tokens import load_recovery_token
from domain_proto import domain_pb2

pytestmark = pytest.mark.cluster

CAROL_PIN = "3141"
SO_PIN = "27182818"
RECOVERY_PASSPHRASE = "recovery words kept apart"


@pytest.fixture
def ops(local_cluster: Any, tmp_path: Path) -> Operators:
    if not HSM_OPERATOR.is_file():
        pytest.fail(f"{HSM_OPERATOR} is missing: run `pip install -e '.[test]'`")
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Operators(local_cluster(nodes=3, operators=3, quorum=2), workdir)


def _recovery_file(ops: Operators, name: str) -> tuple[str, ...]:
    """A recovery token file for `name`; the options that name it and its passphrase."""
    passphrase = ops.workdir / f"{name}.recovery-pass"
    passphrase.write_text(RECOVERY_PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    created = ops.json(
        "recovery", "init", "--out", f"{name}.recovery", "--name", name,
        "--recovery-passphrase-file", str(passphrase), cluster=False,
    )  # fmt: skip
    assert created["algorithm"] == "x25519"
    return (
        "--recovery-token",
        str(ops.workdir / f"{name}.recovery"),
        "--recovery-passphrase-file",
        str(passphrase),
    )


def _enroll(ops: Operators, name: str, approver: str, recovery: tuple[str, ...]) -> None:
    shown_key = ops.json("recovery", "show", *recovery, cluster=False)
    proposed = ops.propose(name, "set-recovery-key", *recovery, "--reason", f"{name} enrolls")
    assert proposed["changes"][0]["type"] == "set-recovery-key"
    diff = ops.json("proposals", "show", proposed["proposal_id"])["diff"]["recovery_keys"]
    assert diff["changed"]
    (listed,) = set(diff["after"].values()) - set(diff["before"].values())
    short = listed.rsplit(", ", 1)[1]  # what approvers compare with the operator
    assert shown_key["fingerprint"].startswith(short)
    done = ops.json("approve", proposed["proposal_id"], *ops.token(approver), "--yes", "--wait")
    assert done["state"] == "applied"


@pytest.mark.pkcs11
def test_operators_enroll_recovery_keys_and_every_state_carries_a_package(
    ops: Operators, softhsm2_util_bin: str, softhsm2_module: str, tmp_path: Path
) -> None:
    alice = _recovery_file(ops, "alice")
    bob = _recovery_file(ops, "bob")
    pin = ops.softhsm_token(softhsm2_util_bin, tmp_path / "softhsm", "carol", CAROL_PIN, SO_PIN)
    made = ops.json(
        "recovery", "init", "--pkcs11", "--module", softhsm2_module, "--token-label", "carol",
        "--key-label", "recovery", "--pin-file", str(pin), cluster=False,
    )  # fmt: skip
    assert made["algorithm"] == "p256"
    carol = ("--recovery-token", made["recovery_token"], "--pin-file", str(pin))

    # A recovery threshold above the enrolled keys is refused before anything is signed.
    cause = ops.refused("propose", "set-quorum", "2", "--recovery", *ops.token("alice"), "--yes")
    assert "recovery threshold 2 is above the 0 enrolled recovery keys" in cause

    _enroll(ops, "alice", "bob", alice)
    _enroll(ops, "bob", "carol", bob)
    _enroll(ops, "carol", "alice", carol)
    threshold = ops.propose("alice", "set-quorum", "2", "--recovery")
    ops.ok("approve", threshold["proposal_id"], *ops.token("bob"), "--yes", "--wait")
    quorum = ops.status()["quorum"]
    assert (quorum["recovery_threshold"], quorum["recovery_keys"]) == (2, 3)

    # A rotation after it: the HSAs seal a fresh package with the new keys.
    rotation = ops.propose("bob", "rotate-domain-key")
    ops.ok("approve", rotation["proposal_id"], *ops.token("carol"), "--yes", "--wait")
    ops.ok("domain", "export-state", "--out", "head.state")
    message = domain_pb2.SealedState()
    message.ParseFromString((ops.workdir / "head.state").read_bytes())
    head = SealedState.from_message(message)
    assert head.manifest.current_generation == 2
    package = head.secrets.recovery
    assert package.threshold == 2
    assert len(package.shares) == 3

    words = []
    for name in ("alice", "bob"):
        token = load_recovery_token(ops.workdir / f"{name}.recovery", RECOVERY_PASSPHRASE.encode())
        operator_id = next(o.operator_id for o in head.manifest.message.operators if o.name == name)
        words.append(open_operator_share(head.manifest, package, operator_id, token.agree))
    keys = open_package(head.manifest, package, words)
    assert sorted(keys) == [1, 2]
    # The rebuilt current key is the one the HSAs sealed this state's secrets under.
    crypto.aes_gcm_open(keys[2], head.secrets.ciphertext, head.manifest.hash, head.secrets.nonce)
    with pytest.raises(FailedPreconditionError, match="not enough recovery shares"):
        open_package(head.manifest, package, words[:1])
