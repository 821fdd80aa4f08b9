"""What each `hsm-kms` command does once its arguments are checked and a client is made.

Invariants kept here (see also `kms_tool._io`):
- a plaintext data key is never written to a terminal: `generate-data-key` refuses
  `--out-plaintext -` when stdout is a terminal, unless `--json` asked for it to be printed;
  a data key file is created 0600 and never overwrites an existing file;
- decrypted data reaches a file only once it verified (whole file, atomic rename); on stdout
  an envelope's plaintext is released chunk by chunk as it verifies, and a later failure
  says to discard what was written;
- plaintext and keys never appear in a message (encryption context values may: they are
  not secret, they are authenticated data);
- an RSA-OAEP ciphertext (`--encryption-algorithm RSAES_OAEP_*`) names no key and binds no
  context: its key id comes from --key-id, and --context is refused with it before any call.

The commands of keys other than symmetric encryption keys (sign, MACs, data key pairs) are in
`kms_tool._spec_commands`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from domain_core import keyspecs
from domain_core.ciphertext import parse_header
from domain_core.errors import InvalidCiphertextError, InvalidInputError
from domain_edge.cli import UsageError
from domain_edge.files import SECRET_MODE, replace_file, write_new_file
from domain_edge.kms_client import KeyClient, decrypt_envelope, encrypt_envelope
from kms_tool._io import (
    STDIO,
    atomic_output,
    b64,
    open_input,
    print_document,
    print_metadata,
    read_input,
    read_policy,
    refuse_terminal,
    write_output,
)

__all__ = [
    "Handler",
    "check_create_key",
    "check_decrypt",
    "check_encrypt",
    "check_envelope_decrypt",
    "check_envelope_encrypt",
    "check_generate_data_key",
    "create_key",
    "decrypt",
    "describe_key",
    "encrypt",
    "envelope_decrypt",
    "envelope_encrypt",
    "generate_data_key",
    "generate_random",
    "key_admin",
    "list_keys",
    "list_resource_tags",
    "put_key_policy",
    "re_encrypt",
    "schedule_key_deletion",
    "tag_resource",
    "untag_resource",
]

Handler = Callable[[argparse.Namespace, KeyClient], int]


def check_create_key(args: argparse.Namespace) -> None:
    """A key spec and usage AWS KMS pairs, and rotation only for a symmetric key."""
    spec = keyspecs.spec_from_name(args.key_spec)
    try:
        keyspecs.check_spec_usage(spec, keyspecs.usage_from_name(args.key_usage))
    except InvalidInputError as error:
        raise UsageError(f"{error.message} (--key-usage)") from None
    if args.enable_rotation and not keyspecs.is_symmetric(spec):
        raise UsageError(
            f"only SYMMETRIC_DEFAULT keys rotate; a {args.key_spec} key keeps its material for "
            "life: leave out --enable-rotation"
        )
    if args.enable_rotation and args.origin == "EXTERNAL":
        raise UsageError("keys of imported material do not rotate: leave out --enable-rotation")


def create_key(args: argparse.Namespace, client: KeyClient) -> int:
    """`create-key`: print the new key's id (or its metadata under --json)."""
    policy = read_policy(args.policy) if args.policy else None
    metadata = client.create_key(
        description=args.description,
        policy=policy,
        enable_rotation=args.enable_rotation,
        rotation_period_days=args.rotation_period_days,
        idempotency_key=args.idempotency_key,
        origin=args.origin,
        tags=args.tag,
        key_spec=args.key_spec,
        key_usage=args.key_usage,
    )
    if args.json:
        print_document(metadata.to_json())
    else:
        print(metadata.key_id)
    return 0


def describe_key(args: argparse.Namespace, client: KeyClient) -> int:
    """`describe-key`: a key's metadata and policy."""
    print_metadata(client.describe_key(args.key_id), args.json)
    return 0


def list_keys(args: argparse.Namespace, client: KeyClient) -> int:
    """`list-keys`: one line per key (id, state, description)."""
    if args.json:
        print_document([m.to_json() for m in client.list_keys(args.page_size)])
        return 0
    for metadata in client.list_keys(args.page_size):
        print(f"{metadata.key_id}  {metadata.state:<16}  {metadata.description}")
    return 0


