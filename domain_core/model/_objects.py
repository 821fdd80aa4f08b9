"""The signed objects: `Proposal`, `Manifest` and `SealedState`, each kept with its exact bytes.

Invariants: see the package docstring (an object exists only for bytes that parsed and passed
structural validation; digests and ids come from the bytes as received).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from google.protobuf.message import DecodeError

from domain_core import canonical, display
from domain_core.contexts import PayloadType
from domain_core.errors import LimitExceededError, MalformedMessageError
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_core.model._records import (
    HOST_ID_PATTERN,
    NONCE_BYTES,
    OPERATOR_ID_PATTERN,
    _parse,
    _require,
    _validate_change,
    change_type_of,
    operator_public_key,
    parse_canonical,
    validate_domain_id,
    validate_host,
    validate_operator,
)
from domain_core.signers import PublicKey, SignatureAlgorithm
from domain_proto import domain_pb2


@dataclass(frozen=True, eq=False)
class Proposal:
    """A proposal as signed: its exact bytes, the parsed message and its id."""

    raw: bytes
    message: domain_pb2.Proposal = field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Proposal:
        """Parse and structurally validate a serialized proposal."""
        message = parse_canonical(domain_pb2.Proposal, raw, "proposal", limits.max_proposal_bytes)
        validate_domain_id(message.domain_id)
        _require(
            len(message.base_state_hash) == canonical.DIGEST_BYTES,
            "proposal base state hash must be 32 bytes",
        )
        _require(
            0 < len(message.changes) <= limits.max_changes_per_proposal,
            f"a proposal carries 1 to {limits.max_changes_per_proposal} changes",
        )
        _require(
            bool(OPERATOR_ID_PATTERN.match(message.proposer_id)),
            "proposer id must be an operator id (64 hex characters)",
        )
        _require(message.expires_at > message.created_at, "proposal expires before it is created")
        _require(
            len(message.reason) <= limits.max_reason_chars,
            f"proposal reason is longer than {limits.max_reason_chars} characters",
        )
        _require(
            display.printable(message.reason),
            "proposal reason must be printable text on one line: no control characters, line "
            "breaks, escape sequences or format characters such as bidi overrides",
        )
        _require(len(message.nonce) == NONCE_BYTES, f"proposal nonce must be {NONCE_BYTES} bytes")
        for change in message.changes:
            _validate_change(change, message.domain_id, limits)
        return cls(raw=raw, message=message)

    @classmethod
    def create(
        cls,
        *,
        domain_id: str,
        base_version: int,
        base_state_hash: bytes,
        changes: Iterable[domain_pb2.Change],
        proposer_id: str,
        created_at: int,
        expires_at: int,
        reason: str = "",
        nonce: bytes,
    ) -> Proposal:
        """Serialize a new proposal once; the result's bytes are what operators sign."""
        message = domain_pb2.Proposal(
            domain_id=domain_id,
            base_version=base_version,
            base_state_hash=base_state_hash,
            changes=list(changes),
            proposer_id=proposer_id,
            created_at=created_at,
            expires_at=expires_at,
            reason=reason,
            nonce=nonce,
        )
        return cls.from_bytes(message.SerializeToString(deterministic=True))

    @cached_property
    def id(self) -> bytes:
        """SHA-256 of the proposal bytes."""
        return canonical.proposal_id(self.raw)

    @property
    def domain_id(self) -> str:
        return self.message.domain_id

    @property
    def base_version(self) -> int:
        return self.message.base_version

    @property
    def base_state_hash(self) -> bytes:
        return self.message.base_state_hash

    @property
    def proposer_id(self) -> str:
        return self.message.proposer_id

    @property
    def created_at(self) -> int:
        return self.message.created_at

    @property
    def expires_at(self) -> int:
        return self.message.expires_at

    @property
    def changes(self) -> Sequence[domain_pb2.Change]:
        return self.message.changes

    @cached_property
    def change_types(self) -> frozenset[int]:
        """The distinct change types this proposal carries."""
        return frozenset(change_type_of(c) for c in self.message.changes)


