"""What the command-line tools (`hsm-domain`, `hsm-kms`, `hsm-operator`) share about failing.

Every CLI exits 0 on success, 1 when a command was refused or failed, with one line
`PROG: error: CAUSE` on stderr, and 2 on a usage error. These helpers are the one definition of
that line and of the exit codes, so the three tools cannot drift apart.

Invariants: the cause is one line (whitespace runs, newlines included, become one space) with
every other character a terminal would act on escaped (`domain_core.display.escape`: a server's
message is relayed text, and must not forge lines or repaint the screen); it is the error's own
message (an `HsmDomainError`'s `message`, which never holds secrets; an
`OSError`'s text and file name), never a traceback unless the caller asked for one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import TextIO

from domain_core.display import escape
from domain_core.errors import HsmDomainError

__all__ = ["exit_code", "one_line", "print_error", "quiet_broken_pipe"]


def one_line(error: BaseException, *, with_status: bool = False) -> str:
    """The cause of `error` as one line; with `with_status`, an HsmDomainError's status name
    (the gRPC status it is answered with) follows in brackets (for tools whose users also
    read the service's statuses)."""
    if isinstance(error, HsmDomainError):
        text = error.message
        if with_status:
            text = f"{text} [{error.status.name}]"
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            text = f"{text}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return escape(" ".join(text.split()))


def print_error(
    prog: str,
    error: BaseException,
    *,
    verbose: bool = False,
    with_status: bool = False,
    stream: TextIO | None = None,
) -> None:
    """`PROG: error: CAUSE` on stderr; with `verbose`, the traceback first."""
    out = sys.stderr if stream is None else stream
    if verbose:
        traceback.print_exception(error, file=out)
    print(f"{prog}: error: {one_line(error, with_status=with_status)}", file=out)


def exit_code(error: SystemExit) -> int:
    """The exit status argparse meant by raising `error` (0 after --help, 2 on a usage error)."""
    code = error.code
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


def quiet_broken_pipe() -> int:
    """After the reader of stdout went away (e.g. `| head`): point stdout at /dev/null so that
    the interpreter's final flush cannot fail again; the exit status to return (1)."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
