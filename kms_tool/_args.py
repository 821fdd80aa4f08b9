"""The arguments of `hsm-kms`: encryption contexts, numbers, the domain and the identity.

Invariants: an encryption context is `key=value` entries, split at the first '=', keys and
values non-empty, no key twice; every number goes through a type that names what is wrong;
the options saying where the domain is, who we are and which grant tokens every call carries
(`shared_options`) may come before or after the command name, and a client is made only from
all of --ca, --cert and --key or from a local domain directory (`connect`), never from a mix
that could pair the wrong files.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from domain_core import keyspecs
from domain_core.limits import MAX_CHUNK_SIZE, MAX_GRANT_TOKENS
from domain_edge.cli import UsageError
from domain_edge.kms_client import KeyClient, read_cluster
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2
from kms_tool._io import STDIO

__all__ = [
    "CLUSTER_ENV",
    "CONTEXT_OPTIONS",
    "ENCRYPTION_ALGORITHMS",
    "KEY_PAIR_SPECS",
    "KEY_SPECS",
    "KEY_USAGES",
    "MAC_ALGORITHMS",
    "SIGNING_ALGORITHMS",
    "add_choice",
    "add_context",
    "add_in_out",
    "chunk_size",
    "connect",
    "context",
    "not_negative",
    "parse_context",
    "positive",
    "shared_options",
]

CLUSTER_ENV: Final = "HSM_CLUSTER"
_MAX_U32: Final = 0xFFFFFFFF
# Options holding encryption contexts: lists of (key, value) pairs, made dicts before use
# (a grant's constraints are encryption contexts too).
CONTEXT_OPTIONS: Final = (
    "context",
    "source_context",
    "destination_context",
    "constraint_equals",
    "constraint_subset",
    "tag",
)


def _names(enum: EnumTypeWrapper, prefix: str) -> tuple[str, ...]:
    """AWS KMS's names of a proto enum's values: its names less `prefix`, UNSPECIFIED left out."""
    names = (name for name, _ in enum.items() if name != prefix + "UNSPECIFIED")
    return tuple(name.removeprefix(prefix) for name in names)


# The names the key spec options take, from the enums (as `domain_core.keyspecs` names them).
KEY_SPECS: Final = _names(keys_pb2.KeySpec, "KEY_SPEC_")
KEY_USAGES: Final = _names(keys_pb2.KeyUsage, "KEY_USAGE_")
SIGNING_ALGORITHMS: Final = _names(keys_pb2.SigningAlgorithm, "SIGNING_ALGORITHM_")
ENCRYPTION_ALGORITHMS: Final = _names(keys_pb2.EncryptionAlgorithm, "ENCRYPTION_ALGORITHM_")
MAC_ALGORITHMS: Final = _names(keys_pb2.MacAlgorithm, "MAC_ALGORITHM_")
KEY_PAIR_SPECS: Final = tuple(keyspecs.spec_name(spec) for spec in keyspecs.DATA_KEY_PAIR_SPECS)


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


def context(entries: Sequence[tuple[str, str]] | None) -> dict[str, str] | None:
    """The context from parsed entries (None when none were given); a key given twice fails."""
    if not entries:
        return None
    context: dict[str, str] = {}
    for key, value in entries:
        if key in context:
            raise UsageError(f"context key {key[:80]!r} is given twice")
        context[key] = value
    return context


def parse_context(items: Sequence[str]) -> dict[str, str]:
    """`["k=v", ...]` as a context: split at the first '=', keys and values non-empty, no key
    twice. ValueError says what is wrong."""
    try:
        return context([_context_entry(item) for item in items]) or {}
    except (argparse.ArgumentTypeError, UsageError) as error:
        raise ValueError(str(error)) from None


def _whole_number(text: str, minimum: int) -> int:
    """An argument for a uint32 field of the protocol (the service checks the real range)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not minimum <= value <= _MAX_U32:
        raise argparse.ArgumentTypeError(f"{text} must be at least {minimum} (and below 2^32)")
    return value


def positive(text: str) -> int:
    """A whole number of at least 1 (a uint32 field)."""
    return _whole_number(text, 1)


def not_negative(text: str) -> int:
    """A whole number of at least 0 (a uint32 field)."""
    return _whole_number(text, 0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 and at most 3600 seconds")
    return value


def chunk_size(text: str) -> int:
    """An envelope's plaintext bytes per chunk."""
    value = positive(text)
    if value > MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"the chunk size is at most {MAX_CHUNK_SIZE}")
    return value


def shared_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
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
        "--grant-token",
        metavar="FILE",
        action="append",
        default=default(None),
        help=f"a grant token create-grant wrote (mode 0600; repeatable, at most "
        f"{MAX_GRANT_TOKENS}): every call carries it, so the grant works on every HSA before "
        "it reached them all",
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


def add_context(parser: argparse.ArgumentParser, flag: str = "--context", what: str = "") -> None:
    """An encryption context option (repeatable `KEY=VALUE` entries)."""
    parser.add_argument(
        flag,
        metavar="KEY=VALUE",
        type=_context_entry,
        action="extend",
        nargs="+",
        help=f"{what or 'encryption context'} entries (repeatable; split at the first '=')",
    )


def add_choice(
    parser: argparse.ArgumentParser,
    flag: str,
    choices: Sequence[str],
    what: str,
    default: str | None = None,
    required: bool = False,
    note: str = "",
) -> None:
    """An option taking one of AWS KMS's names (`choices`), all of them listed in its help
    (then `note`)."""
    suffix = (f"; default {default}" if default else "") + note
    parser.add_argument(
        flag,
        choices=choices,
        default=default,
        required=required,
        metavar=flag.removeprefix("--").split("-")[-1].upper(),
        help=f"{what}: {', '.join(choices)}{suffix}",
    )


def add_in_out(parser: argparse.ArgumentParser, what_in: str, what_out: str) -> None:
    """--in and --out, each a file or '-' (stdin, stdout)."""
    parser.add_argument(
        "--in", dest="input", metavar="FILE", default=STDIO, help=f"{what_in} ('-': stdin)"
    )
    parser.add_argument(
        "--out", metavar="FILE", default=STDIO, help=f"{what_out} ('-': stdout, the default)"
    )


def connect(args: argparse.Namespace) -> KeyClient:
    """A client from --endpoint/--cert/--key/--ca, completed from --cluster (or HSM_CLUSTER)."""
    cluster = getattr(args, "cluster", None) or os.environ.get(CLUSTER_ENV) or None
    endpoints: list[str] = list(getattr(args, "endpoint", None) or [])
    files = [getattr(args, name, None) for name in ("ca", "cert", "key")]
    if any(files) and not all(files):
        raise UsageError("give all of --ca, --cert and --key, or none (to use --cluster)")
    tls: TlsMaterial | None = None
    if all(files):
        ca, cert, key = (Path(str(f)) for f in files)
        tls = TlsMaterial.from_files(ca, cert, key)
    if cluster is not None and (not endpoints or tls is None):
        cluster_endpoints, cluster_tls = read_cluster(cluster)
        endpoints = endpoints or cluster_endpoints
        tls = tls or cluster_tls
    if not endpoints or tls is None:
        raise UsageError(
            f"say which domain to use: --cluster DIR (or {CLUSTER_ENV}=DIR) for a local domain, "
            "or --endpoint HOST:PORT (repeatable) with --ca, --cert and --key"
        )
    return KeyClient(
        endpoints,
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=getattr(args, "timeout", None) or 5.0,
        # A command makes one or two calls: unary calls suit it (a session stream is for
        # many concurrent calls), and no stream is left to end when the process exits.
        sessions=False,
    )