@dataclass(frozen=True, eq=False)
class Manifest:
    """A manifest as received: exact bytes, parsed message, and its digest."""

    raw: bytes
    message: domain_pb2.Manifest = field(repr=False)

    @classmethod
    def from_bytes(cls, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
        """Parse and structurally validate a serialized manifest."""
        message = _parse(domain_pb2.Manifest, raw, "manifest", limits)
        validate_domain_id(message.domain_id)
        _require(message.version >= 1, "manifest version must be at least 1")
        _require(
            len(message.previous_state_hash) == canonical.DIGEST_BYTES,
            "manifest previous state hash must be 32 bytes",
        )
        if len(message.hosts) > limits.max_hosts:
            raise LimitExceededError(f"manifest lists more than {limits.max_hosts} hosts")
        if len(message.operators) > limits.max_operators:
            raise LimitExceededError(f"manifest lists more than {limits.max_operators} operators")
        for host in message.hosts:
            validate_host(host, message.domain_id)
        for operator in message.operators:
            validate_operator(operator, limits)
        _require(len(message.key_generations) >= 1, "manifest lists no domain key generation")
        generations = [g.generation for g in message.key_generations]
        _require(
            generations == sorted(set(generations)) and generations[0] >= 1,
            "manifest key generations must be ascending, unique and at least 1",
        )
        _require(message.HasField("quorum"), "manifest has no quorum policy")
        _require(message.HasField("settings"), "manifest has no settings")
        return cls(raw=raw, message=message)

    @classmethod
    def from_message(cls, message: domain_pb2.Manifest) -> Manifest:
        """Serialize a freshly computed manifest once (by the producing HSA)."""
        return cls.from_bytes(message.SerializeToString(deterministic=True))

    @cached_property
    def hash(self) -> bytes:
        """Domain-separated digest of the manifest bytes (associated data of the secrets)."""
        return canonical.digest(PayloadType.MANIFEST, self.raw)

    @property
    def domain_id(self) -> str:
        return self.message.domain_id

    @property
    def version(self) -> int:
        return self.message.version

    @property
    def created_at(self) -> int:
        return self.message.created_at

    @property
    def current_generation(self) -> int:
        """The domain key generation new key tokens are sealed under."""
        return self.message.key_generations[-1].generation

    @cached_property
    def hosts_by_id(self) -> dict[str, domain_pb2.Host]:
        return {h.host_id: h for h in self.message.hosts}

    @cached_property
    def operators_by_id(self) -> dict[str, domain_pb2.Operator]:
        return {o.operator_id: o for o in self.message.operators}

    @cached_property
    def operator_keys(self) -> dict[str, PublicKey]:
        """Verified public keys of the current operators, by operator id."""
        return {o.operator_id: operator_public_key(o) for o in self.message.operators}

    @cached_property
    def host_fingerprints(self) -> frozenset[bytes]:
        """TLS certificate fingerprints of the trusted hosts (peer authorisation)."""
        return frozenset(h.tls_certificate_fingerprint for h in self.message.hosts)

    def host_signing_key(self, host_id: str) -> PublicKey | None:
        """The Ed25519 key of a trusted host, or None if the host is not trusted here."""
        return self.host_signing_keys.get(host_id)

    @cached_property
    def host_signing_keys(self) -> Mapping[str, PublicKey]:
        """The Ed25519 keys of the trusted hosts by host id (parsed once per manifest): who
        may sign states and key records under this manifest. Read-only."""
        return MappingProxyType(
            {
                h.host_id: PublicKey(SignatureAlgorithm.ED25519, h.signing_public_key)
                for h in self.message.hosts
            }
        )


@dataclass(frozen=True, eq=False)
class SealedState:
    """One link of the chain: the exact bytes of its parts, parsed and hashed."""

    message: domain_pb2.SealedState = field(repr=False)
    manifest: Manifest
    secrets: domain_pb2.SealedSecrets = field(repr=False)
    proposal: Proposal | None

    @classmethod
    def from_message(
        cls, message: domain_pb2.SealedState, limits: Limits = DEFAULT_LIMITS
    ) -> SealedState:
        """Parse and structurally validate a sealed state as received."""
        if not isinstance(message, domain_pb2.SealedState):
            raise TypeError("expected an hsmdomain.v1.SealedState")
        manifest = Manifest.from_bytes(message.manifest, limits)
        secrets = _parse(domain_pb2.SealedSecrets, message.secrets, "sealed secrets", limits)
        _require(
            secrets.generation == manifest.current_generation,
            "sealed secrets are not under the manifest's current key generation",
        )
        proposal = Proposal.from_bytes(message.proposal, limits) if message.proposal else None
        if len(message.approvals) > limits.max_approvals_per_proposal:
            raise LimitExceededError(
                f"more than {limits.max_approvals_per_proposal} approvals in one state"
            )
        _require(
            bool(HOST_ID_PATTERN.match(message.producer_host_id)),
            "sealed state names no valid producing host id",
        )
        _require(bool(message.producer_signature), "sealed state is not signed")
        return cls(message=message, manifest=manifest, secrets=secrets, proposal=proposal)

    @classmethod
    def from_bytes(cls, raw: bytes, limits: Limits = DEFAULT_LIMITS) -> SealedState:
        """Parse a serialized SealedState (as stored on disk or by the coordinator)."""
        if len(raw) > limits.max_message_bytes:
            raise LimitExceededError(
                f"sealed state is {len(raw)} bytes, above the limit of {limits.max_message_bytes}"
            )
        message = domain_pb2.SealedState()
        try:
            message.ParseFromString(raw)
        except DecodeError:
            raise MalformedMessageError("sealed state does not parse") from None
        return cls.from_message(message, limits)

    def to_bytes(self) -> bytes:
        """Serialize for storage; the signed parts are carried as the bytes received."""
        return self.message.SerializeToString(deterministic=True)

    @cached_property
    def hash(self) -> bytes:
        """The state hash: covers the manifest and sealed secrets bytes."""
        return state_hash(self.message.manifest, self.message.secrets)

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def approvals(self) -> Sequence[domain_pb2.Approval]:
        return self.message.approvals


def state_hash(manifest_raw: bytes, secrets_raw: bytes) -> bytes:
    """Hash of one domain state (what the chain links, what the producer signs)."""
    return canonical.digest(PayloadType.SEALED_STATE, manifest_raw, secrets_raw)
