"""The key service's parts in this process, against a real coordinator process.

What needs a controlled clock or a view inside an HSA is tested here: the cache's TTL and its
behaviour in an outage, the LRU bound, the persisted version floor, compare-and-swap retries,
the background upkeep (deletion after the waiting period, automatic rotation, re-wrapping
after a domain key rotation, bounded work per tick), the coordinator's DeleteKeyRecord, the
per-principal CreateKey rate, and a change that would retire a generation still in use
(deferred, resumably, until the records moved).
Each test gets its own copy of a domain and its own coordinator process.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.hsa_nodes import (
    COORDINATOR,
    ROTATE,
    Domain,
    Processes,
    propose,
    remove_host,
)

from domain_coordinator.sqlite_store import SqliteStore
from domain_core import ciphertext, importtokens, keytokens
from domain_core.changes import set_settings
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ThrottledError,
    TransitionDeferredError,
    UnavailableError,
)
from domain_core.keytokens import RecordSigner
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model import SealedState
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.audit import AuditLogError
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.transport import CertificatePeerContext
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node.keycache import KeyCache
from hsa_node.keyfloors import FLOOR_FILE, MetadataVersionFloor
from hsa_node.keyrecords import CoordinatorUnreachableError, KeyRecordClient
from hsa_node.keyservice import KeyServiceServicer
from hsa_node.rewrap import KeyMaintainer
from hsa_node.server import load_node
from hsa_node.servicers import HsaAdminServicer

pytestmark = pytest.mark.integration

DAY = 86_400
DEMO_APP = "spiffe://local/client/demo-app"


class Clock:
    """A clock a test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingAudit:
    """An audit sink that keeps the records in memory (and can be made to fail)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.broken = False

    def append(
        self,
        *,
        principal: str,
        operation: str,
        key_id: str = "",
        encryption_context: Mapping[str, str] | None = None,
        result: str = "ok",
        detail: str = "",
    ) -> int:
        if self.broken:
            raise AuditLogError("audit log test: write failed")
        self.records.append(
            {
                "principal": principal,
                "operation": operation,
                "key_id": key_id,
                "context": dict(encryption_context or {}),
                "result": result,
                "detail": detail,
            }
        )
        return len(self.records)


class Hsa:
    """One HSA's key service in this process, calling the real coordinator as that host."""

    def __init__(
        self,
        domain: Domain,
        host: str,
        coordinator: str,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_entries: int = 1000,
        page_size: int = 100,
        limits: Limits = DEFAULT_LIMITS,
        prepare_budget: float = 4.0,
        prepare_page_size: int = 1000,
    ) -> None:
        self.loaded = load_node(NodeConfig.load(domain.layout.node_configs[host]))
        self.node = self.loaded.node
        self.channel = transport.mtls_channel(coordinator, domain.tls(host), transport.COORDINATOR)
        self.records = KeyRecordClient(self.channel, coordinator)
        self.floor = MetadataVersionFloor(domain.data_dir(host) / FLOOR_FILE)
        self.cache = KeyCache(
            domain_id="local",
            domain_keys=self.node.domain_keys,
            records=self.records,
            floor=self.floor,
            signer=RecordSigner("local", host, self.node.identity.signer),
            max_entries=max_entries,
            clock=monotonic,
        )
        self.audit = RecordingAudit()
        self.service = KeyServiceServicer(
            node=self.node, cache=self.cache, audit=self.audit, clock=clock, limits=limits
        )
        self.maintainer = KeyMaintainer(
            node=self.node,
            cache=self.cache,
            audit=self.audit,
            page_size=page_size,
            prepare_budget=prepare_budget,
            prepare_page_size=prepare_page_size,
        )
        self.app = CertificatePeerContext(domain.tls("demo-app").cert_pem)

    def close(self) -> None:
        self.channel.close()
        self.floor.close()

    # Calls as the demo application.
    def create(self, **fields: Any) -> keys_pb2.KeyMetadata:
        response = self.service.CreateKey(services_pb2.CreateKeyRequest(**fields), self.app)  # type: ignore[arg-type]
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata

    def encrypt(self, key_id: str, plaintext: bytes = b"data") -> services_pb2.EncryptResponse:
        response: services_pb2.EncryptResponse = self.service.Encrypt(
            services_pb2.EncryptRequest(key_id=key_id, plaintext=plaintext),
            self.app,  # type: ignore[arg-type]
        )
        return response

    def decrypt(self, blob: bytes) -> bytes:
        response = self.service.Decrypt(
            services_pb2.DecryptRequest(ciphertext_blob=blob),
            self.app,  # type: ignore[arg-type]
        )
        plaintext: bytes = response.plaintext
        return plaintext

    def admin(self, method: str, key_id: str, **fields: Any) -> keys_pb2.KeyMetadata:
        request_type = {
            "ScheduleKeyDeletion": services_pb2.ScheduleKeyDeletionRequest,
            "PutKeyPolicy": services_pb2.PutKeyPolicyRequest,
        }.get(method, services_pb2.KeyIdRequest)
        response = getattr(self.service, method)(request_type(key_id=key_id, **fields), self.app)
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata


