"""The KeyService of real HSA processes with a real coordinator, called over mutual TLS.

One local domain (`LocalCluster`: a coordinator and three HSAs as processes) serves every test
of this module; each test makes its own keys, and a test that stops a process or edits the
coordinator's database restores it before it ends. Callers are the demo application
(`spiffe://local/client/demo-app`) and a second client, bob, whose certificate the test issues
with the domain CA.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cluster import LocalCluster

from domain_core import changes, ciphertext, crypto
from domain_core.limits import DEFAULT_LIMITS
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

T = TypeVar("T")
HOSTS = ("hsa-1", "hsa-2", "hsa-3")
DEADLINE = 5.0
# A key made without a policy: its creator may do every operation there is.
ALL_OPERATIONS = sorted(number for number in keys_pb2.KeyOperation.values() if number)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
# The key id inside a blob: magic (4), version (1), length (1), then 36 ASCII characters.
KEY_ID_BITS = range(6 * 8, 42 * 8)


class Principal:
    """KeyService stubs for one client identity, one reused channel per node."""

    def __init__(self, cluster: LocalCluster, tls: TlsMaterial, uri: str) -> None:
        self.cluster = cluster
        self.tls = tls
        self.uri = uri
        self._channels: dict[str, grpc.Channel] = {}

    def on(self, host: str) -> Any:
        if host not in self._channels:
            self._channels[host] = transport.mtls_channel(
                self.cluster.address(host), self.tls, transport.hsa_host(host)
            )
        return services_pb2_grpc.KeyServiceStub(self._channels[host])

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalCluster]:
    failed_before = request.session.testsfailed
    domain = LocalCluster(tmp_path_factory.mktemp("keyservice") / "domain", nodes=3)
    domain.start()
    try:
        yield domain
    finally:
        domain.close(dump_logs=request.session.testsfailed > failed_before)


@pytest.fixture(scope="module")
def app(cluster: LocalCluster) -> Iterator[Principal]:
    principal = Principal(cluster, cluster.client_tls(), "spiffe://local/client/demo-app")
    yield principal
    principal.close()


def issue_client(cluster: LocalCluster, name: str) -> TlsMaterial:
    """A client certificate for `spiffe://local/client/<name>` from the domain CA."""
    ca = load_domain_ca(cluster.layout.root / "ca")
    key_pem = new_tls_key_pem()
    cert_pem = ca.issue(
        SpiffeId("local", "client", name), tls_public_key(key_pem), now=datetime.now(UTC)
    )
    return TlsMaterial(ca_pem=cluster.ca_pem(), cert_pem=cert_pem, key_pem=key_pem)


@pytest.fixture(scope="module")
def bob(cluster: LocalCluster) -> Iterator[Principal]:
    principal = Principal(cluster, issue_client(cluster, "bob"), "spiffe://local/client/bob")
    yield principal
    principal.close()


# --- helpers -------------------------------------------------------------------------------


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_fails(
    call: Callable[[], object], code: grpc.StatusCode, *fragments: str
) -> grpc.RpcError:
    error = failure(call)
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()
    return error


def eventually(check: Callable[[], T], timeout: float = 8.0, what: str = "") -> T:
    """Retry `check` (exceptions and falsy results count as "not yet") until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (grpc.RpcError, AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
        else:
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.1)


def create(who: Principal, host: str = "hsa-1", **fields: Any) -> keys_pb2.KeyMetadata:
    response = who.on(host).CreateKey(services_pb2.CreateKeyRequest(**fields), timeout=DEADLINE)
    metadata: keys_pb2.KeyMetadata = response.metadata
    return metadata


def encrypt(
    who: Principal, host: str, key_id: str, plaintext: bytes, context: dict[str, str] | None = None
) -> services_pb2.EncryptResponse:
    response: services_pb2.EncryptResponse = who.on(host).Encrypt(
        services_pb2.EncryptRequest(
            key_id=key_id, plaintext=plaintext, encryption_context=context or {}
        ),
        timeout=DEADLINE,
    )
    return response


def decrypt(
    who: Principal, host: str, blob: bytes, context: dict[str, str] | None = None, key_id: str = ""
) -> bytes:
    response = who.on(host).Decrypt(
        services_pb2.DecryptRequest(
            ciphertext_blob=blob, encryption_context=context or {}, key_id=key_id
        ),
        timeout=DEADLINE,
    )
    assert response.key_id == ciphertext.parse_header(blob).key_id
    plaintext: bytes = response.plaintext
    return plaintext


def describe(who: Principal, host: str, key_id: str) -> keys_pb2.KeyMetadata:
    response = who.on(host).DescribeKey(services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE)
    metadata: keys_pb2.KeyMetadata = response.metadata
    return metadata


def admin(who: Principal, host: str, method: str, key_id: str) -> keys_pb2.KeyMetadata:
    response = getattr(who.on(host), method)(
        services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE
    )
    metadata: keys_pb2.KeyMetadata = response.metadata
    return metadata


def grant(*grants: tuple[list[str], list[int]]) -> keys_pb2.KeyPolicy:
    return keys_pb2.KeyPolicy(
        grants=[
            keys_pb2.PolicyGrant(principals=principals, operations=operations)  # type: ignore[arg-type]
            for principals, operations in grants
        ]
    )


def audit_records(cluster: LocalCluster, host: str) -> list[dict[str, Any]]:
    path = cluster.layout.node_dir(host) / "data" / "audit.log"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if "type" not in r]


