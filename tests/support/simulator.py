"""An in-memory HSM domain for tests: real keys, real sealing, real chain, no I/O.

Modelled on python-tuf's `RepositorySimulator`: a `SimulatedDomain` holds every host's and
operator's private keys and the list of sealed states, and produces the next state exactly as
an honest HSA would (`next_manifest` + `next_domain_keys` + `seal_state`, the producer
unsealing the current keys with its own X25519 key). `MaliciousCoordinator` turns honest
states into the lies an untrusted coordinator (or a compromised host) could tell: flipped
bits, swapped parts, replaced approvals, re-signed or forged states, reordered chains.

Time never comes from a clock: `SimulatedDomain.now` moves only when a test calls `advance`.
Operators are addressed by index into `SimulatedDomain.operators` (every operator ever made,
including removed and not-yet-added ones); hosts by host id in `SimulatedDomain.hosts`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from domain_core import crypto, enrollment, genesis, model, pki, quorum, sealing, transition
from domain_core.chain import TrustedChain
from domain_core.errors import EnrollmentError
from domain_core.identity import HostIdentity
from domain_core.model import Proposal, SealedState
from domain_core.pki import DomainCA
from domain_core.signers import InMemorySigner, SignatureAlgorithm, Signer
from domain_proto import domain_pb2

DEFAULT_NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
DEFAULT_ALGORITHMS: tuple[SignatureAlgorithm, ...] = (
    SignatureAlgorithm.ED25519,
    SignatureAlgorithm.ECDSA_P256,
)

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_NOW",
    "MaliciousCoordinator",
    "SimHost",
    "SimOperator",
    "SimulatedDomain",
    "flip_bit",
    "forge_enrollment",
    "forge_unchained_state",
    "new_ca",
    "new_host",
    "new_operator",
    "noncanonical_encodings",
]


# --- participants ----------------------------------------------------------------------------


@dataclass
class SimHost:
    """One HSA's key material, its public host record and its enrollment (as it made it)."""

    host_id: str
    signer: InMemorySigner
    agreement_private_key: bytes = field(repr=False)
    agreement_public_key: bytes
    record: domain_pb2.Host
    enrollment: bytes = b""
    tls_signer: InMemorySigner | None = field(default=None, repr=False)
    certificate: bytes = b""  # DER, issued by the domain CA

    @property
    def tls_certificate_fingerprint(self) -> bytes:
        return self.record.tls_certificate_fingerprint


@dataclass
class SimOperator:
    """One operator's token (an in-memory signer here) and its public operator record."""

    name: str
    signer: Signer
    record: domain_pb2.Operator

    @property
    def operator_id(self) -> str:
        return self.record.operator_id


def _at(now: int) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def new_ca(domain_id: str, now: int = DEFAULT_NOW) -> DomainCA:
    """A fresh domain CA valid from `now` (10 years)."""
    return DomainCA.create(domain_id, now=_at(now))


def new_host(
    domain_id: str,
    host_id: str,
    signer: InMemorySigner | None = None,
    *,
    ca: DomainCA | None = None,
    now: int = DEFAULT_NOW,
) -> SimHost:
    """A fresh host as `hsm-domain add-node` makes one: Ed25519 signing key, the X25519 key
    derived from it, a P-256 TLS key with a certificate of `ca` (default: a CA of its own,
    for tests that use only the keys) issued at `now`, and its enrollment."""
    signer = signer or InMemorySigner.generate(SignatureAlgorithm.ED25519)
    seed = serialization.load_der_private_key(signer.private_pkcs8_der(), password=None)
    assert isinstance(seed, ed25519.Ed25519PrivateKey)
    private = crypto.x25519_private_from_ed25519_seed(seed.private_bytes_raw())
    tls_key = ec.generate_private_key(ec.SECP256R1())
    identity = HostIdentity(host_id, signer, private, tls_key)
    ca = ca or new_ca(domain_id, now)
    certificate = pki.certificate_der(
        ca.issue(identity.spiffe_id(domain_id), identity.tls_public_key, now=_at(now))
    )
    raw = enrollment.make_enrollment(identity, domain_id, certificate)
    record = model.parse_enrollment(raw, domain_id)[1]
    return SimHost(
        host_id,
        signer,
        private,
        identity.agreement_public_key,
        record,
        enrollment=raw,
        tls_signer=InMemorySigner(tls_key),
        certificate=certificate,
    )


