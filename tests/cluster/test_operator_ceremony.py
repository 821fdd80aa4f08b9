"""The real `hsm-operator` executable against a real local domain (coordinator + 3 HSAs).

A full ceremony with three operators on file tokens and a fourth on a SoftHSM2 token; the
offline signing path; every one-line refusal with its exit status; the --json documents the
README lists. Each test gets its own cluster from the `local_cluster` fixture (every process is
killed at teardown, and the logs are printed when a test fails).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from support.cluster import LocalCluster
from support.operators import HSM_OPERATOR, Operators
from support.simulator import forge_unchained_state, new_host

from domain_core import quorum
from domain_core.changes import rotate_domain_key
from domain_core.model import Proposal, SealedState
from domain_edge.files import write_new_file
from operator_tool.cli import build_parser, main
from operator_tool.offline import export_document

pytestmark = pytest.mark.cluster

DAVE_PIN = "2468"
SO_PIN = "13572468"

# The --json fields documented in README.md ("Operators").
PROPOSAL_FIELDS = {
    "proposal_id", "state", "detail", "coordinator_state", "domain_id", "base_version",
    "base_state_hash", "proposer_id", "proposer", "proposer_signed", "reason", "created_at",
    "expires_at", "expires_in_seconds", "changes", "threshold", "threshold_reason", "approvals",
    "approved_by", "can_approve", "needed", "cancel_votes", "applied_version",
}  # fmt: skip
SHOW_FIELDS = PROPOSAL_FIELDS | {
    "head_version", "diff", "diff_error", "not_counted", "enrollment_problems",
}  # fmt: skip
DIFF_FIELDS = {"hosts", "operators", "quorum", "settings", "key_generation", "recovery_keys"}
LIST_FIELDS = {"domain_id", "version", "state_hash", "proposals"}
STATUS_FIELDS = {
    "domain_id", "version", "state_hash", "created_at", "verified_from", "hosts",
    "other_registered_hsas", "operators", "quorum", "settings", "key_generation", "coordinator",
}  # fmt: skip


@pytest.fixture
def ops(local_cluster: Any, tmp_path: Path) -> Operators:
    if not HSM_OPERATOR.is_file():
        pytest.fail(f"{HSM_OPERATOR} is missing: run `pip install -e '.[test]'`")
    cluster: LocalCluster = local_cluster(nodes=3, operators=3, quorum=2)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return Operators(cluster, workdir)


def _names(entries: list[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in entries]


# --- the ceremony ----------------------------------------------------------------------------


@pytest.mark.pkcs11
def test_ceremony_with_file_tokens_and_a_softhsm2_token(
    ops: Operators, softhsm2_util_bin: str, softhsm2_module: str, tmp_path: Path
) -> None:
    # dave's hardware token: SoftHSM2 in a private token directory.
    pin = ops.softhsm_token(softhsm2_util_bin, tmp_path / "softhsm", "dave", DAVE_PIN, SO_PIN)
    created = ops.json(
        "token", "init", "--pkcs11", "--module", softhsm2_module, "--token-label", "dave",
        "--key-label", "operator", "--algorithm", "ecdsa-p256", "--pin-file", str(pin),
        cluster=False,
    )  # fmt: skip
    dave = ("--token", str(created["token"]), "--pin-file", str(pin))
    ops.ok("token", "export-public", *dave, "--name", "dave", "--out", "dave.pub.json")

    # alice proposes adding dave; her signature is the first approval.
    proposed = ops.propose(
        "alice", "add-operator", "--public-key", "dave.pub.json", "--reason", "dave joins"
    )
    assert set(proposed) >= PROPOSAL_FIELDS
    assert proposed["state"] == "pending"
    assert (proposed["approvals"], proposed["threshold"], proposed["needed"]) == (1, 2, 1)
    assert _names(proposed["approved_by"]) == ["alice"]
    assert _names(proposed["can_approve"]) == ["bob", "carol"]
    assert proposed["changes"][0]["type"] == "add-operator"
    first = proposed["proposal_id"]

    # bob reviews and approves; --wait returns once the change is applied everywhere. With
    # --yes nothing is shown before the signature, so a prefix is refused: the full id.
    cause = ops.refused("approve", first[:12], *ops.token("bob"), "--yes", status=2)
    assert "approve --yes needs the full proposal id" in cause
    out = ops.ok("approve", first, *ops.token("bob"), "--yes", "--wait")
    assert "operators: 3 -> 4" in out
    assert "+ dave" in out
    assert "applied everywhere: version 2" in out
    status = ops.status()
    assert status["version"] == 2
    assert _names(status["operators"]) == ["alice", "bob", "carol", "dave"]
    assert status["operators"][3] == {
        "operator_id": created["operator_id"], "name": "dave", "algorithm": "ecdsa-p256",
    }  # fmt: skip

    # A proposal approved with dave's PKCS#11 token.
    rotate = ops.propose("alice", "rotate-domain-key", "--reason", "routine")["proposal_id"]
    wrong_pin = ops.workdir / "wrong.pin"
    wrong_pin.write_text("0000\n")
    cause = ops.refused(
        "approve", rotate, "--token", str(created["token"]), "--pin-file", str(wrong_pin), "--yes"
    )
    assert cause == "hsm-operator: error: wrong PIN for token dave"
    absent = str(created["token"]).replace("token=dave", "token=nobody")
    cause = ops.refused("approve", rotate, "--token", absent, "--pin-file", str(pin), "--yes")
    assert cause.startswith("hsm-operator: error: token not found: no token labelled 'nobody'")
    approved = ops.json("approve", rotate, *dave, "--yes", "--wait")
    assert approved["state"] == "applied"
    assert _names(approved["approved_by"]) == ["alice", "dave"]
    assert approved["applied_everywhere"]["applied_version"] == 3
    assert approved["applied_everywhere"]["hosts"] == ["hsa-1", "hsa-2", "hsa-3"]
    assert ops.status()["key_generation"]["current"] == 2

    # set-quorum 3: raising the threshold needs the new one, so bob and carol approve too.
    quorum = ops.propose("alice", "set-quorum", "3")["proposal_id"]
    shown = ops.json("proposals", "show", quorum)
    assert shown["diff"]["quorum"]["before"]["threshold"] == 2
    assert shown["diff"]["quorum"]["after"]["threshold"] == 3
    assert (shown["threshold"], shown["needed"]) == (3, 2)
    assert shown["threshold_reason"] == (
        "3: the highest threshold in the policy this proposal sets (default), because "
        "set-quorum changes who may approve or how many approvals are needed"
    )
    ops.ok("approve", quorum, *ops.token("bob"), "--yes")
    ops.ok("approve", quorum, *ops.token("carol"), "--yes", "--wait")
    assert ops.status()["quorum"] == {
        "threshold": 3,
        "per_change_type": {},
        "operators": 4,
        "recovery_threshold": 0,
        "recovery_keys": 0,
    }

    # remove-operator carol (by name): now three approvals are needed.
    removal = ops.propose("alice", "remove-operator", "carol")
    assert (removal["threshold"], removal["needed"]) == (3, 2)
    ops.ok("approve", removal["proposal_id"], *ops.token("bob"), "--yes")
    done = ops.json("approve", removal["proposal_id"], *dave, "--yes", "--wait")
    assert done["state"] == "applied"
    status = ops.status()
    assert status["version"] == 5
    assert _names(status["operators"]) == ["alice", "bob", "dave"]
    # carol is not an operator any more.
    late = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    cause = ops.refused("approve", late, *ops.token("carol"), "--yes")
    assert "you are not an operator of this domain" in cause


# --- offline signing -----------------------------------------------------------------------


def test_offline_signing(ops: Operators) -> None:
    genesis = ops.cluster.layout.genesis_hash.hex()  # bob's pin, given to him out of band
    ops.ok("domain", "export-state", "--out", "v1.state")
    node = ops.cluster.add_node()  # hsa-4: started, not yet a member
    enrollment = ops.cluster.layout.node_dir(node.host_id) / "enrollment.bin"
    proposal = ops.propose("alice", "add-host", "--enrollment", str(enrollment))
    pid = proposal["proposal_id"]
    ops.ok("proposals", "export", pid, "--out", "proposal.json")
    export = json.loads((ops.workdir / "proposal.json").read_text())
    assert (export["format"], export["version"]) == ("hsm-domain-proposal-export", 2)
    assert (export["proposal_id"], export["base_version"]) == (pid, 1)
    assert len(export["chain"]) == 1  # the genesis is the base

    # On the "offline machine": no --cluster, no coordinator; bob pins the genesis hash.
    out = ops.ok(
        "sign-offline", "proposal.json", "--genesis-hash", genesis, "--out", "approval.json",
        *ops.token("bob"), "--yes", cluster=False,
    )  # fmt: skip
    assert f"verified offline from the genesis you pinned ({genesis[:16]})" in out
    assert "hosts: 3 -> 4" in out
    assert f"+ {node.host_id}" in out
    approval = json.loads((ops.workdir / "approval.json").read_text())
    assert set(approval) == {"format", "version", "proposal_id", "operator_id", "signature"}
    assert approval["proposal_id"] == pid

    # Refusals offline: no pin, altered bytes, a state of another version, and a second
    # signature by the same operator.
    cause = ops.refused(
        "sign-offline", "proposal.json", "--out", "x.json", *ops.token("carol"), "--yes",
        status=2, cluster=False,
    )  # fmt: skip
    assert "give --genesis-hash HEX" in cause
    altered = dict(export)
    raw = bytearray(base64.b64decode(export["proposal"]))
    raw[-1] ^= 1
    altered["proposal"] = base64.b64encode(bytes(raw)).decode()
    (ops.workdir / "altered.json").write_text(json.dumps(altered))
    cause = ops.refused(
        "sign-offline", "altered.json", "--genesis-hash", genesis, "--out", "x.json",
        *ops.token("carol"), "--yes", cluster=False,
    )  # fmt: skip
    assert "do not hash to the proposal id" in cause

    ops.ok("approvals", "submit", "approval.json", "--wait")
    assert [h["host_id"] for h in ops.status()["hosts"]] == ["hsa-1", "hsa-2", "hsa-3", "hsa-4"]
    cause = ops.refused("approvals", "submit", "approval.json")
    assert "the proposal was applied as version 2" in cause

    # A proposal for version 2: its export carries the genesis and version 2.
    ops.ok("domain", "export-state", "--out", "v2.state")
    second = ops.propose("alice", "set-quorum", "3")["proposal_id"]
    ops.ok("proposals", "export", second, "--out", "second.json")
    assert len(json.loads((ops.workdir / "second.json").read_text())["chain"]) == 2
    # Exported by a machine whose anchor is its version-2 state (not the genesis): the
    # states before it are fetched and checked to lead to it; the same file comes out.
    ops.ok(
        "proposals", "export", second, "--out", "second-from-v2.json",
        "--coordinator", ops.cluster.coordinator_operator_address,
        "--ca", str(ops.cluster.layout.ca_cert), "--state", "v2.state", cluster=False,
    )  # fmt: skip
    from_v2 = json.loads((ops.workdir / "second-from-v2.json").read_text())
    assert from_v2["chain"] == json.loads((ops.workdir / "second.json").read_text())["chain"]
    assert from_v2["genesis_hash"] == genesis
    # bob's own earlier state (version 1) is in that chain; so is version 2.
    for state in ("v1.state", "v2.state"):
        out = ops.ok(
            "sign-offline", "second.json", "--genesis-hash", genesis, "--state", state,
            "--out", f"ok-{state}.json", *ops.token("bob"), "--yes", cluster=False,
        )  # fmt: skip
        assert "set-quorum: default threshold 3" in out
    # The version-1 export against bob's version-2 state: the domain moved on.
    cause = ops.refused(
        "sign-offline", "proposal.json", "--genesis-hash", genesis, "--state", "v2.state",
        "--out", "x.json", *ops.token("carol"), "--yes", cluster=False,
    )  # fmt: skip
    assert "past this proposal's base version 1" in cause
    cause = ops.refused(
        "sign-offline", "second.json", "--genesis-hash", genesis, "--out", "x.json",
        *ops.token("alice"), "--yes", cluster=False,
    )  # fmt: skip
    assert "already approved by you (operator alice)" in cause
    assert not (ops.workdir / "x.json").exists()


def test_sign_offline_refuses_a_state_not_chained_to_the_pinned_genesis(ops: Operators) -> None:
    """Issue 21, item 8: a forged "version 7" listing an attacker host, with the domain's real
    operators, signed by the attacker host it lists (so "by one of its own hosts"). alice, an
    insider, proposes against it and hands bob the bundle; before the fix `sign-offline`
    showed it and signed. Now nothing is shown: it does not chain to bob's pinned genesis."""
    genesis = ops.cluster.layout.genesis_hash
    real = SealedState.from_bytes(ops.cluster.layout.genesis_state.read_bytes())
    attacker = new_host(real.manifest.domain_id, "hsa-66")
    alice = ops.cluster.operator_signer("alice")
    bundles = {
        "the forged state alone": [forge_unchained_state(real, 7, attacker)],
        "the genesis, then a forged version 2 linked to it": [
            real,
            forge_unchained_state(real, 2, attacker, previous_state_hash=real.hash),
        ],
    }
    for name, chain in bundles.items():
        base = chain[-1]
        now = int(time.time())
        proposal = Proposal.create(
            domain_id=base.manifest.domain_id,
            base_version=base.version,
            base_state_hash=base.hash,
            changes=[rotate_domain_key()],
            proposer_id=alice.public_key.key_id,
            created_at=now,
            expires_at=now + 3600,
            reason="routine",
            nonce=bytes(16),
        )
        document = export_document(proposal, chain, [quorum.approve(proposal, alice)], now, genesis)
        path = ops.workdir / f"forged-{base.version}.json"
        path.write_text(json.dumps(document))
        result = ops.run(
            "sign-offline", path.name, "--genesis-hash", genesis.hex(), "--out", "x.json",
            *ops.token("bob"), "--yes", cluster=False,
        )  # fmt: skip
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert result.stdout == "", name  # nothing shown
        assert f"do not verify from the genesis you pinned ({genesis.hex()[:16]})" in (
            result.stderr
        ), name
        assert "do not sign anything it shows" in result.stderr, name
        assert not (ops.workdir / "x.json").exists()

    # The forged state as bob's own `--state` beside an honest export: refused too.
    write_new_file(ops.workdir / "v7.state", bundles["the forged state alone"][0].to_bytes(), 0o644)
    pid = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    ops.ok("proposals", "export", pid, "--out", "honest.json")
    cause = ops.refused(
        "sign-offline", "honest.json", "--genesis-hash", genesis.hex(), "--state", "v7.state",
        "--out", "x.json", *ops.token("bob"), "--yes", cluster=False,
    )  # fmt: skip
    assert "v7.state is at version 7, past this proposal's base version 1" in cause
    # The honest export alone signs.
    ops.ok(
        "sign-offline", "honest.json", "--genesis-hash", genesis.hex(), "--out", "x.json",
        *ops.token("bob"), "--yes", cluster=False,
    )  # fmt: skip


