"""The real `hsm-domain audit verify DIR`: every node's log checked under its host key.

Most logs here are written by `AuditLog` with the node's real identity (load_host_identity),
where an HSA writes them (`<data_dir>/audit.log`); the last test has running HSAs write them
while serving KeyService calls. The command runs as the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster, local_cluster
from support.tools import console_script

from deploy.audit import audit_log_path
from deploy.init import DomainLayout, add_node, init_domain, load_layout
from domain_core.identity import HostIdentity
from domain_edge.audit import AuditLog
from domain_edge.identity_files import load_host_identity, save_host_identity
from domain_edge.transport import ANY_HSA, mtls_channel
from domain_proto import services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster
__all__ = ["local_cluster"]  # the fixture, imported for the test that runs a domain


def hsm_domain() -> str:
    """Path of the installed `hsm-domain` console script."""
    return console_script("hsm-domain")


def audit_verify(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hsm_domain(), "audit", "verify", str(directory), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        check=False,
    )


def write_log(layout: DomainLayout, host: str, records: int) -> Path:
    identity = load_host_identity(layout.node_dir(host) / "identity")
    path = audit_log_path(layout, host)
    with AuditLog(path, host_id=host, signer=identity.signer, checkpoint_every=10) as log:
        for i in range(records):
            log.append(
                principal="spiffe://local/client/demo-app",
                operation="Encrypt",
                key_id="1234abcd",
                encryption_context={"order": str(i)},
            )
    return path


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> DomainLayout:
    return init_domain(tmp_path_factory.mktemp("audit") / "domain", scrypt_n=2**14)


def test_verify_passes_then_names_the_edited_record(domain: DomainLayout, tmp_path: Path) -> None:
    directory = tmp_path / "domain"
    shutil.copytree(domain.root, directory)
    layout = load_layout(directory)
    path = write_log(layout, "hsa-1", 25)
    assert path == layout.node_dir("hsa-1") / "data" / "audit.log"

    result = audit_verify(directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "published heads: the coordinator is not running; no peer copies on disk; head files (1)",
        "hsa-1: 25 records, 3 checkpoints, ok; reaches its published head at record 25 "
        "(from: head file)",
        "hsa-2: no audit log (never started)",
        "hsa-3: no audit log (never started)",
    ]

    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"seq":17,' in line and '"type"' not in line)
    lines[index] = lines[index].replace("demo-app", "intruder")
    path.write_text("".join(line + "\n" for line in lines))

    result = audit_verify(directory)
    assert result.returncode == 1
    assert "hsa-1: record 17 was edited: its hash does not match its content" in result.stdout
    assert "hsa-2: no audit log (never started)" in result.stdout

    result = audit_verify(directory, "--json")
    assert result.returncode == 1
    reports = {r["host_id"]: r for r in json.loads(result.stdout)}
    assert reports["hsa-1"]["ok"] is False
    assert reports["hsa-1"]["first_bad_seq"] == 17
    assert reports["hsa-2"] == {
        "host_id": "hsa-2",
        "path": str(audit_log_path(layout, "hsa-2")),
        "ok": True,
        "status": "no audit log",
        "message": "no audit log (never started)",
        "published_seq": None,
        "published_sources": [],
        "notes": [],
    }


def test_nodes_added_later_are_checked(domain: DomainLayout, tmp_path: Path) -> None:
    directory = tmp_path / "domain"
    shutil.copytree(domain.root, directory)
    add_node(directory)  # hsa-4: not in the genesis state, key from its host.json
    layout = load_layout(directory)
    write_log(layout, "hsa-4", 3)
    write_log(layout, "hsa-2", 12)

    result = audit_verify(directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1:] == [
        "hsa-1: no audit log (never started)",
        "hsa-2: 12 records, 2 checkpoints, ok; reaches its published head at record 12 "
        "(from: head file)",
        "hsa-3: no audit log (never started)",
        "hsa-4: 3 records, 1 checkpoints, ok; reaches its published head at record 3 "
        "(from: head file)",
    ]


def test_a_log_signed_by_another_host_fails(domain: DomainLayout, tmp_path: Path) -> None:
    directory = tmp_path / "domain"
    shutil.copytree(domain.root, directory)
    layout = load_layout(directory)
    source = write_log(layout, "hsa-2", 5)
    # hsa-2's log placed where hsa-3's belongs: wrong host, wrong key.
    shutil.copy(source, audit_log_path(layout, "hsa-3"))

    result = audit_verify(directory)
    assert result.returncode == 1
    assert "hsa-2: 5 records, 1 checkpoints, ok" in result.stdout
    assert "hsa-3: record 1 names host 'hsa-2', not 'hsa-3'" in result.stdout
    # (hsa-2's head file stays with hsa-2: it names its host, so it is no head of hsa-3's.)


def test_a_replaced_host_identity_is_noticed(domain: DomainLayout, tmp_path: Path) -> None:
    directory = tmp_path / "domain"
    shutil.copytree(domain.root, directory)
    layout = load_layout(directory)
    write_log(layout, "hsa-1", 2)
    # An intruder who rewrites the log with their own key must also swap host.json; the
    # genesis state pinned in domain.json still names the real key.
    identity_dir = layout.node_dir("hsa-1") / "identity"
    shutil.rmtree(identity_dir)
    save_host_identity(HostIdentity.generate("hsa-1"), identity_dir)

    result = audit_verify(directory)
    assert result.returncode == 1
    assert "hsa-1: cannot verify:" in result.stdout
    assert "genesis state" in result.stdout


def test_usage_and_missing_domain(tmp_path: Path) -> None:
    result = subprocess.run(
        [hsm_domain(), "audit", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "verify" in result.stdout
    result = audit_verify(tmp_path / "nothing")
    assert result.returncode == 1
    assert "holds no local domain" in result.stderr


def records_of(path: Path) -> list[dict[str, object]]:
    values = [json.loads(line) for line in path.read_text().splitlines()]
    return [v for v in values if "type" not in v]


def test_running_nodes_audit_the_calls_they_serve(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    layout = cluster.layout
    addresses = cluster.node_addresses()
    plaintext = b"the secret recipe: 4 parts gin, 1 part vermouth"
    context = {"order": "42", "tenant": "acme"}

    with mtls_channel(addresses["hsa-1"], cluster.client_tls(), ANY_HSA) as channel:
        stub = services_pb2_grpc.KeyServiceStub(channel)
        key_id = stub.CreateKey(
            services_pb2.CreateKeyRequest(description="audit test"), timeout=30
        ).metadata.key_id
    with mtls_channel(addresses["hsa-2"], cluster.client_tls(), ANY_HSA) as channel:
        stub = services_pb2_grpc.KeyServiceStub(channel)
        blobs = [
            stub.Encrypt(
                services_pb2.EncryptRequest(
                    key_id=key_id, plaintext=plaintext, encryption_context=context
                ),
                timeout=30,
            ).ciphertext_blob
            for _ in range(3)
        ]
    with mtls_channel(addresses["hsa-3"], cluster.client_tls(), ANY_HSA) as channel:
        stub = services_pb2_grpc.KeyServiceStub(channel)
        opened = stub.Decrypt(
            services_pb2.DecryptRequest(ciphertext_blob=blobs[0], encryption_context=context),
            timeout=30,
        )
        assert opened.plaintext == plaintext

    def calls(host: str, operation: str) -> list[dict[str, object]]:
        path = audit_log_path(layout, host)
        if not path.exists():
            return []
        return [r for r in records_of(path) if r["operation"] == operation]

    # Records are written before the response is sent, so they are there already.
    assert [r["key_id"] for r in calls("hsa-1", "CreateKey")] == [key_id]
    encrypts = calls("hsa-2", "Encrypt")
    assert len(encrypts) == 3
    for record in encrypts:
        assert record["principal"] == "spiffe://local/client/demo-app"
        assert (record["key_id"], record["context"], record["result"]) == (key_id, context, "ok")
    assert calls("hsa-1", "Encrypt") == calls("hsa-3", "Encrypt") == []
    assert len(calls("hsa-3", "Decrypt")) == 1
    for host in ("hsa-1", "hsa-2", "hsa-3"):
        data = audit_log_path(layout, host).read_bytes()
        assert plaintext not in data
        assert b"secret recipe" not in data

    result = audit_verify(layout.root)  # while the nodes run: unsigned tails are fine
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.splitlines()) == 4  # the sources of heads, then one per log

    # A clean stop writes a final checkpoint: nothing left unsigned.
    assert cluster.stop_node("hsa-3") == 0
    result = audit_verify(layout.root, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    hsa_3 = next(r for r in json.loads(result.stdout) if r["host_id"] == "hsa-3")
    assert hsa_3["ok"] is True
    assert hsa_3["unsigned_tail"] == 0
    assert hsa_3["checkpoints"] >= 1

    # An edit while hsa-2 keeps running: the edited record is named.
    path = audit_log_path(layout, "hsa-2")
    edited_seq = int(str(encrypts[1]["seq"]))
    lines = path.read_text().splitlines()
    index = next(
        i
        for i, line in enumerate(lines)
        if '"type"' not in line and json.loads(line)["seq"] == edited_seq
    )
    lines[index] = lines[index].replace('"tenant":"acme"', '"tenant":"other"')
    path.write_text("".join(line + "\n" for line in lines))

    result = audit_verify(layout.root)
    assert result.returncode == 1
    assert (
        f"hsa-2: record {edited_seq} was edited: its hash does not match its content"
        in result.stdout
    )
    assert sum(", ok" in line for line in result.stdout.splitlines()) == 2, result.stdout