def coordinator_db(cluster: LocalCluster) -> Path:
    return cluster.layout.coordinator_config.parent / "coordinator.db"


def stored_record(cluster: LocalCluster, key_id: str) -> keys_pb2.KeyRecord:
    with sqlite3.connect(coordinator_db(cluster)) as db:
        row = db.execute("SELECT record FROM keys WHERE key_id = ?", (key_id,)).fetchone()
    assert row is not None
    return keys_pb2.KeyRecord.FromString(bytes(row[0]))


def write_record(cluster: LocalCluster, key_id: str, record: keys_pb2.KeyRecord) -> None:
    """Edit the running coordinator's database behind its back (a compromised coordinator)."""
    with sqlite3.connect(coordinator_db(cluster), timeout=10) as db:
        db.execute(
            "UPDATE keys SET record = ?, revision = revision + 1 WHERE key_id = ?",
            (record.SerializeToString(deterministic=True), key_id),
        )


def restart(cluster: LocalCluster, host: str) -> None:
    assert cluster.stop_node(host) == 0
    cluster.start_node(host)


# --- the data plane across nodes -----------------------------------------------------------


def test_a_key_made_on_one_node_works_on_every_node(cluster: LocalCluster, app: Principal) -> None:
    before = time.time()
    key = create(app, "hsa-1", description="orders")
    assert ciphertext.validate_key_id(key.key_id) == key.key_id
    assert key.state == keys_pb2.KEY_STATE_ENABLED
    assert (key.current_backing_version, key.metadata_version) == (1, 1)
    assert (key.creator, key.domain_id, key.description) == (app.uri, "local", "orders")
    assert before - 1 <= key.created_at <= time.time() + 1
    assert not key.rotation.enabled
    assert key.rotation.period_days == 365
    assert list(key.policy.grants[0].principals) == [app.uri]
    assert sorted(key.policy.grants[0].operations) == ALL_OPERATIONS

    context = {"tenant": "acme", "purpose": "orders"}
    sealed = encrypt(app, "hsa-1", key.key_id, b"attack at dawn", context)
    assert (sealed.key_id, sealed.backing_version) == (key.key_id, 1)
    header = ciphertext.parse_header(sealed.ciphertext_blob)
    assert (header.key_id, header.backing_version) == (key.key_id, 1)
    for host in ("hsa-2", "hsa-3"):
        # The order of the context does not matter; its content does.
        assert decrypt(app, host, sealed.ciphertext_blob, dict(reversed(context.items()))) == (
            b"attack at dawn"
        )
        assert decrypt(app, host, sealed.ciphertext_blob, context, key_id=key.key_id)
        assert_fails(
            lambda h=host: decrypt(app, h, sealed.ciphertext_blob, {"tenant": "acme"}),
            INVALID,
            "invalid ciphertext",
        )
        assert describe(app, host, key.key_id) == key
    # And the other way round, with an empty plaintext and no context.
    empty = encrypt(app, "hsa-3", key.key_id, b"")
    assert decrypt(app, "hsa-1", empty.ciphertext_blob) == b""

    # Data keys for envelope encryption: the copy decrypts on another node to the same key.
    generated = app.on("hsa-2").GenerateDataKey(
        services_pb2.GenerateDataKeyRequest(key_id=key.key_id, encryption_context=context),
        timeout=DEADLINE,
    )
    assert len(generated.plaintext) == 32
    assert generated.key_id == key.key_id
    assert decrypt(app, "hsa-3", generated.ciphertext_blob, context) == generated.plaintext
    without = app.on("hsa-1").GenerateDataKeyWithoutPlaintext(
        services_pb2.GenerateDataKeyRequest(key_id=key.key_id, number_of_bytes=64),
        timeout=DEADLINE,
    )
    assert without.plaintext == b""
    assert len(decrypt(app, "hsa-2", without.ciphertext_blob)) == 64

    randoms = {
        app.on(host)
        .GenerateRandom(services_pb2.GenerateRandomRequest(number_of_bytes=1024), timeout=DEADLINE)
        .random
        for host in HOSTS
    }
    assert len(randoms) == 3
    assert {len(r) for r in randoms} == {1024}

    # Every call was audited where it ran, with the context and never the plaintext.
    records = audit_records(cluster, "hsa-1")
    mine = [r for r in records if r["key_id"] == key.key_id]
    assert [r["operation"] for r in mine][:2] == ["CreateKey", "Encrypt"]
    assert mine[1]["context"] == context
    assert mine[1]["principal"] == app.uri
    assert mine[1]["result"] == "ok"
    log_text = (cluster.layout.node_dir("hsa-2") / "data" / "audit.log").read_text()
    assert "attack at dawn" not in log_text
    assert generated.plaintext.hex() not in log_text
    failed = [r for r in audit_records(cluster, "hsa-2") if r["result"] != "ok"]
    assert any(r["operation"] == "Decrypt" and r["result"] == "INVALID_ARGUMENT" for r in failed)


