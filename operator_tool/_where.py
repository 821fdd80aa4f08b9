"""Where the domain is, and what the operator trusts about it.

A command that talks to a domain needs three things: the coordinator's operator address, the
CA certificate to check the coordinator's TLS certificate with, and a trust anchor to verify
every state the coordinator serves. They come from:

- `--cluster DIR` (or `$HSM_CLUSTER`): a local domain directory made by `hsm-domain init`:
  `DIR/domain.json` (domain id, pinned genesis hash), `DIR/genesis.state`, `DIR/ca/ca.crt`
  and the ready file of every coordinator (`DIR/run/coordinator.json`, or
  `DIR/run/coordinator-<n>.json` for each replica of a domain on etcd: its `operator_address`,
  written by the running coordinator); several replicas' addresses make one channel that fails
  over between them (`domain_edge.transport.channel_target`); of a domain across hosts
  (`hsm-domain init --host`), the coordinator's operator address in `DIR/domain.json`;
- `--coordinator HOST:PORT` and `--ca FILE` for any other domain, with the anchor from
  `--genesis FILE --genesis-hash HEX` (the genesis state and the hash pinned out of band) or
  `--state FILE` (a state this operator verified and exported earlier, `domain
  export-state`). Explicit options override what `--cluster` gives.

Invariants:
- the coordinator is untrusted: `Connection.verified` walks the chain from the anchor with
  `TrustedChain` (producer signatures, quorum of the previous operators, the exact manifest
  each proposal produces) before any state is used, and never goes back;
- a proposal is used only with bytes that hash to its id (`ProposalView.from_status`);
- an id prefix is resolved through the coordinator's list, which an untrusted coordinator
  can fill with a proposal ground to share the prefix; so `Connection.proposal(...,
  to_sign=True)` (approve, cancel) takes a prefix only when a person confirms on a terminal
  after seeing the review and the full id, and `--yes` needs the full 64-digit id;
- operators connect with server-auth TLS only (no client certificate), to `operator_listen`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from domain_core import canonical
from domain_core.chain import TrustedChain
from domain_core.errors import (
    ChainError,
    HsmDomainError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
    VerificationError,
)
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_CA_CERT_FILE_BYTES,
    MAX_OPERATOR_JSON_FILE_BYTES,
    MIN_PROPOSAL_ID_PREFIX_CHARS,
)
from domain_core.model import SealedState
from domain_edge.cli import UsageError
from domain_edge.client import CoordinatorClient, ProposalView
from domain_edge.files import read_limited
from domain_edge.hosts import DomainAddresses
from domain_edge.layout import COORDINATOR_NAME, DomainPaths
from operator_tool._context import CommandContext
from operator_tool._review import Review, review

__all__ = [
    "CLUSTER_ENV",
    "Connection",
    "DomainLocation",
    "TrustAnchor",
    "VerifiedDomain",
    "add_domain_options",
    "add_state_option",
    "connect",
    "is_full_id",
    "locate",
    "parse_genesis_hash",
    "proposal_key",
    "read_state_file",
    "require_full_id_unless_confirmed",
]

CLUSTER_ENV: Final = "HSM_CLUSTER"
COORDINATOR_ENV: Final = "HSM_COORDINATOR"
_HEX_ID: Final = re.compile(r"^[0-9a-f]{4,64}$")


@dataclass(frozen=True)
class TrustAnchor:
    """What the operator verifies the coordinator's chain from."""

    domain_id: str
    start: SealedState
    genesis_hash: bytes
    pinned_state: bool  # True: a state file verified earlier; False: the pinned genesis
    source: str

    def chain(self) -> TrustedChain:
        """A fresh chain at the anchor (the genesis is verified against its pinned hash)."""
        if self.pinned_state:
            return TrustedChain.resume(self.domain_id, self.genesis_hash, self.start)
        return TrustedChain.from_genesis(self.domain_id, self.genesis_hash, self.start)


@dataclass(frozen=True)
class DomainLocation:
    """The coordinator's operator address, its CA, and the trust anchor."""

    coordinator: str
    ca_pem: bytes
    anchor: TrustAnchor


# --- options ---------------------------------------------------------------------------------