# --- every refusal, one line each ----------------------------------------------------------


def test_refusals_and_exit_statuses(ops: Operators) -> None:
    # Stale: P1 is made for version 1, then another change is applied.
    first = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    other = ops.propose("alice", "set-quorum", "1")["proposal_id"]
    ops.ok("approve", other, *ops.token("bob"), "--yes", "--wait")
    cause = ops.refused("approve", first, *ops.token("bob"), "--yes")
    assert (
        cause
        == "hsm-operator: error: domain is at version 2, this proposal is for 1: propose again"
    )

    # Quorum is 1 now: setting it back to 2 needs the new threshold, 2.
    raised = ops.propose("alice", "set-quorum", "2")
    assert (raised["state"], raised["threshold"], raised["needed"]) == ("pending", 2, 1)
    ops.ok("approve", raised["proposal_id"], *ops.token("bob"), "--yes", "--wait")

    # Expired.
    short = ops.propose("alice", "rotate-domain-key", "--expires-in", "2s")["proposal_id"]
    time.sleep(2.2)
    cause = ops.refused("approve", short, *ops.token("bob"), "--yes")
    assert cause.startswith("hsm-operator: error: the proposal expired at ")
    assert cause.endswith(": propose again")

    pending = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    # Already approved by you.
    cause = ops.refused("approve", pending, *ops.token("alice"), "--yes")
    assert cause == (
        "hsm-operator: error: already approved by you (operator alice); one approval per "
        "operator counts"
    )
    # Not an operator: a fresh token.
    passphrase = ops.workdir / "mallory.pass"
    passphrase.write_text("mallory's passphrase\n")
    passphrase.chmod(0o600)
    fresh = ("--token", "mallory.token", "--passphrase-file", str(passphrase))
    ops.ok("token", "init", "--out", "mallory.token", "--name", "mallory",
           "--passphrase-file", str(passphrase), cluster=False)  # fmt: skip
    cause = ops.refused("approve", pending, *fresh, "--yes")
    assert cause.startswith("hsm-operator: error: you are not an operator of this domain")
    cause = ops.refused("propose", "rotate-domain-key", *fresh, "--yes")
    assert cause.startswith("hsm-operator: error: you are not an operator of this domain")
    # Wrong passphrase, token not found.
    bob_token = str(ops.cluster.layout.operator_tokens["bob"][0])
    cause = ops.refused(
        "approve", pending, "--token", bob_token, "--passphrase-file", str(passphrase), "--yes"
    )
    assert cause.startswith("hsm-operator: error: wrong passphrase: ")
    cause = ops.refused("approve", pending, "--token", "absent.token", "--yes")
    assert cause.startswith("hsm-operator: error: token not found: no token file at absent.token")
    # An impossible change is refused before anything is signed.
    cause = ops.refused("propose", "remove-host", "hsa-9", *ops.token("alice"), "--yes")
    assert "hsa-9 is not in the domain" in cause

    # carol alone cannot cancel alice's proposal: her signature is a vote.
    out = ops.ok("cancel", pending, *ops.token("carol"), "--yes")
    assert out.strip().splitlines()[-1] == (
        f"proposal {pending[:16]} pending: your vote to cancel counts; 1 of 2 votes to cancel; "
        "the proposer alone may cancel at once"
    )
    shown = ops.json("proposals", "show", pending)
    assert (shown["state"], _names(shown["cancel_votes"])) == ("pending", ["carol"])
    cause = ops.refused("cancel", pending, *ops.token("carol"), "--yes")
    assert "voted to cancel this proposal already" in cause
    # alice, who proposed it, cancels it at once; then approving is refused.
    ops.ok("cancel", pending, *ops.token("alice"), "--yes")
    cause = ops.refused("approve", pending, *ops.token("bob"), "--yes")
    assert cause == (
        "hsm-operator: error: the proposal was cancelled by operator alice, who proposed it"
    )

    # Usage errors: exit 2.
    last = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    cause = ops.refused("approve", last, *ops.token("bob"), status=2)  # no --yes, no terminal
    assert "not confirmed" in cause
    ops.refused("approve", status=2)
    ops.refused("proposals", "list", status=2, cluster=False)  # where is the domain?
    ops.refused("propose", "set-quorum", "two", status=2)
    assert "no proposal id starts with" in ops.refused("proposals", "show", "abcdef12")


