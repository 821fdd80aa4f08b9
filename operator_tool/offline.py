"""Offline signing for an air-gapped operator: export, `sign-offline`, and the approval file.

The export file (JSON, format `hsm-domain-proposal-export`, version 1) carries the exact
proposal bytes and what a reviewer needs to see them: the domain id, base version and base
state hash, the proposal id, the base state's manifest bytes and the approvals so far.

Invariants kept by `sign-offline` (which never opens a network connection):
- the proposal bytes hash to the proposal id, and the header fields are the proposal's own;
- the proposal's domain id, base version and base state hash are those of the state file the
  operator brings (one they exported earlier from a verified chain with `domain
  export-state`), and that state is signed by one of its own hosts;
- the diff is rendered from the state file's manifest, never from the export's copy; if the
  copies differ the command warns and refuses;
- the proposal is not expired by this machine's clock, and the operator is one of the state's
  operators who has not approved yet;
- every add-host enrollment verifies against the domain CA of the state file (its
  fingerprints are shown; one that fails is shown and nothing is signed).
The approval file (format `hsm-domain-approval`, version 1) holds the proposal id, operator id
and signature, and is submitted by `approvals submit` on a connected machine.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Final

from domain_core import canonical, quorum
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidInputError,
    MalformedMessageError,
    StaleProposalError,
    VerificationError,
    WrongDomainError,
)
from domain_core.files import write_new_file
from domain_core.model import OPERATOR_ID_PATTERN, Manifest, Proposal, SealedState
from domain_core.pb import domain_pb2
from domain_core.sealing import state_signing_message
from operator_tool._render import iso
from operator_tool._review import review, review_lines
from operator_tool._signing import add_yes_option, confirm, human_stream, operator_token
from operator_tool._where import add_state_option, connect, read_state_file
from operator_tool.cli import CommandContext, Subparsers, add_command

__all__ = [
    "APPROVAL_FORMAT",
    "EXPORT_FORMAT",
    "approval_document",
    "export_document",
    "export_proposal",
    "read_approval_file",
    "read_export_file",
    "register",
    "write_document",
]

EXPORT_FORMAT: Final = "hsm-domain-proposal-export"
APPROVAL_FORMAT: Final = "hsm-domain-approval"
FORMAT_VERSION: Final = 1
_EXPORT_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "domain_id",
        "proposal_id",
        "base_version",
        "base_state_hash",
        "proposal",
        "base_manifest",
        "approvals",
        "exported_at",
    }
)
_APPROVAL_KEYS: Final = frozenset({"format", "version", "proposal_id", "operator_id", "signature"})
_MAX_FILE_BYTES: Final = 4 << 20
_MAX_SIGNATURE_BYTES: Final = 256


# --- documents -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def export_document(
    proposal: Proposal, base: SealedState, approvals: list[domain_pb2.Approval], now: int
) -> dict[str, Any]:
    """The export file's content for `proposal` against its verified base state."""
    return {
        "format": EXPORT_FORMAT,
        "version": FORMAT_VERSION,
        "domain_id": proposal.domain_id,
        "proposal_id": proposal.id.hex(),
        "base_version": proposal.base_version,
        "base_state_hash": proposal.base_state_hash.hex(),
        "proposal": _b64(proposal.raw),
        "base_manifest": _b64(base.message.manifest),
        "approvals": [
            {"operator_id": a.operator_id, "signature": _b64(a.signature)} for a in approvals
        ],
        "exported_at": iso(now),
    }