def key_admin(method: str) -> Handler:
    """A command that calls `client.<method>(key_id)` and prints the key's metadata."""

    def run(args: argparse.Namespace, client: KeyClient) -> int:
        print_metadata(getattr(client, method)(args.key_id), args.json)
        return 0

    return run


def tag_resource(args: argparse.Namespace, client: KeyClient) -> int:
    """`tag-resource`: the key's metadata after tagging."""
    if not args.tag:
        raise UsageError("give at least one --tag KEY=VALUE")
    print_metadata(client.tag_resource(args.key_id, args.tag), args.json)
    return 0


def untag_resource(args: argparse.Namespace, client: KeyClient) -> int:
    """`untag-resource`: the key's metadata after removing the tags."""
    print_metadata(client.untag_resource(args.key_id, args.tag_key), args.json)
    return 0


def list_resource_tags(args: argparse.Namespace, client: KeyClient) -> int:
    """`list-resource-tags`: KEY=VALUE per line, or a JSON object."""
    tags = client.list_resource_tags(args.key_id)
    if args.json:
        print_document(tags)
    else:
        for key in sorted(tags):
            print(f"{key}={tags[key]}")
    return 0


def put_key_policy(args: argparse.Namespace, client: KeyClient) -> int:
    """`put-key-policy`: replace a key's policy; its metadata afterwards."""
    print_metadata(client.put_key_policy(args.key_id, read_policy(args.policy)), args.json)
    return 0


def schedule_key_deletion(args: argparse.Namespace, client: KeyClient) -> int:
    """`schedule-key-deletion`: the key's metadata with its deletion date."""
    print_metadata(client.schedule_key_deletion(args.key_id, args.days), args.json)
    return 0


def _rsa(args: argparse.Namespace) -> bool:
    """Whether the command encrypts or decrypts with RSA-OAEP (not the symmetric default)."""
    return getattr(args, "encryption_algorithm", None) not in (None, "SYMMETRIC_DEFAULT")


def _key_id_of(args: argparse.Namespace, blob: bytes) -> str:
    """The key of a blob: its header's, or --key-id's for an RSA ciphertext (no header)."""
    return str(args.key_id) if _rsa(args) else parse_header(blob).key_id


def _check_rsa(args: argparse.Namespace) -> None:
    if _rsa(args) and args.context:
        raise UsageError(
            f"{args.encryption_algorithm} takes no --context (RSA-OAEP binds none); leave it "
            "out, or use a symmetric key"
        )


def check_encrypt(args: argparse.Namespace) -> None:
    """An RSA-OAEP encryption takes no context."""
    _check_rsa(args)


def check_decrypt(args: argparse.Namespace) -> None:
    """An RSA-OAEP ciphertext takes no context and needs --key-id (it names no key)."""
    _check_rsa(args)
    if _rsa(args) and not args.key_id:
        raise UsageError(
            f"decrypting with {args.encryption_algorithm} needs --key-id: an RSA ciphertext "
            "does not name its key"
        )


def _blob_output(args: argparse.Namespace, blob: bytes, what: str) -> None:
    """A ciphertext blob: raw to --out, or base64 in the JSON (with its key id, and the
    encryption algorithm when one was given)."""
    key_id = _key_id_of(args, blob)
    if args.json:
        document: dict[str, Any] = {"key_id": key_id}
        if getattr(args, "encryption_algorithm", None):
            document["encryption_algorithm"] = args.encryption_algorithm
        if args.out == STDIO:
            document["ciphertext_blob"] = b64(blob)
        else:
            write_output(args.out, blob, what)
            document["out"] = args.out
        print_document(document)
    else:
        write_output(args.out, blob, what)


def encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    """`encrypt`: a ciphertext blob of at most 4 KiB of plaintext."""
    limit = client.limits.max_plaintext_bytes
    plaintext = read_input(args.input, limit, "the input", "; use envelope-encrypt for larger data")
    blob = client.encrypt(
        args.key_id, plaintext, args.context, encryption_algorithm=args.encryption_algorithm
    )
    _blob_output(args, blob, "the ciphertext blob")
    return 0


def _read_blob(args: argparse.Namespace, client: KeyClient) -> bytes:
    return read_input(args.input, client.limits.max_message_bytes, "the ciphertext blob")


