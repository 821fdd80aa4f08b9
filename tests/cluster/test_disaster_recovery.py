"""Disaster recovery (issue 16) with the real tools against a real local domain.

Operators make recovery keys (two in files, one on a SoftHSM2 token), enroll them through
quorum proposals (each enrolment shows the key's fingerprint, to compare with `recovery show`)
and set a recovery threshold; from then on every state the HSAs produce carries a recovery
package whose shares, opened with the operators' keys, rebuild that state's domain keys.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from support.operators import HSM_OPERATOR, Operators
from support.tools import json_output, one_line_error, run_tool

from deploy.cluster import client_tls as cluster_tls
from deploy.cluster import read_ready_file
from deploy.init import load_layout
from domain_core import crypto, quorum
from domain_core.changes import rotate_domain_key
from domain_core.display import hex_groups
from domain_core.errors import FailedPreconditionError, InvalidInputError, UnavailableError
from domain_core.model import SealedState
from domain_core.recovery import open_operator_share, open_package
from domain_edge.identity_files import RECOVERY_SESSION_KEY_FILE
from domain_edge.kms_client import KeyClient
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


def _softhsm_recovery_key(
    ops: Operators, softhsm2_util: str, module: str, tmp_path: Path
) -> tuple[str, ...]:
    """carol's P-256 recovery key, generated on her SoftHSM2 token; the options naming it."""
    pin = ops.softhsm_token(softhsm2_util, tmp_path / "softhsm", "carol", CAROL_PIN, SO_PIN)
    made = ops.json(
        "recovery", "init", "--pkcs11", "--module", module, "--token-label", "carol",
        "--key-label", "recovery", "--pin-file", str(pin), cluster=False,
    )  # fmt: skip
    assert made["algorithm"] == "p256"
    return ("--recovery-token", made["recovery_token"], "--pin-file", str(pin))


def _enroll_three(
    ops: Operators, alice: tuple[str, ...], bob: tuple[str, ...], carol: tuple[str, ...]
) -> None:
    """alice, bob and carol enroll their recovery keys; recovery threshold 2."""
    _enroll(ops, "alice", "bob", alice)
    _enroll(ops, "bob", "carol", bob)
    _enroll(ops, "carol", "alice", carol)
    threshold = ops.propose("alice", "set-quorum", "2", "--recovery")
    ops.ok("approve", threshold["proposal_id"], *ops.token("bob"), "--yes", "--wait")


@pytest.mark.pkcs11
def test_operators_enroll_recovery_keys_and_every_state_carries_a_package(
    ops: Operators, softhsm2_util_bin: str, softhsm2_module: str, tmp_path: Path
) -> None:
    alice = _recovery_file(ops, "alice")
    bob = _recovery_file(ops, "bob")
    carol = _softhsm_recovery_key(ops, softhsm2_util_bin, softhsm2_module, tmp_path)

    # The coordinator refuses a recovery share on an approval of a proposal that recovers
    # nothing (it would only be stored and handed out).
    with ops.cluster.coordinator_client() as client:
        pending = client.propose([rotate_domain_key()], ops.cluster.operator_signer("alice"))
        approval = quorum.approve(pending.proposal, ops.cluster.operator_signer("bob"))
        approval.recovery_contribution.CopyFrom(
            domain_pb2.RecoveryContribution(
                ephemeral_public_key=b"\x01" * 32, nonce=b"\x02" * 12, ciphertext=b"\x03" * 64
            )
        )
        with pytest.raises(InvalidInputError, match="the proposal recovers nothing"):
            client.submit_approval(approval)
        client.cancel(pending.proposal_id, ops.cluster.operator_signer("alice"))

    # A recovery threshold above the enrolled keys is refused before anything is signed.
    cause = ops.refused("propose", "set-quorum", "2", "--recovery", *ops.token("alice"), "--yes")
    assert "recovery threshold 2 is above the 0 enrolled recovery keys" in cause

    _enroll_three(ops, alice, bob, carol)
    policy = ops.status()["quorum"]
    assert (policy["recovery_threshold"], policy["recovery_keys"]) == (2, 3)

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


# --- the recovery ceremony --------------------------------------------------------------------


def _wipe(ops: Operators) -> None:
    """Every HSA and the coordinator's store are lost: kill every process, delete every node
    directory and the store."""
    cluster = ops.cluster
    for name in list(cluster.processes):
        cluster.kill(name)
    shutil.rmtree(cluster.layout.nodes_dir)
    for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
        (cluster.layout.coordinator_dir / name).unlink(missing_ok=True)


def _hsm_domain(*arguments: str | Path) -> Any:
    return json_output("hsm-domain", *arguments, timeout=300)


