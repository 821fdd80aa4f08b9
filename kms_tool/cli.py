"""`hsm-kms`: create and use customer keys of a domain's key service from the shell.

Exit status: 0 on success, 1 when the service refused or something failed (one line on
stderr, `-v` adds the traceback), 2 on a usage error. Only `HsmDomainError` and `OSError` are
caught, once, in `main`; anything else is a bug and shows its traceback.

Invariants kept here:
- binary data goes to files or pipes as raw bytes, or base64 inside `--json` output; binary
  is never written raw to a terminal;
- a plaintext data key is never written to a terminal: `generate-data-key` refuses
  `--out-plaintext -` when stdout is a terminal, unless `--json` asked for it to be printed;
  a data key file is created 0600 and never overwrites an existing file;
- an output file appears whole or not at all (a temporary file in the same directory,
  renamed into place once everything is written and, for decryption, verified); outputs
  are 0600, since they may hold plaintext;
- plaintext and keys never appear in a message (encryption context values may: they are
  not secret, they are authenticated data).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from domain_core import envelope
from domain_core.ciphertext import parse_header
from domain_core.errors import (
    HsmDomainError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
)
from domain_core.limits import MAX_CHUNK_SIZE, MAX_POLICY_FILE_BYTES
from domain_edge.cli_support import exit_code, print_error, quiet_broken_pipe
from domain_edge.files import SECRET_MODE, read_limited, replace_file, write_new_file
from domain_edge.kms_client import (
    OPERATION_NAMES,
    KeyClient,
    KeyMetadata,
    decrypt_envelope,
    encrypt_envelope,
    policy_from_json,
    read_cluster,
)
from domain_edge.transport import TlsMaterial

__all__ = ["build_parser", "main", "parse_context"]

PROG: Final = "hsm-kms"
CLUSTER_ENV: Final = "HSM_CLUSTER"
STDIO: Final = "-"
_MAX_U32: Final = 0xFFFFFFFF
# Options holding encryption contexts: lists of (key, value) pairs, made dicts before use.
_CONTEXT_OPTIONS: Final = ("context", "source_context", "destination_context")


class _UsageError(Exception):
    """Arguments that parse but make no sense together (exit 2)."""


# --- encryption context arguments ------------------------------------------------------------


def _context_entry(text: str) -> tuple[str, str]:
    """One `key=value` argument (split at the first '='; the value may hold more)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"context entry {text[:80]!r} is not key=value")
    if not key:
        raise argparse.ArgumentTypeError(f"context entry {text[:80]!r} has an empty key")
    if not value:
        raise argparse.ArgumentTypeError(f"context entry {text[:80]!r} has an empty value")
    return key, value


def _context(entries: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    """The context from parsed entries (None when none were given); a key given twice fails."""
    if not entries:
        return None
    context: dict[str, str] = {}
    for key, value in entries:
        if key in context:
            raise _UsageError(f"context key {key[:80]!r} is given twice")
        context[key] = value
    return context


def parse_context(items: Sequence[str]) -> dict[str, str]:
    """`["k=v", ...]` as a context: split at the first '=', keys and values non-empty, no key
    twice. ValueError says what is wrong."""
    try:
        return _context([_context_entry(item) for item in items]) or {}
    except (argparse.ArgumentTypeError, _UsageError) as error:
        raise ValueError(str(error)) from None


# --- input and output ------------------------------------------------------------------------


def _read_input(path: str, limit: int, what: str, hint: str = "") -> bytes:
    """All of a file (or stdin for '-'), refused beyond `limit` bytes."""
    source = sys.stdin.buffer if path == STDIO else Path(path)
    return read_limited(
        source, limit, lambda: LimitExceededError(f"{what} is more than {limit} bytes{hint}")
    )


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[IO[bytes]]:
    if path == STDIO:
        yield sys.stdin.buffer
    else:
        with Path(path).open("rb") as source:
            yield source


def _refuse_terminal(what: str, option: str = "--out") -> None:
    if sys.stdout.isatty():
        raise _UsageError(
            f"{what} is binary: give {option} FILE, pipe it to a program, or use --json (base64)"
        )


def _write_output(path: str, data: bytes, what: str) -> None:
    """Raw bytes to stdout ('-', never a terminal) or atomically to a file (0600)."""
    if path == STDIO:
        _refuse_terminal(what)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        replace_file(Path(path), data, SECRET_MODE)


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[IO[bytes]]:
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _time(seconds: int) -> str:
    if not seconds:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_metadata(metadata: KeyMetadata, as_json: bool) -> None:
    if as_json:
        _print_json(metadata.to_json())
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
        f"created:         {_time(metadata.created_at)} by {metadata.creator or '-'}",
        f"backing version: {metadata.current_backing_version}",
        f"rotation:        {rotation}",
    ]
    if metadata.deletion_at:
        lines.append(f"deletion at:     {_time(metadata.deletion_at)}")
    for number, grant in enumerate(metadata.policy, start=1):
        lines.append(
            f"grant {number}:         {', '.join(grant.principals)}: {', '.join(grant.operations)}"
        )
    print("\n".join(lines))