def add_domain_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that say where the domain is (--cluster, --coordinator, ...)."""
    group = parser.add_argument_group("where the domain is")
    group.add_argument(
        "--cluster",
        metavar="DIR",
        help=f"a local domain directory (hsm-domain init): coordinator address, CA and "
        f"pinned genesis from DIR (default: ${CLUSTER_ENV})",
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help=f"the coordinator's operator address (default: ${COORDINATOR_ENV}, or --cluster)",
    )
    group.add_argument(
        "--ca", metavar="FILE", help="the domain CA certificate (PEM) to check the coordinator"
    )
    group.add_argument(
        "--genesis", metavar="FILE", help="the domain's genesis state (with --genesis-hash)"
    )
    group.add_argument(
        "--genesis-hash",
        metavar="HEX",
        help="the genesis state hash you were given out of band (64 hex characters)",
    )
    add_state_option(
        group,
        "a state you exported earlier (domain export-state) to verify newer states from, "
        "instead of the genesis",
    )


def add_state_option(parser: Any, help: str, *, required: bool = False) -> None:
    """Add `--state FILE` (a serialized SealedState)."""
    parser.add_argument("--state", metavar="FILE", required=required, help=help)


# --- reading local files -------------------------------------------------------------------


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        return read_limited(
            path,
            limit,
            lambda: InvalidInputError(f"{path} is larger than {limit} bytes; it is not a {what}"),
        )
    except FileNotFoundError:
        raise NotFoundError(f"no {what} at {path}") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    data = _read_small(path, MAX_OPERATOR_JSON_FILE_BYTES, what)
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{path} is not JSON; it is not a {what}") from None
    if not isinstance(document, dict):
        raise InvalidInputError(f"{path} is not a JSON object; it is not a {what}")
    return document


def read_state_file(path: str | Path) -> SealedState:
    """A serialized SealedState from a file (parsed and structurally validated only)."""
    path = Path(path)
    data = _read_small(path, DEFAULT_LIMITS.max_message_bytes, "state file")
    try:
        return SealedState.from_bytes(data)
    except HsmDomainError as error:
        raise type(error)(f"{path} is not a domain state file: {error.message}") from None


def parse_genesis_hash(text: str) -> bytes:
    """A genesis hash given as 64 hex characters (InvalidInputError otherwise)."""
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        value = b""
    if len(value) != canonical.DIGEST_BYTES:
        raise InvalidInputError("--genesis-hash must be 64 hex characters (a SHA-256)")
    return value


@dataclass(frozen=True)
class _ClusterFiles:
    """What a domain directory says of the domain: its pins, where its genesis and CA
    certificate are, the coordinators' ready files, and (a domain across hosts) the
    coordinator's operator address from `domain.json`."""

    domain_id: str
    genesis_hash: bytes
    genesis: Path
    ca: Path
    ready_files: list[Path]
    operator_address: str | None


def _cluster_files(directory: Path) -> _ClusterFiles:
    """The files of the domain directory DIR (`domain.json` read once)."""
    paths = DomainPaths(directory)
    document = _read_json(paths.domain_file, "local domain file (domain.json)")
    domain_id = document.get("domain_id")
    genesis_hex = document.get("genesis_hash")
    if not isinstance(domain_id, str) or not isinstance(genesis_hex, str):
        raise InvalidInputError(f"{paths.domain_file} has no domain_id and genesis_hash")
    across_hosts = None
    if "addresses" in document:
        across_hosts = DomainAddresses.from_json(document["addresses"], str(paths.domain_file))
    return _ClusterFiles(
        domain_id=domain_id,
        genesis_hash=parse_genesis_hash(genesis_hex),
        genesis=paths.genesis_state,
        ca=paths.ca_cert,
        ready_files=[
            paths.ready_file(name) for name in paths.configured_coordinators() or [COORDINATOR_NAME]
        ],
        operator_address=across_hosts.operator if across_hosts is not None else None,
    )


def _coordinator_from_ready_files(paths: list[Path], directory: Path) -> str:
    """The operator addresses in the coordinators' ready files, comma-separated (a replica
    whose file is missing is not running: the others are enough)."""
    addresses = []
    for path in paths:
        try:
            document = _read_json(path, "coordinator ready file")
        except NotFoundError:
            continue
        address = document.get("operator_address")
        if not isinstance(address, str) or not address:
            raise UnavailableError(f"{path} names no operator_address; is the coordinator current?")
        addresses.append(address)
    if not addresses:
        missing = ", ".join(str(path) for path in paths)
        raise UnavailableError(
            f"no coordinator of {directory} is running ({missing} missing); start the "
            f"domain with `hsm-domain up {directory}`"
        )
    return ",".join(addresses)


