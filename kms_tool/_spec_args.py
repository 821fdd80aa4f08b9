"""The arguments of the `hsm-kms` commands of keys other than symmetric encryption keys (sign,
verify, get-public-key, generate-mac, verify-mac, generate-data-key-pair) and of
import-key-material; `kms_tool.cli` puts them in its table of commands.
"""

from __future__ import annotations

import argparse

from kms_tool._args import (
    KEY_PAIR_SPECS,
    MAC_ALGORITHMS,
    SIGNING_ALGORITHMS,
    add_choice,
    add_context,
    not_negative,
)
from kms_tool._io import STDIO

__all__ = [
    "generate_data_key_pair_arguments",
    "get_public_key_arguments",
    "import_key_material_arguments",
    "mac_arguments",
    "sign_arguments",
    "verify_arguments",
    "verify_mac_arguments",
]


def _key_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key_id", metavar="KEY_ID", help="the key's id")


def message_in(parser: argparse.ArgumentParser, what: str = "message") -> None:
    parser.add_argument(
        "--in",
        dest="input",
        metavar="FILE",
        default=STDIO,
        help=f"the {what}, 1 to 4096 bytes ('-': stdin, the default)",
    )


def sign_arguments(parser: argparse.ArgumentParser, verify: bool = False) -> None:
    parser.add_argument("--key-id", required=True, help="an RSA or ECC key of usage SIGN_VERIFY")
    add_choice(
        parser,
        "--signing-algorithm",
        SIGNING_ALGORITHMS,
        "one of the key's signing algorithms",
        required=True,
    )
    parser.add_argument(
        "--digest",
        action="store_true",
        help="the input is the message's digest (message type DIGEST), of the algorithm's hash",
    )
    message_in(parser, "message (or digest)")
    if verify:
        parser.add_argument(
            "--signature", metavar="FILE", required=True, help="the signature ('-': stdin)"
        )
    else:
        parser.add_argument(
            "--out", metavar="FILE", default=STDIO, help="the signature ('-': stdout, the default)"
        )


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    sign_arguments(parser, verify=True)


def get_public_key_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    parser.add_argument("--out", metavar="FILE", default=STDIO, help="('-': stdout, the default)")
    parser.add_argument(
        "--format", choices=("pem", "der"), default="pem", help="PEM (the default) or DER"
    )


def import_key_material_arguments(parser: argparse.ArgumentParser) -> None:
    _key_id(parser)
    parser.add_argument(
        "--material",
        metavar="FILE",
        required=True,
        help="the key material: 32 bytes (SYMMETRIC_DEFAULT), the HMAC key, or a PKCS#8 DER "
        "private key ('-': stdin, never a terminal)",
    )
    add_choice(
        parser,
        "--wrapping-algorithm",
        ("RSAES_OAEP_SHA_256", "RSAES_OAEP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"),
        "how the material travels (wrapped here)",
        "RSAES_OAEP_SHA_256",
        note="; RSA private keys need RSA_AES_KEY_WRAP_SHA_256",
    )
    add_choice(
        parser,
        "--wrapping-key-spec",
        ("RSA_2048", "RSA_3072", "RSA_4096"),
        "wrapping key",
        "RSA_2048",
    )
    parser.add_argument(
        "--valid-to",
        type=not_negative,
        default=0,
        metavar="UNIX_SECONDS",
        help="when the domain deletes the material again (default 0: never)",
    )


def mac_arguments(parser: argparse.ArgumentParser, verify: bool = False) -> None:
    parser.add_argument("--key-id", required=True, help="an HMAC key")
    add_choice(parser, "--mac-algorithm", MAC_ALGORITHMS, "the key's MAC algorithm", required=True)
    message_in(parser)
    if verify:
        parser.add_argument("--mac", metavar="FILE", required=True, help="the MAC ('-': stdin)")
    else:
        parser.add_argument(
            "--out", metavar="FILE", default=STDIO, help="the MAC ('-': stdout, the default)"
        )


def verify_mac_arguments(parser: argparse.ArgumentParser) -> None:
    mac_arguments(parser, verify=True)


def generate_data_key_pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-id", required=True, help="the symmetric key that encrypts the private key"
    )
    add_choice(parser, "--key-pair-spec", KEY_PAIR_SPECS, "the pair's key spec", required=True)
    parser.add_argument(
        "--without-plaintext", action="store_true", help="only the encrypted private key"
    )
    parser.add_argument(
        "--out-private-key", metavar="FILE", help="new file for the private key (PKCS#8 DER)"
    )
    parser.add_argument(
        "--out-private-key-ciphertext",
        metavar="FILE",
        default=STDIO,
        help="file for the encrypted private key ('-': stdout, the default)",
    )
    parser.add_argument(
        "--out-public-key",
        metavar="FILE",
        help="file for the public key (DER SubjectPublicKeyInfo; '-': stdout; default: only "
        "in the --json document)",
    )
    add_context(parser)
