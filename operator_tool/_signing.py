"""What every signing command shares: asking before signing, opening the token, durations.

Invariants: nothing is signed without a "yes" typed on a terminal or `--yes` on the command
line (without a terminal and without `--yes` the command is a usage error, so a script never
signs by accident); the token is opened only after that "yes" where the command allows it,
and closed on every path; a token's secret is never echoed (see `operator_tool._context`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from domain_core.errors import InvalidInputError, TokenNotFoundError, WrongPassphraseError
from domain_core.signers import Signer
from domain_edge.cli import UsageError
from domain_edge.tokens import FileTokenRef
from operator_tool._context import CommandContext

__all__ = [
    "DEFAULT_EXPIRES_IN",
    "NotConfirmedError",
    "add_yes_option",
    "confirm",
    "operator_token",
    "parse_duration",
]

DEFAULT_EXPIRES_IN: Final = "1h"
_DURATION = re.compile(r"^\s*(\d{1,9})\s*(s|sec|m|min|h|d)?\s*$")
_UNITS: Final = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class NotConfirmedError(InvalidInputError):
    """The operator answered no; nothing was signed."""


def add_yes_option(parser: argparse.ArgumentParser, what: str) -> None:
    """Add `--yes` (do not ask before signing)."""
    parser.add_argument(
        "-y", "--yes", action="store_true", help=f"{what} without asking for confirmation"
    )


def confirm(ctx: CommandContext, question: str) -> None:
    """Return if `--yes` was given or the operator types yes; else raise (nothing signed)."""
    if getattr(ctx.args, "yes", False):
        return
    if not ctx.stdin.isatty():
        raise UsageError(
            "not confirmed: there is no terminal to ask on; review with `proposals show` and "
            "add --yes"
        )
    ctx.stderr.write(f"{question} [y/N] ")
    ctx.stderr.flush()
    answer = ctx.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise NotConfirmedError("not confirmed: nothing was signed")


@contextmanager
def operator_token(ctx: CommandContext) -> Iterator[Signer]:
    """Open the operator's token (--token or $HSM_TOKEN) with a clear cause when it fails."""
    ref = ctx.token_ref()
    try:
        with ctx.opened_token(ref) as signer:
            yield signer
    except TokenNotFoundError as error:
        raise TokenNotFoundError(f"token not found: {error.message}") from None
    except WrongPassphraseError as error:
        if isinstance(ref, FileTokenRef) and not error.message.startswith("wrong"):
            raise WrongPassphraseError(f"wrong passphrase: {error.message}") from None
        raise


def parse_duration(text: str) -> int:
    """Seconds from '3600', '90s', '30m', '2h' or '7d' (InvalidInputError otherwise)."""
    match = _DURATION.match(text)
    if match is None:
        raise InvalidInputError(
            f"{text[:40]!r} is not a duration: use seconds or a number with s, m, h or d (e.g. 2h)"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 1:
        raise InvalidInputError("a duration must be at least 1 second")
    return seconds
