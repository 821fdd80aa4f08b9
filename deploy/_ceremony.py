"""The genesis ceremony of `hsm-domain init`: the operators' demo tokens, then the genesis
state every operator approves and the first host seals.

Invariants: every token file and demo passphrase file is created 0600; the genesis state is
verified against its own hash (`TrustedChain.from_genesis`) before anything pins it.
Passphrase files are a LOCAL DEMO convenience: a real domain never writes them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from deploy._files import make_private_dir, write_secret_file
from deploy.enrollment import VerifiedEnrollment
from domain_core import genesis, model, quorum
from domain_core.chain import TrustedChain
from domain_core.identity import HostIdentity
from domain_core.model import SealedState
from domain_core.pki import DomainCA
from domain_core.signers import SignatureAlgorithm
from domain_edge.file_tokens import create_file_token, load_file_token
from domain_edge.layout import DomainPaths
from domain_proto import domain_pb2

__all__ = ["DemoToken", "create_operator_tokens", "genesis_ceremony", "operator_names"]

_OPERATOR_NAMES: Final = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
)


def operator_names(count: int) -> list[str]:
    """The demo operator names: alice, bob, ... judy, then op-11, op-12, ..."""
    return [_OPERATOR_NAMES[i] if i < len(_OPERATOR_NAMES) else f"op-{i + 1}" for i in range(count)]


@dataclass(frozen=True)
class DemoToken:
    """An operator token `init` made, and the passphrase it holds for the ceremony."""

    record: domain_pb2.Operator
    path: Path
    passphrase: bytes


def create_operator_tokens(paths: DomainPaths, operators: int, scrypt_n: int) -> list[DemoToken]:
    """A file token and a demo passphrase file (0600) for each operator."""
    make_private_dir(paths.operators_dir)
    tokens: list[DemoToken] = []
    for name in operator_names(operators):
        passphrase = secrets.token_urlsafe(32).encode("ascii")
        token_path = paths.operator_token(name)
        write_secret_file(paths.operator_passphrase(name), passphrase + b"\n")
        public_key = create_file_token(
            token_path,
            SignatureAlgorithm.ED25519,
            passphrase,
            name=name,
            scrypt_n=scrypt_n,
        )
        tokens.append(DemoToken(model.make_operator(name, public_key), token_path, passphrase))
    return tokens


def genesis_ceremony(
    ca: DomainCA,
    enrollments: list[VerifiedEnrollment],
    identities: dict[str, HostIdentity],
    tokens: list[DemoToken],
    *,
    domain_id: str,
    threshold: int,
    now: datetime,
) -> SealedState:
    """The genesis: every operator opens their token and approves; the first host seals; the
    state is verified against its own hash before anything pins it."""
    timestamp = int(now.timestamp())
    records = [t.record for t in tokens]
    proposal = genesis.genesis_proposal(
        domain_id,
        [e.raw for e in enrollments],
        records,
        threshold,
        ca_certificate=ca.certificate_der,
        proposer_id=records[0].operator_id,
        now=timestamp,
    )
    approvals = [quorum.approve(proposal, load_file_token(t.path, t.passphrase)) for t in tokens]
    first = enrollments[0].host.host_id
    state = genesis.seal_genesis(
        proposal,
        approvals,
        producer_host_id=first,
        producer=identities[first].signer,
        now=timestamp,
    )
    TrustedChain.from_genesis(domain_id, state.hash, SealedState.from_bytes(state.to_bytes()))
    return state
