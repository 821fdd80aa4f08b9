"""`hsm-domain audit verify DIR`: check the audit log of every node of a local domain.

For each node with a config under `DIR/nodes/` (genesis hosts and hosts added later), every
audit log of the node is verified (`domain_edge.audit.verify_audit_log`) under the host's
Ed25519 public key: `<data_dir>/audit.log` (the main HSA process) and each
`<data_dir>/audit-worker-<i>.log` (its key service worker processes, one log per worker).

Each log is also compared with every head of it (a signed checkpoint) that can be found off
the log: the coordinator's (`GetAuditHeads` on its operator port, when it runs), the copies
peers keep in their data directories (`peer-audit-heads.json`) and the log's own head file
(`<log>.head`). A log that ends before a head's record, or whose record there has another
hash, was cut or rewritten; a log that is missing while a head of it exists was deleted.

Invariants kept here:
- only public key material is read: the `signing_public_key` of `identity/host.json`, never a
  private key file; for a genesis host that key must also be the one the domain's genesis
  state (pinned by its hash in `domain.json`) lists, so a swapped `host.json` is caught;
- a head is believed only if it verifies under that key and names that log; one that does not
  is ignored and said so (a lying coordinator cannot make a good log fail, nor a bad one pass);
- one line saying which sources of heads were used, then one line per log (`hsa-1: ...` for
  audit.log, `hsa-1 audit-worker-2.log: ...` for a worker's); exit status 0 only if every log
  verifies and reaches its heads. A node with no audit log is a failure unless it never ran
  (its data directory holds no state) and no head of it exists; a failing line names the
  first bad record and the file holding it, and no line holds secrets.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import grpc

from deploy.cluster import coordinator_operator_addresses, coordinator_operator_channel
from deploy.init import DomainLayout, load_layout
from domain_core.errors import (
    BadSignatureError,
    HsmDomainError,
    LimitExceededError,
    MalformedMessageError,
    TokenError,
)
from domain_core.limits import MAX_HOST_IDENTITY_FILE_BYTES, MAX_PEER_HEADS_FILE_BYTES
from domain_core.model import SealedState
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_edge.audit import (
    AUDIT_LOG_FILE,
    HEAD_FILE_SUFFIX,
    HSA_LOG_NAME,
    AuditHead,
    AuditReport,
    read_head_file,
    verify_audit_log,
)
from domain_edge.cli import Command, print_json
from domain_edge.config import NodeConfig
from domain_edge.files import read_limited
from domain_edge.identity_files import HOST_FILE
from domain_proto import services_pb2, services_pb2_grpc

__all__ = [
    "VERIFY_COMMAND",
    "NodeAudit",
    "PublishedHeads",
    "audit_log_path",
    "audit_log_paths",
    "collect_published_heads",
    "host_signing_key",
    "verify_domain_audit",
    "verify_node_audits",
]

_WORKER_LOG: Final = re.compile(r"^audit-worker-([1-9][0-9]{0,3})\.log$")
_PEER_HEADS_FILE: Final = "peer-audit-heads.json"  # hsa_node.audit_heads.PEER_HEADS_FILE
_COORDINATOR_DEADLINE_SECONDS: Final = 3.0
COORDINATOR_SOURCE: Final = "coordinator"
HEAD_FILE_SOURCE: Final = "head file"


@dataclass
class PublishedHeads:
    """Heads found off the logs, by (host, log), each with where it was found (not yet
    verified: `verify_node_audits` verifies each under its host's key), and which sources
    were used."""

    heads: dict[tuple[str, str], list[tuple[str, AuditHead]]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def add(self, source: str, raw: bytes) -> bool:
        """Record one head from `source`; False if it does not parse as one."""
        try:
            head = AuditHead.parse(raw)
        except MalformedMessageError:
            return False
        self.heads.setdefault((head.host, head.log), []).append((source, head))
        return True

    def of(self, host_id: str) -> dict[str, list[tuple[str, AuditHead]]]:
        """The heads of `host_id`'s logs, by log name."""
        return {log: found for (host, log), found in self.heads.items() if host == host_id}


@dataclass(frozen=True)
class NodeAudit:
    """The audit verdict for one log of a node: a report, no log, or why it could not be
    checked; with the highest believed published head and where it came from."""

    host_id: str
    path: Path
    report: AuditReport | None
    error: str = ""
    published: AuditHead | None = None
    sources: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # heads not believed, and why
    never_ran: bool = False

    @property
    def label(self) -> str:
        """`hsa-1` for the main audit log, `hsa-1 audit-worker-2.log` for a worker's."""
        if self.path.name == AUDIT_LOG_FILE:
            return self.host_id
        return f"{self.host_id} {self.path.name}"

    @property
    def ok(self) -> bool:
        """True if the log verifies and reaches every believed head; a missing log only for a
        node that never ran and has no head."""
        if self.error:
            return False
        if self.report is None:
            return self.never_ran and self.published is None
        return self.report.ok

    def _from(self) -> str:
        return f" (from: {', '.join(self.sources)})" if self.sources else ""

    def line(self) -> str:
        """One line for a person: `hsa-1: 12 records, 1 checkpoints, ok; ...`; a failure
        names the file."""
        notes = "".join(f"; {note}" for note in self.notes)
        if self.error:
            return f"{self.label}: cannot verify: {self.error} (in {self.path}){notes}"
        if self.report is None:
            if self.published is not None:
                head = self.published
                return (
                    f"{self.label}: the audit log is missing, but its host signed a checkpoint "
                    f"of record {head.seq} ({head.time}){self._from()}: the log was deleted "
                    f"(in {self.path}){notes}"
                )
            if self.never_ran:
                return f"{self.label}: no audit log (never started){notes}"
            return (
                f"{self.label}: no audit log, but the node has run (its data directory holds "
                f"states): the log was deleted (in {self.path}){notes}"
            )
        report = self.report
        if not report.ok:
            published = (
                f"; published head: record {self.published.seq}{self._from()}"
                if self.published is not None
                else ""
            )
            return f"{self.label}: {report.reason} (in {self.path}){published}{notes}"
        text = f"{self.label}: {report.records} records, {report.checkpoints} checkpoints, ok"
        if report.unsigned_tail:
            text += f" ({report.unsigned_tail} after the last checkpoint, not signed yet)"
        if report.partial_line:
            text += "; the file ends in an incomplete line (a crash while writing)"
        if self.published is not None:
            text += f"; reaches its published head at record {self.published.seq}{self._from()}"
        else:
            text += "; no published head"
        return text + notes

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: host, path, ok, status, the report's fields, and the published
        head compared with (`published_seq`, `published_sources`) and ignored heads (`notes`)."""
        status = "error" if self.error else "no audit log" if self.report is None else "checked"
        document: dict[str, Any] = {
            "host_id": self.host_id,
            "path": str(self.path),
            "ok": self.ok,
            "status": status,
            "message": self.line().split(": ", 1)[1],
        }
        if self.report is not None:
            document.update(self.report.to_json())
            document["ok"] = self.ok
        document["published_seq"] = self.published.seq if self.published is not None else None
        document["published_sources"] = list(self.sources)
        document["notes"] = list(self.notes)
        return document


def audit_log_path(layout: DomainLayout, host_id: str) -> Path:
    """Where a node writes its audit log: `<data_dir of its config>/audit.log`."""
    config = NodeConfig.load(layout.node_configs[host_id])
    return config.path(config.data_dir) / AUDIT_LOG_FILE


def audit_log_paths(layout: DomainLayout, host_id: str) -> list[Path]:
    """Every audit log of a node: `audit.log` first (present or not), then the workers'
    `audit-worker-<i>.log` that exist, by worker number."""
    main = audit_log_path(layout, host_id)
    workers: list[tuple[int, Path]] = []
    try:
        entries = list(main.parent.iterdir())
    except FileNotFoundError:
        entries = []
    for entry in entries:
        match = _WORKER_LOG.match(entry.name)
        if match is not None:
            workers.append((int(match.group(1)), entry))
    return [main, *(path for _, path in sorted(workers))]


def _genesis_key(layout: DomainLayout, host_id: str) -> PublicKey | None:
    """The host's signing key in the pinned genesis state, None if it is not a genesis host."""
    try:
        raw = layout.genesis_state.read_bytes()
    except FileNotFoundError:
        raise TokenError(f"{layout.genesis_state} is missing") from None
    state = SealedState.from_bytes(raw)
    if state.hash != layout.genesis_hash:
        raise TokenError(
            f"{layout.genesis_state} does not match the genesis hash pinned in domain.json"
        )
    return state.manifest.host_signing_key(host_id)


def host_signing_key(layout: DomainLayout, host_id: str) -> PublicKey:
    """The host's Ed25519 public key from `identity/host.json` (public part only), checked
    against the genesis state when the host is a genesis host."""
    config = NodeConfig.load(layout.node_configs[host_id])
    path = config.path(config.identity_dir) / HOST_FILE
    try:
        document = json.loads(
            read_limited(
                path,
                MAX_HOST_IDENTITY_FILE_BYTES,
                lambda: TokenError(f"{path} is larger than {MAX_HOST_IDENTITY_FILE_BYTES} bytes"),
            )
        )
    except FileNotFoundError:
        raise TokenError(f"no host identity at {path}") from None
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"{path} is not valid JSON") from None
    if not isinstance(document, dict) or document.get("host_id") != host_id:
        raise TokenError(f"{path} is not the identity of {host_id}")
    try:
        der = base64.b64decode(str(document.get("signing_public_key", "")), validate=True)
        key = PublicKey(SignatureAlgorithm.ED25519, der)
    except (binascii.Error, ValueError, MalformedMessageError):
        raise TokenError(f"{path} holds no valid Ed25519 signing public key") from None
    pinned = _genesis_key(layout, host_id)
    if pinned is not None and pinned != key:
        raise TokenError(
            f"{path} holds another signing key than the domain's genesis state lists for "
            f"{host_id}: the identity file was replaced"
        )
    return key


