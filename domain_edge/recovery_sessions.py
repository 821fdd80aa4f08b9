"""The recovery session file `hsm-domain recover` writes for the operators (docs/
disaster-recovery.md): the recover change it prepared (the new hosts' enrollments, the session
host, the session's public key) for the newest state of the backup it restored.

It holds no secret and is not trusted: an operator contributes only to a recover proposal for
the head they verified themselves, and what they sign is that proposal, which `proposals
show` and `recovery contribute` display (the new hosts' key fingerprints and the session key's
fingerprint, to compare with what `hsm-domain recover` printed). Written 0644, never over
another file; read within a size bound, canonical bytes only.
"""

from __future__ import annotations

from pathlib import Path

from domain_core.errors import InvalidInputError, LimitExceededError
from domain_core.limits import MAX_RECOVERY_SESSION_FILE_BYTES
from domain_core.model import parse_canonical
from domain_edge.files import read_limited, write_new_file
from domain_proto import domain_pb2

__all__ = ["read_recovery_session", "write_recovery_session"]


def write_recovery_session(path: Path, session: domain_pb2.RecoverySession) -> None:
    """Write `session` to a new file (0644)."""
    write_new_file(Path(path), session.SerializeToString(deterministic=True), 0o644)


def read_recovery_session(path: str | Path) -> domain_pb2.RecoverySession:
    """The session in a file `write_recovery_session` wrote (InvalidInputError otherwise)."""
    path = Path(path)
    try:
        raw = read_limited(
            path,
            MAX_RECOVERY_SESSION_FILE_BYTES,
            lambda: LimitExceededError(f"{path} is too large to be a recovery session file"),
        )
    except FileNotFoundError:
        raise InvalidInputError(f"no recovery session file at {path}") from None
    session = parse_canonical(
        domain_pb2.RecoverySession,
        raw,
        f"recovery session file {path}",
        MAX_RECOVERY_SESSION_FILE_BYTES,
    )
    if not session.HasField("recover") or not session.domain_id:
        raise InvalidInputError(f"{path} is not a recovery session file")
    return session
