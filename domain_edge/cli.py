"""One skeleton for the command-line tools `hsm-domain`, `hsm-kms` and `hsm-operator`.

A tool is a `Tool`: its name, its help, the options every command takes, a table of
`Command`s (and `Group`s of them), and how a chosen command is run. `Tool.parser` makes the
argparse parser from it, one small entry per command (name, help, example, the function that
adds its arguments, the function that runs it), and `run_tool` is the one main path of all
three tools: parse (argparse exits 0 after --help, 2 on a usage error), run, and map what the
command raised to an exit status and one line on stderr:

    UsageError                 2    `PROG COMMAND: error: CAUSE` (argparse's shape; with
                                    `usage_on_error`, the command's usage line first)
    HsmDomainError, OSError    1    `PROG: error: CAUSE` (`-v`: the traceback first)
    BrokenPipeError            1    nothing (the reader of stdout went away, e.g. `| head`)
    KeyboardInterrupt          130  `PROG: interrupted`

Anything else is a bug and shows its traceback. Output helpers: `print_json` (one JSON
document), `Progress` (one updating line on a terminal, one line per step otherwise),
`Spinner` (a wait on a terminal), and `console_command` / `shell_path` for the commands a tool
prints for a person to paste (they work in a new shell: a virtual environment's scripts are
named by their path).

Invariants: the cause is one line (whitespace runs, newlines included, become one space) with
every other character a terminal would act on escaped (`domain_core.display.escape`: a
server's message is relayed text, and must not forge lines or repaint the screen); it is the
error's own message (an `HsmDomainError`'s `message`, which never holds secrets; an
`OSError`'s text and file name), never a traceback unless the caller asked for one (`-v`).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shlex
import sys
import sysconfig
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from domain_core.display import escape
from domain_core.errors import HsmDomainError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "Group",
    "Progress",
    "Spinner",
    "Tool",
    "UsageError",
    "console_command",
    "epilog",
    "exit_code",
    "one_line",
    "print_error",
    "print_json",
    "quiet_broken_pipe",
    "run_tool",
    "shell_path",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

Subparsers = Any  # argparse._SubParsersAction[argparse.ArgumentParser] (a private class)
AddArguments = Callable[[argparse.ArgumentParser], None]
# Adds the options a tool takes before or after the command name: with their defaults on the
# main parser (suppress=False), with argparse.SUPPRESS on every command (suppress=True), so
# that an option given after the command does not hide one given before it.
AddSharedOptions = Callable[[argparse.ArgumentParser, bool], None]


class UsageError(Exception):
    """The command line parses but makes no sense (options that exclude each other, a value
    out of range, a missing choice): exit status 2, nothing was done."""


# --- one line per failure ----------------------------------------------------------------------


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
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def quiet_broken_pipe() -> int:
    """After the reader of stdout went away (e.g. `| head`): point stdout at /dev/null so that
    the interpreter's final flush cannot fail again; the exit status to return (1)."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_FAILED


# --- output --------------------------------------------------------------------------------------


def print_json(document: Any, *, sort_keys: bool = False, stream: TextIO | None = None) -> None:
    """One JSON document (indented by two, a newline after it) for a script to read."""
    out = sys.stdout if stream is None else stream
    out.write(json.dumps(document, indent=2, sort_keys=sort_keys) + "\n")
    out.flush()


class Progress:
    """Progress of a long command: one updating line on a terminal, else one line per step.

    `update` is `step` at most every `every` seconds when the stream is not a terminal (a log
    file gets a line now and then, not one per tick). Safe to call from several threads."""

    def __init__(self, stream: TextIO, *, quiet: bool = False, every: float = 5.0) -> None:
        self._stream = stream
        self.tty = stream.isatty()
        self._quiet = quiet
        self._every = every
        self._open_line = False
        self._last = 0.0
        self._lock = threading.Lock()

    def step(self, text: str) -> None:
        """Report an intermediate step (replaced by the next one on a terminal)."""
        if self._quiet:
            return
        with self._lock:
            if self.tty:
                self._stream.write(f"\r\033[K{text}")
                self._open_line = True
            else:
                self._stream.write(text + "\n")
            self._stream.flush()

    def done(self, text: str) -> None:
        """Report a result that stays on screen."""
        if self._quiet:
            return
        with self._lock:
            if self.tty and self._open_line:
                self._stream.write("\r\033[K")
                self._open_line = False
            self._stream.write(text + "\n")
            self._stream.flush()

    def clear(self) -> None:
        """Remove an open progress line (terminal only)."""
        if self._quiet:
            return
        with self._lock:
            if self.tty and self._open_line:
                self._stream.write("\r\033[K")
                self._stream.flush()
                self._open_line = False

    def due(self) -> bool:
        """Whether `update` would print now (always on a terminal)."""
        return self.tty or time.monotonic() - self._last >= self._every

    def update(self, text: str) -> None:
        """Like `step`, but at most every `every` seconds when the stream is not a terminal."""
        if not self.due():
            return
        self._last = time.monotonic()
        self.step(text)


