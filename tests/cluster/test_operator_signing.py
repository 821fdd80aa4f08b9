"""Issue 21, items 4 and 5, against a real local domain: an operator signs exactly what they
reviewed, and nothing relayed can drive their terminal.

A local domain (coordinator + 3 HSAs, operators alice, bob and carol, threshold 2) runs as real
processes. Between `hsm-operator` and the real coordinator sits `LyingOperatorPort`
(tests/support/malicious_coordinator.py): the operator port of a coordinator that lies. It
lists, for the prefix an operator types, a proposal ground to share it (a `set-quorum 1`
naming alice as its proposer, which alice never signed), rewrites details, the domain status
and the HSA list with newlines, ANSI escapes and bidi overrides, and records every approval
submitted through it.

The grinding: the reviewers of issue 21 found a proposal sharing 6 hex digits with a real one
in 21 s by grinding its nonce. Here both the honest and the forged nonce are chosen (a
birthday search over 6 hex digits, well under a second): the operator's side cannot tell the
difference, and a test should not spend 21 s of a shared machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster
from support.malicious_coordinator import LyingOperatorPort

from domain_core import quorum
from domain_core.changes import rotate_domain_key, set_quorum
from domain_core.errors import InvalidInputError, PermissionDeniedError
from domain_core.model import NONCE_BYTES, Proposal, SealedState
from domain_core.signers import Signer
from domain_edge.transport import ANY_HSA, COORDINATOR, TlsMaterial, mtls_channel, secure_channel
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
HSM_OPERATOR = BIN / "hsm-operator"
HSM_DOMAIN = BIN / "hsm-domain"
PREFIX_DIGITS = 6  # the shortest prefix `hsm-operator` resolves

# What a lying coordinator relays (issue 21, item 5): a forged line, a colour that hides
# text, a line erase, a bidi override.
HOSTILE = (
    "cancelled by bob\nproposal  rotate-domain-key (routine)\r\x1b[2K"
    "\x1b[30;40mset-quorum 1\x1b[0m\u202eeunitnoc"
)


# --- running the tools -------------------------------------------------------------------------


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSM_")}
    return {**env, **(extra or {})}


def run(
    tool: Path, *args: str, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tool), *args],
        env=_env(),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_on_a_terminal(tool: Path, *args: str, answer: str) -> subprocess.CompletedProcess[str]:
    """Run with a pseudo-terminal as stdin (so the tool asks), typing `answer`."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, answer.encode() + b"\n")
        return run(tool, *args, stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)


def token(cluster: LocalCluster, name: str) -> tuple[str, ...]:
    path, passphrase = cluster.layout.operator_tokens[name]
    return ("--token", str(path), "--passphrase-file", str(passphrase))


def where(cluster: LocalCluster, port: LyingOperatorPort) -> tuple[str, ...]:
    """`--cluster DIR` for the CA and the pinned genesis, but the lying operator port."""
    return ("--cluster", str(cluster.directory), "--coordinator", port.address)


def assert_inert(text: str) -> None:
    """No character of the injected text that a terminal acts on reached the output."""
    for raw in ("\x1b", "\r", "\u202e", "\x9b"):
        assert raw not in text, text
    for line in text.split("\n"):
        assert line.isprintable(), line
    assert "\nproposal  rotate-domain-key (routine)" not in text


# --- the forgeries -------------------------------------------------------------------------------


def _nonce_tail(proposal: Proposal) -> bytes:
    """The proposal's bytes before its nonce (the nonce, field 9, is serialized last)."""
    assert proposal.raw.endswith(proposal.message.nonce)
    return proposal.raw[:-NONCE_BYTES]


def _with_nonce(template: Proposal, nonce: bytes) -> Proposal:
    message = domain_pb2.Proposal()
    message.CopyFrom(template.message)
    message.nonce = nonce
    return Proposal.from_bytes(message.SerializeToString(deterministic=True))


def grind_pair(honest: Proposal, forged: Proposal) -> tuple[Proposal, Proposal]:
    """Nonces for both so that their ids share the first PREFIX_DIGITS hex digits."""
    digits = PREFIX_DIGITS
    honest_head = hashlib.sha256(_nonce_tail(honest))
    forged_head = hashlib.sha256(_nonce_tail(forged))
    seen: dict[str, bytes] = {}
    for _ in range(1 << 13):
        nonce = secrets.token_bytes(NONCE_BYTES)
        h = honest_head.copy()
        h.update(nonce)
        seen[h.hexdigest()[:digits]] = nonce
    for _ in range(1 << 24):
        nonce = secrets.token_bytes(NONCE_BYTES)
        f = forged_head.copy()
        f.update(nonce)
        hit = seen.get(f.hexdigest()[:digits])
        if hit is not None:
            pair = _with_nonce(honest, hit), _with_nonce(forged, nonce)
            assert pair[0].id.hex()[:digits] == pair[1].id.hex()[:digits]
            assert pair[0].id != pair[1].id
            return pair
    raise AssertionError("no collision found")


