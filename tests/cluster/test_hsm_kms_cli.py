"""The real `hsm-kms` executable against a local domain: output formats, exit codes, messages.

Exit 0 on success, 1 with exactly one line on stderr when the service refuses, 2 on bad usage.
Every test starts its own domain (`local_cluster`), killed at teardown whatever the outcome.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.cluster import LocalCluster
from support.impostor import ImpostorServer

from domain_edge.transport import TlsMaterial
from kms_tool.cli import build_parser

pytestmark = pytest.mark.cluster

HSM_KMS = shutil.which("hsm-kms", path=str(Path(sys.executable).parent)) or "hsm-kms"
UNKNOWN_KEY = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
SECRET = b"a secret that only an HSA may see"


def _run(
    args: list[str], cluster: LocalCluster | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    env.pop("HSM_CLUSTER", None)
    if cluster is not None:
        env["HSM_CLUSTER"] = str(cluster.directory)
    return subprocess.run(
        [HSM_KMS, *args], input=stdin, capture_output=True, env=env, timeout=60, check=False
    )


def _ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def _one_line_failure(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, err)
    assert err.count("\n") == 1, err
    assert err.startswith("hsm-kms: error: "), err
    return err


def test_keys_encrypt_decrypt_and_refusals(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=2)
    created = json.loads(_ok(_run(["create-key", "--description", "cli", "--json"], cluster)))
    key_id = created["key_id"]
    assert created["state"] == "enabled"
    assert created["policy"]["grants"][0]["principals"] == [
        f"spiffe://{cluster.domain_id}/client/demo-app"
    ]
    # Plain output is the key id alone, for shell scripts.
    other = _ok(_run(["create-key"], cluster)).decode().strip()
    assert len(other) == 36
    # Run again with the same idempotency key (after a failure, say): the same key, not another.
    once = ["create-key", "--idempotency-key", "cli-run-7"]
    assert _ok(_run(once, cluster)) == _ok(_run(once, cluster))

    # stdin -> file -> stdout, binary-safe, with a context whose value holds '='.
    secret = b"\x00\xffbinary secret\n"
    blob = tmp_path / "secret.bin"
    context = ["--context", "app=orders", "q=a=b"]
    _ok(_run(["encrypt", "--key-id", key_id, "--out", str(blob), *context], cluster, secret))
    assert blob.stat().st_mode & 0o777 == 0o600
    assert _ok(_run(["decrypt", "--in", str(blob), *context], cluster)) == secret
    document = json.loads(
        _ok(_run(["decrypt", "--in", "-", "--json", *context], cluster, blob.read_bytes()))
    )
    assert document["key_id"] == key_id
    assert base64.b64decode(document["plaintext"]) == secret

    # The same blob with another context, or another key's id: one line, exit 1.
    err = _one_line_failure(_run(["decrypt", "--in", str(blob), "--context", "app=x"], cluster))
    assert "invalid ciphertext" in err
    _one_line_failure(_run(["decrypt", "--in", str(blob), "--key-id", other, *context], cluster))
    err = _one_line_failure(_run(["encrypt", "--key-id", UNKNOWN_KEY], cluster, b"x"))
    assert UNKNOWN_KEY in err
    assert "NOT_FOUND" in err
    err = _one_line_failure(_run(["describe-key", UNKNOWN_KEY], cluster))
    assert "does not exist" in err

    # Re-encrypt to the other key, then describe, list, rotate.
    moved = tmp_path / "moved.bin"
    _ok(
        _run(
            [
                *["re-encrypt", "--in", str(blob), "--destination-key-id", other],
                *["--out", str(moved), "--source-context", "app=orders", "q=a=b"],
                *["--destination-context", "to=b"],
            ],
            cluster,
        )
    )
    assert _ok(_run(["decrypt", "--in", str(moved), "--context", "to=b"], cluster)) == secret
    described = _ok(_run(["describe-key", key_id], cluster)).decode()
    assert f"key id:          {key_id}" in described
    listed = json.loads(_ok(_run(["list-keys", "--json"], cluster)))
    assert {key_id, other} <= {k["key_id"] for k in listed}
    rotated = json.loads(_ok(_run(["rotate-key", key_id, "--json"], cluster)))
    assert rotated["current_backing_version"] == 2
    assert _ok(_run(["decrypt", "--in", str(blob), *context], cluster)) == secret


def test_data_keys_policies_and_envelopes(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=2)
    key_id = _ok(_run(["create-key"], cluster)).decode().strip()

    # A data key: plaintext to a new 0600 file, its blob to another; the blob decrypts to it.
    dk, dk_blob = tmp_path / "dk.key", tmp_path / "dk.bin"
    _ok(
        _run(
            [
                *["generate-data-key", "--key-id", key_id],
                *["--out-plaintext", str(dk), "--out-ciphertext", str(dk_blob)],
            ],
            cluster,
        )
    )
    assert dk.stat().st_mode & 0o777 == 0o600
    assert len(dk.read_bytes()) == 32
    assert _ok(_run(["decrypt", "--in", str(dk_blob)], cluster)) == dk.read_bytes()
    without = json.loads(
        _ok(
            _run(
                ["generate-data-key", "--key-id", key_id, "--without-plaintext", "--json"], cluster
            )
        )
    )
    assert set(without) == {"key_id", "ciphertext_blob"}
    random = json.loads(_ok(_run(["generate-random", "--bytes", "48", "--json"], cluster)))
    assert len(base64.b64decode(random["random"])) == 48

    # A policy from a file: the demo app keeps admin and describe only.
    policy = tmp_path / "policy.json"
    me = f"spiffe://{cluster.domain_id}/client/demo-app"
    policy.write_text(
        json.dumps({"grants": [{"principals": [me], "operations": ["describe", "admin"]}]})
    )
    narrow = json.loads(_ok(_run(["create-key", "--policy", str(policy), "--json"], cluster)))
    err = _one_line_failure(_run(["encrypt", "--key-id", narrow["key_id"]], cluster, b"x"))
    assert "PERMISSION_DENIED" in err
    policy.write_text('{"grants": [{"principals": ["x"], "operations": ["fly"]}]}')
    err = _one_line_failure(
        _run(["put-key-policy", narrow["key_id"], "--policy", str(policy)], cluster)
    )
    assert "unknown operation 'fly'" in err
    disabled = json.loads(_ok(_run(["disable-key", narrow["key_id"], "--json"], cluster)))
    assert disabled["state"] == "disabled"

    # Envelope of a file through the executable; a tampered one leaves no output.
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    sealed, back = tmp_path / "big.hsme", tmp_path / "back.bin"
    env_context = ["--context", "file=big"]
    _ok(
        _run(
            [
                *["envelope-encrypt", "--key-id", key_id, "--in", str(source)],
                *["--out", str(sealed), *env_context],
            ],
            cluster,
        )
    )
    _ok(_run(["envelope-decrypt", "--in", str(sealed), "--out", str(back), *env_context], cluster))
    assert back.read_bytes() == source.read_bytes()
    back.unlink()
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x40
    sealed.write_bytes(bytes(data))
    err = _one_line_failure(
        _run(["envelope-decrypt", "--in", str(sealed), "--out", str(back)], cluster)
    )
    assert "invalid ciphertext" in err
    assert not back.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["encrypt"], "--key-id"),
        (["decrypt", "--context", "=x"], "empty key"),
        (["frobnicate"], "invalid choice"),
        (["list-keys", "--endpoint", "127.0.0.1:1"], "--ca"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    result = _run(args)
    assert result.returncode == 2, result.stderr.decode()
    assert message in result.stderr.decode()


def _command_names() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_every_help_exits_0_with_an_example() -> None:
    names = _command_names()
    assert len(names) == 31
    commands = [[], *([c] for c in names)]
    # Independent processes: run a few at a time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda command: _run([*command, "--help"]), commands))
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == 0, (command, result.stderr.decode())
        assert "Example:" in result.stdout.decode(), command


def test_hsm_kms_sends_nothing_to_a_server_holding_the_coordinator_certificate(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """The coordinator's certificate is the domain CA's, and its address is in every node
    config: pointed at a server holding it, hsm-kms refuses it in the handshake, with one
    line that says why, and the plaintext never leaves."""
    cluster = local_cluster(nodes=1)
    root = cluster.layout.root
    coordinator_tls = TlsMaterial.from_files(
        cluster.layout.ca_cert, root / "coordinator" / "tls.crt", root / "coordinator" / "tls.key"
    )
    client = ["--ca", str(cluster.layout.ca_cert)]
    client += ["--cert", str(cluster.layout.client_cert), "--key", str(cluster.layout.client_key)]
    with ImpostorServer(coordinator_tls) as impostor:
        endpoint = ["--endpoint", impostor.address, "--timeout", "3"]
        encrypted = _run(["encrypt", "--key-id", UNKNOWN_KEY, *endpoint, *client], None, SECRET)
        created = _run(["create-key", *endpoint, *client])
    assert impostor.seen == []
    for result in (encrypted, created):
        err = _one_line_failure(result)
        assert f"the server at {impostor.address} is not an HSA of domain local" in err
        assert SECRET.decode() not in err
