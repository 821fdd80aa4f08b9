"""A revoked grant or a disabled key never comes back, on any HSA (issue 13, item 4).

Real processes: a coordinator and three HSAs (`LocalCluster`). An application ("victim") is
granted a key and uses it on every HSA; then, through hsa-1, its grant is revoked from one key
and another key is disabled. The attack is a hostile coordinator store: the records from
before the change (genuine, sealed by an HSA, saved from the coordinator's SQLite file) are
written back into it. The HSAs that read the key remember the newer metadata version (their
floor); the attack aims at the ones that do not:

- a host added afterwards by quorum (hsa-4), which never saw the key;
- hsa-2 with its `key_versions.db` wiped, restarted while every other HSA is down.

Neither may serve the victim: hsa-4 takes the floors of its peers before its key service
serves; the wiped hsa-2 waits (UNAVAILABLE) until a peer is back, then takes its floors; both
then refuse the rolled-back records as the HSAs that saw the change do.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_core.changes import add_host
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

GENESIS = ("hsa-1", "hsa-2", "hsa-3")
DEADLINE = 5.0
ROLLED_BACK = "older record of key"
ALL_OPERATIONS = [
    keys_pb2.KEY_OPERATION_ENCRYPT,
    keys_pb2.KEY_OPERATION_DECRYPT,
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
    keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY,
    keys_pb2.KEY_OPERATION_DESCRIBE,
    keys_pb2.KEY_OPERATION_ADMIN,
]


class Caller:
    """KeyService stubs on every HSA, as one client identity (channels follow restarts)."""

    def __init__(self, cluster: LocalCluster, tls: TlsMaterial) -> None:
        self.cluster = cluster
        self.tls = tls
        self.channels: dict[str, grpc.Channel] = {}

    def on(self, host: str) -> Any:
        address = self.cluster.address(host)
        if address not in self.channels:
            self.channels[address] = transport.mtls_channel(
                address, self.tls, transport.hsa_host(host)
            )
        return services_pb2_grpc.KeyServiceStub(self.channels[address])  # type: ignore[no-untyped-call]

    def encrypt(self, host: str, key_id: str) -> bytes:
        request = services_pb2.EncryptRequest(key_id=key_id, plaintext=b"payroll")
        return bytes(self.on(host).Encrypt(request, timeout=DEADLINE).ciphertext_blob)

    def decrypt(self, host: str, blob: bytes) -> bytes:
        request = services_pb2.DecryptRequest(ciphertext_blob=blob)
        return bytes(self.on(host).Decrypt(request, timeout=DEADLINE).plaintext)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def issue_client(cluster: LocalCluster, name: str) -> tuple[TlsMaterial, str]:
    ca = load_domain_ca(cluster.layout.root / "ca")
    key_pem = new_tls_key_pem()
    spiffe = SpiffeId(cluster.layout.domain_id, "client", name)
    cert_pem = ca.issue(spiffe, tls_public_key(key_pem), now=datetime.now(UTC))
    return TlsMaterial(ca_pem=cluster.ca_pem(), cert_pem=cert_pem, key_pem=key_pem), spiffe.uri


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def store_records(cluster: LocalCluster) -> dict[str, bytes]:
    """The record bytes in the coordinator's SQLite store, by key id."""
    db = sqlite3.connect(cluster.layout.root / "coordinator" / "coordinator.db", timeout=10)
    try:
        return {str(k): bytes(r) for k, r in db.execute("SELECT key_id, record FROM keys")}
    finally:
        db.close()


def put_back(cluster: LocalCluster, records: dict[str, bytes]) -> None:
    """The hostile store: older genuine records in place of the current ones."""
    db = sqlite3.connect(cluster.layout.root / "coordinator" / "coordinator.db", timeout=10)
    try:
        with db:
            for key_id, record in records.items():
                db.execute(
                    "UPDATE keys SET record = ?, revision = revision + 1 WHERE key_id = ?",
                    (record, key_id),
                )
    finally:
        db.close()