def decrypt(args: argparse.Namespace, client: KeyClient) -> int:
    """`decrypt`: the plaintext of a blob (raw, to a file, or base64 under --json)."""
    blob = _read_blob(args, client)
    plaintext = client.decrypt(
        blob, args.context, key_id=args.key_id, encryption_algorithm=args.encryption_algorithm
    )
    if args.json:
        document: dict[str, Any] = {"key_id": _key_id_of(args, blob)}
        if args.out == STDIO:
            document["plaintext"] = b64(plaintext)
        else:
            replace_file(Path(args.out), plaintext, SECRET_MODE)
            document["out"] = args.out
        print_document(document)
    elif args.out == STDIO:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.buffer.flush()
    else:
        replace_file(Path(args.out), plaintext, SECRET_MODE)
    return 0


def re_encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    """`re-encrypt`: a blob under another key or context, plaintext never here."""
    blob = client.re_encrypt(
        _read_blob(args, client),
        args.destination_key_id,
        source_context=args.source_context,
        destination_context=args.destination_context,
    )
    _blob_output(args, blob, "the ciphertext blob")
    return 0


def check_generate_data_key(args: argparse.Namespace) -> None:
    """Where the plaintext key may go, checked before any call."""
    if args.without_plaintext and args.out_plaintext:
        raise UsageError("--without-plaintext and --out-plaintext exclude each other")
    if not args.without_plaintext and not args.out_plaintext:
        raise UsageError(
            "say where the plaintext data key goes: --out-plaintext FILE (or '-' for a pipe), "
            "or ask for --without-plaintext"
        )
    plaintext_to_stdout = args.out_plaintext == STDIO
    if plaintext_to_stdout and not args.json:
        if sys.stdout.isatty():
            raise UsageError(
                "refusing to write a plaintext data key to a terminal; use --out-plaintext FILE, "
                "a pipe, or --json to print it base64-encoded on purpose"
            )
        if args.out_ciphertext == STDIO:
            raise UsageError(
                "the plaintext key and the ciphertext cannot both go to stdout without --json; "
                "give --out-ciphertext FILE"
            )


def generate_data_key(args: argparse.Namespace, client: KeyClient) -> int:
    """`generate-data-key`: a data key's plaintext (never to a terminal) and blob."""
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
                document["ciphertext_blob"] = b64(blob)
            else:
                write_output(args.out_ciphertext, blob, "the data key's ciphertext blob")
                document["out_ciphertext"] = args.out_ciphertext
            if plaintext is not None and plaintext_to_stdout:
                document["plaintext"] = b64(plaintext)
            print_document(document)
            return 0
        write_output(args.out_ciphertext, blob, "the data key's ciphertext blob")
        if plaintext is not None and plaintext_to_stdout:
            sys.stdout.buffer.write(plaintext)
            sys.stdout.buffer.flush()
    finally:
        del plaintext
    return 0


def generate_random(args: argparse.Namespace, client: KeyClient) -> int:
    """`generate-random`: bytes from an HSA's generator."""
    data = client.generate_random(args.bytes)
    if args.json:
        print_document({"random": b64(data)})
    else:
        write_output(args.out, data, "random output")
    return 0


def check_envelope_encrypt(args: argparse.Namespace) -> None:
    """An envelope is binary: a file or a pipe, and not beside --json."""
    if args.out == STDIO:
        if args.json:
            raise UsageError("with --json, give --out FILE (the JSON goes to stdout)")
        refuse_terminal("the envelope")


def check_envelope_decrypt(args: argparse.Namespace) -> None:
    """With --json on stdout the plaintext needs a file."""
    if args.out == STDIO and args.json:
        raise UsageError("with --json, give --out FILE (the JSON goes to stdout)")


def envelope_encrypt(args: argparse.Namespace, client: KeyClient) -> int:
    """`envelope-encrypt`: any amount of data, streamed, under a data key."""
    context = args.context
    with open_input(args.input) as source, atomic_output(args.out) as out:
        total = encrypt_envelope(
            client, args.key_id, source, out, context, chunk_size=args.chunk_size
        )
    if args.json:
        print_document({"key_id": args.key_id, "plaintext_bytes": total, "out": args.out})
    return 0


def envelope_decrypt(args: argparse.Namespace, client: KeyClient) -> int:
    """`envelope-decrypt`: an envelope's plaintext, streamed (see the module)."""
    context = args.context
    with open_input(args.input) as source:
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
        print_document({"plaintext_bytes": total, "out": args.out})
    return 0
