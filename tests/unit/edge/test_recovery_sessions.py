"""Recovery session files and session keys (issue 16): what `hsm-domain recover` writes and the
session host reads. As an adversary: a session file that is not one, is too large, or is not
canonical; a session key file readable by others or holding garbage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domain_core.errors import (
    InvalidInputError,
    LimitExceededError,
    MalformedMessageError,
    TokenError,
)
from domain_core.limits import MAX_RECOVERY_SESSION_FILE_BYTES
from domain_core.recovery_shares import x25519_public_key
from domain_edge.identity_files import (
    RECOVERY_SESSION_KEY_FILE,
    load_recovery_session_key,
    new_recovery_session_key,
    remove_recovery_session_key,
)
from domain_edge.recovery_sessions import read_recovery_session, write_recovery_session
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit


def _session() -> domain_pb2.RecoverySession:
    return domain_pb2.RecoverySession(
        domain_id="local",
        base_version=7,
        base_state_hash=b"\x07" * 32,
        recover=domain_pb2.Recover(
            enrollments=[b"enrollment"], session_host_id="hsa-4", session_public_key=b"\x05" * 32
        ),
        created_at=1_800_000_000,
    )


def test_a_session_file_round_trips_and_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "recovery-session.bin"
    write_recovery_session(path, _session())
    assert read_recovery_session(path) == _session()
    with pytest.raises(FileExistsError):
        write_recovery_session(path, _session())


def test_what_is_not_a_session_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no recovery session file"):
        read_recovery_session(tmp_path / "missing.bin")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(domain_pb2.RecoverySession(domain_id="local").SerializeToString())
    with pytest.raises(InvalidInputError, match="is not a recovery session file"):
        read_recovery_session(empty)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(b"\xff" * 40)
    with pytest.raises(MalformedMessageError):
        read_recovery_session(noise)
    huge = tmp_path / "huge.bin"
    huge.write_bytes(b"\x00" * (MAX_RECOVERY_SESSION_FILE_BYTES + 1))
    with pytest.raises(LimitExceededError):
        read_recovery_session(huge)


def test_a_session_key_is_private_replaced_by_a_new_session_and_removed(tmp_path: Path) -> None:
    assert load_recovery_session_key(tmp_path) is None
    public = new_recovery_session_key(tmp_path)
    path = tmp_path / RECOVERY_SESSION_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    private = load_recovery_session_key(tmp_path)
    assert private is not None
    assert x25519_public_key(private) == public
    assert new_recovery_session_key(tmp_path) != public  # a new session: shares to the old fail
    os.chmod(path, 0o644)
    with pytest.raises(TokenError, match="accessible by group or others"):
        load_recovery_session_key(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(b"not a key\n")
    with pytest.raises(TokenError, match="holds no 32-byte X25519 key"):
        load_recovery_session_key(tmp_path)
    assert remove_recovery_session_key(tmp_path) is True
    assert remove_recovery_session_key(tmp_path) is False
    assert load_recovery_session_key(tmp_path) is None