def _data_dir(layout: DomainLayout, host_id: str) -> Path | None:
    try:
        config = NodeConfig.load(layout.node_configs[host_id])
    except HsmDomainError:
        return None
    return config.path(config.data_dir)


def _node_ran(layout: DomainLayout, host_id: str) -> bool:
    """Whether the node ever started: its data directory holds a state or its address."""
    data_dir = _data_dir(layout, host_id)
    if data_dir is None:
        return True  # cannot tell: do not excuse a missing log
    states = data_dir / "states"
    return (data_dir / "address").exists() or (
        states.is_dir() and any(p.suffix == ".state" for p in states.iterdir())
    )


def _coordinator_heads(layout: DomainLayout, found: PublishedHeads) -> None:
    operator_address = coordinator_operator_addresses(layout)  # any replica answers
    if not operator_address:
        found.sources.append("the coordinator is not running")
        return
    try:
        with coordinator_operator_channel(layout, operator_address) as channel:
            stub = services_pb2_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            response = stub.GetAuditHeads(
                services_pb2.AuditHeadsRequest(), timeout=_COORDINATOR_DEADLINE_SECONDS
            )
    except grpc.RpcError as error:
        call = cast(Any, error)
        code = call.code().name if hasattr(call, "code") else "ERROR"
        found.sources.append(f"the coordinator at {operator_address} did not answer ({code})")
        return
    count = sum(found.add(COORDINATOR_SOURCE, bytes(h.checkpoint)) for h in response.heads)
    found.sources.append(f"the coordinator at {operator_address} ({count} heads)")


