"""The domain CA on disk: `ca.crt` and `ca.key` in a directory (DIR/ca of a local domain).

Invariants kept here:
- a saved CA is never overwritten; the key file is created 0600 and the certificate 0644,
  each with O_EXCL and fsynced (`domain_edge.files.write_new_file`);
- the key is stored unencrypted only when no passphrase is given (a local demo domain);
- loading refuses a key file that group or others can access, asks for the passphrase only
  when the key is encrypted, and refuses a certificate that does not match the key or is not
  a domain CA certificate;
- no key or passphrase ever appears in a message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from domain_core.errors import (
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.pki import DomainCA, parse_certificate
from domain_edge.files import read_secret_file, write_new_file

__all__ = ["CA_CERTIFICATE_FILE", "CA_KEY_FILE", "load_domain_ca", "save_domain_ca"]

CA_CERTIFICATE_FILE: Final = "ca.crt"
CA_KEY_FILE: Final = "ca.key"


def save_domain_ca(ca: DomainCA, directory: Path, *, passphrase: bytes | None = None) -> None:
    """Write `ca.crt` (0644) and `ca.key` (0600, PKCS#8 PEM) to `directory`, never overwriting.

    Without a passphrase the key is stored unencrypted (fit for a local demo domain only).
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = directory / CA_CERTIFICATE_FILE, directory / CA_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise ValueError(f"{path} exists already; refusing to overwrite a domain CA")
    key_pem = ca.private_key_pem(passphrase)
    write_new_file(key_path, key_pem, 0o600)
    write_new_file(cert_path, ca.certificate_pem, 0o644)


def load_domain_ca(
    directory: Path, *, passphrase: bytes | Callable[[], bytes] | None = None
) -> DomainCA:
    """Read a CA written by `save_domain_ca`; `passphrase` (or a callback) opens an encrypted
    key."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERTIFICATE_FILE, directory / CA_KEY_FILE
    try:
        cert_data = cert_path.read_bytes()
    except FileNotFoundError:
        raise TokenNotFoundError(f"no CA certificate at {cert_path}") from None
    key_pem = read_secret_file(key_path)
    try:
        certificate = parse_certificate(cert_data)
    except MalformedMessageError:
        raise TokenError(f"{cert_path} is not a valid certificate") from None
    encrypted = b"ENCRYPTED PRIVATE KEY" in key_pem
    if encrypted and passphrase is None:
        raise TokenError(f"{key_path} is encrypted; give its passphrase")
    secret = passphrase() if callable(passphrase) else passphrase
    try:
        key = serialization.load_pem_private_key(key_pem, password=secret if encrypted else None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if encrypted:
            raise WrongPassphraseError(f"the passphrase does not open {key_path}") from None
        raise TokenError(f"{key_path} is not a valid private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TokenError(f"{key_path} is not an EC P-256 key")
    try:
        return DomainCA(certificate, key)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{directory} holds no valid domain CA: {exc}") from None