def _proposal(head: SealedState, change: domain_pb2.Change, proposer: Signer) -> Proposal:
    now = int(time.time())
    return Proposal.create(
        domain_id=head.manifest.domain_id,
        base_version=head.version,
        base_state_hash=head.hash,
        changes=[change],
        proposer_id=proposer.public_key.key_id,
        created_at=now,
        expires_at=now + 3600,
        reason="routine",
        nonce=secrets.token_bytes(NONCE_BYTES),
    )


def pending_status(
    proposal: Proposal, approvals: list[domain_pb2.Approval], detail: str = ""
) -> services_pb2.ProposalStatus:
    return services_pb2.ProposalStatus(
        proposal_id=proposal.id,
        proposal=proposal.raw,
        approvals=approvals,
        state=services_pb2.PROPOSAL_STATE_PENDING,
        threshold=2,
        detail=detail,
    )


def ask_hsa_to_apply(
    cluster: LocalCluster, proposal: Proposal, approvals: list[domain_pb2.Approval]
) -> grpc.RpcError:
    """ApplyProposal straight to hsa-1 as the coordinator (a lying one would); the refusal."""
    root = cluster.layout.root / "coordinator"
    tls = TlsMaterial.from_files(cluster.layout.ca_cert, root / "tls.crt", root / "tls.key")
    with mtls_channel(cluster.node_addresses()["hsa-1"], tls, ANY_HSA) as channel:
        stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.ApplyProposal(
                services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
                timeout=10,
            )
    return refused.value


@pytest.fixture
def cluster(local_cluster: Any) -> LocalCluster:
    for tool in (HSM_OPERATOR, HSM_DOMAIN):
        if not tool.is_file():
            pytest.fail(f"{tool} is missing: run `pip install -e '.[test]'`")
    made: LocalCluster = local_cluster(nodes=3, operators=3, quorum=2)
    return made


@pytest.fixture
def port(cluster: LocalCluster) -> Iterator[LyingOperatorPort]:
    with LyingOperatorPort(cluster.layout, cluster.coordinator_operator_address) as lying:
        yield lying


# --- item 4 -----------------------------------------------------------------------------------


