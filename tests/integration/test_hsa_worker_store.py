"""A key service worker's view of its HSA's files, loaded in this process from real files.

The main process's node (writable store) installs states; a worker's node over the same data
directory opened read-only verifies the same chain, follows what the main process persisted
(`StoreFollower`), and never writes a file of the store.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from support.hsa_nodes import (
    ROTATE,
    Domain,
    propose,
    remove_host,
)

from domain_core.errors import FailedPreconditionError, UnavailableError
from domain_core.model import SealedState
from domain_edge.config import NodeConfig
from domain_edge.transport import CertificatePeerContext
from domain_proto import domain_pb2, services_pb2
from hsa_node.keyfloors import MetadataVersionFloor
from hsa_node.server import LoadedNode, load_node
from hsa_node.servicers import CoordinatorPin, HsaAdminServicer
from hsa_node.storage import (
    NodeStore,
    Peer,
    WorkerReady,
    read_worker_ready,
    worker_ready_path,
    write_worker_ready,
)
from hsa_node.worker import StoreFollower

pytestmark = pytest.mark.integration


def load(domain: Domain, host: str, *, read_only: bool = False) -> LoadedNode:
    return load_node(NodeConfig.load(domain.layout.node_configs[host]), read_only=read_only)


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under `directory`."""
    return {
        str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def unavailable() -> int:
    raise UnavailableError("no coordinator in this test")


def apply(
    domain: Domain, producer: LoadedNode, main: LoadedNode, changes: list[domain_pb2.Change]
) -> SealedState:
    """Apply `changes` on `producer` (installing the result there) and offer it to `main`."""
    pin = CoordinatorPin.from_config(producer.config)
    admin = HsaAdminServicer(producer.node, unavailable, coordinator=pin)
    proposal, approvals = propose(domain, producer.node.head, changes)
    request = services_pb2.ApplyProposalRequest(proposal=proposal.raw, approvals=approvals)
    context = CertificatePeerContext(domain.tls("coordinator").cert_pem)
    state = SealedState.from_message(admin.ApplyProposal(request, context))  # type: ignore[arg-type]
    assert producer.node.offer(state)
    main.node.offer(state)
    return state


def test_a_read_only_store_refuses_every_write(domain: Domain, tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError, match="main HSA process creates it"):
        NodeStore(tmp_path / "nothing", read_only=True)
    assert not (tmp_path / "nothing").exists()
    load(domain, "hsa-2")  # the main process creates the store
    store = NodeStore(domain.data_dir("hsa-2"), read_only=True)
    before = snapshot(domain.data_dir("hsa-2"))
    for write in (
        lambda: store.save_state(domain.genesis),
        lambda: store.save_removal(domain.genesis),
        lambda: store.save_address("127.0.0.1:1"),
        lambda: store.save_peers([Peer("hsa-1", "127.0.0.1:2")]),
    ):
        with pytest.raises(FailedPreconditionError, match="only the main HSA process writes"):
            write()
    assert snapshot(domain.data_dir("hsa-2")) == before
    assert store.has_state(1)
    assert not store.has_state(2)
    assert store.removal_stamp() is None


def test_a_worker_node_follows_the_main_store_and_writes_nothing(domain: Domain) -> None:
    producer, main = load(domain, "hsa-1"), load(domain, "hsa-2")
    data_dir = domain.data_dir("hsa-2")
    worker = load(domain, "hsa-2", read_only=True)
    follower = StoreFollower(worker.node, worker.store)
    assert worker.node.serving
    assert follower.poll() == 0

    rotated = apply(domain, producer, main, ROTATE)
    before = snapshot(data_dir)
    assert follower.poll() == 1
    assert worker.node.head.hash == rotated.hash
    assert worker.node.domain_keys() == main.node.domain_keys()
    assert snapshot(data_dir) == before

    # A stored state that does not verify is refused; the worker keeps its head.
    again = apply(domain, producer, main, ROTATE)
    good = worker.store.state_path(again.version).read_bytes()
    worker.store.state_path(again.version).write_bytes(domain.genesis.to_bytes())
    assert follower.poll() == 0
    assert worker.node.version == rotated.version
    worker.store.state_path(again.version).write_bytes(good)
    assert follower.poll() == 1

    # The removal of the host is stored apart from the states: the worker follows it too.
    removal = apply(domain, producer, main, remove_host("hsa-2"))
    assert main.node.removed_at == removal.version
    before = snapshot(data_dir)
    assert follower.poll() == 0
    assert worker.node.removed_at == removal.version
    assert not worker.node.serving
    with pytest.raises(UnavailableError):
        worker.node.domain_keys()
    assert snapshot(data_dir) == before

    # A restarted worker re-verifies the stored chain and the stored removal.
    restarted = load(domain, "hsa-2", read_only=True)
    assert restarted.node.removed_at == removal.version
    assert snapshot(data_dir) == before


def test_worker_ready_files_round_trip(tmp_path: Path) -> None:
    path = worker_ready_path(tmp_path, 2)
    assert path.name == "worker-2.ready"
    assert read_worker_ready(path) is None
    write_worker_ready(path, WorkerReady(pid=123, address="127.0.0.1:5", index=2))
    assert read_worker_ready(path) == WorkerReady(pid=123, address="127.0.0.1:5", index=2)
    path.write_text('{"pid": 1}')
    assert read_worker_ready(path) is None


_ADMIT_SCRIPT = """
import hashlib, sys
from pathlib import Path
from domain_core.errors import FailedPreconditionError
from hsa_node.keyfloors import MetadataVersionFloor

floor = MetadataVersionFloor(Path(sys.argv[1]))
refused = 0
for version in range(1, int(sys.argv[2]) + 1):
    for key in range(5):
        digest = hashlib.sha256(f"k{key}:{version}".encode()).digest()
        try:
            floor.admit(f"k{key}", version, digest)
        except FailedPreconditionError:
            refused += 1  # another process admitted a newer version first: a correct refusal
floor.close()
print(refused)
"""


def test_the_hsa_and_its_workers_share_one_version_floor_safely(tmp_path: Path) -> None:
    """Four processes (an HSA and three workers) admitting records of the same keys at once
    through the shared SQLite floor: no call fails for locking, and the floor ends at the
    newest version, which every process then defends against a fork."""
    path = tmp_path / "key_versions.db"
    versions = 150
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _ADMIT_SCRIPT, str(path), str(versions)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert int(out) >= 0
    floor = MetadataVersionFloor(path)
    try:
        for key in range(5):
            newest = hashlib.sha256(f"k{key}:{versions}".encode()).digest()
            assert floor.highest(f"k{key}") == (versions, newest)
            with pytest.raises(FailedPreconditionError, match="same metadata version"):
                floor.admit(f"k{key}", versions, hashlib.sha256(b"forked").digest())
            with pytest.raises(FailedPreconditionError, match="older record"):
                floor.admit(f"k{key}", versions - 1, b"\0" * 32)
    finally:
        floor.close()