def locate(ctx: CommandContext) -> DomainLocation:
    """Where the domain of this command is (UsageError when the options do not say)."""
    args = ctx.args
    cluster = getattr(args, "cluster", None) or ctx.environ.get(CLUSTER_ENV) or None
    coordinator = getattr(args, "coordinator", None) or ctx.environ.get(COORDINATOR_ENV) or None
    ca_file: Path | None = Path(args.ca) if getattr(args, "ca", None) else None
    genesis_file: Path | None = Path(args.genesis) if getattr(args, "genesis", None) else None
    genesis_hex: str | None = getattr(args, "genesis_hash", None)
    state_file: str | None = getattr(args, "state", None)
    domain_id: str | None = None
    genesis_hash: bytes | None = None
    if genesis_hex:
        genesis_hash = parse_genesis_hash(genesis_hex)
    if cluster:
        directory = Path(cluster).expanduser().absolute()
        files = _cluster_files(directory)
        domain_id = files.domain_id
        if genesis_hash is None and genesis_file is None:
            genesis_hash, genesis_file = files.genesis_hash, files.genesis
        ca_file = ca_file or files.ca
        if coordinator is None:
            # A domain across hosts: its coordinator runs elsewhere, where domain.json says.
            coordinator = files.operator_address or _coordinator_from_ready_files(
                files.ready_files, directory
            )
    if coordinator is None:
        raise UsageError(
            f"where is the domain? give --cluster DIR (or ${CLUSTER_ENV}), or --coordinator "
            "HOST:PORT with --ca FILE and --genesis FILE --genesis-hash HEX (or --state FILE)"
        )
    if ca_file is None:
        raise UsageError("--coordinator needs --ca FILE (the domain CA certificate)")
    ca_pem = _read_small(ca_file, MAX_CA_CERT_FILE_BYTES, "CA certificate")
    anchor = _anchor(domain_id, genesis_file, genesis_hash, state_file)
    return DomainLocation(coordinator=coordinator, ca_pem=ca_pem, anchor=anchor)


def _anchor(
    domain_id: str | None,
    genesis_file: Path | None,
    genesis_hash: bytes | None,
    state_file: str | None,
) -> TrustAnchor:
    if state_file:
        state = read_state_file(state_file)
        if domain_id is not None and state.manifest.domain_id != domain_id:
            raise InvalidInputError(
                f"{state_file} is a state of domain {state.manifest.domain_id!r}, not {domain_id!r}"
            )
        pinned = genesis_hash if genesis_hash is not None else b""
        if state.version == 1 and not pinned:
            pinned = state.hash
        return TrustAnchor(
            domain_id=state.manifest.domain_id,
            start=state,
            genesis_hash=pinned,
            pinned_state=True,
            source=f"your state file {state_file} (version {state.version})",
        )
    if genesis_file is None or genesis_hash is None:
        raise UsageError(
            "nothing to verify the coordinator's states from: give --genesis FILE with "
            "--genesis-hash HEX, or --state FILE (or use --cluster DIR)"
        )
    genesis = read_state_file(genesis_file)
    return TrustAnchor(
        domain_id=domain_id or genesis.manifest.domain_id,
        start=genesis,
        genesis_hash=genesis_hash,
        pinned_state=False,
        source=f"the pinned genesis {genesis_hash.hex()[:16]}",
    )


# --- the verified chain --------------------------------------------------------------------


@dataclass
class VerifiedDomain:
    """The chain this operator verified from its anchor, and every state it saw on the way."""

    chain: TrustedChain
    anchor: TrustAnchor
    states: dict[int, SealedState] = field(default_factory=dict)

    @property
    def head(self) -> SealedState:
        return self.chain.head

    def state(self, version: int) -> SealedState | None:
        """A verified state by version, if this run saw it."""
        return self.states.get(version)