def forge_enrollment(
    record: domain_pb2.Host,
    *,
    domain_id: str,
    signer: Signer | None = None,
    tls_signer: Signer | None = None,
    certificate: bytes = b"",
    address: str = "",
) -> bytes:
    """An enrollment for any host record, signed by whatever keys are given (none: no
    signature): what an attacker can build without the keys the record names."""
    host_bytes = record.SerializeToString(deterministic=True)
    message = enrollment.enrollment_signing_input(domain_id, host_bytes, certificate)
    return domain_pb2.HostEnrollment(
        host=host_bytes,
        tls_certificate=certificate,
        signature=signer.sign(message) if signer is not None else b"",
        address=address,
        tls_signature=tls_signer.sign(message) if tls_signer is not None else b"",
    ).SerializeToString(deterministic=True)


def new_operator(
    name: str,
    algorithm: SignatureAlgorithm = SignatureAlgorithm.ED25519,
    signer: Signer | None = None,
) -> SimOperator:
    """A fresh operator with a new key of `algorithm` (or the given signer)."""
    signer = signer or InMemorySigner.generate(algorithm)
    return SimOperator(name, signer, model.make_operator(name, signer.public_key))


def forge_unchained_state(
    copied: SealedState,
    version: int,
    attacker: SimHost,
    *,
    quorum_threshold: int = 1,
    previous_state_hash: bytes | None = None,
) -> SealedState:
    """A state "version `version`" of `copied`'s domain that no history leads to: the same
    operators, the attacker's host added, the threshold set to `quorum_threshold`, a random
    previous hash (unless given), sealed under fresh domain keys and signed by the attacker's
    host, which the state itself lists (so it is "signed by one of its own hosts", and
    nothing more)."""
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(copied.manifest.message)
    manifest.version = version
    manifest.previous_state_hash = previous_state_hash or crypto.random_bytes(32)
    manifest.hosts.append(attacker.record)
    manifest.quorum.threshold = quorum_threshold
    keys = {g.generation: crypto.new_aes_key() for g in manifest.key_generations}
    return sealing.seal_state(
        manifest,
        keys,
        producer_host_id=attacker.host_id,
        producer=attacker.signer,
        proposal=None,
    )


def _with_unknown(message: domain_pb2.Proposal, path: Sequence[str], payload: bytes) -> bytes:
    """`message` serialized with an unknown field 99 (a string) in the sub-message at `path`
    ('changes', '0', 'set_quorum', ...: field names and list indexes)."""
    copy = domain_pb2.Proposal()
    copy.CopyFrom(message)
    target: object = copy
    for part in path:
        target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
    length = len(payload)
    varint = bytearray()
    while True:
        varint.append((length & 0x7F) | (0x80 if length > 0x7F else 0))
        length >>= 7
        if not length:
            break
    target.MergeFromString(b"\x9a\x06" + bytes(varint) + payload)  # type: ignore[attr-defined]
    return copy.SerializeToString(deterministic=True)


