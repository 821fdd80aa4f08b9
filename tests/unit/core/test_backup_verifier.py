"""domain_core.backup.BackupVerifier: a backup verifies only from the pinned genesis, with
every state chained, every key record from a member, every count and order as its header says.

Each attack builds a backup of a simulated domain (real states, records signed by real host
keys) and changes one thing an attacker holding the file (or a damaged disk) could change.
"""

from __future__ import annotations

import pytest
from support.backups import BackupContent, key_record, new_key_id, proposal_item, replaced
from support.simulator import MaliciousCoordinator, SimulatedDomain

from domain_core.backup import BackupVerifier, KeyFacts
from domain_core.errors import BackupError
from domain_proto import backup_pb2, keys_pb2, services_pb2

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def base_sim() -> SimulatedDomain:
    """A domain at version 3 (a rotation, then hsa-3 removed), with an hsa-4 that never joined."""
    sim = SimulatedDomain.create("local")
    sim.advance(60)
    sim.transition([sim.rotate_domain_key_change()])
    sim.advance(60)
    sim.transition([sim.remove_host_change("hsa-3")])
    return sim


@pytest.fixture
def content(base_sim: SimulatedDomain) -> BackupContent:
    content = BackupContent(base_sim)
    content.add_key(key_record(base_sim, "hsa-1", new_key_id()), revision=3)
    content.add_key(key_record(base_sim, "hsa-2", new_key_id(), version=2))
    return content


def run(
    content: BackupContent,
    header: backup_pb2.BackupHeader | None = None,
    records: list[backup_pb2.BackupRecord] | None = None,
    on_key: list[KeyFacts] | None = None,
) -> object:
    verifier = BackupVerifier(
        content.sim.genesis, on_key=on_key.append if on_key is not None else None
    )
    verifier.header(header or content.header())
    for record in content.records() if records is None else records:
        verifier.record(record)
    return verifier.finish()


def refused(content: BackupContent, *fragments: str, **kwargs: object) -> str:
    with pytest.raises(BackupError) as info:
        run(content, **kwargs)  # type: ignore[arg-type]
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value.message


def test_an_honest_backup_verifies_and_reports_what_it_holds(content: BackupContent) -> None:
    facts: list[KeyFacts] = []
    summary = run(content, on_key=facts)
    assert summary.newest_version == 3  # type: ignore[attr-defined]
    assert summary.hosts == ("hsa-1", "hsa-2")  # type: ignore[attr-defined]
    assert summary.counts.states == 3  # type: ignore[attr-defined]
    assert summary.counts.keys == 2  # type: ignore[attr-defined]
    assert sorted(f.metadata_version for f in facts) == [1, 2]
    assert all(len(f.metadata_hash) == 32 and not f.deleted for f in facts)


# --- the chain -------------------------------------------------------------------------------


def test_a_forged_state_is_refused(content: BackupContent) -> None:
    forged = MaliciousCoordinator(content.sim).sign_with_unknown_host(content.sim.state(2))
    records = content.records()
    records[1].state.state = forged.to_bytes()
    refused(content, "state version 2", "does not verify", records=records)


def test_a_flipped_bit_in_a_state_is_refused(content: BackupContent) -> None:
    records = content.records()
    records[2].state.state = MaliciousCoordinator(content.sim).flip_manifest_bit(
        content.sim.state(3), 200
    )
    refused(content, "state version 3", records=records)


def test_another_genesis_is_refused(content: BackupContent) -> None:
    other = SimulatedDomain.create("local")
    records = content.records()
    records[0].state.state = other.genesis.to_bytes()
    message = refused(content, records=records)
    assert "state version 1" in message
    assert "genesis" in message


def test_a_genesis_with_other_evidence_is_refused(content: BackupContent) -> None:
    """The state hash covers the manifest and secrets only: a backup whose genesis carries
    other evidence (an approval dropped) has the pinned hash, and is still refused."""
    genesis = MaliciousCoordinator.message(content.sim.genesis)
    del genesis.approvals[-1]
    records = content.records()
    records[0].state.state = genesis.SerializeToString()
    refused(content, "state version 1", "not the pinned genesis state", records=records)