class Connection:
    """A coordinator client plus the chain verified from the operator's anchor."""

    def __init__(self, location: DomainLocation, client: CoordinatorClient) -> None:
        self.location = location
        self.client = client
        self._verified: VerifiedDomain | None = None

    def verified(self, *, refresh: bool = False) -> VerifiedDomain:
        """Verify the coordinator's chain from the anchor (or past what was verified)."""
        if self._verified is None:
            anchor = self.location.anchor
            try:
                chain = anchor.chain()
            except (ChainError, VerificationError) as error:
                raise type(error)(f"your trust anchor does not verify: {error.message}") from None
            self._verified = VerifiedDomain(chain, anchor, {chain.version: chain.head})
            refresh = True
        domain = self._verified
        if refresh:
            self._extend(domain)
        return domain

    def _extend(self, domain: VerifiedDomain) -> None:
        while True:
            states = self.client.states_after(domain.chain.version)
            if not states:
                return
            now = int(time.time())
            for state in states:
                if state.version <= domain.chain.version:
                    continue
                try:
                    domain.chain.update(state, now=now)
                except (ChainError, VerificationError) as error:
                    raise type(error)(
                        f"the coordinator serves a state that does not verify from "
                        f"{domain.anchor.source}: {error.message}; do not sign anything it shows"
                    ) from None
                domain.states[state.version] = state

    def review(self, view: ProposalView) -> Review:
        """Judge a proposal the coordinator relayed against the chain verified from the anchor.

        Fetch the proposal first and call this afterwards: the chain is brought up to date
        here, so a proposal applied in between is found in it.
        """
        domain = self.verified(refresh=True)
        return review(
            view.proposal,
            view.approvals,
            head=domain.head,
            states=domain.states,
            now=int(time.time()),
            coordinator_state=view.state,
            coordinator_detail=view.detail,
            cancel_votes=view.cancel_votes,
        )

    def proposal(self, text: str) -> ProposalView:
        """A proposal by id or unique id prefix (at least 6 hex digits), bytes checked.

        A prefix is resolved through the coordinator's list: for signing, check first with
        `require_full_id_unless_confirmed` (see the module invariants).
        """
        key = proposal_key(text)
        if is_full_id(key):
            return self.client.get_proposal(bytes.fromhex(key))
        if len(key) < MIN_PROPOSAL_ID_PREFIX_CHARS:
            raise InvalidInputError(
                f"give at least {MIN_PROPOSAL_ID_PREFIX_CHARS} hex digits of the proposal id"
            )
        matches = [
            v
            for v in self.client.list_proposals(include_closed=True)
            if v.proposal_id.hex().startswith(key)
        ]
        if not matches:
            raise NotFoundError(f"no proposal id starts with {key}; see `proposals list --all`")
        if len(matches) > 1:
            raise InvalidInputError(
                f"{len(matches)} proposals start with {key}; give more digits of the id"
            )
        return matches[0]


def proposal_key(text: str) -> str:
    """The lowercase hex of a proposal id or prefix as typed; InvalidInputError otherwise."""
    key = text.strip().lower()
    if not _HEX_ID.match(key):
        raise InvalidInputError(
            f"{text[:80]!r} is not a proposal id (hex, as `proposals list` shows it)"
        )
    return key


def is_full_id(text: str) -> bool:
    """True if `text` is a whole proposal id (64 hex digits), not a prefix."""
    return len(text.strip()) == 2 * canonical.DIGEST_BYTES


def require_full_id_unless_confirmed(ctx: CommandContext, text: str, what: str) -> None:
    """Refuse (UsageError) a short prefix where nobody confirms what it resolved to.

    With `--yes` nothing is shown before the signature, and a prefix is resolved through the
    coordinator's list (which a lying coordinator fills with a proposal ground to share
    it), so signing without asking needs the full id. Checked before anything is fetched.
    """
    key = proposal_key(text)
    if is_full_id(key):
        return
    if getattr(ctx.args, "yes", False):
        raise UsageError(
            f"{what} --yes needs the full proposal id (64 hex digits, as the proposer gave it "
            f"and `proposals show` prints it), not the prefix {key}: a prefix is resolved "
            "through the coordinator's list, which could name another proposal"
        )


@contextmanager
def connect(ctx: CommandContext, *, timeout: float = 10.0) -> Iterator[Connection]:
    """Locate the domain, open a client to its coordinator, and close it afterwards."""
    location = locate(ctx)
    client = CoordinatorClient(location.coordinator, location.ca_pem, timeout=timeout)
    try:
        yield Connection(location, client)
    finally:
        client.close()
