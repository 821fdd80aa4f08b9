"""An operator's recovery key as the commands use it: the options that name it, opening it
(asking for its own passphrase, or the token's PIN), and how it is shown.

The recovery key is not the signing token: a file recovery token has its own passphrase
(`--recovery-passphrase-file`, never the signing token's `--passphrase-file`, so one file
cannot unlock both by accident), and a PKCS#11 recovery key is a P-256 key allowed only to
derive. Its fingerprint is the SHA-256 of the public key bytes the domain records, grouped as
`proposals show` and `domain status` print it.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from domain_core.errors import TokenNotFoundError
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_edge.cli import UsageError
from domain_edge.recovery_tokens import RecoveryKeyHolder, open_recovery_key
from domain_edge.tokens import FileTokenRef, TokenRef, parse_token_uri
from operator_tool._context import CommandContext, read_secret_file
from operator_tool._render import fingerprint

__all__ = [
    "RECOVERY_PASSPHRASE_FILE_ENV",
    "RECOVERY_TOKEN_ENV",
    "add_recovery_key_options",
    "opened_recovery_key",
    "recovery_key_fields",
    "recovery_passphrase",
    "recovery_passphrase_file",
    "recovery_token_ref",
]

RECOVERY_TOKEN_ENV: Final = "HSM_RECOVERY_TOKEN"  # noqa: S105 (a variable name)
RECOVERY_PASSPHRASE_FILE_ENV: Final = "HSM_RECOVERY_PASSPHRASE_FILE"  # noqa: S105 (a name)


def add_recovery_key_options(parser: argparse.ArgumentParser) -> None:
    """`--recovery-token REF` and `--recovery-passphrase-file FILE`."""
    parser.add_argument(
        "--recovery-token",
        metavar="REF",
        help=f"your recovery key: a recovery token file or a pkcs11: URI (default: "
        f"${RECOVERY_TOKEN_ENV})",
    )
    parser.add_argument(
        "--recovery-passphrase-file",
        metavar="FILE",
        help=f"read the recovery token's passphrase from FILE (default: "
        f"${RECOVERY_PASSPHRASE_FILE_ENV}; otherwise asked on the terminal)",
    )


def recovery_token_ref(ctx: CommandContext) -> TokenRef:
    """The recovery key named by --recovery-token or $HSM_RECOVERY_TOKEN (UsageError if none)."""
    text = getattr(ctx.args, "recovery_token", None) or ctx.environ.get(RECOVERY_TOKEN_ENV)
    if not text:
        raise UsageError(f"no recovery key: use --recovery-token REF or set {RECOVERY_TOKEN_ENV}")
    return parse_token_uri(text, environ=ctx.environ)


def recovery_passphrase_file(ctx: CommandContext) -> str | None:
    """The file named by --recovery-passphrase-file or $HSM_RECOVERY_PASSPHRASE_FILE, if any."""
    path: str | None = getattr(ctx.args, "recovery_passphrase_file", None) or ctx.environ.get(
        RECOVERY_PASSPHRASE_FILE_ENV
    )
    return path or None


def recovery_passphrase(ctx: CommandContext, prompt: str) -> Callable[[], bytes]:
    """A recovery token's passphrase: --recovery-passphrase-file, else a terminal prompt."""
    path = recovery_passphrase_file(ctx)

    def secret() -> bytes:
        if path:
            return read_secret_file(path, "recovery passphrase")
        return ctx.prompt_secret(
            prompt, "no recovery passphrase: use --recovery-passphrase-file or run in a terminal"
        )

    return secret


@contextmanager
def opened_recovery_key(ctx: CommandContext) -> Iterator[RecoveryKeyHolder]:
    """Open the operator's recovery key (asking for its secret) and close it afterwards."""
    ref = recovery_token_ref(ctx)
    if isinstance(ref, FileTokenRef):
        secret = recovery_passphrase(ctx, f"Passphrase for recovery token {ref.path}: ")
    else:
        secret = ctx.pin_callback(ref.token_label)
    try:
        key = open_recovery_key(ref, secret, environ=ctx.environ)
    except TokenNotFoundError as error:
        raise TokenNotFoundError(f"recovery key not found: {error.message}") from None
    try:
        yield key
    finally:
        key.close()


def recovery_key_fields(algorithm: RecoveryAlgorithm, public_key: bytes) -> dict[str, Any]:
    """The algorithm, the fingerprint (as the domain shows it) and the public key in hex."""
    digest = hashlib.sha256(public_key).hexdigest()
    return {
        "algorithm": algorithm.value,
        "fingerprint": fingerprint(digest),
        "public_key": public_key.hex(),
    }
