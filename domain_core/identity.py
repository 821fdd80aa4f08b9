"""A host's identity: its Ed25519 signing key, X25519 agreement key and P-256 TLS key.

Invariants kept here:
- a `HostIdentity` always holds three keys of the right types and a valid host id (a lower-case
  DNS label, so `spiffe://<domain>/hsa/<host id>` is a valid SPIFFE id);
- its X25519 agreement key is derived from its Ed25519 signing key (the same secret scalar,
  `crypto.x25519_private_from_ed25519_seed`), so the agreement public key is a function of the
  signing public key that every verifier of an enrollment recomputes, and a signature proves
  possession of both (`domain_core.enrollment`);
- on disk, an identity is a directory with `host.json` (public parts only) and three secret
  files `signing.key`, `agreement.key`, `tls.key`, each created 0600 and moved into place by an
  atomic rename; an existing identity is never overwritten;
- loading refuses a secret file that group or others can access, and an identity whose public
  file does not match its private keys;
- no key material ever appears in a message or repr.
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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core import crypto
from domain_core.errors import (
    MalformedMessageError,
    TokenError,
    TokenNotFoundError,
)
from domain_core.pki import SpiffeId, is_valid_name
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm, Signer
from domain_edge.files import fsync_directory, read_secret_file, replace_file

__all__ = [
    "AGREEMENT_KEY_FILE",
    "HOST_FILE",
    "SIGNING_KEY_FILE",
    "TLS_CERTIFICATE_FILE",
    "TLS_KEY_FILE",
    "HostIdentity",
    "validate_host_id",
]

HOST_FILE: Final = "host.json"
SIGNING_KEY_FILE: Final = "signing.key"
AGREEMENT_KEY_FILE: Final = "agreement.key"
TLS_KEY_FILE: Final = "tls.key"
TLS_CERTIFICATE_FILE: Final = "tls.crt"
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
_MAX_FILE_SIZE: Final = 64 * 1024


def validate_host_id(host_id: str) -> str:
    """Return `host_id` if it is a lower-case DNS label (1-63 chars), else raise ValueError."""
    if not is_valid_name(host_id):
        raise ValueError(
            f"invalid host id {str(host_id)[:80]!r}: use 1-63 lower-case letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return host_id


def _ed25519_seed(signer: InMemorySigner) -> bytes:
    """The raw 32-byte seed of an Ed25519 signer. SECRET."""
    key = serialization.load_der_private_key(signer.private_pkcs8_der(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("a host signing key must be Ed25519")
    return key.private_bytes_raw()


def _tls_public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class HostIdentity:
    """The keys that make a host (an HSA) itself: signing, key agreement, and TLS."""

    __slots__ = ("_agreement_private", "_agreement_public", "_host_id", "_signer", "_tls_key")

    def __init__(
        self,
        host_id: str,
        signer: InMemorySigner,
        agreement_private_key: bytes,
        tls_private_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        validate_host_id(host_id)
        if not isinstance(signer, InMemorySigner):
            raise TypeError("signer must be an InMemorySigner")
        if signer.algorithm is not SignatureAlgorithm.ED25519:
            raise ValueError("a host signing key must be Ed25519")
        if not isinstance(agreement_private_key, bytes) or len(agreement_private_key) != 32:
            raise ValueError("the agreement key must be 32 raw X25519 bytes")
        if not crypto.constant_time_equal(
            agreement_private_key, crypto.x25519_private_from_ed25519_seed(_ed25519_seed(signer))
        ):
            raise ValueError(
                "the agreement key is not the one derived from the signing key (identities made "
                "before host keys were derived cannot enroll; make a new node)"
            )
        if not isinstance(tls_private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            tls_private_key.curve, ec.SECP256R1
        ):
            raise ValueError("the TLS key must be an EC P-256 private key")
        self._host_id = host_id
        self._signer = signer
        self._agreement_private = agreement_private_key
        self._agreement_public = crypto.x25519_public_from_private(agreement_private_key)
        self._tls_key = tls_private_key

    def __repr__(self) -> str:
        return f"HostIdentity({self._host_id!r}, signing_key_id={self._signer.key_id[:16]})"

    @classmethod
    def generate(cls, host_id: str) -> HostIdentity:
        """A new identity: fresh random signing and TLS keys, the agreement key derived."""
        validate_host_id(host_id)
        signer = InMemorySigner.generate(SignatureAlgorithm.ED25519)
        return cls(
            host_id,
            signer,
            crypto.x25519_private_from_ed25519_seed(_ed25519_seed(signer)),
            ec.generate_private_key(ec.SECP256R1()),
        )

    # --- keys --------------------------------------------------------------------------------

    @property
    def host_id(self) -> str:
        """The host's id, unique in the domain."""
        return self._host_id

    @property
    def signer(self) -> Signer:
        """Signs sealed states and audit checkpoints with the host's Ed25519 key."""
        return self._signer

    @property
    def signing_public_key(self) -> PublicKey:
        """The Ed25519 public key other hosts verify this host's signatures with."""
        return self._signer.public_key

    @property
    def agreement_public_key(self) -> bytes:
        """The raw 32-byte X25519 public key the domain key is wrapped to."""
        return self._agreement_public

    @property
    def agreement_private_key(self) -> bytes:
        """The raw 32-byte X25519 private key. SECRET: never log or send it."""
        return self._agreement_private

    @property
    def tls_private_key(self) -> ec.EllipticCurvePrivateKey:
        """The P-256 key of the host's TLS certificate. SECRET."""
        return self._tls_key

    @property
    def tls_public_key(self) -> ec.EllipticCurvePublicKey:
        """The P-256 public key the domain CA certifies."""
        return self._tls_key.public_key()

    @property
    def tls_signer(self) -> Signer:
        """Signs with the TLS key (ECDSA P-256, SHA-256): the enrollment's proof that this host
        holds the key its certificate names. Never used for anything else."""
        return InMemorySigner(self._tls_key)

    def tls_private_key_pem(self) -> bytes:
        """The TLS key as unencrypted PKCS#8 PEM, as gRPC wants it. SECRET."""
        return self._tls_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def spiffe_id(self, domain_id: str) -> SpiffeId:
        """This host's SPIFFE id in `domain_id`: `spiffe://<domain>/hsa/<host id>`."""
        return SpiffeId(domain_id, "hsa", self._host_id)

    # --- files -------------------------------------------------------------------------------

    def _public_document(self) -> dict[str, object]:
        return {
            "format": _HOST_FORMAT,
            "version": _HOST_VERSION,
            "host_id": self._host_id,
            "signing_public_key": base64.b64encode(self.signing_public_key.spki_der).decode(),
            "agreement_public_key": base64.b64encode(self._agreement_public).decode(),
            "tls_public_key": _tls_public_pem(self._tls_key).decode("ascii"),
        }

    def save(self, directory: Path) -> None:
        """Write the identity to `directory` (created 0700 if missing); never overwrite one."""
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
            SIGNING_KEY_FILE: self._signer.private_pkcs8_pem(),
            AGREEMENT_KEY_FILE: base64.b64encode(self._agreement_private) + b"\n",
            TLS_KEY_FILE: self.tls_private_key_pem(),
        }
        for name, content in secrets_content.items():
            replace_file(directory / name, content, 0o600)
        # host.json last: its presence marks a complete identity.
        public = json.dumps(self._public_document(), indent=2, sort_keys=True) + "\n"
        replace_file(directory / HOST_FILE, public.encode("ascii"), 0o644)
        fsync_directory(directory)

    @classmethod
    def load(cls, directory: Path) -> HostIdentity:
        """Read an identity written by `save`, checking file modes and that its parts match."""
        directory = Path(directory)
        host_path = directory / HOST_FILE
        try:
            document = json.loads(host_path.read_bytes()[:_MAX_FILE_SIZE])
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

        signing_pem = read_secret_file(directory / SIGNING_KEY_FILE, _MAX_FILE_SIZE)
        agreement_text = read_secret_file(directory / AGREEMENT_KEY_FILE, _MAX_FILE_SIZE)
        tls_pem = read_secret_file(directory / TLS_KEY_FILE, _MAX_FILE_SIZE)
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
            identity = cls(host_id, signer, agreement_private, tls_key)
        except (ValueError, TypeError) as exc:
            raise TokenError(f"{directory} holds an invalid host identity: {exc}") from None
        expected = identity._public_document()
        for field in ("signing_public_key", "agreement_public_key", "tls_public_key"):
            if document[field] != expected[field]:
                raise TokenError(
                    f"{host_path} does not match the private keys in {directory}: {field} differs"
                )
        return identity

    def save_certificate(self, directory: Path, cert_pem: bytes) -> None:
        """Store the CA-issued TLS certificate as `tls.crt`, replacing an older one atomically."""
        cert = self._certificate_for_key(cert_pem)
        if cert is None:
            raise ValueError("the certificate is not for this host's TLS key")
        replace_file(
            Path(directory) / TLS_CERTIFICATE_FILE,
            cert.public_bytes(serialization.Encoding.PEM),
            0o644,
        )

    def load_certificate(self, directory: Path) -> bytes:
        """The stored TLS certificate (PEM), checked to be for this host's TLS key."""
        path = Path(directory) / TLS_CERTIFICATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenNotFoundError(f"no TLS certificate at {path}; enroll the host") from None
        cert = self._certificate_for_key(data)
        if cert is None:
            raise TokenError(f"{path} is not a certificate for this host's TLS key")
        return cert.public_bytes(serialization.Encoding.PEM)

    def _certificate_for_key(self, cert_pem: bytes) -> x509.Certificate | None:
        """The parsed certificate if it certifies this host's TLS key, else None."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return None
        if cert.public_key() != self.tls_public_key:
            return None
        return cert
