"""Token references (file paths and RFC 7512 pkcs11: URIs), file tokens opened through them, and
the operator public key document that operators exchange."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from domain_core.errors import (
    AlreadyExistsError,
    InvalidInputError,
    MalformedMessageError,
    NotFoundError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.signers import (
    InMemorySigner,
    SignatureAlgorithm,
)
from domain_edge.file_tokens import (
    FileTokenSigner,
    create_file_token,
)
from domain_edge.tokens import (
    MODULE_ENV,
    OPERATOR_PUBLIC_FORMAT,
    FileTokenRef,
    Pkcs11TokenRef,
    format_pkcs11_uri,
    open_token,
    operator_public_document,
    parse_token_uri,
    read_operator_public,
    write_operator_public,
)

pytestmark = pytest.mark.unit

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
NO_ENV: dict[str, str] = {}
SCRYPT_N = 2**14  # the smallest allowed: keeps these tests fast


# --- parsing -------------------------------------------------------------------------------

PARSED = [
    ("alice.token", FileTokenRef(Path("alice.token"))),
    ("/abs/alice.token", FileTokenRef(Path("/abs/alice.token"))),
    ("./dir:with:colons/t", FileTokenRef(Path("dir:with:colons/t"))),
    ("file:alice.token", FileTokenRef(Path("alice.token"))),
    ("file:/abs/alice.token", FileTokenRef(Path("/abs/alice.token"))),
    ("file:///abs/my%20token", FileTokenRef(Path("/abs/my token"))),
    (
        f"pkcs11:token=alice?module-path={MODULE}",
        Pkcs11TokenRef(MODULE, "alice"),
    ),
    (
        f"pkcs11:token=alice;object=operator;id=%01%02%ff?module-path={MODULE}",
        Pkcs11TokenRef(MODULE, "alice", "operator", b"\x01\x02\xff"),
    ),
    (
        f"pkcs11:object=op%20key;token=My%20Token;type=private?module-path={MODULE}",
        Pkcs11TokenRef(MODULE, "My Token", "op key"),
    ),
    (
        "pkcs11:token=a%3Bb;object=x%3Fy?module-path=/opt/p11%20libs/m.so",
        Pkcs11TokenRef("/opt/p11 libs/m.so", "a;b", "x?y"),
    ),
    ("pkcs11:id=A;token=t?module-path=/m.so", Pkcs11TokenRef("/m.so", "t", None, b"A")),
]


@pytest.mark.parametrize(("reference", "expected"), PARSED)
def test_parse_token_uri(reference: str, expected: object) -> None:
    assert parse_token_uri(reference, environ=NO_ENV) == expected


REFUSED = [
    ("", "empty"),
    ("   ", "empty"),
    ("pkcs11:", "token=LABEL is missing"),
    ("pkcs11:object=k?module-path=/m.so", "token=LABEL is missing"),
    (
        "pkcs11:token=t",
        f"no PKCS#11 module: add ?module-path=/path/to/module.so or set {MODULE_ENV}",
    ),
    ("pkcs11:token=t?module-path=libsofthsm2.so", "must be an absolute path"),
    ("pkcs11:token=t?module-path=/m.so&pin-value=1234", "pin-value is refused"),
    ("pkcs11:token=t?module-path=/m.so&pin-source=file:/pin", "pin-source is refused"),
    ("pkcs11:token=t;slot-id=3?module-path=/m.so", "never by slot"),
    ("pkcs11:token=t;serial=42?module-path=/m.so", "'serial' is not supported"),
    ("pkcs11:token=t;colour=red?module-path=/m.so", "unknown attribute 'colour'"),
    ("pkcs11:token=t?module-name=softhsm2", "module-name is not supported"),
    ("pkcs11:token=t?module-path=/m.so&x=1", "unknown query attribute 'x'"),
    ("pkcs11:token=t;token=u?module-path=/m.so", "'token' is given twice"),
    ("pkcs11:token?module-path=/m.so", "has no '=' and value"),
    ("pkcs11:token=?module-path=/m.so", "token= is empty"),
    ("pkcs11:token=t;id=?module-path=/m.so", "id= must be 1 to 128 bytes"),
    ("pkcs11:token=t;type=public?module-path=/m.so", "type= must be 'private'"),
    ("pkcs11:token=%ff?module-path=/m.so", "token= is not UTF-8"),
    ("pkcs11:token=a%0Ab?module-path=/m.so", "control characters"),
    (f"pkcs11:token={'x' * 33}?module-path=/m.so", "longer than 32 bytes"),
    ("pkcs11:token=t#frag?module-path=/m.so", "no fragment"),
    ("file:", "file: has no path"),
    ("file://host/x", "empty host"),
    ("https://example.com/token", "unknown scheme 'https'"),
    ("a\x00b", "NUL"),
]


@pytest.mark.parametrize(("reference", "message"), REFUSED)
def test_parse_token_uri_refuses(reference: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        parse_token_uri(reference, environ=NO_ENV)


def test_module_path_from_environment() -> None:
    ref = parse_token_uri("pkcs11:token=t;object=k", environ={MODULE_ENV: MODULE})
    assert ref == Pkcs11TokenRef(MODULE, "t", "k")
    # The URI's own module-path wins over the environment.
    ref = parse_token_uri("pkcs11:token=t?module-path=/other.so", environ={MODULE_ENV: MODULE})
    assert isinstance(ref, Pkcs11TokenRef)
    assert ref.module_path == "/other.so"


def test_a_refusal_never_echoes_a_pin_it_refused() -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_token_uri("pkcs11:token=t;pin-value=s3cr3t-4242?module-path=/m.so", environ=NO_ENV)
    assert "pin-value is refused" in caught.value.message
    assert "--pin-file" in caught.value.message
    assert "s3cr3t" not in str(caught.value)
    with pytest.raises(InvalidInputError) as caught:
        parse_token_uri("pkcs11:token=t?module-path=/m.so&pin-value=s3cr3t-4242", environ=NO_ENV)
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    "ref",
    [
        Pkcs11TokenRef(MODULE, "alice"),
        Pkcs11TokenRef(MODULE, "My Token;?", "key/with%odd=chars", bytes(range(0, 256, 17))),
        Pkcs11TokenRef("/opt/a b/m.so", "t", None, b"\x00"),
    ],
)
def test_format_then_parse_round_trips(ref: Pkcs11TokenRef) -> None:
    assert parse_token_uri(ref.uri, environ=NO_ENV) == ref


def test_format_pkcs11_uri_shape() -> None:
    uri = format_pkcs11_uri("alice", key_label="op", cka_id=b"\x01\xab", module_path=MODULE)
    assert uri == f"pkcs11:token=alice;object=op;id=%01%ab?module-path={MODULE}"


# --- file tokens through open_token --------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(SignatureAlgorithm))
@pytest.mark.parametrize("prefix", ["", "file:"])
def test_open_file_token(tmp_path: Path, algorithm: SignatureAlgorithm, prefix: str) -> None:
    path = tmp_path / "alice.token"
    public_key = create_file_token(path, algorithm, b"pw", name="alice", scrypt_n=SCRYPT_N)
    asked: list[int] = []

    def secret() -> bytes:
        asked.append(1)
        return b"pw"

    signer = open_token(prefix + str(path), secret)
    assert isinstance(signer, FileTokenSigner)
    assert asked == [1]
    assert signer.public_key == public_key
    assert signer.name == "alice"
    public_key.verify(signer.sign(b"m"), b"m")


def test_open_file_token_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "t"
    create_file_token(path, SignatureAlgorithm.ED25519, b"pw", name="a", scrypt_n=SCRYPT_N)
    with pytest.raises(WrongPassphraseError):
        open_token(str(path), lambda: b"not it")


def test_missing_file_token_is_reported_before_asking_for_the_secret(tmp_path: Path) -> None:
    def secret() -> bytes:
        raise AssertionError("asked for a secret before finding the token")

    with pytest.raises(TokenNotFoundError, match="no token file"):
        open_token(str(tmp_path / "absent.token"), secret)


def test_open_token_with_unloadable_module_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-module.so"

    def secret() -> bytes:
        raise AssertionError("asked for a PIN before finding the token")

    with pytest.raises(TokenNotFoundError, match=str(missing)):
        open_token(f"pkcs11:token=t;object=k?module-path={missing}", secret)


# --- operator public key documents ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(SignatureAlgorithm))
def test_export_read_round_trip(tmp_path: Path, algorithm: SignatureAlgorithm) -> None:
    public_key = InMemorySigner.generate(algorithm).public_key
    path = tmp_path / "alice.pub.json"
    write_operator_public(path, "alice", public_key)
    document = json.loads(path.read_text())
    assert document["format"] == OPERATOR_PUBLIC_FORMAT
    assert document["version"] == 1
    assert document["operator_id"] == public_key.key_id
    assert read_operator_public(path) == ("alice", public_key)


def test_write_operator_public_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("keep me")
    key = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    with pytest.raises(AlreadyExistsError):
        write_operator_public(path, "a", key)
    assert path.read_text() == "keep me"


def _tampered(tmp_path: Path, **changes: object) -> Path:
    key = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
    document = operator_public_document("alice", key)
    document.update(changes)
    for name, value in changes.items():
        if value is None:
            del document[name]
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(document))
    return path


OTHER_KEY = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
P256_KEY = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256).public_key

TAMPERED = [
    ({"operator_id": OTHER_KEY.key_id}, "is not the id of its public key"),
    ({"operator_id": "AB" * 32}, "64 lowercase hex"),
    ({"public_key": OTHER_KEY.to_pem().decode()}, "is not the id of its public key"),
    ({"public_key": P256_KEY.to_pem().decode()}, "algorithm says ed25519 but the key is ecdsa"),
    ({"public_key": "not pem"}, "public_key"),
    ({"algorithm": "rsa"}, "unknown algorithm"),
    ({"format": "something-else"}, "format is not"),
    ({"version": 2}, "version is not 1"),
    ({"version": True}, "version is not 1"),
    ({"name": ""}, "operator name"),
    ({"name": "x" * 65}, "operator name"),
    ({"name": "a\nb"}, "operator name"),
    ({"extra": 1}, "unexpected"),
    ({"operator_id": None}, "missing"),
]


@pytest.mark.parametrize(("changes", "message"), TAMPERED)
def test_read_operator_public_refuses(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(MalformedMessageError, match=message):
        read_operator_public(_tampered(tmp_path, **changes))


@pytest.mark.parametrize("content", [b"", b"[]", b"\xff\xfe", b"{" * 10, b" " * (64 * 1024 + 1)])
def test_read_operator_public_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.json"
    path.write_bytes(content)
    with pytest.raises(MalformedMessageError):
        read_operator_public(path)


def test_read_operator_public_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no operator public key file"):
        read_operator_public(tmp_path / "absent.json")
