"""`hsm-operator approve ID`, `cancel ID` and `approvals submit FILE`, with `--wait`.

Invariants kept here:
- what is signed is exactly what was reviewed: the approval signs the id computed here from
  the proposal bytes that the review was made from, never an id the coordinator names;
- an approval is signed only for a proposal whose bytes hash to its id, that is pending for
  the head verified from the operator's trust anchor, not expired, whose add-host
  enrollments verify here against the verified state's domain CA, signed by the proposer it
  names (their approval verifies here), after the operator saw the diff computed here and
  said yes (or gave --yes), and only by a current operator who has not approved it yet (each
  refusal is one line: stale, expired, an enrollment that does not verify, not signed by its
  proposer, already approved by you, you are not an operator of this domain, wrong PIN,
  token not found);
- `approve` and `cancel` take an id prefix only when a person confirms on a terminal: the
  review and the question then show the full id (and that it was resolved from a prefix
  through the coordinator's list); with `--yes` they need the full id
  (`_where.require_full_id_unless_confirmed`);
- an approval file is checked here (signature under a current operator's key) before it is
  relayed, so a broken one is refused with a reason rather than by the coordinator;
- `--wait` returns 0 only once the change is applied everywhere (see `wait_applied`), and
  gives up with status 1 after --timeout, naming the hosts still behind.

"Applied everywhere" means: the coordinator reports the proposal applied as version V; this
tool fetched state V and verified it from its trust anchor; and every host of state V reports
(through the coordinator's `ListHsas`) that it has installed version V with exactly the
verified hash of V, or a later version. Operators have no TLS client certificate to ask HSAs
themselves, so those reports are the HSAs' own words relayed by the untrusted coordinator:
they tell an operator when to stop waiting, never what to trust. `hsm-domain status DIR` asks
each HSA of a local domain directly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, Final

from domain_core import quorum
from domain_core.display import escape
from domain_core.errors import BadSignatureError, UnavailableError, UnknownSignerError
from domain_core.model import SealedState
from domain_core.recovery import check_contribution
from domain_edge.cli import Command, Group, Spinner
from domain_edge.client import ProposalView
from domain_proto import domain_pb2, services_pb2
from operator_tool._context import CommandContext
from operator_tool._contribute import add_contribution_options, attach_contribution
from operator_tool._review import Review, review_lines, summary_json
from operator_tool._signing import add_yes_option, confirm, operator_token
from operator_tool._where import (
    Connection,
    add_domain_options,
    connect,
    is_full_id,
    proposal_key,
    require_full_id_unless_confirmed,
)
from operator_tool.offline import read_approval_file
from operator_tool.proposal_commands import submitted_text

__all__ = ["COMMANDS", "add_wait_options", "approve", "hosts_behind", "wait_applied"]

DEFAULT_WAIT_SECONDS: Final = 60.0
_POLL_SECONDS: Final = 0.25


def _age(reported_at: int, now: float) -> str:
    seconds = max(0, int(now) - reported_at)
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


def hosts_behind(
    state: SealedState,
    reports: Sequence[services_pb2.HsaEndpoint],
    now: float | None = None,
) -> list[str]:
    """The hosts of `state` that do not report it (or a later version) yet, each with what
    it last reported; with `now`, how long ago it reported that."""
    by_host = {e.host_id: e for e in reports}
    behind = []
    for host in (h.host_id for h in state.manifest.message.hosts):
        entry = by_host.get(host)
        if entry is None:
            behind.append(f"{host} (not registered with the coordinator)")
            continue
        if entry.version > state.version or (
            entry.version == state.version and entry.state_hash == state.hash
        ):
            continue
        if entry.version == state.version:
            what = f"reports another state for version {state.version}: investigate"
        elif entry.version == 0:
            what = "has not reported a version"
        else:
            what = f"at version {entry.version}"
        if now is not None and entry.reported_at:
            what += f", reported {_age(entry.reported_at, now)}"
        behind.append(f"{host} ({what})")
    return behind


def wait_applied(
    ctx: CommandContext, conn: Connection, proposal_id: bytes, timeout: float
) -> dict[str, Any]:
    """Poll until the proposal is applied everywhere (module docstring); its facts as JSON."""
    deadline = time.monotonic() + timeout
    progress = Spinner(ctx.stderr)
    try:
        while True:
            last_round = time.monotonic() >= deadline
            r = conn.review(conn.client.get_proposal(proposal_id))
            if r.state == "applied":
                state = conn.verified().states[r.applied_version]
                members = [h.host_id for h in state.manifest.message.hosts]
                reports = conn.client.list_hsas()
                # Report ages only in the final message: a progress line is printed each
                # time its text changes, and that should mean the facts changed.
                behind = hosts_behind(state, reports, time.time() if last_round else None)
                if not behind:
                    reported = {e.host_id: e.version for e in reports if e.host_id in members}
                    return {
                        "applied_version": r.applied_version,
                        "state_hash": state.hash.hex(),
                        "hosts": members,
                        "reported_versions": reported,
                    }
                text = (
                    f"version {r.applied_version} is applied and verified; not reported yet by "
                    + ", ".join(behind)
                )
            elif r.pending:
                text = (
                    f"{len(r.approved_by)} of {r.threshold} approvals; waiting for {r.needed} more"
                    if r.needed
                    else "quorum reached; waiting for an HSA to apply it"
                )
            else:
                r.require_pending()
                text = r.state
            if last_round:
                raise UnavailableError(f"gave up waiting after {timeout:g} s: {text}")
            progress.update(text)
            time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    finally:
        progress.done()


def _finish(ctx: CommandContext, conn: Connection, view: ProposalView) -> int:
    """Report a submission, and with --wait wait until the change is applied everywhere."""
    r = conn.review(view)
    document = summary_json(r)
    text = submitted_text(r)
    if ctx.args.wait:
        if not ctx.json:
            ctx.stdout.write(text + "\n")
            ctx.stdout.flush()
        applied = wait_applied(ctx, conn, r.proposal_id, ctx.args.timeout)
        document = summary_json(conn.review(conn.client.get_proposal(r.proposal_id)))
        document["applied_everywhere"] = applied
        text = (
            f"applied everywhere: version {applied['applied_version']} is verified and every "
            f"host of it ({', '.join(applied['hosts'])}) reports it installed"
        )
    ctx.emit(document, text)
    return 0


def _show(ctx: CommandContext, r: Review) -> None:
    """Show the review (before a refusal, so the operator sees what is refused)."""
    if not ctx.json or not ctx.args.yes:
        ctx.show("\n".join(review_lines(r)))


def _show_and_confirm(ctx: CommandContext, r: Review, verb: str, question: str) -> None:
    """Show the review, then ask (unless --yes). With a prefix, say what it resolved to."""
    typed = proposal_key(ctx.args.id)
    lines = review_lines(r)
    if not is_full_id(typed):
        lines += [
            "",
            f"you gave the prefix {typed}; the coordinator's list resolved it to the proposal "
            "above, whose full id is",
            f"  {r.proposal_id.hex()}",
            "check it against the full id the proposer gave you before you " + verb,
        ]
    if not ctx.json or not ctx.args.yes:
        ctx.show("\n".join(lines))
    confirm(ctx, question)


def approve(ctx: CommandContext) -> int:
    """`approve ID`: review, confirm, sign (with the operator's recovery share for a recover
    proposal) and submit."""
    require_full_id_unless_confirmed(ctx, ctx.args.id, "approve")
    with connect(ctx) as conn:
        r = conn.review(conn.proposal(ctx.args.id))
        r.require_pending()
        if r.enrollment_problems:
            _show(ctx, r)
            r.require_enrollments_verify()
        r.require_proposer_signed()
        _show_and_confirm(
            ctx, r, "approve", f"Approve proposal {r.proposal_id.hex()} with your token?"
        )
        with operator_token(ctx) as signer:
            r.require_can_sign(signer.public_key.key_id)
            # The id signed is computed from the bytes the review was made from.
            approval = quorum.approve(r.proposal, signer)
        attach_contribution(ctx, r.proposal, conn.verified().head, approval)
        return _finish(ctx, conn, conn.client.submit_approval(approval))


def _cancel(ctx: CommandContext) -> int:
    require_full_id_unless_confirmed(ctx, ctx.args.id, "cancel")
    with connect(ctx) as conn:
        r = conn.review(conn.proposal(ctx.args.id))
        r.require_pending()
        _show_and_confirm(ctx, r, "cancel", f"Cancel proposal {r.proposal_id.hex()}?")
        head = conn.verified().head
        with operator_token(ctx) as signer:
            operator_id = signer.public_key.key_id
            if operator_id not in head.manifest.operators_by_id:
                raise UnknownSignerError(
                    f"you are not an operator of this domain (operator id {operator_id[:16]}... "
                    f"is not in version {head.version})"
                )
            view = conn.client.cancel(r.proposal_id, signer)
        result = conn.review(view)
    short = result.proposal_id.hex()[:16]
    if result.pending:
        # Not the proposer, and not enough votes yet: the vote is recorded, nothing more.
        text = f"proposal {short} pending: your vote to cancel counts; {result.cancel_standing()}"
    else:
        text = f"proposal {short} {result.state}: {escape(result.detail)}"
    ctx.emit(summary_json(result), text)
    return 0


def _submit(ctx: CommandContext) -> int:
    approval: domain_pb2.Approval = read_approval_file(ctx.args.file)
    with connect(ctx) as conn:
        r = conn.review(conn.client.get_proposal(approval.proposal_id))
        r.require_pending()
        r.require_enrollments_verify()
        r.require_can_sign(approval.operator_id)
        check_contribution(r.proposal, approval)
        key = r.voters.operator_keys[approval.operator_id]
        try:
            quorum.verify_approval_signature(approval, r.proposal_id, key)
        except BadSignatureError:
            raise BadSignatureError(
                f"the approval in {ctx.args.file} does not verify under the key of operator "
                f"{r.name(approval.operator_id)}: it was altered or signed another proposal"
            ) from None
        return _finish(ctx, conn, conn.client.submit_approval(approval))


def add_wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait until the change is applied everywhere: every host of the new state "
        "reports it installed (a spinner on a terminal; exit 1 naming the hosts behind after "
        "--timeout)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help=f"give up waiting after this long (default {DEFAULT_WAIT_SECONDS:g})",
    )


_WAIT_NOTES = """
    --wait: "applied everywhere" means the coordinator reports the proposal applied as
    version V, this tool verified state V from your trust anchor, and every host of V
    reports (as relayed by the coordinator's ListHsas) version V with the verified hash of
    V, or a later version. After --timeout it exits 1 naming the hosts still behind; the
    approval was submitted all the same. The reports are the HSAs' own words passed on by
    the untrusted coordinator: they end the wait, they are not verified.
    """


_PREFIX_NOTES = """
    A short id prefix is resolved through the coordinator's list, which an untrusted
    coordinator can fill with another proposal ground to share the prefix. So a prefix is
    taken only when you confirm on a terminal, after the review and the full id are shown;
    with --yes give the full id (64 hex digits) that the proposer gave you.
    """


def _id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "id", metavar="ID", help="proposal id; 6+ leading hex digits only without --yes"
    )


def _approve_arguments(parser: argparse.ArgumentParser) -> None:
    _id_argument(parser)
    add_yes_option(parser, "approve")
    add_contribution_options(parser)
    add_wait_options(parser)
    add_domain_options(parser)


def _cancel_arguments(parser: argparse.ArgumentParser) -> None:
    _id_argument(parser)
    add_yes_option(parser, "cancel")
    add_domain_options(parser)


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="APPROVAL", help="the approval file sign-offline wrote")
    add_wait_options(parser)
    add_domain_options(parser)


COMMANDS: Final = (
    Command(
        "approve",
        help="review a proposal and approve it with your token",
        description="Show what the proposal changes (computed here from the verified state), "
        "ask for confirmation unless --yes, sign it with your token and submit the approval.",
        run=approve,
        example="hsm-operator approve 3f2a9c1e --cluster hsm-cluster --token bob.token --wait\n"
        "hsm-operator approve "
        "3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f "
        "--cluster hsm-cluster --token bob.token --yes --wait",
        notes=_WAIT_NOTES + _PREFIX_NOTES,
        arguments=_approve_arguments,
    ),
    Command(
        "cancel",
        help="cancel a pending proposal (the proposer at once; others by a quorum of votes)",
        description="Cancel a pending proposal: your token signs the cancel message. The "
        "proposer's signature cancels it at once; any other operator's is a vote, and the "
        "proposal is cancelled once the votes reach the threshold it needs to apply. An "
        "approval cannot be withdrawn: vote to cancel instead.",
        run=_cancel,
        example="hsm-operator cancel 3f2a9c1e --cluster hsm-cluster --token alice.token",
        notes=_PREFIX_NOTES,
        arguments=_cancel_arguments,
    ),
    Group(
        "approvals",
        help="submit an approval signed offline",
        description="Relay approvals made with `sign-offline` on an air-gapped machine.",
        example="hsm-operator approvals submit approval.json --cluster hsm-cluster",
        commands=(
            Command(
                "submit",
                help="check an approval file and submit it to the coordinator",
                description="Check an approval file from `sign-offline` (its signature under a "
                "current operator's key, for a pending proposal of the verified head) and "
                "submit it. Needs no token: the signature was made offline.",
                run=_submit,
                example="hsm-operator approvals submit approval.json --cluster hsm-cluster --wait",
                notes=_WAIT_NOTES,
                arguments=_submit_arguments,
            ),
        ),
    ),
)
