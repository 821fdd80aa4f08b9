"""Small file helpers for the launcher: new files with an exact mode, atomic replacement.

Invariants: a secret file is created 0600 with O_EXCL (never overwritten, never briefly
readable by others whatever the umask); a replaced file is written to a temp file in the same
directory and renamed, so a reader sees the old or the new content, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domain_edge.files import (
    PRIVATE_DIR_MODE,
    PUBLIC_MODE,
    SECRET_MODE,
    make_private_dir,
    replace_file,
    write_new_file,
)

__all__ = [
    "PRIVATE_DIR_MODE",
    "PUBLIC_MODE",
    "SECRET_MODE",
    "make_private_dir",
    "replace_file",
    "write_json",
    "write_new_file",
    "write_secret_file",
]


def write_secret_file(path: Path, content: bytes) -> None:
    """Create a new 0600 file (keys, passphrases); refuses to overwrite."""
    write_new_file(path, content, SECRET_MODE)


def write_json(path: Path, document: Any) -> None:
    """Atomically write a JSON document (public content, mode 0644)."""
    replace_file(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
