"""The data-plane load a chaos run puts on the domain while faults are injected.

`DataClient` threads, each with its own `KeyClient` over the proxy endpoints of every HSA (so
the client library's failover is exercised): Encrypt random plaintexts under keys created
during the run, Decrypt earlier acknowledged ciphertexts (checking the plaintext),
GenerateDataKey, and now and then CreateKey. On a domain with coordinator replicas
(`WorkloadConfig.replicated`) a client also rotates keys now and then (RotateKey, a key
change the store must keep), and gives each CreateKey an idempotency key of its own
(`idempotency_key` in the history, and in the key's description, so the checker finds every
key made under it in the store) which it sends again, in a new operation, while the outcome
is unknown. The control workload is `deploy.chaos.control`, the status sampler
`deploy.chaos.sampler`.

Invariants: every operation is recorded in the history as invoke, then exactly one of ok /
fail / unknown (`classify`): fail only when the request surely took no effect (a refusal, or
nothing was sent), unknown when it may have (UNAVAILABLE or a deadline after the request may
have left); an acknowledged CreateKey or RotateKey records the key's metadata version and
backing version; plaintexts and data keys never reach the history (digests and lengths only)
and stay in memory for the final check; every choice is drawn from a seeded `random.Random`.
"""

from __future__ import annotations

import hmac
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from deploy.chaos.history import History, b64, sha256_hex
from domain_core.errors import HsmDomainError, UnavailableError
from domain_edge.kms_client import KeyClient, KeyMetadata
from domain_edge.transport import TlsMaterial

__all__ = [
    "AckedCiphertext",
    "DataClient",
    "KeyRing",
    "WorkloadConfig",
    "classify",
    "idempotency_marker",
]

log = logging.getLogger(__name__)

_DATA_WEIGHTS: Final = {"encrypt": 40, "decrypt": 35, "generate_data_key": 22, "create_key": 3}
# On a domain with replicas: RotateKey too (a key change that must survive in the store).
_REPLICATED_WEIGHTS: Final = {
    "encrypt": 40,
    "decrypt": 35,
    "generate_data_key": 19,
    "create_key": 4,
    "rotate_key": 2,
}
# Attempts of one CreateKey idempotency key while its outcome stays unknown.
_CREATE_ATTEMPTS: Final = 4
# What a key's description says of the idempotency key it was created under.
_MARKER: Final = " idempotency-key "


def idempotency_marker(description: str) -> str:
    """The idempotency key a chaos run's key was created under, from its description ("" for
    a key made otherwise)."""
    _, found, key = description.partition(_MARKER)
    return key if found and description.startswith("chaos run ") else ""


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
    # A domain with coordinator replicas: RotateKey in the mix, CreateKey and domain changes
    # sent again with the same idempotency key while their outcome is unknown.
    replicated: bool = False


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
        self._created = 0
        self.crashed: BaseException | None = None

    def run(self) -> None:
        table = _REPLICATED_WEIGHTS if self._config.replicated else _DATA_WEIGHTS
        ops = list(table)
        weights = list(table.values())
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
        return self._attempt(op_id, call)[0]

    def _attempt(self, op_id: int, call: Callable[[], Any]) -> tuple[Any, str]:
        """Run `call`: (its answer, "ok"), or, its failure recorded, (None, "fail"/"unknown")."""
        try:
            return call(), "ok"
        except Exception as error:
            phase, summary = classify(error)
            self._history.complete(op_id, phase, **summary)
            return None, phase

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
        if self._config.replicated:
            self._create_key_once()
            return
        op_id = self._history.invoke(self.process, "create_key")
        metadata = self._call(
            op_id, lambda: self._client.create_key(description=f"chaos run {self._tag}")
        )
        if metadata is None:
            return
        self._ring.add_key(metadata.key_id)
        self._history.ok(op_id, key_id=metadata.key_id, **_versions(metadata))

    def _create_key_once(self) -> None:
        """CreateKey under an idempotency key of its own, sent again (each attempt its own
        operation) while the outcome is unknown: one key comes of it, never two."""
        self._created += 1
        key = f"{self._tag}-{self.process}-{self._created}"
        description = f"chaos run {self._tag}{_MARKER}{key}"
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            op_id = self._history.invoke(
                self.process, "create_key", idempotency_key=key, attempt=attempt
            )
            metadata, phase = self._attempt(
                op_id,
                lambda: self._client.create_key(description=description, idempotency_key=key),
            )
            if metadata is not None:
                self._ring.add_key(metadata.key_id)
                self._history.ok(op_id, key_id=metadata.key_id, **_versions(metadata))
                return
            if phase != "unknown" or self._halt.is_set():
                return

    def _rotate_key(self) -> None:
        key_id = self._ring.pick_key(self._rng)
        if key_id is None:
            return
        op_id = self._history.invoke(self.process, "rotate_key", key_id=key_id)
        metadata = self._call(op_id, lambda: self._client.rotate_key(key_id))
        if metadata is None:
            return
        self._history.ok(op_id, key_id=metadata.key_id, **_versions(metadata))


def _versions(metadata: KeyMetadata) -> dict[str, int]:
    """What the history keeps of an acknowledged key's metadata."""
    return {
        "metadata_version": metadata.metadata_version,
        "backing_version": metadata.current_backing_version,
    }


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
            history.ok(op_id, key_id=metadata.key_id, **_versions(metadata))
            ring.add_key(metadata.key_id)
            return metadata.key_id
