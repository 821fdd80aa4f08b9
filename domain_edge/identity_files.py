"""A host identity on disk: the directory `hsm-domain init` and `add-node` write for an HSA.

Invariants kept here:
- an identity directory holds `host.json` (public parts only) and three secret files
  `signing.key`, `agreement.key`, `tls.key`, each created 0600 and moved into place by an
  atomic rename, `host.json` last (its presence marks a complete identity); an existing
  identity is never overwritten;
- loading refuses a secret file that group or others can access, a file larger than 64 KiB is
  read no further, and an identity whose public file does not match its private keys is
  refused;
- the TLS certificate (`tls.crt`) is stored and read back only if it certifies the identity's
  TLS key;
- no key material ever appears in a message.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from domain_core.errors import MalformedMessageError, TokenError, TokenNotFoundError
from domain_core.identity import HostIdentity
from domain_core.limits import MAX_HOST_IDENTITY_FILE_BYTES
from domain_core.pki import is_valid_name
from domain_core.signers import InMemorySigner
from domain_edge.files import fsync_directory, read_limited, read_secret_file, replace_file

__all__ = [
    "AGREEMENT_KEY_FILE",
    "HOST_FILE",
    "RECOVERY_SESSION_KEY_FILE",
    "SIGNING_KEY_FILE",
    "TLS_CERTIFICATE_FILE",
    "TLS_KEY_FILE",
    "load_host_certificate",
    "load_host_identity",
    "load_recovery_session_key",
    "new_recovery_session_key",
    "remove_recovery_session_key",
    "save_host_certificate",
    "save_host_identity",
]

HOST_FILE: Final = "host.json"
SIGNING_KEY_FILE: Final = "signing.key"
AGREEMENT_KEY_FILE: Final = "agreement.key"
TLS_KEY_FILE: Final = "tls.key"
TLS_CERTIFICATE_FILE: Final = "tls.crt"
# The X25519 key of a recovery session this host runs (docs/disaster-recovery.md): made when
# the session opens, removed once the host holds the recovered domain keys.
RECOVERY_SESSION_KEY_FILE: Final = "recovery-session.key"
_SECRET_FILES: Final = (SIGNING_KEY_FILE, AGREEMENT_KEY_FILE, TLS_KEY_FILE)
_HOST_FORMAT: Final = "hsm-domain-host-identity"
_HOST_VERSION: Final = 1
_HOST_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "host_id",
        "signing_public_key",
        "agreement_public_key",
        "tls_public_key",
    }
)
_X25519_KEY_SIZE: Final = 32


def _public_document(identity: HostIdentity) -> dict[str, object]:
    """The content of `host.json`: the identity's public keys."""
    tls_public_pem = identity.tls_public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "format": _HOST_FORMAT,
        "version": _HOST_VERSION,
        "host_id": identity.host_id,
        "signing_public_key": base64.b64encode(identity.signing_public_key.spki_der).decode(),
        "agreement_public_key": base64.b64encode(identity.agreement_public_key).decode(),
        "tls_public_key": tls_public_pem.decode("ascii"),
    }


def save_host_identity(identity: HostIdentity, directory: Path) -> None:
    """Write `identity` to `directory` (created 0700 if missing); never overwrite one."""
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)
    for name in (HOST_FILE, *_SECRET_FILES):
        if (directory / name).exists():
            raise ValueError(
                f"{directory / name} exists already; refusing to overwrite a host identity"
            )
    secrets_content = {
        SIGNING_KEY_FILE: identity.signing_private_key_pem(),
        AGREEMENT_KEY_FILE: base64.b64encode(identity.agreement_private_key) + b"\n",
        TLS_KEY_FILE: identity.tls_private_key_pem(),
    }
    for name, content in secrets_content.items():
        replace_file(directory / name, content, 0o600)
    # host.json last: its presence marks a complete identity.
    public = json.dumps(_public_document(identity), indent=2, sort_keys=True) + "\n"
    replace_file(directory / HOST_FILE, public.encode("ascii"), 0o644)
    fsync_directory(directory)