def test_reencrypt_moves_a_ciphertext_between_keys_and_contexts(
    app: Principal, bob: Principal
) -> None:
    source = create(app, "hsa-1")
    destination = create(app, "hsa-2")
    sealed = encrypt(app, "hsa-3", source.key_id, b"payload", {"a": "1"})
    moved = app.on("hsa-2").ReEncrypt(
        services_pb2.ReEncryptRequest(
            ciphertext_blob=sealed.ciphertext_blob,
            source_encryption_context={"a": "1"},
            destination_key_id=destination.key_id,
            destination_encryption_context={"b": "2"},
        ),
        timeout=DEADLINE,
    )
    assert (moved.source_key_id, moved.key_id) == (source.key_id, destination.key_id)
    assert ciphertext.parse_header(moved.ciphertext_blob).key_id == destination.key_id
    assert decrypt(app, "hsa-1", moved.ciphertext_blob, {"b": "2"}) == b"payload"
    assert_fails(
        lambda: decrypt(app, "hsa-1", moved.ciphertext_blob, {"a": "1"}),
        INVALID,
        "invalid ciphertext",
    )
    # Within one key, to another context.
    same = app.on("hsa-1").ReEncrypt(
        services_pb2.ReEncryptRequest(
            ciphertext_blob=sealed.ciphertext_blob,
            source_encryption_context={"a": "1"},
            destination_key_id=source.key_id,
        ),
        timeout=DEADLINE,
    )
    assert decrypt(app, "hsa-3", same.ciphertext_blob) == b"payload"
    # A wrong source context is an invalid ciphertext, as for Decrypt.
    assert_fails(
        lambda: app.on("hsa-1").ReEncrypt(
            services_pb2.ReEncryptRequest(
                ciphertext_blob=sealed.ciphertext_blob, destination_key_id=destination.key_id
            ),
            timeout=DEADLINE,
        ),
        INVALID,
        "invalid ciphertext",
    )

    # ReEncrypt needs RE_ENCRYPT_FROM on the source and RE_ENCRYPT_TO on the destination:
    # decrypt and encrypt permissions are not enough.
    ops = keys_pb2
    from_key = create(
        app,
        "hsa-1",
        policy=grant(
            ([app.uri], [ops.KEY_OPERATION_ADMIN]),
            ([bob.uri], [ops.KEY_OPERATION_ENCRYPT, ops.KEY_OPERATION_DECRYPT]),
        ),
    )
    to_key = create(
        app,
        "hsa-1",
        policy=grant(
            ([app.uri], [ops.KEY_OPERATION_ADMIN, ops.KEY_OPERATION_DECRYPT]),
            ([bob.uri], [ops.KEY_OPERATION_ENCRYPT, ops.KEY_OPERATION_RE_ENCRYPT_TO]),
        ),
    )
    blob = encrypt(bob, "hsa-1", from_key.key_id, b"x").ciphertext_blob

    def reencrypt(destination: str) -> Any:
        return bob.on("hsa-1").ReEncrypt(
            services_pb2.ReEncryptRequest(ciphertext_blob=blob, destination_key_id=destination),
            timeout=DEADLINE,
        )

    denied = grpc.StatusCode.PERMISSION_DENIED
    assert_fails(lambda: reencrypt(to_key.key_id), denied, "may not re-encrypt from")
    app.on("hsa-1").PutKeyPolicy(
        services_pb2.PutKeyPolicyRequest(
            key_id=from_key.key_id,
            policy=grant(
                ([app.uri], [ops.KEY_OPERATION_ADMIN]),
                ([bob.uri], [ops.KEY_OPERATION_ENCRYPT, ops.KEY_OPERATION_RE_ENCRYPT_FROM]),
            ),
        ),
        timeout=DEADLINE,
    )
    assert_fails(lambda: reencrypt(from_key.key_id), denied, "may not re-encrypt to")
    moved_blob = reencrypt(to_key.key_id).ciphertext_blob
    assert decrypt(app, "hsa-1", moved_blob) == b"x"
    assert_fails(lambda: decrypt(bob, "hsa-1", moved_blob), denied, "may not decrypt")


def test_rotation_keeps_old_ciphertexts_and_new_ones_use_the_new_version(app: Principal) -> None:
    key = create(app, "hsa-1")
    old = encrypt(app, "hsa-2", key.key_id, b"before", {"v": "1"})
    assert old.backing_version == 1
    rotated = admin(app, "hsa-3", "RotateKey", key.key_id)
    assert rotated.current_backing_version == 2
    assert rotated.metadata_version == 2
    # The node that rotated uses version 2 at once; the others within their cache's TTL.
    assert encrypt(app, "hsa-3", key.key_id, b"after").backing_version == 2
    for host in HOSTS:
        new = eventually(
            lambda h=host: (r := encrypt(app, h, key.key_id, b"after")).backing_version == 2 and r,
            what=f"{host} to use backing version 2",
        )
        assert ciphertext.parse_header(new.ciphertext_blob).backing_version == 2
        assert decrypt(app, host, new.ciphertext_blob) == b"after"
        assert decrypt(app, host, old.ciphertext_blob, {"v": "1"}) == b"before"
    admin(app, "hsa-1", "RotateKey", key.key_id)
    assert describe(app, "hsa-1", key.key_id).current_backing_version == 3
    assert decrypt(app, "hsa-1", old.ciphertext_blob, {"v": "1"}) == b"before"
    # A blob naming a backing version the key does not have is just an invalid ciphertext.
    forged = bytearray(old.ciphertext_blob)
    forged[42:46] = (7).to_bytes(4, "big")
    assert_fails(lambda: decrypt(app, "hsa-1", bytes(forged)), INVALID, "invalid ciphertext")


# --- policies, states and errors -----------------------------------------------------------


