"""The coordinator cannot hide a fork or withhold states by choosing an HSA's peers (item 8).

Real `hsa-node` processes follow `support.malicious_coordinator`'s coordinator, which holds the
real coordinator certificate and lies:

- it lists to hsa-1 only a colluding "peer" (a real server with a CA-issued HSA certificate
  for a name the domain state does not list, answering as hsa-2), or no peer at all, and it
  withholds version 2 from hsa-1 while hsa-2 gets it. hsa-1 still finds the real hsa-2 (the
  peers are the hosts of its verified state; hsa-2 tells its address when it calls), refuses
  the colluder's answers (they do not verify under hsa-2's key), and catches up from hsa-2;
- hsa-1 cannot reach any peer: after `head_confirmation_seconds` its status and
  `hsm-domain status` say that no peer confirmed its head, it logs it, and it refuses key
  administration (main process and key service worker alike) with UNAVAILABLE and the
  reason, while Encrypt, Decrypt and GenerateDataKey go on; once a peer is back, key
  administration works again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.hsa_nodes import ROTATE, Domain, Processes, copy_domain
from support.malicious_coordinator import (
    KeyRecordCoordinatorServer,
    LogWatch,
    MaliciousCoordinatorServer,
    forging_domain,
    wait_until,
)
from support.simulator import new_host

from deploy.cli import main as hsm_domain
from domain_core import peering
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.config import NodeConfig
from domain_edge.transport import TlsMaterial
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.chaos

SYNC_SECONDS = 0.3
DEADLINE = 5.0


# --- a colluding "peer" --------------------------------------------------------------------------


class ColludingPeer(services_pb2_grpc.HsaPeerServicer):
    """An HsaPeer server the coordinator points hsa-1 at: a CA-issued HSA certificate in
    hsa-2's name over another key, claiming to be hsa-2 with a host key that is not hsa-2's,
    serving only the genesis state and no key floors."""

    def __init__(self, domain: Domain) -> None:
        layout = domain.layout
        ca = load_domain_ca(layout.root / "ca")
        key_pem = new_tls_key_pem()
        # A certificate the domain CA issued for hsa-2's name (the TLS check of the name
        # passes), over a key that is not hsa-2's: only the signed answers can tell.
        cert = ca.issue(
            SpiffeId(layout.domain_id, "hsa", "hsa-2"),
            tls_public_key(key_pem),
            now=datetime.now(UTC),
        )
        self.tls = TlsMaterial(ca_pem=layout.ca_cert.read_bytes(), cert_pem=cert, key_pem=key_pem)
        self.signer = new_host(layout.domain_id, "hsa-9").signer
        self.domain_id = layout.domain_id
        self.genesis = domain.genesis
        self.calls: dict[str, int] = {}
        self.address = ""
        self._server: grpc.Server | None = None

    def start(self) -> str:
        server = transport.make_server(max_workers=8)
        services_pb2_grpc.add_HsaPeerServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        port = server.add_secure_port("127.0.0.1:0", transport.server_credentials(self.tls))
        server.start()
        self._server, self.address = server, f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=0).wait(5)

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def ConfirmHead(self, request: Any, context: Any) -> services_pb2.HeadConfirmation:
        self._count("ConfirmHead")
        return peering.sign_head_confirmation(
            self.signer,
            domain_id=self.domain_id,
            nonce=request.nonce,
            head=peering.PeerHead("hsa-2", 1, self.genesis.hash, bytes(16), 0),
        )

    def GetStatesAfter(self, request: Any, context: Any) -> services_pb2.StatesResponse:
        self._count("GetStatesAfter")
        return services_pb2.StatesResponse(states=[self.genesis.message])

    def GetLatestState(self, request: Any, context: Any) -> domain_pb2.SealedState:
        self._count("GetLatestState")
        return self.genesis.message

    def GetKeyFloors(self, request: Any, context: Any) -> services_pb2.KeyFloors:
        self._count("GetKeyFloors")
        return peering.sign_key_floors(
            self.signer,
            domain_id=self.domain_id,
            nonce=request.nonce,
            host_id="hsa-2",
            page=services_pb2.KeyFloorPage(epoch=bytes(16)),
        )


# --- helpers -------------------------------------------------------------------------------------


def configure(domain: Domain, host: str, **changes: Any) -> None:
    path = domain.layout.node_configs[host]
    dataclasses.replace(NodeConfig.load(path), **changes).save(path)


def peers_file(domain: Domain, host: str) -> dict[str, str]:
    path = domain.data_dir(host) / "peers.json"
    if not path.exists():
        return {}
    return {p["host_id"]: p["address"] for p in json.loads(path.read_text())["peers"]}


@pytest.fixture
def colluder(domain_template: Path, tmp_path: Path) -> Iterator[tuple[Domain, ColludingPeer]]:
    domain = copy_domain(domain_template, tmp_path / "d")
    peer = ColludingPeer(domain)
    peer.start()
    try:
        yield domain, peer
    finally:
        peer.stop()


# --- peers come from the verified state --------------------------------------------------------


@pytest.mark.parametrize("lie", ["a colluding peer", "no peer at all"])
def test_a_coordinator_that_hides_the_real_peers_cannot_keep_an_hsa_on_an_old_head(
    colluder: tuple[Domain, ColludingPeer], lie: str
) -> None:
    domain, fake = colluder
    server = MaliciousCoordinatorServer(domain.layout)
    procs = Processes(domain)
    try:
        server.start()
        sim = forging_domain(domain.layout)
        server.serve(sim.genesis)
        # From the first call on, hsa-1 hears of no real peer; hsa-2 is told the truth.
        listed = [("hsa-2", fake.address), ("hsa-9", fake.address)] if lie.startswith("a ") else []
        server.chain.listed_for["hsa-1"] = listed
        domain.configure_nodes(
            coordinator=server.address,
            pull_interval_seconds=SYNC_SECONDS,
            gossip_interval_seconds=SYNC_SECONDS,
        )
        procs.start("hsa-1", "hsa-2")
        server.wait_registered(("hsa-1", "hsa-2"))
        log = LogWatch(procs.log_path("hsa-1"), whole=True)

        # Version 2 for hsa-2 only: the coordinator withholds it from hsa-1 everywhere.
        server.chain.withheld_after["hsa-1"] = 1
        v2 = sim.transition(ROTATE)
        server.serve(*sim.states)
        assert server.push(procs.addresses["hsa-2"], v2).version == 2

        def caught_up() -> bool:
            status = server.status(procs.addresses["hsa-1"])
            return (status.version, status.state_hash) == (2, v2.hash)

        wait_until(caught_up, "hsa-1 to get version 2 from the real hsa-2", timeout=15)
        log.wait_for("installed state version 2")
        log.wait_for("from peer hsa-2")
        assert server.chain.calls["ListHsas"] > 0
        # hsa-1 keeps the real hsa-2, at the address whose answer verified under its key.
        assert peers_file(domain, "hsa-1") == {"hsa-2": procs.addresses["hsa-2"]}
        if listed:
            assert fake.calls.get("ConfirmHead", 0) > 0  # it was asked, and not believed
            log.wait_for("does not verify")
            assert fake.calls.get("GetStatesAfter", 0) == 0
            assert fake.calls.get("GetKeyFloors", 0) == 0
        status = server.status(procs.addresses["hsa-1"])
        assert status.healthy
        assert not status.head_unconfirmed
    finally:
        procs.kill_all()
        server.stop()


# --- a head no peer confirms ---------------------------------------------------------------------


BOUND_SECONDS = 2.0


class KeyCalls:
    """KeyService calls as the demo application to one address (an HSA or its worker)."""

    def __init__(self, address: str, tls: TlsMaterial) -> None:
        self.channel = transport.mtls_channel(address, tls, transport.ANY_HSA)
        self.stub: Any = services_pb2_grpc.KeyServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def create(self) -> str:
        response = self.stub.CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE)
        return str(response.metadata.key_id)

    def encrypt(self, key_id: str, plaintext: bytes) -> bytes:
        request = services_pb2.EncryptRequest(key_id=key_id, plaintext=plaintext)
        return bytes(self.stub.Encrypt(request, timeout=DEADLINE).ciphertext_blob)

    def decrypt(self, blob: bytes) -> bytes:
        request = services_pb2.DecryptRequest(ciphertext_blob=blob)
        return bytes(self.stub.Decrypt(request, timeout=DEADLINE).plaintext)

    def administration(self, key_id: str) -> dict[str, Callable[[], object]]:
        """Every key administration call, each as it would change `key_id` (or make a key)."""
        key = services_pb2.KeyIdRequest(key_id=key_id)
        timeout = DEADLINE
        return {
            "CreateKey": lambda: self.stub.CreateKey(
                services_pb2.CreateKeyRequest(), timeout=timeout
            ),
            "RotateKey": lambda: self.stub.RotateKey(key, timeout=timeout),
            "PutKeyPolicy": lambda: self.stub.PutKeyPolicy(
                services_pb2.PutKeyPolicyRequest(
                    key_id=key_id,
                    policy=self.stub.DescribeKey(key, timeout=timeout).metadata.policy,
                ),
                timeout=timeout,
            ),
            "DisableKey": lambda: self.stub.DisableKey(key, timeout=timeout),
            "EnableKey": lambda: self.stub.EnableKey(key, timeout=timeout),
            "ScheduleKeyDeletion": lambda: self.stub.ScheduleKeyDeletion(
                services_pb2.ScheduleKeyDeletionRequest(key_id=key_id), timeout=timeout
            ),
            "CancelKeyDeletion": lambda: self.stub.CancelKeyDeletion(key, timeout=timeout),
        }

    def close(self) -> None:
        self.channel.close()


def refusal(call: Callable[[], object]) -> grpc.RpcError | None:
    """The error `call` fails with, or None when it succeeds."""
    try:
        call()
    except grpc.RpcError as error:
        return error
    return None


def test_an_hsa_no_peer_confirms_refuses_key_administration_and_keeps_encrypting(
    domain_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = copy_domain(domain_template, tmp_path / "d")
    server = KeyRecordCoordinatorServer(domain.layout)
    procs = Processes(domain)
    calls: list[KeyCalls] = []
    try:
        server.start()
        server.serve(forging_domain(domain.layout).genesis)
        domain.configure_nodes(
            coordinator=server.address,
            pull_interval_seconds=SYNC_SECONDS,
            gossip_interval_seconds=SYNC_SECONDS,
            head_confirmation_seconds=BOUND_SECONDS,
        )
        configure(domain, "hsa-1", key_service_workers=1)
        procs.start("hsa-1", "hsa-2")
        server.wait_registered(("hsa-1", "hsa-2"))
        worker_address = json.loads(procs.ready_file("hsa-1").read_text())["workers"][0]
        app = domain.tls("demo-app")
        main, worker = KeyCalls(procs.addresses["hsa-1"], app), KeyCalls(worker_address, app)
        calls += [main, worker]
        wait_until(
            lambda: not server.status(procs.addresses["hsa-1"]).key_service_waiting,
            "hsa-1's key service to take hsa-2's floors",
        )
        key_id = main.create()
        blob = main.encrypt(key_id, b"ledger")
        assert worker.decrypt(blob) == b"ledger"
        log = LogWatch(procs.log_path("hsa-1"))

        # Its only peer goes away: nobody can confirm hsa-1's head any more.
        procs.stop("hsa-2")

        def refused_everywhere() -> bool:
            return all(
                (e := refusal(c.administration(key_id)["CreateKey"])) is not None
                and e.code() == grpc.StatusCode.UNAVAILABLE
                for c in (main, worker)
            )

        wait_until(refused_everywhere, "hsa-1 to refuse CreateKey", timeout=4 * BOUND_SECONDS + 5)
        for where in (main, worker):
            for name, call in where.administration(key_id).items():
                error = refusal(call)
                assert error is not None, f"{name} was not refused"
                assert error.code() == grpc.StatusCode.UNAVAILABLE, (name, error.details())
                details = error.details() or ""
                assert (
                    "has not confirmed its domain state (version 1) with any other HSA" in details
                )
                assert f"{name} and the other key administration calls are refused" in details
                assert "encryption and decryption go on" in details
                # Refused before anything was done: a definite failure on the wire, which a
                # client may send again anywhere (not "may have been applied").
                assert transport.nothing_applied(error), name
            # The data plane is untouched.
            again = where.encrypt(key_id, b"still here")
            assert main.decrypt(again) == b"still here"
            assert where.decrypt(blob) == b"ledger"
            data_key = where.stub.GenerateDataKey(
                services_pb2.GenerateDataKeyRequest(key_id=key_id), timeout=DEADLINE
            )
            assert len(data_key.plaintext) == 32
        status = server.status(procs.addresses["hsa-1"])
        assert status.healthy
        assert status.head_unconfirmed
        assert "head not confirmed by any peer for" in status.detail
        assert "key administration refused" in status.detail
        log.wait_for("not confirmed by any peer")
        log.wait_for("refusing key administration until a peer confirms it")
        # `hsm-domain status` shows it (hsa-2 and hsa-3 are down, the coordinator is not one
        # of the domain's processes here: it reports them and exits 1).
        assert hsm_domain(["status", str(domain.layout.root)]) == 1
        [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("hsa-1 ")]
        assert "head not confirmed by any peer" in line

        # A peer is back: it confirms the head, and key administration works again.
        procs.start("hsa-2")
        wait_until(
            lambda: not server.status(procs.addresses["hsa-1"]).head_unconfirmed,
            "a peer to confirm hsa-1's head again",
            timeout=15,
        )
        log.wait_for("confirmed by a peer again; key administration allowed")
        assert main.create()
        wait_until(lambda: refusal(worker.create) is None, "the worker to allow CreateKey")
    finally:
        for call in calls:
            call.close()
        procs.kill_all()
        server.stop()
