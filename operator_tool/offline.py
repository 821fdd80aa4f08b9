"""Offline signing for an air-gapped operator: export, `sign-offline`, and the approval file.

The export file (JSON, format `hsm-domain-proposal-export`, version 2) carries the exact
proposal bytes and what a reviewer needs to judge them with no network: the domain id, base
version and base state hash, the proposal id, the chain of sealed states from the genesis to
the base state (each as stored), the genesis hash the exporting machine pinned (for the
messages only; it is never trusted), and the approvals so far.

Invariants kept by `sign-offline` (which never opens a network connection), checked in this
order, before anything is shown or signed:
- the proposal bytes hash to the proposal id, and the header fields are the proposal's own;
- the chain verifies from the genesis hash the operator pins on the command line
  (`--genesis-hash`, given out of band like an HSA's pin): `domain_core.chain.verify_chain`
  decides (genesis, every producer signature, every quorum of the previous operators, the
  exact manifest each proposal produces). A state that is not chained to that genesis, even
  one signed by one of its own hosts, is refused;
- the proposal's domain id, base version and base state hash are those of the last state of
  that verified chain; with `--state` (a state the operator exported earlier), that state must
  be in the verified chain (else a fork) and not past the proposal's base (else stale);
- the diff and the quorum are computed from the verified base state (never from anything
  else in the file); the proposal must be signed by the proposer it names;
- the proposal is not expired by this machine's clock, and the operator is one of the base
  state's operators who has not approved yet;
- every add-host enrollment verifies against the domain CA of the verified base state (its
  fingerprints are shown; one that fails is shown and nothing is signed).
Everything shown is escaped (`display.escape`). The approval file (format
`hsm-domain-approval`, version 1) holds the proposal id, operator id and signature (and, for a
recover proposal, the operator's recovery share sealed to the session key:
`operator_tool._contribute`), and is submitted by `approvals submit` on a connected machine.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import time
from pathlib import Path
from typing import Any, Final

from google.protobuf.message import DecodeError

from domain_core import canonical, quorum
from domain_core.chain import TrustedChain, verify_chain
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    ChainError,
    ForkError,
    HsmDomainError,
    InvalidInputError,
    MalformedMessageError,
    StaleProposalError,
    VerificationError,
    WrongDomainError,
)
from domain_core.limits import (
    MAX_APPROVAL_FILE_BYTES,
    MAX_EXPORT_FILE_BYTES,
    MAX_EXPORTED_SIGNATURE_BYTES,
    MAX_EXPORTED_STATE_BYTES,
    MAX_RECOVERY_CONTRIBUTION_BYTES,
)
from domain_core.model import OPERATOR_ID_PATTERN, Proposal, SealedState
from domain_edge.cli import Command, UsageError
from domain_edge.files import read_limited, write_new_file
from domain_proto import domain_pb2
from operator_tool._context import CommandContext
from operator_tool._contribute import add_contribution_options, attach_contribution
from operator_tool._render import iso
from operator_tool._review import review, review_lines
from operator_tool._signing import add_yes_option, confirm, operator_token
from operator_tool._where import (
    Connection,
    add_state_option,
    connect,
    parse_genesis_hash,
    read_state_file,
)

__all__ = [
    "APPROVAL_FORMAT",
    "COMMANDS",
    "EXPORT_FORMAT",
    "OfflineBundle",
    "approval_document",
    "export_document",
    "export_proposal",
    "read_approval_file",
    "read_export_file",
    "verify_bundle",
    "write_document",
]

EXPORT_FORMAT: Final = "hsm-domain-proposal-export"
APPROVAL_FORMAT: Final = "hsm-domain-approval"
FORMAT_VERSION: Final = 1  # of the approval file
EXPORT_VERSION: Final = 2  # of the export file: 2 carries the chain from the genesis
_EXPORT_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "domain_id",
        "proposal_id",
        "base_version",
        "base_state_hash",
        "genesis_hash",
        "proposal",
        "chain",
        "approvals",
        "exported_at",
    }
)
_APPROVAL_KEYS: Final = frozenset({"format", "version", "proposal_id", "operator_id", "signature"})
_CONTRIBUTION: Final = "recovery_contribution"  # optional: an approval of a recover proposal


# --- documents -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def export_document(
    proposal: Proposal,
    chain: list[SealedState],
    approvals: list[domain_pb2.Approval],
    now: int,
    genesis_hash: bytes,
) -> dict[str, Any]:
    """The export file's content: `proposal`, the chain from the genesis to its base state
    (`chain[-1]`), the approvals so far."""
    if not chain or chain[-1].version != proposal.base_version:
        raise ValueError("the chain must end at the proposal's base state")
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "domain_id": proposal.domain_id,
        "proposal_id": proposal.id.hex(),
        "base_version": proposal.base_version,
        "base_state_hash": proposal.base_state_hash.hex(),
        "genesis_hash": genesis_hash.hex(),
        "proposal": _b64(proposal.raw),
        "chain": [_b64(state.to_bytes()) for state in chain],
        "approvals": [
            {"operator_id": a.operator_id, "signature": _b64(a.signature)} for a in approvals
        ],
        "exported_at": iso(now),
    }


def approval_document(approval: domain_pb2.Approval) -> dict[str, Any]:
    """The approval file's content (with the sealed recovery share of a recover proposal)."""
    document = {
        "format": APPROVAL_FORMAT,
        "version": FORMAT_VERSION,
        "proposal_id": approval.proposal_id.hex(),
        "operator_id": approval.operator_id,
        "signature": _b64(approval.signature),
    }
    if approval.HasField("recovery_contribution"):
        document["recovery_contribution"] = _b64(
            approval.recovery_contribution.SerializeToString(deterministic=True)
        )
    return document


