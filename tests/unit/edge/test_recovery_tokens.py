"""Recovery tokens (issue 16): an operator's X25519 recovery key in a passphrase file.

As an adversary: a wrong passphrase, an edited header (name, public key, KDF cost), a file
that is not a recovery token, overwriting a file. Opened tokens open the shares sealed to
them and never show their key in a repr.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from domain_core.errors import AlreadyExistsError, TokenError, WrongPassphraseError
from domain_core.recovery_shares import RecoveryAlgorithm, open_share, seal_share, split_key
from domain_edge.recovery_tokens import (
    create_recovery_token,
    load_recovery_token,
    read_recovery_token_public,
)

pytestmark = pytest.mark.unit

N = 2**14
PASSPHRASE = b"correct horse battery staple"


def test_a_token_opens_the_shares_sealed_to_its_key(tmp_path: Path) -> None:
    path = tmp_path / "alice.recovery"
    public = create_recovery_token(path, PASSPHRASE, name="alice", scrypt_n=N)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_recovery_token_public(path) == ("alice", public)
    share = split_key(os.urandom(32), 2, 3)[0]
    sealed = seal_share(RecoveryAlgorithm.X25519, public, share, b"context")
    token = load_recovery_token(path, PASSPHRASE)
    assert open_share(RecoveryAlgorithm.X25519, public, sealed, b"context", token.agree) == share
    assert token.public_key == public
    text = repr(token)
    assert "alice" in text
    assert path.read_text().count("ciphertext") == 1
    with pytest.raises(AlreadyExistsError):
        create_recovery_token(path, PASSPHRASE, name="alice", scrypt_n=N)


def test_a_wrong_passphrase_or_an_edited_header_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "bob.recovery"
    create_recovery_token(path, PASSPHRASE, name="bob", scrypt_n=N)
    with pytest.raises(WrongPassphraseError):
        load_recovery_token(path, b"wrong")
    document = json.loads(path.read_text())
    for field, value in (("name", "mallory"), ("public_key", "AAAA" * 10 + "AAA=")):
        edited = dict(document, **{field: value})
        other = tmp_path / f"edited-{field}"
        other.write_text(json.dumps(edited))
        with pytest.raises((WrongPassphraseError, TokenError)):
            load_recovery_token(other, PASSPHRASE)
    costly = dict(document, kdf=dict(document["kdf"], n=2**21))
    other = tmp_path / "costly"
    other.write_text(json.dumps(costly))
    with pytest.raises(TokenError, match="scrypt n"):
        load_recovery_token(other, PASSPHRASE)
    signing = dict(document, format="hsm-domain-file-token")
    other = tmp_path / "signing"
    other.write_text(json.dumps(signing))
    with pytest.raises(TokenError, match="format"):
        read_recovery_token_public(other)