def _client(directory: Path, host: str) -> KeyClient:
    layout = load_layout(directory)
    tls = cluster_tls(layout)
    info = read_ready_file(layout.ready_file(host))
    assert info is not None, f"{host} is not running"
    return KeyClient(
        [info.address], ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, timeout=10
    )


def _wait_serving(directory: Path, hosts: list[str], timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report = _status(directory)
        by_name = {p["name"]: p for p in report["processes"]}
        if all(by_name.get(h, {}).get("healthy") for h in hosts):
            return by_name
        assert time.monotonic() < deadline, f"not serving in time: {by_name}"
        time.sleep(0.5)


def _corpus(ops: Operators) -> dict[str, list[tuple[bytes, bytes]]]:
    """Keys and ciphertexts made before the loss, across two domain key generations and two
    backing versions of one key."""
    made: dict[str, list[tuple[bytes, bytes]]] = {}
    with _client(ops.cluster.directory, "hsa-1") as client:
        for round_ in range(2):
            for i in range(3):
                key_id = client.create_key(description=f"corpus {round_}.{i}").key_id
                made[key_id] = []
                for j in range(2):
                    plaintext = f"record {round_}.{i}.{j}".encode()
                    made[key_id].append((plaintext, client.encrypt(key_id, plaintext)))
            if round_ == 0:
                rotated = next(iter(made))
                client.rotate_key(rotated)
                made[rotated].append((b"after rotate", client.encrypt(rotated, b"after rotate")))
                proposal = ops.propose("alice", "rotate-domain-key")["proposal_id"]
                ops.ok("approve", proposal, *ops.token("bob"), "--yes", "--wait")
    return made


@pytest.mark.pkcs11
def test_a_lost_domain_is_recovered_from_a_backup_by_m_of_n_operators(
    ops: Operators, softhsm2_util_bin: str, softhsm2_module: str, tmp_path: Path
) -> None:
    alice = _recovery_file(ops, "alice")
    bob = _recovery_file(ops, "bob")
    carol = _softhsm_recovery_key(ops, softhsm2_util_bin, softhsm2_module, tmp_path)
    _enroll_three(ops, alice, bob, carol)
    corpus = _corpus(ops)
    directory = ops.cluster.directory
    backup = tmp_path / "domain.backup"
    written = _hsm_domain("backup", directory, backup)
    assert written["counts"]["keys"] == len(corpus)
    # alice keeps her share of the backed-up state on paper (SLIP-39 words).
    paper = ops.json(
        "recovery", "share", "--format", "slip39", "--out", "alice.words",
        *ops.token("alice"), *alice,
    )  # fmt: skip
    assert paper["version"] == written["newest_version"]
    words = (ops.workdir / "alice.words").read_text().split()
    assert len(words) == 33  # a 256-bit secret's SLIP-39 share
    assert (ops.workdir / "alice.words").stat().st_mode & 0o777 == 0o600
    # While the domain runs, nothing is lost: recover refuses.
    cause = one_line_error(run_tool("hsm-domain", "recover", directory, "--backup", backup))
    assert "are running: a recovery starts from a stopped domain" in cause

    _wipe(ops)
    try:
        session = _hsm_domain("recover", directory, "--backup", backup)
        assert session["base_version"] == written["newest_version"]
        assert [h["host_id"] for h in session["new_hosts"]] == ["hsa-4", "hsa-5", "hsa-6"]
        assert session["session_host"] == "hsa-4"
        # No domain key anywhere yet.
        with pytest.raises(UnavailableError), _client(directory, "hsa-4") as client:
            client.encrypt(next(iter(corpus)), b"too early")

        # alice proposes the recovery with her share; the proposal shows the new hosts' keys
        # and the session key's fingerprint, as `recover` printed them.
        session_file = session["session_file"]
        first = ops.json(
            "recovery", "contribute", "--session", session_file, *ops.token("alice"),
            "--share-file", "alice.words", "--yes",
        )  # fmt: skip
        assert first["state"] == "pending"
        # Interrupted: everything stops. Run again, recover resumes the same session.
        run_tool("hsm-domain", "down", directory)
        resumed = _hsm_domain("recover", directory, "--backup", backup)
        assert resumed["session_key_sha256"] == session["session_key_sha256"]
        assert resumed["store"].startswith("restored by an earlier run")
        shown = ops.json("proposals", "show", first["proposal_id"])
        assert shown["changes"][0]["type"] == "recover"
        assert hex_groups(session["session_key_sha256"]) in shown["changes"][0]["detail"]
        assert [h["host_id"] for h in shown["changes"][0]["host_keys"]] == [
            "hsa-4", "hsa-5", "hsa-6",
        ]  # fmt: skip
        # carol contributes offline: her share is opened on her SoftHSM2 token from the
        # exported chain, sealed to the session key, and travels in her approval file.
        ops.ok("proposals", "export", first["proposal_id"], "--out", "recover.json")
        genesis = load_layout(directory).genesis_hash.hex()
        ops.ok(
            "sign-offline", "recover.json", "--genesis-hash", genesis, "--out", "carol.json",
            *ops.token("carol"), *carol, "--yes", cluster=False,
        )  # fmt: skip
        second = ops.json("approvals", "submit", "carol.json")
        assert second["proposal_id"] == first["proposal_id"]
        assert _settled(ops, first["proposal_id"])["state"] == "applied"
        _wait_serving(directory, ["hsa-4", "hsa-5", "hsa-6"])

        # Every ciphertext made before the loss decrypts on the new hosts.
        for host in ("hsa-4", "hsa-6"):
            with _client(directory, host) as client:
                for pairs in corpus.values():
                    for plaintext, blob in pairs:
                        assert client.decrypt(blob) == plaintext

        # The lost hosts go in one proposal: their key records are signed again by a new host
        # and the domain key rotates; the corpus still decrypts.
        removal = ops.propose("alice", "remove-host", "hsa-1", "hsa-2", "hsa-3")
        done = ops.json("approve", removal["proposal_id"], *ops.token("bob"), "--yes", "--wait")
        assert done["state"] == "applied"
        status = ops.status()
        assert [h["host_id"] for h in status["hosts"]] == ["hsa-4", "hsa-5", "hsa-6"]
        with _client(directory, "hsa-5") as client:
            for pairs in corpus.values():
                plaintext, blob = pairs[0]
                assert client.decrypt(blob) == plaintext
        # The session is over: its key is gone from the session host.
        identity = load_layout(directory).node_identity_dir("hsa-4")
        assert not (identity / RECOVERY_SESSION_KEY_FILE).exists()
    finally:
        run_tool("hsm-domain", "down", directory)


def test_fewer_shares_than_the_recovery_threshold_leave_no_domain(
    local_cluster: Any, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    ops = Operators(local_cluster(nodes=2, operators=3, quorum=2), workdir)
    alice = _recovery_file(ops, "alice")
    bob = _recovery_file(ops, "bob")
    _enroll(ops, "alice", "bob", alice)
    _enroll(ops, "bob", "alice", bob)
    threshold = ops.propose("alice", "set-quorum", "2", "--recovery")
    ops.ok("approve", threshold["proposal_id"], *ops.token("carol"), "--yes", "--wait")
    with _client(ops.cluster.directory, "hsa-1") as client:
        key_id = client.create_key(description="lost with M-1").key_id
        blob = client.encrypt(key_id, b"stays sealed")
    directory = ops.cluster.directory
    backup = tmp_path / "domain.backup"
    _hsm_domain("backup", directory, backup)
    _wipe(ops)
    try:
        session = _hsm_domain("recover", directory, "--backup", backup)
        session_file = session["session_file"]
        # bob holds a share: approving without giving it is refused before anything is signed.
        pending = ops.json(
            "recovery", "contribute", "--session", session_file, *ops.token("alice"), *alice,
            "--yes",
        )  # fmt: skip
        cause = ops.refused("approve", pending["proposal_id"], *ops.token("bob"), "--yes", status=2)
        assert "give your share with --recovery-token" in cause
        # carol enrolled no recovery key: her approval makes the quorum, but only one share
        # was given, and the session host refuses; no state, no domain key.
        ops.json("approve", pending["proposal_id"], *ops.token("carol"), "--yes")
        done = _settled(ops, pending["proposal_id"])
        assert done["state"] == "rejected", done
        assert "1 recovery shares were contributed and 2 are needed" in done["detail"]
        report = _status(directory)
        new = {p["name"]: p for p in report["processes"] if p["name"] in ("hsa-3", "hsa-4")}
        assert all(
            p["member"] is False and p["version"] == session["base_version"] for p in new.values()
        )
        with pytest.raises(UnavailableError), _client(directory, "hsa-3") as client:
            client.decrypt(blob)
        # Abandoning the session removes its key: no share sealed to it opens any more.
        abandoned = _hsm_domain("recover", directory, "--abandon")
        assert abandoned["session_key_removed"] is True
        assert not Path(session_file).exists()
    finally:
        run_tool("hsm-domain", "down", directory)


def _settled(ops: Operators, proposal_id: str, timeout: float = 90) -> dict[str, Any]:
    """The proposal once it is no longer pending: the coordinator retries a recovery until
    its session host has registered and caught up (slower on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = ops.json("proposals", "show", proposal_id)
        if shown["state"] != "pending":
            return shown
        assert time.monotonic() < deadline, f"still pending: {shown['detail']}"
        time.sleep(0.5)


def _status(directory: Path) -> Any:
    """`hsm-domain status --json` (exit status 1 while not all are healthy)."""
    result = run_tool("hsm-domain", "status", directory, "--json")
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)
