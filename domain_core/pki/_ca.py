"""The domain CA: creating it and issuing TLS certificates with SPIFFE-style names.

Invariants: every certificate the CA issues has a P-256 key, exactly one SPIFFE URI, `CA:FALSE`,
digitalSignature only and an extended key usage per kind; a server certificate also carries its
identity and role DNS names and no name of that namespace or wildcard otherwise; the CA signs
only for its own trust domain and never past its own expiry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from domain_core.limits import MAX_DNS_NAME_CHARS
from domain_core.pki._certificates import _basic_constraints, _ca_trust_domains
from domain_core.pki._names import (
    _BACKDATE,
    _SPIFFE_PREFIX,
    SERVER_KINDS,
    SpiffeId,
    _in_reserved_namespace,
    _require_aware,
    identity_dns_name,
    is_valid_trust_domain,
    role_dns_name,
)


class DomainCA:
    """The domain's certificate authority: a P-256 key and a self-signed CA certificate.

    `domain_edge.ca_files.save_domain_ca` writes the key unencrypted by default (a local demo
    domain) or encrypted under a passphrase; a production domain would keep it offline or in
    an HSM.
    """

    __slots__ = ("_certificate", "_domain_id", "_key")

    def __init__(
        self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey
    ) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise TypeError("the CA key must be an EC P-256 private key")
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the CA certificate does not match the CA key")
        constraints = _basic_constraints(certificate)
        if constraints is None or not constraints.ca:
            raise ValueError("the CA certificate is not a CA certificate")
        uris = _ca_trust_domains(certificate)
        if len(uris) != 1:
            raise ValueError("the CA certificate must name exactly one spiffe:// trust domain")
        self._certificate = certificate
        self._key = private_key
        self._domain_id = uris[0]

    def __repr__(self) -> str:
        return f"DomainCA({self._domain_id!r})"

    @classmethod
    def create(cls, domain_id: str, *, now: datetime, validity_days: int = 3650) -> DomainCA:
        """A new CA for trust domain `domain_id`, valid from `now` - 5 min for `validity_days`."""
        if not is_valid_trust_domain(domain_id):
            raise ValueError(f"invalid domain id {str(domain_id)[:80]!r}")
        _require_aware(now)
        if validity_days < 1:
            raise ValueError("validity_days must be at least 1")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-domain"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"hsm-domain CA {domain_id}"[:64]),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{_SPIFFE_PREFIX}{domain_id}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def domain_id(self) -> str:
        """The trust domain this CA issues for."""
        return self._domain_id

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._certificate

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate as PEM: the trust root for every TLS peer of the domain."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def certificate_der(self) -> bytes:
        """The CA certificate as DER: what the genesis pins in `DomainSettings`."""
        return self._certificate.public_bytes(serialization.Encoding.DER)

    def private_key_pem(self, passphrase: bytes | None = None) -> bytes:
        """The CA key as PKCS#8 PEM, encrypted under `passphrase` if one is given. SECRET.

        Without a passphrase the key is unencrypted (fit for a local demo domain only);
        ValueError for a passphrase that is not non-empty bytes.
        """
        encryption: serialization.KeySerializationEncryption
        if passphrase is None:
            encryption = serialization.NoEncryption()
        elif isinstance(passphrase, bytes) and passphrase:
            encryption = serialization.BestAvailableEncryption(passphrase)
        else:
            raise ValueError("the CA passphrase must be non-empty bytes")
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def issue(
        self,
        spiffe: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        *,
        now: datetime,
        validity_days: int = 365,
        dns_names: Sequence[str] = ("localhost",),
        ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    ) -> bytes:
        """Issue a TLS certificate (PEM) for `spiffe` over a P-256 `public_key`.

        The certificate is valid from `now` - 5 min for `validity_days`, cut at the CA's expiry.
        A server certificate (hsa, coordinator) gets the identity and role DNS names first
        (see the package docstring); `dns_names` may not hold a wildcard or a name of that
        namespace (ValueError), so no certificate can pass for another kind or identity.
        """
        if not isinstance(spiffe, SpiffeId):
            raise TypeError("spiffe must be a SpiffeId")
        if spiffe.domain != self._domain_id:
            raise ValueError(
                f"this CA issues for trust domain {self._domain_id!r}, not {spiffe.domain!r}"
            )
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("TLS certificates need an EC P-256 public key (gRPC refuses Ed25519)")
        not_before, not_after = self._validity(now, validity_days)
        names = _subject_alt_names(spiffe, dns_names, ip_addresses, self._domain_id)
        builder = self._leaf_builder(spiffe, public_key, not_before, not_after, names)
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _validity(self, now: datetime, validity_days: int) -> tuple[datetime, datetime]:
        """(not before, not after) of a certificate issued at `now`: 5 min back, cut at the
        CA's own expiry; ValueError if the CA is not valid then."""
        _require_aware(now)
        if validity_days < 1:
            raise ValueError("validity_days must be at least 1")
        not_before = now - _BACKDATE
        not_after = min(now + timedelta(days=validity_days), self._certificate.not_valid_after_utc)
        if not_after <= max(not_before, self._certificate.not_valid_before_utc):
            raise ValueError("the CA is not valid at `now`; create or renew the CA")
        return not_before, not_after

    def _leaf_builder(
        self,
        spiffe: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        not_before: datetime,
        not_after: datetime,
        names: list[x509.GeneralName],
    ) -> x509.CertificateBuilder:
        """The leaf certificate to sign: subject, validity, `CA:FALSE`, digitalSignature only,
        the extended key usage of its kind (clients only call; the others serve and call)."""
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if spiffe.kind != "client":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        ca_ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsm-domain"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, spiffe.kind),
                        x509.NameAttribute(NameOID.COMMON_NAME, spiffe.name),
                    ]
                )
            )
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )


def _subject_alt_names(
    spiffe: SpiffeId, dns_names: Sequence[str], ip_addresses: Sequence[str], domain_id: str
) -> list[x509.GeneralName]:
    """The subject alternative names of a leaf: its SPIFFE URI, the identity and role DNS names
    of a server, then the given DNS names and addresses. ValueError for a wildcard or a name
    in the namespace the CA derives from SPIFFE ids, or a SPIFFE id too long for its names."""
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise TypeError("dns_names and ip_addresses are sequences of strings")
    for name in dns_names:
        if not isinstance(name, str) or not name:
            raise TypeError("dns_names are non-empty strings")
        if "*" in name:
            raise ValueError(f"a wildcard DNS name ({name[:80]!r}) would match other servers")
        if _in_reserved_namespace(name, domain_id):
            raise ValueError(
                f"the DNS name {name[:80]!r} is reserved for the role and identity names the "
                "CA derives from SPIFFE ids"
            )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe.uri)]
    if spiffe.kind in SERVER_KINDS:
        derived = [identity_dns_name(spiffe), role_dns_name(spiffe.domain, spiffe.kind)]
        if max(len(d) for d in derived) > MAX_DNS_NAME_CHARS:
            raise ValueError(
                f"{spiffe.uri} is too long for its DNS names (at most "
                f"{MAX_DNS_NAME_CHARS} characters): use a shorter trust domain"
            )
        names += [x509.DNSName(d) for d in derived]
    names += [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    return names


def _serial_number() -> int:
    """A random positive serial of at most 159 bits (RFC 5280: at most 20 octets, positive)."""
    return max(1, x509.random_serial_number())