def wipe_floors(cluster: LocalCluster, host: str) -> None:
    data = cluster.layout.node_dir(host) / "data"
    for name in ("key_versions.db", "key_versions.db-wal", "key_versions.db-shm"):
        (data / name).unlink(missing_ok=True)
    assert not (data / "key_versions.db").exists()


@dataclass
class Attack:
    """The domain after the change and the rollback of the store: who calls, which keys."""

    cluster: LocalCluster
    admin: Caller
    victim: Caller
    revoked_key: str
    disabled_key: str
    blobs: dict[str, bytes]

    @property
    def keys(self) -> tuple[str, str]:
        return self.revoked_key, self.disabled_key

    def assert_refused_as_rolled_back(self, host: str) -> None:
        """The victim gets nothing from either key on `host`: the record is refused."""
        for key_id in self.keys:
            for call in (
                lambda: self.victim.encrypt(host, key_id),  # noqa: B023
                lambda: self.victim.decrypt(host, self.blobs[key_id]),  # noqa: B023
            ):
                error = refused(call)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
                assert ROLLED_BACK in (error.details() or "")


@pytest.fixture
def attack(local_cluster: Callable[..., LocalCluster]) -> Iterator[Attack]:
    """A 3-HSA domain where, through hsa-1, the victim lost its grant on one key and another
    key was disabled, and whose store then serves both keys' records from before that."""
    cluster = local_cluster(nodes=3, operators=3, quorum=2)
    admin_uri = f"spiffe://{cluster.layout.domain_id}/client/demo-app"
    victim_tls, victim_uri = issue_client(cluster, "victim")
    admin, victim = Caller(cluster, cluster.client_tls()), Caller(cluster, victim_tls)
    try:
        granted = keys_pb2.KeyPolicy(
            grants=[
                keys_pb2.PolicyGrant(principals=[admin_uri], operations=ALL_OPERATIONS),
                keys_pb2.PolicyGrant(
                    principals=[victim_uri],
                    operations=[keys_pb2.KEY_OPERATION_ENCRYPT, keys_pb2.KEY_OPERATION_DECRYPT],
                ),
            ]
        )
        create = services_pb2.CreateKeyRequest(policy=granted)
        revoked_key = admin.on("hsa-1").CreateKey(create, timeout=DEADLINE).metadata.key_id
        disabled_key = admin.on("hsa-1").CreateKey(create, timeout=DEADLINE).metadata.key_id
        blobs = {}
        for host in GENESIS:
            for key_id in (revoked_key, disabled_key):
                blobs[key_id] = victim.encrypt(host, key_id)
                assert victim.decrypt(host, blobs[key_id]) == b"payroll"
        before = store_records(cluster)

        # The change, through hsa-1: the victim loses its grant on one key, the other is off.
        admin_only = keys_pb2.KeyPolicy(grants=[granted.grants[0]])
        admin.on("hsa-1").PutKeyPolicy(
            services_pb2.PutKeyPolicyRequest(key_id=revoked_key, policy=admin_only),
            timeout=DEADLINE,
        )
        admin.on("hsa-1").DisableKey(
            services_pb2.KeyIdRequest(key_id=disabled_key), timeout=DEADLINE
        )
        error = refused(lambda: victim.encrypt("hsa-1", revoked_key))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED

        # The attack: the store serves the genuine records from before the change again.
        put_back(cluster, {k: before[k] for k in (revoked_key, disabled_key)})
        assert store_records(cluster)[revoked_key] == before[revoked_key]
        yield Attack(cluster, admin, victim, revoked_key, disabled_key, blobs)
    finally:
        admin.close()
        victim.close()


def test_a_host_added_after_the_change_does_not_serve_the_older_record(attack: Attack) -> None:
    cluster = attack.cluster
    host = cluster.add_node("hsa-4", start=True)
    with cluster.coordinator_client() as client:
        view = client.propose([add_host(host.raw)], cluster.operator_signer("alice"), reason="grow")
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    cluster.wait_converged(hosts=(*GENESIS, "hsa-4"))
    attack.assert_refused_as_rolled_back("hsa-4")
    # It never read the key: it knows the newer version from a peer (pushed, or exchanged).
    assert "key service ready: took every key floor change of" in (
        cluster.layout.log_file("hsa-4").read_text()
    )


