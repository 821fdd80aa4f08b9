"""The real `hsm-operator` executable, run as a subprocess: token init/show/export-public with file
tokens and with SoftHSM2 (its configuration passed in SOFTHSM2_CONF), exit statuses, --help."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from domain_core.errors import TokenError
from domain_core.signers import PublicKey
from domain_edge.tokens import read_operator_public
from operator_tool.cli import build_parser, main, read_secret_file

pytestmark = pytest.mark.pkcs11

HSM_OPERATOR = Path(sys.executable).parent / "hsm-operator"
TOKEN_LABEL = "cli-test"
PIN = "4321"
SO_PIN = "87654321"
PASSPHRASE = "correct horse battery staple"


@dataclass(frozen=True)
class Cli:
    """Runs `hsm-operator` with a private SoftHSM2 and no operator settings from the caller."""

    module: str
    conf: Path
    workdir: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("HSM_TOKEN", "HSM_PKCS11"))
        }
        return subprocess.run(
            [str(HSM_OPERATOR), *args],
            env={**base, "SOFTHSM2_CONF": str(self.conf), **(env or {})},
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,  # not a terminal: nothing may be prompted for
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = self.run(*args, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def secret_file(self, name: str, secret: str) -> str:
        path = self.workdir / name
        path.write_text(secret + "\n")
        path.chmod(0o600)
        return str(path)


@pytest.fixture(scope="module")
def _cli_state() -> dict[str, Cli]:
    return {}


@pytest.fixture
def cli(
    softhsm2_util_bin: str,
    softhsm2_module: str,
    _cli_state: dict[str, Cli],
    tmp_path_factory: pytest.TempPathFactory,
) -> Cli:
    """A SoftHSM2 token directory with one initialised token, shared by this module."""
    if "cli" not in _cli_state:
        if not HSM_OPERATOR.is_file():
            pytest.fail(f"{HSM_OPERATOR} is missing: run `pip install -e '.[test]'`")
        directory = tmp_path_factory.mktemp("operator-cli")
        (directory / "tokens").mkdir()
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {directory / 'tokens'}\n"
            "objectstore.backend = file\nlog.level = ERROR\n"
        )
        subprocess.run(
            [softhsm2_util_bin, "--init-token", "--free", "--label", TOKEN_LABEL,
             "--so-pin", SO_PIN, "--pin", PIN],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        workdir = directory / "work"
        workdir.mkdir()
        _cli_state["cli"] = Cli(module=softhsm2_module, conf=conf, workdir=workdir)
    return _cli_state["cli"]


def _pkcs11_init(cli: Cli, key_label: str, *extra: str) -> dict[str, object]:
    pin_file = cli.secret_file("pin", PIN)
    out = cli.ok(
        "token", "init", "--pkcs11", "--module", cli.module, "--token-label", TOKEN_LABEL,
        "--key-label", key_label, "--pin-file", pin_file, "--json", *extra,
    )  # fmt: skip
    document: dict[str, object] = json.loads(out)
    return document


def _spki_sha256(pem: object) -> str:
    assert isinstance(pem, str)
    return hashlib.sha256(PublicKey.from_pem(pem.encode()).spki_der).hexdigest()


# --- PKCS#11 tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [None, "ecdsa-p256", "ed25519"])
def test_pkcs11_init_then_show(cli: Cli, algorithm: str | None) -> None:
    extra = ("--algorithm", algorithm) if algorithm else ()
    created = _pkcs11_init(cli, f"op-{algorithm}", *extra)
    assert created["kind"] == "pkcs11"
    assert created["algorithm"] == (algorithm or "ed25519")  # SoftHSM2 offers CKM_EDDSA
    uri = created["token"]
    assert isinstance(uri, str)
    assert uri.startswith(f"pkcs11:token={TOKEN_LABEL};object=op-{algorithm};id=%")
    assert f"module-path={cli.module}" in uri

    shown = json.loads(
        cli.ok("token", "show", "--token", uri, "--pin-file", cli.secret_file("pin", PIN), "--json")
    )
    assert shown["operator_id"] == created["operator_id"] == _spki_sha256(shown["public_key"])
    assert shown["algorithm"] == created["algorithm"]
    assert shown["kind"] == "pkcs11"
    assert shown["never_leaves_token"] is True
    assert shown["fingerprint"].replace(" ", "") == shown["operator_id"]


def test_pkcs11_init_text_output_names_the_uri(cli: Cli) -> None:
    out = cli.ok(
        "token", "init", "--pkcs11", "--token-label", TOKEN_LABEL, "--key-label", "text",
        "--pin-file", cli.secret_file("pin", PIN),
        env={"HSM_PKCS11_MODULE": cli.module},
    )  # fmt: skip
    assert "sensitive, not extractable" in out
    assert f"use it with:  --token 'pkcs11:token={TOKEN_LABEL};object=text;id=%" in out


def test_pkcs11_export_public(cli: Cli) -> None:
    created = _pkcs11_init(cli, "export")
    out_file = cli.workdir / "hw.pub.json"
    cli.ok(
        "--token", str(created["token"]), "token", "export-public", "--name", "hw-operator",
        "--out", str(out_file), "--pin-file", cli.secret_file("pin", PIN),
    )  # fmt: skip
    name, public_key = read_operator_public(out_file)
    assert name == "hw-operator"
    assert public_key.key_id == created["operator_id"]


def test_wrong_pin_is_one_line_and_exit_1(cli: Cli) -> None:
    created = _pkcs11_init(cli, "wrong-pin")
    result = cli.run(
        "token", "show", "--token", str(created["token"]),
        "--pin-file", cli.secret_file("bad-pin", "999999"),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"hsm-operator: error: wrong PIN for token {TOKEN_LABEL}"]
    assert "999999" not in result.stderr + result.stdout


def test_verbose_failure_shows_the_traceback(cli: Cli) -> None:
    created = _pkcs11_init(cli, "verbose")
    result = cli.run(
        "-v", "token", "show", "--token", str(created["token"]),
        "--pin-file", cli.secret_file("bad-pin", "999999"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].endswith(f"wrong PIN for token {TOKEN_LABEL}")


def test_unknown_token_label(cli: Cli) -> None:
    uri = f"pkcs11:token=absent;object=k?module-path={cli.module}"
    result = cli.run("token", "show", "--token", uri, "--pin-file", cli.secret_file("pin", PIN))
    assert result.returncode == 1
    assert "no token labelled 'absent'" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_no_pin_and_no_terminal(cli: Cli) -> None:
    created = _pkcs11_init(cli, "no-pin")
    result = cli.run("token", "show", "--token", str(created["token"]))
    assert result.returncode == 1
    assert "no PIN: use --pin-file or run in a terminal" in result.stderr


# --- file tokens ---------------------------------------------------------------------------


def test_file_token_init_show_export(cli: Cli) -> None:
    passphrase_file = cli.secret_file("passphrase", PASSPHRASE)
    token = cli.workdir / "alice.token"
    out = cli.ok(
        "token", "init", "--out", str(token), "--name", "alice",
        "--passphrase-file", passphrase_file, "--json",
    )  # fmt: skip
    created = json.loads(out)
    assert created["kind"] == "file"
    assert created["name"] == "alice"
    assert created["algorithm"] == "ed25519"
    assert token.stat().st_mode & 0o777 == 0o600
    assert json.loads(token.read_text())["kdf"]["n"] >= 2**17  # a real token's cost

    # The token and the passphrase file may come from the environment too.
    env = {"HSM_TOKEN": str(token), "HSM_TOKEN_PASSPHRASE_FILE": passphrase_file}
    shown = json.loads(cli.ok("--json", "token", "show", env=env))
    assert shown["operator_id"] == created["operator_id"] == _spki_sha256(shown["public_key"])
    assert shown["name"] == "alice"
    text = cli.ok("token", "show", env=env)
    assert "name:         alice" in text
    assert f"operator id:  {created['operator_id']}" in text

    exported = cli.workdir / "alice.pub.json"
    cli.ok("token", "export-public", "--out", str(exported), env=env)
    name, public_key = read_operator_public(exported)
    assert (name, public_key.key_id) == ("alice", created["operator_id"])
    # Never overwritten.
    again = cli.run("token", "export-public", "--out", str(exported), env=env)
    assert again.returncode == 1
    assert "exists already" in again.stderr


def test_file_token_ecdsa_and_stdout_export(cli: Cli) -> None:
    passphrase_file = cli.secret_file("passphrase", PASSPHRASE)
    token = cli.workdir / "bob.token"
    cli.ok(
        "token", "init", "--out", str(token), "--name", "bob", "--algorithm", "ecdsa-p256",
        "--passphrase-file", passphrase_file,
    )  # fmt: skip
    out = cli.ok(
        "token", "export-public", "--token", f"file:{token}", "--out", "-",
        "--passphrase-file", passphrase_file,
    )  # fmt: skip
    document = json.loads(out)
    assert document["format"] == "hsm-domain-operator-public-key"
    assert document["name"] == "bob"
    assert document["algorithm"] == "ecdsa-p256"
    assert document["operator_id"] == _spki_sha256(document["public_key"])


def test_file_token_init_refuses_to_overwrite(cli: Cli) -> None:
    existing = cli.workdir / "existing.token"
    existing.write_text("precious")
    result = cli.run(
        "token", "init", "--out", str(existing), "--name", "x",
        "--passphrase-file", cli.secret_file("passphrase", PASSPHRASE),
    )  # fmt: skip
    assert result.returncode == 1
    assert "exists already" in result.stderr
    assert existing.read_text() == "precious"


def test_missing_token_file(cli: Cli) -> None:
    result = cli.run(
        "token", "show", "--token", "absent.token",
        "--passphrase-file", cli.secret_file("passphrase", PASSPHRASE),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "hsm-operator: error: no token file at absent.token; check the path or create one "
        "with `hsm-operator`"
    ]


def test_wrong_passphrase(cli: Cli) -> None:
    token = cli.workdir / "carol.token"
    cli.ok(
        "token", "init", "--out", str(token), "--name", "carol",
        "--passphrase-file", cli.secret_file("passphrase", PASSPHRASE),
    )  # fmt: skip
    result = cli.run(
        "token", "show", "--token", str(token),
        "--passphrase-file", cli.secret_file("wrong", "not the passphrase"),
    )  # fmt: skip
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "the passphrase does not open token" in result.stderr


def test_no_passphrase_and_no_terminal(cli: Cli) -> None:
    result = cli.run("token", "init", "--out", "new.token", "--name", "dave")
    assert result.returncode == 1
    assert "no passphrase: use --passphrase-file or run in a terminal" in result.stderr
    assert not (cli.workdir / "new.token").exists()


# --- usage and help ------------------------------------------------------------------------

BAD_USAGE = [
    [],
    ["token"],
    ["token", "bogus"],
    ["token", "init"],
    ["token", "init", "--out", "x.token"],
    ["token", "init", "--algorithm", "rsa", "--out", "x", "--name", "x"],
    ["token", "init", "--out", "x", "--name", "x", "--module", "/m.so"],
    ["token", "init", "--pkcs11", "--module", "/m.so", "--token-label", "t"],
    ["token", "init", "--pkcs11", "--token-label", "t", "--key-label", "k"],
    ["token", "show"],
    ["token", "export-public", "--token", "x.token"],
    ["--no-such-option", "token", "show"],
]


@pytest.mark.parametrize("args", BAD_USAGE, ids=lambda a: " ".join(a) or "(none)")
def test_bad_usage_exits_2(cli: Cli, args: list[str]) -> None:
    result = cli.run(*args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr


def _command_paths(parser: argparse.ArgumentParser, prefix: Sequence[str] = ()) -> list[list[str]]:
    """Every command and group of the parser, as argument lists ([], [token], [token, init]...)."""
    paths = [list(prefix)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                paths += _command_paths(subparser, [*prefix, name])
    return paths


COMMAND_PATHS = _command_paths(build_parser())


def test_every_token_command_is_listed() -> None:
    assert ["token", "init"] in COMMAND_PATHS
    assert ["token", "show"] in COMMAND_PATHS
    assert ["token", "export-public"] in COMMAND_PATHS


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "hsm-operator")
def test_help_of_every_command_has_an_example(cli: Cli, path: list[str]) -> None:
    result = cli.run(*path, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert "usage: hsm-operator" in result.stdout


# --- in process: prompts and secret files ----------------------------------------------------


class _Terminal:
    """Stands in for sys.stdin on a terminal (getpass itself is replaced)."""

    def isatty(self) -> bool:
        return True


def _in_process(
    monkeypatch: pytest.MonkeyPatch, answers: list[str], argv: list[str]
) -> tuple[int, list[str]]:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr("getpass.getpass", fake_getpass)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    for name in ("HSM_TOKEN", "HSM_TOKEN_PASSPHRASE_FILE", "HSM_TOKEN_PIN_FILE"):
        monkeypatch.delenv(name, raising=False)
    return main(argv), prompts


def test_new_passphrase_is_asked_twice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "t.token"
    status, prompts = _in_process(
        monkeypatch, ["pw-1", "pw-1"], ["token", "init", "--out", str(token), "--name", "eve"]
    )
    assert status == 0
    assert prompts == ["Passphrase for the new token: ", "Repeat the passphrase: "]
    assert "created file token 'eve'" in capsys.readouterr().out

    status, prompts = _in_process(monkeypatch, ["pw-1"], ["token", "show", "--token", str(token)])
    assert status == 0
    assert prompts == [f"Passphrase for token {token}: "]


def test_differing_passphrases_create_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "t.token"
    status, _ = _in_process(
        monkeypatch, ["pw-1", "pw-2"], ["token", "init", "--out", str(token), "--name", "eve"]
    )
    assert status == 1
    assert "the two passphrases differ" in capsys.readouterr().err
    assert not token.exists()


@pytest.mark.parametrize(
    ("content", "secret"),
    [(b"pw\n", b"pw"), (b"pw\r\n", b"pw"), (b"pw", b"pw"), (b"pw\n\n", b"pw\n"), (b" x ", b" x ")],
)
def test_secret_file_loses_one_trailing_newline(
    tmp_path: Path, content: bytes, secret: bytes
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert read_secret_file(path, "passphrase") == secret


def test_empty_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\n")
    with pytest.raises(TokenError, match="is empty"):
        read_secret_file(path, "PIN")


def test_main_returns_2_on_usage_errors_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "bogus"]) == 2
    assert main(["--help"]) == 0
    assert "Example" in capsys.readouterr().out