def test_policies_decide_who_may_do_what_and_denials_are_audited(
    cluster: LocalCluster, app: Principal, bob: Principal
) -> None:
    key = create(app, "hsa-1", description="app only")
    blob = encrypt(app, "hsa-1", key.key_id, b"secret").ciphertext_blob
    calls: list[Callable[[], object]] = [
        lambda: encrypt(bob, "hsa-2", key.key_id, b"x"),
        lambda: decrypt(bob, "hsa-2", blob),
        lambda: describe(bob, "hsa-2", key.key_id),
        lambda: admin(bob, "hsa-2", "RotateKey", key.key_id),
        lambda: admin(bob, "hsa-2", "DisableKey", key.key_id),
        lambda: bob.on("hsa-2").GenerateDataKey(
            services_pb2.GenerateDataKeyRequest(key_id=key.key_id), timeout=DEADLINE
        ),
    ]
    for call in calls:
        error = assert_fails(call, grpc.StatusCode.PERMISSION_DENIED, bob.uri, key.key_id)
        assert "secret" not in (error.details() or "")
    denied = [
        r
        for r in audit_records(cluster, "hsa-2")
        if r["principal"] == bob.uri and r["key_id"] == key.key_id
    ]
    assert [r["operation"] for r in denied] == [
        "Encrypt",
        "Decrypt",
        "DescribeKey",
        "RotateKey",
        "DisableKey",
        "GenerateDataKey",
    ]
    assert {r["result"] for r in denied} == {"PERMISSION_DENIED"}
    assert "PermissionDeniedError" in denied[0]["detail"]

    # The admin grants bob encrypt/decrypt/describe; bob still may not administer the key.
    ops = keys_pb2
    bob_ops = [ops.KEY_OPERATION_ENCRYPT, ops.KEY_OPERATION_DECRYPT, ops.KEY_OPERATION_DESCRIBE]
    changed = (
        app.on("hsa-1")
        .PutKeyPolicy(
            services_pb2.PutKeyPolicyRequest(
                key_id=key.key_id, policy=grant(([app.uri], ALL_OPERATIONS), ([bob.uri], bob_ops))
            ),
            timeout=DEADLINE,
        )
        .metadata
    )
    assert changed.metadata_version == 2
    assert decrypt(bob, "hsa-1", blob) == b"secret"
    eventually(lambda: decrypt(bob, "hsa-2", blob) == b"secret", what="hsa-2 to see the policy")
    assert_fails(
        lambda: admin(bob, "hsa-2", "RotateKey", key.key_id),
        grpc.StatusCode.PERMISSION_DENIED,
        "may not administer",
    )
    # ListKeys shows bob only the keys he may describe, each verified: not the app's own key.
    app_only = create(app, "hsa-3")
    listed: list[str] = []
    token = ""
    while True:
        page = bob.on("hsa-3").ListKeys(
            services_pb2.ListKeysRequest(limit=2, page_token=token), timeout=DEADLINE
        )
        listed += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert key.key_id in listed
    assert app_only.key_id not in listed
    assert all(
        any(
            bob.uri in g.principals and ops.KEY_OPERATION_DESCRIBE in g.operations
            for g in describe(app, "hsa-3", k).policy.grants
        )
        for k in listed
    )
    app_listed = app.on("hsa-3").ListKeys(
        services_pb2.ListKeysRequest(limit=1000), timeout=DEADLINE
    )
    assert app_only.key_id in {k.key_id for k in app_listed.keys}
    assert len(app_listed.keys) > len(listed)

    # Policies are validated: a principal of another domain, a policy without ADMIN.
    for bad, fragment in [
        (grant((["spiffe://other/client/x"], ALL_OPERATIONS)), "not a client of this domain"),
        (grant(([app.uri], [ops.KEY_OPERATION_ENCRYPT])), "KEY_OPERATION_ADMIN"),
        (keys_pb2.KeyPolicy(), "policy is empty"),
    ]:
        assert_fails(
            lambda p=bad: app.on("hsa-1").PutKeyPolicy(
                services_pb2.PutKeyPolicyRequest(key_id=key.key_id, policy=p), timeout=DEADLINE
            ),
            INVALID,
            fragment,
        )
    assert_fails(
        lambda: create(app, policy=grant((["spiffe://other/client/x"], ALL_OPERATIONS))),
        INVALID,
        "not a client of this domain",
    )


def test_only_client_identities_may_call_the_key_service(
    cluster: LocalCluster, app: Principal
) -> None:
    key = create(app)
    host_tls = TlsMaterial.from_files(
        cluster.layout.ca_cert,
        cluster.layout.node_dir("hsa-1") / "identity" / "tls.crt",
        cluster.layout.node_dir("hsa-1") / "identity" / "tls.key",
    )
    as_host = Principal(cluster, host_tls, "spiffe://local/hsa/hsa-1")
    try:
        assert_fails(
            lambda: describe(as_host, "hsa-2", key.key_id),
            grpc.StatusCode.PERMISSION_DENIED,
            "spiffe://local/hsa/hsa-1 may not call this",
        )
    finally:
        as_host.close()