def write_document(path: Path, document: dict[str, Any]) -> None:
    """Write a JSON document to a new file (0644; never overwrites)."""
    content = (json.dumps(document, indent=2) + "\n").encode()
    try:
        write_new_file(path, content, 0o644)
    except FileExistsError:
        raise AlreadyExistsError(f"a file exists already at {path}; choose another path") from None


def _load(path: Path, what: str, limit: int) -> dict[str, Any]:
    try:
        data = read_limited(
            path,
            limit,
            lambda: InvalidInputError(f"{path} is larger than {limit} bytes; not a {what}"),
        )
    except FileNotFoundError:
        raise InvalidInputError(f"no {what} at {path}") from None
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise MalformedMessageError(f"{path} is not JSON; not a {what}") from None
    if not isinstance(document, dict):
        raise MalformedMessageError(f"{path} is not a JSON object; not a {what}")
    return document


def _check_shape(
    path: Path,
    document: dict[str, Any],
    fmt: str,
    keys: frozenset[str],
    what: str,
    version: int = FORMAT_VERSION,
) -> None:
    if document.get("format") != fmt:
        raise MalformedMessageError(f"{path}: format is not {fmt!r}; is it a {what}?")
    if type(document.get("version")) is not int or document["version"] != version:
        if fmt == EXPORT_FORMAT and document.get("version") == 1:
            raise MalformedMessageError(
                f"{path}: an export of version 1 carries no chain from the genesis, so it "
                "cannot be verified offline; export the proposal again with this version of "
                "hsm-operator (`proposals export`)"
            )
        raise MalformedMessageError(f"{path}: version is not {version}")
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
    document = _load(path, "approval file", MAX_APPROVAL_FILE_BYTES)
    keys = _APPROVAL_KEYS | ({_CONTRIBUTION} if _CONTRIBUTION in document else set())
    _check_shape(path, document, APPROVAL_FORMAT, frozenset(keys), "approval file")
    approval = domain_pb2.Approval(
        proposal_id=_hex(path, document, "proposal_id", canonical.DIGEST_BYTES),
        operator_id=_operator_id(path, document["operator_id"]),
        signature=_base64(path, document["signature"], "signature", MAX_EXPORTED_SIGNATURE_BYTES),
    )
    if _CONTRIBUTION in document:
        raw = _base64(
            path, document[_CONTRIBUTION], _CONTRIBUTION, 2 * MAX_RECOVERY_CONTRIBUTION_BYTES
        )
        try:
            approval.recovery_contribution.ParseFromString(raw)
        except DecodeError:
            raise MalformedMessageError(
                f"{path}: {_CONTRIBUTION} is not a sealed recovery share"
            ) from None
    return approval


