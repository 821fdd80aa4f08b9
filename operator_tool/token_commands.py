"""`hsm-operator token ...`: create an operator token, show it, export its public key.

Invariants kept here:
- a key made for a PKCS#11 token is generated ON the token (sensitive, not extractable) and
  named afterwards by its random CKA_ID, since labels are not unique;
- a file token is never overwritten, and its new passphrase is asked twice on a terminal;
- `show` and `export-public` open the token with its secret, so what they print is the key the
  token holds (a file token's header alone is unauthenticated), and `export-public` signs once
  and verifies before it writes anything others will trust;
- the exported document's operator id is the SHA-256 of the public key's SubjectPublicKeyInfo
  DER, the id the domain gives the operator; `domain_edge.tokens.read_operator_public` checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any, Final

from domain_core.display import hex_groups
from domain_core.errors import AlreadyExistsError
from domain_core.signers import (
    PublicKey,
    SignatureAlgorithm,
    Signer,
)
from domain_edge.cli import Command, Group, UsageError
from domain_edge.file_tokens import (
    FileTokenSigner,
    create_file_token,
)
from domain_edge.pkcs11_signer import Pkcs11Signer, generate_pkcs11_key, new_cka_id
from domain_edge.tokens import (
    MODULE_ENV,
    FileTokenRef,
    format_pkcs11_uri,
    operator_public_document,
    read_operator_public,
    write_operator_public,
)
from operator_tool._context import CommandContext, new_token_file

__all__ = ["COMMANDS", "fingerprint", "read_operator_public"]

_ALGORITHMS: Final = [a.value for a in SignatureAlgorithm]
_SELF_TEST_MESSAGE: Final = b"hsm-operator export-public self-test"


def fingerprint(public_key: PublicKey) -> str:
    """The key id in groups of four hex digits, for reading aloud and comparing by eye."""
    return hex_groups(public_key.key_id)


def _key_fields(public_key: PublicKey) -> dict[str, Any]:
    return {
        "operator_id": public_key.key_id,
        "fingerprint": fingerprint(public_key),
        "algorithm": public_key.algorithm.value,
        "public_key": public_key.to_pem().decode("ascii"),
    }


def _key_text(public_key: PublicKey) -> list[str]:
    return [
        f"operator id:  {public_key.key_id}",
        f"fingerprint:  {fingerprint(public_key)}",
        f"algorithm:    {public_key.algorithm.value}",
    ]


# --- token init ------------------------------------------------------------------------------


def _init(ctx: CommandContext) -> int:
    args = ctx.args
    if args.pkcs11:
        return _init_pkcs11(ctx)
    out = new_token_file(args, "a file token")
    algorithm = SignatureAlgorithm(args.algorithm or SignatureAlgorithm.ED25519)
    passphrase = ctx.new_passphrase()
    public_key = create_file_token(out, algorithm, passphrase, name=args.name)
    del passphrase
    document = {"kind": "file", "token": str(out), "name": args.name, **_key_fields(public_key)}
    text = [
        f"created file token {args.name!r} at {out}",
        *_key_text(public_key),
        f"use it with:  --token {shlex.quote(str(out))}",
    ]
    ctx.emit(document, "\n".join(text))
    return 0


def _init_pkcs11(ctx: CommandContext) -> int:
    args = ctx.args
    if args.out is not None:
        raise UsageError("--out is for file tokens; a PKCS#11 key stays on its token")
    if not args.token_label or not args.key_label:
        raise UsageError("--pkcs11 needs --token-label LABEL and --key-label LABEL")
    module = args.module or ctx.environ.get(MODULE_ENV)
    if not module:
        raise UsageError(f"--pkcs11 needs --module PATH (or {MODULE_ENV})")
    module = os.path.abspath(module)
    cka_id = new_cka_id()
    public_key = generate_pkcs11_key(
        module,
        args.token_label,
        ctx.pin_callback(args.token_label),
        args.key_label,
        args.algorithm,
        cka_id=cka_id,
    )
    uri = format_pkcs11_uri(
        args.token_label, key_label=args.key_label, cka_id=cka_id, module_path=module
    )
    document = {
        "kind": "pkcs11",
        "token": uri,
        "token_label": args.token_label,
        "key_label": args.key_label,
        "cka_id": cka_id.hex(),
        **_key_fields(public_key),
    }
    text = [
        f"generated {public_key.algorithm.value} key {args.key_label!r} on token "
        f"{args.token_label!r} (sensitive, not extractable)",
        *_key_text(public_key),
        f"use it with:  --token {shlex.quote(uri)}",
    ]
    ctx.emit(document, "\n".join(text))
    return 0


# --- token show ------------------------------------------------------------------------------


def _describe(signer: Signer, ref_text: str) -> tuple[dict[str, Any], list[str]]:
    document: dict[str, Any] = {"token": ref_text, **_key_fields(signer.public_key)}
    lines = [f"token:        {ref_text}"]
    if isinstance(signer, FileTokenSigner):
        document.update(kind="file", name=signer.name)
        lines.append(f"name:         {signer.name}")
    elif isinstance(signer, Pkcs11Signer):
        document.update(
            kind="pkcs11",
            name=None,
            token_label=signer.token_label,
            key_label=signer.key_label,
            cka_id=signer.cka_id.hex(),
            never_leaves_token=signer.never_leaves_token,
        )
        protection = (
            "sensitive, not extractable"
            if signer.never_leaves_token
            else "WARNING: extractable or not sensitive"
        )
        lines.append(f"private key:  on token {signer.token_label!r} ({protection})")
    else:
        document.update(kind="other", name=None)
    lines += _key_text(signer.public_key)
    lines.append(signer.public_key.to_pem().decode("ascii").rstrip("\n"))
    return document, lines


def _show(ctx: CommandContext) -> int:
    ref = ctx.token_ref()
    with ctx.opened_token(ref) as signer:
        document, lines = _describe(signer, ref.uri)
    ctx.emit(document, "\n".join(lines))
    return 0


# --- token export-public ---------------------------------------------------------------------


def _export_public(ctx: CommandContext) -> int:
    args = ctx.args
    ref = ctx.token_ref()
    out: str = args.out
    if out != "-" and os.path.lexists(out):
        raise AlreadyExistsError(f"a file exists already at {out}; choose another path")
    if args.name is None and not isinstance(ref, FileTokenRef):
        raise UsageError("--name NAME is needed for a PKCS#11 token (a file token has its own)")
    with ctx.opened_token(ref) as signer:
        name: str = args.name or (signer.name if isinstance(signer, FileTokenSigner) else "")
        # Prove that the token's private key is the exported public key's pair.
        signer.public_key.verify(signer.sign(_SELF_TEST_MESSAGE), _SELF_TEST_MESSAGE)
        public_key = signer.public_key
    document = operator_public_document(name, public_key)
    if out == "-":
        ctx.stdout.write(json.dumps(document, indent=2) + "\n")
        ctx.stdout.flush()
        return 0
    write_operator_public(Path(out), name, public_key)
    ctx.emit(
        {"out": out, "name": name, "operator_id": public_key.key_id},
        f"wrote the public key of operator {name!r} to {out}\n"
        + "\n".join(_key_text(public_key))
        + "\nsend this file to the other operators; they check the fingerprint with you",
    )
    return 0


# --- the table -------------------------------------------------------------------------------


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pkcs11", action="store_true", help="generate the key on a PKCS#11 token")
    parser.add_argument("--out", type=Path, metavar="FILE", help="file token to create")
    parser.add_argument("--name", metavar="NAME", help="your operator name (file token)")
    parser.add_argument(
        "--algorithm",
        choices=_ALGORITHMS,
        help="signature algorithm (file token default: ed25519)",
    )
    parser.add_argument("--module", metavar="PATH", help=f"PKCS#11 module (default: ${MODULE_ENV})")
    parser.add_argument("--token-label", metavar="LABEL", help="label of the PKCS#11 token")
    parser.add_argument("--key-label", metavar="LABEL", help="label to give the new key")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", metavar="NAME", help="operator name (default: a file token's own name)"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="file to create ('-': standard output)"
    )


COMMANDS: Final = (
    Group(
        "token",
        help="create and inspect your operator token",
        description="Create an operator token (a key file or a key on a PKCS#11 device), "
        "show it, and export its public key for the other operators.",
        example="hsm-operator token init --out alice.token --name alice",
        commands=(
            Command(
                "init",
                help="create a file token, or generate a key on a PKCS#11 token",
                description="Create a passphrase-encrypted file token (never overwrites a "
                "file), or with --pkcs11 generate a key pair on a PKCS#11 token (sensitive, "
                "not extractable) and print the pkcs11: URI to use as --token.",
                run=_init,
                example="""
                    hsm-operator token init --out alice.token --name alice
                    hsm-operator token init --pkcs11 --module /usr/lib/softhsm/libsofthsm2.so \\
                        --token-label alice --key-label operator --pin-file pin.txt
                    """,
                notes="""
                    File tokens: the passphrase is read from --passphrase-file, or asked twice.
                    PKCS#11: the PIN is read from --pin-file, or asked; --algorithm defaults to
                    ed25519 if the token offers CKM_EDDSA, else ecdsa-p256.
                    """,
                arguments=_init_arguments,
            ),
            Command(
                "show",
                help="show your token's operator id, fingerprint and public key",
                description="Open the token (asking for its passphrase or PIN) and show the "
                "operator id (SHA-256 of the public key), fingerprint, algorithm and public key.",
                run=_show,
                example="""
                    hsm-operator token show --token alice.token --json
                    hsm-operator token show --token 'pkcs11:token=alice;object=operator?module-path=/usr/lib/softhsm/libsofthsm2.so'
                    """,  # noqa: E501
            ),
            Command(
                "export-public",
                help="write the public key document other operators need to add you",
                description="Open the token, prove it signs, and write a JSON document (name, "
                "algorithm, PEM public key, operator id) for `propose add-operator "
                "--public-key`.",
                run=_export_public,
                example="hsm-operator token export-public --token alice.token --out alice.pub.json",
                arguments=_export_arguments,
            ),
        ),
    ),
)
