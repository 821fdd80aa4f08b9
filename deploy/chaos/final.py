"""What a chaos run observes at its end, directly from each process (never through a proxy).

Invariants: every observation is made with the demo application's own TLS identity against
each member HSA's own address, or with the operator port's client against the coordinators
(each replica also asked on its own address); the chain is verified from the genesis pinned in
domain.json before any entry of it is reported; on a domain with replicas the store is read
too, from a backup that verifies from that genesis (`final_store`); a failure to observe is
recorded as what went wrong, never as an observation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from deploy import cluster
from deploy.chaos.checker import (
    ChainEntry,
    DecryptObservation,
    FinalObservations,
    KeyObservation,
    completions,
)
from deploy.chaos.final_store import read_store
from deploy.chaos.history import History
from deploy.chaos.report import ProgressLine
from deploy.chaos.workload import AckedCiphertext, KeyRing
from deploy.init import DomainLayout
from domain_core.chain import TrustedChain
from domain_core.errors import HsmDomainError, UnavailableError
from domain_core.model import SealedState
from domain_edge.client import CoordinatorClient
from domain_edge.kms_client import KeyClient
from domain_edge.transport import TlsMaterial

__all__ = [
    "Convergence",
    "ObservedDomain",
    "final_chain",
    "final_decrypts",
    "final_keys",
    "observe_the_end",
    "wait_for_convergence",
]

_KEY_CHECK_PLAINTEXT: Final = b"chaos key check"
_FINAL_WORKERS: Final = 6


class ObservedDomain(Protocol):
    """What the final observations need of a running chaos domain (`ChaosRunner`)."""

    layout: DomainLayout
    members: list[str]
    tls: TlsMaterial

    @property
    def stable_operator_address(self) -> str: ...

    @property
    def replicated(self) -> bool: ...

    def node_addresses(self) -> dict[str, str]: ...

    def direct_operator_addresses(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Convergence:
    """Where the nodes and the coordinator ended up: `seconds` to converge (None: they did
    not within the bound), each member's (version, state hash), the coordinator's, the last
    problem seen, and (a domain with replicas) each replica's head."""

    seconds: float | None
    heads: dict[str, tuple[int, str]]
    coordinator: tuple[int, str] | None
    detail: str
    replicas: dict[str, tuple[int, str]] = field(default_factory=dict)


def _replica_problems(
    clients: dict[str, CoordinatorClient],
    coordinator: tuple[int, str] | None,
    heads: dict[str, tuple[int, str]],
) -> list[str]:
    """Each replica's head, asked of it directly, into `heads`; why one is not on
    `coordinator`."""
    problems: list[str] = []
    for name, client in clients.items():
        try:
            status = client.domain_status()
        except HsmDomainError as error:
            heads.pop(name, None)
            problems.append(f"{name}: {error.message}")
            continue
        heads[name] = (status.version, status.state_hash.hex())
        if heads[name] != coordinator:
            problems.append(
                f"{name} is at version {status.version}, the coordinator at "
                f"{coordinator[0] if coordinator else '?'}"
            )
    return problems


def wait_for_convergence(runner: ObservedDomain, timeout: float) -> Convergence:
    """Poll until every member HSA is healthy on the coordinator's head, and (with replicas)
    every replica on it too (or `timeout`)."""
    began = time.monotonic()
    deadline = began + timeout
    heads: dict[str, tuple[int, str]] = {}
    replicas: dict[str, tuple[int, str]] = {}
    coordinator: tuple[int, str] | None = None
    ca_pem = runner.layout.ca_cert.read_bytes()
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(
            CoordinatorClient(runner.stable_operator_address, ca_pem, timeout=2.0)
        )
        direct = runner.direct_operator_addresses() if runner.replicated else {}
        each = {
            name: stack.enter_context(CoordinatorClient(address, ca_pem, timeout=1.0))
            for name, address in direct.items()
        }
        while True:
            problems: list[str] = []
            try:
                status = client.domain_status()
                coordinator = (status.version, status.state_hash.hex())
            except HsmDomainError as error:
                problems.append(f"coordinator: {error.message}")
            for host in runner.members:
                try:
                    node = cluster.node_status(runner.layout, host, timeout=1.0)
                except UnavailableError as error:
                    problems.append(error.message)
                    heads.pop(host, None)
                    continue
                heads[host] = (node.version, node.state_hash.hex())
                if not node.healthy:
                    problems.append(f"{host} is not healthy: {node.detail or 'no detail'}")
                elif heads[host] != coordinator:
                    problems.append(
                        f"{host} is at version {node.version}, the coordinator at "
                        f"{coordinator[0] if coordinator else '?'}"
                    )
            problems += _replica_problems(each, coordinator, replicas)
            if not problems:
                return Convergence(time.monotonic() - began, heads, coordinator, "", replicas)
            if time.monotonic() > deadline:
                return Convergence(None, heads, coordinator, "; ".join(problems), replicas)
            time.sleep(0.1)


