"""Who may call the coordinator's HSA-only calls, attacked with real certificates.

An attacker who obtains a certificate from the domain CA for an HSA name (a name that is not
in the domain state, or the name of an existing host with the attacker's own key), or who
keeps a removed host's real certificate, tries what the coordinator's HSA-only calls offer:
read every key record, overwrite one with junk, delete one, register under an existing
host's name (so that proposals and pushes go to the attacker), and follow the chain. Every
attempt is PERMISSION_DENIED naming the caller and why, and the store is unchanged; the
hosts of the domain keep working, and a host being added may register and follow the chain
but reads no key records until it is a host.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_core import pki
from domain_core.model import SealedState
from domain_edge.ca_files import load_domain_ca
from domain_edge.kms_client import KeyClient
from domain_edge.transport import COORDINATOR, TlsMaterial, mtls_channel
from domain_proto import domain_pb2, keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

DEADLINE = 5.0


def real_tls(cluster: LocalCluster, host: str) -> TlsMaterial:
    """The TLS identity a node of the domain was given (its own key and certificate)."""
    identity = cluster.layout.node_dir(host) / "identity"
    return TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )


def ca_issued_tls(cluster: LocalCluster, host: str) -> TlsMaterial:
    """What an attacker with the domain CA's key (DIR/ca/ca.key) issues itself for `host`."""
    ca = load_domain_ca(cluster.layout.root / "ca")
    key_pem = pki.new_tls_key_pem()
    cert_pem = ca.issue(
        pki.SpiffeId("local", "hsa", host), pki.tls_public_key(key_pem), now=datetime.now(UTC)
    )
    return TlsMaterial(ca_pem=cluster.ca_pem(), cert_pem=cert_pem, key_pem=key_pem)


def coordinator_as(cluster: LocalCluster, tls: TlsMaterial) -> tuple[grpc.Channel, Any]:
    channel = mtls_channel(cluster.coordinator_address, tls, COORDINATOR)
    return channel, services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]


def refusal(call: Callable[[], object]) -> str:
    """The details of the PERMISSION_DENIED the call must end with."""
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
    return str(refused.value.details())


def apply(cluster: LocalCluster, changes: list[domain_pb2.Change], approvers: list[str]) -> int:
    with cluster.coordinator_client() as client:
        view = client.propose(changes, cluster.operator_signer(approvers[0]), reason="test")
        for name in approvers[1:]:
            view = client.approve(view.proposal_id, cluster.operator_signer(name))
    assert view.applied, view.detail
    return view.applied_version


def all_at(cluster: LocalCluster, hosts: list[str], version: int) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [cluster.node_status(h) for h in hosts]
        return all(s.version == version and s.healthy for s in statuses)

    return check