def noncanonical_encodings(proposal: Proposal, max_bytes: int = 64 * 1024) -> dict[str, bytes]:
    """Other encodings of `proposal` that protobuf parses but `Proposal.from_bytes` refuses
    (issue 21, item 6), by what is wrong: unknown fields (top-level and nested in its first
    change), fields out of order, a default value written out, a non-minimal varint, two
    concatenated halves, and unknown-field padding past `max_bytes`. Its first field must be
    the domain id and its base version 1 to 127."""
    message = proposal.message
    assert 0 < message.base_version < 128
    assert message.domain_id
    body = message.changes[0].WhichOneof("change")
    assert body is not None
    raw = proposal.raw
    version = b"\x10" + bytes([message.base_version])
    assert raw.count(version) >= 1
    nonce = message.nonce
    without_nonce = domain_pb2.Proposal()
    without_nonce.CopyFrom(message)
    without_nonce.ClearField("nonce")
    without_version = domain_pb2.Proposal()
    without_version.CopyFrom(message)
    without_version.ClearField("base_version")
    plain = without_version.SerializeToString(deterministic=True)
    cut = 2 + plain[1]  # after the domain id (field 1, a short string)
    head = domain_pb2.Proposal(domain_id=message.domain_id, base_version=message.base_version)
    tail = domain_pb2.Proposal()
    tail.CopyFrom(message)
    tail.ClearField("domain_id")
    tail.ClearField("base_version")
    return {
        "an unknown field": _with_unknown(message, [], b"set-quorum 1"),
        "an unknown field in a change": _with_unknown(message, ["changes", "0"], b"x"),
        "an unknown field in a change's body": _with_unknown(message, ["changes", "0", body], b"x"),
        "fields out of order": domain_pb2.Proposal(nonce=nonce).SerializeToString()
        + without_nonce.SerializeToString(deterministic=True),
        "a default value written out": plain[:cut] + b"\x10\x00" + plain[cut:],
        "a non-minimal varint": raw.replace(
            version, b"\x10" + bytes([message.base_version | 0x80, 0x00]), 1
        ),
        "two concatenated halves": tail.SerializeToString(deterministic=True)
        + head.SerializeToString(deterministic=True),
        "padded past the size limit": _with_unknown(message, [], bytes(max_bytes)),
    }


def flip_bit(data: bytes, bit: int) -> bytes:
    """`data` with bit number `bit` (0 = most significant bit of byte 0) inverted."""
    if not 0 <= bit < len(data) * 8:
        raise ValueError(f"bit {bit} is outside {len(data)} bytes")
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def _change(**kwargs: object) -> domain_pb2.Change:
    return domain_pb2.Change(**kwargs)


# --- the honest domain -----------------------------------------------------------------------


