"""What the `hsm-kms` grant commands do: create-grant, list-grants, retire-grant and
revoke-grant (AWS KMS's grants; docs/kms-client.md "Grants"). A call that should use a grant
before it reached every HSA carries its token: the shared option `--grant-token FILE`, read
before connecting and applied to the client by `kms_tool.cli` (`KeyClient.with_grant_tokens`).

Invariants kept here (beside those of `kms_tool._commands` and `kms_tool._io`):
- a grant token is a bearer credential: create-grant writes it only to a new 0600 file that
  never overwrites an existing one (--out-token, also checked before the call), or, asked for
  with --json, base64 into the JSON document; never raw to stdout, never to a terminal
  without --json, and never in a message;
- a grant's constraints go only with operations that take an encryption context, checked
  before any call (the service checks it again);
- retire-grant names its grant by exactly one --grant-token, or by --key-id and --grant-id,
  checked before any call;
- principals, names and constraints the service returns are escaped before they reach a
  terminal.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from domain_core.access import CONTEXT_OPERATIONS
from domain_core.display import escape
from domain_edge.cli import EXIT_FAILED, EXIT_OK, UsageError, one_line
from domain_edge.files import SECRET_MODE, write_new_file
from domain_edge.kms_client import OPERATION_NAMES, Grant, KeyClient
from kms_tool._io import (
    STDIO,
    b64,
    conditions_text,
    print_document,
    print_failure,
    print_metadata,
)

__all__ = [
    "check_create_grant",
    "check_retire_grant",
    "create_grant",
    "grant_json",
    "list_grants",
    "retire_grant",
    "revoke_grant",
]


# --- create-grant ----------------------------------------------------------------------------


def check_create_grant(args: argparse.Namespace) -> None:
    """Constraints only with operations that take a context; the token's file is new."""
    if args.constraint_equals or args.constraint_subset:
        other = [op for op in args.operations if OPERATION_NAMES[op] not in CONTEXT_OPERATIONS]
        if other:
            raise UsageError(
                "--constraint-equals and --constraint-subset go only with operations that take "
                f"an encryption context (encrypt, decrypt, re-encrypt, data keys); not with "
                f"{', '.join(other)}"
            )
    if args.out_token == STDIO:
        raise UsageError(
            "a grant token is not written to stdout: give --out-token FILE, or --json to print "
            "it base64-encoded on purpose"
        )
    if args.out_token and os.path.lexists(args.out_token):
        raise UsageError(
            f"--out-token {args.out_token} exists: a grant token never overwrites a file; give a "
            "new FILE"
        )


def _constraints(args: argparse.Namespace) -> dict[str, dict[str, str]] | None:
    constraints: dict[str, dict[str, str]] = {}
    if args.constraint_equals:
        constraints["encryption_context_equals"] = args.constraint_equals
    if args.constraint_subset:
        constraints["encryption_context_subset"] = args.constraint_subset
    return constraints or None


def create_grant(args: argparse.Namespace, client: KeyClient) -> int:
    """`create-grant`: print the grant's id (under --json: the id, and the token base64 or the
    file it went to)."""
    created = client.create_grant(
        args.key_id,
        args.grantee,
        list(dict.fromkeys(args.operations)),
        retiring_principal=args.retiring_principal,
        constraints=_constraints(args),
        name=args.name,
    )
    document: dict[str, Any] = {"grant_id": created.grant_id}
    failure = ""
    if args.out_token:
        try:
            write_new_file(Path(args.out_token), created.grant_token, SECRET_MODE)
            document["out_token"] = args.out_token
        except OSError as error:  # the grant exists: say so, with its id on stdout
            failure = (
                f"grant {created.grant_id} was created, but its token was not written "
                f"({one_line(error)}): the grant works once it reached every HSA, or revoke it"
            )
    elif args.json:
        document["grant_token"] = b64(created.grant_token)
    if args.json:
        print_document(document)
    else:
        print(created.grant_id)
    if failure:
        print_failure(failure)
        return EXIT_FAILED
    return EXIT_OK


# --- list-grants -----------------------------------------------------------------------------


def grant_json(grant: Grant) -> dict[str, Any]:
    """A grant as `list-grants --json` shows it."""
    return {
        "grant_id": grant.grant_id,
        "name": grant.name,
        "grantee_principal": grant.grantee_principal,
        "retiring_principal": grant.retiring_principal,
        "operations": list(grant.operations),
        "constraints": {kind: dict(mapping) for kind, mapping in grant.constraints.items()},
        "issuing_principal": grant.issuing_principal,
        "created_at": grant.created_at,
    }


def list_grants(args: argparse.Namespace, client: KeyClient) -> int:
    """`list-grants`: one line per grant (id, grantee, operations, constraints, name), or a
    JSON list."""
    grants = client.list_grants(
        args.key_id,
        grant_id=args.grant_id or "",
        grantee_principal=args.grantee,
        page_size=args.page_size,
    )
    if args.json:
        print_document([grant_json(grant) for grant in grants])
        return EXIT_OK
    for grant in grants:
        name = f"  {escape(grant.name)}" if grant.name else ""
        print(
            f"{grant.grant_id}  {escape(grant.grantee_principal)}  "
            f"{','.join(grant.operations)}  {conditions_text(grant.constraints)}{name}"
        )
    return EXIT_OK


# --- retire-grant, revoke-grant --------------------------------------------------------------


def check_retire_grant(args: argparse.Namespace) -> None:
    """One grant: by one --grant-token, or by --key-id and --grant-id."""
    tokens = getattr(args, "grant_token", None) or []
    if len(tokens) > 1:
        raise UsageError("retire-grant takes one --grant-token: the token of the grant to retire")
    if args.grant_id and not args.key_id:
        raise UsageError("--grant-id needs --key-id (or give the grant's --grant-token)")
    if not tokens and not args.grant_id:
        raise UsageError(
            "say which grant to retire: --grant-token FILE, or --key-id KEY and --grant-id ID"
        )


def retire_grant(args: argparse.Namespace, client: KeyClient) -> int:
    """`retire-grant`: remove a grant as its grantee or retiring principal; the key's
    metadata afterwards."""
    tokens: list[bytes] = getattr(args, "grant_tokens", None) or []
    metadata = client.retire_grant(
        args.key_id or "", args.grant_id or "", grant_token=tokens[0] if tokens else b""
    )
    print_metadata(metadata, args.json)
    return EXIT_OK


def revoke_grant(args: argparse.Namespace, client: KeyClient) -> int:
    """`revoke-grant`: remove a grant as a principal that may revoke the key's grants; the
    key's metadata afterwards."""
    print_metadata(client.revoke_grant(args.key_id, args.grant_id), args.json)
    return EXIT_OK
