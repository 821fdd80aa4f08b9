"""Two coordinator replicas on one store: a fence set on one stops a key write on the other.

Issue 15, item 2. The attack: a host that a quorate proposal is removing writes its key
records through a replica that has not heard of the proposal (the replica it reached read the
fences before the other replica set them). Were fences kept per replica, the write would land
and be stranded by the change; kept in the store, the write names the fences' revision it was
checked against, the store refuses it (`FencesChangedError`), the replica reads the fences
again and refuses the write with the reason.

Two `CoordinatorService` objects in this process play the replicas, each with its own store
object on the same store (one SQLite file, or one prefix of the session's real etcd cluster),
its own fences and parts, as two processes would have; no HSA is registered, so the quorate
removal stays pending (its fence stays set), as in test_coordinator_key_records.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.hsa_nodes import ROTATE, Domain, domain, domain_template, propose, remove_host

from domain_coordinator import _requests
from domain_coordinator._chain import load_chain
from domain_coordinator._hsa import HsaConnections
from domain_coordinator.service import CoordinatorService
from domain_coordinator.sqlite_store import SqliteStore
from domain_coordinator.store import CoordinatorStore
from domain_coordinator.store_spec import open_store
from domain_core import crypto, keytokens, policy, sealing, transition
from domain_core.errors import PermissionDeniedError
from domain_core.limits import DEFAULT_LIMITS
from domain_core.model import SealedState
from domain_edge.identity_files import load_host_identity
from domain_proto import keys_pb2, services_pb2

__all__ = ["domain", "domain_template"]  # fixtures, imported for this module

pytestmark = pytest.mark.integration

APP = "spiffe://local/client/demo-app"
Opener = Callable[[], CoordinatorStore]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("etcd", marks=pytest.mark.etcd),
    ]
)
def open_replica_store(
    request: pytest.FixtureRequest, domain: Domain, tmp_path: Path
) -> Iterator[Opener]:
    """Opens one more store object on the shared store (each replica has its own)."""
    opened: list[CoordinatorStore] = []
    if request.param == "sqlite":
        path = tmp_path / "shared.db"

        def open_one() -> CoordinatorStore:
            opened.append(SqliteStore(path))
            return opened[-1]

    else:
        from support.etcd import fresh_prefix

        cluster = request.getfixturevalue("etcd_cluster")
        spec = cluster.store_spec(fresh_prefix())

        def open_one() -> CoordinatorStore:
            opened.append(open_store(spec, tmp_path))
            return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def _replica(domain: Domain, store: CoordinatorStore) -> CoordinatorService:
    """One replica: the stored chain verified from the genesis, its own parts."""
    layout = domain.layout
    chain = load_chain(
        store,
        layout.domain_id,
        layout.genesis_hash,
        layout.genesis_state.read_bytes(),
        DEFAULT_LIMITS,
    )
    return CoordinatorService(
        chain=chain,
        store=store,
        hsas=HsaConnections(domain.tls("coordinator"), 2.0, DEFAULT_LIMITS),
        sweep_interval=3600,
    )


def _record(domain: Domain, host: str) -> keys_pb2.KeyRecord:
    """A new key's record, sealed and signed by `host` as that host would."""
    identity = load_host_identity(domain.node_dir(host) / "identity")
    keys = sealing.unseal_state(domain.genesis, host, identity.agreement_private_key)
    metadata = keys_pb2.KeyMetadata(
        key_id=str(uuid.uuid4()),
        description="replica fences",
        state=keys_pb2.KEY_STATE_ENABLED,
        created_at=int(time.time()),
        policy=policy.default_policy(APP),
        current_backing_version=1,
        creator=APP,
        metadata_version=1,
        domain_id="local",
    )
    return keytokens.seal_record(
        metadata,
        {1: crypto.new_aes_key()},
        keys[1],
        1,
        signer=keytokens.RecordSigner("local", host, identity.signer),
    )


def _put(replica: CoordinatorService, host: str, record: keys_pb2.KeyRecord) -> int:
    checked = _requests.key_record(record, "local", DEFAULT_LIMITS)
    return int(replica._keys.put(host, record, checked, 0).revision)


