"""Verifying a backup of the coordinator's store, item by item, against the pinned genesis.

A backup (docs/runtime.md "Backups"; the messages in proto/hsmdomain/v1/backup.proto, the
framing and the digest in `domain_edge.backup_files`) holds the store's states, proposals,
key records, registered HSAs and audit heads. `BackupVerifier` checks what needs no I/O: it is
given the pinned genesis state, then the header and every record in file order, then asked
to `finish`. It trusts nothing in the backup that nobody signed.

Invariants kept here:
- trust comes only from the pinned genesis: the header must name its domain and hash, state 1
  must be that very state (its every field, the evidence it carries included), and every
  later state must verify as the successor of the one before it (`chain.TrustedChain.update`,
  the check every HSA makes); the newest state must be the one the header names;
- items come in the format's order (states from version 1 without a gap, then proposals by
  arrival, key records by key id, HSAs by host id, audit heads by host and log), and the
  number of each kind is the header's count, so nothing can be dropped, added or repeated;
- a live key record is well formed (its metadata parses and names its key and this domain, a
  metadata version of at least 1, one token per backing version 1..current, each naming the
  key, with the sizes a token has) and is signed by a host of the newest state under that
  host's key there (`keytokens.verify_key_record_signature`, the HSAs' own check), its tokens
  under generations the newest state still keeps: so a record a non-member or a removed host
  signed, or one no HSA could open, fails;
- a deleted key record (a tombstone) is well formed, signed by a host of some verified state
  under the key that state listed, and its signed metadata says PENDING_DELETION with a
  deletion date not after the time it was deleted;
- a proposal's id is the SHA-256 of its bytes, which parse as a canonical proposal of this
  domain whose proposer and base are the columns the store keeps beside it; every approval
  and vote to cancel parses, names that proposal and the operator it is kept under, at most
  one per operator; an APPLIED proposal is the one its applied state carries;
- HSA registrations and audit heads are checked for form here (the edge checks each audit
  head's signature, `domain_edge.backup_files`); revisions, times and details are the
  store's own bookkeeping, checked for range only;
- every failure is a `BackupError` that names the item and what is wrong.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final

from google.protobuf.message import DecodeError

from domain_core import canonical
from domain_core._backup_keys import check_live, check_tombstone, fail, key_record_form
from domain_core.chain import TrustedChain
from domain_core.ciphertext import validate_key_id
from domain_core.errors import BackupError, HsmDomainError
from domain_core.limits import (
    DEFAULT_LIMITS,
    MAX_ADDRESS_CHARS,
    MAX_BACKUP_DETAIL_CHARS,
    MAX_BACKUP_LOG_NAME_CHARS,
    MAX_HEAD_BYTES,
    MAX_SIGNATURE_BYTES,
    Limits,
)
from domain_core.model import HOST_ID_PATTERN, OPERATOR_ID_PATTERN, Proposal, SealedState
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_proto import backup_pb2, domain_pb2, services_pb2

__all__ = [
    "BACKUP_FORMAT",
    "BACKUP_FORMAT_VERSION",
    "BackupSummary",
    "BackupVerifier",
    "KeyFacts",
    "StoreCounts",
]

BACKUP_FORMAT: Final = "hsm-domain-backup"
BACKUP_FORMAT_VERSION: Final = 1
_MAX_STORED: Final = 2**63 - 1  # the store's 64-bit integer columns
_SHOWN: Final = 80


@dataclass(frozen=True)
class StoreCounts:
    """How many items of each kind a store (or a backup of it) holds."""

    states: int = 0
    proposals: int = 0
    approvals: int = 0
    cancel_votes: int = 0
    keys: int = 0  # live key records
    tombstones: int = 0  # deleted key records still kept
    hsas: int = 0
    audit_heads: int = 0

    @property
    def empty(self) -> bool:
        """True when the store holds nothing at all."""
        return not any(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        """The counts by kind, in the format's order."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def describe(self) -> str:
        """What is there, in words ("3 states, 2 live key records"), or "nothing"."""
        words = {
            "states": ("state", "states"),
            "proposals": ("proposal", "proposals"),
            "approvals": ("approval", "approvals"),
            "cancel_votes": ("vote to cancel", "votes to cancel"),
            "keys": ("live key record", "live key records"),
            "tombstones": ("deleted key record", "deleted key records"),
            "hsas": ("registered HSA", "registered HSAs"),
            "audit_heads": ("audit head", "audit heads"),
        }
        parts = [f"{n} {words[name][n != 1]}" for name, n in self.as_dict().items() if n]
        return ", ".join(parts) if parts else "nothing"

    @classmethod
    def from_message(cls, message: backup_pb2.BackupCounts) -> StoreCounts:
        """The counts a backup header states."""
        return cls(**{f.name: int(getattr(message, f.name)) for f in fields(cls)})

    def to_message(self) -> backup_pb2.BackupCounts:
        """The counts as a header holds them."""
        return backup_pb2.BackupCounts(**self.as_dict())