def load_host_identity(directory: Path) -> HostIdentity:
    """Read an identity written by `save_host_identity`, checking file modes and that its
    parts match."""
    directory = Path(directory)
    host_path = directory / HOST_FILE
    try:
        document = json.loads(
            read_limited(
                host_path,
                MAX_HOST_IDENTITY_FILE_BYTES,
                lambda: TokenError(
                    f"{host_path} is larger than {MAX_HOST_IDENTITY_FILE_BYTES} bytes"
                ),
            )
        )
    except FileNotFoundError:
        raise TokenNotFoundError(
            f"no host identity in {directory} ({HOST_FILE} is missing)"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"{host_path} is not valid JSON") from None
    if not isinstance(document, dict) or set(document) != _HOST_KEYS:
        raise TokenError(f"{host_path} must be an object with exactly {sorted(_HOST_KEYS)}")
    if document["format"] != _HOST_FORMAT or document["version"] != _HOST_VERSION:
        raise TokenError(f"{host_path} is not a version {_HOST_VERSION} host identity")
    host_id = document["host_id"]
    if not is_valid_name(host_id):
        raise TokenError(f"{host_path} holds an invalid host id")

    signing_pem = read_secret_file(directory / SIGNING_KEY_FILE, MAX_HOST_IDENTITY_FILE_BYTES)
    agreement_text = read_secret_file(directory / AGREEMENT_KEY_FILE, MAX_HOST_IDENTITY_FILE_BYTES)
    tls_pem = read_secret_file(directory / TLS_KEY_FILE, MAX_HOST_IDENTITY_FILE_BYTES)
    try:
        signer = InMemorySigner.from_pkcs8(signing_pem)
    except MalformedMessageError:
        raise TokenError(f"{directory / SIGNING_KEY_FILE} holds no valid private key") from None
    try:
        agreement_private = base64.b64decode(agreement_text.strip(), validate=True)
    except (binascii.Error, ValueError):
        agreement_private = b""
    if len(agreement_private) != _X25519_KEY_SIZE:
        raise TokenError(f"{directory / AGREEMENT_KEY_FILE} holds no 32-byte X25519 key")
    try:
        tls_key = serialization.load_pem_private_key(tls_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TokenError(f"{directory / TLS_KEY_FILE} holds no valid private key") from None
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise TokenError(f"{directory / TLS_KEY_FILE} is not an EC P-256 key")
    try:
        identity = HostIdentity(host_id, signer, agreement_private, tls_key)
    except (ValueError, TypeError) as exc:
        raise TokenError(f"{directory} holds an invalid host identity: {exc}") from None
    expected = _public_document(identity)
    for field in ("signing_public_key", "agreement_public_key", "tls_public_key"):
        if document[field] != expected[field]:
            raise TokenError(
                f"{host_path} does not match the private keys in {directory}: {field} differs"
            )
    return identity


def save_host_certificate(identity: HostIdentity, directory: Path, cert_pem: bytes) -> None:
    """Store the CA-issued TLS certificate of `identity` as `tls.crt`, replacing an older one
    atomically; ValueError if it is not a certificate for the identity's TLS key."""
    cert = _certificate_for_key(identity, cert_pem)
    if cert is None:
        raise ValueError("the certificate is not for this host's TLS key")
    replace_file(
        Path(directory) / TLS_CERTIFICATE_FILE,
        cert.public_bytes(serialization.Encoding.PEM),
        0o644,
    )


def load_host_certificate(identity: HostIdentity, directory: Path) -> bytes:
    """The stored TLS certificate (PEM), checked to be for the identity's TLS key."""
    path = Path(directory) / TLS_CERTIFICATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenNotFoundError(f"no TLS certificate at {path}; enroll the host") from None
    cert = _certificate_for_key(identity, data)
    if cert is None:
        raise TokenError(f"{path} is not a certificate for this host's TLS key")
    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate_for_key(identity: HostIdentity, cert_pem: bytes) -> x509.Certificate | None:
    """The parsed certificate if it certifies the identity's TLS key, else None."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return None
    if cert.public_key() != identity.tls_public_key:
        return None
    return cert


def new_recovery_session_key(directory: Path) -> bytes:
    """Make a fresh recovery session key in `directory` (0600, replacing an older session's:
    shares sealed to that one no longer open); its raw X25519 public key."""
    private = x25519.X25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    replace_file(Path(directory) / RECOVERY_SESSION_KEY_FILE, base64.b64encode(raw) + b"\n", 0o600)
    fsync_directory(Path(directory))
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def load_recovery_session_key(directory: Path) -> bytes | None:
    """The raw X25519 private key of this host's recovery session, or None when it runs none
    (TokenError if the file is malformed or readable by others)."""
    path = Path(directory) / RECOVERY_SESSION_KEY_FILE
    try:
        text = read_secret_file(path, MAX_HOST_IDENTITY_FILE_BYTES)
    except TokenNotFoundError:
        return None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _X25519_KEY_SIZE:
        raise TokenError(f"{path} holds no 32-byte X25519 key")
    return raw


def remove_recovery_session_key(directory: Path) -> bool:
    """End this host's recovery session: remove its key; whether there was one."""
    path = Path(directory) / RECOVERY_SESSION_KEY_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_directory(Path(directory))
    return True