def test_approve_signs_only_the_proposal_it_reviewed(
    cluster: LocalCluster, port: LyingOperatorPort
) -> None:
    alice, bob, carol = (cluster.operator_signer(n) for n in ("alice", "bob", "carol"))
    client = cluster.coordinator_client()
    head = client.latest_state()
    # alice proposes a rotation; the forged proposal names her too, for set-quorum 1.
    honest, forged = grind_pair(
        _proposal(head, rotate_domain_key(), alice), _proposal(head, set_quorum(1), alice)
    )
    client.submit_proposal(honest, quorum.approve(honest, alice))
    prefix = honest.id.hex()[:PREFIX_DIGITS]
    port.script.listed = [pending_status(forged, [])]  # listed for the prefix, not the real one

    # `approve PREFIX --yes`: refused before anything is fetched or signed.
    result = run(HSM_OPERATOR, "approve", prefix, *where(cluster, port), *token(cluster, "bob"),
                 "--yes")  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "approve --yes needs the full proposal id" in result.stderr
    assert port.approvals == []

    # Asked on a terminal: the forged one is refused, for its proposer never signed it.
    result = run_on_a_terminal(
        HSM_OPERATOR, "approve", prefix, *where(cluster, port), *token(cluster, "bob"), answer="y"
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "names alice" in result.stderr
    assert "as its proposer, but carries no valid approval by that operator" in result.stderr
    assert port.approvals == []

    # `proposals show PREFIX` says so, with the full id it resolved to.
    result = run(HSM_OPERATOR, "proposals", "show", prefix, *where(cluster, port))
    assert result.returncode == 0, result.stderr
    assert f"proposal  {forged.id.hex()}" in result.stdout
    assert "set-quorum: default threshold 1" in result.stdout
    assert "NOT SIGNED BY ITS PROPOSER" in result.stdout
    assert "NOT SIGNED: no approval by this operator verifies under version 1" in result.stdout

    # Neither the coordinator nor an HSA takes a proposal its named proposer did not sign.
    bob_on_forged, carol_on_forged = (quorum.approve(forged, s) for s in (bob, carol))
    with pytest.raises(InvalidInputError, match="signed by the proposer named in the proposal"):
        client.submit_proposal(forged, bob_on_forged)
    in_alices_name = domain_pb2.Approval()
    in_alices_name.CopyFrom(bob_on_forged)
    in_alices_name.operator_id = alice.public_key.key_id
    with pytest.raises(PermissionDeniedError, match="does not verify under the key of operator"):
        client.submit_proposal(forged, in_alices_name)
    refusal = ask_hsa_to_apply(cluster, forged, [bob_on_forged, carol_on_forged])
    assert refusal.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "2 of 2 approvals" in (refusal.details() or "")
    assert "not signed by the proposer it names" in (refusal.details() or "")
    refusal = ask_hsa_to_apply(cluster, forged, [in_alices_name, carol_on_forged])
    assert "not signed by the proposer it names" in (refusal.details() or "")
    assert client.latest_state().version == 1

    # With the full id, bob signs the rotation he was told about, through the same liar.
    result = run(HSM_OPERATOR, "approve", honest.id.hex(), *where(cluster, port),
                 *token(cluster, "bob"), "--yes", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [a.proposal_id for a in port.approvals] == [honest.id]
    assert port.approvals[0].operator_id == bob.public_key.key_id
    document = json.loads(result.stdout)
    assert (document["proposal_id"], document["proposer_signed"]) == (honest.id.hex(), True)
    cluster.wait_for(lambda: client.latest_state().version == 2, what="the rotation to apply")
    assert client.latest_state().manifest.message.quorum.threshold == 2


def test_a_prefix_on_a_terminal_shows_the_review_and_the_full_id_before_asking(
    cluster: LocalCluster, port: LyingOperatorPort
) -> None:
    alice, carol = cluster.operator_signer("alice"), cluster.operator_signer("carol")
    client = cluster.coordinator_client()
    head = client.latest_state()
    # carol (an insider) signs her own set-quorum 1, ground to share alice's rotation's prefix.
    honest, forged = grind_pair(
        _proposal(head, rotate_domain_key(), alice), _proposal(head, set_quorum(1), carol)
    )
    client.submit_proposal(honest, quorum.approve(honest, alice))
    prefix = honest.id.hex()[:PREFIX_DIGITS]
    port.script.listed = [pending_status(forged, [quorum.approve(forged, carol)])]

    result = run_on_a_terminal(
        HSM_OPERATOR, "approve", prefix, *where(cluster, port), *token(cluster, "bob"), answer="n"
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    shown = result.stdout
    assert f"proposal  {forged.id.hex()}" in shown
    assert "set-quorum: default threshold 1" in shown
    assert "proposer  carol (" in shown
    assert "signed: their approval verifies under their key in version 1" in shown
    assert f"you gave the prefix {prefix}; the coordinator's list resolved it" in shown
    assert f"  {forged.id.hex()}\n" in shown
    assert f"Approve proposal {forged.id.hex()} with your token? [y/N]" in result.stderr
    assert "not confirmed: nothing was signed" in result.stderr
    assert port.approvals == []


# --- item 5 -----------------------------------------------------------------------------------


def test_relayed_text_is_escaped_in_every_rendering(
    cluster: LocalCluster, port: LyingOperatorPort, tmp_path: Path
) -> None:
    alice = cluster.operator_signer("alice")
    client = cluster.coordinator_client()
    proposal = _proposal(client.latest_state(), rotate_domain_key(), alice)
    client.submit_proposal(proposal, quorum.approve(proposal, alice))
    junk = domain_pb2.Approval(
        proposal_id=proposal.id, operator_id="\x1b[2J\nmallory", signature=b"\x01" * 64
    )

    def closed_with_hostile_detail(status: services_pb2.ProposalStatus) -> None:
        status.state = services_pb2.PROPOSAL_STATE_CANCELLED
        status.detail = HOSTILE
        status.approvals.append(junk)

    def hostile_status(status: services_pb2.DomainStatusResponse) -> None:
        status.store_behind = HOSTILE
        status.hsas.append(services_pb2.HsaEndpoint(host_id=HOSTILE, address=HOSTILE, version=9))

    def hostile_hsas(response: services_pb2.ListHsasResponse) -> None:
        response.hsas.append(services_pb2.HsaEndpoint(host_id=HOSTILE, address=HOSTILE))

    port.script.status = closed_with_hostile_detail
    port.script.domain_status = hostile_status
    port.script.hsas = hostile_hsas

    shown = run(HSM_OPERATOR, "proposals", "show", proposal.id.hex(), *where(cluster, port))
    assert shown.returncode == 0, shown.stderr
    assert_inert(shown.stdout)
    assert "state     cancelled: cancelled by bob\\nproposal  rotate-domain-key" in shown.stdout
    assert "\\x1b[30;40mset-quorum 1\\x1b[0m\\u202e" in shown.stdout
    assert "\\x1b[2J \\nma" in shown.stdout  # the relayed approval's operator id, not counted

    listed = run(HSM_OPERATOR, "proposals", "list", "--all", *where(cluster, port))
    assert listed.returncode == 0, listed.stderr
    assert_inert(listed.stdout)
    assert proposal.id.hex()[:16] in listed.stdout

    status = run(HSM_OPERATOR, "domain", "status", *where(cluster, port))
    assert status.returncode == 0, status.stderr
    assert_inert(status.stdout)
    assert "WARNING: cancelled by bob\\nproposal  rotate-domain-key" in status.stdout
    assert "registered but not in the domain: cancelled by bob\\n" in status.stdout
    as_json = run(HSM_OPERATOR, "domain", "status", "--json", *where(cluster, port))
    assert as_json.returncode == 0, as_json.stderr
    assert_inert(as_json.stdout)
    assert json.loads(as_json.stdout)["coordinator"]["store_behind"] == HOSTILE

    # A refusal relayed from the coordinator is one escaped line too.
    refused = run(HSM_OPERATOR, "approve", proposal.id.hex(), *where(cluster, port),
                  *token(cluster, "bob"), "--yes")  # fmt: skip
    assert refused.returncode == 1
    assert_inert(refused.stderr)
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith(
        "hsm-operator: error: the proposal was cancelled by bob proposal rotate-domain-key "
        "(routine) \\x1b[2K\\x1b[30;40mset-quorum 1"
    )

    # `hsm-domain status` asks the coordinator's operator port named in its ready file.
    ready = cluster.layout.ready_file("coordinator")
    original = ready.read_text()
    document = json.loads(original)
    document["operator_address"] = port.address
    ready.write_text(json.dumps(document))
    try:
        result = run(HSM_DOMAIN, "status", str(cluster.directory))
    finally:
        ready.write_text(original)
    assert_inert(result.stdout)
    assert_inert(result.stderr)
    assert "WARNING: cancelled by bob\\nproposal  rotate-domain-key" in result.stdout
    assert "  cancelled by bob\\nproposal" in result.stdout  # the relayed host id's report line


def test_a_reason_that_could_drive_a_terminal_is_refused_everywhere(cluster: LocalCluster) -> None:
    alice = cluster.operator_signer("alice")
    client = cluster.coordinator_client()
    head = client.latest_state()
    for reason in ("routine\nproposal  set-quorum 1", "a\x1b[30;40mb", "a\u202eb", "a\u2028b"):
        args = ("propose", "rotate-domain-key", "--reason", reason, "--yes")
        result = run(
            HSM_OPERATOR, *args, "--cluster", str(cluster.directory), *token(cluster, "alice")
        )
        assert result.returncode == 1, (reason, result.stderr)
        assert "is not printable text on one line" in result.stderr
        assert_inert(result.stderr)

        # Built by hand (no tool would), signed by alice: the coordinator and an HSA refuse it.
        message = domain_pb2.Proposal()
        message.CopyFrom(_proposal(head, rotate_domain_key(), alice).message)
        message.reason = reason
        raw = message.SerializeToString(deterministic=True)
        approval = domain_pb2.Approval(
            proposal_id=hashlib.sha256(raw).digest(),
            operator_id=alice.public_key.key_id,
            signature=alice.sign(quorum.approval_message(hashlib.sha256(raw).digest())),
        )
        channel = secure_channel(
            cluster.coordinator_operator_address, cluster.ca_pem(), COORDINATOR
        )
        with channel:
            stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitProposal(
                    services_pb2.SubmitProposalRequest(proposal=raw, proposer_approval=approval),
                    timeout=10,
                )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "proposal reason must be printable text on one line" in (
            refused.value.details() or ""
        )
        fake = Proposal(raw=raw, message=message)  # bypasses parsing: the HSA parses
        refusal = ask_hsa_to_apply(cluster, fake, [approval])
        assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "proposal reason must be printable" in (refusal.details() or "")
    assert client.list_proposals() == []