def _peer_copies(layout: DomainLayout, found: PublishedHeads) -> None:
    holders = []
    for host_id in layout.node_configs:
        data_dir = _data_dir(layout, host_id)
        if data_dir is None:
            continue
        try:
            document = json.loads(
                read_limited(data_dir / _PEER_HEADS_FILE, MAX_PEER_HEADS_FILE_BYTES)
            )
        except FileNotFoundError:
            continue
        except (OSError, ValueError, UnicodeDecodeError, LimitExceededError):
            found.sources.append(f"{host_id}'s copy of its peers' heads is unreadable")
            continue
        entries = document.get("heads") if isinstance(document, dict) else None
        count = 0
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, str) and entry.isascii():
                count += found.add(f"{host_id}'s copy", entry.encode("ascii"))
        holders.append(f"{host_id} ({count})")
    found.sources.append(
        f"peer copies: {', '.join(holders)}" if holders else "no peer copies on disk"
    )


def _head_files(layout: DomainLayout, found: PublishedHeads) -> None:
    count = 0
    for host_id in layout.node_configs:
        data_dir = _data_dir(layout, host_id)
        if data_dir is None or not data_dir.is_dir():
            continue
        for entry in sorted(data_dir.iterdir()):
            name = entry.name
            if name.endswith(HEAD_FILE_SUFFIX) and HSA_LOG_NAME.fullmatch(
                name[: -len(HEAD_FILE_SUFFIX)]
            ):
                try:
                    raw = read_head_file(entry)
                except (OSError, MalformedMessageError):
                    continue
                count += found.add(HEAD_FILE_SOURCE, raw)
    found.sources.append(f"head files ({count})")


def collect_published_heads(layout: DomainLayout, *, coordinator: bool = True) -> PublishedHeads:
    """Every head of the domain's audit logs that can be found: from the coordinator (when it
    runs and `coordinator`), the peers' copies in their data directories and the logs' own
    head files. Nothing here is verified yet."""
    found = PublishedHeads()
    if coordinator:
        _coordinator_heads(layout, found)
    _peer_copies(layout, found)
    _head_files(layout, found)
    return found


