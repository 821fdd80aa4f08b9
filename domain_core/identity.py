"""A host's identity: its Ed25519 signing key, X25519 agreement key and P-256 TLS key.

Invariants kept here:
- a `HostIdentity` always holds three keys of the right types and a valid host id (a lower-case
  DNS label, so `spiffe://<domain>/hsa/<host id>` is a valid SPIFFE id);
- its X25519 agreement key is derived from its Ed25519 signing key (the same secret scalar,
  `crypto.x25519_private_from_ed25519_seed`), so the agreement public key is a function of the
  signing public key that every verifier of an enrollment recomputes, and a signature proves
  possession of both (`domain_core.enrollment`);
- no key material ever appears in a message or repr.

An identity lives in memory here; its directory on disk (`host.json` and three 0600 key
files) is read and written by `domain_edge.identity_files`.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core import crypto
from domain_core.pki import SpiffeId, is_valid_name
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm, Signer

__all__ = [
    "HostIdentity",
    "validate_host_id",
]


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

    def signing_private_key_pem(self) -> bytes:
        """The Ed25519 signing key as unencrypted PKCS#8 PEM, for its key file. SECRET."""
        return self._signer.private_pkcs8_pem()

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