@dataclass
class SimulatedDomain:
    """A whole domain in memory: participants' keys, the chain of states, a manual clock."""

    domain_id: str
    hosts: dict[str, SimHost]
    operators: list[SimOperator]
    now: int
    states: list[SealedState] = field(default_factory=list)
    genesis_proposal: Proposal | None = None
    genesis_approvals: list[domain_pb2.Approval] = field(default_factory=list)
    ca: DomainCA | None = None  # issues new hosts' certificates; the genesis pins it
    _nonces: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    # -- creation --

    @classmethod
    def create(
        cls,
        domain_id: str = "test",
        hosts: int = 3,
        operators: int = 3,
        threshold: int = 2,
        algorithms: Sequence[SignatureAlgorithm] = DEFAULT_ALGORITHMS,
        now: int = DEFAULT_NOW,
        *,
        settings: domain_pb2.DomainSettings | None = None,
        change_thresholds: Sequence[domain_pb2.ChangeThreshold] = (),
        operator_signers: Sequence[Signer] | None = None,
        producer: str | None = None,
    ) -> SimulatedDomain:
        """Run a genesis ceremony: hosts `hsa-1..N`, operators `op0..M-1`, all of them approve.

        Operators cycle through `algorithms` (default: Ed25519, ECDSA P-256, Ed25519, ...)
        unless `operator_signers` gives their tokens.
        """
        ca = new_ca(domain_id, now)
        sim_hosts = {
            f"hsa-{i + 1}": new_host(domain_id, f"hsa-{i + 1}", ca=ca, now=now)
            for i in range(hosts)
        }
        if operator_signers is not None:
            sim_ops = [
                new_operator(f"op{i}", signer=signer) for i, signer in enumerate(operator_signers)
            ]
        else:
            sim_ops = [
                new_operator(f"op{i}", algorithms[i % len(algorithms)]) for i in range(operators)
            ]
        sim = cls(domain_id=domain_id, hosts=sim_hosts, operators=sim_ops, now=now, ca=ca)
        proposal = genesis.genesis_proposal(
            domain_id,
            [h.enrollment for h in sim_hosts.values()],
            [o.record for o in sim_ops],
            threshold,
            ca_certificate=ca.certificate_der,
            proposer_id=sim_ops[0].operator_id,
            now=now,
            settings=settings,
            change_thresholds=change_thresholds,
        )
        approvals = [quorum.approve(proposal, o.signer) for o in sim_ops]
        producer = producer or next(iter(sim_hosts))
        state = genesis.seal_genesis(
            proposal,
            approvals,
            producer_host_id=producer,
            producer=sim_hosts[producer].signer,
            now=now,
        )
        sim.genesis_proposal = proposal
        sim.genesis_approvals = approvals
        sim.states.append(state)
        return sim

    # -- views --

    @property
    def genesis(self) -> SealedState:
        return self.states[0]

    @property
    def genesis_hash(self) -> bytes:
        return self.states[0].hash

    @property
    def head(self) -> SealedState:
        return self.states[-1]

    @property
    def version(self) -> int:
        return self.head.version

    def state(self, version: int) -> SealedState:
        """The state with this version (1 = genesis)."""
        return self.states[version - 1]

    def state_head(self, base: SealedState | None = None) -> transition.StateHead:
        base = base or self.head
        return transition.StateHead(base.manifest, base.hash)

    def operator_index(self, operator_id: str) -> int:
        for index, operator in enumerate(self.operators):
            if operator.operator_id == operator_id:
                return index
        raise KeyError(operator_id)

    def current_operator_indexes(self, base: SealedState | None = None) -> list[int]:
        """Indexes of the operators of `base` (default: head), in manifest order."""
        base = base or self.head
        return [self.operator_index(o.operator_id) for o in base.manifest.message.operators]

    def current_host_ids(self, base: SealedState | None = None) -> list[str]:
        base = base or self.head
        return [h.host_id for h in base.manifest.message.hosts]

    def required_threshold(self, proposal: Proposal, base: SealedState | None = None) -> int:
        base = base or self.head
        return quorum.required(base.manifest, proposal).threshold

    def keys_at(self, state: SealedState, host_id: str) -> dict[int, bytes]:
        """The domain keys of `state` as `host_id` unseals them."""
        host = self.hosts[host_id]
        return sealing.unseal_state(state, host_id, host.agreement_private_key)

    def chain(self, upto: int | None = None) -> TrustedChain:
        """A fresh TrustedChain pinned to this domain's genesis, fed states 2..`upto`."""
        trusted = TrustedChain.from_genesis(self.domain_id, self.genesis_hash, self.genesis)
        for state in self.states[1:upto]:
            trusted.update(state)
        return trusted

    # -- clock --

    def advance(self, seconds: int) -> int:
        """Move the simulated clock forward; returns the new time."""
        self.now += seconds
        return self.now

    # -- proposals and approvals --

    def nonce(self) -> bytes:
        """A proposal nonce (deterministic per simulator, distinct per call)."""
        return self._nonces.randbytes(model.NONCE_BYTES)

    def propose(
        self,
        changes: Iterable[domain_pb2.Change],
        proposer: int = 0,
        now: int | None = None,
        expires_in: int = 3600,
        *,
        base: SealedState | None = None,
        domain_id: str | None = None,
        base_version: int | None = None,
        base_state_hash: bytes | None = None,
        reason: str = "",
        nonce: bytes | None = None,
    ) -> Proposal:
        """A proposal against `base` (default: the head), created at `now`."""
        base = base or self.head
        created = self.now if now is None else now
        return Proposal.create(
            domain_id=self.domain_id if domain_id is None else domain_id,
            base_version=base.version if base_version is None else base_version,
            base_state_hash=base.hash if base_state_hash is None else base_state_hash,
            changes=list(changes),
            proposer_id=self.operators[proposer].operator_id,
            created_at=created,
            expires_at=created + expires_in,
            reason=reason,
            nonce=self.nonce() if nonce is None else nonce,
        )

    def approve(
        self, proposal: Proposal, operator_indexes: Iterable[int]
    ) -> list[domain_pb2.Approval]:
        """Approvals of `proposal` by these operators (in this order)."""
        return [quorum.approve(proposal, self.operators[i].signer) for i in operator_indexes]

    def approve_quorum(
        self, proposal: Proposal, base: SealedState | None = None
    ) -> list[domain_pb2.Approval]:
        """Exactly the required number of approvals, by the first current operators."""
        indexes = self.current_operator_indexes(base)
        return self.approve(proposal, indexes[: self.required_threshold(proposal, base)])

    # -- producing states --

    def producer_for(self, base: SealedState, manifest: domain_pb2.Manifest) -> str:
        staying = {h.host_id for h in manifest.hosts}
        for host in base.manifest.message.hosts:
            if host.host_id in staying:
                return host.host_id
        raise ValueError("no host of the base state stays in the new state")

    def seal(
        self,
        manifest: domain_pb2.Manifest,
        *,
        base: SealedState,
        producer: str,
        proposal: Proposal | None,
        approvals: Sequence[domain_pb2.Approval] = (),
        signer: Signer | None = None,
        keys: dict[int, bytes] | None = None,
    ) -> SealedState:
        """Seal any manifest as `producer` would, with the keys it unseals from `base`.

        `signer` overrides the producer's signing key (to forge); `keys` the domain keys.
        Uses `sealing.seal_state`, so the producer must be a host of `manifest`.
        """
        if keys is None:
            opener = producer if producer in base.manifest.hosts_by_id else None
            opener = opener or base.manifest.message.hosts[0].host_id
            keys = sealing.next_domain_keys(self.keys_at(base, opener), manifest)
        return sealing.seal_state(
            manifest,
            keys,
            producer_host_id=producer,
            producer=signer or self.hosts[producer].signer,
            proposal=proposal,
            approvals=approvals,
        )

    def apply(
        self,
        proposal: Proposal,
        approvals: Sequence[domain_pb2.Approval],
        producer: str | None = None,
        now: int | None = None,
        *,
        base: SealedState | None = None,
        append: bool = True,
    ) -> SealedState:
        """What an honest HSA does with an approved proposal: verify, compute, seal, sign.

        `producer` defaults to the first host of the base state that stays in the new one.
        With `append=False` the state is returned but not added to `states` (forks).
        """
        base = base or self.head
        now = max(self.now, base.manifest.created_at) if now is None else now
        manifest, _ = transition.next_manifest(self.state_head(base), proposal, approvals, now=now)
        producer = producer or self.producer_for(base, manifest)
        keys = sealing.next_domain_keys(self.keys_at(base, producer), manifest)
        state = sealing.seal_state(
            manifest,
            keys,
            producer_host_id=producer,
            producer=self.hosts[producer].signer,
            proposal=proposal,
            approvals=approvals,
        )
        if append:
            self.states.append(state)
        return state

    def transition(
        self,
        changes: Iterable[domain_pb2.Change],
        approvers: Iterable[int] | None = None,
        *,
        proposer: int | None = None,
        producer: str | None = None,
        now: int | None = None,
        append: bool = True,
    ) -> SealedState:
        """Propose, approve (default: exactly a quorum of current operators) and apply."""
        current = self.current_operator_indexes()
        proposal = self.propose(changes, proposer=current[0] if proposer is None else proposer)
        approvals = (
            self.approve_quorum(proposal)
            if approvers is None
            else self.approve(proposal, approvers)
        )
        return self.apply(proposal, approvals, producer=producer, now=now, append=append)

    def rotate(
        self,
        now: int | None = None,
        producer: str | None = None,
        *,
        base: SealedState | None = None,
        append: bool = True,
    ) -> SealedState:
        """A scheduled domain key rotation (no proposal), as an HSA produces it when due."""
        base = base or self.head
        now = max(self.now, base.manifest.created_at) if now is None else now
        manifest = transition.scheduled_rotation_manifest(self.state_head(base), now=now)
        producer = producer or self.producer_for(base, manifest)
        state = self.seal(manifest, base=base, producer=producer, proposal=None)
        if append:
            self.states.append(state)
        return state

    def rotation_due_at(self, base: SealedState | None = None) -> int:
        return transition.rotation_due_at((base or self.head).manifest)

    # -- change builders --

    def new_host(self, host_id: str) -> SimHost:
        """A new host enrolled with this domain's CA now (registered in `hosts`)."""
        if self.ca is None:
            raise ValueError("this simulated domain has no CA to enroll hosts with")
        host = new_host(self.domain_id, host_id, ca=self.ca, now=self.now)
        self.hosts[host_id] = host
        return host

    def add_host_change(
        self,
        host_id: str | None = None,
        host: domain_pb2.Host | None = None,
        *,
        enrollment: bytes | None = None,
    ) -> domain_pb2.Change:
        """add-host for a new host (enrolled and registered in `hosts`), for an explicit
        `enrollment`, or for an explicit record (in an enrollment nobody could sign: for
        checks that come before the enrollment's, like duplicates)."""
        if enrollment is None:
            if host is None:
                host_id = host_id or f"hsa-{len(self.hosts) + 1}"
                if host_id not in self.hosts:
                    self.new_host(host_id)
                enrollment = self.hosts[host_id].enrollment
            else:
                enrollment = forge_enrollment(host, domain_id=self.domain_id)
        return _change(add_host=domain_pb2.AddHost(enrollment=enrollment))

    @staticmethod
    def remove_host_change(host_id: str) -> domain_pb2.Change:
        return _change(remove_host=domain_pb2.RemoveHost(host_id=host_id))

    def add_operator_change(
        self,
        name: str | None = None,
        algorithm: SignatureAlgorithm = SignatureAlgorithm.ED25519,
        operator: domain_pb2.Operator | None = None,
    ) -> domain_pb2.Change:
        """add-operator for a new operator (appended to `operators`), or an explicit record."""
        if operator is None:
            sim_op = new_operator(name or f"op{len(self.operators)}", algorithm)
            self.operators.append(sim_op)
            operator = sim_op.record
        return _change(add_operator=domain_pb2.AddOperator(operator=operator))

    def remove_operator_change(self, operator: int | str) -> domain_pb2.Change:
        """remove-operator by index into `operators` or by operator id."""
        operator_id = (
            self.operators[operator].operator_id if isinstance(operator, int) else operator
        )
        return _change(remove_operator=domain_pb2.RemoveOperator(operator_id=operator_id))

    @staticmethod
    def set_quorum_change(
        threshold: int, change_type: int = domain_pb2.CHANGE_TYPE_UNSPECIFIED
    ) -> domain_pb2.Change:
        return _change(
            set_quorum=domain_pb2.SetQuorum(threshold=threshold, change_type=change_type)
        )

    def set_settings_change(self, **overrides: int) -> domain_pb2.Change:
        """set-settings: the head's settings with some fields replaced."""
        settings = domain_pb2.DomainSettings()
        settings.CopyFrom(self.head.manifest.message.settings)
        for name, value in overrides.items():
            setattr(settings, name, value)
        return _change(set_settings=domain_pb2.SetSettings(settings=settings))

    @staticmethod
    def rotate_domain_key_change() -> domain_pb2.Change:
        return _change(rotate_domain_key=domain_pb2.RotateDomainKey())

    # -- raw manifests for forging --

    def manifest_after(
        self,
        proposal: Proposal | None,
        *,
        base: SealedState | None = None,
        now: int | None = None,
        mutate: Callable[[domain_pb2.Manifest], None] | None = None,
    ) -> domain_pb2.Manifest:
        """The manifest a proposal (or, with None, a rotation) produces, with NO checks at all.

        Skips quorum, expiry, staleness, rotation-due and enrollment checks: what a buggy or
        compromised HSA could compute. `mutate` edits the result before it is returned.
        """
        base = base or self.head
        now = self.now if now is None else now
        if proposal is not None:
            manifest = _apply_unchecked(base.manifest.message, proposal, now)
            manifest.proposal_id = proposal.id
        else:
            manifest = domain_pb2.Manifest()
            manifest.CopyFrom(base.manifest.message)
            manifest.key_generations.append(
                domain_pb2.KeyGeneration(
                    generation=base.manifest.current_generation + 1, created_at=now
                )
            )
            excess = len(manifest.key_generations) - manifest.settings.key_generations_retained
            if excess > 0:
                del manifest.key_generations[:excess]
            manifest.proposal_id = b""
        manifest.version = base.version + 1
        manifest.previous_state_hash = base.hash
        manifest.created_at = now
        if mutate is not None:
            mutate(manifest)
        return manifest