# --- --wait: until every host reports the new state -----------------------------------------


def test_approve_wait_ends_when_every_host_reports_the_new_state(ops: Operators) -> None:
    hosts = ["hsa-1", "hsa-2", "hsa-3"]
    pid = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    done = ops.json("approve", pid, *ops.token("bob"), "--yes", "--wait", "--timeout", "30")
    applied = done["applied_everywhere"]
    assert (applied["applied_version"], applied["hosts"]) == (2, hosts)
    assert applied["reported_versions"] == dict.fromkeys(hosts, 2)
    for host in hosts:  # what they reported through the coordinator is what they hold
        status = ops.cluster.node_status(host)
        assert (status.version, status.state_hash.hex()) == (2, applied["state_hash"])

    # hsa-3 is down: the change applies (quorum does not need it) but never reaches it, and
    # the wait gives up naming it and what it last reported.
    assert ops.cluster.stop_node("hsa-3") == 0
    pid = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    result = ops.run("approve", pid, *ops.token("bob"), "--yes", "--wait", "--timeout", "3")
    assert result.returncode == 1, (result.stdout, result.stderr)
    *progress, cause = result.stderr.strip().splitlines()
    assert cause.startswith(
        "hsm-operator: error: gave up waiting after 3 s: version 3 is applied and verified; "
        "not reported yet by hsa-3 (at version 2, reported "
    ), cause
    assert cause.endswith(" ago)")
    assert "hsa-1" not in cause
    assert "hsa-2" not in cause
    # Without a terminal: one progress line per change of what is awaited, no spinner. On a
    # loaded machine a live host may report a moment late, which is one more (true) line.
    assert progress, result.stderr
    assert len(progress) == len(set(progress)), progress
    assert all(line.startswith("waiting: version 3 is applied and verified; ") for line in progress)
    assert all("hsa-3 (at version 2)" in line for line in progress), progress
    assert progress[-1] == (
        "waiting: version 3 is applied and verified; not reported yet by hsa-3 (at version 2)"
    )
    assert ops.status()["version"] == 3  # the approval counted all the same

    # hsa-3 comes back, catches up and reports: the next change waits for all three again.
    ops.cluster.start_node("hsa-3")
    pid = ops.propose("alice", "rotate-domain-key")["proposal_id"]
    done = ops.json("approve", pid, *ops.token("bob"), "--yes", "--wait", "--timeout", "30")
    assert done["applied_everywhere"]["reported_versions"] == dict.fromkeys(hosts, 4)
    assert ops.cluster.node_status("hsa-3").version == 4


