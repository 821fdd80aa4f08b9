"""The real `hsm-kms` executable with grants against one local domain: the key's owner (the
demo application, through one HSA) grants bob the use of its key under a constraint on the
encryption context; bob (his own client certificate, through the other HSA) uses it at once
with the grant token, is held to the constraint, and retires the grant, after which he is
refused.

Exit 0 on success, 1 with exactly one line on stderr when the service refuses, 2 on bad usage
(before any connection). One domain of two HSAs serves the whole module.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.cluster import LocalCluster

from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge.ca_files import load_domain_ca
from domain_edge.files import SECRET_MODE, write_new_file

pytestmark = pytest.mark.cluster

HSM_KMS = shutil.which("hsm-kms", path=str(Path(sys.executable).parent)) or "hsm-kms"
BOB = "spiffe://local/client/bob"
Result = subprocess.CompletedProcess[bytes]


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("kms-grants") / "domain", nodes=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def owner(domain: LocalCluster) -> list[str]:
    """The demo application (identity from the domain directory), through hsa-1."""
    return ["--cluster", str(domain.directory), "--endpoint", domain.address("hsa-1")]


@pytest.fixture(scope="module")
def bob(domain: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Bob: a client certificate of his own from the domain CA, through hsa-2."""
    directory = tmp_path_factory.mktemp("bob")
    ca = load_domain_ca(domain.layout.root / "ca")
    key_pem = new_tls_key_pem()
    cert_pem = ca.issue(
        SpiffeId("local", "client", "bob"), tls_public_key(key_pem), now=datetime.now(UTC)
    )
    cert, key = directory / "bob.crt", directory / "bob.key"
    cert.write_bytes(cert_pem)
    write_new_file(key, key_pem, SECRET_MODE)
    return [
        *("--endpoint", domain.address("hsa-2")),
        *("--ca", str(domain.layout.ca_cert)),
        *("--cert", str(cert), "--key", str(key)),
    ]


def _run(args: list[str], stdin: bytes = b"") -> Result:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    env.pop("HSM_CLUSTER", None)
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
    """The error line of a usage error (argparse's own come after the usage lines)."""
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert result.stdout == b""
    last = err.splitlines()[-1]
    assert re.match(r"hsm-kms [a-z-]+: error: ", last), err
    return last


def _refused_eventually(args: list[str], stdin: bytes, timeout: float = 10.0) -> str:
    """The one-line PERMISSION_DENIED of a command, once every HSA holds what refuses it."""
    deadline = time.monotonic() + timeout
    while True:
        result = _run(args, stdin)
        if result.returncode == 1 and b"[PERMISSION_DENIED]" in result.stderr:
            return _one_line_failure(result)
        assert result.returncode == 0, result.stderr.decode()
        assert time.monotonic() < deadline, "still allowed"
        time.sleep(0.2)


def test_bob_uses_a_constrained_grant_at_once_and_retires_it(
    owner: list[str], bob: list[str], tmp_path: Path
) -> None:
    key_id = json.loads(_ok(_run([*owner, "create-key", "--json"])))["key_id"]
    token = tmp_path / "tok.bin"
    create = ["create-grant", "--key-id", key_id, "--grantee", BOB]
    create += ["--operations", "encrypt", "decrypt", "--constraint-subset", "tenant=acme"]
    created = json.loads(
        _ok(_run([*owner, *create, "--name", "bob-acme", "--out-token", str(token), "--json"]))
    )
    assert set(created) == {"grant_id", "out_token"}  # the token only in its file
    assert len(created["grant_id"]) == 64
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    # A second grant never overwrites the token file (refused before any call).
    again = _run([*owner, *create, "--out-token", str(token)])
    assert "exists" in _usage_error(again)

    # Bob, through the other HSA, at once: the token carries the grant.
    encrypt = [*bob, "--grant-token", str(token), "encrypt", "--key-id", key_id]
    sealed = tmp_path / "acme.bin"
    _ok(_run([*encrypt, "--context", "tenant=acme", "--out", str(sealed)], b"for acme"))
    decrypt = ["decrypt", "--in", str(sealed), "--context", "tenant=acme"]
    assert _ok(_run([*owner, *decrypt])) == b"for acme"
    # The constraint holds: another tenant is refused, in one line.
    other = _run([*encrypt, "--context", "tenant=other", "--out", str(tmp_path / "x")], b"x")
    assert "[PERMISSION_DENIED]" in _one_line_failure(other)
    assert not (tmp_path / "x").exists()

    (listed,) = json.loads(_ok(_run([*owner, "list-grants", key_id, "--json"])))
    assert listed["grant_id"] == created["grant_id"]
    assert (listed["grantee_principal"], listed["name"]) == (BOB, "bob-acme")
    assert listed["operations"] == ["encrypt", "decrypt"]
    assert listed["constraints"] == {"encryption_context_subset": {"tenant": "acme"}}
    text = _ok(_run([*owner, "list-grants", key_id])).decode()
    line = [created["grant_id"], BOB, "encrypt,decrypt", "context has tenant=acme", "bob-acme"]
    assert text == "  ".join(line) + "\n"

    # Bob retires it with its token; then he is refused, token or not.
    retired = _ok(_run([*bob, "retire-grant", "--grant-token", str(token)])).decode()
    assert f"key id:          {key_id}\n" in retired
    assert "key grants:" not in retired
    _refused_eventually([*encrypt, "--context", "tenant=acme", "--out", "-"], b"late")
    assert json.loads(_ok(_run([*owner, "list-grants", key_id, "--json"]))) == []


