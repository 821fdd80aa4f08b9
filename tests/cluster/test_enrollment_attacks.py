"""Issue 21, item 1, against real processes: a host joins only by proving it holds its keys.

A real new node (`hsm-domain add-node` machinery, started, not yet a member) answers TLS
handshakes, so anyone can take its certificate. The attacker pairs that certificate with
their own signing and agreement keys (or their own X25519 key, as the outside review did), or
names a random fingerprint and no certificate at all, and tries every door:
- `hsm-operator propose add-host` refuses the enrollment file, and nothing is submitted;
- a proposal built and signed with an operator's key, bypassing the tool, is refused by the
  coordinator's SubmitProposal;
- a proposal written straight into the coordinator's store (its holder is an attacker in the
  threat model) is shown by `proposals show` as not verifying, and `approve`, `proposals
  export` and `sign-offline` sign nothing; with a second approval forced in, the HSA the
  coordinator asks refuses to apply it;
- asked directly with the coordinator's identity (a malicious coordinator), every HSA
  refuses to apply it, and every HSA, the real new node included, refuses a state that a
  compromised producer sealed with it.
The domain stays at version 1 throughout, and the real node's genuine enrollment then joins.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from support.cluster import LocalCluster
from support.malicious_coordinator import coordinator_tls, forging_domain
from support.simulator import forge_enrollment

from deploy.enrollment import VerifiedEnrollment
from domain_coordinator.sqlite_store import SqliteStore
from domain_core import crypto, model, quorum
from domain_core.changes import add_host
from domain_core.errors import HsmDomainError
from domain_core.identity import HostIdentity
from domain_core.model import Proposal, SealedState
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge import transport
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc
from operator_tool.offline import export_document, write_document

pytestmark = pytest.mark.cluster

HSM_OPERATOR = Path(sys.executable).parent / "hsm-operator"
GENESIS = ("hsa-1", "hsa-2", "hsa-3")
NO_TLS_PROOF = "is not signed by the key of its TLS certificate"
NOT_DERIVED = "its agreement key is not the one derived from its signing key"
NO_CERTIFICATE = "carries no TLS certificate"


def certificate_from_handshake(address: str) -> bytes:
    """The DER certificate a server presents, read from a TLS handshake without any client
    certificate (what anyone on the network can do)."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def forged_enrollments(domain_id: str, certificate: bytes) -> dict[str, tuple[bytes, str]]:
    """Name -> (enrollment bytes, the reason every verifier gives)."""
    attacker = HostIdentity.generate("hsa-4")  # the attacker's own signing and X25519 keys
    signer = attacker.signer
    assert isinstance(signer, InMemorySigner)

    def host(agreement: bytes, fingerprint: bytes) -> domain_pb2.Host:
        return model.make_host(domain_id, "hsa-4", signer.public_key, agreement, fingerprint)

    _, own_x25519 = crypto.x25519_generate()
    real = crypto.sha256(certificate)
    return {
        "the real certificate with the attacker's keys": (
            forge_enrollment(
                host(attacker.agreement_public_key, real),
                domain_id=domain_id,
                signer=signer,
                tls_signer=InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256),
                certificate=certificate,
            ),
            NO_TLS_PROOF,
        ),
        "the real certificate with the attacker's own X25519 key": (
            forge_enrollment(
                host(own_x25519, real),
                domain_id=domain_id,
                signer=signer,
                tls_signer=attacker.tls_signer,
                certificate=certificate,
            ),
            NOT_DERIVED,
        ),
        "a random fingerprint and no certificate": (
            forge_enrollment(
                host(attacker.agreement_public_key, crypto.random_bytes(32)),
                domain_id=domain_id,
                signer=signer,
            ),
            NO_CERTIFICATE,
        ),
    }