def test_a_fence_set_on_one_replica_stops_a_write_on_the_other(
    domain: Domain, open_replica_store: Opener
) -> None:
    first_store = open_replica_store()
    # The genesis goes in once (as `hsm-domain init` or the first replica does).
    first_store.append_state(1, domain.layout.genesis_state.read_bytes())
    first, second = _replica(domain, first_store), _replica(domain, open_replica_store())
    try:
        # Both replicas take writes from hsa-3 and read the fences doing so.
        assert _put(first, "hsa-3", _record(domain, "hsa-3")) == 1
        assert _put(second, "hsa-3", _record(domain, "hsa-3")) == 1
        # Removing hsa-3 reaches its quorum through the second replica: it sets the fence.
        proposal, approvals = propose(domain, domain.genesis, remove_host("hsa-3"))
        second._flow.submit(proposal.raw, approvals[0])
        second._flow.approve(approvals[1])
        # The first replica never heard of it, and its last read of the fences is stale; the
        # store refuses the write it checked against them, and the re-read refuses it.
        with pytest.raises(PermissionDeniedError, match="hsa-3 is being removed"):
            _put(first, "hsa-3", _record(domain, "hsa-3"))
        with pytest.raises(PermissionDeniedError, match="hsa-3 is being removed"):
            _put(second, "hsa-3", _record(domain, "hsa-3"))
        # The other hosts write through either replica as before.
        assert _put(first, "hsa-1", _record(domain, "hsa-1")) == 1
        assert _put(second, "hsa-2", _record(domain, "hsa-2")) == 1
    finally:
        first.stop()
        second.stop()


def _seal_next(domain: Domain, proposal: Any, approvals: list[Any]) -> bytes:
    """State 2 as an honest hsa-1 would produce it for `proposal` (on the genesis)."""
    head = domain.genesis
    identity = load_host_identity(domain.node_dir("hsa-1") / "identity")
    keys = sealing.unseal_state(head, "hsa-1", identity.agreement_private_key)
    manifest, _ = transition.next_manifest(
        transition.StateHead(head.manifest, head.hash), proposal, approvals, now=int(time.time())
    )
    return sealing.seal_state(
        manifest,
        sealing.next_domain_keys(keys, manifest),
        producer_host_id="hsa-1",
        producer=identity.signer,
        proposal=proposal,
        approvals=approvals,
    ).to_bytes()


def test_a_replica_behind_the_store_judges_a_newer_proposal_on_the_newer_head(
    domain: Domain, open_replica_store: Opener
) -> None:
    """Another replica stored state 2 and this one's notice has not come (a SQLite store
    sends none): a proposal made on version 2 is not refused as stale; the replica adopts the
    stored states first. (Seen in a chaos run during a leader kill.)"""
    first_store = open_replica_store()
    first_store.append_state(1, domain.layout.genesis_state.read_bytes())
    behind = _replica(domain, open_replica_store())
    try:
        assert behind.head.version == 1
        proposal, approvals = propose(domain, domain.genesis, ROTATE)
        first_store.append_state(2, _seal_next(domain, proposal, approvals))
        state2 = SealedState.from_bytes(first_store.get_state(2) or b"")
        newer, newer_approvals = propose(domain, state2, ROTATE)
        status = behind._flow.submit(newer.raw, newer_approvals[0])
        assert status.state == services_pb2.PROPOSAL_STATE_PENDING
        assert behind.head.version == 2
    finally:
        behind.stop()


def test_a_replica_behind_the_store_never_closes_a_newer_proposal_as_stale(
    domain: Domain, open_replica_store: Opener
) -> None:
    """A proposal stored by a replica on version 2 gets an approval through a replica still
    on version 1: it is counted on version 2, not closed as stale."""
    first_store = open_replica_store()
    first_store.append_state(1, domain.layout.genesis_state.read_bytes())
    behind = _replica(domain, open_replica_store())
    proposal, approvals = propose(domain, domain.genesis, ROTATE)
    first_store.append_state(2, _seal_next(domain, proposal, approvals))
    current = _replica(domain, first_store)
    try:
        state2 = SealedState.from_bytes(first_store.get_state(2) or b"")
        newer, newer_approvals = propose(domain, state2, ROTATE)
        current._flow.submit(newer.raw, newer_approvals[0])
        assert behind.head.version == 1
        status = behind._flow.approve(newer_approvals[1])
        assert status.state != services_pb2.PROPOSAL_STATE_STALE, status.detail
        assert behind.head.version == 2
        stored = first_store.get_proposal(newer.id)
        assert stored is not None
        assert stored.state.value != "stale"
        assert len(stored.approvals) == 2
    finally:
        behind.stop()
        current.stop()


def test_a_replica_behind_the_store_answers_with_the_newer_head(
    domain: Domain, open_replica_store: Opener
) -> None:
    """An operator reading the head from a replica whose notice has not come gets the state
    another replica stored (and builds its proposal on it), not the older one."""
    first_store = open_replica_store()
    first_store.append_state(1, domain.layout.genesis_state.read_bytes())
    behind = _replica(domain, open_replica_store())
    try:
        proposal, approvals = propose(domain, domain.genesis, ROTATE)
        first_store.append_state(2, _seal_next(domain, proposal, approvals))
        assert behind.head.version == 1
        latest = behind.get_latest_state(services_pb2.LatestStateRequest(), None)  # type: ignore[arg-type]
        assert SealedState.from_message(latest).version == 2
    finally:
        behind.stop()