def test_a_token_under_json_and_revoking_by_the_owner(
    owner: list[str], bob: list[str], tmp_path: Path
) -> None:
    key_id = _ok(_run([*owner, "create-key"])).decode().strip()
    create = ["create-grant", "--key-id", key_id, "--grantee", BOB, "--operations", "describe"]
    created = json.loads(_ok(_run([*owner, *create, "--json"])))
    token = tmp_path / "tok.bin"
    write_new_file(token, base64.b64decode(created["grant_token"]), SECRET_MODE)
    described = _run([*bob, "--grant-token", str(token), "describe-key", key_id, "--json"])
    assert json.loads(_ok(described))["key_id"] == key_id
    # Text output: the id alone (no token, no file).
    carol = ["--grantee", "spiffe://local/client/carol", "--name", "two"]
    second = _ok(_run([*owner, *create, *carol])).decode()
    grant_id = second.removesuffix("\n")
    assert len(grant_id) == 64
    listing = _ok(_run([*owner, "list-grants", key_id, "--grant-id", grant_id])).decode()
    assert listing == f"{grant_id}  spiffe://local/client/carol  describe  -  two\n"

    revoked = _run([*owner, "revoke-grant", "--key-id", key_id, "--grant-id", created["grant_id"]])
    assert "key grants:      1 (list-grants shows them)" in _ok(revoked).decode()
    # Bob may not revoke (carol's grant); a grant that is gone is NOT_FOUND.
    refused = _run([*bob, "revoke-grant", "--key-id", key_id, "--grant-id", grant_id])
    assert "[PERMISSION_DENIED]" in _one_line_failure(refused)
    gone = _run([*owner, "revoke-grant", "--key-id", key_id, "--grant-id", created["grant_id"]])
    assert "[NOT_FOUND]" in _one_line_failure(gone)
    _refused_eventually([*bob, "--grant-token", str(token), "describe-key", key_id], b"")


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "tok.bin"
    token.write_bytes(b"token")
    token.chmod(0o644)
    result = _run(["--endpoint", "127.0.0.1:1", "--grant-token", str(token), "list-keys"])
    assert "chmod 600" in _one_line_failure(result)


CREATE = ["create-grant", "--key-id", "k", "--grantee", BOB]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (CREATE, "--operations"),
        ([*CREATE, "--operations", "encrypt", "--constraint-subset", "tenant"], "not key=value"),
        ([*CREATE, "--operations", "encrypt", "--constraint-subset", "=x"], "empty key"),
        ([*CREATE, "--operations", "sign", "--constraint-equals", "a=1"], "not with sign"),
        ([*CREATE, "--operations", "admin"], "invalid choice: 'admin'"),
        ([*CREATE, "--operations", "encrypt", "--out-token", "-"], "not written to stdout"),
        (["retire-grant"], "say which grant"),
        (["retire-grant", "--grant-id", "g"], "needs --key-id"),
        (["retire-grant", "--grant-token", "a", "--grant-token", "b"], "one --grant-token"),
        (["revoke-grant", "--key-id", "k"], "--grant-id"),
        (["list-keys", *(["--grant-token", "t"] * 11)], "at most 10"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    assert message in _usage_error(_run(args))