def test_a_wiped_hsa_waits_for_a_peer_then_refuses_the_older_record(attack: Attack) -> None:
    """hsa-2 loses its floors and restarts while every other HSA is down: it cannot learn
    what it forgot, so its key service serves nobody until a peer is back."""
    cluster = attack.cluster
    cluster.stop_node("hsa-2")
    wipe_floors(cluster, "hsa-2")
    for other in ("hsa-1", "hsa-3"):
        cluster.stop_node(other)
    cluster.start_node("hsa-2", wait_for_health=False)  # it cannot serve keys: no peer is up
    cluster.wait_for(lambda: cluster.node_status("hsa-2").healthy, what="hsa-2 to be up")
    for caller in (attack.victim, attack.admin):
        for key_id in attack.keys:
            error = refused(lambda: caller.encrypt("hsa-2", key_id))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert "not serving keys yet" in (error.details() or "")
            assert transport.nothing_applied(error)  # refused before anything was done
    status = cluster.node_status("hsa-2")
    assert status.healthy
    assert status.key_service_waiting
    assert "key service waiting for key metadata floors from a peer" in status.detail

    # One peer back: hsa-2 takes its floors, then refuses the rolled-back records.
    cluster.start_node("hsa-3", wait_for_health=True)
    cluster.wait_for(
        lambda: not cluster.node_status("hsa-2").key_service_waiting,
        what="hsa-2 to take hsa-3's floors",
    )
    attack.assert_refused_as_rolled_back("hsa-2")
    log = cluster.layout.log_file("hsa-2").read_text()
    assert "key service ready: took every key floor change of hsa-3" in log


def test_two_hsas_without_floors_do_not_vouch_for_each_other(attack: Attack) -> None:
    """hsa-2 is wiped and restarted while hsa-1 and hsa-3 are down, and hsa-4 is added
    meanwhile (hsa-2 seals the state). Each can reach the other, but neither has a complete
    floor table: neither serves until a peer that has one is back."""
    cluster = attack.cluster
    for host in ("hsa-1", "hsa-3", "hsa-2"):
        cluster.stop_node(host)
    wipe_floors(cluster, "hsa-2")
    cluster.start_node("hsa-2", wait_for_health=False)
    cluster.wait_for(lambda: cluster.node_status("hsa-2").healthy, what="hsa-2 to be up")
    host = cluster.add_node("hsa-4", start=True)
    with cluster.coordinator_client() as client:
        view = client.propose([add_host(host.raw)], cluster.operator_signer("alice"), reason="grow")
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    cluster.wait_for(
        lambda: cluster.node_status("hsa-4").member and cluster.node_status("hsa-4").healthy,
        what="hsa-4 to become a member",
    )
    # They found each other (each answered the other's signed question) and had time to
    # exchange their floors.
    for here, there in (("hsa-2", "hsa-4"), ("hsa-4", "hsa-2")):
        cluster.wait_for(
            lambda here=here, there=there: (  # type: ignore[misc]
                f"peer {there} answers at" in cluster.layout.log_file(here).read_text()
            ),
            what=f"{here} to hear from {there}",
        )
    time.sleep(1.0)
    for host_id in ("hsa-2", "hsa-4"):
        for key_id in attack.keys:
            error = refused(lambda: attack.victim.encrypt(host_id, key_id))  # noqa: B023
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        status = cluster.node_status(host_id)
        assert status.key_service_waiting
        other = "hsa-4" if host_id == "hsa-2" else "hsa-2"
        assert (
            f"{other} is at version {view.applied_version} (its key floors are not complete)"
            in (status.detail)
        )

    # A host with a complete table is back: both take its floors and refuse the old records.
    cluster.start_node("hsa-3", wait_for_health=True)
    for host_id in ("hsa-2", "hsa-4"):
        cluster.wait_for(
            lambda host_id=host_id: not cluster.node_status(host_id).key_service_waiting,  # type: ignore[misc]
            what=f"{host_id} to take hsa-3's floors",
        )
        attack.assert_refused_as_rolled_back(host_id)