def read_export_file(
    path: str | Path,
) -> tuple[Proposal, list[SealedState], list[domain_pb2.Approval]]:
    """(proposal, chain of states, approvals) from an export file, with every self-check.

    The proposal bytes must hash to the id the file names, and the file's domain id, base
    version and base hash must be the proposal's own. The states are only parsed here:
    `verify_bundle` verifies the chain from the operator's pinned genesis.
    """
    path = Path(path)
    document = _load(path, "proposal export file", MAX_EXPORT_FILE_BYTES)
    _check_shape(
        path,
        document,
        EXPORT_FORMAT,
        _EXPORT_KEYS,
        "proposal export (proposals export)",
        EXPORT_VERSION,
    )
    proposal_id = _hex(path, document, "proposal_id", canonical.DIGEST_BYTES)
    raw = _base64(path, document["proposal"], "proposal", MAX_EXPORTED_STATE_BYTES)
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
    _hex(path, document, "genesis_hash", canonical.DIGEST_BYTES)  # shape only: never trusted
    entries = document["chain"]
    if not isinstance(entries, list) or not entries:
        raise MalformedMessageError(f"{path}: chain is not a list of states from the genesis")
    chain = []
    for index, entry in enumerate(entries):
        state_raw = _base64(path, entry, f"chain[{index}]", MAX_EXPORTED_STATE_BYTES)
        try:
            chain.append(SealedState.from_bytes(state_raw))
        except HsmDomainError as error:
            raise type(error)(
                f"{path}: chain[{index}] is not a domain state: {error.message}"
            ) from None
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
                signature=_base64(
                    path, entry["signature"], "signature", MAX_EXPORTED_SIGNATURE_BYTES
                ),
            )
        )
    return proposal, chain, approvals


def _verified_chain(
    domain_id: str, genesis_hash: bytes, states: list[SealedState], failure: str, advice: str
) -> TrustedChain:
    """`verify_chain` of `states` from `genesis_hash`; a failure keeps its class and says
    `FAILURE: why; ADVICE` (what did not verify, and what the operator must not do)."""
    try:
        return verify_chain(domain_id, genesis_hash, states)
    except (ChainError, VerificationError) as error:
        raise type(error)(f"{failure}: {error.message}; {advice}") from None


# --- proposals export (online) -------------------------------------------------------------


