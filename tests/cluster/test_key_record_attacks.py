"""Key records against a removed host and against changes that would strand them (real
processes: `support.cluster.LocalCluster`, a coordinator and three HSAs on 127.0.0.1).

Issue 13, item 1: after remove-host, the removed host still holds the older domain-key
generations (the manifest keeps them). As that host (its identity files are in the domain
directory) an attacker forges a new metadata version of a key (its own backing key, a grant to
itself), seals it under a generation it holds, signs it with its host key, and writes it
straight into the coordinator's SQLite store (a hostile store), and also tries PutKey with its
own certificate. No remaining HSA accepts it; the keys created through the removed host before
its removal keep working on the others (they were signed again before the removal applied).

Issue 13, item 5: one proposal `[set-settings retained=1, rotate-domain-key]` is refused, and
rotations that outrun re-wrap wait for the records to move: no record becomes unreadable.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_core import crypto, keytokens, policy, sealing
from domain_core.changes import remove_host, rotate_domain_key, set_settings
from domain_core.errors import HsmDomainError
from domain_core.identity import HostIdentity
from domain_core.model import SealedState
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.identity_files import load_host_identity
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.cluster

HOSTS = ("hsa-1", "hsa-2", "hsa-3")
DEADLINE = 5.0
CACHE_TTL_SECONDS = 2.0  # hsa_node.keycache.DEFAULT_TTL_SECONDS
ALL_OPERATIONS = list(policy.ALL_OPERATIONS)


@pytest.fixture
def cluster(local_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster(nodes=3, operators=3, quorum=2)


# --- helpers -------------------------------------------------------------------------------


class Client:
    """KeyService calls as one client identity, on any HSA."""

    def __init__(self, cluster: LocalCluster, tls: TlsMaterial, uri: str) -> None:
        self.cluster, self.tls, self.uri = cluster, tls, uri
        self._channels: dict[str, grpc.Channel] = {}

    def on(self, host: str) -> Any:
        if host not in self._channels:
            self._channels[host] = transport.mtls_channel(
                self.cluster.address(host), self.tls, transport.hsa_host(host)
            )
        return services_pb2_grpc.KeyServiceStub(self._channels[host])  # type: ignore[no-untyped-call]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def create(self, host: str) -> str:
        response = self.on(host).CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE)
        return str(response.metadata.key_id)

    def encrypt(self, host: str, key_id: str, plaintext: bytes) -> bytes:
        response = self.on(host).Encrypt(
            services_pb2.EncryptRequest(key_id=key_id, plaintext=plaintext), timeout=DEADLINE
        )
        return bytes(response.ciphertext_blob)

    def decrypt(self, host: str, blob: bytes) -> bytes:
        response = self.on(host).Decrypt(
            services_pb2.DecryptRequest(ciphertext_blob=blob), timeout=DEADLINE
        )
        return bytes(response.plaintext)

    def describe(self, host: str, key_id: str) -> keys_pb2.KeyMetadata:
        response = self.on(host).DescribeKey(
            services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE
        )
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata


def app_client(cluster: LocalCluster) -> Client:
    return Client(
        cluster, cluster.client_tls(), f"spiffe://{cluster.layout.domain_id}/client/demo-app"
    )


def issue_client(cluster: LocalCluster, name: str) -> Client:
    """A client certificate for `spiffe://<domain>/client/<name>` from the domain CA."""
    layout = cluster.layout
    ca = load_domain_ca(layout.root / "ca")
    key_pem = new_tls_key_pem()
    spiffe = SpiffeId(layout.domain_id, "client", name)
    cert_pem = ca.issue(spiffe, tls_public_key(key_pem), now=datetime.now(UTC))
    tls = TlsMaterial(ca_pem=layout.ca_cert.read_bytes(), cert_pem=cert_pem, key_pem=key_pem)
    return Client(cluster, tls, spiffe.uri)


def host_tls(cluster: LocalCluster, host: str) -> TlsMaterial:
    identity = cluster.layout.node_dir(host) / "identity"
    return TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )


def coordinator_db(cluster: LocalCluster) -> Path:
    return cluster.layout.root / "coordinator" / "coordinator.db"


def stored_records(cluster: LocalCluster) -> dict[str, keys_pb2.KeyRecord]:
    """Every live record in the coordinator's SQLite store, read as anyone with the file can."""
    with sqlite3.connect(coordinator_db(cluster)) as db:
        rows = db.execute("SELECT key_id, record FROM keys WHERE deleted_at = 0").fetchall()
    db.close()
    return {str(k): keys_pb2.KeyRecord.FromString(bytes(r)) for k, r in rows}


