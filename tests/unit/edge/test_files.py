"""The one size-limited reader (`domain_edge.files.read_limited`) and the readers built on it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from domain_core.errors import (
    LimitExceededError,
    MalformedMessageError,
    TokenError,
)
from domain_edge.audit import read_head_file
from domain_edge.enrollment_files import read_enrollment_file
from domain_edge.file_tokens import load_file_token
from domain_edge.files import read_limited, read_secret_file
from domain_edge.identity_files import HOST_FILE, load_host_identity
from domain_edge.tokens import read_operator_public

pytestmark = pytest.mark.unit


class _CountingStream(io.BytesIO):
    """A stream that remembers how many bytes were asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size)


def test_reads_a_file_of_exactly_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert read_limited(path, 10) == b"x" * 10
    assert read_limited(str(path), 10) == b"x" * 10


def test_refuses_one_byte_more_with_the_default_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    with pytest.raises(LimitExceededError, match=r"larger than 10 bytes"):
        read_limited(path, 10)


def test_refuses_with_the_callers_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 11)
    with pytest.raises(TokenError, match="not a token"):
        read_limited(path, 10, lambda: TokenError("not a token"))


def test_reads_at_most_one_byte_beyond_the_limit() -> None:
    stream = _CountingStream(b"y" * 1_000_000)
    with pytest.raises(LimitExceededError, match="the input is larger than 100 bytes"):
        read_limited(stream, 100)
    assert stream.asked == [101]
    assert stream.tell() == 101


def test_reads_a_stream_within_the_limit() -> None:
    assert read_limited(io.BytesIO(b"abc"), 3) == b"abc"
    assert read_limited(io.BytesIO(b""), 0) == b""


def test_a_missing_file_is_left_to_the_caller(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_limited(tmp_path / "absent", 10)


def test_a_negative_limit_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="0 or more"):
        read_limited(io.BytesIO(b""), -1)


def _oversized(path: Path, size: int) -> Path:
    path.write_bytes(b"{" + b" " * size)
    return path


def test_secret_file_refuses_an_oversized_key_file(tmp_path: Path) -> None:
    path = _oversized(tmp_path / "key", 100)
    os.chmod(path, 0o600)
    with pytest.raises(TokenError, match="larger than 50 bytes"):
        read_secret_file(path, 50)
    assert read_secret_file(path, 101) == path.read_bytes()


def test_secret_file_still_refuses_a_readable_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"secret")
    os.chmod(path, 0o640)
    with pytest.raises(TokenError, match="chmod 600"):
        read_secret_file(path)


def test_callers_refuse_oversized_files_with_their_own_errors(tmp_path: Path) -> None:
    # Each reader of a small file refuses a huge one as too large, in its own error class.
    huge = 5 * 1024 * 1024
    with pytest.raises(TokenError, match="larger than"):
        load_file_token(_oversized(tmp_path / "token.json", huge), lambda: b"pass")
    with pytest.raises(MalformedMessageError, match="larger than"):
        read_operator_public(_oversized(tmp_path / "public.json", huge))
    with pytest.raises(LimitExceededError, match="an enrollment is at most"):
        read_enrollment_file(_oversized(tmp_path / "enrollment", huge))
    with pytest.raises(MalformedMessageError, match="longer than"):
        read_head_file(_oversized(tmp_path / "audit.log.head", huge))
    identity = tmp_path / "identity"
    identity.mkdir()
    _oversized(identity / HOST_FILE, huge)
    with pytest.raises(TokenError, match="larger than"):
        load_host_identity(identity)