def _chain_to(conn: Connection, base: SealedState) -> tuple[list[SealedState], bytes]:
    """The verified states from the genesis to `base`, and the genesis hash they start from.

    Uses the states this run verified; fetches any before the operator's anchor from the
    coordinator, then verifies the whole chain and checks it passes through the anchor and
    ends at `base` (which was verified from the anchor), so the export carries no state this
    machine did not check.
    """
    domain = conn.verified()
    anchor = domain.anchor
    states = {v: s for v, s in domain.states.items() if v <= base.version}
    after = 0
    while len(states) < base.version:
        page = [s for s in conn.client.states_after(after) if after < s.version <= base.version]
        if not page:
            break
        for state in page:
            states.setdefault(state.version, state)
        after = page[-1].version
        if after >= base.version:
            break
    chain = [states[v] for v in sorted(states)]
    genesis_hash = anchor.genesis_hash or (chain[0].hash if chain else b"")
    verified = _verified_chain(
        anchor.domain_id,
        genesis_hash,
        chain,
        f"the coordinator's states from the genesis to version {base.version} do not verify",
        "do not export from it",
    )
    if verified.known_hash(anchor.start.version) != anchor.start.hash or (
        verified.head.hash != base.hash
    ):
        raise ForkError(
            f"the coordinator's states from the genesis do not lead to the state verified from "
            f"{anchor.source}: do not export from it"
        )
    return chain, genesis_hash


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
        chain, genesis_hash = _chain_to(conn, r.base)
    counted = [a for a in view.approvals if a.operator_id in r.approved_by]
    write_document(out, export_document(r.proposal, chain, counted, r.now, genesis_hash))
    short = r.proposal_id.hex()[:16]
    ctx.emit(
        {
            "out": str(out),
            "proposal_id": r.proposal_id.hex(),
            "domain_id": r.proposal.domain_id,
            "base_version": r.proposal.base_version,
            "base_state_hash": r.proposal.base_state_hash.hex(),
            "genesis_hash": genesis_hash.hex(),
            "states": len(chain),
        },
        f"wrote proposal {short} (for version {r.proposal.base_version}) and the {len(chain)} "
        f"state(s) from the genesis to {out}\n"
        f"on the offline machine: hsm-operator sign-offline {out} --genesis-hash "
        "YOUR_PINNED_GENESIS_HASH --out approval.json --token YOUR_TOKEN",
    )
    return 0


# --- sign-offline --------------------------------------------------------------------------


class OfflineBundle:
    """An export file verified from a pinned genesis: the proposal and its verified base."""

    def __init__(
        self,
        proposal: Proposal,
        chain: TrustedChain,
        states: dict[int, SealedState],
        approvals: list[domain_pb2.Approval],
    ) -> None:
        self.proposal = proposal
        self.chain = chain
        self.states = states
        self.approvals = approvals

    @property
    def base(self) -> SealedState:
        """The proposal's base state: the head of the verified chain."""
        return self.chain.head


def _check_base(proposal: Proposal, base: SealedState, path: str) -> None:
    if proposal.domain_id != base.manifest.domain_id:
        raise WrongDomainError(
            f"the proposal is for domain {proposal.domain_id!r}, the chain in {path} is of "
            f"domain {base.manifest.domain_id!r}"
        )
    if proposal.base_version != base.version or proposal.base_state_hash != base.hash:
        raise StaleProposalError(
            f"the chain in {path} ends at version {base.version} (state "
            f"{base.hash.hex()[:16]}), but the proposal is for version {proposal.base_version} "
            f"(state {proposal.base_state_hash.hex()[:16]}): the file was altered or made "
            "against another history; do not sign it"
        )


def _check_own_state(bundle: OfflineBundle, state: SealedState, path: str) -> None:
    """A state the operator exported earlier must be in the verified chain, not past it."""
    base = bundle.base
    if state.manifest.domain_id != base.manifest.domain_id:
        raise WrongDomainError(
            f"your state file {path} is of domain {state.manifest.domain_id!r}, the proposal "
            f"of {base.manifest.domain_id!r}"
        )
    if state.version > base.version:
        raise StaleProposalError(
            f"your state file {path} is at version {state.version}, past this proposal's base "
            f"version {base.version}: the domain moved on since it was proposed (propose "
            "again), or that file is not a state you verified; do not sign"
        )
    if bundle.chain.known_hash(state.version) != state.hash:
        raise ForkError(
            f"your state file {path} (version {state.version}, state {state.hash.hex()[:16]}) "
            "is not the state of that version in the verified chain: two histories (a fork); "
            "do not sign, and report it"
        )


