"""`hsm-domain audit verify DIR`: check the audit log of every node of a local domain.

For each node with a config under `DIR/nodes/` (genesis hosts and hosts added later), every
audit log of the node is verified (`domain_core.audit.verify_audit_log`) under the host's
Ed25519 public key: `<data_dir>/audit.log` (the main HSA process) and each
`<data_dir>/audit-worker-<i>.log` (its key service worker processes, one log per worker).

Invariants kept here:
- only public key material is read: the `signing_public_key` of `identity/host.json`, never a
  private key file; for a genesis host that key must also be the one the domain's genesis
  state (pinned by its hash in `domain.json`) lists, so a swapped `host.json` is caught;
- one line per log (`hsa-1: ...` for audit.log, `hsa-1 audit-worker-2.log: ...` for a
  worker's), and exit status 0 only if every log verifies (a node without an audit log yet is
  fine); a failing line names the first bad record and the file holding it, and no line
  holds secrets.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from deploy.init import DomainLayout, load_layout
from domain_core.audit import AUDIT_LOG_FILE, AuditReport, verify_audit_log
from domain_core.config import NodeConfig
from domain_core.errors import HsmDomainError, MalformedMessageError, TokenError
from domain_core.identity import HOST_FILE
from domain_core.model import SealedState
from domain_core.signers import PublicKey, SignatureAlgorithm

__all__ = [
    "NodeAudit",
    "audit_log_path",
    "audit_log_paths",
    "host_signing_key",
    "register",
    "verify_domain_audit",
    "verify_node_audits",
]

_MAX_HOST_FILE: Final = 64 * 1024
_WORKER_LOG: Final = re.compile(r"^audit-worker-([1-9][0-9]{0,3})\.log$")


@dataclass(frozen=True)
class NodeAudit:
    """The audit verdict for one node: a report, no log yet, or why it could not be checked."""

    host_id: str
    path: Path
    report: AuditReport | None
    error: str = ""

    @property
    def label(self) -> str:
        """`hsa-1` for the main audit log, `hsa-1 audit-worker-2.log` for a worker's."""
        if self.path.name == AUDIT_LOG_FILE:
            return self.host_id
        return f"{self.host_id} {self.path.name}"

    @property
    def ok(self) -> bool:
        """True if the log verifies, or if the node has no log yet."""
        if self.error:
            return False
        return self.report is None or self.report.ok

    def line(self) -> str:
        """One line for a person: `hsa-1: 12 records, 1 checkpoints, ok`; a failure names
        the file."""
        if self.error:
            return f"{self.label}: cannot verify: {self.error} (in {self.path})"
        if self.report is None:
            return f"{self.label}: no audit log"
        report = self.report
        if not report.ok:
            return f"{self.label}: {report.reason} (in {self.path})"
        text = f"{self.label}: {report.records} records, {report.checkpoints} checkpoints, ok"
        if report.unsigned_tail:
            text += f" ({report.unsigned_tail} after the last checkpoint, not signed yet)"
        if report.partial_line:
            text += "; the file ends in an incomplete line (a crash while writing)"
        return text

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: host, path, ok, status, and the report's fields."""
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
        document = json.loads(path.read_bytes()[:_MAX_HOST_FILE])
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


def _verify_file(host_id: str, path: Path, key: PublicKey) -> NodeAudit:
    if not path.exists():
        return NodeAudit(host_id, path, None)
    try:
        report = verify_audit_log(path, key, host_id=host_id)
    except HsmDomainError as error:
        return NodeAudit(host_id, path, None, error.message)
    except OSError as error:
        return NodeAudit(host_id, path, None, f"cannot read {path}: {error.strerror or error}")
    return NodeAudit(host_id, path, report)


def verify_node_audits(layout: DomainLayout, host_id: str) -> list[NodeAudit]:
    """Verify every audit log of one node (main first, then workers); problems are reported
    in the results, not raised."""
    try:
        paths = audit_log_paths(layout, host_id)
    except HsmDomainError as error:
        return [NodeAudit(host_id, layout.node_dir(host_id), None, error.message)]
    if not any(path.exists() for path in paths):
        return [NodeAudit(host_id, paths[0], None)]
    try:
        key = host_signing_key(layout, host_id)
    except HsmDomainError as error:
        return [NodeAudit(host_id, paths[0], None, error.message)]
    return [_verify_file(host_id, path, key) for path in paths]


def verify_node_audit(layout: DomainLayout, host_id: str) -> NodeAudit:
    """Verify one node's main audit log (`audit.log`); see `verify_node_audits` for all."""
    return verify_node_audits(layout, host_id)[0]


def verify_domain_audit(layout: DomainLayout) -> list[NodeAudit]:
    """Verify every audit log of every node with a config, genesis hosts first."""
    return [
        result for host_id in layout.node_configs for result in verify_node_audits(layout, host_id)
    ]


# --- command line ------------------------------------------------------------------------------


def _cmd_verify(args: argparse.Namespace) -> int:
    layout = load_layout(Path(args.directory))
    results = verify_domain_audit(layout)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        if not results:
            print(f"no nodes in {layout.root}")
        for result in results:
            print(result.line())
        sys.stdout.flush()
    return 0 if all(r.ok for r in results) else 1


def register(parser: argparse.ArgumentParser, parents: list[argparse.ArgumentParser]) -> None:
    """Add the `audit` subcommands (`verify`) to the `audit` command's parser."""
    sub = parser.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=True)
    help_text = (
        "verify every node's audit logs (the HSA's and its workers'): hashes, links, "
        "sequence, signed checkpoints"
    )
    verify = sub.add_parser(
        "verify",
        help=help_text,
        description=help_text,
        parents=parents,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "example:\n"
            "  hsm-domain audit verify ./demo\n"
            "  hsm-domain audit verify ./demo --json | jq '.[] | {host_id, ok, first_bad_seq}'\n"
            "exit status 0 if every log verifies (or a node has no log yet), 1 otherwise"
        ),
    )
    verify.add_argument("directory", metavar="DIR", help="domain directory")
    verify.add_argument("--json", action="store_true", help="a JSON list of per-log reports")
    verify.set_defaults(handler=_cmd_verify)