def _apply_unchecked(
    base: domain_pb2.Manifest, proposal: Proposal, now: int
) -> domain_pb2.Manifest:
    """`transition.apply_changes`, except that add-host enrollments are not verified: the
    hosts they name are appended as they are (what a compromised producer could write)."""
    try:
        return transition.apply_changes(base, proposal, now=now)[0]
    except EnrollmentError:
        pass
    others = [c for c in proposal.changes if not c.HasField("add_host")]
    manifest = domain_pb2.Manifest()
    manifest.CopyFrom(base)
    if others:
        rest = Proposal.create(
            domain_id=proposal.domain_id,
            base_version=proposal.base_version,
            base_state_hash=proposal.base_state_hash,
            changes=others,
            proposer_id=proposal.proposer_id,
            created_at=proposal.created_at,
            expires_at=proposal.expires_at,
            nonce=proposal.message.nonce,
        )
        manifest = transition.apply_changes(base, rest, now=now)[0]
    for change in proposal.changes:
        if change.HasField("add_host"):
            manifest.hosts.append(model.added_host(change, proposal.domain_id))
    return manifest


# --- the malicious coordinator ---------------------------------------------------------------


_STATE_FIELDS = (
    "manifest",
    "secrets",
    "proposal",
    "approvals",
    "producer_host_id",
    "producer_signature",
)