def approval_document(approval: domain_pb2.Approval) -> dict[str, Any]:
    """The approval file's content."""
    return {
        "format": APPROVAL_FORMAT,
        "version": FORMAT_VERSION,
        "proposal_id": approval.proposal_id.hex(),
        "operator_id": approval.operator_id,
        "signature": _b64(approval.signature),
    }


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write a JSON document to a new file (0644; never overwrites)."""
    content = (json.dumps(document, indent=2) + "\n").encode()
    try:
        write_new_file(path, content, 0o644)
    except FileExistsError:
        raise AlreadyExistsError(f"a file exists already at {path}; choose another path") from None


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"no {what} at {path}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise InvalidInputError(f"{path} is larger than {_MAX_FILE_BYTES} bytes; not a {what}")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MalformedMessageError(f"{path} is not JSON; not a {what}") from None
    if not isinstance(document, dict):
        raise MalformedMessageError(f"{path} is not a JSON object; not a {what}")
    return document


def _check_shape(
    path: Path, document: dict[str, Any], fmt: str, keys: frozenset[str], what: str
) -> None:
    if document.get("format") != fmt:
        raise MalformedMessageError(f"{path}: format is not {fmt!r}; is it a {what}?")
    if type(document.get("version")) is not int or document["version"] != FORMAT_VERSION:
        raise MalformedMessageError(f"{path}: version is not {FORMAT_VERSION}")
    if set(document) != keys:
        missing = sorted(keys - set(document))
        extra = sorted(str(k)[:40] for k in set(document) - keys)
        raise MalformedMessageError(f"{path}: fields missing {missing}, unexpected {extra}")


def _hex(path: Path, document: dict[str, Any], key: str, size: int) -> bytes:
    value = document.get(key)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise MalformedMessageError(f"{path}: {key} is not {2 * size} hex characters")
    return raw


def _base64(path: Path, value: object, key: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 2:
        raise MalformedMessageError(f"{path}: {key} is not base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessageError(f"{path}: {key} is not valid base64") from None
    if len(raw) > limit:
        raise MalformedMessageError(f"{path}: {key} is larger than {limit} bytes")
    return raw


def _operator_id(path: Path, value: object) -> str:
    if not isinstance(value, str) or not OPERATOR_ID_PATTERN.match(value):
        raise MalformedMessageError(f"{path}: operator_id is not 64 lowercase hex characters")
    return value


def read_approval_file(path: str | Path) -> domain_pb2.Approval:
    """An approval from an approval file (shape checked; the signature is checked later)."""
    path = Path(path)
    document = _load(path, "approval file")
    _check_shape(path, document, APPROVAL_FORMAT, _APPROVAL_KEYS, "approval file")
    return domain_pb2.Approval(
        proposal_id=_hex(path, document, "proposal_id", canonical.DIGEST_BYTES),
        operator_id=_operator_id(path, document["operator_id"]),
        signature=_base64(path, document["signature"], "signature", _MAX_SIGNATURE_BYTES),
    )


def read_export_file(path: str | Path) -> tuple[Proposal, bytes, list[domain_pb2.Approval]]:
    """(proposal, base manifest bytes, approvals) from an export file, with every self-check.

    The proposal bytes must hash to the id the file names, and the file's domain id, base
    version and base hash must be the proposal's own.
    """
    path = Path(path)
    document = _load(path, "proposal export file")
    _check_shape(path, document, EXPORT_FORMAT, _EXPORT_KEYS, "proposal export (proposals export)")
    proposal_id = _hex(path, document, "proposal_id", canonical.DIGEST_BYTES)
    raw = _base64(path, document["proposal"], "proposal", _MAX_FILE_BYTES)
    if canonical.proposal_id(raw) != proposal_id:
        raise BadSignatureError(
            f"{path}: the proposal bytes do not hash to the proposal id it names; the file was "
            "altered: do not sign it"
        )
    proposal = Proposal.from_bytes(raw)
    base_hash = _hex(path, document, "base_state_hash", canonical.DIGEST_BYTES)
    if (
        document.get("domain_id") != proposal.domain_id
        or document.get("base_version") != proposal.base_version
        or base_hash != proposal.base_state_hash
    ):
        raise BadSignatureError(
            f"{path}: domain_id, base_version or base_state_hash differ from the proposal's "
            "own; the file was altered: do not sign it"
        )
    manifest_raw = _base64(path, document["base_manifest"], "base_manifest", _MAX_FILE_BYTES)
    entries = document["approvals"]
    if not isinstance(entries, list) or len(entries) > 1000:
        raise MalformedMessageError(f"{path}: approvals is not a list")
    approvals = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"operator_id", "signature"}:
            raise MalformedMessageError(f"{path}: an approval needs operator_id and signature")
        approvals.append(
            domain_pb2.Approval(
                proposal_id=proposal_id,
                operator_id=_operator_id(path, entry["operator_id"]),
                signature=_base64(path, entry["signature"], "signature", _MAX_SIGNATURE_BYTES),
            )
        )
    return proposal, manifest_raw, approvals


# --- proposals export (online) -------------------------------------------------------------


def export_proposal(ctx: CommandContext) -> int:
    """`proposals export ID --out FILE`: only a pending proposal for the verified head."""
    out = Path(ctx.args.out)
    if out.exists():
        raise AlreadyExistsError(f"a file exists already at {out}; choose another path")
    with connect(ctx) as conn:
        view = conn.proposal(ctx.args.id)
        r = conn.review(view)
    r.require_pending()
    r.require_enrollments_verify()
    assert r.base is not None  # a pending proposal is for the verified head
    counted = [a for a in view.approvals if a.operator_id in r.approved_by]
    write_document(out, export_document(r.proposal, r.base, counted, r.now))
    short = r.proposal_id.hex()[:16]
    ctx.emit(
        {
            "out": str(out),
            "proposal_id": r.proposal_id.hex(),
            "domain_id": r.proposal.domain_id,
            "base_version": r.proposal.base_version,
            "base_state_hash": r.proposal.base_state_hash.hex(),
        },
        f"wrote proposal {short} (for version {r.proposal.base_version}) to {out}\n"
        f"on the offline machine: hsm-operator sign-offline {out} --state STATE_FILE "
        "--out approval.json --token YOUR_TOKEN",
    )
    return 0


# --- sign-offline --------------------------------------------------------------------------


def _check_state_file(state: SealedState, path: str) -> None:
    """A state file must be signed by one of its own hosts (it was exported verified)."""
    producer = state.message.producer_host_id
    key = state.manifest.host_signing_key(producer)
    if key is None:
        raise VerificationError(f"{path} is signed by {producer[:64]!r}, not one of its hosts")
    try:
        key.verify(state.message.producer_signature, state_signing_message(state.hash))
    except BadSignatureError:
        raise BadSignatureError(f"{path}: the state's signature does not verify") from None


def _check_base(proposal: Proposal, state: SealedState, state_path: str) -> None:
    if proposal.domain_id != state.manifest.domain_id:
        raise WrongDomainError(
            f"the proposal is for domain {proposal.domain_id!r}, your state file {state_path} "
            f"is of domain {state.manifest.domain_id!r}"
        )
    if proposal.base_version > state.version:
        raise StaleProposalError(
            f"your state file is at version {state.version}, this proposal is for "
            f"{proposal.base_version}: export your state again (`hsm-operator domain "
            "export-state`) on a connected machine"
        )
    if proposal.base_version < state.version:
        raise StaleProposalError(
            f"domain is at version {state.version}, this proposal is for "
            f"{proposal.base_version}: propose again"
        )
    if proposal.base_state_hash != state.hash:
        raise StaleProposalError(
            f"the proposal's base state hash {proposal.base_state_hash.hex()[:16]} is not your "
            f"state file's {state.hash.hex()[:16]} (both version {state.version}): a different "
            "history; do not sign it"
        )


def _sign_offline(ctx: CommandContext) -> int:
    args = ctx.args
    out_path = Path(args.out)
    if out_path.exists():
        raise AlreadyExistsError(f"a file exists already at {out_path}; choose another path")
    proposal, export_manifest, approvals = read_export_file(args.file)
    state = read_state_file(args.state)
    _check_state_file(state, args.state)
    _check_base(proposal, state, args.state)
    if export_manifest != state.message.manifest:
        ctx.stderr.write(
            "WARNING: the base manifest in the export file differs from your state file's; "
            "the diff below would not be what you sign against\n"
        )
        ctx.stderr.flush()
        shown = "unreadable"
        with contextlib.suppress(InvalidInputError):
            shown = f"version {Manifest.from_bytes(export_manifest).version}"
        raise VerificationError(
            f"the export's copy of the base manifest ({shown}) is not your state file's: the "
            "export was altered or made against another state; refusing to sign"
        )
    now = int(time.time())
    r = review(proposal, approvals, head=state, states={state.version: state}, now=now)
    r.require_pending()
    out = human_stream(ctx)
    if not ctx.json or not args.yes:
        out.write(
            f"checked offline against your state file {args.state} (version {state.version}, "
            f"state {state.hash.hex()[:16]}):\n"
        )
        out.write("\n".join(review_lines(r)) + "\n")
        out.flush()
    r.require_enrollments_verify()
    confirm(ctx, "Sign this proposal with your token?")
    with operator_token(ctx) as signer:
        r.require_can_sign(signer.public_key.key_id)
        approval = quorum.approve(proposal, signer)
    write_document(out_path, approval_document(approval))
    name = r.name(approval.operator_id)
    ctx.emit(
        {
            "out": str(out_path),
            "proposal_id": proposal.id.hex(),
            "operator_id": approval.operator_id,
            "operator": name,
        },
        f"wrote the approval of proposal {proposal.id.hex()[:16]} by {name} to {out_path}\n"
        f"on a connected machine: hsm-operator approvals submit {out_path} --cluster DIR",
    )
    return 0


def register(subparsers: Subparsers) -> None:
    """Add `sign-offline` to the `hsm-operator` parser."""
    parser = add_command(
        subparsers,
        "sign-offline",
        _sign_offline,
        help="review and sign an exported proposal on a machine with no network",
        description="Check an exported proposal against a state file you exported earlier "
        "(domain export-state): the bytes hash to the id, the domain id and base hash are your "
        "state's; show the diff computed from your state file; sign; write an approval file "
        "for `approvals submit`. Opens no network connection.",
        example="hsm-operator sign-offline proposal.json --state v5.state --out approval.json "
        "--token 'pkcs11:token=bob;object=operator?module-path=/usr/lib/softhsm/libsofthsm2.so'",
    )
    parser.add_argument("file", metavar="FILE", help="the file `proposals export` wrote")
    add_state_option(
        parser,
        "the domain state you exported on a connected machine (domain export-state)",
        required=True,
    )
    parser.add_argument("--out", required=True, metavar="APPROVAL", help="approval file to create")
    add_yes_option(parser, "sign")
