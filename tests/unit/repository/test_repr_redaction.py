"""No object that holds key material or a secret shows it in `repr()` or `str()`.

Each case builds one such object from a known secret (a private key's raw bytes, a domain or
backing key, a data key, a passphrase, a TLS key) and looks for the secret's bytes, its hex
(either case), its base64 and its Python bytes literal in what the object prints: the forms a
log line or a traceback would carry. Objects whose default repr would print a bytes field
(dataclasses) define their own or mark the field `repr=False`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from support.simulator import SimulatedDomain

from bench.verification import ChainBuilder
from deploy.localdomain import FAST_SCRYPT_N
from domain_core import ciphertext, crypto
from domain_core.envelope import EnvelopeDecryptor, EnvelopeEncryptor, parse_envelope_header
from domain_core.identity import HostIdentity
from domain_core.pki import DomainCA
from domain_core.signers import (
    InMemorySigner,
    SignatureAlgorithm,
)
from domain_edge.audit import AuditLog
from domain_edge.file_tokens import (
    create_file_token,
    load_file_token,
)
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2
from hsa_node.keycache import CachedKey
from hsa_node.node import DomainKeys, SigningSnapshot

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SECRET_32 = bytes(range(0xA0, 0xC0))  # a recognisable 32-byte "key"
SEED = bytes(range(0x40, 0x60))  # an Ed25519 private key (seed)
P256_SCALAR = 0x3C1E0B7D9F704D9E5904DA9E1A2B3C4D5E6F708192A3B4C5D6E7F80112233445
PASSPHRASE = b"tr0ub4dor&3 horse battery staple"


def _ed25519() -> tuple[InMemorySigner, bytes]:
    return InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(SEED)), SEED


def _p256() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.derive_private_key(P256_SCALAR, ec.SECP256R1())
    return key, P256_SCALAR.to_bytes(32, "big")


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _forms(secret: bytes) -> list[str]:
    """The ways a secret shows up in text."""
    forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]
    forms.append(repr(secret)[2:-1])  # the bytes literal's body
    if secret.isascii() and secret.decode().isprintable():
        forms.append(secret.decode())
    return [f for f in forms if len(f) >= 16]


def _assert_redacted(thing: object, *secrets: bytes) -> None:
    for text in (repr(thing), str(thing)):
        assert re.search(r"\w", text)  # it prints something
        for secret in secrets:
            for form in _forms(secret):
                assert form not in text, f"{type(thing).__name__} shows a secret: {text[:200]}"


# Each case: (the object, the secrets it holds). Built lazily, some need a directory.
Case = Callable[[Path], tuple[object, tuple[bytes, ...]]]


def _signer_ed25519(_: Path) -> tuple[object, tuple[bytes, ...]]:
    signer, seed = _ed25519()
    return signer, (seed,)


def _signer_p256(_: Path) -> tuple[object, tuple[bytes, ...]]:
    key, scalar = _p256()
    return InMemorySigner(key), (scalar, _pkcs8_pem(key))


def _file_token_signer(tmp: Path) -> tuple[object, tuple[bytes, ...]]:
    path = tmp / "alice.token"
    create_file_token(
        path, SignatureAlgorithm.ED25519, PASSPHRASE, name="alice", scrypt_n=FAST_SCRYPT_N
    )
    signer = load_file_token(path, PASSPHRASE)
    raw = signer.private_pkcs8_der()
    return signer, (PASSPHRASE, raw, raw[-32:])


def _host_identity(_: Path) -> tuple[object, tuple[bytes, ...]]:
    signer, seed = _ed25519()
    tls_key, scalar = _p256()
    agreement = crypto.x25519_private_from_ed25519_seed(seed)
    identity = HostIdentity("hsa-1", signer, agreement, tls_key)
    return identity, (seed, agreement, scalar, _pkcs8_pem(tls_key))


def _tls_material(_: Path) -> tuple[object, tuple[bytes, ...]]:
    key, scalar = _p256()
    pem = _pkcs8_pem(key)
    return TlsMaterial(ca_pem=b"ca", cert_pem=b"cert", key_pem=pem), (pem, scalar)


def _domain_ca(_: Path) -> tuple[object, tuple[bytes, ...]]:
    ca = DomainCA.create("local", now=NOW)
    key = ca._key  # the CA's private key, to know what must not show
    return ca, (_pkcs8_pem(key), key.private_numbers().private_value.to_bytes(32, "big"))


def _domain_keys(_: Path) -> tuple[object, tuple[bytes, ...]]:
    return DomainKeys(generation=2, keys={1: SEED, 2: SECRET_32}), (SEED, SECRET_32)


def _signing_snapshot(_: Path) -> tuple[object, tuple[bytes, ...]]:
    sim = SimulatedDomain.create()
    keys = sim.keys_at(sim.head, "hsa-1")
    return SigningSnapshot(head=sim.head, keys=keys), tuple(keys.values())


def _cached_key(_: Path) -> tuple[object, tuple[bytes, ...]]:
    metadata = keys_pb2.KeyMetadata(key_id="k-1", current_backing_version=2, metadata_version=3)
    record = keys_pb2.KeyRecord(metadata=metadata.SerializeToString(), revision=4)
    cached = CachedKey(
        key_id="k-1",
        metadata=metadata,
        backing_keys={1: SEED, 2: SECRET_32},
        record=record,
        checked_at=0.0,
    )
    return cached, (SEED, SECRET_32)


def _data_key_blob() -> bytes:
    """The data key SECRET_32 encrypted under the backing key SEED, as GenerateDataKey does."""
    return ciphertext.encrypt(SEED, ciphertext.new_key_id(), 1, SECRET_32, {"app": "x"})


def _envelope_encryptor(_: Path) -> tuple[object, tuple[bytes, ...]]:
    return EnvelopeEncryptor(SECRET_32, _data_key_blob(), {"app": "x"}), (SECRET_32,)


def _envelope_decryptor(_: Path) -> tuple[object, tuple[bytes, ...]]:
    encryptor = EnvelopeEncryptor(SECRET_32, _data_key_blob(), {"app": "x"})
    header = parse_envelope_header(encryptor.header())
    return EnvelopeDecryptor(SECRET_32, header), (SECRET_32,)


def _audit_log(tmp: Path) -> tuple[object, tuple[bytes, ...]]:
    signer, seed = _ed25519()
    return AuditLog(tmp / "audit.log", host_id="hsa-1", signer=signer), (seed,)


def _simulated_domain(_: Path) -> tuple[object, tuple[bytes, ...]]:
    sim = SimulatedDomain.create(hosts=1, operators=1, threshold=1)
    host = sim.hosts["hsa-1"]
    keys = sim.keys_at(sim.head, "hsa-1")
    return host, (host.agreement_private_key, *keys.values())


def _bench_chain_builder(_: Path) -> tuple[object, tuple[bytes, ...]]:
    builder = ChainBuilder.create(operators=1, threshold=1, hosts=1)
    secrets = (builder.hosts[0].agreement_private_key, *builder.keys.values())
    return builder, secrets


CASES: dict[str, Case] = {
    "InMemorySigner (Ed25519)": _signer_ed25519,
    "InMemorySigner (P-256)": _signer_p256,
    "FileTokenSigner": _file_token_signer,
    "HostIdentity": _host_identity,
    "TlsMaterial": _tls_material,
    "DomainCA": _domain_ca,
    "DomainKeys": _domain_keys,
    "SigningSnapshot": _signing_snapshot,
    "CachedKey": _cached_key,
    "EnvelopeEncryptor": _envelope_encryptor,
    "EnvelopeDecryptor": _envelope_decryptor,
    "AuditLog": _audit_log,
    "SimHost (tests)": _simulated_domain,
    "ChainBuilder (bench)": _bench_chain_builder,
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_repr_and_str_leave_secrets_out(case: Case, tmp_path: Path) -> None:
    thing, secrets = case(tmp_path)
    assert secrets
    assert all(len(s) >= 16 for s in secrets)
    try:
        _assert_redacted(thing, *secrets)
    finally:
        close = getattr(thing, "close", None)
        if callable(close):
            close()


@dataclass
class _Leaky:
    key: bytes


def test_the_check_would_see_a_leak() -> None:
    """The detector itself: a dataclass that prints its key (in every form) is caught."""
    with pytest.raises(AssertionError, match="shows a secret"):
        _assert_redacted(_Leaky(SECRET_32), SECRET_32)
    with pytest.raises(AssertionError, match="shows a secret"):
        _assert_redacted(_Leaky(SECRET_32.hex().encode()), SECRET_32)
    with pytest.raises(AssertionError, match="shows a secret"):
        _assert_redacted(_Leaky(PASSPHRASE), PASSPHRASE)
