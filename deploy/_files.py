"""Small file helpers for the launcher: new files with an exact mode, atomic replacement.

Invariants: a secret file is created 0600 with O_EXCL (never overwritten, never briefly
readable by others whatever the umask); a replaced file is written to a temp file in the same
directory and renamed, so a reader sees the old or the new content, never a torn one.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def write_new_file(path: Path, content: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` and `content`; FileExistsError if it exists."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_secret_file(path: Path, content: bytes) -> None:
    """Create a new 0600 file (keys, passphrases); refuses to overwrite."""
    write_new_file(path, content, SECRET_MODE)


def replace_file(path: Path, content: bytes, mode: int = PUBLIC_MODE) -> None:
    """Atomically replace `path` with `content` (temp file in the same directory, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_new_file(tmp, content, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, document: Any) -> None:
    """Atomically write a JSON document (public content, mode 0644)."""
    replace_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


def make_private_dir(path: Path) -> Path:
    """Create a directory (and parents) readable only by the owner; return it."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path
