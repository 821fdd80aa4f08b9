"""`hsm-operator`: an operator's tool for tokens, proposals and approvals.

The tool is the table of commands each command module exports (`COMMANDS`: tokens,
proposals, approvals, offline signing, the domain's state), run by the one skeleton of the
three tools (`domain_edge.cli`). What a command gets (its arguments, the operator's secrets
and token, how it prints) is `operator_tool._context.CommandContext`. The command modules
never import this module: it imports them, plainly, and nothing imports it back.

Exit status: 0 on success, 1 when the command was refused or failed (a one-line cause on
stderr; `-v` adds the traceback), 2 on a usage error (after the command's usage line), 130
when interrupted. Only `domain_core.errors.HsmDomainError` and `OSError` are caught, once;
anything else is a bug and shows its traceback. Secrets never come from an argument, and
nothing printed holds a key, passphrase or PIN (see `operator_tool._context`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Final

from domain_edge.cli import Command, Group, Tool, UsageError, run_tool
from operator_tool import (
    approval_commands,
    domain_commands,
    offline,
    proposal_commands,
    recovery_commands,
    token_commands,
)
from operator_tool._context import CommandContext, Handler, read_secret_file, shared_options

__all__ = ["COMMANDS", "PROG", "TOOL", "UsageError", "build_parser", "main", "read_secret_file"]

PROG: Final = "hsm-operator"

# In the order `--help` lists them; a new command group is one more module's table here.
COMMANDS: Final[tuple[Command | Group, ...]] = (
    *token_commands.COMMANDS,
    *recovery_commands.COMMANDS,
    *proposal_commands.COMMANDS,
    *approval_commands.COMMANDS,
    *offline.COMMANDS,
    *domain_commands.COMMANDS,
)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen command with its context (arguments, environment, streams)."""
    handler: Handler = args._run
    return handler(CommandContext.from_args(args, os.environ))


TOOL: Final = Tool(
    prog=PROG,
    description="Hold an operator token and approve changes of an HSM domain with it.",
    example="""
        hsm-operator token init --out alice.token --name alice
        hsm-operator --token alice.token token export-public --out alice.pub.json
        """,
    notes="""
        Exit status: 0 success, 1 refused or failed (cause on stderr), 2 usage error.
        Secrets come from --passphrase-file / --pin-file or a terminal prompt, never
        from an argument.
        """,
    commands=COMMANDS,
    shared_options=shared_options,
    run=_run,
    usage_on_error=True,
)


def build_parser() -> argparse.ArgumentParser:
    """The whole `hsm-operator` parser, every command group added."""
    return TOOL.parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `hsm-operator` command; return its exit status (0, 1, 2 or 130)."""
    return run_tool(TOOL, argv)