def _read_policy(path: str) -> dict[str, Any]:
    raw = _read_input(path, MAX_POLICY_FILE_BYTES, f"policy file {path}")
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"policy file {path} is not valid JSON: {error}") from None
    policy_from_json(document)  # refuse a bad document before any call
    if not isinstance(document, dict):
        raise InvalidInputError(f"policy file {path} must hold a JSON object")
    return document


# --- connecting ------------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> KeyClient:
    """A client from --endpoint/--cert/--key/--ca, completed from --cluster (or HSM_CLUSTER)."""
    cluster = getattr(args, "cluster", None) or os.environ.get(CLUSTER_ENV) or None
    endpoints: list[str] = list(getattr(args, "endpoint", None) or [])
    files = [getattr(args, name, None) for name in ("ca", "cert", "key")]
    if any(files) and not all(files):
        raise _UsageError("give all of --ca, --cert and --key, or none (to use --cluster)")
    tls: TlsMaterial | None = None
    if all(files):
        ca, cert, key = (Path(str(f)) for f in files)
        tls = TlsMaterial.from_files(ca, cert, key)
    if cluster is not None and (not endpoints or tls is None):
        cluster_endpoints, cluster_tls = read_cluster(cluster)
        endpoints = endpoints or cluster_endpoints
        tls = tls or cluster_tls
    if not endpoints or tls is None:
        raise _UsageError(
            f"say which domain to use: --cluster DIR (or {CLUSTER_ENV}=DIR) for a local domain, "
            "or --endpoint HOST:PORT (repeatable) with --ca, --cert and --key"
        )
    return KeyClient(
        endpoints,
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=getattr(args, "timeout", None) or 5.0,
    )


# --- commands --------------------------------------------------------------------------------


def _cmd_create_key(args: argparse.Namespace, client: KeyClient) -> int:
    policy = _read_policy(args.policy) if args.policy else None
    metadata = client.create_key(
        description=args.description,
        policy=policy,
        enable_rotation=args.enable_rotation,
        rotation_period_days=args.rotation_period_days,
    )
    if args.json:
        _print_json(metadata.to_json())
    else:
        print(metadata.key_id)
    return 0


def _cmd_describe_key(args: argparse.Namespace, client: KeyClient) -> int:
    _print_metadata(client.describe_key(args.key_id), args.json)
    return 0


def _cmd_list_keys(args: argparse.Namespace, client: KeyClient) -> int:
    if args.json:
        _print_json([m.to_json() for m in client.list_keys(args.page_size)])
        return 0
    for metadata in client.list_keys(args.page_size):
        print(f"{metadata.key_id}  {metadata.state:<16}  {metadata.description}")
    return 0


def _key_admin(method: str) -> Callable[[argparse.Namespace, KeyClient], int]:
    def run(args: argparse.Namespace, client: KeyClient) -> int:
        _print_metadata(getattr(client, method)(args.key_id), args.json)
        return 0

    return run


def _cmd_put_key_policy(args: argparse.Namespace, client: KeyClient) -> int:
    _print_metadata(client.put_key_policy(args.key_id, _read_policy(args.policy)), args.json)
    return 0


def _cmd_schedule_key_deletion(args: argparse.Namespace, client: KeyClient) -> int:
    _print_metadata(client.schedule_key_deletion(args.key_id, args.days), args.json)
    return 0


