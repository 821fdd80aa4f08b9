"""The load a chaos run puts on the domain while faults are injected, and the status sampler.

- `DataClient` threads, each with its own `KeyClient` over the proxy endpoints of every HSA
  (so the client library's failover is exercised): Encrypt random plaintexts under keys
  created during the run, Decrypt earlier acknowledged ciphertexts (checking the plaintext),
  GenerateDataKey, and now and then CreateKey.
- `ControlClient`: quorum-approved domain changes through the coordinator's operator port with
  the demo operator tokens: rotate-domain-key, add-operator (a fresh file token made in the run
  directory) and remove-operator of an operator it added.
- `Sampler`: HsaAdmin.GetStatus of every node and the coordinator's head, every
  `interval` seconds, straight to each process (not through the proxies).

Invariants: every operation is recorded in the history as invoke, then exactly one of ok /
fail / unknown (`classify`): fail only when the request surely took no effect (a refusal, or
nothing was sent), unknown when it may have (UNAVAILABLE or a deadline after the request may
have left); plaintexts and data keys never reach the history (digests and lengths only) and
stay in memory for the final check; every choice is drawn from a seeded `random.Random`.
"""

from __future__ import annotations

import hmac
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from deploy._files import make_private_dir
from deploy.chaos.history import History, b64, sha256_hex
from deploy.localdomain import FAST_SCRYPT_N
from domain_core import crypto, quorum
from domain_core.changes import add_operator, remove_operator, rotate_domain_key
from domain_core.errors import (
    AlreadyExistsError,
    HsmDomainError,
    NotFoundError,
    UnavailableError,
)
from domain_core.model import NONCE_BYTES, Proposal, SealedState, make_operator
from domain_core.signers import SignatureAlgorithm, Signer
from domain_edge.client import CoordinatorClient
from domain_edge.file_tokens import create_file_token
from domain_edge.kms_client import KeyClient
from domain_edge.transport import TlsMaterial, hsa_host, mtls_channel
from domain_proto import domain_pb2, services_pb2, services_pb2_grpc

__all__ = [
    "CHAOS_OPERATOR_PREFIX",
    "AckedCiphertext",
    "ControlClient",
    "DataClient",
    "KeyRing",
    "Sampler",
    "WorkloadConfig",
    "classify",
]

log = logging.getLogger(__name__)

CHAOS_OPERATOR_PREFIX: Final = "chaos-"
_DATA_WEIGHTS: Final = {"encrypt": 40, "decrypt": 35, "generate_data_key": 22, "create_key": 3}
_RESOLVE_POLL: Final = 0.5


@dataclass(frozen=True)
class WorkloadConfig:
    """How hard and how the workload drives the domain."""

    clients: int = 3
    think_time: float = 0.005  # seconds a data client waits between two operations
    max_plaintext: int = 256
    client_timeout: float = 2.0  # per attempt; KeyClient bounds a call at 3x this
    control_interval: float = 2.0  # seconds between two domain changes
    resolve_timeout: float = 15.0  # how long an uncertain domain change is followed
    operator_timeout: float = 5.0


def classify(error: BaseException) -> tuple[str, dict[str, Any]]:
    """The outcome of a failed call: ("unknown" or "fail", a summary for the history)."""
    if isinstance(error, UnavailableError):
        return "unknown", {"error": type(error).__name__, "detail": error.message[:300]}
    if isinstance(error, HsmDomainError):
        return "fail", {"error": type(error).__name__, "detail": error.message[:300]}
    return "unknown", {"error": type(error).__name__, "detail": str(error)[:300]}


@dataclass(frozen=True)
class AckedCiphertext:
    """An acknowledged ciphertext and what decrypts it (the plaintext stays in memory)."""

    op_id: int
    key_id: str
    blob: bytes
    context: dict[str, str]
    plaintext: bytes

    def __repr__(self) -> str:
        return f"AckedCiphertext(op_id={self.op_id}, key_id={self.key_id!r})"


