"""What every `hsm-operator` command gets: its arguments, the operator's secrets and token,
and the way its results are printed (`CommandContext`).

Secrets (file token passphrase, PKCS#11 PIN) come from a file named on the command line or in
the environment, or from a prompt on a terminal; never from an argument, and a passphrase file
is never used as a PIN (a wrong PIN counts towards locking a smart card). Nothing printed here
holds a key, passphrase or PIN.

Output: text for a person goes out through `CommandContext.emit` or `CommandContext.show`,
which escape every character a terminal would act on except the program's own line breaks
(`domain_core.display.escape_lines`), on top of the renderers' own escaping of each line;
`--json` documents escape them as JSON does (`\u001b`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from domain_core.display import escape_lines
from domain_core.errors import AlreadyExistsError, TokenError
from domain_core.limits import MAX_SECRET_INPUT_FILE_BYTES
from domain_core.signers import Signer
from domain_edge.cli import UsageError, print_json
from domain_edge.files import read_limited
from domain_edge.tokens import FileTokenRef, TokenRef, open_token, parse_token_uri

__all__ = [
    "PASSPHRASE_FILE_ENV",
    "PIN_FILE_ENV",
    "TOKEN_ENV",
    "CommandContext",
    "Handler",
    "new_token_file",
    "read_secret_file",
    "shared_options",
]

TOKEN_ENV: Final = "HSM_TOKEN"  # noqa: S105 (names a variable, holds no secret)
PASSPHRASE_FILE_ENV: Final = "HSM_TOKEN_PASSPHRASE_FILE"  # noqa: S105 (a variable name)
PIN_FILE_ENV: Final = "HSM_TOKEN_PIN_FILE"


class Handler(Protocol):
    """What runs one command: it gets the context, returns the exit status."""

    def __call__(self, ctx: CommandContext) -> int: ...


# --- options ---------------------------------------------------------------------------------


def shared_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before or after the command (`hsm-operator --json token show` or
    `hsm-operator token show --json`). Defaults are applied once, after parsing."""
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--json", action="store_true", default=default or False, help="print JSON for scripts"
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default or False,
        help="show the traceback of a failure",
    )
    group.add_argument(
        "--token",
        metavar="REF",
        default=default,
        help=f"your token: a file path, file:PATH or pkcs11: URI (default: ${TOKEN_ENV})",
    )
    group.add_argument(
        "--passphrase-file",
        metavar="FILE",
        default=default,
        help=f"read a file token's passphrase from FILE (default: ${PASSPHRASE_FILE_ENV}; "
        "otherwise asked on the terminal)",
    )
    group.add_argument(
        "--pin-file",
        metavar="FILE",
        default=default,
        help=f"read a PKCS#11 token's PIN from FILE (default: ${PIN_FILE_ENV}; otherwise asked "
        "on the terminal)",
    )


# --- secrets ---------------------------------------------------------------------------------


def read_secret_file(path: str | Path, what: str) -> bytes:
    """A secret from a file: its bytes, without one trailing newline; TokenError if empty."""
    path = Path(path)
    data = read_limited(
        path,
        MAX_SECRET_INPUT_FILE_BYTES,
        lambda: TokenError(
            f"{what} file {path} is larger than {MAX_SECRET_INPUT_FILE_BYTES} bytes"
        ),
    )
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise TokenError(f"{what} file {path} is empty")
    return data


def _prompt(prompt: str, missing: str, stdin: TextIO) -> bytes:
    if not stdin.isatty():
        raise TokenError(missing)
    value = getpass.getpass(prompt)
    if not value:
        raise TokenError(f"nothing was entered at {prompt.strip()!r}; nothing was done")
    return value.encode("utf-8")


def new_token_file(args: argparse.Namespace, what: str) -> Path:
    """The `--out` of a new token file (`what`: "a file token", "a recovery token file"):
    UsageError for a PKCS#11 option or a missing --out/--name, AlreadyExistsError when
    anything is at that path (tokens are never overwritten)."""
    for option, value in (
        ("--module", args.module),
        ("--token-label", args.token_label),
        ("--key-label", args.key_label),
    ):
        if value is not None:
            raise UsageError(f"{option} is for PKCS#11 tokens: add --pkcs11")
    if args.out is None or args.name is None:
        raise UsageError(f"{what} needs --out FILE and --name NAME (or use --pkcs11)")
    out: Path = args.out
    if out.exists() or out.is_symlink():
        raise AlreadyExistsError(
            f"a file exists already at {out}; choose another path (tokens are never overwritten)"
        )
    return out


