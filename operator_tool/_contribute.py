"""An operator's recovery share, given with their approval of a recover proposal.

Whoever signs a recover proposal (`propose` through `recovery contribute`, `approve`,
`sign-offline`) and holds a recovery key enrolled in the proposal's verified base state gives
their share with it: opened from that state's recovery package with their recovery key (on
their token: a file token's key in memory, a PKCS#11 key by ECDH on the token), or read from a
paper share (`--share-file`, SLIP-39 words), and sealed to the session key the proposal names,
bound to this domain, this proposal and this operator (`recovery.seal_contribution`). The
share never leaves this process otherwise: it is not printed, logged or written.

Invariants: a recovery key is used only if it is the one the base state enrolled for this
operator (the fingerprints are compared, and a mismatch says both); a recovery option on a
proposal that recovers nothing is a usage error; an operator with an enrolled key who gives
no share is refused (an approval without a share cannot help rebuild the keys); a paper share
must be SLIP-39 words (checked before anything is signed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from domain_core import recovery
from domain_core.errors import InvalidInputError
from domain_core.limits import MAX_SECRET_INPUT_FILE_BYTES
from domain_core.model import Proposal, SealedState
from domain_core.recovery_shares import check_share_words
from domain_edge.cli import UsageError
from domain_edge.files import read_limited
from domain_proto import domain_pb2
from operator_tool._context import CommandContext
from operator_tool._recovery_key import (
    RECOVERY_TOKEN_ENV,
    add_recovery_key_options,
    opened_recovery_key,
    recovery_key_fields,
)

__all__ = ["add_contribution_options", "attach_contribution", "read_share_file"]


def add_contribution_options(parser: argparse.ArgumentParser) -> None:
    """The recovery key options, and `--share-file` for a paper share."""
    add_recovery_key_options(parser)
    parser.add_argument(
        "--share-file",
        metavar="FILE",
        help="a recover proposal: your share as SLIP-39 words (from `recovery share --format "
        "slip39`), instead of opening it with your recovery key",
    )


def read_share_file(path: str | Path) -> str:
    """The SLIP-39 words in a share file (whitespace normalised), checked to be a share."""
    path = Path(path)
    try:
        data = read_limited(
            path,
            MAX_SECRET_INPUT_FILE_BYTES,
            lambda: InvalidInputError(f"{path} is too large to be a recovery share"),
        )
    except FileNotFoundError:
        raise InvalidInputError(f"no share file at {path}") from None
    try:
        words = " ".join(data.decode("ascii").split())
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} does not hold SLIP-39 words") from None
    check_share_words(words)
    return words


def _wants_share(ctx: CommandContext) -> bool:
    args = ctx.args
    return bool(
        getattr(args, "share_file", None)
        or getattr(args, "recovery_token", None)
        or (hasattr(args, "recovery_token") and ctx.environ.get(RECOVERY_TOKEN_ENV))
    )


def _own_share(ctx: CommandContext, base: SealedState, operator_id: str) -> str:
    manifest = base.manifest
    enrolled = next(
        (o.recovery_key for o in recovery.recipients(manifest) if o.operator_id == operator_id),
        None,
    )
    if enrolled is None:
        raise InvalidInputError(
            f"you enrolled no recovery key by version {base.version}, so its recovery package "
            "holds no share of yours: approve without --recovery-token or --share-file"
        )
    share_file = getattr(ctx.args, "share_file", None)
    if share_file:
        return read_share_file(share_file)
    with opened_recovery_key(ctx) as key:
        if key.public_key != enrolled.public_key:
            mine = recovery_key_fields(key.algorithm, key.public_key)["fingerprint"]
            theirs = recovery_key_fields(key.algorithm, enrolled.public_key)["fingerprint"]
            raise InvalidInputError(
                f"this recovery key ({mine}) is not the one version {base.version} enrolled for "
                f"you ({theirs}): use the recovery token you enrolled"
            )
        return recovery.open_operator_share(manifest, base.secrets.recovery, operator_id, key.agree)


def attach_contribution(
    ctx: CommandContext, proposal: Proposal, base: SealedState, approval: domain_pb2.Approval
) -> None:
    """Add the operator's share to their approval of a recover proposal over `base` (the
    verified base state); nothing for any other proposal (see the module)."""
    recover = recovery.recover_change(proposal)
    if recover is None:
        if _wants_share(ctx):
            raise UsageError(
                "--recovery-token and --share-file give a recovery share, for a recover "
                "proposal only; this proposal recovers nothing"
            )
        return
    operator_id = approval.operator_id
    enrolled = any(o.operator_id == operator_id for o in recovery.recipients(base.manifest))
    if not _wants_share(ctx):
        if enrolled:
            raise UsageError(
                "this proposal recovers the domain: give your share with --recovery-token REF "
                "(your recovery key) or --share-file FILE (your paper share)"
            )
        return
    share = _own_share(ctx, base, operator_id)
    approval.recovery_contribution.CopyFrom(
        recovery.seal_contribution(
            recover.session_public_key,
            share,
            domain_id=base.manifest.domain_id,
            proposal_id=proposal.id,
            operator_id=operator_id,
        )
    )