def final_chain(runner: ObservedDomain) -> tuple[list[ChainEntry], str]:
    """The coordinator's chain, verified from the pinned genesis; (entries, error)."""
    layout = runner.layout
    entries: list[ChainEntry] = []
    try:
        genesis = SealedState.from_bytes(layout.genesis_state.read_bytes())
        chain = TrustedChain.from_genesis(layout.domain_id, layout.genesis_hash, genesis)
        entries.append(ChainEntry(1, genesis.hash.hex(), ""))
        with CoordinatorClient(
            runner.stable_operator_address, layout.ca_cert.read_bytes(), timeout=10.0
        ) as client:
            while True:
                batch = client.states_after(chain.version)
                batch = [s for s in batch if s.version > chain.version]
                if not batch:
                    break
                for state in batch:
                    chain.update(state, now=int(time.time()))
                    entries.append(
                        ChainEntry(
                            state.version,
                            state.hash.hex(),
                            state.proposal.id.hex() if state.proposal is not None else "",
                        )
                    )
    except HsmDomainError as error:
        return entries, f"{type(error).__name__}: {error.message}"
    return entries, ""


@contextlib.contextmanager
def _direct_clients(runner: ObservedDomain) -> Iterator[dict[str, KeyClient]]:
    tls = runner.tls
    clients = {
        host: KeyClient(
            [address],
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
            timeout=5.0,
            attempts=4,
            total_timeout=20.0,
        )
        for host, address in runner.node_addresses().items()
    }
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


def final_decrypts(
    runner: ObservedDomain, acked: list[AckedCiphertext], progress: ProgressLine | None = None
) -> dict[int, dict[str, DecryptObservation]]:
    """Decrypt every acknowledged ciphertext on every node, directly."""
    observed: dict[int, dict[str, DecryptObservation]] = {a.op_id: {} for a in acked}
    lock = threading.Lock()
    done = 0
    with _direct_clients(runner) as clients:
        total = len(acked) * len(clients)

        def one(item: tuple[str, AckedCiphertext]) -> None:
            host, ciphertext = item
            try:
                plaintext = clients[host].decrypt(ciphertext.blob, ciphertext.context)
                seen = DecryptObservation(plaintext)
            except HsmDomainError as error:
                seen = DecryptObservation(None, f"{type(error).__name__}: {error.message[:200]}")
            nonlocal done
            with lock:
                observed[ciphertext.op_id][host] = seen
                done += 1
                count = done
            if progress is not None and count % 200 == 0:
                progress.update(f"final decrypts: {count}/{total} ...")

        work = [(host, a) for a in acked for host in clients]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_FINAL_WORKERS) as pool:
            list(pool.map(one, work))
    return observed


def final_keys(runner: ObservedDomain, key_ids: list[str]) -> dict[str, dict[str, KeyObservation]]:
    """Describe every acknowledged key and round-trip data with it, on every node."""
    observed: dict[str, dict[str, KeyObservation]] = {k: {} for k in key_ids}
    lock = threading.Lock()
    with _direct_clients(runner) as clients:

        def one(item: tuple[str, str]) -> None:
            host, key_id = item
            client = clients[host]
            try:
                client.describe_key(key_id)
            except HsmDomainError as error:
                seen = KeyObservation(False, False, f"{type(error).__name__}: {error.message}")
            else:
                try:
                    blob = client.encrypt(key_id, _KEY_CHECK_PLAINTEXT)
                    ok = client.decrypt(blob) == _KEY_CHECK_PLAINTEXT
                    seen = KeyObservation(True, ok, "" if ok else "decrypt returned other bytes")
                except HsmDomainError as error:
                    seen = KeyObservation(True, False, f"{type(error).__name__}: {error.message}")
            with lock:
                observed[key_id][host] = seen

        work = [(host, k) for k in key_ids for host in clients]
        with concurrent.futures.ThreadPoolExecutor(max_workers=_FINAL_WORKERS) as pool:
            list(pool.map(one, work))
    return observed


def acked_keys(events: list[dict[str, Any]]) -> list[str]:
    """The ids of the keys whose creation was acknowledged."""
    return [
        str(done["result"]["key_id"])
        for invoke, done in completions(events)
        if invoke["op"] == "create_key" and done["phase"] == "ok"
    ]


def observe_the_end(
    runner: ObservedDomain,
    history: History,
    ring: KeyRing,
    convergence: Convergence,
    progress: ProgressLine,
    store_backup: Path | None = None,
) -> FinalObservations:
    """Everything the checker needs of the end of a run: the verified chain, every
    acknowledged ciphertext decrypted and every acknowledged key used, on every node; with
    `store_backup` (a domain with replicas), the store itself, backed up there and verified."""
    for host, (version, state_hash) in {**convergence.heads, **convergence.replicas}.items():
        history.info("final", "status", host=host, version=version, state_hash=state_hash)
    progress.step("checking the final chain ...")
    chain, chain_error = final_chain(runner)
    store = None
    if store_backup is not None:
        progress.step("backing up and verifying the store ...")
        store = read_store(runner.layout, store_backup, progress.update)
        history.info("final", "store", backup=str(store_backup), error=store.error)
    events = history.events()
    acked = ring.ciphertexts()
    progress.step(f"decrypting {len(acked)} acknowledged ciphertexts on every node ...")
    decrypts = final_decrypts(runner, acked, progress)
    key_ids = acked_keys(events)
    progress.step(f"checking {len(key_ids)} acknowledged keys on every node ...")
    keys = final_keys(runner, key_ids)
    return FinalObservations(
        nodes=runner.members,
        decrypts=decrypts,
        keys=keys,
        chain=chain,
        chain_error=chain_error,
        converged_after=convergence.seconds,
        heads=convergence.heads,
        coordinator_head=convergence.coordinator,
        convergence_detail=convergence.detail,
        replica_heads=convergence.replicas,
        store=store,
    )
