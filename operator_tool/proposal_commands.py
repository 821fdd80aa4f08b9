"""`hsm-operator propose ...` and `hsm-operator proposals list|show|export`.

Invariants kept here:
- a proposal is built against the head this operator verified from its trust anchor (never
  the coordinator's unverified latest state), its effect is computed here with
  `transition.apply_changes` and shown before it is signed, and an impossible change (a
  duplicate, an unreachable quorum) is refused before anything is signed;
- the proposer must be an operator of that head; the proposer's signature is submitted with
  the proposal as its first approval;
- what `list` and `show` print is judged here (`_review.review`): states, approvals and the
  diff come from verified data; the coordinator's words only ever close a proposal; every
  line is escaped (`display.escape`) before it reaches the terminal;
- a `--reason` that is not printable text on one line is refused before anything is signed
  (every verifier refuses such a proposal too: `model.Proposal.from_bytes`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from domain_core import crypto, quorum, transition
from domain_core.changes import (
    add_host,
    add_operator,
    remove_host,
    remove_operator,
    rotate_domain_key,
    set_quorum,
    set_recovery_key,
    set_settings,
)
from domain_core.display import escape, printable
from domain_core.errors import InvalidInputError, NotFoundError, UnknownSignerError
from domain_core.model import (
    CHANGE_TYPES_BY_NAME,
    NONCE_BYTES,
    Proposal,
    SealedState,
    make_operator,
)
from domain_core.recovery import recover_change
from domain_core.signers import Signer
from domain_edge.cli import Command, Group, UsageError
from domain_edge.enrollment_files import read_enrollment
from domain_edge.tokens import read_operator_public
from domain_proto import domain_pb2
from operator_tool import offline
from operator_tool._context import CommandContext, Handler
from operator_tool._contribute import attach_contribution
from operator_tool._recovery_key import (
    add_recovery_key_options,
    opened_recovery_key,
    recovery_key_fields,
)
from operator_tool._render import (
    change_lines,
    change_short,
    diff_lines,
    format_duration,
    manifest_diff,
    relative,
    table,
)
from operator_tool._review import Review, review, review_json, review_lines, summary_json
from operator_tool._signing import (
    DEFAULT_EXPIRES_IN,
    add_yes_option,
    confirm,
    operator_token,
    parse_duration,
)
from operator_tool._where import Connection, add_domain_options, connect

__all__ = ["COMMANDS", "ChangeBuilder", "propose", "resolve_operator", "submitted_text"]

ChangeBuilder = Callable[[CommandContext, Connection, SealedState, Signer], list[domain_pb2.Change]]


def submitted_text(r: Review) -> str:
    """One line about a proposal after a submission."""
    short = r.proposal_id.hex()[:16]
    if r.state == "applied":
        return f"proposal {short} applied: the domain is at version {r.applied_version}"
    if r.pending:
        more = (
            f"{r.needed} more needed; others approve with `hsm-operator approve {short}`"
            if r.needed
            else "quorum reached; an HSA applies it"
        )
        return f"proposal {short} pending: {len(r.approved_by)} of {r.threshold} approvals, {more}"
    return f"proposal {short} {r.state}: {escape(r.detail)}"


# --- propose -------------------------------------------------------------------------------


def propose(ctx: CommandContext, build: ChangeBuilder) -> int:
    """Build the changes against the verified head, show them, sign and submit (with the
    proposer's recovery share for a recover proposal)."""
    args = ctx.args
    expires_in = parse_duration(args.expires_in)
    reason: str = args.reason or ""
    if not printable(reason):
        raise InvalidInputError(
            f"--reason {reason[:80]!r} is not printable text on one line: approvers "
            "read it on their terminals, so control characters, line breaks, escape "
            "sequences and format characters (such as bidi overrides) are refused"
        )
    with connect(ctx) as conn:
        domain = conn.verified()
        head = domain.head
        settings = head.manifest.message.settings
        if expires_in > settings.max_proposal_lifetime_seconds:
            raise InvalidInputError(
                f"--expires-in {format_duration(expires_in)} is longer than this domain allows "
                f"({format_duration(settings.max_proposal_lifetime_seconds)})"
            )
        with operator_token(ctx) as signer:
            proposer = signer.public_key.key_id
            if proposer not in head.manifest.operators_by_id:
                raise UnknownSignerError(
                    f"you are not an operator of this domain (operator id {proposer[:16]}... is "
                    f"not in version {head.version})"
                )
            changes = build(ctx, conn, head, signer)
            now = int(time.time())
            proposal = Proposal.create(
                domain_id=head.manifest.domain_id,
                base_version=head.version,
                base_state_hash=head.hash,
                changes=changes,
                proposer_id=proposer,
                created_at=now,
                expires_at=now + expires_in,
                reason=reason,
                nonce=crypto.random_bytes(NONCE_BYTES),
            )
            # Refuse an impossible change with its own error before anything is signed.
            after, _ = transition.apply_changes(head.manifest.message, proposal, now=now)
            names = {o.operator_id: o.name for o in head.manifest.message.operators}
            lines = [
                f"you propose, for domain {head.manifest.domain_id} at version {head.version} "
                f"(verified from {domain.anchor.source}):",
                *(f"  {line}" for line in change_lines(proposal.changes, names)),
                f"reason: {reason or '(none given)'}; expires in {format_duration(expires_in)}",
                "",
                "what changes:",
                *(f"  {line}" for line in diff_lines(manifest_diff(head.manifest.message, after))),
            ]
            if not ctx.json or not getattr(args, "yes", False):
                ctx.show("\n".join(lines))
            confirm(ctx, "Sign and submit this proposal?")
            approval = quorum.approve(proposal, signer)
            if recover_change(proposal) is not None:  # (set-recovery-key names a key too)
                attach_contribution(ctx, proposal, head, approval)
        view = conn.client.submit_proposal(proposal, approval)
        result = conn.review(view)
    ctx.emit(summary_json(result), submitted_text(result) + f"\nproposal id: {proposal.id.hex()}")
    return 0


def _add_host(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    # Verified against the domain CA that the verified head pins (not a local CA file), as
    # every HSA will; `_propose` then shows the host's key fingerprints before signing.
    enrollment = read_enrollment(
        Path(ctx.args.enrollment),
        head.manifest.message.settings.domain_ca_certificate,
        head.manifest.domain_id,
        datetime.now(UTC),
    )
    return [add_host(enrollment.raw)]


def _remove_host(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    return [remove_host(host_id) for host_id in ctx.args.host_id]


def _add_operator(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    name, public_key = read_operator_public(Path(ctx.args.public_key))
    return [add_operator(make_operator(ctx.args.name or name, public_key))]


def resolve_operator(head: SealedState, text: str) -> str:
    """An operator id from an id, a unique id prefix (6+ hex digits) or a name in `head`."""
    operators = head.manifest.message.operators
    by_name = [o.operator_id for o in operators if o.name == text]
    if by_name:
        return by_name[0]
    key = text.strip().lower()
    matches = [o.operator_id for o in operators if len(key) >= 6 and o.operator_id.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidInputError(f"{len(matches)} operators' ids start with {key}; give more digits")
    raise NotFoundError(
        f"no operator {text[:70]!r} in version {head.version}; see `hsm-operator domain status`"
    )


def _remove_operator(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    return [remove_operator(resolve_operator(head, ctx.args.operator))]


def _set_quorum(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    if ctx.args.recovery and ctx.args.for_type:
        raise UsageError("--recovery sets the recovery threshold, which belongs to no --for type")
    return [set_quorum(ctx.args.threshold, ctx.args.for_type, recovery=ctx.args.recovery)]


def _set_recovery_key(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    # Opened with its secret, so the key enrolled is the one this operator holds.
    with opened_recovery_key(ctx) as key:
        algorithm, public_key = key.algorithm, key.public_key
    fields = recovery_key_fields(algorithm, public_key)
    ctx.show(
        f"your recovery key: {fields['algorithm']}, fingerprint {fields['fingerprint']}\n"
        "your token signs that this key is yours, for this domain only"
    )
    confirm(ctx, "Sign the enrollment of this recovery key?")
    return [
        set_recovery_key(
            signer,
            domain_id=head.manifest.domain_id,
            algorithm=algorithm,
            public_key=public_key,
        )
    ]


def _set_settings(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    args = ctx.args
    values: dict[str, int] = {}
    if args.key_rotation_interval is not None:
        values["key_rotation_interval_seconds"] = parse_duration(args.key_rotation_interval)
    if args.generations_retained is not None:
        values["key_generations_retained"] = args.generations_retained
    if args.max_proposal_lifetime is not None:
        values["max_proposal_lifetime_seconds"] = parse_duration(args.max_proposal_lifetime)
    if not values:
        raise UsageError(
            "name at least one setting: --key-rotation-interval, --generations-retained or "
            "--max-proposal-lifetime"
        )
    return [set_settings(base=head.manifest.message.settings, **values)]


def _rotate(
    ctx: CommandContext, conn: Connection, head: SealedState, signer: Signer
) -> list[domain_pb2.Change]:
    return [rotate_domain_key()]


def _handler(build: ChangeBuilder) -> Handler:
    def handler(ctx: CommandContext) -> int:
        return propose(ctx, build)

    return handler


def _proposal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", metavar="TEXT", default="", help="why (shown to approvers)")
    parser.add_argument(
        "--expires-in",
        metavar="DURATION",
        default=DEFAULT_EXPIRES_IN,
        help=f"lifetime: seconds, or 90s, 30m, 2h, 7d (default {DEFAULT_EXPIRES_IN})",
    )
    add_yes_option(parser, "sign and submit")
    add_domain_options(parser)


# --- proposals list / show -----------------------------------------------------------------


def _list(ctx: CommandContext) -> int:
    with connect(ctx) as conn:
        views = conn.client.list_proposals(include_closed=ctx.args.all)
        domain = conn.verified()
        now = int(time.time())
        reviews = [
            review(
                v.proposal,
                v.approvals,
                head=domain.head,
                states=domain.states,
                now=now,
                coordinator_state=v.state,
                coordinator_detail=v.detail,
                cancel_votes=v.cancel_votes,
            )
            for v in views
        ]
    head = domain.head
    document: dict[str, Any] = {
        "domain_id": head.manifest.domain_id,
        "version": head.version,
        "state_hash": head.hash.hex(),
        "proposals": [summary_json(r) for r in reviews],
    }
    what = "proposal" if ctx.args.all else "pending proposal"
    plural = "" if len(reviews) == 1 else "s"
    if not reviews:
        text = f"no {what}s (domain {head.manifest.domain_id} at version {head.version})"
    else:
        rows = [["ID", "STATE", "CHANGES", "APPROVALS", "EXPIRES", "PROPOSER"]]
        for r in reviews:
            approvals = f"{len(r.approved_by)} of {r.threshold}"
            rows.append(
                [
                    r.proposal_id.hex()[:16],
                    r.state,
                    change_short(r.proposal.changes, r.names),
                    approvals,
                    relative(r.proposal.expires_at, now),
                    r.name(r.proposal.proposer_id),
                ]
            )
        text = "\n".join(
            [
                f"{len(reviews)} {what}{plural}, domain {head.manifest.domain_id} at version "
                f"{head.version}:",
                *table(rows),
            ]
        )
    ctx.emit(document, text)
    return 0


def _show(ctx: CommandContext) -> int:
    with connect(ctx) as conn:
        r = conn.review(conn.proposal(ctx.args.id))
    ctx.emit(review_json(r), "\n".join(review_lines(r)))
    return 0


# --- the table -------------------------------------------------------------------------------

_PROPOSE_NOTES = """
    The proposal is built against the head verified from your trust anchor, its effect is
    computed and shown, then your token signs it (your signature is its first approval) and
    it goes to the coordinator. --json prints the proposal id and state.
    """


def _proposal(
    name: str,
    build: ChangeBuilder,
    help: str,
    example: str,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Command:
    """A `propose NAME` command: its own arguments, then what every proposal takes."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        if arguments is not None:
            arguments(parser)
        _proposal_options(parser)

    return Command(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        run=_handler(build),
        example=example,
        notes=_PROPOSE_NOTES,
        arguments=add_arguments,
    )


def _add_host_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enrollment", required=True, metavar="FILE", help="the host's enrollment")


def _remove_host_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "host_id", metavar="HOST_ID", nargs="+", help="the host(s) to remove (one proposal)"
    )


def _add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--public-key", required=True, metavar="FILE", help="the new operator's public key file"
    )
    parser.add_argument("--name", metavar="NAME", help="their name (default: the file's name)")


def _remove_operator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("operator", metavar="ID", help="the operator's id, id prefix or name")


def _set_quorum_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "threshold",
        metavar="M",
        type=int,
        help="approvals needed (0 with --for: back to the default)",
    )
    parser.add_argument(
        "--for",
        dest="for_type",
        metavar="CHANGE_TYPE",
        choices=sorted(CHANGE_TYPES_BY_NAME),
        help=f"only for this change type ({', '.join(sorted(CHANGE_TYPES_BY_NAME))})",
    )
    parser.add_argument(
        "--recovery",
        action="store_true",
        help="set the recovery threshold: how many operators' recovery keys rebuild a lost "
        "domain (0: no recovery packages)",
    )


def _set_settings_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-rotation-interval", metavar="DURATION")
    parser.add_argument("--generations-retained", metavar="N", type=int)
    parser.add_argument("--max-proposal-lifetime", metavar="DURATION")


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="include closed proposals")
    add_domain_options(parser)


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="proposal id (or 6+ leading hex digits)")
    add_domain_options(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="proposal id (or 6+ leading hex digits)")
    parser.add_argument("--out", required=True, metavar="FILE", help="file to create")
    add_domain_options(parser)


_PROPOSE = Group(
    "propose",
    help="propose a change of the domain (signed by you as its first approval)",
    description="Propose a change of the domain's hosts, operators, quorum, settings or "
    "domain key. Your token signs the proposal; the other operators approve it.",
    example="hsm-operator propose add-operator --public-key dave.pub.json --cluster DIR",
    commands=(
        _proposal(
            "add-host",
            _add_host,
            "trust a new host, from its enrollment file (verified against the domain CA)",
            "hsm-operator propose add-host --enrollment hsm-cluster/nodes/hsa-4/enrollment.bin "
            "--cluster hsm-cluster --token alice.token --reason 'capacity'",
            _add_host_arguments,
        ),
        _proposal(
            "remove-host",
            _remove_host,
            "stop trusting a host (the domain key rotates in the same change)",
            "hsm-operator propose remove-host hsa-2 --cluster hsm-cluster --token alice.token",
            _remove_host_arguments,
        ),
        _proposal(
            "add-operator",
            _add_operator,
            "add an operator from their public key document (token export-public)",
            "hsm-operator propose add-operator --public-key dave.pub.json --name dave "
            "--cluster hsm-cluster --token alice.token --yes --json",
            _add_operator_arguments,
        ),
        _proposal(
            "remove-operator",
            _remove_operator,
            "remove an operator (by name, id, or a unique id prefix)",
            "hsm-operator propose remove-operator carol --cluster hsm-cluster --token alice.token",
            _remove_operator_arguments,
        ),
        _proposal(
            "set-quorum",
            _set_quorum,
            "set the default threshold M, the threshold of one change type (--for), or the "
            "recovery threshold (--recovery)",
            "hsm-operator propose set-quorum 3 --cluster hsm-cluster --token alice.token\n"
            "hsm-operator propose set-quorum 3 --for add-host --cluster hsm-cluster\n"
            "hsm-operator propose set-quorum 2 --recovery --cluster hsm-cluster",
            _set_quorum_arguments,
        ),
        _proposal(
            "set-recovery-key",
            _set_recovery_key,
            "enroll your recovery key (your token signs that it is yours)",
            "hsm-operator propose set-recovery-key --recovery-token alice.recovery "
            "--cluster hsm-cluster --token alice.token",
            add_recovery_key_options,
        ),
        _proposal(
            "set-settings",
            _set_settings,
            "change domain settings (rotation interval, generations kept, proposal lifetime)",
            "hsm-operator propose set-settings --key-rotation-interval 12h --cluster hsm-cluster",
            _set_settings_arguments,
        ),
        _proposal(
            "rotate-domain-key",
            _rotate,
            "rotate the domain key now, before the scheduled rotation",
            "hsm-operator propose rotate-domain-key --cluster hsm-cluster --token alice.token",
        ),
    ),
)

_PROPOSALS = Group(
    "proposals",
    help="list, show and export proposals",
    description="Look at proposals: every state, approval and diff shown is computed here "
    "from states verified against your trust anchor.",
    example="hsm-operator proposals list --cluster hsm-cluster",
    commands=(
        Command(
            "list",
            help="list pending proposals (--all: closed ones too)",
            description="List the pending proposals (with --all also applied, expired, stale, "
            "cancelled and rejected ones): id, state, changes, approvals, expiry, proposer.",
            run=_list,
            example="hsm-operator proposals list --cluster hsm-cluster --json",
            arguments=_list_arguments,
        ),
        Command(
            "show",
            help="show a proposal: what changes, who approved, who still can, when it expires",
            description="Show a proposal with a before/after diff of hosts, operators, quorum "
            "and settings, computed here from the verified base state; who approved, who still "
            "can, how many more are needed and when it expires.",
            run=_show,
            example="hsm-operator proposals show 3f2a9c1e --cluster hsm-cluster",
            arguments=_show_arguments,
        ),
        Command(
            "export",
            help="write a proposal to a file for an operator who signs offline",
            description="Write the exact proposal bytes, the base state's manifest and the "
            "approvals so far to a file for `sign-offline` on an air-gapped machine.",
            run=offline.export_proposal,
            example="hsm-operator proposals export 3f2a9c1e --out proposal.json "
            "--cluster hsm-cluster",
            arguments=_export_arguments,
        ),
    ),
)

COMMANDS: Final = (_PROPOSE, _PROPOSALS)