# --- --json documents ------------------------------------------------------------------------


def test_json_of_read_commands(ops: Operators) -> None:
    empty = ops.json("proposals", "list")
    assert set(empty) == LIST_FIELDS
    assert empty["proposals"] == []
    proposal = ops.propose("alice", "set-quorum", "3", "--for", "add-host", "--reason", "safer")
    listed = ops.json("proposals", "list")
    assert set(listed) == LIST_FIELDS
    (entry,) = listed["proposals"]
    assert set(entry) == PROPOSAL_FIELDS
    assert entry["proposal_id"] == proposal["proposal_id"]
    assert (entry["state"], entry["reason"], entry["proposer"]) == ("pending", "safer", "alice")

    shown = ops.json("proposals", "show", proposal["proposal_id"][:8])
    assert set(shown) == SHOW_FIELDS
    assert set(shown["diff"]) == DIFF_FIELDS
    assert shown["diff"]["quorum"]["after"]["per_change_type"] == {"add-host": 3}
    assert shown["diff"]["quorum"]["changed"] is True
    assert shown["diff"]["hosts"]["added"] == shown["diff"]["hosts"]["removed"] == []
    assert shown["head_version"] == 1
    text = ops.ok("proposals", "show", proposal["proposal_id"])
    assert "  + add-host: 3 of 3 operators" in text
    assert "can approve      bob, carol" in text

    status = ops.status()
    assert set(status) == STATUS_FIELDS
    assert status["coordinator"]["agrees"] is True
    assert status["coordinator"]["pending_proposals"] == 1
    assert all(h["registered"] for h in status["hosts"])
    assert [h["reported_version"] for h in status["hosts"]] == [1, 1, 1]
    assert status["verified_from"].startswith("the pinned genesis")
    # The same, verified from an exported state instead of the genesis (another domain's way).
    ops.ok("domain", "export-state", "--out", "pin.state")
    again = ops.json(
        "domain", "status", "--coordinator", ops.cluster.coordinator_operator_address,
        "--ca", str(ops.cluster.layout.ca_cert), "--state", "pin.state", cluster=False,
    )  # fmt: skip
    assert again["state_hash"] == status["state_hash"]
    assert again["verified_from"].startswith("your state file pin.state")


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands: list[list[str]] = []

    def walk(p: Any, prefix: list[str]) -> None:
        for action in p._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
                return
        commands.append(prefix)

    walk(parser, [])
    assert ["approve"] in commands
    assert ["sign-offline"] in commands
    for command in commands:
        assert main([*command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "Example:\n  hsm-operator " in out, command