@pytest.fixture
def procs(domain: Domain) -> Iterator[Processes]:
    running = Processes(domain)
    try:
        running.start(COORDINATOR)
        yield running
    finally:
        running.kill_all()


@pytest.fixture
def make_hsa(domain: Domain, procs: Processes) -> Iterator[Callable[..., Hsa]]:
    made: list[Hsa] = []

    def make(host: str = "hsa-1", **kwargs: Any) -> Hsa:
        hsa = Hsa(domain, host, procs.addresses[COORDINATOR], **kwargs)
        made.append(hsa)
        return hsa

    yield make
    for hsa in made:
        hsa.close()


def stored(hsa: Hsa, key_id: str) -> keys_pb2.KeyRecord | None:
    return hsa.records.get(key_id)


def rotate_domain_key(domain: Domain, hsa: Hsa) -> SealedState:
    """A quorum-approved rotate-domain-key, sealed and installed on `hsa` (in this process)."""
    proposal, approvals = propose(domain, hsa.node.head, ROTATE)
    coordinator = CertificatePeerContext(domain.tls(COORDINATOR).cert_pem)

    def no_catch_up() -> int:
        raise UnavailableError("not in this test")

    sealed = HsaAdminServicer(
        hsa.node, no_catch_up, coordinator=domain.coordinator_pin()
    ).ApplyProposal(
        services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals),
        coordinator,  # type: ignore[arg-type]
    )
    state = SealedState.from_message(sealed)
    assert hsa.node.offer(state)
    return state


# --- deletion and automatic rotation (the background upkeep) -------------------------------


def test_a_key_is_deleted_after_its_waiting_period_and_then_not_found(
    make_hsa: Callable[..., Hsa],
) -> None:
    now = time.time()
    tick = Clock(1000.0)
    past = make_hsa("hsa-1", clock=Clock(now - 8 * DAY), monotonic=tick)  # 8 days ago
    hsa = make_hsa("hsa-2")
    due = past.create(description="old")
    blob = past.encrypt(due.key_id, b"gone soon").ciphertext_blob
    scheduled = past.admin("ScheduleKeyDeletion", due.key_id, pending_window_days=7)
    assert scheduled.deletion_at < now
    later = hsa.create(description="later")
    hsa.admin("ScheduleKeyDeletion", later.key_id, pending_window_days=7)
    kept = hsa.create(description="kept")
    assert hsa.decrypt(hsa.encrypt(kept.key_id).ciphertext_blob) == b"data"
    with pytest.raises(FailedPreconditionError, match="pending deletion"):
        hsa.decrypt(blob)

    report = hsa.maintainer.run_pass()
    assert report.deleted == 1
    assert stored(hsa, due.key_id) is None
    assert stored(hsa, later.key_id) is not None
    with pytest.raises(NotFoundError, match=f"key {due.key_id} does not exist"):
        hsa.decrypt(blob)
    with pytest.raises(FailedPreconditionError, match="pending deletion"):
        past.decrypt(blob)  # the other HSA has it cached: deleted keys were not usable anyway
    tick.now += 2.1
    with pytest.raises(NotFoundError, match="does not exist"):
        past.decrypt(blob)  # past the TTL it asks again, and forgets the key
    assert past.cache.cached(due.key_id) is None
    deletions = [r for r in hsa.audit.records if r["operation"] == "DeleteKey"]
    assert deletions == [
        {
            "principal": "spiffe://local/hsa/hsa-2",
            "operation": "DeleteKey",
            "key_id": due.key_id,
            "context": {},
            "result": "ok",
            "detail": deletions[0]["detail"],
        }
    ]
    assert hsa.maintainer.run_pass().deleted == 0


def test_the_coordinator_deletes_only_due_keys_and_only_for_hsas(
    domain: Domain, procs: Processes, make_hsa: Callable[..., Hsa]
) -> None:
    hsa = make_hsa("hsa-1")
    enabled = hsa.create()
    pending = hsa.create()
    hsa.admin("ScheduleKeyDeletion", pending.key_id, pending_window_days=7)
    revision = hsa.cache.get(pending.key_id, fresh=True).revision
    with pytest.raises(FailedPreconditionError, match="not pending deletion"):
        hsa.records.delete(enabled.key_id, 1)
    with pytest.raises(FailedPreconditionError, match="has not passed yet"):
        hsa.records.delete(pending.key_id, revision)
    with pytest.raises(ConflictError, match=f"is at revision {revision}, not 99"):
        hsa.records.delete(pending.key_id, 99)
    with pytest.raises(NotFoundError, match="does not exist"):
        hsa.records.delete(ciphertext.new_key_id(), 1)
    with pytest.raises(InvalidInputError, match="expected_revision is missing"):
        hsa.records.delete(pending.key_id, 0)
    channel = transport.mtls_channel(
        procs.addresses[COORDINATOR], domain.tls("demo-app"), transport.COORDINATOR
    )
    try:
        stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as refused:
            stub.DeleteKeyRecord(
                services_pb2.DeleteKeyRecordRequest(key_id=pending.key_id, expected_revision=1),
                timeout=5,
            )
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()
    assert stored(hsa, pending.key_id) is not None


