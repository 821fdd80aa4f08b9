"""TLS keys for the coordinator and client certificates of a local domain.

Invariant: TLS keys are EC P-256 (gRPC's TLS stack refuses Ed25519 leaves), serialized as
unencrypted PKCS#8 PEM because gRPC reads them so; callers store them 0600.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def new_tls_key_pem() -> bytes:
    """A fresh P-256 private key as PKCS#8 PEM. SECRET."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def tls_public_key(key_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public half of a P-256 key made by `new_tls_key_pem`."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key.public_key()
