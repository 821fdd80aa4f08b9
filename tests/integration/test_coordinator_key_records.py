"""What a real coordinator process accepts as key records (issue 13, item 2, the key-record part).

The coordinator cannot open tokens, but an honest one checks what it can, so that a broken or
hostile HSA certificate cannot overwrite, roll back or delete keys: `PutKey` stores only records
signed by the calling host (a host of its verified head, the signature verifying under that
host's key from the head), never lowers a key's metadata version nor changes its metadata at the
same version; `DeleteKeyRecord` deletes only a stored record whose signature verifies and whose
signed metadata says the deletion is due, and keeps it as a tombstone; a host that a quorate
proposal removes may no longer write; creates count the creator's keys.

The coordinator runs alone (no HSA is registered), so quorate proposals stay pending: that is
how the fence of a removal is observed. Records are made and signed here with the hosts'
identities from the domain directory, as those hosts would.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from support.hsa_nodes import COORDINATOR, Domain, Processes, propose, remove_host

from domain_core import crypto, keytokens, policy, quorum, sealing
from domain_core.identity import HostIdentity
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import CoordinatorConfig
from domain_edge.identity_files import load_host_identity
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.integration

DEADLINE = 5.0
DAY = 86_400
APP = "spiffe://local/client/demo-app"


@pytest.fixture
def procs(domain: Domain) -> Iterator[Processes]:
    running = Processes(domain)
    try:
        yield running
    finally:
        running.kill_all()


class Host:
    """One host of the domain writing key records through PutKey, as itself."""

    def __init__(self, domain: Domain, procs: Processes, name: str) -> None:
        self.name = name
        self.identity = load_host_identity(domain.node_dir(name) / "identity")
        self.signer = keytokens.RecordSigner("local", name, self.identity.signer)
        keys = sealing.unseal_state(domain.genesis, name, self.identity.agreement_private_key)
        self.domain_key = keys[1]
        self.stub: Any = services_pb2_grpc.CoordinatorStub(  # type: ignore[no-untyped-call]
            procs.channel(COORDINATOR, name)
        )

    def record(
        self,
        key_id: str,
        version: int = 1,
        *,
        signer: keytokens.RecordSigner | None = None,
        creator: str = APP,
        **changes: Any,
    ) -> keys_pb2.KeyRecord:
        metadata = keys_pb2.KeyMetadata(
            key_id=key_id,
            description="test",
            state=keys_pb2.KEY_STATE_ENABLED,
            created_at=int(time.time()),
            policy=policy.default_policy(creator),
            current_backing_version=1,
            creator=creator,
            metadata_version=version,
            domain_id="local",
        )
        for name, value in changes.items():
            setattr(metadata, name, value)
        return keytokens.seal_record(
            metadata, {1: crypto.new_aes_key()}, self.domain_key, 1, signer=signer or self.signer
        )

    def put(self, record: keys_pb2.KeyRecord, expected_revision: int = 0) -> int:
        response = self.stub.PutKey(
            services_pb2.PutKeyRequest(record=record, expected_revision=expected_revision),
            timeout=DEADLINE,
        )
        return int(response.revision)

    def get(self, key_id: str) -> keys_pb2.KeyRecord:
        record: keys_pb2.KeyRecord = self.stub.GetKey(
            services_pb2.GetKeyRequest(key_id=key_id), timeout=DEADLINE
        )
        return record

    def delete(self, key_id: str, expected_revision: int) -> None:
        self.stub.DeleteKeyRecord(
            services_pb2.DeleteKeyRecordRequest(key_id=key_id, expected_revision=expected_revision),
            timeout=DEADLINE,
        )


def refused(call: Any, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for fragment in fragments:
        assert fragment in (info.value.details() or ""), info.value.details()


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def hosts(domain: Domain, procs: Processes) -> dict[str, Host]:
    procs.start(COORDINATOR)
    return {name: Host(domain, procs, name) for name in ("hsa-1", "hsa-2", "hsa-3")}


def test_put_key_stores_only_records_signed_by_the_calling_host(hosts: dict[str, Host]) -> None:
    first, second = hosts["hsa-1"], hosts["hsa-2"]
    key_id = new_id()
    assert first.put(first.record(key_id)) == 1
    stored = first.get(key_id)
    assert (stored.signer_host_id, stored.revision) == ("hsa-1", 1)
    # Another member may re-wrap it and sign it again (same metadata, new tokens).
    rewrapped = keytokens.rewrap_record(stored, {1: first.domain_key}, 1, signer=second.signer)
    assert second.put(rewrapped, 1) == 2

    # A record signed by hsa-2, put by hsa-1 (a stolen record, replayed by another host).
    other = new_id()
    refused(
        lambda: first.put(second.record(other)),
        grpc.StatusCode.PERMISSION_DENIED,
        "signed by 'hsa-2', not by hsa-1",
    )
    # hsa-1's name with another key's signature.
    stranger = keytokens.RecordSigner("local", "hsa-1", HostIdentity.generate("hsa-1").signer)
    refused(
        lambda: first.put(first.record(other, signer=stranger)),
        grpc.StatusCode.PERMISSION_DENIED,
        "signature of hsa-1",
    )
    # Any flipped bit of what is signed.
    for edit in (
        lambda r: setattr(r, "metadata", r.metadata + b"\xf8\x07\x01"),  # field 127: parses
        lambda r: setattr(r.tokens[0], "salt", bytes(32)),
        lambda r: setattr(
            r.tokens[0],
            "ciphertext",
            bytes([r.tokens[0].ciphertext[0] ^ 1]) + r.tokens[0].ciphertext[1:],
        ),
        lambda r: setattr(r, "signature", bytes([r.signature[0] ^ 1]) + r.signature[1:]),
    ):
        record = first.record(other)
        edit(record)
        refused(lambda record=record: first.put(record), grpc.StatusCode.PERMISSION_DENIED)
    # Not signed at all.
    unsigned = first.record(other)
    unsigned.signer_host_id, unsigned.signature = "", b""
    refused(lambda: first.put(unsigned), grpc.StatusCode.INVALID_ARGUMENT, "not signed")
    # Sealed under a domain-key generation the domain does not hold (retired, or made up).
    old = first.record(other)
    for token in old.tokens:
        token.domain_key_generation = 0
    first.signer.sign(old)
    refused(lambda: first.put(old), grpc.StatusCode.FAILED_PRECONDITION, "retired")
    # Nothing of it was stored.
    refused(lambda: first.get(other), grpc.StatusCode.NOT_FOUND)


def test_a_signer_that_is_not_a_host_of_the_head_is_refused(
    domain: Domain, procs: Processes, hosts: dict[str, Host]
) -> None:
    # A certificate the CA issued for a host name the domain state does not list.
    layout = domain.layout
    ca = load_domain_ca(layout.root / "ca")
    key_pem = new_tls_key_pem()
    cert = ca.issue(
        SpiffeId("local", "hsa", "hsa-9"), tls_public_key(key_pem), now=datetime.now(UTC)
    )
    tls = TlsMaterial(ca_pem=layout.ca_cert.read_bytes(), cert_pem=cert, key_pem=key_pem)
    channel = transport.mtls_channel(procs.addresses[COORDINATOR], tls, transport.COORDINATOR)
    try:
        stub: Any = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
        outsider = keytokens.RecordSigner("local", "hsa-9", HostIdentity.generate("hsa-9").signer)
        record = hosts["hsa-1"].record(new_id(), signer=outsider)
        refused(
            lambda: stub.PutKey(services_pb2.PutKeyRequest(record=record), timeout=DEADLINE),
            grpc.StatusCode.PERMISSION_DENIED,
            "not a host of the domain at version 1",
        )
    finally:
        channel.close()


def test_put_key_never_rolls_a_key_back_nor_forks_its_metadata(hosts: dict[str, Host]) -> None:
    first = hosts["hsa-1"]
    key_id = new_id()
    first.put(first.record(key_id, 1))
    assert first.put(first.record(key_id, 2, description="two"), 1) == 2
    assert first.put(first.record(key_id, 3, description="three"), 2) == 3
    # Lower metadata version, at the right revision: a rollback.
    refused(
        lambda: first.put(first.record(key_id, 2, description="two"), 3),
        grpc.StatusCode.FAILED_PRECONDITION,
        "metadata version 3 here; a record with version 2 would roll it back",
    )
    # Same metadata version, other metadata bytes: a fork.
    refused(
        lambda: first.put(first.record(key_id, 3, description="other three"), 3),
        grpc.StatusCode.FAILED_PRECONDITION,
        "other metadata at version 3",
    )
    # Same version, same metadata bytes (a re-wrap): fine; a higher version: fine.
    current = first.get(key_id)
    rewrapped = keytokens.rewrap_record(current, {1: first.domain_key}, 1, signer=first.signer)
    assert first.put(rewrapped, 3) == 4
    assert first.put(first.record(key_id, 5, description="five"), 4) == 5
    assert keys_pb2.KeyMetadata.FromString(first.get(key_id).metadata).metadata_version == 5


def test_delete_only_when_the_signed_metadata_says_it_is_due_then_a_tombstone(
    domain: Domain, hosts: dict[str, Host]
) -> None:
    first = hosts["hsa-1"]
    now = int(time.time())
    enabled, later, due = new_id(), new_id(), new_id()
    first.put(first.record(enabled))
    first.put(
        first.record(later, state=keys_pb2.KEY_STATE_PENDING_DELETION, deletion_at=now + 7 * DAY)
    )
    first.put(first.record(due, state=keys_pb2.KEY_STATE_PENDING_DELETION, deletion_at=now - 1))
    refused(lambda: first.delete(enabled, 1), grpc.StatusCode.FAILED_PRECONDITION, "not pending")
    refused(lambda: first.delete(later, 1), grpc.StatusCode.FAILED_PRECONDITION, "not passed yet")
    refused(lambda: first.delete(due, 7), grpc.StatusCode.ABORTED)

    # A hostile store shows "pending deletion, due" in a record no host signed: not deleted.
    db_path = domain.layout.root / "coordinator" / "coordinator.db"
    forged = first.get(enabled)
    metadata = keys_pb2.KeyMetadata.FromString(forged.metadata)
    metadata.state, metadata.deletion_at = keys_pb2.KEY_STATE_PENDING_DELETION, now - DAY
    forged.metadata = metadata.SerializeToString(deterministic=True)
    forged.revision = 0
    with sqlite3.connect(db_path, timeout=10) as db:
        db.execute(
            "UPDATE keys SET record = ? WHERE key_id = ?",
            (forged.SerializeToString(deterministic=True), enabled),
        )
    db.close()
    refused(
        lambda: first.delete(enabled, 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not signed by a host of the domain",
    )

    first.delete(due, 1)
    refused(lambda: first.get(due), grpc.StatusCode.NOT_FOUND)
    listed = first.stub.ListKeyRecords(
        services_pb2.ListKeyRecordsRequest(limit=100), timeout=DEADLINE
    )
    assert due not in {keys_pb2.KeyMetadata.FromString(r.metadata).key_id for r in listed.records}
    # Its id is not created again, and the record is kept (recoverable) with its deletion time.
    refused(lambda: first.put(first.record(due)), grpc.StatusCode.ALREADY_EXISTS, "was deleted")
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT record, deleted_at FROM keys WHERE key_id = ?", (due,)).fetchone()
    db.close()
    assert row is not None
    assert (
        keys_pb2.KeyMetadata.FromString(keys_pb2.KeyRecord.FromString(row[0]).metadata).key_id
        == due
    )
    assert now - 5 <= int(row[1]) <= int(time.time()) + 5


def test_a_host_being_removed_may_not_write_key_records(
    domain: Domain, procs: Processes, hosts: dict[str, Host]
) -> None:
    third = hosts["hsa-3"]
    key_id = new_id()
    third.put(third.record(key_id))
    # Two of three operators approve removing hsa-3. No HSA is registered, so the proposal
    # stays pending with its quorum: from now on hsa-3's writes are refused.
    proposal, approvals = propose(domain, domain.genesis, remove_host("hsa-3"))
    operator: Any = services_pb2_grpc.CoordinatorStub(procs.operator_channel())  # type: ignore[no-untyped-call]
    operator.SubmitProposal(
        services_pb2.SubmitProposalRequest(proposal=proposal.raw, proposer_approval=approvals[0]),
        timeout=DEADLINE,
    )
    status = operator.SubmitApproval(
        services_pb2.SubmitApprovalRequest(approval=approvals[1]), timeout=DEADLINE
    )
    assert status.state == services_pb2.PROPOSAL_STATE_PENDING
    refused(
        lambda: third.put(third.record(new_id())),
        grpc.StatusCode.PERMISSION_DENIED,
        "hsa-3 is being removed from the domain",
    )
    refused(
        lambda: third.put(third.record(key_id, 2, description="late"), 1),
        grpc.StatusCode.PERMISSION_DENIED,
        "hsa-3 is being removed",
    )
    hosts["hsa-1"].put(hosts["hsa-1"].record(new_id()))  # the others write as before
    # The fence is derived from the store: a restarted coordinator keeps it.
    assert procs.stop(COORDINATOR) == 0
    procs.start(COORDINATOR)
    again = Host(domain, procs, "hsa-3")
    refused(
        lambda: again.put(again.record(new_id())),
        grpc.StatusCode.PERMISSION_DENIED,
        "hsa-3 is being removed",
    )
    # Cancelled by its proposer: hsa-3 writes again (after the next sweep).
    operator = services_pb2_grpc.CoordinatorStub(procs.operator_channel())  # type: ignore[no-untyped-call]
    signer = domain.operators[0]
    operator.CancelProposal(
        services_pb2.CancelProposalRequest(
            proposal_id=proposal.id,
            operator_id=signer.public_key.key_id,
            signature=signer.sign(quorum.cancel_message(proposal.id)),
        ),
        timeout=DEADLINE,
    )
    deadline = time.monotonic() + 10
    while not writes(again):
        assert time.monotonic() < deadline, "hsa-3 is still fenced after the cancel"
        time.sleep(0.2)


def writes(host: Host) -> bool:
    """Whether `host` may store a new record now (False: PERMISSION_DENIED)."""
    try:
        host.put(host.record(new_id()))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.PERMISSION_DENIED:
            raise
        return False
    return True


def test_creates_are_capped_per_creator(domain: Domain, procs: Processes) -> None:
    path = domain.layout.coordinator_config
    config = CoordinatorConfig.load(path)
    dataclasses.replace(config, limits={"max_keys_per_principal": 3}).save(path)
    procs.start(COORDINATOR)
    first = Host(domain, procs, "hsa-1")
    for _ in range(3):
        first.put(first.record(new_id()))
    refused(
        lambda: first.put(first.record(new_id())),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{APP} has created 3 keys, the most one principal may have (3)",
    )
    first.put(first.record(new_id(), creator="spiffe://local/client/other"))
