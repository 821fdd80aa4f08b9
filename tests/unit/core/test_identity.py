"""Tests for domain_core.identity: host keys, their files, modes and consistency checks."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import nacl.public
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from domain_core.errors import TokenError, TokenNotFoundError
from domain_core.identity import (
    HostIdentity,
    validate_host_id,
)
from domain_core.pki import DomainCA
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_edge.identity_files import (
    AGREEMENT_KEY_FILE,
    HOST_FILE,
    SIGNING_KEY_FILE,
    TLS_CERTIFICATE_FILE,
    TLS_KEY_FILE,
    load_host_certificate,
    load_host_identity,
    save_host_certificate,
    save_host_identity,
)

pytestmark = pytest.mark.unit

SECRET_FILES = (SIGNING_KEY_FILE, AGREEMENT_KEY_FILE, TLS_KEY_FILE)
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def identity() -> HostIdentity:
    return HostIdentity.generate("hsa-1")


@pytest.fixture
def saved(tmp_path: Path, identity: HostIdentity) -> Path:
    directory = tmp_path / "hsa-1"
    save_host_identity(identity, directory)
    return directory


def test_generate_has_three_keys_of_the_right_kinds(identity: HostIdentity) -> None:
    assert identity.host_id == "hsa-1"
    assert identity.signing_public_key.algorithm is SignatureAlgorithm.ED25519
    identity.signing_public_key.verify(identity.signer.sign(b"state"), b"state")
    assert len(identity.agreement_public_key) == 32
    assert len(identity.agreement_private_key) == 32
    # the agreement pair is a real X25519 pair (as pynacl computes it)
    derived = bytes(nacl.public.PrivateKey(identity.agreement_private_key).public_key)
    assert derived == identity.agreement_public_key
    assert isinstance(identity.tls_private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(identity.tls_private_key.curve, ec.SECP256R1)
    assert b"BEGIN PRIVATE KEY" in identity.tls_private_key_pem()
    assert identity.spiffe_id("example.org").uri == "spiffe://example.org/hsa/hsa-1"


def test_two_identities_differ() -> None:
    a, b = HostIdentity.generate("a"), HostIdentity.generate("b")
    assert a.signing_public_key != b.signing_public_key
    assert a.agreement_public_key != b.agreement_public_key
    assert a.tls_public_key != b.tls_public_key


@pytest.mark.parametrize(
    "host_id",
    ["", "-a", "a-", "A", "host_1", "h.1", "a" * 64, "hsa-1\n", "hsa 1", "é", "hsa/1"],
)
def test_invalid_host_ids_are_refused(host_id: str) -> None:
    with pytest.raises(ValueError, match="invalid host id"):
        HostIdentity.generate(host_id)
    with pytest.raises(ValueError, match="invalid host id"):
        validate_host_id(host_id)


@pytest.mark.parametrize("host_id", ["a", "0", "hsa-1", "a" * 63, "1-2-3"])
def test_valid_host_ids(host_id: str) -> None:
    assert validate_host_id(host_id) == host_id


def test_save_load_roundtrip(saved: Path, identity: HostIdentity) -> None:
    loaded = load_host_identity(saved)
    assert loaded.host_id == identity.host_id
    assert loaded.signing_public_key == identity.signing_public_key
    assert loaded.agreement_public_key == identity.agreement_public_key
    assert loaded.agreement_private_key == identity.agreement_private_key
    assert loaded.tls_public_key == identity.tls_public_key
    identity.signing_public_key.verify(loaded.signer.sign(b"x"), b"x")


def test_saved_file_modes(saved: Path) -> None:
    assert mode(saved) == 0o700
    for name in SECRET_FILES:
        assert mode(saved / name) == 0o600, name
    assert mode(saved / HOST_FILE) == 0o644
    assert sorted(p.name for p in saved.iterdir()) == sorted([HOST_FILE, *SECRET_FILES])


def test_public_file_holds_no_secret(saved: Path, identity: HostIdentity) -> None:
    document = json.loads((saved / HOST_FILE).read_text())
    assert document["host_id"] == "hsa-1"
    assert base64.b64decode(document["signing_public_key"]) == identity.signing_public_key.spki_der
    assert base64.b64decode(document["agreement_public_key"]) == identity.agreement_public_key
    text = (saved / HOST_FILE).read_text()
    assert base64.b64encode(identity.agreement_private_key).decode() not in text
    assert "PRIVATE" not in text


@pytest.mark.parametrize("name", SECRET_FILES)
@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_secret_file_open_to_others(saved: Path, name: str, loose: int) -> None:
    os.chmod(saved / name, loose)
    with pytest.raises(TokenError, match="chmod 600"):
        load_host_identity(saved)


def test_load_accepts_0400(saved: Path, identity: HostIdentity) -> None:
    for name in SECRET_FILES:
        os.chmod(saved / name, 0o400)
    loaded = load_host_identity(saved)
    assert loaded.host_id == identity.host_id
    assert loaded.signing_public_key == identity.signing_public_key
    assert loaded.agreement_private_key == identity.agreement_private_key
    assert loaded.tls_public_key == identity.tls_public_key
    identity.signing_public_key.verify(loaded.signer.sign(b"x"), b"x")
    assert all(mode(saved / name) == 0o400 for name in SECRET_FILES)  # read, never changed


def test_save_refuses_to_overwrite(saved: Path) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_host_identity(HostIdentity.generate("hsa-1"), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


@pytest.mark.parametrize("name", [HOST_FILE, *SECRET_FILES])
def test_save_refuses_if_any_file_exists(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"old")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_host_identity(HostIdentity.generate("hsa-1"), tmp_path)
    assert (tmp_path / name).read_bytes() == b"old"


def test_save_into_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # noqa: S103 (a shared parent directory, on purpose)
    save_host_identity(HostIdentity.generate("hsa-1"), tmp_path)
    assert mode(tmp_path) == 0o755
    assert all(mode(tmp_path / name) == 0o600 for name in SECRET_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("name", [HOST_FILE, *SECRET_FILES])
def test_load_missing_file(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(TokenNotFoundError):
        load_host_identity(saved)


def test_load_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenNotFoundError):
        load_host_identity(tmp_path / "nothing")


@pytest.mark.parametrize("field", ["signing_public_key", "agreement_public_key", "tls_public_key"])
def test_load_refuses_public_file_not_matching_keys(saved: Path, field: str) -> None:
    other = HostIdentity.generate("hsa-1")
    other_dir = saved.parent / "other"
    save_host_identity(other, other_dir)
    document = json.loads((saved / HOST_FILE).read_text())
    document[field] = json.loads((other_dir / HOST_FILE).read_text())[field]
    (saved / HOST_FILE).write_text(json.dumps(document))
    with pytest.raises(TokenError, match=field):
        load_host_identity(saved)


def test_load_refuses_swapped_secret_file(saved: Path) -> None:
    other_dir = saved.parent / "other"
    save_host_identity(HostIdentity.generate("hsa-1"), other_dir)
    os.replace(other_dir / TLS_KEY_FILE, saved / TLS_KEY_FILE)
    with pytest.raises(TokenError, match="tls_public_key"):
        load_host_identity(saved)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (SIGNING_KEY_FILE, b"garbage"),
        (AGREEMENT_KEY_FILE, b"not base64!"),
        (AGREEMENT_KEY_FILE, base64.b64encode(b"short")),
        (TLS_KEY_FILE, b"garbage"),
        (HOST_FILE, b"{not json"),
        (HOST_FILE, b"[]"),
    ],
)
def test_load_refuses_malformed_files(saved: Path, name: str, content: bytes) -> None:
    (saved / name).write_bytes(content)
    with pytest.raises(TokenError) as info:
        load_host_identity(saved)
    assert "garbage" not in str(info.value)


def test_load_refuses_wrong_key_types(saved: Path) -> None:
    # an ECDSA key where the Ed25519 signing key belongs
    pem = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256).private_pkcs8_pem()
    (saved / SIGNING_KEY_FILE).write_bytes(pem)
    with pytest.raises(TokenError, match="Ed25519"):
        load_host_identity(saved)


def test_load_refuses_edited_host_id(saved: Path) -> None:
    document = json.loads((saved / HOST_FILE).read_text())
    document["host_id"] = "Bad Host"
    (saved / HOST_FILE).write_text(json.dumps(document))
    with pytest.raises(TokenError, match="host id"):
        load_host_identity(saved)


def test_repr_holds_no_secret(identity: HostIdentity) -> None:
    text = repr(identity)
    assert "hsa-1" in text
    assert identity.agreement_private_key.hex() not in text
    assert base64.b64encode(identity.agreement_private_key).decode() not in text


def test_certificate_save_and_load(saved: Path, identity: HostIdentity) -> None:
    ca = DomainCA.create("example.org", now=NOW)
    cert = ca.issue(identity.spiffe_id("example.org"), identity.tls_public_key, now=NOW)
    save_host_certificate(identity, saved, cert)
    assert mode(saved / TLS_CERTIFICATE_FILE) == 0o644
    assert load_host_certificate(identity, saved) == cert
    # renewal replaces the old certificate
    renewed = ca.issue(identity.spiffe_id("example.org"), identity.tls_public_key, now=NOW)
    save_host_certificate(identity, saved, renewed)
    assert load_host_certificate(load_host_identity(saved), saved) == renewed


def test_certificate_for_another_key_is_refused(saved: Path, identity: HostIdentity) -> None:
    ca = DomainCA.create("example.org", now=NOW)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = ca.issue(identity.spiffe_id("example.org"), stranger, now=NOW)
    with pytest.raises(ValueError, match="not for this host"):
        save_host_certificate(identity, saved, cert)
    (saved / TLS_CERTIFICATE_FILE).write_bytes(cert)
    with pytest.raises(TokenError, match="not a certificate for this host"):
        load_host_certificate(identity, saved)


def test_missing_certificate(saved: Path, identity: HostIdentity) -> None:
    with pytest.raises(TokenNotFoundError, match="enroll"):
        load_host_certificate(identity, saved)