def write_into_store(cluster: LocalCluster, key_id: str, record: keys_pb2.KeyRecord) -> None:
    """A hostile store: replace (or add) a record behind the coordinator's back."""
    raw = record.SerializeToString(deterministic=True)
    with sqlite3.connect(coordinator_db(cluster), timeout=10) as db:
        updated = db.execute(
            "UPDATE keys SET record = ?, revision = revision + 1 WHERE key_id = ?", (raw, key_id)
        ).rowcount
        if not updated:
            db.execute(
                "INSERT INTO keys (key_id, record, revision) VALUES (?, ?, 1)", (key_id, raw)
            )
    db.close()


def apply(cluster: LocalCluster, changes: list[Any], approvers: tuple[str, ...]) -> Any:
    """Propose as the first approver, approve with the rest; the final view. The approval
    that makes the quorum waits for the apply (an HSA producing the state), which takes
    longer than the client's default 5 s deadline on a loaded machine."""
    with cluster.coordinator_client(timeout=30.0) as client:
        view = client.propose(changes, cluster.operator_signer(approvers[0]), reason="test")
        for name in approvers[1:]:
            view = client.approve(view.proposal_id, cluster.operator_signer(name))
    return view


def wait_converged(cluster: LocalCluster, hosts: tuple[str, ...], version: int) -> None:
    def converged() -> bool:
        statuses = [cluster.node_status(h) for h in hosts]
        return all(s.version == version and s.healthy for s in statuses)

    cluster.wait_for(converged, timeout=20, what=f"{', '.join(hosts)} at version {version}")