def verify_bundle(
    path: str | Path, genesis_hash: bytes, *, own_state: tuple[SealedState, str] | None = None
) -> OfflineBundle:
    """Read an export file and verify its chain from the pinned `genesis_hash` (see the
    module invariants); raises before anything could be shown."""
    proposal, states, approvals = read_export_file(path)
    where = str(path)
    chain = _verified_chain(
        proposal.domain_id,
        genesis_hash,
        states,
        f"the states in {where} do not verify from the genesis you pinned "
        f"({genesis_hash.hex()[:16]})",
        "do not sign anything it shows",
    )
    _check_base(proposal, chain.head, where)
    bundle = OfflineBundle(proposal, chain, {s.version: s for s in states}, approvals)
    if own_state is not None:
        _check_own_state(bundle, *own_state)
    return bundle


def _sign_offline(ctx: CommandContext) -> int:
    args = ctx.args
    out_path = Path(args.out)
    if out_path.exists():
        raise AlreadyExistsError(f"a file exists already at {out_path}; choose another path")
    if not args.genesis_hash:
        raise UsageError(
            "give --genesis-hash HEX: the genesis hash of your domain, as you were given it out "
            "of band (the chain in the file is verified from it)"
        )
    pinned = parse_genesis_hash(args.genesis_hash)
    own = (read_state_file(args.state), args.state) if args.state else None
    bundle = verify_bundle(args.file, pinned, own_state=own)
    base = bundle.base
    now = int(time.time())
    r = review(bundle.proposal, bundle.approvals, head=base, states=bundle.states, now=now)
    r.require_pending()
    r.require_proposer_signed()
    if not ctx.json or not args.yes:
        ctx.show(
            f"verified offline from the genesis you pinned ({pinned.hex()[:16]}) through "
            f"{len(bundle.states)} state(s) to version {base.version} (state "
            f"{base.hash.hex()[:16]}):\n" + "\n".join(review_lines(r))
        )
    r.require_enrollments_verify()
    confirm(ctx, f"Sign proposal {bundle.proposal.id.hex()} with your token?")
    with operator_token(ctx) as signer:
        r.require_can_sign(signer.public_key.key_id)
        approval = quorum.approve(bundle.proposal, signer)
    attach_contribution(ctx, bundle.proposal, base, approval)
    write_document(out_path, approval_document(approval))
    name = r.name(approval.operator_id)
    ctx.emit(
        {
            "out": str(out_path),
            "proposal_id": bundle.proposal.id.hex(),
            "operator_id": approval.operator_id,
            "operator": name,
        },
        f"wrote the approval of proposal {bundle.proposal.id.hex()[:16]} by {name} to "
        f"{out_path}\n"
        f"on a connected machine: hsm-operator approvals submit {out_path} --cluster DIR",
    )
    return 0


def _sign_offline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the file `proposals export` wrote")
    parser.add_argument(
        "--genesis-hash",
        metavar="HEX",
        help="your domain's genesis state hash (64 hex characters), as given out of band: "
        "required; the chain in FILE must start from it",
    )
    add_state_option(
        parser,
        "optional: a state you exported earlier (domain export-state); it must be in the "
        "verified chain and not past the proposal's base",
    )
    parser.add_argument("--out", required=True, metavar="APPROVAL", help="approval file to create")
    add_yes_option(parser, "sign")
    add_contribution_options(parser)


COMMANDS: Final = (
    Command(
        "sign-offline",
        help="review and sign an exported proposal on a machine with no network",
        description="Verify an exported proposal offline: the bytes hash to the id; the chain "
        "of states in the file verifies from the genesis hash you pin (--genesis-hash, given "
        "to you out of band) and ends at the proposal's base state; show the diff and the "
        "approvals computed from that verified state; sign; write an approval file for "
        "`approvals submit`. Nothing is shown before the chain verifies. Opens no network "
        "connection.",
        run=_sign_offline,
        example="hsm-operator sign-offline proposal.json --genesis-hash "
        "95a5fa778048ba7d0f8e4c2b6a1d3e5f7a9b1c3d5e7f9a1b3c5d7e9f1a3b5c7d --out approval.json "
        "--token 'pkcs11:token=bob;object=operator?module-path=/usr/lib/softhsm/libsofthsm2.so'",
        arguments=_sign_offline_arguments,
    ),
)