@dataclass
class MaliciousCoordinator:
    """Lies an untrusted coordinator (or a compromised host it colludes with) can tell.

    Methods that may produce unparseable output return serialized `bytes`; the others
    return `SealedState` objects ready to offer to a `TrustedChain`.
    """

    sim: SimulatedDomain

    # -- low level --

    @staticmethod
    def message(state: SealedState) -> domain_pb2.SealedState:
        """A mutable copy of a state's wire message."""
        copy = domain_pb2.SealedState()
        copy.CopyFrom(state.message)
        return copy

    @classmethod
    def rebuild_bytes(cls, state: SealedState, **fields: object) -> bytes:
        """The state's wire bytes with some top-level fields replaced (no validation)."""
        unknown = set(fields) - set(_STATE_FIELDS)
        if unknown:
            raise TypeError(f"unknown SealedState fields: {sorted(unknown)}")
        message = cls.message(state)
        for name, value in fields.items():
            if name == "approvals":
                del message.approvals[:]
                message.approvals.extend(value)
            else:
                setattr(message, name, value)
        return message.SerializeToString(deterministic=True)

    @classmethod
    def rebuild(cls, state: SealedState, **fields: object) -> SealedState:
        """Like `rebuild_bytes`, parsed (raises if the result is not structurally valid)."""
        return SealedState.from_bytes(cls.rebuild_bytes(state, **fields))

    # -- bit flips (return bytes: the result may not parse) --

    @staticmethod
    def flip_state_bit(state: SealedState, bit: int) -> bytes:
        """Flip one bit anywhere in the serialized SealedState."""
        return flip_bit(state.to_bytes(), bit)

    @classmethod
    def flip_part_bit(cls, state: SealedState, part: str, bit: int) -> bytes:
        """Flip one bit inside one bytes field: manifest, secrets, proposal, producer_signature."""
        value = getattr(state.message, part)
        return cls.rebuild_bytes(state, **{part: flip_bit(value, bit)})

    def flip_manifest_bit(self, state: SealedState, bit: int) -> bytes:
        return self.flip_part_bit(state, "manifest", bit)

    def flip_secrets_bit(self, state: SealedState, bit: int) -> bytes:
        return self.flip_part_bit(state, "secrets", bit)

    def flip_signature_bit(self, state: SealedState, bit: int) -> bytes:
        return self.flip_part_bit(state, "producer_signature", bit)

    def flip_proposal_bit(self, state: SealedState, bit: int) -> bytes:
        return self.flip_part_bit(state, "proposal", bit)

    # -- evidence --

    def replace_approvals(
        self, state: SealedState, approvals: Sequence[domain_pb2.Approval]
    ) -> SealedState:
        """Same signed state, other approvals (approvals are evidence, not under the hash)."""
        return self.rebuild(state, approvals=list(approvals))

    @staticmethod
    def forged_approval(
        approval: domain_pb2.Approval,
        *,
        operator_id: str | None = None,
        proposal_id: bytes | None = None,
        signature: bytes | None = None,
    ) -> domain_pb2.Approval:
        """A copy of an approval with some fields replaced."""
        forged = domain_pb2.Approval()
        forged.CopyFrom(approval)
        if operator_id is not None:
            forged.operator_id = operator_id
        if proposal_id is not None:
            forged.proposal_id = proposal_id
        if signature is not None:
            forged.signature = signature
        return forged

    # -- signatures --

    @staticmethod
    def resign(state: SealedState, signer: Signer, producer_host_id: str) -> SealedState:
        """The same manifest and secrets, signed by `signer` and attributed to a host id."""
        signature = signer.sign(sealing.state_signing_message(state.hash))
        return MaliciousCoordinator.rebuild(
            state, producer_host_id=producer_host_id, producer_signature=signature
        )

    def sign_with_unknown_host(self, state: SealedState, host_id: str = "rogue") -> SealedState:
        """Re-sign with a key the domain never trusted (a new host, not added anywhere)."""
        rogue = new_host(self.sim.domain_id, host_id)
        return self.resign(state, rogue.signer, host_id)

    @classmethod
    def mix(
        cls,
        manifest_from: SealedState,
        secrets_from: SealedState,
        signature_from: SealedState | None = None,
        evidence_from: SealedState | None = None,
    ) -> SealedState:
        """Mix-and-match: manifest of one state, secrets (and signature) of another."""
        signature_from = signature_from or secrets_from
        evidence_from = evidence_from or manifest_from
        return cls.rebuild(
            manifest_from,
            secrets=secrets_from.message.secrets,
            producer_host_id=signature_from.message.producer_host_id,
            producer_signature=signature_from.message.producer_signature,
            proposal=evidence_from.message.proposal,
            approvals=list(evidence_from.message.approvals),
        )

    # -- whole forged states (a compromised trusted host signs them) --

    def forge(
        self,
        proposal: Proposal | None,
        approvals: Sequence[domain_pb2.Approval] = (),
        *,
        base: SealedState | None = None,
        now: int | None = None,
        producer: str | None = None,
        mutate: Callable[[domain_pb2.Manifest], None] | None = None,
    ) -> SealedState:
        """A well-formed, validly signed state whose content skipped every domain check.

        The producer (default: first host of `base`) is a host trusted in `base`, so the
        signature verifies: only the chain's recomputation can catch the lie.
        """
        base = base or self.sim.head
        manifest = self.sim.manifest_after(proposal, base=base, now=now, mutate=mutate)
        producer = producer or self.sim.producer_for(base, manifest)
        return self.sim.seal(
            manifest, base=base, producer=producer, proposal=proposal, approvals=approvals
        )

    # -- ordering --

    @staticmethod
    def reorder(states: Sequence[SealedState], order: Sequence[int]) -> list[SealedState]:
        """`states` in the given index order."""
        return [states[i] for i in order]

    @staticmethod
    def shuffled(states: Sequence[SealedState], seed: int) -> list[SealedState]:
        """`states` in a seeded random order that differs from the original (len >= 2)."""
        rng = random.Random(seed)
        out = list(states)
        while len(out) > 1 and [s.hash for s in out] == [s.hash for s in states]:
            rng.shuffle(out)
        return out
