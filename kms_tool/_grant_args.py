"""The arguments of the `hsm-kms` grant commands (create-grant, list-grants, retire-grant,
revoke-grant); `kms_tool.cli` puts them in its table of commands. What they do is in
`kms_tool._grant_commands`; the `--grant-token FILE` option every command takes is one of the
shared options (`kms_tool._args.shared_options`).
"""

from __future__ import annotations

import argparse
from typing import Final

from domain_core.access import GRANT_OPERATIONS
from domain_edge.kms_client import OPERATION_NAMES
from kms_tool._args import add_context, positive

__all__ = [
    "GRANT_OPERATION_NAMES",
    "create_grant_arguments",
    "list_grants_arguments",
    "retire_grant_arguments",
    "revoke_grant_arguments",
]

# The operations a grant may give, by their policy names (AWS KMS's grant operations).
GRANT_OPERATION_NAMES: Final = tuple(
    name for name, number in OPERATION_NAMES.items() if number in GRANT_OPERATIONS
)


def _grant_id(
    parser: argparse.ArgumentParser, required: bool = True, what: str = "the grant's id"
) -> None:
    parser.add_argument("--grant-id", required=required, metavar="ID", help=what)


def create_grant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-id", required=True, help="the key to grant the use of")
    parser.add_argument(
        "--grantee",
        required=True,
        metavar="PRINCIPAL",
        help="who gets the operations (a client of the domain: spiffe://DOMAIN/client/NAME)",
    )
    parser.add_argument(
        "--operations",
        required=True,
        nargs="+",
        action="extend",
        choices=GRANT_OPERATION_NAMES,
        metavar="OP",
        help=f"what the grantee may do: {', '.join(GRANT_OPERATION_NAMES)}",
    )
    parser.add_argument(
        "--retiring-principal",
        default="",
        metavar="PRINCIPAL",
        help="who else may retire the grant (the grantee always may)",
    )
    add_context(
        parser,
        "--constraint-equals",
        "only calls whose encryption context is exactly these",
    )
    add_context(
        parser,
        "--constraint-subset",
        "only calls whose encryption context holds these (and maybe more)",
    )
    parser.add_argument(
        "--name", default="", help="a label for the grant (up to 256 printable characters)"
    )
    parser.add_argument(
        "--out-token",
        metavar="FILE",
        help="new file (0600, never overwritten) for the grant token, for the grantee's "
        "--grant-token; without it (or --json) the token is not kept",
    )


def list_grants_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key_id", metavar="KEY_ID", help="the key's id")
    _grant_id(parser, required=False, what="only this grant")
    parser.add_argument("--grantee", metavar="PRINCIPAL", default="", help="only this grantee's")
    parser.add_argument(
        "--page-size", type=positive, default=50, metavar="N", help="grants per call (default 50)"
    )


def retire_grant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-id", help="the grant's key (with --grant-id; with --grant-token, checked)"
    )
    _grant_id(parser, required=False)


def revoke_grant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-id", required=True, help="the grant's key")
    _grant_id(parser)