def test_the_store_deletes_with_a_compare_and_swap(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    try:
        assert store.put_key("k", b"one", 0) == 1
        assert store.put_key("k", b"two", 1) == 2
        with pytest.raises(ConflictError):
            store.delete_key("k", 1, 100)
        store.delete_key("k", 2, 100)
        assert store.get_key("k") is None
        with pytest.raises(NotFoundError):
            store.delete_key("k", 2, 100)
        with pytest.raises(ValueError, match="expected_revision"):
            store.delete_key("k", 0, 100)
        with pytest.raises(AlreadyExistsError, match="was deleted"):
            store.put_key("k", b"again", 0)  # a tombstone: the id is not used again
        assert store.purge_deleted_keys(101) == 1
        assert store.put_key("k", b"again", 0) == 1  # purged: nothing is left of it
    finally:
        store.close()


def test_automatic_rotation_when_due(make_hsa: Callable[..., Hsa]) -> None:
    now = time.time()
    year_ago = make_hsa("hsa-1", clock=Clock(now - 366 * DAY))
    due = year_ago.create(enable_rotation=True)
    assert due.rotation.next_rotation_at < now
    old_blob = year_ago.encrypt(due.key_id, b"v1").ciphertext_blob
    disabled = year_ago.create(enable_rotation=True)
    year_ago.admin("DisableKey", disabled.key_id)
    manual = year_ago.create()
    hsa = make_hsa("hsa-2")
    not_yet = hsa.create(enable_rotation=True, rotation_period_days=90)

    report = hsa.maintainer.run_pass()
    assert report.rotated == 1
    rotated = hsa.cache.get(due.key_id, fresh=True).metadata
    assert rotated.current_backing_version == 2
    assert rotated.metadata_version == 2
    assert now + 364 * DAY < rotated.rotation.next_rotation_at < time.time() + 366 * DAY
    for key in (disabled, manual, not_yet):
        assert hsa.cache.get(key.key_id, fresh=True).metadata.current_backing_version == 1
    new = hsa.encrypt(due.key_id, b"v2")
    assert new.backing_version == 2
    assert hsa.decrypt(old_blob) == b"v1"
    assert year_ago.decrypt(new.ciphertext_blob) == b"v2"  # the other HSA re-reads the key
    assert [r["operation"] for r in hsa.audit.records if r["principal"].endswith("/hsa/hsa-2")] == [
        "RotateKey"
    ]
    assert hsa.maintainer.run_pass().rotated == 0


def test_imported_material_is_deleted_by_the_upkeep_once_it_expires(
    make_hsa: Callable[..., Hsa],
) -> None:
    """Keys of imported material with an expiry (imported a day ago): the upkeep deletes the
    material of the one whose expiry passed (PENDING_IMPORT, no token left, audited), which
    then refuses use until the same material is imported again, and leaves the other alone."""
    now = time.time()
    hsa = make_hsa("hsa-1", clock=Clock(now - DAY))
    material = bytes(range(32))

    def imported(valid_to: int) -> keys_pb2.KeyMetadata:
        key = hsa.create(origin=keys_pb2.KEY_ORIGIN_EXTERNAL)
        assert (key.state, key.current_backing_version) == (keys_pb2.KEY_STATE_PENDING_IMPORT, 0)
        return _import(hsa, key.key_id, material, valid_to)

    expiring = imported(int(now) - 60)
    lasting = imported(int(now) + DAY)
    assert expiring.state == lasting.state == keys_pb2.KEY_STATE_ENABLED
    blob = hsa.encrypt(expiring.key_id, b"until a minute ago").ciphertext_blob
    report = hsa.maintainer.run_pass()
    assert report.expired == 1
    expired = hsa.cache.get(expiring.key_id, fresh=True)
    assert expired.metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT
    assert (expired.metadata.current_backing_version, len(expired.record.tokens)) == (0, 0)
    assert expired.metadata.material_commitment == expiring.material_commitment
    assert hsa.cache.get(lasting.key_id, fresh=True).metadata.state == keys_pb2.KEY_STATE_ENABLED
    with pytest.raises(FailedPreconditionError, match="no key material"):
        hsa.decrypt(blob)
    upkeep = [r for r in hsa.audit.records if r["principal"].endswith("/hsa/hsa-1")]
    assert [(r["operation"], r["key_id"]) for r in upkeep] == [
        ("DeleteImportedKeyMaterial", expiring.key_id)
    ]
    assert hsa.maintainer.run_pass().expired == 0
    # The same material again (no expiry): the old ciphertext opens again.
    assert _import(hsa, expiring.key_id, material, 0).material_expires_at == 0
    assert hsa.decrypt(blob) == b"until a minute ago"


def _import(hsa: Hsa, key_id: str, material: bytes, valid_to: int) -> keys_pb2.KeyMetadata:
    """GetParametersForImport, the material wrapped as its owner would, ImportKeyMaterial."""
    algorithm = keys_pb2.WRAPPING_ALGORITHM_RSAES_OAEP_SHA_256
    parameters = hsa.service.GetParametersForImport(
        services_pb2.GetParametersForImportRequest(key_id=key_id, wrapping_algorithm=algorithm),
        hsa.app,  # type: ignore[arg-type]
    )
    response = hsa.service.ImportKeyMaterial(
        services_pb2.ImportKeyMaterialRequest(
            key_id=key_id,
            import_token=parameters.import_token,
            encrypted_key_material=importtokens.wrap_material(
                parameters.public_key, algorithm, material
            ),
            valid_to=valid_to,
        ),
        hsa.app,  # type: ignore[arg-type]
    )
    metadata: keys_pb2.KeyMetadata = response.metadata
    return metadata


def test_a_grant_token_works_where_the_grant_has_not_arrived_and_not_after(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    """hsa-2 holds an older metadata of the key than the one with the grant: the grantee is
    refused there without the token and served with it; once hsa-2 holds the metadata without
    the grant (retired), the token no longer helps; the conditions hold all along."""
    first, second = make_hsa("hsa-1"), make_hsa("hsa-2")
    ca = load_domain_ca(domain.layout.root / "ca")
    bob_key = new_tls_key_pem()
    bob = CertificatePeerContext(
        ca.issue(SpiffeId("local", "client", "bob"), tls_public_key(bob_key), now=datetime.now(UTC))
    )
    key = first.create()
    second.encrypt(key.key_id)  # hsa-2 caches the key as it is now
    created = first.service.CreateGrant(
        services_pb2.CreateGrantRequest(
            key_id=key.key_id,
            grantee_principal="spiffe://local/client/bob",
            operations=[keys_pb2.KEY_OPERATION_ENCRYPT],
            constraints=keys_pb2.ContextConditions(encryption_context_subset={"t": "a"}),
        ),
        first.app,  # type: ignore[arg-type]
    )

    def bob_encrypts(context: dict[str, str], tokens: list[bytes]) -> None:
        second.service.Encrypt(
            services_pb2.EncryptRequest(
                key_id=key.key_id, plaintext=b"x", encryption_context=context, grant_tokens=tokens
            ),
            bob,  # type: ignore[arg-type]
        )

    with pytest.raises(PermissionDeniedError):
        bob_encrypts({"t": "a"}, [])
    bob_encrypts({"t": "a"}, [created.grant_token])
    with pytest.raises(PermissionDeniedError):
        bob_encrypts({"t": "b"}, [created.grant_token])
    first.service.RetireGrant(
        services_pb2.RetireGrantRequest(grant_token=created.grant_token),
        bob,  # type: ignore[arg-type]
    )
    second.cache.get(key.key_id, fresh=True)  # hsa-2 reads the key again
    with pytest.raises(PermissionDeniedError):
        bob_encrypts({"t": "a"}, [created.grant_token])
    operations = [r["operation"] for r in second.audit.records if "bob" in r["principal"]]
    assert operations == ["Encrypt"] * 4


# --- re-wrapping after a domain key rotation -----------------------------------------------


def test_records_are_rewrapped_in_bounded_pages_by_concurrent_hsas(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    first = make_hsa("hsa-1", page_size=4)
    second = make_hsa("hsa-2", page_size=4)
    keys = [first.create() for _ in range(25)]
    first.admin("RotateKey", keys[0].key_id)
    blobs = {k.key_id: first.encrypt(k.key_id, k.key_id.encode()).ciphertext_blob for k in keys}
    before = {k.key_id: stored(first, k.key_id) for k in keys}
    assert first.maintainer.run_pass().rewrapped == 0  # nothing to do yet

    rotate_domain_key(domain, first)
    assert first.node.domain_keys().generation == 2
    # hsa-2 has not installed the rotation yet: a record under generation 2 is one it must
    # wait for, not one it refuses as forged.
    probe = first.create()
    with pytest.raises(UnavailableError, match="newer than this HSA holds"):
        second.cache.get(probe.key_id)
    second.node.offer(first.node.head)

    # One page per tick, at most page_size records: three ticks leave the pass under way.
    maintainer = first.maintainer
    listed = 0
    for _ in range(3):
        assert maintainer.tick()
        progress = maintainer._pass.report.listed if maintainer._pass else -1
        assert 0 <= progress - listed <= 4
        listed = progress
    assert listed > 0
    # The rest is done by both HSAs at once (run_pass continues the pass under way).
    reports = []

    def run(hsa: Hsa) -> None:
        reports.append(hsa.maintainer.run_pass())

    threads = [threading.Thread(target=run, args=(h,)) for h in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(reports) == 2
    after = {k.key_id: stored(first, k.key_id) for k in keys}
    for key in keys:
        record = after[key.key_id]
        assert record is not None
        original = before[key.key_id]
        assert original is not None
        assert record.metadata == original.metadata  # re-wrapping changes no metadata
        assert {t.domain_key_generation for t in record.tokens} == {2}
        assert not keytokens.needs_rewrap(record, 2)
        for hsa in (first, second):
            assert hsa.decrypt(blobs[key.key_id]) == key.key_id.encode()
    # Every record was re-wrapped exactly once across both HSAs: a record one of them had
    # listed before the other re-wrapped it was a lost compare-and-swap, not a second write.
    # (The probe was made under generation 2 and needed nothing.)
    assert sum(r.rewrapped for r in reports) == 25
    assert all(r.failed == 0 for r in reports)
    assert first.maintainer.run_pass().rewrapped == 0


def test_the_keys_of_an_absent_hsa_are_taken_over_after_a_delay(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    hsa = make_hsa("hsa-1")
    keys = [hsa.create() for _ in range(12)]
    rotate_domain_key(domain, hsa)
    maintainer = KeyMaintainer(node=hsa.node, cache=hsa.cache, takeover_delay=0.3)
    while maintainer.tick():
        pass
    shard_pass = maintainer.last_report
    assert shard_pass is not None
    assert not shard_pass.full
    assert shard_pass.listed >= 12  # (the record after the start is read to see the end)

    def pending_keys() -> list[str]:
        records = [stored(hsa, k.key_id) for k in keys]
        return [r.metadata.hex() for r in records if r is None or keytokens.needs_rewrap(r, 2)]

    pending = pending_keys()
    # hsa-2 and hsa-3 (not running here) own about two thirds of the keys.
    assert shard_pass.elsewhere == len(pending) > 0
    assert shard_pass.rewrapped == 12 - len(pending)
    assert not maintainer.tick()  # the takeover waits for their HSAs first
    time.sleep(0.35)
    while maintainer.tick():
        pass
    takeover = maintainer.last_report
    assert takeover is not None
    assert takeover.full
    assert takeover.rewrapped == len(pending)
    assert pending_keys() == []


# --- the cache: TTL, outage, LRU, version floor --------------------------------------------


def test_cached_keys_are_refreshed_after_the_ttl_and_served_in_an_outage(
    procs: Processes, make_hsa: Callable[..., Hsa]
) -> None:
    tick = Clock(1000.0)
    writer = make_hsa("hsa-1")
    reader = make_hsa("hsa-2", monotonic=tick)
    key = writer.create()
    other = writer.create()
    blob = reader.encrypt(key.key_id).ciphertext_blob
    writer.admin("DisableKey", key.key_id)
    # Within the TTL the reader still uses what it verified (bounded staleness)...
    assert reader.decrypt(blob) == b"data"
    tick.now += 2.1
    # ...and after it, the change.
    with pytest.raises(FailedPreconditionError, match="is disabled"):
        reader.decrypt(blob)
    writer.admin("EnableKey", key.key_id)
    tick.now += 2.1
    assert reader.decrypt(blob) == b"data"

    procs.stop(COORDINATOR)
    calls: list[str] = []
    real_get = reader.records.get

    def counting_get(key_id: str, *, timeout: float | None = None) -> Any:
        calls.append(key_id)
        return real_get(key_id, timeout=timeout)

    reader.records.get = counting_get  # type: ignore[method-assign]
    tick.now += 60
    assert reader.decrypt(blob) == b"data"  # stale, but the coordinator is down
    assert calls == [key.key_id]
    tick.now += 1.0
    assert reader.encrypt(key.key_id).backing_version == 1
    assert calls == [key.key_id]  # within the outage hold: served without asking again
    tick.now += 2.1
    assert reader.encrypt(key.key_id).backing_version == 1
    assert len(calls) == 2
    with pytest.raises(UnavailableError, match="is not cached on this HSA"):
        reader.encrypt(other.key_id)
    with pytest.raises(CoordinatorUnreachableError):
        reader.cache.get(key.key_id, fresh=True)
    with pytest.raises(UnavailableError, match="CreateKey needs it"):
        reader.create()


def test_the_cache_holds_at_most_max_entries(make_hsa: Callable[..., Hsa]) -> None:
    hsa = make_hsa("hsa-1", max_entries=2)
    one, two, three = hsa.create(), hsa.create(), hsa.create()
    assert len(hsa.cache) == 2
    assert hsa.cache.cached(one.key_id) is None  # the least recently used went first
    hsa.encrypt(two.key_id)
    hsa.encrypt(one.key_id)  # read through again; evicts three
    assert hsa.cache.cached(three.key_id) is None
    assert hsa.cache.cached(two.key_id) is not None
    assert "backing" in repr(hsa.cache.cached(two.key_id))
    assert repr(hsa.cache.cached(two.key_id)).count("b'") == 0  # no key material in repr


def test_the_version_floor_persists_and_refuses_older_or_forked_records(tmp_path: Path) -> None:
    path = tmp_path / "data" / FLOOR_FILE
    floor = MetadataVersionFloor(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    floor.admit("k", 1, b"a" * 32)
    floor.admit("k", 3, b"c" * 32)
    floor.admit("j", 5, b"j" * 32, remember=False)
    floor.close()
    floor = MetadataVersionFloor(path)
    try:
        assert floor.highest("k") == (3, b"c" * 32)
        assert floor.highest("j") is None
        with pytest.raises(FailedPreconditionError, match=r"older record of key k \(metadata"):
            floor.admit("k", 2, b"b" * 32)
        with pytest.raises(FailedPreconditionError, match="same metadata version 3"):
            floor.admit("k", 3, b"x" * 32)
        floor.admit("k", 3, b"c" * 32)
        floor.admit("k", 4, b"d" * 32)
        assert floor.highest("k") == (4, b"d" * 32)
    finally:
        floor.close()


def test_the_floor_survives_a_restart_of_the_hsa(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    hsa = make_hsa("hsa-1")
    key = hsa.create()
    version_one = stored(hsa, key.key_id)
    assert version_one is not None
    hsa.admin("DisableKey", key.key_id)
    hsa.close()
    # A coordinator restored from an old backup serves version 1 again.
    store = SqliteStore(domain.layout.coordinator_config.parent / "coordinator.db")
    try:
        entry = store.get_key(key.key_id)
        assert entry is not None
        version_one.revision = 0
        store.put_key(key.key_id, version_one.SerializeToString(deterministic=True), entry.revision)
    finally:
        store.close()
    restarted = make_hsa("hsa-1")
    with pytest.raises(FailedPreconditionError, match="older record"):
        restarted.encrypt(key.key_id)
    fresh = make_hsa("hsa-3")  # never saw version 2: it cannot tell (the documented limit)
    assert fresh.encrypt(key.key_id).backing_version == 1


# --- writes: compare-and-swap, audit --------------------------------------------------------


def test_a_lost_compare_and_swap_is_retried_on_the_new_record(
    make_hsa: Callable[..., Hsa],
) -> None:
    first, second = make_hsa("hsa-1"), make_hsa("hsa-2")
    key = first.create()
    real_put = first.records.put
    interference = {"left": 1}

    def put_after_someone_else(record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        if interference["left"]:
            interference["left"] -= 1
            second.admin("DisableKey", key.key_id)
        return real_put(record, expected_revision)

    first.records.put = put_after_someone_else  # type: ignore[method-assign]
    with pytest.raises(FailedPreconditionError, match="is disabled"):
        first.admin("RotateKey", key.key_id)  # re-read: the key is disabled now
    second.admin("EnableKey", key.key_id)
    interference["left"] = 1
    policy = keys_pb2.KeyPolicy(
        grants=[
            keys_pb2.PolicyGrant(
                principals=[DEMO_APP, "spiffe://local/client/other"],
                operations=[keys_pb2.KEY_OPERATION_ADMIN, keys_pb2.KEY_OPERATION_ENCRYPT],
            )
        ]
    )

    def put_policy_first(record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        if interference["left"]:
            interference["left"] -= 1
            second.admin("PutKeyPolicy", key.key_id, policy=policy)
        return real_put(record, expected_revision)

    first.records.put = put_policy_first  # type: ignore[method-assign]
    rotated = first.admin("RotateKey", key.key_id)
    assert rotated.current_backing_version == 2
    assert rotated.metadata_version == 5  # disable, enable, policy, rotate
    assert rotated.policy == policy  # the concurrent change is kept

    def always_conflicting(record: keys_pb2.KeyRecord, expected_revision: int) -> int:
        raise ConflictError("test: someone is always faster")

    first.records.put = always_conflicting  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="changed 4 times while RotateKey ran; retry"):
        first.admin("RotateKey", key.key_id)


def test_every_call_is_audited_and_an_unwritable_audit_log_fails_the_call(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    hsa = make_hsa("hsa-1")
    key = hsa.create()
    hsa.encrypt(key.key_id, b"plain")
    with pytest.raises(NotFoundError):
        hsa.encrypt(ciphertext.new_key_id())
    host = CertificatePeerContext(domain.tls("hsa-2").cert_pem)
    with pytest.raises(PermissionDeniedError, match="may not call this"):
        hsa.service.GenerateRandom(
            services_pb2.GenerateRandomRequest(number_of_bytes=8),
            host,  # type: ignore[arg-type]
        )
    assert [(r["operation"], r["result"], r["principal"]) for r in hsa.audit.records] == [
        ("CreateKey", "ok", DEMO_APP),
        ("Encrypt", "ok", DEMO_APP),
        ("Encrypt", "NOT_FOUND", DEMO_APP),
        ("GenerateRandom", "PERMISSION_DENIED", "spiffe://local/hsa/hsa-2"),
    ]
    assert all("plain" not in str(r) for r in hsa.audit.records)

    hsa.audit.broken = True
    with pytest.raises(AuditLogError):
        hsa.encrypt(key.key_id)
    with pytest.raises(NotFoundError):  # a failing call keeps its own error
        hsa.encrypt(ciphertext.new_key_id())


# --- quotas and transitions ------------------------------------------------------------------


def test_create_key_is_rate_limited_per_principal(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    hsa = make_hsa("hsa-1", limits=Limits(create_key_per_second=0.5, create_key_burst=3))
    created = [hsa.create() for _ in range(3)]  # the burst
    with pytest.raises(ResourceExhaustedError, match=r"may create at most 0\.5 keys per second"):
        hsa.create()
    refused = hsa.audit.records[-1]
    assert (refused["operation"], refused["result"]) == ("CreateKey", "RESOURCE_EXHAUSTED")
    assert len({m.key_id for m in created}) == 3
    # Another principal has a bucket of its own; the data plane is not limited.
    other = CertificatePeerContext(issue_client_cert(domain, "other"))
    hsa.service.CreateKey(services_pb2.CreateKeyRequest(), other)  # type: ignore[arg-type]
    assert hsa.decrypt(hsa.encrypt(created[0].key_id).ciphertext_blob) == b"data"
    time.sleep(2.1)  # one token back
    hsa.create()


def test_a_throttled_principal_is_refused_while_another_is_served(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    """Issue 19: a principal over its request-rate quota gets RESOURCE_EXHAUSTED with a retry
    delay, nothing done and the refusal audited, while another principal at the same moment
    is served; the throttled one is served again once a token is back."""
    hsa = make_hsa("hsa-1", limits=Limits(crypto_requests_per_second=2, crypto_request_burst=3))
    me, other_name = "spiffe://local/client/demo-app", "spiffe://local/client/other"
    key = hsa.create(
        policy=keys_pb2.KeyPolicy(
            grants=[
                keys_pb2.PolicyGrant(principals=[me], operations=[keys_pb2.KEY_OPERATION_ADMIN]),
                keys_pb2.PolicyGrant(
                    principals=[me, other_name], operations=[keys_pb2.KEY_OPERATION_ENCRYPT]
                ),
            ]
        )
    )
    for _ in range(3):  # the burst
        hsa.encrypt(key.key_id)
    audited = len(hsa.audit.records)
    with pytest.raises(ThrottledError, match="over its quota of cryptographic operations") as got:
        hsa.encrypt(key.key_id)
    assert 0 < got.value.retry_after <= 0.5
    refused = hsa.audit.records[audited:]
    assert [(r["operation"], r["result"]) for r in refused] == [("Encrypt", "RESOURCE_EXHAUSTED")]
    other = CertificatePeerContext(issue_client_cert(domain, "other"))
    for _ in range(3):  # the same moment: a bucket of its own
        hsa.service.Encrypt(
            services_pb2.EncryptRequest(key_id=key.key_id, plaintext=b"x"),
            other,  # type: ignore[arg-type]
        )
    time.sleep(got.value.retry_after + 0.05)
    assert hsa.encrypt(key.key_id).ciphertext_blob


def issue_client_cert(domain: Domain, name: str) -> bytes:
    from datetime import UTC, datetime

    from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key

    ca = load_domain_ca(domain.layout.root / "ca")
    key_pem = new_tls_key_pem()
    return ca.issue(
        SpiffeId("local", "client", name), tls_public_key(key_pem), now=datetime.now(UTC)
    )


def test_a_change_that_would_retire_a_generation_in_use_waits_for_the_records(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    # One page of 3 records per call and no time budget: the preparation takes several calls.
    hsa = make_hsa("hsa-1", prepare_budget=0.0, prepare_page_size=3)
    keys = [hsa.create() for _ in range(7)]
    blobs = {k.key_id: hsa.encrypt(k.key_id, k.key_id.encode()).ciphertext_blob for k in keys}
    coordinator = CertificatePeerContext(domain.tls(COORDINATOR).cert_pem)

    def no_catch_up() -> int:
        raise UnavailableError("not in this test")

    admin = HsaAdminServicer(
        hsa.node, no_catch_up, coordinator=domain.coordinator_pin(), key_records=hsa.maintainer
    )

    def apply(changes: list[Any]) -> SealedState:
        proposal, approvals = propose(domain, hsa.node.head, changes)
        request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
        state = SealedState.from_message(admin.ApplyProposal(request, coordinator))  # type: ignore[arg-type]
        assert hsa.node.offer(state)
        return state

    settings = hsa.node.head.manifest.message.settings
    apply([set_settings(base=settings, key_generations_retained=2)])
    apply(ROTATE)  # generations 1 and 2: nothing retired, nothing to prepare
    assert {
        t.domain_key_generation for k in keys for t in stored_or_fail(hsa, k.key_id).tokens
    } == {1}

    # The next rotation retires generation 1, under which all 7 records still are.
    proposal, approvals = propose(domain, hsa.node.head, ROTATE)
    request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
    messages = []
    for _ in range(10):
        try:
            sealed = admin.ApplyProposal(request, coordinator)  # type: ignore[arg-type]
            break
        except TransitionDeferredError as error:
            messages.append(error.message)
    else:
        pytest.fail(f"the rotation was deferred 10 times: {messages[-1]}")
    assert len(messages) >= 2, messages  # it resumed where it stopped, page by page
    assert "key records are still sealed under domain key generation 1" in messages[0]
    assert "the coordinator retries" in messages[0]
    state = SealedState.from_message(sealed)
    assert [g.generation for g in state.manifest.message.key_generations] == [2, 3]
    for key in keys:
        record = stored_or_fail(hsa, key.key_id)
        assert {t.domain_key_generation for t in record.tokens} == {2}
        assert record.signer_host_id == "hsa-1"
    assert hsa.node.offer(state)
    for key in keys:
        hsa.cache.forget(key.key_id)
        assert hsa.decrypt(blobs[key.key_id]) == key.key_id.encode()


def stored_or_fail(hsa: Hsa, key_id: str) -> keys_pb2.KeyRecord:
    record = stored(hsa, key_id)
    assert record is not None
    return record


def test_a_finished_preparation_counts_only_for_its_own_proposal(
    domain: Domain, make_hsa: Callable[..., Hsa]
) -> None:
    """A removal proposal is prepared (hsa-3's records signed again), then, say, cancelled; the
    fence at the coordinator goes with it, hsa-3 writes again, and a second proposal to remove
    it comes: its preparation lists the records again rather than trusting the first one."""
    first, third = make_hsa("hsa-1"), make_hsa("hsa-3")
    early = third.create()
    coordinator = CertificatePeerContext(domain.tls(COORDINATOR).cert_pem)

    def no_catch_up() -> int:
        raise UnavailableError("not in this test")

    admin = HsaAdminServicer(
        first.node, no_catch_up, coordinator=domain.coordinator_pin(), key_records=first.maintainer
    )

    def seal_removal() -> SealedState:
        proposal, approvals = propose(domain, first.node.head, remove_host("hsa-3"))
        request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
        return SealedState.from_message(admin.ApplyProposal(request, coordinator))  # type: ignore[arg-type]

    seal_removal()  # sealed, never installed (the proposal went nowhere)
    assert stored_or_fail(first, early.key_id).signer_host_id == "hsa-1"
    late = third.create()
    assert stored_or_fail(first, late.key_id).signer_host_id == "hsa-3"
    state = seal_removal()
    assert stored_or_fail(first, late.key_id).signer_host_id == "hsa-1"
    assert first.node.offer(state)
    for key in (early, late):
        first.cache.forget(key.key_id)
        assert first.decrypt(first.encrypt(key.key_id).ciphertext_blob) == b"data"


def test_a_pass_verifies_only_the_records_that_need_work(
    domain: Domain, make_hsa: Callable[..., Hsa], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signature checks cost ~0.1 ms each: an upkeep pass over records that need nothing
    checks none; after a rotation every record is re-wrapped, a key pending deletion too."""
    hsa = make_hsa("hsa-1")
    keys = [hsa.create() for _ in range(3)]
    hsa.admin("ScheduleKeyDeletion", keys[0].key_id, pending_window_days=7)
    verified: list[str] = []
    real_verify = hsa.cache.verify

    def counting(record: keys_pb2.KeyRecord, key_id: str, **kwargs: Any) -> Any:
        verified.append(key_id)
        return real_verify(record, key_id, **kwargs)

    monkeypatch.setattr(hsa.cache, "verify", counting)
    assert hsa.maintainer.run_pass().listed >= 3
    assert verified == []
    rotate_domain_key(domain, hsa)
    report = hsa.maintainer.run_pass()
    assert report.rewrapped == 3
    assert sorted(verified) == sorted(k.key_id for k in keys)
    for key in keys:
        assert {t.domain_key_generation for t in stored_or_fail(hsa, key.key_id).tokens} == {2}
