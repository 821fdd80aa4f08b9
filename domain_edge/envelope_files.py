"""Envelope decryption into a file that appears whole or not at all.

`domain_core.envelope.decrypt_stream` releases plaintext chunk by chunk, each authentic but
the whole confirmed only at the end. Invariant kept here: the target path never holds a
partial or forged output. Plaintext goes to a new temporary file (mode 0600) in the target's
directory, which is fsynced and renamed over the target only when the whole envelope has
verified, and removed on any failure.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from domain_core.envelope import ByteReader, EnvelopeHeader, decrypt_stream

__all__ = ["decrypt_to_file"]


def decrypt_to_file(
    reader: ByteReader, path: str | os.PathLike[str], data_key: bytes, header: EnvelopeHeader
) -> int:
    """Decrypt the chunks that follow `header` in `reader` into the file at `path`, atomically
    (see the module docstring); returns the plaintext length."""
    target = Path(path)
    temp_name: str | None = None
    try:
        with tempfile.NamedTemporaryFile(
            mode="wb", dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False
        ) as handle:
            temp_name = handle.name
            total = decrypt_stream(reader, handle, data_key, header)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        if temp_name is not None:
            Path(temp_name).unlink(missing_ok=True)
        raise
    return total