# --- what a command gets -------------------------------------------------------------------


@dataclass
class CommandContext:
    """Parsed arguments plus the shared plumbing every command uses."""

    args: argparse.Namespace
    json: bool
    verbose: bool
    token: str | None
    passphrase_file: str | None
    pin_file: str | None
    environ: Mapping[str, str]
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        environ: Mapping[str, str],
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> CommandContext:
        def option(name: str, env: str) -> str | None:
            value = getattr(args, name, None)
            return value if value else (environ.get(env) or None)

        return cls(
            args=args,
            json=bool(getattr(args, "json", False)),
            verbose=bool(getattr(args, "verbose", False)),
            token=option("token", TOKEN_ENV),
            passphrase_file=option("passphrase_file", PASSPHRASE_FILE_ENV),
            pin_file=option("pin_file", PIN_FILE_ENV),
            environ=environ,
            stdin=stdin or sys.stdin,
            stdout=stdout or sys.stdout,
            stderr=stderr or sys.stderr,
        )

    # secrets

    def passphrase_callback(self, prompt: str = "Token passphrase: ") -> Callable[[], bytes]:
        """Returns a file token's passphrase: --passphrase-file, else a terminal prompt."""

        def secret() -> bytes:
            if self.passphrase_file:
                return read_secret_file(self.passphrase_file, "passphrase")
            return _prompt(
                prompt, "no passphrase: use --passphrase-file or run in a terminal", self.stdin
            )

        return secret

    def prompt_secret(self, prompt: str, missing: str) -> bytes:
        """A secret typed on the terminal, not echoed (TokenError saying `missing` without a
        terminal)."""
        return _prompt(prompt, missing, self.stdin)

    def new_passphrase(
        self,
        passphrase_file: str | None = None,
        *,
        option: str = "--passphrase-file",
        kind: str = "token",
    ) -> bytes:
        """A passphrase for a new file token: from `passphrase_file` (default
        --passphrase-file), else asked twice on the terminal; `option` and `kind` name them
        in the prompts and errors."""
        path = passphrase_file if passphrase_file is not None else self.passphrase_file
        if path:
            return read_secret_file(path, "passphrase")
        missing = f"no passphrase: use {option} or run in a terminal"
        first = _prompt(f"Passphrase for the new {kind}: ", missing, self.stdin)
        second = _prompt("Repeat the passphrase: ", missing, self.stdin)
        if first != second:
            raise TokenError("the two passphrases differ; nothing was created")
        return first

    def pin_callback(self, token_label: str) -> Callable[[], bytes]:
        """Returns a PKCS#11 token's PIN: --pin-file, else a terminal prompt."""

        def secret() -> bytes:
            if self.pin_file:
                return read_secret_file(self.pin_file, "PIN")
            return _prompt(
                f"PIN for token {token_label}: ",
                "no PIN: use --pin-file or run in a terminal",
                self.stdin,
            )

        return secret

    # tokens

    def token_ref(self) -> TokenRef:
        """The token named by --token or $HSM_TOKEN, parsed (UsageError if none)."""
        if not self.token:
            raise UsageError(f"no token: use --token REF or set {TOKEN_ENV}")
        return parse_token_uri(self.token, environ=self.environ)

    @contextmanager
    def opened_token(self, ref: TokenRef | None = None) -> Iterator[Signer]:
        """Open the operator's token (asking for its secret) and close it afterwards."""
        ref = self.token_ref() if ref is None else ref
        if isinstance(ref, FileTokenRef):
            secret = self.passphrase_callback(f"Passphrase for token {ref.path}: ")
        else:
            secret = self.pin_callback(ref.token_label)
        signer = open_token(ref, secret, environ=self.environ)
        try:
            yield signer
        finally:
            close = getattr(signer, "close", None)
            if callable(close):
                close()

    # output

    def emit(self, document: Mapping[str, Any], text: str) -> None:
        """Print `document` as JSON under --json, else `text` (escaped, see the module)."""
        if self.json:
            print_json(document, sort_keys=True, stream=self.stdout)
            return
        self.stdout.write(escape_lines(text.rstrip("\n")) + "\n")
        self.stdout.flush()

    def show(self, text: str) -> None:
        """Text for a person before a question (a review): on stdout, or on stderr when
        stdout carries --json; escaped like `emit`."""
        stream = self.stderr if self.json else self.stdout
        stream.write(escape_lines(text.rstrip("\n")) + "\n")
        stream.flush()