@dataclass(frozen=True)
class KeyFacts:
    """What a verified key record says about its key's newest version (for the floors check)."""

    key_id: str
    metadata_version: int
    metadata_hash: bytes  # SHA-256 of the metadata bytes, as an HSA's floor holds it
    deleted: bool


@dataclass(frozen=True)
class BackupSummary:
    """What a verified backup holds."""

    domain_id: str
    genesis_hash: bytes
    newest_version: int
    newest_state_hash: bytes
    created_at: int
    counts: StoreCounts
    hosts: tuple[str, ...]  # the hosts of the newest state

    def to_json(self) -> dict[str, object]:
        """A JSON document of the summary (hashes in hex)."""
        return {
            "domain_id": self.domain_id,
            "genesis_hash": self.genesis_hash.hex(),
            "newest_version": self.newest_version,
            "newest_state_hash": self.newest_state_hash.hex(),
            "created_at": self.created_at,
            "counts": self.counts.as_dict(),
            "hosts": list(self.hosts),
        }


class _Kind(enum.IntEnum):
    """The kinds of record, in the order a backup holds them."""

    STATE = 0
    PROPOSAL = 1
    KEY = 2
    HSA = 3
    AUDIT_HEAD = 4


_KIND_OF_FIELD: Final = {
    "state": _Kind.STATE,
    "proposal": _Kind.PROPOSAL,
    "key": _Kind.KEY,
    "hsa": _Kind.HSA,
    "audit_head": _Kind.AUDIT_HEAD,
}
_APPLIED: Final = services_pb2.PROPOSAL_STATE_APPLIED
_KNOWN_PROPOSAL_STATES: Final = frozenset(
    v for v in services_pb2.ProposalState.values() if v != services_pb2.PROPOSAL_STATE_UNSPECIFIED
)


def _in_range(value: int, where: str, what: str) -> None:
    if not 0 <= value <= _MAX_STORED:
        raise fail(where, f"{what} {value} is out of range")