class Spinner:
    """A wait: a spinner and what is awaited on a terminal; otherwise one line `waiting: ...`
    each time what is awaited changes. The text is escaped (it may hold relayed facts)."""

    _FRAMES: Final = "|/-\\"

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._frames = itertools.cycle(self._FRAMES)
        self._last = ""

    def update(self, text: str) -> None:
        """Show what is awaited now."""
        text = escape(text)  # the spinner's own codes stay
        if self._tty:
            self._stream.write(f"\r{next(self._frames)} {text}\x1b[K")
        elif text != self._last:
            self._stream.write(f"waiting: {text}\n")
        self._last = text
        self._stream.flush()

    def done(self) -> None:
        """The wait is over: remove the spinner's line (terminal only)."""
        if self._tty and self._last:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def shell_path(path: Path) -> str:
    """`path` as a person types it here: relative to the working directory when it is under
    it ("." for the directory itself), else absolute; quoted for a shell where needed."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(str(relative)) if str(relative) != "." else "."


def console_command(name: str) -> str:
    """How to run the console script `name` (`hsm-domain`, ...) pasted into a new shell.

    A new shell does not have a virtual environment's scripts on its PATH: when this program
    runs from one, the script's path (relative to the working directory when under it, e.g.
    `.venv/bin/hsm-domain`); otherwise (or if the script is not there) the bare name."""
    if sys.prefix == sys.base_prefix:
        return name
    script = Path(sysconfig.get_path("scripts")) / name
    if not script.is_file():
        return name
    typed = shell_path(script)
    return typed if "/" in typed else f"./{typed}"


# --- parsers from tables -------------------------------------------------------------------------


def epilog(example: str, notes: str = "", *, heading: str = "Example:", gap: str = "\n\n") -> str:
    """The end of a `--help`: `heading`, the example indented by two spaces, then `notes`."""
    text = heading + "\n" + textwrap.indent(textwrap.dedent(example).strip("\n"), "  ")
    if notes:
        text += gap + textwrap.dedent(notes).strip()
    return text


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command that takes only the shared options."""


@dataclass(frozen=True)
class Command:
    """One command: what its `--help` says, the arguments it adds, and what runs it.

    `run` is stored in the parsed namespace as `_run` (the tool's `run` decides what it is
    called with); `defaults` are set in the namespace too (e.g. checks made before a call)."""

    name: str
    help: str
    run: Callable[..., int]
    example: str
    arguments: AddArguments = _no_arguments
    description: str | None = None  # default: the help text
    notes: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A command group (`TOOL NAME COMMAND ...`): its own help, and its commands."""

    name: str
    help: str
    example: str
    commands: Sequence[Command]
    description: str | None = None  # default: the help text
    metavar: str = "COMMAND"


@dataclass(frozen=True)
class Tool:
    """A command-line tool: its parser's table and how its commands run and fail.

    `run(args)` runs the command the parser chose (default: `args._run(args)`). With
    `with_status` an `HsmDomainError`'s gRPC status name follows its cause; with
    `usage_on_error` a `UsageError` is preceded by the command's usage line; `explain(error,
    stream)` may add lines after the one-line cause (e.g. a log's last lines)."""

    prog: str
    description: str
    example: str
    commands: Sequence[Command | Group]
    shared_options: AddSharedOptions
    notes: str = ""
    heading: str = "Example:"
    gap: str = "\n\n"
    run: Callable[[argparse.Namespace], int] | None = None
    with_status: bool = False
    usage_on_error: bool = False
    explain: Callable[[BaseException, TextIO], None] | None = None

    def epilog(self, example: str, notes: str = "") -> str:
        """An epilog in this tool's style."""
        return epilog(example, notes, heading=self.heading, gap=self.gap)

    def parser(self) -> argparse.ArgumentParser:
        """The whole parser of this tool, every command of its table added."""
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=self.description,
            epilog=self.epilog(self.example, self.notes),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.shared_options(parser, False)
        parser.set_defaults(_parser=parser)
        shared = argparse.ArgumentParser(add_help=False)
        self.shared_options(shared, True)
        subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for item in self.commands:
            if isinstance(item, Group):
                _add_group(subparsers, self, item, [shared])
            else:
                _add_command(subparsers, self, item, [shared])
        return parser


def _add_command(
    subparsers: Subparsers, tool: Tool, command: Command, parents: list[argparse.ArgumentParser]
) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        command.name,
        help=command.help,
        description=command.description or command.help,
        epilog=tool.epilog(command.example, command.notes),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents,
    )
    command.arguments(parser)
    parser.set_defaults(_run=command.run, _parser=parser, **command.defaults)


def _add_group(
    subparsers: Subparsers, tool: Tool, group: Group, parents: list[argparse.ArgumentParser]
) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        group.name,
        help=group.help,
        description=group.description or group.help,
        epilog=tool.epilog(group.example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents,
    )
    parser.set_defaults(_parser=parser)
    commands = parser.add_subparsers(
        dest=f"{group.name}_command", metavar=group.metavar, required=True
    )
    for command in group.commands:
        _add_command(commands, tool, command, parents)


# --- the one main path ---------------------------------------------------------------------------


def _run_command(args: argparse.Namespace) -> int:
    run: Callable[[argparse.Namespace], int] = args._run
    return run(args)


def run_tool(tool: Tool, argv: Sequence[str] | None = None) -> int:
    """Run one command of `tool`; return its exit status (see the module docstring)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # for the processes a command starts
    parser = tool.parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help, 2 on a usage error
        return exit_code(exc)
    verbose = bool(getattr(args, "verbose", False))
    try:
        return int((tool.run or _run_command)(args))
    except UsageError as error:
        command_parser: argparse.ArgumentParser = getattr(args, "_parser", parser)
        if tool.usage_on_error:
            command_parser.print_usage(sys.stderr)
        print(f"{command_parser.prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return quiet_broken_pipe()
    except (HsmDomainError, OSError) as error:
        print_error(tool.prog, error, verbose=verbose, with_status=tool.with_status)
        if tool.explain is not None:
            tool.explain(error, sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{tool.prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
