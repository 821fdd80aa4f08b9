"""What `hsm-kms` reads and writes: inputs, binary outputs, key metadata and policy files.

Invariants kept here:
- binary data goes to files or pipes as raw bytes, or base64 inside `--json` output; binary
  is never written raw to a terminal (`refuse_terminal`);
- an output file appears whole or not at all (a temporary file in the same directory,
  renamed into place once everything is written and, for decryption, verified); outputs
  are 0600, since they may hold plaintext;
- an input is read up to its limit and refused beyond it; a message to sign or MAC beyond
  4096 bytes is a usage error (`read_message`), since its digest is what to send instead;
- a grant token is a bearer credential, kept like a key file: read only from a file that
  group and others may not access (`read_grant_tokens`), at most 10 of them, each at most
  8192 bytes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from domain_core.display import escape
from domain_core.errors import InvalidInputError, LimitExceededError, UnauthenticatedError
from domain_core.limits import (
    MAX_GRANT_TOKEN_BYTES,
    MAX_GRANT_TOKENS,
    MAX_KMS_MESSAGE_BYTES,
    MAX_POLICY_FILE_BYTES,
    MIN_KMS_MESSAGE_BYTES,
)
from domain_edge.cli import UsageError, print_json
from domain_edge.files import SECRET_MODE, read_limited, replace_file
from domain_edge.kms_client import KeyMetadata, policy_from_json

__all__ = [
    "PROG",
    "STDIO",
    "atomic_output",
    "b64",
    "conditions_text",
    "open_input",
    "pem_public_key",
    "print_document",
    "print_failure",
    "print_metadata",
    "read_grant_tokens",
    "read_input",
    "read_message",
    "read_policy",
    "refuse_terminal",
    "write_output",
]

PROG: Final = "hsm-kms"
STDIO: Final = "-"
_PEM_LINE: Final = 64  # base64 characters per line of a PEM body (RFC 7468)


def read_input(path: str, limit: int, what: str, hint: str = "") -> bytes:
    """All of a file (or stdin for '-'), refused beyond `limit` bytes."""
    source = sys.stdin.buffer if path == STDIO else Path(path)
    return read_limited(
        source, limit, lambda: LimitExceededError(f"{what} is more than {limit} bytes{hint}")
    )


def read_message(path: str, hint: str = "") -> bytes:
    """A message for Sign, Verify, GenerateMac or VerifyMac: 1 to 4096 bytes of a file (or
    stdin for '-'); an empty or longer one is a usage error (`hint` says what to do)."""
    source = sys.stdin.buffer if path == STDIO else Path(path)
    limit = MAX_KMS_MESSAGE_BYTES
    message = read_limited(
        source, limit, lambda: UsageError(f"the message is more than {limit} bytes{hint}")
    )
    if len(message) < MIN_KMS_MESSAGE_BYTES:
        raise UsageError(f"the message is empty: give {MIN_KMS_MESSAGE_BYTES} to {limit} bytes")
    return message


def _read_grant_token(path: str) -> bytes:
    with Path(path).open("rb") as source:
        mode = os.fstat(source.fileno()).st_mode & 0o777
        if mode & 0o077:
            raise UnauthenticatedError(
                f"grant token file {path} is accessible by group or others (mode {mode:04o}): "
                f"a grant token is a bearer credential; chmod 600 it"
            )
        token = read_limited(
            source,
            MAX_GRANT_TOKEN_BYTES,
            lambda: LimitExceededError(
                f"grant token file {path} is more than {MAX_GRANT_TOKEN_BYTES} bytes: not a "
                "token create-grant wrote"
            ),
        )
    if not token:
        raise UsageError(f"grant token file {path} is empty")
    return token


def read_grant_tokens(paths: Sequence[str]) -> list[bytes]:
    """The tokens of --grant-token files (at most 10; each 0600, 1 to 8192 bytes)."""
    if len(paths) > MAX_GRANT_TOKENS:
        raise UsageError(f"give at most {MAX_GRANT_TOKENS} --grant-token files, not {len(paths)}")
    return [_read_grant_token(path) for path in paths]


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[bytes]]:
    """A file opened for reading, or stdin for '-'."""
    if path == STDIO:
        yield sys.stdin.buffer
    else:
        with Path(path).open("rb") as source:
            yield source


def refuse_terminal(what: str, option: str = "--out") -> None:
    """UsageError if stdout is a terminal: binary output goes to a file or a pipe."""
    if sys.stdout.isatty():
        raise UsageError(
            f"{what} is binary: give {option} FILE, pipe it to a program, or use --json (base64)"
        )


def write_output(path: str, data: bytes, what: str) -> None:
    """Raw bytes to stdout ('-', never a terminal) or atomically to a file (0600)."""
    if path == STDIO:
        refuse_terminal(what)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        replace_file(Path(path), data, SECRET_MODE)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[IO[bytes]]:
    """A file that replaces `path` only if the block completes (fsynced, 0600); stdout for
    '-'. On failure the temporary file is removed and `path` is left alone."""
    if path == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
        mode="wb", dir=target.parent, prefix=f".{target.name}.", suffix=".partial", delete=False
    )
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def print_failure(cause: str) -> None:
    """`hsm-kms: error: CAUSE` on stderr, for a command that fails without an exception (a
    signature or MAC that does not verify)."""
    print(f"{PROG}: error: {cause}", file=sys.stderr)


def pem_public_key(der: bytes) -> bytes:
    """A DER SubjectPublicKeyInfo as a PEM "PUBLIC KEY" block (what `openssl` reads)."""
    body = base64.b64encode(der)
    lines = [body[i : i + _PEM_LINE] for i in range(0, len(body), _PEM_LINE)]
    return b"\n".join([b"-----BEGIN PUBLIC KEY-----", *lines, b"-----END PUBLIC KEY-----", b""])


def b64(data: bytes) -> str:
    """Binary data inside a `--json` document."""
    return base64.b64encode(data).decode("ascii")


def print_document(document: Any) -> None:
    """A `--json` document (keys sorted)."""
    print_json(document, sort_keys=True)


def _time(seconds: int) -> str:
    if not seconds:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def print_metadata(metadata: KeyMetadata, as_json: bool) -> None:
    """A key's metadata and policy, as text or as its JSON document."""
    if as_json:
        print_document(metadata.to_json())
        return
    rotation = (
        f"every {metadata.rotation_period_days} days, next {_time(metadata.next_rotation_at)}"
        if metadata.rotation_enabled
        else "off"
    )
    lines = [
        f"key id:          {metadata.key_id}",
        f"state:           {metadata.state}",
        f"description:     {metadata.description}",
        f"key spec:        {metadata.key_spec}",
        f"key usage:       {metadata.key_usage}",
        f"created:         {_time(metadata.created_at)} by {metadata.creator or '-'}",
        f"backing version: {metadata.current_backing_version}",
        f"rotation:        {rotation}",
    ]
    if metadata.deletion_at:
        lines.append(f"deletion at:     {_time(metadata.deletion_at)}")
    for number, grant in enumerate(metadata.policy, start=1):
        when = f" when {conditions_text(grant.conditions)}" if grant.conditions else ""
        lines.append(
            f"grant {number}:         {', '.join(grant.principals)}: "
            f"{', '.join(grant.operations)}{when}"
        )
    if metadata.message.grants:
        lines.append(f"key grants:      {len(metadata.message.grants)} (list-grants shows them)")
    if metadata.tags:
        tags = ", ".join(f"{key}={value}" for key, value in sorted(metadata.tags.items()))
        lines.append(f"tags:            {escape(tags)}")
    print("\n".join(lines))


def conditions_text(conditions: Mapping[str, Mapping[str, str]]) -> str:
    """Encryption context conditions (a policy grant's, a key grant's constraints) as text:
    `context equals a=1,b=2`, `context has tenant=acme` (both: joined by `and`; none: `-`);
    escaped, since they are the service's data."""
    words = {"encryption_context_equals": "equals", "encryption_context_subset": "has"}
    parts = [
        f"context {words.get(kind, kind)} "
        + ",".join(f"{key}={value}" for key, value in sorted(mapping.items()))
        for kind, mapping in conditions.items()
    ]
    return escape(" and ".join(parts)) if parts else "-"


def read_policy(path: str) -> dict[str, Any]:
    """A key policy document from a file ('-': stdin), refused before any call if bad."""
    raw = read_input(path, MAX_POLICY_FILE_BYTES, f"policy file {path}")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"policy file {path} is not valid JSON: {error}") from None
    policy_from_json(document)  # refuse a bad document before any call
    if not isinstance(document, dict):
        raise InvalidInputError(f"policy file {path} must hold a JSON object")
    return document