class BackupVerifier:
    """Checks one backup against a pinned genesis (see the module invariants).

    Feed it `header`, then every record with `record`, then call `finish`. `on_key` is called
    with the facts of every key record that verified (for the floors check of a restore).
    """

    def __init__(
        self,
        genesis: SealedState,
        limits: Limits = DEFAULT_LIMITS,
        *,
        on_key: Callable[[KeyFacts], None] | None = None,
    ) -> None:
        self._genesis = genesis
        self._limits = limits
        self._on_key = on_key
        self._domain_id = genesis.manifest.domain_id
        self._header: backup_pb2.BackupHeader | None = None
        self._expected = StoreCounts()
        self._seen: dict[str, int] = dict.fromkeys(StoreCounts().as_dict(), 0)
        self._kind = _Kind.STATE
        self._chain: TrustedChain | None = None
        self._applied_by: dict[int, bytes] = {}  # version -> the proposal id it carries
        self._host_keys: dict[str, dict[bytes, PublicKey]] = {}  # every key a host ever had
        self._last_seq = 0
        self._last_id = ""

    # --- the header ------------------------------------------------------------------------

    def header(self, header: backup_pb2.BackupHeader) -> None:
        """Check the header against the pinned genesis; it must come first, once."""
        if self._header is not None:
            raise BackupError("the backup holds two headers")
        if header.format != BACKUP_FORMAT:
            raise BackupError(f"not a backup of an HSM domain (format {header.format[:40]!r})")
        if header.format_version != BACKUP_FORMAT_VERSION:
            raise BackupError(
                f"backup format version {header.format_version}; this tool reads version "
                f"{BACKUP_FORMAT_VERSION}: use a release that reads it"
            )
        if header.domain_id != self._domain_id:
            raise BackupError(
                f"the backup is of domain {header.domain_id[:_SHOWN]!r}, the pinned genesis is "
                f"of {self._domain_id!r}: a backup of another domain"
            )
        if header.genesis_hash != self._genesis.hash:
            raise BackupError(
                "the backup's genesis hash is not the pinned genesis: a backup of another "
                "domain (or of another genesis of this one)"
            )
        if len(header.newest_state_hash) != canonical.DIGEST_BYTES or header.newest_version < 1:
            raise BackupError("the header names no newest state (version and 32-byte hash)")
        counts = StoreCounts.from_message(header.counts)
        for name, count in counts.as_dict().items():
            _in_range(count, "the header", f"the count of {name}")
        if counts.states != header.newest_version:
            raise BackupError(
                f"the header counts {counts.states} states but names version "
                f"{header.newest_version} as the newest"
            )
        self._header = header
        self._expected = counts

    # --- records ---------------------------------------------------------------------------

    def record(self, record: backup_pb2.BackupRecord) -> None:
        """Check one record (not the trailer) in its place in the file."""
        if self._header is None:
            raise BackupError("a record before the header")
        which = record.WhichOneof("item")
        if which is None or which not in _KIND_OF_FIELD:
            raise BackupError(f"a record of unknown kind ({which or 'empty'})")
        kind = _KIND_OF_FIELD[which]
        if kind < self._kind:
            raise BackupError(f"a {which} record after the {self._kind.name.lower()} records")
        if kind > self._kind:
            self._end_of(self._kind)
            self._kind = kind
            self._last_seq, self._last_id = 0, ""
        if kind is _Kind.STATE:
            self._state(record.state)
        elif kind is _Kind.PROPOSAL:
            self._proposal(record.proposal)
        elif kind is _Kind.KEY:
            self._key(record.key)
        elif kind is _Kind.HSA:
            self._hsa(record.hsa)
        else:
            self._audit_head(record.audit_head)

    def _count(self, name: str, by: int = 1) -> None:
        self._seen[name] += by
        expected = getattr(self._expected, name)
        if self._seen[name] > expected:
            raise BackupError(f"the backup holds more {name} than its header counts ({expected})")

    def _end_of(self, kind: _Kind) -> None:
        """The records of `kind` are over: the states must have reached the newest one."""
        if kind is _Kind.STATE:
            self._check_newest()

    # --- states ----------------------------------------------------------------------------

    def _state(self, item: backup_pb2.BackupState) -> None:
        version = self._seen["states"] + 1
        where = f"state version {version}"
        self._count("states")
        if item.version != version:
            raise fail(where, f"the backup holds version {item.version} in its place (a gap)")
        try:
            state = SealedState.from_bytes(item.state, self._limits)
        except HsmDomainError as error:
            raise fail(where, f"not a valid sealed state ({error.message})") from None
        if state.version != version:
            raise fail(where, f"the state inside claims version {state.version}")
        try:
            if self._chain is None:
                if state.message != self._genesis.message:  # its evidence too, not just its hash
                    raise fail(where, "it is not the pinned genesis state")
                self._chain = TrustedChain.from_genesis(
                    self._domain_id, self._genesis.hash, self._genesis
                )
            else:
                self._chain.update(state)
        except HsmDomainError as error:
            raise fail(where, f"does not verify: {error.message}") from None
        except ValueError as error:  # a certificate inside that does not parse (cryptography)
            raise fail(where, f"does not verify: it holds malformed data ({error})") from None
        if state.manifest.message.proposal_id:
            self._applied_by[version] = bytes(state.manifest.message.proposal_id)
        for host in state.manifest.message.hosts:
            key = PublicKey(SignatureAlgorithm.ED25519, host.signing_public_key)
            self._host_keys.setdefault(host.host_id, {})[bytes(host.signing_public_key)] = key

    def _check_newest(self) -> None:
        header = self._header
        chain = self._chain
        if header is None or chain is None:
            raise BackupError("the backup holds no state: not even the genesis")
        if chain.version != header.newest_version or chain.head.hash != header.newest_state_hash:
            raise BackupError(
                f"the backup's states end at version {chain.version}, its header names "
                f"version {header.newest_version} with another hash"
            )

    @property
    def chain(self) -> TrustedChain:
        """The chain the backup's states verified to (once the states are over)."""
        if self._chain is None:
            raise RuntimeError("no state verified yet")
        return self._chain

    # --- proposals -------------------------------------------------------------------------

    def _proposal(self, item: backup_pb2.BackupProposal) -> None:
        where = f"proposal {item.proposal_id.hex()[:16] or '(no id)'}"
        self._count("proposals")
        if item.seq <= self._last_seq or item.seq > _MAX_STORED:
            raise fail(where, f"out of arrival order (seq {item.seq} after {self._last_seq})")
        self._last_seq = item.seq
        if item.proposal_id != canonical.proposal_id(item.proposal):
            raise fail(where, "its id is not the SHA-256 of its bytes")
        try:
            proposal = Proposal.from_bytes(item.proposal, self._limits)
        except HsmDomainError as error:
            raise fail(where, f"does not parse as a proposal ({error.message})") from None
        if proposal.domain_id != self._domain_id:
            raise fail(where, f"is for domain {proposal.domain_id[:_SHOWN]!r}")
        if (item.proposer, item.base_version, item.base_state_hash) != (
            proposal.proposer_id,
            proposal.base_version,
            proposal.base_state_hash,
        ):
            raise fail(where, "the proposer or base kept beside it is not the proposal's own")
        if item.state not in _KNOWN_PROPOSAL_STATES:
            raise fail(where, f"unknown state {item.state}")
        if len(item.detail) > MAX_BACKUP_DETAIL_CHARS:
            raise fail(where, f"its detail is longer than {MAX_BACKUP_DETAIL_CHARS} characters")
        for value, what in (
            (item.created_at, "creation time"),
            (item.expires_at, "expiry"),
            (item.closed_at, "closing time"),
            (item.applied_version, "applied version"),
        ):
            _in_range(value, where, what)
        if (
            item.state == _APPLIED
            and self._applied_by.get(item.applied_version) != item.proposal_id
        ):
            raise fail(
                where,
                f"is APPLIED at version {item.applied_version}, which does not carry it",
            )
        self._signed(item.approvals, domain_pb2.Approval, proposal, f"{where}: approval")
        self._signed(item.cancel_votes, domain_pb2.CancelVote, proposal, f"{where}: vote")
        self._count("approvals", len(item.approvals))
        self._count("cancel_votes", len(item.cancel_votes))

    def _signed(
        self,
        items: object,
        message_type: type[domain_pb2.Approval] | type[domain_pb2.CancelVote],
        proposal: Proposal,
        where: str,
    ) -> None:
        """Each approval or vote parses, names `proposal` and the operator it is kept under,
        and no operator has two."""
        seen: set[str] = set()
        signed_items: list[backup_pb2.BackupSigned] = list(items)  # type: ignore[call-overload]
        if len(signed_items) > self._limits.max_approvals_per_proposal:
            raise fail(where, f"more than {self._limits.max_approvals_per_proposal} of them")
        for signed in signed_items:
            if not OPERATOR_ID_PATTERN.match(signed.operator_id):
                raise fail(where, f"kept under {signed.operator_id[:_SHOWN]!r}, not an operator")
            if signed.operator_id in seen:
                raise fail(where, f"two from operator {signed.operator_id[:16]}")
            seen.add(signed.operator_id)
            message = message_type()
            try:
                message.ParseFromString(signed.signed)
            except DecodeError:
                raise fail(where, "does not parse") from None
            if message.proposal_id != proposal.id or message.operator_id != signed.operator_id:
                raise fail(where, "names another proposal or operator than it is kept under")
            if not 0 < len(message.signature) <= MAX_SIGNATURE_BYTES:
                raise fail(where, "has no signature of a valid size")

    # --- key records -----------------------------------------------------------------------

    def _key(self, item: backup_pb2.BackupKey) -> None:
        deleted = item.deleted_at != 0
        where = f"{'deleted ' if deleted else ''}key {item.key_id[:_SHOWN]}"
        self._count("tombstones" if deleted else "keys")
        try:
            validate_key_id(item.key_id)
        except HsmDomainError:
            raise fail(where, "not a key id") from None
        if item.key_id <= self._last_id:
            raise fail(where, "out of key id order (or twice)")
        self._last_id = item.key_id
        for value, what in ((item.revision, "revision"), (item.deleted_at, "deletion time")):
            _in_range(value, where, what)
        if item.revision < 1:
            raise fail(where, "revision 0: a stored record has revision 1 or more")
        record, metadata = key_record_form(item, self._domain_id, where)
        if item.creator != metadata.creator:
            raise fail(where, "the creator kept beside it is not its metadata's creator")
        if deleted:
            check_tombstone(record, metadata, item.deleted_at, self._host_keys, where)
        else:
            check_live(record, self.chain.head.manifest, where)
        if self._on_key is not None:
            self._on_key(
                KeyFacts(
                    item.key_id,
                    int(metadata.metadata_version),
                    hashlib.sha256(record.metadata).digest(),
                    deleted,
                )
            )

    # --- HSAs and audit heads --------------------------------------------------------------

    def _next_id(self, key: str, where: str) -> None:
        if key <= self._last_id:
            raise fail(where, "out of order (or twice)")
        self._last_id = key

    def _hsa(self, item: backup_pb2.BackupHsa) -> None:
        where = f"registered HSA {item.host_id[:_SHOWN]!r}"
        self._count("hsas")
        if not HOST_ID_PATTERN.match(item.host_id):
            raise fail(where, "not a host id")
        self._next_id(item.host_id, where)
        if len(item.address) > MAX_ADDRESS_CHARS:
            raise fail(where, f"its address is longer than {MAX_ADDRESS_CHARS} characters")
        if item.state_hash and len(item.state_hash) != canonical.DIGEST_BYTES:
            raise fail(where, "its reported state hash is not 32 bytes")
        for value, what in (
            (item.registered_at, "registration time"),
            (item.version, "reported version"),
            (item.reported_at, "report time"),
        ):
            _in_range(value, where, what)

    def _audit_head(self, item: backup_pb2.BackupAuditHead) -> None:
        where = f"audit head of {item.host_id[:_SHOWN]!r} {item.log[:_SHOWN]!r}"
        self._count("audit_heads")
        if not HOST_ID_PATTERN.match(item.host_id) or not item.log:
            raise fail(where, "not a host id and log name")
        if len(item.log) > MAX_BACKUP_LOG_NAME_CHARS:
            raise fail(where, f"its log name is longer than {MAX_BACKUP_LOG_NAME_CHARS}")
        self._next_id(f"{item.host_id}\0{item.log}", where)
        if not 0 < len(item.checkpoint) <= MAX_HEAD_BYTES:
            raise fail(where, f"its checkpoint is empty or larger than {MAX_HEAD_BYTES} bytes")
        for value, what in ((item.seq, "record number"), (item.reported_at, "report time")):
            _in_range(value, where, what)
        if item.host_id not in self._host_keys:
            raise fail(where, "not a host of any verified state")

    def host_keys_ever(self, host_id: str) -> list[PublicKey]:
        """Every signing key the verified states listed for `host_id` (for audit heads)."""
        return list(self._host_keys.get(host_id, {}).values())

    # --- the end ---------------------------------------------------------------------------

    def finish(self, created_at: int = 0) -> BackupSummary:
        """After the last record: every count must be the header's; the summary."""
        header = self._header
        if header is None:
            raise BackupError("the backup holds no header")
        self._check_newest()
        for name, expected in self._expected.as_dict().items():
            if self._seen[name] != expected:
                raise BackupError(
                    f"the backup holds {self._seen[name]} {name}, its header counts {expected}: "
                    "records are missing"
                )
        head = self.chain.head
        return BackupSummary(
            domain_id=self._domain_id,
            genesis_hash=self._genesis.hash,
            newest_version=head.version,
            newest_state_hash=head.hash,
            created_at=int(created_at or header.created_at),
            counts=self._expected,
            hosts=tuple(h.host_id for h in head.manifest.message.hosts),
        )