def test_disabled_and_pending_deletion_keys_refuse_use(app: Principal) -> None:
    key = create(app, "hsa-1")
    blob = encrypt(app, "hsa-1", key.key_id, b"data").ciphertext_blob
    disabled = admin(app, "hsa-1", "DisableKey", key.key_id)
    assert disabled.state == keys_pb2.KEY_STATE_DISABLED
    assert admin(app, "hsa-1", "DisableKey", key.key_id) == disabled  # no change, no write
    for call in [
        lambda: encrypt(app, "hsa-1", key.key_id, b"x"),
        lambda: decrypt(app, "hsa-1", blob),
        lambda: admin(app, "hsa-1", "RotateKey", key.key_id),
    ]:
        assert_fails(call, grpc.StatusCode.FAILED_PRECONDITION, f"key {key.key_id} is disabled")
    eventually(
        lambda: assert_fails(
            lambda: encrypt(app, "hsa-3", key.key_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION
        ),
        what="hsa-3 to see the key disabled",
    )
    assert admin(app, "hsa-2", "EnableKey", key.key_id).state == keys_pb2.KEY_STATE_ENABLED
    assert decrypt(app, "hsa-2", blob) == b"data"

    def schedule(days: int) -> keys_pb2.KeyMetadata:
        response = app.on("hsa-2").ScheduleKeyDeletion(
            services_pb2.ScheduleKeyDeletionRequest(key_id=key.key_id, pending_window_days=days),
            timeout=DEADLINE,
        )
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata

    assert_fails(lambda: schedule(6), INVALID, "between 7 and 30")
    assert_fails(lambda: schedule(31), INVALID, "between 7 and 30")
    before = int(time.time())
    pending = schedule(7)
    assert pending.state == keys_pb2.KEY_STATE_PENDING_DELETION
    assert before + 7 * 86400 <= pending.deletion_at <= int(time.time()) + 7 * 86400
    date = datetime.fromtimestamp(pending.deletion_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    expected = f"key {key.key_id} is pending deletion (deletion on {date})"
    for call in [
        lambda: encrypt(app, "hsa-2", key.key_id, b"x"),
        lambda: decrypt(app, "hsa-2", blob),
        lambda: admin(app, "hsa-2", "EnableKey", key.key_id),
        lambda: schedule(30),
    ]:
        assert_fails(call, grpc.StatusCode.FAILED_PRECONDITION, expected)
    assert describe(app, "hsa-2", key.key_id).state == keys_pb2.KEY_STATE_PENDING_DELETION
    cancelled = admin(app, "hsa-1", "CancelKeyDeletion", key.key_id)
    assert (cancelled.state, cancelled.deletion_at) == (keys_pb2.KEY_STATE_DISABLED, 0)
    assert_fails(
        lambda: admin(app, "hsa-1", "CancelKeyDeletion", key.key_id),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is not pending deletion",
    )
    admin(app, "hsa-1", "EnableKey", key.key_id)
    assert decrypt(app, "hsa-1", blob) == b"data"
    # Default window: 30 days.
    default = app.on("hsa-1").ScheduleKeyDeletion(
        services_pb2.ScheduleKeyDeletionRequest(key_id=key.key_id), timeout=DEADLINE
    )
    assert default.metadata.deletion_at >= before + 30 * 86400
    assert describe(app, "hsa-1", key.key_id).metadata_version == default.metadata.metadata_version


def test_bad_requests_get_one_clear_status(app: Principal) -> None:
    key = create(app, "hsa-1")
    unknown = ciphertext.new_key_id()
    stub = app.on("hsa-2")
    assert_fails(
        lambda: describe(app, "hsa-2", unknown),
        grpc.StatusCode.NOT_FOUND,
        f"key {unknown} does not exist",
    )
    assert_fails(lambda: encrypt(app, "hsa-2", unknown, b"x"), grpc.StatusCode.NOT_FOUND)
    assert_fails(lambda: admin(app, "hsa-2", "RotateKey", unknown), grpc.StatusCode.NOT_FOUND)
    # A well-formed blob naming a key this domain does not hold: the key is not found.
    foreign_key_blob = ciphertext.encrypt(crypto.new_aes_key(), unknown, 1, b"x", {})
    assert_fails(
        lambda: decrypt(app, "hsa-2", foreign_key_blob),
        grpc.StatusCode.NOT_FOUND,
        f"key {unknown} does not exist",
    )
    assert_fails(lambda: describe(app, "hsa-2", "not-a-key"), INVALID, "invalid key id")
    assert_fails(lambda: encrypt(app, "hsa-2", key.key_id.upper(), b"x"), INVALID)

    assert_fails(
        lambda: encrypt(app, "hsa-2", key.key_id, b"x" * 4097),
        INVALID,
        "plaintext is 4097 bytes; the limit is 4096",
    )
    assert len(encrypt(app, "hsa-2", key.key_id, b"x" * 4096).ciphertext_blob) == 4096 + 106
    assert_fails(
        lambda: encrypt(app, "hsa-2", key.key_id, b"x", {str(i): "v" for i in range(65)}),
        INVALID,
        "encryption context has 65 entries; the limit is 64",
    )
    assert_fails(
        lambda: encrypt(app, "hsa-2", key.key_id, b"x", {"k": "v" * 9000}),
        INVALID,
        "the limit is 8192",
    )
    assert_fails(lambda: encrypt(app, "hsa-2", key.key_id, b"x", {"k": ""}), INVALID, "empty")
    for count in (0, 1025):
        assert_fails(
            lambda n=count: stub.GenerateRandom(
                services_pb2.GenerateRandomRequest(number_of_bytes=n), timeout=DEADLINE
            ),
            INVALID,
            "between 1 and 1024",
        )
    assert_fails(
        lambda: stub.GenerateDataKey(
            services_pb2.GenerateDataKeyRequest(key_id=key.key_id, number_of_bytes=2000),
            timeout=DEADLINE,
        ),
        INVALID,
        "between 1 and 1024",
    )
    assert_fails(lambda: create(app, description="d" * 8193), INVALID, "the limit is 8192")
    assert_fails(
        lambda: create(app, enable_rotation=True, rotation_period_days=30),
        INVALID,
        "between 90 and 2560",
    )
    rotating = create(app, enable_rotation=True, rotation_period_days=90)
    assert rotating.rotation.enabled
    assert rotating.rotation.period_days == 90
    assert rotating.rotation.next_rotation_at == rotating.created_at + 90 * 86400
    assert_fails(
        lambda: stub.ListKeys(services_pb2.ListKeysRequest(limit=5000), timeout=DEADLINE),
        INVALID,
        "maximum of 1000",
    )
    assert_fails(
        lambda: stub.ListKeys(services_pb2.ListKeysRequest(page_token="x"), timeout=DEADLINE),
        INVALID,
        "page_token",
    )

    # Ciphertexts: tampered, truncated, foreign, empty, or under another key id than asked.
    blob = encrypt(app, "hsa-1", key.key_id, b"hello", {"c": "1"}).ciphertext_blob
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    forged = ciphertext.encrypt(crypto.new_aes_key(), key.key_id, 1, b"hello", {"c": "1"})
    for bad in (tampered, blob[:-1], blob[:60], forged, b"", b"HSMC", blob + b"\x00"):
        error = assert_fails(lambda b=bad: decrypt(app, "hsa-3", b, {"c": "1"}), INVALID)
        assert error.details() == "invalid ciphertext"
    other = create(app, "hsa-3")
    assert_fails(
        lambda: decrypt(app, "hsa-3", blob, {"c": "1"}, key_id=other.key_id),
        INVALID,
        f"made under key {key.key_id}, not under key {other.key_id}",
    )


def _policy_of_size(owner: str, target: int) -> keys_pb2.KeyPolicy:
    """`owner` may do everything; principals of 60-character names are added (64 to a grant)
    until the serialized policy reaches `target` bytes."""
    names = iter(range(10**6))
    policy = grant(([owner], ALL_OPERATIONS))
    while policy.ByteSize() < target:
        if len(policy.grants) == 1 or len(policy.grants[-1].principals) == 64:
            policy.grants.add().operations.append(keys_pb2.KEY_OPERATION_DESCRIBE)
        policy.grants[-1].principals.append(f"spiffe://local/client/{'p' * 50}{next(names):010d}")
    return policy


def test_a_policy_over_32_kib_is_refused_at_create_and_put_policy(
    cluster: LocalCluster, app: Principal
) -> None:
    """Issue 21 item 7: 64 grants of 64 principals (333 KB, within every count limit) were
    accepted, and each such key cost every HSA that used it 2.37 MB of memory."""
    limit = DEFAULT_LIMITS.max_policy_bytes
    maximal = _policy_of_size(app.uri, 330_000)
    assert len(maximal.grants) <= 64
    assert all(len(g.principals) <= 64 for g in maximal.grants)
    before = len(stored_keys(cluster))
    for host in ("hsa-1", "hsa-3"):
        assert_fails(
            lambda h=host: create(app, h, policy=maximal, description="d" * 8192),
            INVALID,
            f"key policy is {maximal.ByteSize()} bytes; the limit is {limit} bytes",
        )
    just_over = _policy_of_size(app.uri, limit + 1)
    assert_fails(lambda: create(app, "hsa-2", policy=just_over), INVALID, "the limit is 32768")
    assert len(stored_keys(cluster)) == before  # nothing was stored
    # A policy of the largest size allowed is taken.
    largest = keys_pb2.KeyPolicy()
    largest.CopyFrom(just_over)
    del largest.grants[-1].principals[-1]
    if not largest.grants[-1].principals:
        del largest.grants[-1]
    assert largest.ByteSize() <= limit
    key = create(app, "hsa-2", policy=largest)
    assert describe(app, "hsa-1", key.key_id).policy == largest
    # PutKeyPolicy cannot grow it past the limit either, on any node; the policy stays.
    for host in ("hsa-1", "hsa-2"):
        assert_fails(
            lambda h=host: app.on(h).PutKeyPolicy(
                services_pb2.PutKeyPolicyRequest(key_id=key.key_id, policy=maximal),
                timeout=DEADLINE,
            ),
            INVALID,
            f"the limit is {limit} bytes",
        )
    assert describe(app, "hsa-3", key.key_id).policy == largest


def stored_keys(cluster: LocalCluster) -> list[str]:
    with sqlite3.connect(coordinator_db(cluster)) as db:
        return [str(r[0]) for r in db.execute("SELECT key_id FROM keys")]


@pytest.fixture(scope="module")
def flip_target(app: Principal) -> tuple[bytes, dict[str, str]]:
    key = create(app, "hsa-2")
    context = {"purpose": "bit flips"}
    return encrypt(app, "hsa-2", key.key_id, b"sixteen byte msg", context).ciphertext_blob, context


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flipping_any_bit_of_a_ciphertext_makes_decrypt_fail(
    app: Principal, flip_target: tuple[bytes, dict[str, str]], data: st.DataObject
) -> None:
    blob, context = flip_target
    bit = data.draw(st.integers(0, len(blob) * 8 - 1), label="bit")
    flipped = bytearray(blob)
    flipped[bit // 8] ^= 1 << (bit % 8)
    error = failure(lambda: decrypt(app, "hsa-1", bytes(flipped), context))
    if error.code() == grpc.StatusCode.NOT_FOUND:
        # The flip turned the key id into another well-formed one, which no key has.
        assert bit in KEY_ID_BITS
        other = bytes(flipped[6:42]).decode("ascii")
        assert error.details() == f"key {other} does not exist"
    else:
        assert (error.code(), error.details()) == (INVALID, "invalid ciphertext")


# --- outages and a lying coordinator -------------------------------------------------------


def test_cached_keys_keep_working_while_the_coordinator_is_down(
    cluster: LocalCluster, app: Principal
) -> None:
    cached = create(app, "hsa-1")
    uncached = create(app, "hsa-1")  # never used on hsa-3
    blob = encrypt(app, "hsa-2", cached.key_id, b"still here").ciphertext_blob
    assert decrypt(app, "hsa-1", blob) == b"still here"
    assert cluster.stop_coordinator() == 0
    try:
        time.sleep(2.5)  # past the cache's TTL: the nodes try the coordinator and fail
        for _ in range(3):
            assert decrypt(app, "hsa-1", blob) == b"still here"
            again = encrypt(app, "hsa-2", cached.key_id, b"more")
            assert decrypt(app, "hsa-2", again.ciphertext_blob) == b"more"
            assert describe(app, "hsa-1", cached.key_id).key_id == cached.key_id
        refused = assert_fails(
            lambda: create(app, "hsa-1"),
            grpc.StatusCode.UNAVAILABLE,
            "the coordinator is unreachable; CreateKey needs it and created nothing: retry",
        )
        assert transport.nothing_applied(refused)  # a definite failure, marked on the wire
        assert_fails(
            lambda: encrypt(app, "hsa-3", uncached.key_id, b"x"),
            grpc.StatusCode.UNAVAILABLE,
            f"key {uncached.key_id} is not cached on this HSA and the coordinator is "
            "unreachable: retry on another HSA or later",
        )
        assert_fails(
            lambda: admin(app, "hsa-1", "RotateKey", cached.key_id),
            grpc.StatusCode.UNAVAILABLE,
            "RotateKey needs it",
        )
        assert_fails(
            lambda: app.on("hsa-1").ListKeys(services_pb2.ListKeysRequest(), timeout=DEADLINE),
            grpc.StatusCode.UNAVAILABLE,
            "ListKeys needs it",
        )
    finally:
        cluster.start_coordinator()
    eventually(lambda: create(app, "hsa-1"), what="CreateKey to work again")
    # hsa-3's own channel to the coordinator may still be in its reconnect backoff.
    reached = eventually(
        lambda: encrypt(app, "hsa-3", uncached.key_id, b"x"), what="hsa-3 to reach the key"
    )
    assert reached.backing_version == 1


def test_a_coordinator_that_edits_a_policy_or_swaps_tokens_is_caught(
    cluster: LocalCluster, app: Principal, bob: Principal
) -> None:
    edited, first, second = create(app, "hsa-1"), create(app, "hsa-1"), create(app, "hsa-1")
    blob = encrypt(app, "hsa-1", edited.key_id, b"mine").ciphertext_blob
    originals = {k.key_id: stored_record(cluster, k.key_id) for k in (edited, first, second)}
    try:
        # The coordinator widens a policy to let bob in (keeping the tokens).
        record = stored_record(cluster, edited.key_id)
        metadata = keys_pb2.KeyMetadata.FromString(record.metadata)
        metadata.policy.grants.add(principals=[bob.uri], operations=ALL_OPERATIONS)  # type: ignore[arg-type]
        record.metadata = metadata.SerializeToString(deterministic=True)
        write_record(cluster, edited.key_id, record)
        # ...and swaps the tokens of two keys (relabelled, so that they name their new key).
        one, two = stored_record(cluster, first.key_id), stored_record(cluster, second.key_id)
        one_tokens, two_tokens = list(one.tokens), list(two.tokens)
        for target, tokens, key_id in (
            (one, two_tokens, first.key_id),
            (two, one_tokens, second.key_id),
        ):
            del target.tokens[:]
            for token in tokens:
                target.tokens.add().CopyFrom(token)
                target.tokens[-1].key_id = key_id
        write_record(cluster, first.key_id, one)
        write_record(cluster, second.key_id, two)

        restart(cluster, "hsa-3")  # an empty cache: it must read the records again
        compromised = "does not verify; the coordinator may be compromised"
        assert_fails(
            lambda: decrypt(bob, "hsa-3", blob),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the stored record of key {edited.key_id} {compromised}",
        )
        assert_fails(
            lambda: describe(app, "hsa-3", edited.key_id),
            grpc.StatusCode.FAILED_PRECONDITION,
            compromised,
        )
        for key in (first, second):
            assert_fails(
                lambda k=key: encrypt(app, "hsa-3", k.key_id, b"x"),
                grpc.StatusCode.FAILED_PRECONDITION,
                compromised,
            )
        # A node that has the key cached refuses too, once its entry is due for a refresh.
        eventually(
            lambda: assert_fails(
                lambda: decrypt(app, "hsa-1", blob),
                grpc.StatusCode.FAILED_PRECONDITION,
                compromised,
            ),
            what="hsa-1 to re-read the edited record",
        )
        refused = [
            r
            for r in audit_records(cluster, "hsa-3")
            if r["key_id"] == edited.key_id and r["result"] == "FAILED_PRECONDITION"
        ]
        assert refused
        assert refused[0]["principal"] == bob.uri
        log_text = cluster.layout.log_file("hsa-3").read_text()
        assert f"the stored record of key {edited.key_id} does not verify (the token" in log_text
    finally:
        for key_id, original in originals.items():
            write_record(cluster, key_id, original)
    eventually(lambda: decrypt(app, "hsa-3", blob) == b"mine", what="the honest record again")
    assert_fails(lambda: decrypt(bob, "hsa-3", blob), grpc.StatusCode.PERMISSION_DENIED)


def test_an_older_record_is_refused_even_after_a_restart(
    cluster: LocalCluster, app: Principal
) -> None:
    key = create(app, "hsa-2")
    blob = encrypt(app, "hsa-2", key.key_id, b"v1").ciphertext_blob
    version_one = stored_record(cluster, key.key_id)
    admin(app, "hsa-2", "DisableKey", key.key_id)  # hsa-2 has seen metadata version 2
    version_two = stored_record(cluster, key.key_id)
    try:
        write_record(cluster, key.key_id, version_one)  # the coordinator rolls the key back
        older = "the coordinator returned an older record of key"
        eventually(
            lambda: assert_fails(
                lambda: decrypt(app, "hsa-2", blob),
                grpc.StatusCode.FAILED_PRECONDITION,
                older,
                "(metadata version 1) than this HSA accepted before (version 2)",
            ),
            what="hsa-2 to refuse the rolled-back record",
        )
        restart(cluster, "hsa-2")
        assert_fails(
            lambda: decrypt(app, "hsa-2", blob), grpc.StatusCode.FAILED_PRECONDITION, older
        )
    finally:
        write_record(cluster, key.key_id, version_two)
    eventually(
        lambda: assert_fails(
            lambda: decrypt(app, "hsa-2", blob), grpc.StatusCode.FAILED_PRECONDITION, "is disabled"
        ),
        what="hsa-2 to accept version 2 again",
    )


# --- domain key rotation -------------------------------------------------------------------


def list_records(cluster: LocalCluster) -> list[keys_pb2.KeyRecord]:
    """Every stored key record, read through the coordinator as hsa-1."""
    node_dir = cluster.layout.node_dir("hsa-1")
    tls = TlsMaterial.from_files(
        cluster.layout.ca_cert, node_dir / "identity" / "tls.crt", node_dir / "identity" / "tls.key"
    )
    channel = transport.mtls_channel(cluster.coordinator_address, tls, transport.COORDINATOR)
    try:
        stub = services_pb2_grpc.CoordinatorStub(channel)
        records: list[keys_pb2.KeyRecord] = []
        token = ""
        while True:
            page = stub.ListKeyRecords(
                services_pb2.ListKeyRecordsRequest(limit=1000, page_token=token), timeout=DEADLINE
            )
            records += list(page.records)
            token = page.next_page_token
            if not token:
                return records
    finally:
        channel.close()


def test_records_are_rewrapped_after_a_domain_key_rotation(
    cluster: LocalCluster, app: Principal
) -> None:
    keys = [create(app, HOSTS[i % 3]) for i in range(6)]
    admin(app, "hsa-1", "RotateKey", keys[0].key_id)  # two tokens
    blobs = {
        k.key_id: encrypt(app, "hsa-1", k.key_id, k.key_id.encode(), {"k": k.key_id}) for k in keys
    }
    generation = cluster.node_status("hsa-1").domain_key_generation
    before = {r.metadata: r for r in list_records(cluster)}
    assert all(t.domain_key_generation == generation for r in before.values() for t in r.tokens)
    with cluster.coordinator_client() as client:
        view = client.propose(
            [changes.rotate_domain_key()], cluster.operator_signer("alice"), reason="rotate"
        )
        view = client.approve(view.proposal_id, cluster.operator_signer("bob"))
    assert view.applied, view.detail
    cluster.wait_for(
        lambda: all(cluster.node_status(h).domain_key_generation == generation + 1 for h in HOSTS),
        what="every node on the new domain key generation",
    )

    def rewrapped() -> bool:
        return all(
            t.domain_key_generation == generation + 1
            for r in list_records(cluster)
            for t in r.tokens
        )

    cluster.wait_for(rewrapped, timeout=20, what="every key record re-wrapped")
    after = {r.metadata: r for r in list_records(cluster)}
    # Same metadata bytes (same metadata versions), new tokens, new revisions.
    assert set(after) == set(before)
    for metadata, record in after.items():
        assert record.revision > before[metadata].revision
        assert len(record.tokens) == len(before[metadata].tokens)
    for key in keys:
        for host in HOSTS:
            blob = blobs[key.key_id].ciphertext_blob
            assert decrypt(app, host, blob, {"k": key.key_id}) == key.key_id.encode()
        assert describe(app, "hsa-2", key.key_id).metadata_version == (2 if key is keys[0] else 1)
    fresh = create(app, "hsa-3")
    record = next(r for r in list_records(cluster) if fresh.key_id.encode() in r.metadata)
    assert {t.domain_key_generation for t in record.tokens} == {generation + 1}

    # The admin calls were audited: every node installed the new state, one sealed it.
    applied = []
    for host in HOSTS:
        records = audit_records(cluster, host)
        installs = [r for r in records if r["operation"] == "InstallState" and r["result"] == "ok"]
        assert installs
        assert installs[-1]["principal"] == "spiffe://local/coordinator/coordinator"
        applied += [r for r in records if r["operation"] == "ApplyProposal"]
    assert len(applied) == 1
    assert applied[0]["result"] == "ok"
    assert applied[0]["detail"].startswith(f"proposal {view.proposal_id.hex()[:16]}")