def _blob_output(args: argparse.Namespace, blob: bytes, what: str) -> None:
    """A ciphertext blob: raw to --out, or base64 in the JSON (with its key id)."""
    key_id = parse_header(blob).key_id
    if args.json:
        document: dict[str, Any] = {"key_id": key_id}
        if args.out == STDIO:
            document["ciphertext_blob"] = _b64(blob)
        else:
            _write_output(args.out, blob, what)
            document["out"] = args.out
        _print_json(document)
    else:
        _write_output(args.out, blob, what)


def _cmd_encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    limit = client.limits.max_plaintext_bytes
    plaintext = _read_input(
        args.input, limit, "the input", "; use envelope-encrypt for larger data"
    )
    blob = client.encrypt(args.key_id, plaintext, args.context)
    _blob_output(args, blob, "the ciphertext blob")
    return 0


def _read_blob(args: argparse.Namespace, client: KeyClient) -> bytes:
    return _read_input(args.input, client.limits.max_message_bytes, "the ciphertext blob")


def _cmd_decrypt(args: argparse.Namespace, client: KeyClient) -> int:
    blob = _read_blob(args, client)
    plaintext = client.decrypt(blob, args.context, key_id=args.key_id)
    if args.json:
        document: dict[str, Any] = {"key_id": parse_header(blob).key_id}
        if args.out == STDIO:
            document["plaintext"] = _b64(plaintext)
        else:
            replace_file(Path(args.out), plaintext, SECRET_MODE)
            document["out"] = args.out
        _print_json(document)
    elif args.out == STDIO:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.buffer.flush()
    else:
        replace_file(Path(args.out), plaintext, SECRET_MODE)
    return 0


def _cmd_re_encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    blob = client.re_encrypt(
        _read_blob(args, client),
        args.destination_key_id,
        source_context=args.source_context,
        destination_context=args.destination_context,
    )
    _blob_output(args, blob, "the ciphertext blob")
    return 0


def _check_generate_data_key(args: argparse.Namespace) -> None:
    if args.without_plaintext and args.out_plaintext:
        raise _UsageError("--without-plaintext and --out-plaintext exclude each other")
    if not args.without_plaintext and not args.out_plaintext:
        raise _UsageError(
            "say where the plaintext data key goes: --out-plaintext FILE (or '-' for a pipe), "
            "or ask for --without-plaintext"
        )
    plaintext_to_stdout = args.out_plaintext == STDIO
    if plaintext_to_stdout and not args.json:
        if sys.stdout.isatty():
            raise _UsageError(
                "refusing to write a plaintext data key to a terminal; use --out-plaintext FILE, "
                "a pipe, or --json to print it base64-encoded on purpose"
            )
        if args.out_ciphertext == STDIO:
            raise _UsageError(
                "the plaintext key and the ciphertext cannot both go to stdout without --json; "
                "give --out-ciphertext FILE"
            )


def _cmd_generate_data_key(args: argparse.Namespace, client: KeyClient) -> int:
    context = args.context
    plaintext_to_stdout = args.out_plaintext == STDIO
    plaintext: bytes | None = None
    if args.without_plaintext:
        blob = client.generate_data_key_without_plaintext(args.key_id, context, args.bytes)
    else:
        plaintext, blob = client.generate_data_key(args.key_id, context, args.bytes)
    try:
        document: dict[str, Any] = {"key_id": parse_header(blob).key_id}
        if plaintext is not None and not plaintext_to_stdout:
            write_new_file(Path(args.out_plaintext), plaintext, SECRET_MODE)
            document["out_plaintext"] = args.out_plaintext
        if args.json:
            if args.out_ciphertext == STDIO:
                document["ciphertext_blob"] = _b64(blob)
            else:
                _write_output(args.out_ciphertext, blob, "the data key's ciphertext blob")
                document["out_ciphertext"] = args.out_ciphertext
            if plaintext is not None and plaintext_to_stdout:
                document["plaintext"] = _b64(plaintext)
            _print_json(document)
            return 0
        _write_output(args.out_ciphertext, blob, "the data key's ciphertext blob")
        if plaintext is not None and plaintext_to_stdout:
            sys.stdout.buffer.write(plaintext)
            sys.stdout.buffer.flush()
    finally:
        del plaintext
    return 0


def _cmd_generate_random(args: argparse.Namespace, client: KeyClient) -> int:
    data = client.generate_random(args.bytes)
    if args.json:
        _print_json({"random": _b64(data)})
    else:
        _write_output(args.out, data, "random output")
    return 0


