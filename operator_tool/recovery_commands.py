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

from domain_core.errors import AlreadyExistsError, TokenError
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_edge.cli import Command, Group, UsageError
from domain_edge.pkcs11_signer import generate_pkcs11_recovery_key, new_cka_id
from domain_edge.recovery_tokens import create_recovery_token
from domain_edge.tokens import MODULE_ENV, format_pkcs11_uri
from operator_tool._context import CommandContext
from operator_tool._recovery_key import (
    RECOVERY_PASSPHRASE_FILE_ENV,
    add_recovery_key_options,
    opened_recovery_key,
    recovery_key_fields,
    recovery_passphrase,
)

__all__ = ["COMMANDS"]


def _new_passphrase(ctx: CommandContext) -> bytes:
    """The passphrase of a new recovery token: its file, else asked twice."""
    if getattr(ctx.args, "recovery_passphrase_file", None) or ctx.environ.get(
        RECOVERY_PASSPHRASE_FILE_ENV
    ):
        return recovery_passphrase(ctx, "")()
    missing = "no passphrase: use --recovery-passphrase-file or run in a terminal"
    first = ctx.prompt_secret("Passphrase for the new recovery token: ", missing)
    second = ctx.prompt_secret("Repeat the passphrase: ", missing)
    if first != second:
        raise TokenError("the two passphrases differ; nothing was created")
    return first


def _key_text(fields: dict[str, object]) -> list[str]:
    return [
        f"algorithm:    {fields['algorithm']}",
        f"fingerprint:  {fields['fingerprint']}",
    ]


def _init(ctx: CommandContext) -> int:
    args = ctx.args
    if args.pkcs11:
        return _init_pkcs11(ctx)
    for option, value in (
        ("--module", args.module),
        ("--token-label", args.token_label),
        ("--key-label", args.key_label),
    ):
        if value is not None:
            raise UsageError(f"{option} is for PKCS#11 tokens: add --pkcs11")
    if args.out is None or args.name is None:
        raise UsageError("a recovery token file needs --out FILE and --name NAME (or --pkcs11)")
    out: Path = args.out
    if out.exists() or out.is_symlink():
        raise AlreadyExistsError(
            f"a file exists already at {out}; choose another path (tokens are never overwritten)"
        )
    passphrase = _new_passphrase(ctx)
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
        ),
    ),
)
