"""The real `hsm-kms` executable with keys of every kind against one local domain: signatures,
RSA-OAEP, MACs and data key pairs, checked with the `openssl` command outside the domain.

Exit 0 on success, 1 with exactly one line on stderr when the service refuses or a signature
or MAC does not verify, 2 on bad usage. One domain of two HSAs serves the whole module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import LocalCluster

pytestmark = pytest.mark.cluster

HSM_KMS = shutil.which("hsm-kms", path=str(Path(sys.executable).parent)) or "hsm-kms"
PSS = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"]
Result = subprocess.CompletedProcess[bytes]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("kms-keyspecs") / "domain", nodes=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def openssl() -> str:
    found = shutil.which("openssl")
    assert found, "the openssl command is needed"
    return found


def _run(args: list[str], domain: LocalCluster | None = None, stdin: bytes = b"") -> Result:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    env.pop("HSM_CLUSTER", None)
    if domain is not None:
        env["HSM_CLUSTER"] = str(domain.directory)
    return subprocess.run(
        [HSM_KMS, *args], input=stdin, capture_output=True, env=env, timeout=60, check=False
    )


def _ok(result: Result) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def _one_line_failure(result: Result) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert err.count("\n") == 1, err
    assert err.startswith("hsm-kms: error: "), err
    return err


def _usage_error(result: Result) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert err.count("\n") == 1, err
    return err


def _create(domain: LocalCluster, spec: str = "SYMMETRIC_DEFAULT", usage: str = "") -> str:
    options = ["--key-spec", spec] + (["--key-usage", usage] if usage else [])
    created = json.loads(_ok(_run(["create-key", *options, "--json"], domain)))
    assert (created["key_spec"], created["key_usage"]) == (spec, usage or "ENCRYPT_DECRYPT")
    return str(created["key_id"])


def _openssl(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize(
    ("spec", "algorithm", "options"),
    [("ECC_NIST_P256", "ECDSA_SHA_256", []), ("RSA_2048", "RSASSA_PSS_SHA_256", PSS)],
)
def test_signatures_verify_with_openssl(
    domain: LocalCluster,
    openssl: str,
    tmp_path: Path,
    spec: str,
    algorithm: str,
    options: list[str],
) -> None:
    key_id = _create(domain, spec, "SIGN_VERIFY")
    described = _ok(_run(["describe-key", key_id], domain)).decode()
    assert f"key spec:        {spec}\n" in described
    assert "key usage:       SIGN_VERIFY\n" in described
    pem, message, signature = tmp_path / "pub.pem", tmp_path / "msg", tmp_path / "sig.bin"
    _ok(_run(["get-public-key", key_id, "--out", str(pem)], domain))
    assert pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    message.write_bytes(b"pay 100 to alice\n")
    sign = ["sign", "--key-id", key_id, "--signing-algorithm", algorithm]
    _ok(_run([*sign, "--in", str(message), "--out", str(signature)], domain))
    check = [openssl, "dgst", "-sha256", "-verify", str(pem), *options]
    checked = _openssl([*check, "-signature", str(signature), str(message)])
    assert checked.returncode == 0, checked.stderr
    assert "Verified OK" in checked.stdout

    # verify: "valid" and exit 0; a changed message is one line and exit 1, --json says so too.
    verify = ["verify", "--key-id", key_id, "--signing-algorithm", algorithm]
    verify += ["--signature", str(signature)]
    assert _ok(_run([*verify, "--in", str(message)], domain)) == b"valid\n"
    changed = _run([*verify, "--in", "-"], domain, b"pay 999 to mallory\n")
    assert "signature is not valid" in _one_line_failure(changed)
    as_json = _run([*verify, "--in", "-", "--json"], domain, b"pay 999 to mallory\n")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == {"key_id": key_id, "signature_valid": False}

    # A digest signed with --digest (from stdin, base64 in the JSON) verifies as the message.
    digest = subprocess.run(
        [openssl, "dgst", "-sha256", "-binary", str(message)], capture_output=True, check=True
    ).stdout
    assert len(digest) == 32
    document = json.loads(_ok(_run([*sign, "--digest", "--json"], domain, digest)))
    assert (document["key_id"], document["signing_algorithm"]) == (key_id, algorithm)
    signature.write_bytes(base64.b64decode(document["signature"]))
    checked = _openssl([*check, "-signature", str(signature), str(message)])
    assert checked.returncode == 0, checked.stderr

    public = json.loads(_ok(_run(["get-public-key", key_id, "--json"], domain)))
    assert (public["key_spec"], public["key_usage"]) == (spec, "SIGN_VERIFY")
    assert algorithm in public["signing_algorithms"]
    assert public["encryption_algorithms"] == []
    der = _ok(_run(["get-public-key", key_id, "--format", "der"], domain))
    assert base64.b64decode(public["public_key"]) == der


def test_rsa_oaep_ciphertext_of_openssl_decrypts(
    domain: LocalCluster, openssl: str, tmp_path: Path
) -> None:
    key_id = _create(domain, "RSA_2048", "ENCRYPT_DECRYPT")
    pem, secret, sealed = tmp_path / "pub.pem", tmp_path / "pin.txt", tmp_path / "pin.bin"
    _ok(_run(["get-public-key", key_id, "--out", str(pem)], domain))
    secret.write_bytes(b"PIN 0000 and a bit more\n")
    encrypted = _openssl(
        [
            *[openssl, "pkeyutl", "-encrypt", "-pubin", "-inkey", str(pem)],
            *["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"],
            *["-pkeyopt", "rsa_mgf1_md:sha256", "-in", str(secret), "-out", str(sealed)],
        ]
    )
    assert encrypted.returncode == 0, encrypted.stderr
    oaep = ["--encryption-algorithm", "RSAES_OAEP_SHA_256"]
    decrypt = ["decrypt", "--in", str(sealed), *oaep]
    assert _ok(_run([*decrypt, "--key-id", key_id], domain)) == secret.read_bytes()

    # hsm-kms's own RSA ciphertext: its JSON names the key from --key-id (it has no header).
    document = json.loads(
        _ok(_run(["encrypt", "--key-id", key_id, *oaep, "--json"], domain, b"round trip"))
    )
    assert document["key_id"] == key_id
    blob = base64.b64decode(document["ciphertext_blob"])
    assert len(blob) == 256
    back = json.loads(_ok(_run(["decrypt", "--key-id", key_id, *oaep, "--json"], domain, blob)))
    assert (back["key_id"], base64.b64decode(back["plaintext"])) == (key_id, b"round trip")

    # Refused before any call: no --key-id to decrypt, a context with RSA-OAEP.
    assert "--key-id" in _usage_error(_run(decrypt, domain))
    with_context = ["encrypt", "--key-id", key_id, *oaep, "--context", "a=b"]
    assert "--context" in _usage_error(_run(with_context, domain, b"x"))


def test_macs_verify_and_a_changed_message_does_not(domain: LocalCluster, tmp_path: Path) -> None:
    key_id = _create(domain, "HMAC_256", "GENERATE_VERIFY_MAC")
    message, mac = tmp_path / "msg", tmp_path / "msg.mac"
    message.write_bytes(b"session 42 for bob")
    algorithm = ["--key-id", key_id, "--mac-algorithm", "HMAC_SHA_256"]
    _ok(_run(["generate-mac", *algorithm, "--in", str(message), "--out", str(mac)], domain))
    assert len(mac.read_bytes()) == 32
    verify = ["verify-mac", *algorithm, "--mac", str(mac)]
    assert _ok(_run([*verify, "--in", str(message)], domain)) == b"valid\n"
    changed = _run([*verify, "--in", "-"], domain, b"session 43 for bob")
    assert "MAC is not valid" in _one_line_failure(changed)
    document = json.loads(_ok(_run(["generate-mac", *algorithm, "--json"], domain, b"x")))
    assert len(base64.b64decode(document["mac"])) == 32
    err = _one_line_failure(
        _run(["generate-mac", "--key-id", key_id, "--mac-algorithm", "HMAC_SHA_512"], domain, b"x")
    )
    assert "INVALID_ARGUMENT" in err


def test_data_key_pair_files(domain: LocalCluster, openssl: str, tmp_path: Path) -> None:
    key_id = _create(domain)
    private, sealed, public = tmp_path / "priv.der", tmp_path / "priv.bin", tmp_path / "pub.der"
    pair = [
        *["generate-data-key-pair", "--key-id", key_id, "--key-pair-spec", "ECC_NIST_P256"],
        *["--out-private-key", str(private), "--out-private-key-ciphertext", str(sealed)],
        *["--out-public-key", str(public), "--context", "app=signer"],
    ]
    _ok(_run(pair, domain))
    assert private.stat().st_mode & 0o777 == 0o600
    derived = subprocess.run(
        [openssl, "pkey", "-in", str(private), "-inform", "DER", "-pubout", "-outform", "DER"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert derived.returncode == 0, derived.stderr.decode()
    assert derived.stdout == public.read_bytes()
    opened = _run(["decrypt", "--in", str(sealed), "--context", "app=signer"], domain)
    assert _ok(opened) == private.read_bytes()

    # An existing private key file is never overwritten: one line, exit 1, the file unchanged.
    before = private.read_bytes()
    sealed.unlink()
    public.unlink()
    assert "File exists" in _one_line_failure(_run(pair, domain))
    assert private.read_bytes() == before

    bare = json.loads(
        _ok(
            _run(
                [
                    *["generate-data-key-pair", "--key-id", key_id, "--without-plaintext"],
                    *["--key-pair-spec", "RSA_2048", "--json"],
                ],
                domain,
            )
        )
    )
    assert set(bare) == {"key_id", "key_pair_spec", "private_key_ciphertext_blob", "public_key"}
    assert bare["key_pair_spec"] == "RSA_2048"


def test_usage_errors_and_refusals(domain: LocalCluster) -> None:
    symmetric = _create(domain)
    sign = ["sign", "--key-id", symmetric, "--signing-algorithm", "ECDSA_SHA_256", "--json"]
    err = _one_line_failure(_run(sign, domain, b"message"))
    assert "INVALID_ARGUMENT" in err
    assert "SYMMETRIC_DEFAULT" in err
    # A message over 4096 bytes is refused before any call, pointing to --digest.
    assert "--digest" in _usage_error(_run(sign, domain, b"m" * 4097))
    err = _usage_error(_run(["create-key", "--key-spec", "HMAC_256"], domain))
    assert "GENERATE_VERIFY_MAC" in err
    err = _usage_error(
        _run(
            [
                *["create-key", "--key-spec", "RSA_2048", "--key-usage", "SIGN_VERIFY"],
                "--enable-rotation",
            ],
            domain,
        )
    )
    assert "rotate" in err
    assert "invalid choice" in _run(["create-key", "--key-spec", "RSA_1024"]).stderr.decode()


def test_import_key_material_from_a_file(domain: LocalCluster, tmp_path: Path) -> None:
    """An EXTERNAL HMAC key takes material from a file (wrapped inside hsm-kms): its MACs
    equal Python's hmac on the same bytes; deleted, it refuses use; other material is refused;
    the same material brings it back."""
    created = json.loads(
        _ok(
            _run(
                [
                    *["create-key", "--origin", "EXTERNAL", "--key-spec", "HMAC_256"],
                    *["--key-usage", "GENERATE_VERIFY_MAC", "--json"],
                ],
                domain,
            )
        )
    )
    assert (created["state"], created["origin"]) == ("pending-import", "EXTERNAL")
    key_id = created["key_id"]
    material, other = tmp_path / "hmac.key", tmp_path / "other.key"
    material.write_bytes(os.urandom(48))
    other.write_bytes(os.urandom(48))
    (tmp_path / "msg").write_bytes(b"imported")
    imported = json.loads(
        _ok(
            _run(
                [
                    *["import-key-material", key_id, "--material", str(material)],
                    *["--wrapping-algorithm", "RSA_AES_KEY_WRAP_SHA_256", "--json"],
                ],
                domain,
            )
        )
    )
    assert imported["state"] == "enabled"
    mac_args = ["generate-mac", "--key-id", key_id, "--mac-algorithm", "HMAC_SHA_256"]
    mac = _ok(_run([*mac_args, "--in", str(tmp_path / "msg"), "--out", "-"], domain))
    assert mac == hmac.new(material.read_bytes(), b"imported", hashlib.sha256).digest()
    _ok(_run(["delete-imported-key-material", key_id], domain))
    assert "FAILED_PRECONDITION" in _one_line_failure(
        _run([*mac_args, "--in", str(tmp_path / "msg"), "--out", str(tmp_path / "m")], domain)
    )
    err = _one_line_failure(_run(["import-key-material", key_id, "--material", str(other)], domain))
    assert "same material" in err
    _ok(_run(["import-key-material", key_id, "--material", str(material)], domain))
    assert _ok(_run([*mac_args, "--in", str(tmp_path / "msg"), "--out", "-"], domain)) == mac


def test_tags_from_the_command_line(domain: LocalCluster) -> None:
    created = json.loads(_ok(_run(["create-key", "--tag", "team=payments", "--json"], domain)))
    key_id = created["key_id"]
    assert created["tags"] == {"team": "payments"}
    _ok(_run(["tag-resource", key_id, "--tag", "env=prod", "owner=ops"], domain))
    listed = json.loads(_ok(_run(["list-resource-tags", key_id, "--json"], domain)))
    assert listed == {"team": "payments", "env": "prod", "owner": "ops"}
    _ok(_run(["untag-resource", key_id, "--tag-key", "owner"], domain))
    text = _ok(_run(["list-resource-tags", key_id], domain)).decode()
    assert text.splitlines() == ["env=prod", "team=payments"]
    assert (
        "tags:            env=prod, team=payments"
        in _ok(_run(["describe-key", key_id], domain)).decode()
    )
    assert "reserved" in _one_line_failure(
        _run(["tag-resource", key_id, "--tag", "aws:x=1"], domain)
    )
    _usage_error(_run(["tag-resource", key_id], domain))
