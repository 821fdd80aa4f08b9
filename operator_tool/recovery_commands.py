"""`hsm-operator recovery ...`: an operator's recovery key, and their part in a recovery.

Invariants kept here:
- a recovery key is made where it stays: an X25519 key in its own passphrase file (0600,
  never over another file), or a P-256 key generated ON a PKCS#11 token, sensitive, not
  extractable, allowed only to derive;
- `show` opens the key with its secret, so the fingerprint it prints is the key's own (a
  file's header alone is unauthenticated); the operator compares it with the fingerprint
  `proposals show` prints for their set-recovery-key change before anyone approves it.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Final

from domain_core import recovery
from domain_core.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidInputError,
    StaleProposalError,
)
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_edge.cli import Command, Group, UsageError
from domain_edge.files import write_new_file
from domain_edge.pkcs11_signer import generate_pkcs11_recovery_key, new_cka_id
from domain_edge.recovery_sessions import read_recovery_session
from domain_edge.recovery_tokens import create_recovery_token
from domain_edge.tokens import MODULE_ENV, format_pkcs11_uri
from domain_proto import domain_pb2
from operator_tool._context import CommandContext, new_token_file
from operator_tool._contribute import add_contribution_options
from operator_tool._recovery_key import (
    add_recovery_key_options,
    opened_recovery_key,
    recovery_key_fields,
    recovery_passphrase_file,
)
from operator_tool._signing import DEFAULT_EXPIRES_IN, add_yes_option, operator_token
from operator_tool._where import (
    Connection,
    add_domain_options,
    connect,
    read_state_file,
)
from operator_tool.approval_commands import add_wait_options, approve
from operator_tool.proposal_commands import propose

__all__ = ["COMMANDS"]


def _key_text(fields: dict[str, object]) -> list[str]:
    return [
        f"algorithm:    {fields['algorithm']}",
        f"fingerprint:  {fields['fingerprint']}",
    ]


def _init(ctx: CommandContext) -> int:
    args = ctx.args
    if args.pkcs11:
        return _init_pkcs11(ctx)
    out = new_token_file(args, "a recovery token file")
    passphrase = ctx.new_passphrase(
        recovery_passphrase_file(ctx) or "",
        option="--recovery-passphrase-file",
        kind="recovery token",
    )
    public_key = create_recovery_token(out, passphrase, name=args.name)
    del passphrase
    fields = recovery_key_fields(RecoveryAlgorithm.X25519, public_key)
    document = {"kind": "file", "recovery_token": str(out), "name": args.name, **fields}
    text = [
        f"created recovery token {args.name!r} at {out} (keep it offline, apart from your "
        "signing token)",
        *_key_text(fields),
        f"enroll it with:  hsm-operator propose set-recovery-key --recovery-token "
        f"{shlex.quote(str(out))}",
    ]
    ctx.emit(document, "\n".join(text))
    return 0


def _init_pkcs11(ctx: CommandContext) -> int:
    args = ctx.args
    if args.out is not None or args.name is not None:
        raise UsageError("--out and --name are for recovery token files; a PKCS#11 key stays put")
    if not args.token_label or not args.key_label:
        raise UsageError("--pkcs11 needs --token-label LABEL and --key-label LABEL")
    module = args.module or ctx.environ.get(MODULE_ENV)
    if not module:
        raise UsageError(f"--pkcs11 needs --module PATH (or {MODULE_ENV})")
    module = os.path.abspath(module)
    cka_id = new_cka_id()
    public_key = generate_pkcs11_recovery_key(
        module, args.token_label, ctx.pin_callback(args.token_label), args.key_label, cka_id=cka_id
    )
    uri = format_pkcs11_uri(
        args.token_label, key_label=args.key_label, cka_id=cka_id, module_path=module
    )
    fields = recovery_key_fields(RecoveryAlgorithm.P256, public_key)
    document = {
        "kind": "pkcs11",
        "recovery_token": uri,
        "token_label": args.token_label,
        "key_label": args.key_label,
        "cka_id": cka_id.hex(),
        **fields,
    }
    text = [
        f"generated a P-256 recovery key {args.key_label!r} on token {args.token_label!r} "
        "(sensitive, not extractable, derive only)",
        *_key_text(fields),
        f"enroll it with:  hsm-operator propose set-recovery-key --recovery-token "
        f"{shlex.quote(uri)}",
    ]
    ctx.emit(document, "\n".join(text))
    return 0


def _show(ctx: CommandContext) -> int:
    with opened_recovery_key(ctx) as key:
        fields = recovery_key_fields(key.algorithm, key.public_key)
    ctx.emit(fields, "\n".join(_key_text(fields)))
    return 0


# --- recovery contribute / share ---------------------------------------------------------------


def _pending_recovery(conn: Connection, session: domain_pb2.RecoverySession) -> bytes | None:
    """The id of a pending recover proposal for this session at the verified head, if any."""
    head = conn.verified().head
    for view in conn.client.list_proposals():
        proposal = view.proposal
        recover = recovery.recover_change(proposal)
        if (
            view.state == "pending"
            and recover == session.recover
            and proposal.base_version == head.version
            and proposal.base_state_hash == head.hash
        ):
            return view.proposal_id
    return None


def _contribute(ctx: CommandContext) -> int:
    session = read_recovery_session(ctx.args.session)
    with connect(ctx) as conn:
        head = conn.verified().head
        if session.domain_id != head.manifest.domain_id:
            raise InvalidInputError(
                f"{ctx.args.session} is a session of domain {session.domain_id!r}, not of "
                f"{head.manifest.domain_id!r}"
            )
        if (session.base_version, session.base_state_hash) != (head.version, head.hash):
            raise StaleProposalError(
                f"{ctx.args.session} was opened for version {session.base_version} "
                f"({session.base_state_hash.hex()[:16]}); the domain you verified is at version "
                f"{head.version} ({head.hash.hex()[:16]}): use the session `hsm-domain recover` "
                "opened for this state"
            )
        found = _pending_recovery(conn, session)
    if found is not None:
        ctx.show(f"approving the pending recover proposal {found.hex()} of this session")
        ctx.args.id = found.hex()
        return approve(ctx)
    ctx.show("no recover proposal of this session is pending: proposing it")
    return propose(
        ctx, lambda _c, _conn, _head, _signer: [domain_pb2.Change(recover=session.recover)]
    )


def _share(ctx: CommandContext) -> int:
    args = ctx.args
    if args.format != "slip39":
        raise UsageError("--format slip39 is the one paper format")
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise AlreadyExistsError(f"a file exists already at {out}; choose another path")
    if args.of_state:
        state = read_state_file(args.of_state)
        where = f"the state in {args.of_state} (not verified here: check its hash)"
    else:
        with connect(ctx) as conn:
            state = conn.verified().head
        where = "the head you verified"
    if not state.secrets.HasField("recovery"):
        raise FailedPreconditionError(
            f"version {state.version} carries no recovery package (its recovery threshold is 0)"
        )
    with operator_token(ctx) as signer:
        operator_id = signer.public_key.key_id
    with opened_recovery_key(ctx) as key:
        words = recovery.open_operator_share(
            state.manifest, state.secrets.recovery, operator_id, key.agree
        )
    write_new_file(out, (words + "\n").encode("ascii"), 0o600)
    del words
    document = {
        "out": str(out),
        "format": "slip39",
        "domain_id": state.manifest.domain_id,
        "version": state.version,
        "state_hash": state.hash.hex(),
    }
    ctx.emit(
        document,
        f"wrote your recovery share of version {state.version} "
        f"({state.hash.hex()[:16]}, {where}) as SLIP-39 words to {out} (0600)\n"
        "it rebuilds that state's keys with the shares of other operators, for a backup of that "
        "state: write it on paper, keep it apart from your tokens, and delete the file",
    )
    return 0


def _contribute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--session",
        required=True,
        metavar="FILE",
        help="the recovery session file `hsm-domain recover` wrote (DIR/recovery-session.bin)",
    )
    parser.add_argument("--reason", metavar="TEXT", default="disaster recovery", help="why")
    parser.add_argument(
        "--expires-in",
        metavar="DURATION",
        default=DEFAULT_EXPIRES_IN,
        help=f"lifetime of the proposal if you are the first (default {DEFAULT_EXPIRES_IN})",
    )
    add_yes_option(parser, "sign and contribute")
    add_contribution_options(parser)
    add_wait_options(parser)
    add_domain_options(parser)


def _share_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", required=True, choices=["slip39"], help="slip39: the share as SLIP-39 words"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="file to create (0600)")
    parser.add_argument(
        "--of-state",
        metavar="FILE",
        help="the state whose share to write, as `domain export-state` wrote it (default: the "
        "head you verify)",
    )
    add_recovery_key_options(parser)
    add_domain_options(parser)


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pkcs11", action="store_true", help="generate the key on a PKCS#11 token")
    parser.add_argument("--out", type=Path, metavar="FILE", help="recovery token file to create")
    parser.add_argument("--name", metavar="NAME", help="your operator name (recovery token file)")
    parser.add_argument("--module", metavar="PATH", help=f"PKCS#11 module (default: ${MODULE_ENV})")
    parser.add_argument("--token-label", metavar="LABEL", help="label of the PKCS#11 token")
    parser.add_argument("--key-label", metavar="LABEL", help="label to give the new key")
    parser.add_argument(
        "--recovery-passphrase-file",
        metavar="FILE",
        help="read the new recovery token's passphrase from FILE (otherwise asked twice)",
    )


COMMANDS: Final = (
    Group(
        "recovery",
        help="your recovery key, for rebuilding a lost domain with other operators",
        description="Create and inspect your recovery key: each state of the domain splits "
        "its keys among the operators' recovery keys, so that a quorum of them can rebuild a "
        "domain whose HSAs were all lost (docs/disaster-recovery.md).",
        example="hsm-operator recovery init --out alice.recovery --name alice",
        commands=(
            Command(
                "init",
                help="create a recovery token file (X25519), or a P-256 recovery key on a "
                "PKCS#11 token",
                description="Create your recovery key: an X25519 key in its own "
                "passphrase-encrypted file (keep it offline, apart from your signing token), or "
                "with --pkcs11 a P-256 key generated on the token, allowed only to derive. "
                "Enroll it with `propose set-recovery-key`.",
                run=_init,
                example="""
                    hsm-operator recovery init --out alice.recovery --name alice
                    hsm-operator recovery init --pkcs11 --module /usr/lib/softhsm/libsofthsm2.so \\
                        --token-label alice --key-label recovery --pin-file pin.txt
                    """,
                arguments=_init_arguments,
            ),
            Command(
                "show",
                help="show your recovery key's algorithm and fingerprint",
                description="Open your recovery key (asking for its passphrase or PIN) and show "
                "its algorithm and fingerprint, to compare with what `proposals show` prints for "
                "your set-recovery-key proposal.",
                run=_show,
                example="hsm-operator recovery show --recovery-token alice.recovery",
                arguments=add_recovery_key_options,
            ),
            Command(
                "contribute",
                help="give your share to a recovery session: propose its recover change, or "
                "approve the pending one",
                description="Check the session `hsm-domain recover` opened against the head you "
                "verify, show the recover proposal (the new hosts' key fingerprints and the "
                "session key's, to compare with what `hsm-domain recover` printed), open your "
                "share of the head's recovery package with your recovery key (or read your "
                "paper share), seal it to the session key and sign: the first operator proposes, "
                "the others approve. Offline: `proposals export` the recover proposal and "
                "`sign-offline --recovery-token` it.",
                run=_contribute,
                example="hsm-operator recovery contribute --session "
                "hsm-cluster/recovery-session.bin --cluster hsm-cluster --token alice.token "
                "--recovery-token alice.recovery",
                arguments=_contribute_arguments,
            ),
            Command(
                "share",
                help="write your share of a state's recovery package as SLIP-39 words (paper)",
                description="Open your share of the recovery package of the verified head (or "
                "of --state FILE) with your recovery key and write it as SLIP-39 words to a new "
                "0600 file, to keep on paper with the backup of that state; give it back with "
                "--share-file.",
                run=_share,
                example="hsm-operator recovery share --format slip39 --out alice-v7.words "
                "--cluster hsm-cluster --token alice.token --recovery-token alice.recovery",
                arguments=_share_arguments,
            ),
        ),
    ),
)
