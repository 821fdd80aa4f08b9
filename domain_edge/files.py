"""File helpers for secrets and durable state, shared by every package.

Invariants:
- a new file gets exactly its mode whatever the umask, is created with O_EXCL (never
  overwriting, never briefly readable by others) and is fsynced before it is reported written;
- a replaced file is written to a temp file in the same directory, fsynced and renamed over
  its name, then the directory is fsynced: a reader sees the old or the new content, never a
  torn one, also after a crash;
- a file is read through `read_limited`: never more than its limit plus one byte is read,
  whatever the file's size, and a larger file is refused, never cut short;
- a secret file that group or others may access is refused when read.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from domain_core.errors import LimitExceededError, TokenError, TokenNotFoundError
from domain_core.limits import MAX_KEY_FILE_BYTES

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def write_new_file(path: Path, content: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` and `content`, durably; FileExistsError if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # exactly `mode`, whatever the umask
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Make a rename or creation in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, content: bytes, mode: int = PUBLIC_MODE) -> None:
    """Atomically and durably replace `path` with `content` (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    write_new_file(tmp, content, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def make_private_dir(path: Path) -> Path:
    """Create a directory (and parents) that only its owner may use; return it."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def read_limited(
    source: Path | str | BinaryIO,
    limit: int,
    too_large: Callable[[], Exception] | None = None,
) -> bytes:
    """All the bytes of `source` (a path, or an open binary file such as stdin), at most `limit`.

    Reads at most `limit + 1` bytes, so that a huge file costs no memory; a larger source raises
    `too_large()` (the caller's error, which says what the file should have been), by default
    LimitExceededError. Opening a path may raise FileNotFoundError or OSError: the caller says
    what is missing.
    """
    if limit < 0:
        raise ValueError("a read limit is 0 or more bytes")
    if isinstance(source, Path | str):
        with Path(source).open("rb") as stream:
            data = stream.read(limit + 1)
    else:
        data = source.read(limit + 1)
    if len(data) > limit:
        if too_large is not None:
            raise too_large()
        name = source if isinstance(source, Path | str) else "the input"
        raise LimitExceededError(f"{name} is larger than {limit} bytes")
    return data


def read_secret_file(path: Path, max_size: int = MAX_KEY_FILE_BYTES) -> bytes:
    """Read a key file (at most `max_size` bytes), refusing one that group or others may
    access."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise TokenNotFoundError(f"missing key file {path}") from None
    except OSError as exc:
        raise TokenError(f"cannot read key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise TokenError(
                f"key file {path} is accessible by group or others (mode {mode:04o}); "
                f"run `chmod 600 {path}`"
            )
        return read_limited(
            f, max_size, lambda: TokenError(f"key file {path} is larger than {max_size} bytes")
        )