def refused(call: Callable[[], object], *codes: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() in codes, (info.value.code(), info.value.details())
    return info.value


def eventually(
    check: Callable[[], object], what: str, timeout: float = 4 * CACHE_TTL_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, grpc.RpcError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}") from None
        time.sleep(0.1)


def removed_host_keys(cluster: LocalCluster, host: str) -> tuple[HostIdentity, dict[int, bytes]]:
    """What a removed host keeps: its identity and the domain keys of its last state."""
    identity = load_host_identity(cluster.layout.node_dir(host) / "identity")
    states = sorted((cluster.layout.node_dir(host) / "data" / "states").glob("*.state"))
    last = SealedState.from_bytes(states[-1].read_bytes())
    return identity, sealing.unseal_state(last, host, identity.agreement_private_key)


def forge(
    record: keys_pb2.KeyRecord,
    domain_keys: dict[int, bytes],
    signer: keytokens.RecordSigner,
    grant_to: str,
) -> tuple[keys_pb2.KeyRecord, bytes]:
    """A new metadata version of the record's key: the forger's own backing key as a new
    current version, a grant to `grant_to`, sealed under a generation the forger holds."""
    metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
    metadata.metadata_version += 1
    metadata.current_backing_version = 1
    metadata.policy.grants.add(principals=[grant_to], operations=ALL_OPERATIONS)
    own_key = crypto.new_aes_key()
    generation = max(domain_keys)
    forged = keytokens.seal_record(
        metadata, {1: own_key}, domain_keys[generation], generation, signer=signer
    )
    return forged, own_key


# --- item 1: a removed host ----------------------------------------------------------------


def test_a_removed_host_cannot_forge_key_records_and_its_keys_keep_working(
    cluster: LocalCluster,
) -> None:
    app, mallory = app_client(cluster), issue_client(cluster, "mallory")
    try:
        # Keys created through hsa-3 (so signed by hsa-3), in use on every HSA.
        keys = [app.create("hsa-3") for _ in range(4)]
        blobs = {k: app.encrypt("hsa-3", k, k.encode()) for k in keys}
        for key_id in keys:
            assert app.decrypt("hsa-1", blobs[key_id]) == key_id.encode()
        assert {stored_records(cluster)[k].signer_host_id for k in keys} == {"hsa-3"}

        view = apply(cluster, [remove_host("hsa-3")], ("alice", "bob"))
        assert view.applied, view.detail
        remaining = ("hsa-1", "hsa-2")
        wait_converged(cluster, remaining, view.applied_version)
        cluster.wait_for(
            lambda: not cluster.node_status("hsa-3").member, what="hsa-3 to stop following"
        )

        # Its records were signed again by a remaining host before the removal applied...
        records = stored_records(cluster)
        assert {records[k].signer_host_id for k in keys} <= set(remaining)
        # ...so the keys it created keep working on the others, old and new ciphertexts.
        for host in remaining:
            for key_id in keys:
                assert app.decrypt(host, blobs[key_id]) == key_id.encode()
                assert app.decrypt(host, app.encrypt(host, key_id, b"after")) == b"after"

        # As hsa-3: its host key, and the domain key generations it still holds.
        identity, domain_keys = removed_host_keys(cluster, "hsa-3")
        with cluster.coordinator_client() as client:
            head = client.latest_state().manifest.message
        held = {g.generation for g in head.key_generations}
        assert set(domain_keys) <= held, "the attack needs a generation the domain still holds"
        as_third = keytokens.RecordSigner(cluster.layout.domain_id, "hsa-3", identity.signer)
        target = keys[0]
        forged, _ = forge(records[target], domain_keys, as_third, mallory.uri)
        # The tokens alone would pass: they open under a generation the domain keeps.
        keytokens.verify_key_record(forged, domain_keys, target)

        # 1. Straight into the coordinator's store.
        write_into_store(cluster, target, forged)
        for host in remaining:
            eventually(
                lambda host=host: refused(
                    lambda: app.encrypt(host, target, b"x"), grpc.StatusCode.FAILED_PRECONDITION
                ),
                f"{host} to re-read and refuse the forged record",
            )
            refused(
                lambda host=host: mallory.decrypt(host, blobs[target]),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            refused(
                lambda host=host: app.describe(host, target), grpc.StatusCode.FAILED_PRECONDITION
            )
            log = cluster.layout.log_file(host).read_text()
            assert f"the stored record of key {target} does not verify" in log
            assert "signed by hsa-3, which the domain removed" in log
        # A brand-new key it makes up, and the same forgery in another host's name.
        invented = str(uuid.uuid4())
        made_up = keys_pb2.KeyMetadata.FromString(records[target].metadata)
        made_up.key_id, made_up.metadata_version = invented, 1
        del made_up.policy.grants[:]
        made_up.policy.grants.add(principals=[mallory.uri], operations=ALL_OPERATIONS)
        generation = max(domain_keys)
        new_record = keytokens.seal_record(
            made_up, {1: crypto.new_aes_key()}, domain_keys[generation], generation, signer=as_third
        )
        write_into_store(cluster, invented, new_record)
        refused(
            lambda: mallory.encrypt("hsa-1", invented, b"x"), grpc.StatusCode.FAILED_PRECONDITION
        )
        in_their_name = keys_pb2.KeyRecord()
        in_their_name.CopyFrom(forged)
        keytokens.RecordSigner(cluster.layout.domain_id, "hsa-1", identity.signer).sign(
            in_their_name
        )
        write_into_store(cluster, target, in_their_name)
        eventually(
            lambda: refused(
                lambda: mallory.decrypt("hsa-2", blobs[target]), grpc.StatusCode.FAILED_PRECONDITION
            ),
            "hsa-2 to refuse the record signed in hsa-1's name",
        )
        assert (
            "signature by host hsa-1 does not verify"
            in cluster.layout.log_file("hsa-2").read_text()
        )

        # 2. Through the coordinator, with hsa-3's own certificate: refused there too.
        with transport.mtls_channel(
            cluster.coordinator_address, host_tls(cluster, "hsa-3"), transport.COORDINATOR
        ) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            current = stub_revision(cluster, target)
            for record in (forged, in_their_name):
                error = refused(
                    lambda record=record: stub.PutKey(
                        services_pb2.PutKeyRequest(record=record, expected_revision=current),
                        timeout=DEADLINE,
                    ),
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                assert "hsa-3" in (error.details() or "")

        # The honest record back: the key works again, and never for mallory.
        write_into_store(cluster, target, records[target])
        for host in remaining:
            eventually(
                lambda host=host: app.decrypt(host, blobs[target]) == target.encode() or None,
                f"{host} to accept the honest record again",
            )
            refused(
                lambda host=host: mallory.decrypt(host, blobs[target]),
                grpc.StatusCode.PERMISSION_DENIED,
            )
    finally:
        app.close()
        mallory.close()


def stub_revision(cluster: LocalCluster, key_id: str) -> int:
    with sqlite3.connect(coordinator_db(cluster)) as db:
        row = db.execute("SELECT revision FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    db.close()
    return int(row[0])


# --- item 5: generations dropped while records need them ---------------------------------------


def generations_in_use(cluster: LocalCluster) -> dict[int, int]:
    counts: dict[int, int] = {}
    for record in stored_records(cluster).values():
        for generation in {t.domain_key_generation for t in record.tokens}:
            counts[generation] = counts.get(generation, 0) + 1
    return counts


def test_one_proposal_that_keeps_one_generation_and_rotates_is_refused(
    cluster: LocalCluster,
) -> None:
    app = app_client(cluster)
    try:
        keys = [app.create(HOSTS[i % 3]) for i in range(6)]
        blobs = {k: app.encrypt("hsa-1", k, k.encode()) for k in keys}
        with cluster.coordinator_client() as client:
            settings = client.latest_state().manifest.message.settings
            changes = [set_settings(base=settings, key_generations_retained=1), rotate_domain_key()]
            with pytest.raises(HsmDomainError, match="key generations retained must be 2"):
                client.propose(changes, cluster.operator_signer("alice"))
            assert client.latest_state().version == 1
        for host in HOSTS:
            for key_id in keys:
                assert app.decrypt(host, blobs[key_id]) == key_id.encode()
    finally:
        app.close()


def put_signed_records(cluster: LocalCluster, host: str, count: int) -> list[str]:
    """`count` records of real keys, sealed and signed as `host` (a member) and stored through
    PutKey with its certificate, 16 at a time (faster than CreateKey's per-principal quota)."""
    identity = load_host_identity(cluster.layout.node_dir(host) / "identity")
    with cluster.coordinator_client() as client:
        head = client.latest_state()
    domain_keys = sealing.unseal_state(head, host, identity.agreement_private_key)
    generation = head.manifest.current_generation
    signer = keytokens.RecordSigner(cluster.layout.domain_id, host, identity.signer)
    creator = f"spiffe://{cluster.layout.domain_id}/client/demo-app"
    channel = transport.mtls_channel(
        cluster.coordinator_address, host_tls(cluster, host), transport.COORDINATOR
    )
    stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]

    def put(index: int) -> str:
        key_id = str(uuid.uuid4())
        metadata = keys_pb2.KeyMetadata(
            key_id=key_id,
            description=f"rewrap race {index}",
            state=keys_pb2.KEY_STATE_ENABLED,
            created_at=int(time.time()),
            policy=policy.default_policy(creator),
            rotation=keys_pb2.RotationSettings(period_days=365),
            current_backing_version=1,
            creator=creator,
            metadata_version=1,
            domain_id=cluster.layout.domain_id,
        )
        record = keytokens.seal_record(
            metadata, {1: crypto.new_aes_key()}, domain_keys[generation], generation, signer=signer
        )
        stub.PutKey(services_pb2.PutKeyRequest(record=record), timeout=DEADLINE)
        return key_id

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(put, range(count)))
    finally:
        channel.close()


def test_rotations_that_outrun_rewrap_wait_for_the_records(cluster: LocalCluster) -> None:
    app = app_client(cluster)
    try:
        with cluster.coordinator_client() as client:
            settings = client.latest_state().manifest.message.settings
        view = apply(
            cluster, [set_settings(base=settings, key_generations_retained=2)], ("alice", "bob")
        )
        assert view.applied, view.detail
        wait_converged(cluster, HOSTS, view.applied_version)
        keys = [app.create(HOSTS[i % 3]) for i in range(6)]
        blobs = {k: app.encrypt(HOSTS[i % 3], k, k.encode()) for i, k in enumerate(keys)}
        others = put_signed_records(cluster, "hsa-1", 400)
        assert generations_in_use(cluster) == {1: len(keys) + len(others)}

        # Two rotations back to back: the second would retire generation 1 (two are kept)
        # before the HSAs' background re-wrap has moved 400 records off it.
        first = apply(cluster, [rotate_domain_key()], ("alice", "bob"))
        assert first.applied, first.detail
        second = apply(cluster, [rotate_domain_key()], ("bob", "carol"))
        deadline = time.monotonic() + 60
        with cluster.coordinator_client() as client:
            while second.state == "pending" and time.monotonic() < deadline:
                time.sleep(0.5)  # deferred: the coordinator retries once the records moved
                second = client.get_proposal(second.proposal_id)
        assert second.applied, second.detail
        wait_converged(cluster, HOSTS, second.applied_version)

        # Nothing is left under the retired generation, and every key opens everywhere.
        in_use = generations_in_use(cluster)
        assert 1 not in in_use, in_use
        assert sum(in_use.values()) >= len(keys) + len(others)
        for host in HOSTS:
            for key_id in keys:
                assert app.decrypt(host, blobs[key_id]) == key_id.encode()
            for key_id in others[::40]:
                assert app.decrypt(host, app.encrypt(host, key_id, b"x")) == b"x"
    finally:
        app.close()