def hsm_operator(
    cluster: LocalCluster, workdir: Path, *args: str, connected: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HSM_TOKEN", "HSM_CLUSTER"))}
    if connected:
        env["HSM_CLUSTER"] = str(cluster.directory)
    return subprocess.run(
        [str(HSM_OPERATOR), *args],
        env=env,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def token(cluster: LocalCluster, name: str) -> tuple[str, ...]:
    path, passphrase = cluster.layout.operator_tokens[name]
    return ("--token", str(path), "--passphrase-file", str(passphrase))


def refused(result: subprocess.CompletedProcess[str], reason: str) -> None:
    """`hsm-operator` failed with one line that gives `reason`."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("hsm-operator: error: ")
    assert reason in lines[0], lines[0]


def every_hsa_refuses(
    cluster: LocalCluster, hosts: tuple[str, ...], method: str, request: object, reason: str
) -> None:
    """Call HsaAdmin `method` on each host with the coordinator's own identity (what a lying
    coordinator can do): each refuses with PERMISSION_DENIED and `reason`."""
    for host in hosts:
        with transport.mtls_channel(
            cluster.address(host), coordinator_tls(cluster.layout), transport.ANY_HSA
        ) as channel:
            stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method)(request, timeout=10)
        error = info.value
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (host, error.details())
        assert reason in (error.details() or ""), (host, error.details())


def at_version_1(cluster: LocalCluster) -> None:
    for host in GENESIS:
        status = cluster.node_status(host)
        assert (status.version, status.healthy) == (1, True), status
    joining = cluster.node_status("hsa-4")
    assert (joining.version, joining.member) == (1, False), joining


def test_a_stolen_certificate_or_none_never_makes_a_host(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=3, operators=3, quorum=2)
    workdir = tmp_path / "work"
    workdir.mkdir()
    real: VerifiedEnrollment = cluster.add_node("hsa-4", start=True)
    certificate = certificate_from_handshake(cluster.address("hsa-4"))
    assert crypto.sha256(certificate) == real.host.tls_certificate_fingerprint
    domain_id = cluster.layout.domain_id
    forged = forged_enrollments(domain_id, certificate)
    alice, bob = cluster.operator_signer("alice"), cluster.operator_signer("bob")

    # 1. The tool and the coordinator refuse each forged enrollment; nothing is stored.
    with cluster.coordinator_client() as client:
        for name, (raw, reason) in forged.items():
            path = workdir / f"{name.replace(' ', '-')}.bin"
            path.write_bytes(raw)
            result = hsm_operator(
                cluster, workdir, "propose", "add-host", "--enrollment", str(path),
                *token(cluster, "alice"), "--yes",
            )  # fmt: skip
            refused(result, reason)
            with pytest.raises(HsmDomainError, match=reason):
                client.propose([add_host(raw)], alice, reason=name)
        assert client.list_proposals(include_closed=True) == []

    # 2. Whoever holds the coordinator's store writes the proposal in, signed by alice.
    raw, reason = forged["the real certificate with the attacker's keys"]
    genesis = SealedState.from_bytes(cluster.layout.genesis_state.read_bytes())
    now = int(time.time())
    proposal = Proposal.create(
        domain_id=domain_id,
        base_version=1,
        base_state_hash=genesis.hash,
        changes=[add_host(raw)],
        proposer_id=alice.public_key.key_id,
        created_at=now,
        expires_at=now + 3600,
        reason="grow",
        nonce=crypto.random_bytes(model.NONCE_BYTES),
    )
    by_alice = quorum.approve(proposal, alice)
    store = SqliteStore(cluster.layout.coordinator_config.parent / "coordinator.db")
    try:
        store.put_proposal(
            proposal.id,
            proposal.raw,
            proposal.created_at,
            proposal.expires_at,
            [(by_alice.operator_id, by_alice.SerializeToString(deterministic=True))],
            proposer=proposal.proposer_id,
            base_version=proposal.base_version,
            base_state_hash=proposal.base_state_hash,
        )
    finally:
        store.close()
    pid = proposal.id.hex()

    shown = hsm_operator(cluster, workdir, "proposals", "show", pid)
    assert shown.returncode == 0, shown.stderr
    assert "enrollment: DOES NOT VERIFY, do not approve" in shown.stdout
    assert f"hsa-4: the enrollment of hsa-4 {NO_TLS_PROOF}" in shown.stdout
    assert "compare these fingerprints with the operator of hsa-4 out of band" in shown.stdout
    refused(
        hsm_operator(cluster, workdir, "approve", pid, *token(cluster, "bob"), "--yes"),
        "refusing to sign",
    )
    refused(
        hsm_operator(cluster, workdir, "proposals", "export", pid, "--out", "p.json"),
        "refusing to sign",
    )
    assert not (workdir / "p.json").exists()
    # The air-gapped path: an export written by hand, checked against bob's own state file.
    assert (
        hsm_operator(cluster, workdir, "domain", "export-state", "--out", "v1.state").returncode
        == 0
    )
    write_document(
        workdir / "x.json", export_document(proposal, [genesis], [by_alice], now, genesis.hash)
    )
    refused(
        hsm_operator(
            cluster, workdir, "sign-offline", "x.json", "--state", "v1.state",
            "--genesis-hash", genesis.hash.hex(),
            "--out", "approval.json", *token(cluster, "bob"), "--yes", connected=False,
        ),
        "refusing to sign",
    )  # fmt: skip
    assert not (workdir / "approval.json").exists()

    # bob's key signs anyway (a tricked or compromised operator): the quorum is reached, the
    # coordinator asks an HSA, which refuses to apply it.
    with cluster.coordinator_client() as client:
        view = client.submit_approval(quorum.approve(proposal, bob))
    assert view.state == "rejected", (view.state, view.detail)
    assert "refused to apply it" in view.detail
    assert reason in view.detail

    # 3. A malicious coordinator asks every HSA itself: each refuses.
    approvals = [by_alice, quorum.approve(proposal, bob)]
    request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
    every_hsa_refuses(cluster, GENESIS, "ApplyProposal", request, reason)

    # A compromised producer (hsa-1's key) seals the state anyway: every other HSA, and the
    # real hsa-4 it would displace, refuse it.
    sim = forging_domain(cluster.layout)
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(genesis.manifest.message)
    manifest.hosts.append(model.added_host(proposal.changes[0], domain_id))
    manifest.version = 2
    manifest.previous_state_hash = genesis.hash
    manifest.created_at = int(time.time())
    manifest.proposal_id = proposal.id
    state = sim.seal(
        manifest, base=genesis, producer="hsa-1", proposal=proposal, approvals=approvals
    )
    install = services_pb2.InstallStateRequest(state=state.message)
    every_hsa_refuses(cluster, ("hsa-2", "hsa-3", "hsa-4"), "InstallState", install, reason)
    at_version_1(cluster)

    # 4. The real node's own enrollment, proposed with the tool, joins.
    result = hsm_operator(
        cluster, workdir, "propose", "add-host",
        "--enrollment", str(cluster.layout.node_dir("hsa-4") / "enrollment.bin"),
        *token(cluster, "alice"), "--yes", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with cluster.coordinator_client() as client:
        pending = [v for v in client.list_proposals() if v.state == "pending"]
        assert len(pending) == 1
        applied = client.approve(pending[0].proposal_id, bob)
    assert applied.applied, applied.detail
    cluster.wait_converged(hosts=(*GENESIS, "hsa-4"), timeout=30)