def _believed(
    host_id: str, log: str, candidates: Iterable[tuple[str, AuditHead]], key: PublicKey
) -> tuple[list[AuditHead], AuditHead | None, tuple[str, ...], tuple[str, ...]]:
    """(every head that verifies, the highest, where the highest came from, notes on the
    heads that did not verify)."""
    believed: list[AuditHead] = []
    where: dict[bytes, list[str]] = {}
    notes: list[str] = []
    for source, head in candidates:
        if head.host != host_id or head.log != log:
            continue
        try:
            head.verify(key)
        except BadSignatureError:
            notes.append(
                f"ignored a head of record {head.seq} ({source}): not signed by {host_id}'s "
                "host key"
            )
            continue
        if head.raw not in where:
            believed.append(head)
            where[head.raw] = []
        if source not in where[head.raw]:
            where[head.raw].append(source)
    if not believed:
        return [], None, (), tuple(notes)
    highest = max(believed, key=lambda h: (h.seq, h.count))
    sources = sorted(
        {s for h in believed if h.same_point(highest) for s in where[h.raw]},
        key=lambda s: (s != COORDINATOR_SOURCE, s == HEAD_FILE_SOURCE, s),
    )
    return believed, highest, tuple(sources), tuple(notes)


def _verify_file(
    host_id: str,
    path: Path,
    key: PublicKey,
    candidates: Iterable[tuple[str, AuditHead]],
    never_ran: bool,
) -> NodeAudit:
    believed, highest, sources, notes = _believed(host_id, path.name, candidates, key)
    if not path.exists():
        return NodeAudit(
            host_id,
            path,
            None,
            published=highest,
            sources=sources,
            notes=notes,
            never_ran=never_ran,
        )
    try:
        report = verify_audit_log(
            path, key, host_id=host_id, log_name=path.name, published=believed
        )
    except HsmDomainError as error:
        return NodeAudit(host_id, path, None, error.message, highest, sources, notes)
    except OSError as error:
        return NodeAudit(
            host_id,
            path,
            None,
            f"cannot read {path}: {error.strerror or error}",
            highest,
            sources,
            notes,
        )
    return NodeAudit(host_id, path, report, "", highest, sources, notes)


def _log_order(name: str) -> tuple[int, str]:
    match = _WORKER_LOG.match(name)
    return (int(match.group(1)) if match else 0, name)


def verify_node_audits(
    layout: DomainLayout, host_id: str, published: PublishedHeads | None = None
) -> list[NodeAudit]:
    """Verify every audit log of one node (main first, then workers, then logs known only
    from a head) against the heads in `published`; problems are reported in the results,
    not raised."""
    heads = (published or PublishedHeads()).of(host_id)
    try:
        paths = audit_log_paths(layout, host_id)
    except HsmDomainError as error:
        return [NodeAudit(host_id, layout.node_dir(host_id), None, error.message)]
    known = {p.name for p in paths}
    extra = sorted((name for name in heads if name not in known), key=_log_order)
    paths += [paths[0].with_name(name) for name in extra]
    never_ran = not _node_ran(layout, host_id)
    if not heads and not any(path.exists() for path in paths):
        return [NodeAudit(host_id, paths[0], None, never_ran=never_ran)]
    try:
        key = host_signing_key(layout, host_id)
    except HsmDomainError as error:
        return [NodeAudit(host_id, paths[0], None, error.message)]
    return [_verify_file(host_id, path, key, heads.get(path.name, []), never_ran) for path in paths]


def verify_node_audit(layout: DomainLayout, host_id: str) -> NodeAudit:
    """Verify one node's main audit log (`audit.log`); see `verify_node_audits` for all."""
    return verify_node_audits(layout, host_id)[0]


def verify_domain_audit(
    layout: DomainLayout, published: PublishedHeads | None = None
) -> list[NodeAudit]:
    """Verify every audit log of every node with a config, genesis hosts first, against the
    heads in `published` (default: `collect_published_heads`)."""
    if published is None:
        published = collect_published_heads(layout)
    return [
        result
        for host_id in layout.node_configs
        for result in verify_node_audits(layout, host_id, published)
    ]


# --- command line ------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    published = collect_published_heads(layout)
    results = verify_domain_audit(layout, published)
    if args.json:
        print_json([r.to_json() for r in results])
    else:
        print(f"published heads: {'; '.join(published.sources)}")
        if not results:
            print(f"no nodes in {layout.root}")
        for result in results:
            print(result.line())
        sys.stdout.flush()
    return 0 if all(r.ok for r in results) else 1


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="domain directory")
    parser.add_argument("--json", action="store_true", help="a JSON list of per-log reports")


#: `hsm-domain audit verify DIR` (in the `audit` group of `deploy.cli`).
VERIFY_COMMAND: Final = Command(
    "verify",
    "verify every node's audit logs (the HSA's and its workers'): hashes, links, "
    "sequence, signed checkpoints, and the heads published at the coordinator and peers",
    _cmd_verify,
    """
    hsm-domain audit verify ./demo
    hsm-domain audit verify ./demo --json | jq '.[] | {host_id, ok, first_bad_seq}'
    """,
    notes="""
    exit status 0 if every log verifies and reaches every published head of it (a
    node that never ran may have no log), 1 otherwise
    """,
    arguments=_verify_arguments,
)
