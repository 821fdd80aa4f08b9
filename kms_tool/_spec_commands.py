"""What the `hsm-kms` commands of keys other than symmetric encryption keys do: sign and verify
(RSA and ECC keys), get-public-key, generate-mac and verify-mac (HMAC keys), and
generate-data-key-pair, and import-key-material (keys of origin EXTERNAL); docs/kms-client.md
"Key specs and usages" and "Importing key material".

Invariants kept here (beside those of `kms_tool._commands` and `kms_tool._io`):
- a message to sign or MAC is 1 to 4096 bytes, and a longer one is a usage error before any
  call (for a signature its digest, with --digest, is what to send instead);
- a signature or MAC that does not verify is the service's answer, not an exception: exit
  status 1 with one line on stderr (under --json the document says false as well);
- key material to import is read from a file or a pipe, never a terminal, and leaves this
  process only wrapped under the domain's wrapping key;
- a data key pair's private key is never written to a terminal: it goes to a new 0600 file
  that never overwrites an existing one, to a pipe, or (asked for with --json) into the JSON
  document; the outputs go to distinct places, at most one of them to stdout without --json,
  all checked before any call.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from domain_core.keytokens import MAX_KEY_MATERIAL_BYTES
from domain_edge.cli import EXIT_FAILED, EXIT_OK, UsageError
from domain_edge.files import SECRET_MODE, write_new_file
from domain_edge.kms_client import DataKeyPair, KeyClient
from kms_tool._io import (
    STDIO,
    b64,
    pem_public_key,
    print_document,
    print_failure,
    print_metadata,
    read_input,
    read_message,
    refuse_terminal,
    write_output,
)

__all__ = [
    "check_generate_data_key_pair",
    "check_get_public_key",
    "check_import_key_material",
    "check_verify",
    "check_verify_mac",
    "generate_data_key_pair",
    "generate_mac",
    "get_public_key",
    "import_key_material",
    "sign",
    "verify",
    "verify_mac",
]

# A data key pair's outputs: (attribute, option, JSON field when in the document, what it is).
_PAIR_OUTPUTS = (
    ("out_private_key", "--out-private-key", "private_key_plaintext", "the private key"),
    (
        "out_private_key_ciphertext",
        "--out-private-key-ciphertext",
        "private_key_ciphertext_blob",
        "the private key's ciphertext blob",
    ),
    ("out_public_key", "--out-public-key", "public_key", "the public key"),
)


def _binary_result(
    args: argparse.Namespace, document: dict[str, Any], field: str, data: bytes, what: str
) -> None:
    """A binary result: raw to --out, or in the JSON document (base64, or the file it went
    to)."""
    if not args.json:
        write_output(args.out, data, what)
        return
    if args.out == STDIO:
        document[field] = b64(data)
    else:
        write_output(args.out, data, what)
        document["out"] = args.out
    print_document(document)


def _verdict(args: argparse.Namespace, valid: bool, field: str, what: str) -> int:
    """Print whether a signature or MAC verified; exit status 1 (one line) when it did not."""
    if args.json:
        print_document({"key_id": args.key_id, field: valid})
    elif valid:
        print("valid")
    if valid:
        return EXIT_OK
    print_failure(f"{what} is not valid")
    return EXIT_FAILED


def _one_stdin(args: argparse.Namespace, name: str) -> None:
    if args.input == STDIO and getattr(args, name) == STDIO:
        raise UsageError(
            f"the message and the {name} cannot both come from stdin: give --in FILE or "
            f"--{name} FILE"
        )


# --- sign and verify ---------------------------------------------------------------------


def _signed_message(args: argparse.Namespace) -> bytes:
    """The message (or digest, with --digest) to sign or verify."""
    bits = args.signing_algorithm[-3:]
    hint = (
        ""
        if args.digest
        else f"; sign its SHA-{bits} digest instead, with --digest "
        f"(openssl dgst -sha{bits} -binary FILE gives it)"
    )
    return read_message(args.input, hint)


def sign(args: argparse.Namespace, client: KeyClient) -> int:
    """`sign`: the signature of a message (or of its digest): raw to --out, or base64 in the
    JSON."""
    signature = client.sign(
        args.key_id, _signed_message(args), args.signing_algorithm, digest=args.digest
    )
    document = {"key_id": args.key_id, "signing_algorithm": args.signing_algorithm}
    _binary_result(args, document, "signature", signature, "the signature")
    return EXIT_OK


def check_verify(args: argparse.Namespace) -> None:
    """The message and the signature cannot both be stdin."""
    _one_stdin(args, "signature")


def verify(args: argparse.Namespace, client: KeyClient) -> int:
    """`verify`: "valid" (exit 0), or "signature is not valid" on stderr (exit 1)."""
    message = _signed_message(args)
    signature = read_input(args.signature, client.limits.max_asymmetric_blob_bytes, "the signature")
    valid = client.verify(
        args.key_id, message, signature, args.signing_algorithm, digest=args.digest
    )
    return _verdict(args, valid, "signature_valid", "signature")


# --- public keys ---------------------------------------------------------------------------


def check_get_public_key(args: argparse.Namespace) -> None:
    """A DER public key is binary: not to a terminal."""
    if args.format == "der" and args.out == STDIO and not args.json:
        refuse_terminal("a DER public key")


def get_public_key(args: argparse.Namespace, client: KeyClient) -> int:
    """`get-public-key`: an RSA or ECC key's public key, PEM or DER; under --json base64 DER
    with the key's spec, usage and algorithms."""
    public = client.get_public_key(args.key_id)
    data = public.public_key if args.format == "der" else pem_public_key(public.public_key)
    if args.out != STDIO:
        write_output(args.out, data, "the public key")
    if args.json:
        document: dict[str, Any] = {
            "key_id": public.key_id,
            "public_key": b64(public.public_key),
            "key_spec": public.key_spec,
            "key_usage": public.key_usage,
            "signing_algorithms": list(public.signing_algorithms),
            "encryption_algorithms": list(public.encryption_algorithms),
        }
        if args.out != STDIO:
            document["out"] = args.out
        print_document(document)
    elif args.out == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return EXIT_OK