def _check_envelope_encrypt(args: argparse.Namespace) -> None:
    if args.out == STDIO:
        if args.json:
            raise _UsageError("with --json, give --out FILE (the JSON goes to stdout)")
        _refuse_terminal("the envelope")


def _check_envelope_decrypt(args: argparse.Namespace) -> None:
    if args.out == STDIO and args.json:
        raise _UsageError("with --json, give --out FILE (the JSON goes to stdout)")


def _cmd_envelope_encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    context = args.context
    with _open_input(args.input) as source, _atomic_output(args.out) as out:
        total = encrypt_envelope(
            client, args.key_id, source, out, context, chunk_size=args.chunk_size
        )
    if args.json:
        _print_json({"key_id": args.key_id, "plaintext_bytes": total, "out": args.out})
    return 0


def _cmd_envelope_decrypt(args: argparse.Namespace, client: KeyClient) -> int:
    context = args.context
    with _open_input(args.input) as source:
        if args.out == STDIO:
            try:
                total = decrypt_envelope(
                    client, source, sys.stdout.buffer, context, key_id=args.key_id
                )
            except InvalidCiphertextError:
                sys.stdout.buffer.flush()
                raise InvalidCiphertextError(
                    "invalid ciphertext (plaintext already written to stdout is unconfirmed: "
                    "discard it)"
                ) from None
            sys.stdout.buffer.flush()
        else:
            total = decrypt_envelope(client, source, args.out, context, key_id=args.key_id)
    if args.json:
        _print_json({"plaintext_bytes": total, "out": args.out})
    return 0


# --- parser ----------------------------------------------------------------------------------