def test_a_backup_of_another_domain_is_refused(content: BackupContent) -> None:
    refused(content, "another domain", header=content.header(domain_id="elsewhere"))
    refused(content, "another domain", header=content.header(genesis_hash=b"\x07" * 32))


def test_a_dropped_or_reordered_state_is_refused(content: BackupContent) -> None:
    records = content.records()
    refused(content, "state version 2", "gap", records=[records[0], *records[2:]])
    refused(content, "gap", records=[records[0], records[2], records[1], *records[3:]])


def test_a_header_that_names_an_older_newest_state_is_refused(content: BackupContent) -> None:
    older = content.sim.state(2)
    counts = content.counts().to_message()
    counts.states = 2
    header = content.header(newest_version=2, newest_state_hash=older.hash, counts=counts)
    refused(content, "more states than its header counts", header=header)


# --- key records -----------------------------------------------------------------------------


def test_a_key_record_signed_by_a_non_member_is_refused(content: BackupContent) -> None:
    sim = content.sim
    sim.new_host("hsa-9")  # enrolled, never added: a key the domain does not trust
    content.add_key(key_record(sim, "hsa-1", new_key_id(), sign_as="hsa-9"))
    refused(content, "not a host of the verified domain state")
    content.keys.clear()
    rogue = key_record(sim, "hsa-1", new_key_id())
    rogue.signature = sim.hosts["hsa-9"].signer.sign(b"anything")  # not hsa-1's signature
    content.add_key(rogue)
    refused(content, "does not verify")


def test_a_live_record_signed_by_a_removed_host_is_refused(content: BackupContent) -> None:
    sim = content.sim
    # Written by hsa-3 while it was a member (version 2), still stored after its removal.
    key_id = content.add_key(key_record(sim, "hsa-3", new_key_id(), base=sim.state(2)))
    message = refused(content, f"key {key_id}", "'hsa-3'", "not a host")
    assert "version 3" in message


def test_a_tombstone_signed_by_a_since_removed_host_verifies(content: BackupContent) -> None:
    sim = content.sim
    record = key_record(
        sim,
        "hsa-3",
        new_key_id(),
        base=sim.state(2),
        state=keys_pb2.KEY_STATE_PENDING_DELETION,
        deletion_at=sim.now - 10,
    )
    content.add_key(record, revision=4, deleted_at=sim.now)
    facts: list[KeyFacts] = []
    run(content, on_key=facts)
    assert [f.deleted for f in facts].count(True) == 1


def test_a_tombstone_whose_signed_metadata_does_not_say_deleted_is_refused(
    content: BackupContent,
) -> None:
    sim = content.sim
    content.add_key(key_record(sim, "hsa-1", new_key_id()), deleted_at=sim.now)
    refused(content, "PENDING_DELETION")
    content.keys = [k for k in content.keys if not k.deleted_at]
    early = key_record(
        sim,
        "hsa-1",
        new_key_id(),
        state=keys_pb2.KEY_STATE_PENDING_DELETION,
        deletion_at=sim.now + 86_400,
    )
    content.add_key(early, deleted_at=sim.now)
    refused(content, "before the deletion date")


def test_a_tombstone_signed_by_a_host_no_state_knew_is_refused(content: BackupContent) -> None:
    sim = content.sim
    sim.new_host("hsa-8")
    record = key_record(
        sim,
        "hsa-1",
        new_key_id(),
        state=keys_pb2.KEY_STATE_PENDING_DELETION,
        deletion_at=sim.now,
        sign_as="hsa-8",
    )
    content.add_key(record, deleted_at=sim.now)
    refused(content, "not signed by 'hsa-8'")


def test_a_record_under_a_retired_generation_is_refused(base_sim: SimulatedDomain) -> None:
    sim = SimulatedDomain.create("local", settings=None)
    sim.advance(60)
    sim.transition([sim.set_settings_change(key_generations_retained=2)])
    for _ in range(2):
        sim.advance(60)
        sim.transition([sim.rotate_domain_key_change()])
    content = BackupContent(sim)
    content.add_key(key_record(sim, "hsa-1", new_key_id(), base=sim.state(1)))
    refused(content, "domain key generation 1", "no HSA can open it")