# --- MACs ------------------------------------------------------------------------------------


def generate_mac(args: argparse.Namespace, client: KeyClient) -> int:
    """`generate-mac`: the HMAC of a message: raw to --out, or base64 in the JSON."""
    mac = client.generate_mac(args.key_id, read_message(args.input), args.mac_algorithm)
    document = {"key_id": args.key_id, "mac_algorithm": args.mac_algorithm}
    _binary_result(args, document, "mac", mac, "the MAC")
    return EXIT_OK


def check_verify_mac(args: argparse.Namespace) -> None:
    """The message and the MAC cannot both be stdin."""
    _one_stdin(args, "mac")


def verify_mac(args: argparse.Namespace, client: KeyClient) -> int:
    """`verify-mac`: "valid" (exit 0), or "MAC is not valid" on stderr (exit 1)."""
    message = read_message(args.input)
    mac = read_input(args.mac, client.limits.max_asymmetric_blob_bytes, "the MAC")
    valid = client.verify_mac(args.key_id, message, mac, args.mac_algorithm)
    return _verdict(args, valid, "mac_valid", "MAC")


# --- data key pairs ------------------------------------------------------------------------


def check_generate_data_key_pair(args: argparse.Namespace) -> None:
    """Where the private key and the other outputs may go, checked before any call."""
    if args.without_plaintext and args.out_private_key:
        raise UsageError("--without-plaintext and --out-private-key exclude each other")
    if not args.without_plaintext and not args.out_private_key:
        raise UsageError(
            "say where the private key goes: --out-private-key FILE (or '-' for a pipe), or ask "
            "for --without-plaintext"
        )
    given = {option: getattr(args, name) for name, option, _, _ in _PAIR_OUTPUTS}
    files = [os.path.abspath(path) for path in given.values() if path and path != STDIO]
    if len(set(files)) != len(files):
        raise UsageError("give each output its own file")
    if args.json:
        return
    to_stdout = [option for option, path in given.items() if path == STDIO]
    if len(to_stdout) > 1:
        raise UsageError(
            f"{' and '.join(to_stdout)} cannot share stdout without --json; give FILEs "
            "(--out-private-key-ciphertext is stdout by default)"
        )
    if args.out_private_key == STDIO and sys.stdout.isatty():
        raise UsageError(
            "refusing to write a private key to a terminal; use --out-private-key FILE, a pipe, "
            "or --json to print it base64-encoded on purpose"
        )
    for option in to_stdout:
        refuse_terminal("the output", option)


def _pair_output(
    args: argparse.Namespace, document: dict[str, Any], output: int, data: bytes
) -> None:
    """One output of a data key pair (not the private key to a file): to its file or stdout,
    or in the JSON document when it goes to stdout (or nowhere) under --json."""
    name, _, field, what = _PAIR_OUTPUTS[output]
    path: str | None = getattr(args, name)
    if args.json and path in (None, STDIO):
        document[field] = b64(data)
    elif path is not None:
        write_output(path, data, what)
        document[name] = path


def generate_data_key_pair(args: argparse.Namespace, client: KeyClient) -> int:
    """`generate-data-key-pair`: a fresh RSA or ECC key pair, its private key also sealed
    under the symmetric key (PKCS#8 DER, DER SubjectPublicKeyInfo)."""
    pair: DataKeyPair
    if args.without_plaintext:
        pair = client.generate_data_key_pair_without_plaintext(
            args.key_id, args.key_pair_spec, args.context
        )
    else:
        pair = client.generate_data_key_pair(args.key_id, args.key_pair_spec, args.context)
    try:
        document: dict[str, Any] = {"key_id": pair.key_id, "key_pair_spec": pair.key_pair_spec}
        if pair.private_key and args.out_private_key != STDIO:
            write_new_file(Path(args.out_private_key), pair.private_key, SECRET_MODE)
            document["out_private_key"] = args.out_private_key
        _pair_output(args, document, 1, pair.private_key_blob)
        _pair_output(args, document, 2, pair.public_key)
        if pair.private_key and args.out_private_key == STDIO:
            _pair_output(args, document, 0, pair.private_key)
        if args.json:
            print_document(document)
    finally:
        del pair
    return EXIT_OK


# --- importing key material ----------------------------------------------------------------


def check_import_key_material(args: argparse.Namespace) -> None:
    """Key material comes from a file or a pipe, never typed at a terminal."""
    if args.material == STDIO and sys.stdin.isatty():
        raise UsageError("key material is not read from a terminal: give --material FILE")


def import_key_material(args: argparse.Namespace, client: KeyClient) -> int:
    """`import-key-material`: wrap the material here and import it; the key's metadata."""
    material = read_input(args.material, MAX_KEY_MATERIAL_BYTES, "the key material")
    parameters = client.get_parameters_for_import(
        args.key_id, args.wrapping_algorithm, args.wrapping_key_spec
    )
    print_metadata(
        client.import_key_material(args.key_id, parameters, material, args.valid_to), args.json
    )
    return EXIT_OK
