"""An HSA's audit heads off the host: its own published, its peers' kept, its own recovered.

The head of an audit log is its newest signed checkpoint (`domain_edge.audit.AuditHead`),
which the log's writer keeps beside it (`<log>.head`). Cutting or deleting a log on this
host is seen only by comparing it with a head kept somewhere else, so:
- `AuditHeadBook.own` reads the head files of every audit log of this host (the main
  process's `audit.log` and each key service worker's `audit-worker-<i>.log`): what the HSA
  reports with `RegisterHsa` and serves to peers (`HsaPeer.GetAuditHeads`);
- `AuditHeadBook.learn` keeps, in `data_dir/peer-audit-heads.json` (0600, atomic write), the
  highest head per host and log that peers serve during gossip;
- `recover_own_heads`, at start and before any log is opened, asks the coordinator and the
  peers for this host's own heads and raises the local head files to any higher one, so a log
  deleted together with its head file is still refused (`AuditLog` will not resume below its
  head file).

Invariants: a head is believed only after it verified under the host's Ed25519 key (a peer's
from this node's verified head, this host's own from its identity) and names one of an HSA's
log files; a kept head is only ever raised: a lower head (a possible cut) or one of another
chain is refused and logged at WARNING; nothing a source says can lower a head file or make
the node skip a check. An unreachable source delays the start by at most its deadline and is
logged; it cannot stop the node (the coordinator and peers may be down).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, cast

import grpc

from domain_core.errors import BadSignatureError, LimitExceededError, MalformedMessageError
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_PEER_HEADS_FILE_BYTES,
    MAX_PEER_HEADS_KEPT,
    Limits,
)
from domain_core.signers import PublicKey
from domain_edge import transport
from domain_edge.audit import (
    HEAD_FILE_SUFFIX,
    HSA_LOG_NAME,
    AuditHead,
    HeadOrder,
    compare_heads,
    describe_refusal,
    raise_persisted_head,
    read_head_file,
)
from domain_edge.files import read_limited
from domain_edge.throttled_log import ThrottledLog
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc
from hsa_node.storage import Peer, write_atomically

__all__ = [
    "PEER_HEADS_FILE",
    "RECOVERY_DEADLINE_SECONDS",
    "AuditHeadBook",
    "fetch_own_heads",
    "recover_own_heads",
]

log = logging.getLogger(__name__)

PEER_HEADS_FILE: Final = "peer-audit-heads.json"
RECOVERY_DEADLINE_SECONDS: Final = 2.0


def _is_log_head(head: AuditHead) -> bool:
    return HSA_LOG_NAME.fullmatch(head.log) is not None


class AuditHeadBook:
    """This host's heads (from the head files) and the highest of each peer's (see module)."""

    def __init__(
        self,
        data_dir: Path,
        host_id: str,
        own_key: PublicKey,
        peer_key: Callable[[str], PublicKey | None],
    ) -> None:
        """`peer_key(host_id)` is a host's signing key in the node's verified head (None:
        not a host there, so its heads cannot be verified and are not kept)."""
        self._data_dir = data_dir
        self._host_id = host_id
        self._own_key = own_key
        self._peer_key = peer_key
        self._path = data_dir / PEER_HEADS_FILE
        self._lock = threading.Lock()
        self._throttled = ThrottledLog(log)
        self._kept: dict[tuple[str, str], AuditHead] = self._load()

    def _load(self) -> dict[tuple[str, str], AuditHead]:
        try:
            document = json.loads(read_limited(self._path, MAX_PEER_HEADS_FILE_BYTES))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError, LimitExceededError) as error:
            log.warning("%s is unreadable (%s); starting from no peer heads", self._path, error)
            return {}
        kept: dict[tuple[str, str], AuditHead] = {}
        entries = document.get("heads") if isinstance(document, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            try:
                head = AuditHead.parse(str(entry).encode("ascii"))
            except (MalformedMessageError, UnicodeEncodeError):
                continue
            kept[(head.host, head.log)] = head
        return kept

    def _save_locked(self) -> None:
        document = {
            "heads": [self._kept[k].raw.decode("ascii") for k in sorted(self._kept)],
        }
        write_atomically(self._path, (json.dumps(document, indent=1) + "\n").encode("ascii"))

    def own(self) -> list[AuditHead]:
        """The head file of every audit log of this host, each verified (a head file that
        does not verify is left out and logged: the log's writer refuses it on open)."""
        heads = []
        try:
            entries = sorted(self._data_dir.iterdir())
        except OSError as error:
            self._throttled.warning(f"cannot list {self._data_dir}: {error}")
            return []
        for entry in entries:
            name = entry.name
            if not name.endswith(HEAD_FILE_SUFFIX):
                continue
            if not HSA_LOG_NAME.fullmatch(name[: -len(HEAD_FILE_SUFFIX)]):
                continue
            try:
                head = AuditHead.parse(read_head_file(entry))
                if head.host != self._host_id or head.log + HEAD_FILE_SUFFIX != name:
                    raise MalformedMessageError(f"it is the head of {head.host} {head.log}")
                head.verify(self._own_key)
            except (OSError, MalformedMessageError, BadSignatureError) as error:
                self._throttled.warning(f"{entry} is not published: {error}")
                continue
            heads.append(head)
        return heads

    def kept(self, host_id: str = "") -> list[AuditHead]:
        """The highest head kept of each peer's logs (only `host_id`'s when given)."""
        with self._lock:
            return [
                h for (host, _), h in sorted(self._kept.items()) if not host_id or host == host_id
            ]

    def served(self, host_id: str = "") -> list[AuditHead]:
        """What `HsaPeer.GetAuditHeads` answers: this host's heads and the peers' kept ones."""
        own = self.own() if not host_id or host_id == self._host_id else []
        return own + [h for h in self.kept(host_id) if h.host != self._host_id]

    def learn(self, raws: Iterable[bytes], source: str) -> int:
        """Keep each head of another host that verifies and raises the kept one; how many
        were kept. Lower or conflicting heads are refused and logged (a possible cut)."""
        changed = 0
        with self._lock:
            for raw in raws:
                head = self._believed(raw, source)
                if head is None or head.host == self._host_id:
                    continue
                known = self._kept.get((head.host, head.log))
                order = compare_heads(known, head)
                if order is HeadOrder.NEWER:
                    if len(self._kept) >= MAX_PEER_HEADS_KEPT and known is None:
                        continue
                    self._kept[(head.host, head.log)] = head
                    changed += 1
                elif order is not HeadOrder.SAME and known is not None:
                    self._throttled.warning(
                        f"from {source}: {describe_refusal(known, head)}",
                        key=f"{source} {head.host} {head.log}",
                    )
            if changed:
                self._save_locked()
        return changed

    def _believed(self, raw: bytes, source: str) -> AuditHead | None:
        try:
            head = AuditHead.parse(raw)
        except MalformedMessageError as error:
            self._throttled.warning(f"{source} served an audit head that does not parse: {error}")
            return None
        if not _is_log_head(head):
            return None
        key = self._own_key if head.host == self._host_id else self._peer_key(head.host)
        if key is None:
            return None  # not a host of the verified head: cannot be verified, not kept
        try:
            head.verify(key)
        except BadSignatureError as error:
            self._throttled.warning(
                f"{source} served a forged audit head: {error}", key=f"forged {source}"
            )
            return None
        return head


def _ask(
    target: str,
    tls: TlsMaterial,
    limits: Limits,
    host_id: str,
    peer: str | None,
    timeout: float,
) -> list[bytes]:
    """This host's heads from the coordinator (`peer` None) or from the HSA `peer`; the
    channel accepts only that server."""
    server = transport.COORDINATOR if peer is None else transport.hsa_host(peer)
    channel = transport.mtls_channel(target, tls, server, limits)
    try:
        request = services_pb2.AuditHeadsRequest(host_id=host_id)
        if peer is not None:
            stub = services_pb2_grpc.HsaPeerStub(channel)  # type: ignore[no-untyped-call]
            response = stub.GetAuditHeads(request, timeout=timeout)
        else:
            coordinator = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            response = coordinator.GetAuditHeads(request, timeout=timeout)
        return [bytes(h.checkpoint) for h in response.heads]
    finally:
        channel.close()


def fetch_own_heads(
    *,
    host_id: str,
    coordinator: str,
    peers: Sequence[Peer],
    tls: TlsMaterial,
    limits: Limits = DEFAULT_LIMITS,
    timeout: float = RECOVERY_DEADLINE_SECONDS,
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Ask the coordinator and every cached peer at once for this host's published heads:
    ((source, checkpoint bytes) for each head, names of the sources that answered)."""
    targets: list[tuple[str, str, str | None]] = []
    if coordinator:
        targets.append(("the coordinator", coordinator, None))
    targets += [(f"peer {p.host_id}", p.address, p.host_id) for p in peers if p.host_id != host_id]
    if not targets:
        return [], []
    found: list[tuple[str, bytes]] = []
    answered: list[str] = []
    with ThreadPoolExecutor(max_workers=min(len(targets), 8)) as pool:
        futures = [
            (name, pool.submit(_ask, address, tls, limits, host_id, peer, timeout))
            for name, address, peer in targets
        ]
        for name, future in futures:
            try:
                heads = future.result()
            except grpc.RpcError as error:
                call = cast(Any, error)
                code = call.code().name if hasattr(call, "code") else "ERROR"
                log.info("audit heads: %s did not answer (%s)", name, code)
                continue
            answered.append(name)
            found += [(name, raw) for raw in heads]
    return found, answered


def recover_own_heads(
    data_dir: Path, host_id: str, own_key: PublicKey, published: Iterable[tuple[str, bytes]]
) -> list[AuditHead]:
    """Raise the head file of each of this host's logs to the highest of its heads published
    elsewhere; the heads adopted. A published head of another chain than the local head file
    raises AuditLogError (the host signed two chains for one log: someone replaced it);
    heads that do not parse or verify under this host's key are ignored and logged."""
    adopted = []
    for source, raw in published:
        try:
            head = AuditHead.parse(raw)
            if head.host != host_id or not _is_log_head(head):
                raise MalformedMessageError(f"{head.describe()[:120]} is not a head of this host")
            if raise_persisted_head(data_dir / head.log, head, own_key):
                log.warning(
                    "audit: %s holds %s, above this host's own head file: adopted it, so the "
                    "log must reach it",
                    source,
                    head.describe(),
                )
                adopted.append(head)
        except (MalformedMessageError, BadSignatureError) as error:
            log.warning("audit: ignored a head from %s: %s", source, error)
    return adopted