def store_view(member: Any) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Every key record (as stored, with its revision) and every registration, as a host of
    the domain reads them."""
    listed = member.ListKeyRecords(services_pb2.ListKeyRecordsRequest(limit=100), timeout=DEADLINE)
    hsas = member.ListHsas(services_pb2.ListHsasRequest(), timeout=DEADLINE)
    return (
        [r.SerializeToString(deterministic=True) for r in listed.records],
        sorted((h.host_id, h.address) for h in hsas.hsas),
    )


def attack(stub: Any, key_id: str, record: keys_pb2.KeyRecord, registered_as: str) -> list[str]:
    """Every HSA-only call an attacker would try; the refusal of each."""
    junk = keys_pb2.KeyRecord()
    junk.CopyFrom(record)
    junk.ClearField("revision")
    for token in junk.tokens:
        token.ciphertext = os.urandom(len(token.ciphertext))
    attempts: list[Callable[[], object]] = [
        lambda: stub.GetKey(services_pb2.GetKeyRequest(key_id=key_id), timeout=DEADLINE),
        lambda: stub.ListKeyRecords(services_pb2.ListKeyRecordsRequest(), timeout=DEADLINE),
        lambda: stub.PutKey(
            services_pb2.PutKeyRequest(record=junk, expected_revision=record.revision),
            timeout=DEADLINE,
        ),
        lambda: stub.DeleteKeyRecord(
            services_pb2.DeleteKeyRecordRequest(key_id=key_id, expected_revision=record.revision),
            timeout=DEADLINE,
        ),
        lambda: stub.RegisterHsa(
            services_pb2.RegisterHsaRequest(host_id=registered_as, address="127.0.0.1:9"),
            timeout=DEADLINE,
        ),
        lambda: next(
            iter(stub.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=3))
        ),
    ]
    return [refusal(call) for call in attempts]


def test_a_stranger_a_forged_host_and_a_removed_host_get_nothing(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    with KeyClient.from_cluster(cluster.directory) as app:
        key = app.create_key(description="attacked")
        blob = app.encrypt(key.key_id, b"customer data")
    member_channel, member = coordinator_as(cluster, real_tls(cluster, "hsa-1"))
    with member_channel:
        record = member.GetKey(services_pb2.GetKeyRequest(key_id=key.key_id), timeout=DEADLINE)

        # hsa-3 is removed; it keeps its real certificate and key.
        removed_at = apply(
            cluster,
            [domain_pb2.Change(remove_host=domain_pb2.RemoveHost(host_id="hsa-3"))],
            ["alice", "bob"],
        )
        cluster.wait_for(all_at(cluster, ["hsa-1", "hsa-2"], removed_at), what="the removal")
        # The removal rotated the domain key; the HSAs' background re-wrap then legitimately
        # seals and signs the record again. Wait for it, so that only an attacker could change
        # the store from here on.
        generation = cluster.node_status("hsa-1").domain_key_generation
        cluster.wait_for(
            lambda: all(
                token.domain_key_generation == generation
                for r in member.ListKeyRecords(
                    services_pb2.ListKeyRecordsRequest(limit=100), timeout=DEADLINE
                ).records
                for token in r.tokens
            ),
            what="the re-wrap of the key records",
        )
        before = store_view(member)
        current = member.GetKey(services_pb2.GetKeyRequest(key_id=key.key_id), timeout=DEADLINE)

        attackers = {
            # A name that is not in the state, certified by the domain CA.
            "stranger": (ca_issued_tls(cluster, "hsa-9"), "hsa-9", "hsa-1"),
            # An existing host's name with the attacker's own key, certified by the domain CA.
            "forged hsa-1": (ca_issued_tls(cluster, "hsa-1"), "hsa-1", "hsa-1"),
            # The removed host with its real certificate.
            "removed hsa-3": (real_tls(cluster, "hsa-3"), "hsa-3", "hsa-3"),
        }
        for who, (tls, name, registered_as) in attackers.items():
            channel, stub = coordinator_as(cluster, tls)
            with channel:
                refusals = attack(stub, key.key_id, record, registered_as)
            uri = f"spiffe://local/hsa/{name}"
            for details in refusals:
                assert details.startswith(uri), (who, details)
            if who == "forged hsa-1":
                assert all(
                    f"presents a TLS certificate (fingerprint "
                    f"{pki.certificate_fingerprint(tls.cert_pem).hex()[:16]}) that is not the one "
                    f"version {removed_at} lists for host hsa-1" in d
                    for d in refusals
                ), refusals
            else:
                assert all(
                    f"is not a host of the domain at version {removed_at} (removed, or never "
                    "added) and no pending proposal adds it" in d
                    for d in refusals
                ), refusals

        # Nothing in the store changed: no record read back differently, none overwritten or
        # deleted, no registration moved.
        assert store_view(member) == before
        # Another host, and the key service through every remaining host, work as before.
        other_channel, other = coordinator_as(cluster, real_tls(cluster, "hsa-2"))
        with other_channel:
            again = other.GetKey(services_pb2.GetKeyRequest(key_id=key.key_id), timeout=DEADLINE)
        assert again.SerializeToString(deterministic=True) == current.SerializeToString(
            deterministic=True
        )
    with KeyClient.from_cluster(cluster.directory) as app:
        assert app.decrypt(blob) == b"customer data"
    coordinator_log = cluster.layout.log_file("coordinator").read_text()
    assert "refused: spiffe://local/hsa/hsa-9 is not a host of the domain" in coordinator_log
    # The removed host's own WatchStates stream ended once it had the state removing it.
    assert (
        "coordinator stream: PERMISSION_DENIED: spiffe://local/hsa/hsa-3 is not a host of the "
        f"domain at version {removed_at}" in cluster.layout.log_file("hsa-3").read_text()
    )


def test_a_host_being_added_follows_the_chain_but_reads_no_key_records_until_it_is_a_host(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    with KeyClient.from_cluster(cluster.directory) as app:
        key = app.create_key(description="before hsa-4")
    host = cluster.add_node("hsa-4", start=True)
    joining_channel, joining = coordinator_as(cluster, real_tls(cluster, "hsa-4"))
    forged_channel, forged = coordinator_as(cluster, ca_issued_tls(cluster, "hsa-4"))
    register = services_pb2.RegisterHsaRequest(host_id="hsa-4", address="127.0.0.1:9")
    with joining_channel, forged_channel:
        # Before any proposal names it, hsa-4 is a stranger.
        details = refusal(lambda: joining.RegisterHsa(register, timeout=DEADLINE))
        assert "no pending proposal adds it" in details

        with cluster.coordinator_client() as client:
            proposed = client.propose(
                [domain_pb2.Change(add_host=domain_pb2.AddHost(enrollment=host.raw))],
                cluster.operator_signer("alice"),
                reason="hsa-4 joins",
            )
        assert proposed.state == "pending"

        # Named by a pending add-host with its certificate: the node registers by itself and
        # may follow the chain ...
        def registered() -> bool:
            with cluster.coordinator_client() as client:
                return any(h.host_id == "hsa-4" for h in client.list_hsas())

        cluster.wait_for(registered, timeout=15, what="hsa-4 registers while being added")
        stream = joining.WatchStates(services_pb2.WatchStatesRequest(after_version=0), timeout=5)
        assert SealedState.from_message(next(iter(stream))).version == 1
        stream.cancel()
        # ... but reads and writes no key records.
        for call in (
            lambda: joining.GetKey(services_pb2.GetKeyRequest(key_id=key.key_id), timeout=5),
            lambda: joining.ListKeyRecords(services_pb2.ListKeyRecordsRequest(), timeout=5),
            lambda: joining.PutKey(services_pb2.PutKeyRequest(), timeout=5),
        ):
            details = refusal(call)
            assert details.startswith(
                f"spiffe://local/hsa/hsa-4 is being added (pending proposal "
                f"{proposed.proposal_id.hex()[:16]}...) but is not a host of the domain at "
                "version 1 yet"
            ), details
        # Another certificate for the name being added is not the one the proposal names.
        details = refusal(lambda: forged.RegisterHsa(register, timeout=DEADLINE))
        assert "not the one the pending proposal adding hsa-4 names" in details

        with cluster.coordinator_client() as client:
            view = client.approve(proposed.proposal_id, cluster.operator_signer("bob"))
        assert view.applied, view.detail
        everyone = ["hsa-1", "hsa-2", "hsa-3", "hsa-4"]
        cluster.wait_for(all_at(cluster, everyone, 2), timeout=20, what="hsa-4 joins")
        # A host now: its key records calls work, and it serves the key made before it came.
        got = joining.GetKey(services_pb2.GetKeyRequest(key_id=key.key_id), timeout=DEADLINE)
        assert got.revision >= 1
        details = refusal(lambda: forged.RegisterHsa(register, timeout=DEADLINE))
        assert "that is not the one version 2 lists for host hsa-4" in details
    with KeyClient(
        [cluster.address("hsa-4")],
        ca_pem=cluster.ca_pem(),
        cert_pem=cluster.layout.client_cert.read_bytes(),
        key_pem=cluster.layout.client_key.read_bytes(),
    ) as on_hsa_4:
        blob = on_hsa_4.encrypt(key.key_id, b"after the join")
        assert on_hsa_4.decrypt(blob) == b"after the join"