def _epilog(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def _whole_number(text: str, minimum: int) -> int:
    """An argument for a uint32 field of the protocol (the service checks the real range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not minimum <= value <= _MAX_U32:
        raise argparse.ArgumentTypeError(f"{text} must be at least {minimum} (and below 2^32)")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _not_negative(text: str) -> int:
    return _whole_number(text, 0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 and at most 3600 seconds")
    return value


def _chunk_size(text: str) -> int:
    value = _positive(text)
    if value > MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"the chunk size is at most {MAX_CHUNK_SIZE}")
    return value


def _connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Where the domain is and who we are; on the main parser and (suppressed) on every
    command, so that they may come before or after the command name."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("domain and identity")
    group.add_argument(
        "--cluster",
        metavar="DIR",
        default=default(None),
        help=f"a local domain directory: its running nodes and demo-app identity "
        f"(default ${CLUSTER_ENV})",
    )
    group.add_argument(
        "--endpoint",
        metavar="HOST:PORT",
        action="append",
        default=default(None),
        help="an HSA of the domain (repeat for each)",
    )
    group.add_argument("--ca", metavar="FILE", default=default(None), help="domain CA (PEM)")
    group.add_argument(
        "--cert", metavar="FILE", default=default(None), help="client certificate (PEM)"
    )
    group.add_argument(
        "--key", metavar="FILE", default=default(None), help="client key (PEM, mode 0600)"
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(5.0),
        help="deadline of each attempt (default 5)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="show the traceback of an error",
    )


def _add_context(parser: argparse.ArgumentParser, flag: str = "--context", what: str = "") -> None:
    parser.add_argument(
        flag,
        metavar="KEY=VALUE",
        type=_context_entry,
        action="extend",
        nargs="+",
        help=f"{what or 'encryption context'} entries (repeatable; split at the first '=')",
    )


def _add_in_out(parser: argparse.ArgumentParser, what_in: str, what_out: str) -> None:
    parser.add_argument(
        "--in", dest="input", metavar="FILE", default=STDIO, help=f"{what_in} ('-': stdin)"
    )
    parser.add_argument(
        "--out", metavar="FILE", default=STDIO, help=f"{what_out} ('-': stdout, the default)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The `hsm-kms` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create and use customer keys of an HSM domain's key service.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(
            """
            Example:
              export HSM_CLUSTER=./demo          # a domain started with hsm-domain up ./demo
              KEY=$(hsm-kms create-key --description "orders")
              echo -n secret | hsm-kms encrypt --key-id $KEY --context app=orders --out s.bin
              hsm-kms decrypt --in s.bin --context app=orders
            """
        ),
    )
    _connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str,
        help_text: str,
        example: str,
        handler: Callable[[argparse.Namespace, KeyClient], int],
        check: Callable[[argparse.Namespace], None] | None = None,
        binary_output: str | None = None,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="Example:\n" + textwrap.indent(_epilog(example), "  "),
        )
        p.set_defaults(handler=handler, check=check, binary_output=binary_output)
        return p

    def key_id(p: argparse.ArgumentParser) -> None:
        p.add_argument("key_id", metavar="KEY_ID", help="the key's id")

    operations = ", ".join(OPERATION_NAMES)
    p = command(
        "create-key",
        "create a customer key; prints its id",
        """
          hsm-kms create-key --description "orders database" --enable-rotation
          hsm-kms create-key --policy policy.json --json | jq -r .key_id
        """,
        _cmd_create_key,
    )
    p.add_argument("--description", default="", help="free text")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help=f"key policy JSON ('-': stdin); operations: {operations}. "
        "Default: the creator may do everything",
    )
    p.add_argument("--enable-rotation", action="store_true", help="rotate the key yearly")
    p.add_argument(
        "--rotation-period-days",
        type=_not_negative,
        default=0,
        metavar="N",
        help="rotation period (90 to 2560; default 365)",
    )

    p = command(
        "describe-key",
        "show a key's metadata and policy",
        "  hsm-kms describe-key 1b4e28ba-2fa1-41d2-883f-0016d3cca427 --json",
        _cmd_describe_key,
    )
    key_id(p)

    p = command(
        "list-keys",
        "list the keys: id, state, description",
        "  hsm-kms list-keys --json | jq -r '.[].key_id'",
        _cmd_list_keys,
    )
    p.add_argument(
        "--page-size", type=_positive, default=100, metavar="N", help="keys per call (default 100)"
    )

    p = command(
        "encrypt",
        "encrypt up to 4 KiB under a key (larger data: envelope-encrypt)",
        """
          echo -n 's3cret' | hsm-kms encrypt --key-id $KEY --context app=orders --out s.bin
          hsm-kms encrypt --key-id $KEY --in token.txt --json
        """,
        _cmd_encrypt,
        binary_output="out",
    )
    p.add_argument("--key-id", required=True, help="the key to encrypt under")
    _add_in_out(p, "plaintext", "ciphertext blob")
    _add_context(p)

    p = command(
        "decrypt",
        "decrypt a ciphertext blob (it names its key); give the same context as to encrypt",
        """
          hsm-kms decrypt --in s.bin --context app=orders
          hsm-kms decrypt --in s.bin --context app=orders --json | jq -r .plaintext | base64 -d
        """,
        _cmd_decrypt,
    )
    _add_in_out(p, "ciphertext blob", "plaintext")
    _add_context(p)
    p.add_argument("--key-id", help="refuse a blob of any other key")

    p = command(
        "re-encrypt",
        "re-encrypt a blob under another key or context, without the plaintext leaving the HSA",
        """
          hsm-kms re-encrypt --in s.bin --destination-key-id $NEW --source-context app=orders \\
              --destination-context app=billing --out s2.bin
        """,
        _cmd_re_encrypt,
        binary_output="out",
    )
    p.add_argument("--destination-key-id", required=True, help="the key to encrypt under")
    _add_in_out(p, "ciphertext blob", "new ciphertext blob")
    _add_context(p, "--source-context", "the blob's encryption context")
    _add_context(p, "--destination-context", "the new blob's encryption context")

    p = command(
        "generate-data-key",
        "make a data key for local encryption: its plaintext and its blob under a key",
        """
          hsm-kms generate-data-key --key-id $KEY --out-plaintext dk.key --out-ciphertext dk.bin
          hsm-kms generate-data-key --key-id $KEY --without-plaintext --out-ciphertext dk.bin
        A plaintext data key is never written to a terminal (--out-plaintext - needs a pipe,
        or --json to print it base64-encoded on purpose); a key file is created 0600 and never
        overwrites an existing one.
        """,
        _cmd_generate_data_key,
        _check_generate_data_key,
        binary_output="out_ciphertext",
    )
    p.add_argument("--key-id", required=True, help="the key that encrypts the data key")
    p.add_argument("--without-plaintext", action="store_true", help="only the encrypted key")
    p.add_argument("--out-plaintext", metavar="FILE", help="new file for the plaintext key")
    p.add_argument(
        "--out-ciphertext",
        metavar="FILE",
        default=STDIO,
        help="file for the encrypted key ('-': stdout, the default)",
    )
    p.add_argument(
        "--bytes", type=_positive, default=32, metavar="N", help="key length (default 32)"
    )
    _add_context(p)

    p = command(
        "generate-random",
        "random bytes from an HSA's generator",
        "  hsm-kms generate-random --bytes 32 --json",
        _cmd_generate_random,
        binary_output="out",
    )
    p.add_argument("--bytes", type=_positive, default=32, metavar="N", help="1 to 1024")
    p.add_argument("--out", metavar="FILE", default=STDIO, help="('-': stdout, the default)")

    for name, method, text in (
        ("rotate-key", "rotate_key", "add a backing key version (old ciphertexts keep working)"),
        ("enable-key", "enable_key", "enable a disabled key"),
        ("disable-key", "disable_key", "disable a key: every cryptographic call is refused"),
        ("cancel-key-deletion", "cancel_key_deletion", "cancel a scheduled deletion"),
    ):
        p = command(name, text, f"  hsm-kms {name} $KEY", _key_admin(method))
        key_id(p)

    p = command(
        "put-key-policy",
        "replace a key's policy (it must keep an admin)",
        """
          hsm-kms put-key-policy $KEY --policy policy.json
        with policy.json:
          {"grants": [{"principals": ["spiffe://local/client/demo-app"],
                       "operations": ["encrypt", "decrypt", "describe", "admin"]}]}
        """,
        _cmd_put_key_policy,
    )
    key_id(p)
    p.add_argument("--policy", metavar="FILE", required=True, help="key policy JSON ('-': stdin)")

    p = command(
        "schedule-key-deletion",
        "delete a key after a waiting period (cancel-key-deletion undoes it meanwhile)",
        "  hsm-kms schedule-key-deletion $KEY --days 7",
        _cmd_schedule_key_deletion,
    )
    key_id(p)
    p.add_argument(
        "--days",
        type=_positive,
        default=30,
        metavar="N",
        help="waiting period, 7 to 30 (default 30)",
    )

    p = command(
        "envelope-encrypt",
        "encrypt data of any size: a data key from the service, AES-256-GCM here, streamed",
        """
          hsm-kms envelope-encrypt --key-id $KEY --in backup.tar --out backup.tar.hsme \\
              --context backup=nightly
        """,
        _cmd_envelope_encrypt,
        _check_envelope_encrypt,
    )
    p.add_argument("--key-id", required=True, help="the key that encrypts the data key")
    _add_in_out(p, "plaintext", "envelope, written whole or not at all")
    _add_context(p)
    p.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=envelope.DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"plaintext bytes per chunk (default {envelope.DEFAULT_CHUNK_SIZE})",
    )

    p = command(
        "envelope-decrypt",
        "decrypt an envelope, streamed; a file output appears only once all of it verified",
        """
          hsm-kms envelope-decrypt --in backup.tar.hsme --out backup.tar --context backup=nightly
        To stdout, plaintext is released chunk by chunk as it verifies: if the command then
        fails (exit 1), discard what it wrote.
        """,
        _cmd_envelope_decrypt,
        _check_envelope_decrypt,
    )
    _add_in_out(p, "envelope", "plaintext")
    _add_context(p, what="expected encryption context (default: the one in the envelope)")
    p.add_argument("--key-id", help="refuse an envelope of any other key")
    return parser


# --- main ------------------------------------------------------------------------------------


def _check_usage(args: argparse.Namespace) -> None:
    """Everything about the arguments that argparse cannot check, before any connection."""
    for name in _CONTEXT_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, _context(getattr(args, name)))
    if args.check is not None:
        args.check(args)
    if args.binary_output and getattr(args, args.binary_output) == STDIO and not args.json:
        _refuse_terminal("the output", "--" + args.binary_output.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `hsm-kms` command; return the exit status."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as error:
        return exit_code(error)
    verbose = bool(getattr(args, "verbose", False))
    handler: Callable[[argparse.Namespace, KeyClient], int] = args.handler
    try:
        _check_usage(args)
        with _connect(args) as client:
            return handler(args, client)
    except _UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return quiet_broken_pipe()  # the reader went away (e.g. `| head`)
    except (HsmDomainError, OSError) as error:
        print_error(PROG, error, verbose=verbose, with_status=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