class KeyRing:
    """Keys and ciphertexts acknowledged so far, shared by the data clients."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: list[str] = []
        self._ciphertexts: list[AckedCiphertext] = []

    def add_key(self, key_id: str) -> None:
        """A key whose CreateKey was acknowledged."""
        with self._lock:
            self._keys.append(key_id)

    def add_ciphertext(self, acked: AckedCiphertext) -> None:
        """A ciphertext whose Encrypt or GenerateDataKey was acknowledged."""
        with self._lock:
            self._ciphertexts.append(acked)

    def pick_key(self, rng: random.Random) -> str | None:
        """A random acknowledged key (recent ones a little more often)."""
        with self._lock:
            if not self._keys:
                return None
            if len(self._keys) > 4 and rng.random() < 0.3:
                return rng.choice(self._keys[-4:])
            return rng.choice(self._keys)

    def pick_ciphertext(self, rng: random.Random) -> AckedCiphertext | None:
        """A random acknowledged ciphertext."""
        with self._lock:
            return rng.choice(self._ciphertexts) if self._ciphertexts else None

    def keys(self) -> list[str]:
        """Every acknowledged key."""
        with self._lock:
            return list(self._keys)

    def ciphertexts(self) -> list[AckedCiphertext]:
        """Every acknowledged ciphertext."""
        with self._lock:
            return list(self._ciphertexts)


# --- the data plane ---------------------------------------------------------------------------


class DataClient(threading.Thread):
    """One application thread: Encrypt, Decrypt, GenerateDataKey, CreateKey in a loop."""

    def __init__(
        self,
        index: int,
        endpoints: Sequence[str],
        tls: TlsMaterial,
        ring: KeyRing,
        history: History,
        config: WorkloadConfig,
        seed: int,
        stop: threading.Event,
        run_tag: str,
    ) -> None:
        super().__init__(name=f"chaos-client-{index}", daemon=True)
        self.process = f"client-{index}"
        self._client = KeyClient(
            list(endpoints),
            ca_pem=tls.ca_pem,
            cert_pem=tls.cert_pem,
            key_pem=tls.key_pem,
            timeout=config.client_timeout,
        )
        self._ring = ring
        self._history = history
        self._config = config
        self._rng = random.Random(f"{seed}/client/{index}")  # noqa: S311 - test data
        self._halt = stop
        self._tag = run_tag
        self.crashed: BaseException | None = None

    def run(self) -> None:
        ops = list(_DATA_WEIGHTS)
        weights = list(_DATA_WEIGHTS.values())
        try:
            while not self._halt.is_set():
                op = self._rng.choices(ops, weights)[0]
                getattr(self, f"_{op}")()
                if self._config.think_time:
                    self._halt.wait(self._config.think_time)
        except BaseException as error:  # a bug here must not pass silently
            self.crashed = error
            log.exception("%s crashed", self.process)
        finally:
            self._client.close()

    def _plaintext(self) -> bytes:
        return self._rng.randbytes(self._rng.randint(1, self._config.max_plaintext))

    def _context(self, op_id: int) -> dict[str, str]:
        return {"chaos-run": self._tag, "op": str(op_id)}

    def _call(self, op_id: int, call: Callable[[], Any]) -> Any:
        """Run `call`; on failure record the outcome and return None."""
        try:
            return call()
        except Exception as error:
            phase, summary = classify(error)
            self._history.complete(op_id, phase, **summary)
            return None

    def _encrypt(self) -> None:
        key_id = self._ring.pick_key(self._rng)
        if key_id is None:
            return
        plaintext = self._plaintext()
        op_id = self._history.invoke(
            self.process,
            "encrypt",
            key_id=key_id,
            plaintext_sha256=sha256_hex(plaintext),
            plaintext_bytes=len(plaintext),
        )
        context = self._context(op_id)
        self._history.remember_plaintext(op_id, plaintext)
        blob = self._call(op_id, lambda: self._client.encrypt(key_id, plaintext, context))
        if blob is None:
            return
        self._ring.add_ciphertext(AckedCiphertext(op_id, key_id, blob, context, plaintext))
        self._history.ok(op_id, ciphertext=b64(blob), context=context)

    def _decrypt(self) -> None:
        acked = self._ring.pick_ciphertext(self._rng)
        if acked is None:
            return
        op_id = self._history.invoke(
            self.process, "decrypt", key_id=acked.key_id, source_op=acked.op_id
        )
        plaintext = self._call(op_id, lambda: self._client.decrypt(acked.blob, acked.context))
        if plaintext is None:
            return
        match = hmac.compare_digest(plaintext, acked.plaintext)
        self._history.ok(op_id, match=match, plaintext_bytes=len(plaintext))

    def _generate_data_key(self) -> None:
        key_id = self._ring.pick_key(self._rng)
        if key_id is None:
            return
        op_id = self._history.invoke(self.process, "generate_data_key", key_id=key_id)
        context = self._context(op_id)
        answer = self._call(op_id, lambda: self._client.generate_data_key(key_id, context))
        if answer is None:
            return
        data_key, blob = answer
        self._history.remember_plaintext(op_id, data_key)
        self._ring.add_ciphertext(AckedCiphertext(op_id, key_id, blob, context, data_key))
        # The data key itself is secret: only its length goes to the history.
        self._history.ok(op_id, ciphertext=b64(blob), context=context, data_key_bytes=len(data_key))

    def _create_key(self) -> None:
        op_id = self._history.invoke(self.process, "create_key")
        metadata = self._call(
            op_id, lambda: self._client.create_key(description=f"chaos run {self._tag}")
        )
        if metadata is None:
            return
        self._ring.add_key(metadata.key_id)
        self._history.ok(op_id, key_id=metadata.key_id)


def create_bootstrap_key(
    endpoints: Sequence[str],
    tls: TlsMaterial,
    ring: KeyRing,
    history: History,
    run_tag: str,
    timeout: float = 30.0,
) -> str:
    """Create the first key before the faults start (retried until `timeout`)."""
    deadline = time.monotonic() + timeout
    with KeyClient(
        list(endpoints), ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem
    ) as client:
        while True:
            op_id = history.invoke("setup", "create_key")
            try:
                metadata = client.create_key(description=f"chaos run {run_tag}")
            except HsmDomainError as error:
                phase, summary = classify(error)
                history.complete(op_id, phase, **summary)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            history.ok(op_id, key_id=metadata.key_id)
            ring.add_key(metadata.key_id)
            return metadata.key_id


# --- the control plane ------------------------------------------------------------------------


class ControlClient(threading.Thread):
    """Quorum-approved domain changes, one at a time, every `control_interval` seconds."""

    def __init__(
        self,
        operator_address: str,
        ca_pem: bytes,
        signers: Sequence[tuple[str, Signer]],
        token_dir: Path,
        history: History,
        config: WorkloadConfig,
        seed: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="chaos-control", daemon=True)
        if len(signers) < 1:
            raise ValueError("the control workload needs at least one operator token")
        self.process = "control"
        self._address = operator_address
        self._ca_pem = ca_pem
        self._signers = list(signers)
        self._token_dir = token_dir
        self._history = history
        self._config = config
        self._rng = random.Random(f"{seed}/control")  # noqa: S311 - a test schedule
        self._halt = stop
        self._added = 0
        self.crashed: BaseException | None = None

    def run(self) -> None:
        try:
            with CoordinatorClient(
                self._address, self._ca_pem, timeout=self._config.operator_timeout
            ) as client:
                while not self._halt.wait(self._config.control_interval):
                    self._one_change(client)
        except BaseException as error:
            self.crashed = error
            log.exception("the control workload crashed")

    def _one_change(self, client: CoordinatorClient) -> None:
        try:
            head = client.latest_state()
        except HsmDomainError:
            return  # nothing was proposed: no operation to record
        chaos_operators = [
            o for o in head.manifest.message.operators if o.name.startswith(CHAOS_OPERATOR_PREFIX)
        ]
        if self._rng.random() < 0.5:
            self._change(client, head, "rotate-domain-key", [rotate_domain_key()], {})
        elif chaos_operators:
            target = chaos_operators[0]
            self._change(
                client,
                head,
                "remove-operator",
                [remove_operator(target.operator_id)],
                {"operator": target.name, "operator_id": target.operator_id},
            )
        else:
            self._added += 1
            name = f"{CHAOS_OPERATOR_PREFIX}{self._rng.getrandbits(32):08x}-{self._added}"
            path = self._token_dir / f"{name}.token"
            make_private_dir(path.parent)
            # A throwaway operator: its passphrase lives only here and is dropped at once.
            public_key = create_file_token(
                path,
                SignatureAlgorithm.ED25519,
                secrets.token_urlsafe(24).encode("ascii"),
                name=name,
                scrypt_n=FAST_SCRYPT_N,
            )
            operator = make_operator(name, public_key)
            self._change(
                client,
                head,
                "add-operator",
                [add_operator(operator)],
                {"operator": name, "operator_id": operator.operator_id},
            )

    def _change(
        self,
        client: CoordinatorClient,
        head: SealedState,
        kind: str,
        changes: list[domain_pb2.Change],
        details: dict[str, str],
    ) -> None:
        proposer_name, proposer = self._signers[0]
        now = int(time.time())
        proposal = Proposal.create(
            domain_id=head.manifest.domain_id,
            base_version=head.version,
            base_state_hash=head.hash,
            changes=changes,
            proposer_id=proposer.public_key.key_id,
            created_at=now,
            expires_at=now + 600,
            reason=f"chaos run: {kind}",
            nonce=crypto.random_bytes(NONCE_BYTES),
        )
        op_id = self._history.invoke(
            self.process,
            kind,
            proposal_id=proposal.id.hex(),
            base_version=head.version,
            proposer=proposer_name,
            **details,
        )
        phase, result = self._drive(client, proposal, proposer)
        if phase == "ok":
            result["state_hash"] = self._state_hash(client, int(result["version"]), proposal)
        self._history.complete(op_id, phase, **result)

    def _drive(
        self, client: CoordinatorClient, proposal: Proposal, proposer: Signer
    ) -> tuple[str, dict[str, Any]]:
        """Submit, approve until applied, and follow an uncertain step until it is settled."""
        deadline = time.monotonic() + self._config.resolve_timeout
        uncertain = ""
        view = None
        try:
            view = client.submit_proposal(proposal, quorum.approve(proposal, proposer))
        except UnavailableError as error:
            uncertain = error.message
        except HsmDomainError as error:
            return classify(error)
        while True:
            if view is None:
                if time.monotonic() > deadline:
                    return "unknown", {"error": "UnavailableError", "detail": uncertain[:300]}
                try:
                    view = client.get_proposal(proposal.id)
                except NotFoundError:
                    # The uncertain submission never reached the store.
                    return "fail", {"error": "NotFoundError", "detail": "never stored"}
                except UnavailableError as error:
                    uncertain = error.message
                    time.sleep(_RESOLVE_POLL)
                    continue
                except HsmDomainError as error:
                    return classify(error)
            if view.applied:
                return "ok", {
                    "version": view.applied_version,
                    "proposal_id": proposal.id.hex(),
                }
            if view.state != "pending":
                return "fail", {"error": view.state, "detail": view.detail[:300]}
            if time.monotonic() > deadline:
                return "unknown", {"error": "pending", "detail": view.detail[:300]}
            approver = next(
                (s for _, s in self._signers if s.public_key.key_id not in view.approved_by),
                None,
            )
            if approver is None or len(view.approved_by) >= view.threshold:
                # Quorum is there; the coordinator retries the apply: follow it.
                time.sleep(_RESOLVE_POLL)
                view = None
                continue
            try:
                view = client.submit_approval(quorum.approve(proposal, approver))
            except (UnavailableError, AlreadyExistsError) as error:
                uncertain = error.message
                view = None
            except HsmDomainError as error:
                return classify(error)

    def _state_hash(self, client: CoordinatorClient, version: int, proposal: Proposal) -> str:
        """The hash of the acknowledged state (empty if it cannot be read now)."""
        try:
            states = client.states_after(version - 1, limit=1)
        except HsmDomainError:
            return ""
        if not states or states[0].version != version:
            return ""
        state = states[0]
        if state.proposal is None or state.proposal.id != proposal.id:
            return ""
        return state.hash.hex()


# --- sampling ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Records every node's and the coordinator's version and state hash, periodically.

    Each process is sampled by its own thread, so a paused one (whose calls time out) does
    not slow the sampling of the others; one thread's samples are in the order it took them.
    """

    def __init__(
        self,
        addresses: Callable[[], dict[str, str]],
        operator_address: str,
        tls: TlsMaterial,
        history: History,
        stop: threading.Event,
        interval: float = 0.5,
    ) -> None:
        super().__init__(name="chaos-sampler", daemon=True)
        self._addresses = addresses
        self._operator_address = operator_address
        self._tls = tls
        self._history = history
        self._halt = stop
        self._interval = interval
        self._lock = threading.Lock()
        self.samples = 0
        self.misses = 0

    def _count(self, sampled: bool) -> None:
        with self._lock:
            if sampled:
                self.samples += 1
            else:
                self.misses += 1

    def _record(self, host: str, version: int, state_hash: bytes, healthy: bool) -> None:
        self._count(True)
        self._history.info(
            "sampler",
            "status",
            host=host,
            version=version,
            state_hash=state_hash.hex(),
            healthy=healthy,
        )

    def _sample_node(self, host: str) -> None:
        channels: dict[str, grpc.Channel] = {}
        try:
            while not self._halt.is_set():
                address = self._addresses().get(host)
                if address is not None:
                    channel = channels.get(address)
                    if channel is None:
                        channel = channels[address] = mtls_channel(
                            address, self._tls, hsa_host(host)
                        )
                    stub = services_pb2_grpc.HsaAdminStub(channel)  # type: ignore[no-untyped-call]
                    try:
                        status: services_pb2.HsaStatus = stub.GetStatus(
                            services_pb2.HsaStatusRequest(), timeout=1.0
                        )
                    except grpc.RpcError:
                        self._count(False)
                    else:
                        self._record(host, status.version, status.state_hash, status.healthy)
                self._halt.wait(self._interval)
        finally:
            for channel in channels.values():
                channel.close()

    def _sample_coordinator(self) -> None:
        with CoordinatorClient(self._operator_address, self._tls.ca_pem, timeout=1.0) as client:
            while not self._halt.is_set():
                try:
                    status = client.domain_status()
                except HsmDomainError:
                    self._count(False)
                else:
                    self._record("coordinator", status.version, status.state_hash, True)
                self._halt.wait(self._interval)

    def run(self) -> None:
        threads = [
            threading.Thread(
                target=self._sample_node, args=(host,), name=f"chaos-sampler-{host}", daemon=True
            )
            for host in self._addresses()
        ]
        threads.append(
            threading.Thread(
                target=self._sample_coordinator, name="chaos-sampler-coordinator", daemon=True
            )
        )
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
