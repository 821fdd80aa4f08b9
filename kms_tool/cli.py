"""`hsm-kms`: create and use customer keys of a domain's key service from the shell.

The tool is a table of commands (`COMMANDS`) run by the one skeleton of the three tools
(`domain_edge.cli`): exit status 0 on success, 1 when the service refused or something failed
(one line on stderr with the error's gRPC status name, `-v` adds the traceback), 2 on a usage
error. Only `HsmDomainError` and `OSError` are caught, once; anything else is a bug and shows
its traceback.

Invariants kept here: every check of the arguments that argparse cannot make (contexts,
where binary output goes, which options exclude each other) runs before any connection; what
the commands and their files keep is said in `kms_tool._commands` and `kms_tool._io`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

from domain_core import envelope
from domain_edge.cli import Command, Tool, run_tool
from domain_edge.kms_client import OPERATION_NAMES
from kms_tool import _commands as commands
from kms_tool import _grant_args as grant_args
from kms_tool import _grant_commands as grant_commands
from kms_tool import _spec_args as spec_args
from kms_tool import _spec_commands as spec_commands
from kms_tool._args import (
    CLUSTER_ENV,
    CONTEXT_OPTIONS,
    ENCRYPTION_ALGORITHMS,
    KEY_SPECS,
    KEY_USAGES,
    add_choice,
    add_context,
    add_in_out,
    chunk_size,
    connect,
    context,
    not_negative,
    parse_context,
    positive,
    shared_options,
)
from kms_tool._io import PROG, STDIO, read_grant_tokens, refuse_terminal

__all__ = ["CLUSTER_ENV", "COMMANDS", "PROG", "TOOL", "build_parser", "main", "parse_context"]


# --- each command's arguments ------------------------------------------------------------------


def _key_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key_id", metavar="KEY_ID", help="the key's id")


def _create_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--description", default="", help="free text")
    add_context(parser, "--tag", "the key's first tag")
    add_choice(parser, "--key-spec", KEY_SPECS, "key spec", "SYMMETRIC_DEFAULT")
    add_choice(parser, "--key-usage", KEY_USAGES, "key usage", "ENCRYPT_DECRYPT")
    add_choice(
        parser,
        "--origin",
        ("DOMAIN", "EXTERNAL"),
        "where the material comes from",
        "DOMAIN",
        note=" (EXTERNAL: none until import-key-material)",
    )
    parser.add_argument(
        "--policy",
        metavar="FILE",
        help=f"key policy JSON ('-': stdin); operations: {', '.join(OPERATION_NAMES)}. "
        "Default: the creator may do everything",
    )
    parser.add_argument(
        "--enable-rotation", action="store_true", help="rotate the key yearly (symmetric keys)"
    )
    parser.add_argument(
        "--rotation-period-days",
        type=not_negative,
        default=0,
        metavar="N",
        help="rotation period (90 to 2560; default 365)",
    )
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="1 to 64 printable characters naming this creation (default: a fresh UUID); run "
        "again with the same KEY after a failure and you get the key it made, never a second",
    )


def _list_keys_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--page-size", type=positive, default=100, metavar="N", help="keys per call (default 100)"
    )


def _encryption_algorithm(parser: argparse.ArgumentParser) -> None:
    add_choice(
        parser,
        "--encryption-algorithm",
        ENCRYPTION_ALGORITHMS,
        "encryption algorithm",
        note="; RSAES_OAEP_* for an RSA key of usage ENCRYPT_DECRYPT (a bare RSA ciphertext, "
        "no context; default SYMMETRIC_DEFAULT)",
    )


def _encrypt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-id", required=True, help="the key to encrypt under")
    add_in_out(parser, "plaintext", "ciphertext blob")
    add_context(parser)
    _encryption_algorithm(parser)


def _decrypt_arguments(parser: argparse.ArgumentParser) -> None:
    add_in_out(parser, "ciphertext blob", "plaintext")
    add_context(parser)
    parser.add_argument(
        "--key-id", help="refuse a blob of any other key (needed for an RSA ciphertext)"
    )
    _encryption_algorithm(parser)


def _re_encrypt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--destination-key-id", required=True, help="the key to encrypt under")
    add_in_out(parser, "ciphertext blob", "new ciphertext blob")
    add_context(parser, "--source-context", "the blob's encryption context")
    add_context(parser, "--destination-context", "the new blob's encryption context")


def _generate_data_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-id", required=True, help="the key that encrypts the data key")
    parser.add_argument("--without-plaintext", action="store_true", help="only the encrypted key")
    parser.add_argument("--out-plaintext", metavar="FILE", help="new file for the plaintext key")
    parser.add_argument(
        "--out-ciphertext",
        metavar="FILE",
        default=STDIO,
        help="file for the encrypted key ('-': stdout, the default)",
    )
    parser.add_argument(
        "--bytes", type=positive, default=32, metavar="N", help="key length (default 32)"
    )
    add_context(parser)


def _generate_random_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bytes", type=positive, default=32, metavar="N", help="1 to 1024")
    parser.add_argument("--out", metavar="FILE", default=STDIO, help="('-': stdout, the default)")


def _tag_resource_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    add_context(parser, "--tag", "tag")


def _untag_resource_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    parser.add_argument(
        "--tag-key", action="extend", nargs="+", required=True, metavar="KEY", help="tag keys"
    )


def _put_key_policy_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    parser.add_argument(
        "--policy", metavar="FILE", required=True, help="key policy JSON ('-': stdin)"
    )


def _schedule_key_deletion_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    parser.add_argument(
        "--days",
        type=positive,
        default=30,
        metavar="N",
        help="waiting period, 7 to 30 (default 30)",
    )


def _envelope_encrypt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-id", required=True, help="the key that encrypts the data key")
    add_in_out(parser, "plaintext", "envelope, written whole or not at all")
    add_context(parser)
    parser.add_argument(
        "--chunk-size",
        type=chunk_size,
        default=envelope.DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help=f"plaintext bytes per chunk (default {envelope.DEFAULT_CHUNK_SIZE})",
    )


def _envelope_decrypt_arguments(parser: argparse.ArgumentParser) -> None:
    add_in_out(parser, "envelope", "plaintext")
    add_context(parser, what="expected encryption context (default: the one in the envelope)")
    parser.add_argument("--key-id", help="refuse an envelope of any other key")


def _checks(check: object = None, binary_output: str | None = None) -> dict[str, object]:
    """What `_run` checks before connecting: a command's own check, and which option names
    a binary output that must not reach a terminal."""
    return {"check": check, "binary_output": binary_output}


def _key_admin(name: str, method: str, text: str) -> Command:
    return Command(
        name, text, commands.key_admin(method), f"hsm-kms {name} $KEY", arguments=_key_id
    )


# --- the table ---------------------------------------------------------------------------------

COMMANDS: Final[tuple[Command, ...]] = (
    Command(
        "create-key",
        "create a customer key; prints its id",
        commands.create_key,
        """
          hsm-kms create-key --description "orders database" --enable-rotation
          hsm-kms create-key --policy policy.json --json | jq -r .key_id
          hsm-kms create-key --key-spec ECC_NIST_P256 --key-usage SIGN_VERIFY
          hsm-kms create-key --origin EXTERNAL --key-spec HMAC_256 --key-usage GENERATE_VERIFY_MAC
        """,
        arguments=_create_key_arguments,
        defaults=_checks(commands.check_create_key),
    ),
    Command(
        "describe-key",
        "show a key's metadata and policy",
        commands.describe_key,
        "hsm-kms describe-key 1b4e28ba-2fa1-41d2-883f-0016d3cca427 --json",
        arguments=_key_id,
    ),
    Command(
        "list-keys",
        "list the keys: id, state, description",
        commands.list_keys,
        "hsm-kms list-keys --json | jq -r '.[].key_id'",
        arguments=_list_keys_arguments,
    ),
    Command(
        "encrypt",
        "encrypt up to 4 KiB under a key (larger data: envelope-encrypt)",
        commands.encrypt,
        """
          echo -n 's3cret' | hsm-kms encrypt --key-id $KEY --context app=orders --out s.bin
          hsm-kms encrypt --key-id $KEY --in token.txt --json
          hsm-kms encrypt --key-id $RSA_KEY --encryption-algorithm RSAES_OAEP_SHA_256 \\
              --in pin.txt --out pin.bin
        """,
        arguments=_encrypt_arguments,
        defaults=_checks(commands.check_encrypt, "out"),
    ),
    Command(
        "decrypt",
        "decrypt a ciphertext blob (it names its key); give the same context as to encrypt",
        commands.decrypt,
        """
          hsm-kms decrypt --in s.bin --context app=orders
          hsm-kms decrypt --in s.bin --context app=orders --json | jq -r .plaintext | base64 -d
          hsm-kms decrypt --in rsa.bin --key-id $RSA_KEY --encryption-algorithm RSAES_OAEP_SHA_256
        """,
        arguments=_decrypt_arguments,
        defaults=_checks(commands.check_decrypt),
    ),
    Command(
        "re-encrypt",
        "re-encrypt a blob under another key or context, without the plaintext leaving the HSA",
        commands.re_encrypt,
        """
          hsm-kms re-encrypt --in s.bin --destination-key-id $NEW --source-context app=orders \\
              --destination-context app=billing --out s2.bin
        """,
        arguments=_re_encrypt_arguments,
        defaults=_checks(binary_output="out"),
    ),
    Command(
        "generate-data-key",
        "make a data key for local encryption: its plaintext and its blob under a key",
        commands.generate_data_key,
        """
          hsm-kms generate-data-key --key-id $KEY --out-plaintext dk.key --out-ciphertext dk.bin
          hsm-kms generate-data-key --key-id $KEY --without-plaintext --out-ciphertext dk.bin
        A plaintext data key is never written to a terminal (--out-plaintext - needs a pipe,
        or --json to print it base64-encoded on purpose); a key file is created 0600 and never
        overwrites an existing one.
        """,
        arguments=_generate_data_key_arguments,
        defaults=_checks(commands.check_generate_data_key, "out_ciphertext"),
    ),
    Command(
        "generate-random",
        "random bytes from an HSA's generator",
        commands.generate_random,
        "hsm-kms generate-random --bytes 32 --json",
        arguments=_generate_random_arguments,
        defaults=_checks(binary_output="out"),
    ),
    Command(
        "sign",
        "sign up to 4 KiB (or its digest) with an RSA or ECC key of usage SIGN_VERIFY",
        spec_commands.sign,
        """
          hsm-kms sign --key-id $KEY --signing-algorithm ECDSA_SHA_256 --in msg --out msg.sig
          openssl dgst -sha256 -binary big.iso | hsm-kms sign --key-id $KEY --digest \\
              --signing-algorithm RSASSA_PSS_SHA_256 --json | jq -r .signature
        A longer message is signed as its digest (--digest). ECDSA signatures are DER; RSASSA-PSS
        salts are as long as the digest.
        """,
        arguments=spec_args.sign_arguments,
        defaults=_checks(binary_output="out"),
    ),
    Command(
        "verify",
        "verify a signature: prints valid (exit 0), or says it is not (exit 1)",
        spec_commands.verify,
        """
          hsm-kms verify --key-id $KEY --signing-algorithm ECDSA_SHA_256 --in msg \\
              --signature msg.sig
        """,
        arguments=spec_args.verify_arguments,
        defaults=_checks(spec_commands.check_verify),
    ),
    Command(
        "get-public-key",
        "an RSA or ECC key's public key (PEM by default)",
        spec_commands.get_public_key,
        """
          hsm-kms get-public-key $KEY --out pub.pem
          openssl dgst -sha256 -verify pub.pem -signature msg.sig msg
          hsm-kms get-public-key $KEY --json | jq -r .signing_algorithms[]
        """,
        arguments=spec_args.get_public_key_arguments,
        defaults=_checks(spec_commands.check_get_public_key),
    ),
    Command(
        "generate-mac",
        "the HMAC of up to 4 KiB under an HMAC key",
        spec_commands.generate_mac,
        """
          hsm-kms generate-mac --key-id $KEY --mac-algorithm HMAC_SHA_256 --in msg --out msg.mac
        """,
        arguments=spec_args.mac_arguments,
        defaults=_checks(binary_output="out"),
    ),
    Command(
        "verify-mac",
        "verify an HMAC: prints valid (exit 0), or says it is not (exit 1)",
        spec_commands.verify_mac,
        """
          hsm-kms verify-mac --key-id $KEY --mac-algorithm HMAC_SHA_256 --in msg --mac msg.mac
        """,
        arguments=spec_args.verify_mac_arguments,
        defaults=_checks(spec_commands.check_verify_mac),
    ),
    Command(
        "generate-data-key-pair",
        "make an RSA or ECC key pair: its private key, that key encrypted under a key, its "
        "public key",
        spec_commands.generate_data_key_pair,
        """
          hsm-kms generate-data-key-pair --key-id $KEY --key-pair-spec ECC_NIST_P256 \\
              --out-private-key priv.der --out-private-key-ciphertext priv.bin \\
              --out-public-key pub.der --context app=signer
          hsm-kms decrypt --in priv.bin --context app=signer --out priv.der
        A private key is never written to a terminal (--out-private-key - needs a pipe, or
        --json to print it base64-encoded on purpose); its file is created 0600 and never
        overwrites an existing one. With --without-plaintext only its encrypted form is made.
        """,
        arguments=spec_args.generate_data_key_pair_arguments,
        defaults=_checks(spec_commands.check_generate_data_key_pair),
    ),
    Command(
        "import-key-material",
        "import your own material into a key created with --origin EXTERNAL",
        spec_commands.import_key_material,
        """
          KEY=$(hsm-kms create-key --origin EXTERNAL --key-spec HMAC_256 \\
              --key-usage GENERATE_VERIFY_MAC)
          hsm-kms import-key-material $KEY --material hmac.key --valid-to 1798761600
        The material is wrapped here under a fresh wrapping key of the domain
        (GetParametersForImport) and travels only wrapped; once a key held material, only the
        same material is taken again.
        """,
        arguments=spec_args.import_key_material_arguments,
        defaults=_checks(spec_commands.check_import_key_material),
    ),
    _key_admin(
        "delete-imported-key-material",
        "delete_imported_key_material",
        "delete a key's imported material (pending import until the same material comes back)",
    ),
    _key_admin(
        "rotate-key", "rotate_key", "add a backing key version (old ciphertexts keep working)"
    ),
    Command(
        "tag-resource",
        "add tags to a key (or replace the values of tag keys it has)",
        commands.tag_resource,
        "hsm-kms tag-resource $KEY --tag team=payments env=prod",
        arguments=_tag_resource_arguments,
    ),
    Command(
        "untag-resource",
        "remove tags from a key",
        commands.untag_resource,
        "hsm-kms untag-resource $KEY --tag-key env",
        arguments=_untag_resource_arguments,
    ),
    Command(
        "list-resource-tags",
        "a key's tags: one KEY=VALUE per line",
        commands.list_resource_tags,
        "hsm-kms list-resource-tags $KEY --json",
        arguments=_key_id,
    ),
    _key_admin("enable-key", "enable_key", "enable a disabled key"),
    _key_admin("disable-key", "disable_key", "disable a key: every cryptographic call is refused"),
    _key_admin("cancel-key-deletion", "cancel_key_deletion", "cancel a scheduled deletion"),
    Command(
        "put-key-policy",
        "replace a key's policy (it must keep an admin)",
        commands.put_key_policy,
        """
          hsm-kms put-key-policy $KEY --policy policy.json
        with policy.json:
          {"grants": [{"principals": ["spiffe://local/client/demo-app"],
                       "operations": ["encrypt", "decrypt", "describe", "admin"]}]}
        """,
        arguments=_put_key_policy_arguments,
    ),
    Command(
        "schedule-key-deletion",
        "delete a key after a waiting period (cancel-key-deletion undoes it meanwhile)",
        commands.schedule_key_deletion,
        "hsm-kms schedule-key-deletion $KEY --days 7",
        arguments=_schedule_key_deletion_arguments,
    ),
    Command(
        "create-grant",
        "let another client use a key (AWS KMS's grants); prints the grant's id",
        grant_commands.create_grant,
        """
          hsm-kms create-grant --key-id $KEY --grantee spiffe://local/client/bob \\
              --operations encrypt decrypt --constraint-subset tenant=acme --out-token bob.tok
          hsm-kms --grant-token bob.tok encrypt --key-id $KEY --context tenant=acme --in x \\
              --out x.bin    # as bob, through any HSA
        The token (a bearer credential: a new 0600 file, never overwritten, or base64 under
        --json) lets the grantee's calls use the grant at once on every HSA; without it the
        grant works once it reached them all.
        """,
        arguments=grant_args.create_grant_arguments,
        defaults=_checks(grant_commands.check_create_grant),
    ),
    Command(
        "list-grants",
        "list a key's grants: id, grantee, operations, constraints, name",
        grant_commands.list_grants,
        "hsm-kms list-grants $KEY --grantee spiffe://local/client/bob --json",
        arguments=grant_args.list_grants_arguments,
    ),
    Command(
        "retire-grant",
        "remove a grant as its grantee or retiring principal; prints the key's metadata",
        grant_commands.retire_grant,
        """
          hsm-kms retire-grant --grant-token bob.tok
          hsm-kms retire-grant --key-id $KEY --grant-id $GRANT
        Here --grant-token (once) names the grant to retire.
        """,
        arguments=grant_args.retire_grant_arguments,
        defaults=_checks(grant_commands.check_retire_grant),
    ),
    Command(
        "revoke-grant",
        "remove a grant as a principal that may revoke the key's grants",
        grant_commands.revoke_grant,
        "hsm-kms revoke-grant --key-id $KEY --grant-id $GRANT",
        arguments=grant_args.revoke_grant_arguments,
    ),
    Command(
        "envelope-encrypt",
        "encrypt data of any size: a data key from the service, AES-256-GCM here, streamed",
        commands.envelope_encrypt,
        """
          hsm-kms envelope-encrypt --key-id $KEY --in backup.tar --out backup.tar.hsme \\
              --context backup=nightly
        """,
        arguments=_envelope_encrypt_arguments,
        defaults=_checks(commands.check_envelope_encrypt),
    ),
    Command(
        "envelope-decrypt",
        "decrypt an envelope, streamed; a file output appears only once all of it verified",
        commands.envelope_decrypt,
        """
          hsm-kms envelope-decrypt --in backup.tar.hsme --out backup.tar --context backup=nightly
        To stdout, plaintext is released chunk by chunk as it verifies: if the command then
        fails (exit 1), discard what it wrote.
        """,
        arguments=_envelope_decrypt_arguments,
        defaults=_checks(commands.check_envelope_decrypt),
    ),
)


# --- running a command ---------------------------------------------------------------------------


def _check_usage(args: argparse.Namespace) -> None:
    """Everything about the arguments that argparse cannot check, before any connection."""
    for name in CONTEXT_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, context(getattr(args, name)))
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    binary_output: str | None = getattr(args, "binary_output", None)
    if binary_output and getattr(args, binary_output) == STDIO and not args.json:
        refuse_terminal("the output", "--" + binary_output.replace("_", "-"))


def _run(args: argparse.Namespace) -> int:
    """Check the arguments, read the grant tokens, connect, run the command with the client
    (whose calls carry the tokens), close the client."""
    _check_usage(args)
    tokens = read_grant_tokens(getattr(args, "grant_token", None) or [])
    args.grant_tokens = tokens
    handler: commands.Handler = args._run
    with connect(args) as client:
        return handler(args, client.with_grant_tokens(tokens) if tokens else client)


TOOL: Final = Tool(
    prog=PROG,
    description="Create and use customer keys of an HSM domain's key service.",
    example="""
        export HSM_CLUSTER=./demo          # a domain started with hsm-domain up ./demo
        KEY=$(hsm-kms create-key --description "orders")
        echo -n secret | hsm-kms encrypt --key-id $KEY --context app=orders --out s.bin
        hsm-kms decrypt --in s.bin --context app=orders
        """,
    commands=COMMANDS,
    shared_options=shared_options,
    run=_run,
    with_status=True,
)


def build_parser() -> argparse.ArgumentParser:
    """The `hsm-kms` argument parser."""
    return TOOL.parser()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `hsm-kms` command; return the exit status."""
    return run_tool(TOOL, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