def test_malformed_records_are_refused(content: BackupContent) -> None:
    sim = content.sim
    other = key_record(sim, "hsa-1", new_key_id(), domain_id="elsewhere")
    content.add_key(other)
    refused(content, "another key or domain")
    content.keys.remove(next(k for k in content.keys if k.key_id == other.tokens[0].key_id))
    record = key_record(sim, "hsa-1", new_key_id())
    record.tokens[0].nonce = b"short"
    content.add_key(record)
    refused(content, "malformed")


def test_a_record_moved_to_another_key_id_is_refused(content: BackupContent) -> None:
    first = content.keys[0]
    content.keys[0] = replaced(first, key_id=new_key_id())  # type: ignore[assignment]
    content.keys.sort(key=lambda k: k.key_id)
    refused(content, "another key or domain")


def test_a_creator_that_is_not_the_records_is_refused(content: BackupContent) -> None:
    content.keys[0] = replaced(content.keys[0], creator="spiffe://local/client/x")  # type: ignore[assignment]
    refused(content, "creator")


def test_keys_out_of_order_or_twice_are_refused(content: BackupContent) -> None:
    records = content.records()
    keys = [r for r in records if r.WhichOneof("item") == "key"]
    states = [r for r in records if r.WhichOneof("item") == "state"]
    refused(content, "out of key id order", records=[*states, keys[1], keys[0]])
    header = content.header()
    header.counts.keys = 3
    refused(content, "out of key id order", header=header, records=[*states, *keys, keys[1]])


# --- counts, order, proposals ----------------------------------------------------------------


def test_a_dropped_key_record_is_refused(content: BackupContent) -> None:
    records = content.records()[:-1]
    refused(content, "holds 1 keys, its header counts 2", records=records)


def test_a_record_before_its_kind_is_refused(content: BackupContent) -> None:
    sim = content.sim
    content.proposals = [proposal_item(sim.propose([sim.rotate_domain_key_change()]), [])]
    records = content.records()
    proposal = records.pop(3)  # states 0..2, then the proposal
    refused(content, "a proposal record after the key records", records=[*records, proposal])


def test_proposals_must_be_what_they_claim(content: BackupContent) -> None:
    sim = content.sim
    proposal = sim.propose([sim.rotate_domain_key_change()])
    approvals = sim.approve(proposal, [0, 1])
    item = proposal_item(proposal, approvals, seq=1)
    content.proposals = [item]
    run(content)  # a pending proposal with two approvals verifies
    content.proposals = [replaced(item, proposal_id=b"\x01" * 32)]  # type: ignore[list-item]
    refused(content, "not the SHA-256 of its bytes")
    content.proposals = [replaced(item, base_version=1)]  # type: ignore[list-item]
    refused(content, "proposer or base")
    content.proposals = [replaced(item, state="applied", applied_version=3)]  # type: ignore[list-item]
    refused(content, "APPLIED at version 3, which does not carry it")
    swapped = ((item.approvals[1][0], item.approvals[0][1]), item.approvals[1])
    content.proposals = [replaced(item, approvals=swapped)]  # type: ignore[list-item]
    refused(content, "approval")


def test_the_applied_proposal_of_a_state_verifies_as_applied(base_sim: SimulatedDomain) -> None:
    content = BackupContent(base_sim)
    state = base_sim.state(2)
    assert state.proposal is not None
    item = proposal_item(
        state.proposal, state.message.approvals, seq=5, state="applied", applied_version=2
    )
    content.proposals = [item]
    run(content)


def test_an_unknown_proposal_state_is_refused(content: BackupContent) -> None:
    sim = content.sim
    proposal = sim.propose([sim.rotate_domain_key_change()])
    content.proposals = [proposal_item(proposal, [])]
    records = content.records()
    records[3].proposal.state = services_pb2.PROPOSAL_STATE_UNSPECIFIED
    refused(content, "unknown state", records=records)
