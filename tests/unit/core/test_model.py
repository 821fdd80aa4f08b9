"""domain_core.model: only structurally valid bytes become Proposal/Manifest/SealedState."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.simulator import SimulatedDomain, forge_enrollment, new_host, new_operator

from domain_core import canonical, changes, model
from domain_core.contexts import PayloadType
from domain_core.errors import InvalidInputError, LimitExceededError, MalformedMessageError
from domain_core.limits import DEFAULT_LIMITS, MAX_ENROLLMENT_BYTES, Limits
from domain_core.model import Manifest, Proposal, SealedState
from domain_core.recovery_shares import RecoveryAlgorithm
from domain_core.signers import InMemorySigner, SignatureAlgorithm
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit

SIM = SimulatedDomain.create()
NEW_HOST = new_host("test", "hsa-9")
NEW_OP = new_operator("dave", SignatureAlgorithm.ECDSA_P256)
ECDSA_KEY = InMemorySigner.generate(SignatureAlgorithm.ECDSA_P256).public_key
ED_KEY = InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key

# One change of every type, at fixed indexes so that mutations can reach into them.
I_ADD_HOST, I_REMOVE_HOST, I_ADD_OP, I_REMOVE_OP, I_QUORUM, I_QUORUM_TYPED, I_SETTINGS = range(7)
I_RECOVER = 9
BASE_CHANGES = [
    SIM.add_host_change(enrollment=NEW_HOST.enrollment),
    SIM.remove_host_change("hsa-3"),
    SIM.add_operator_change(operator=NEW_OP.record),
    SIM.remove_operator_change(2),
    SIM.set_quorum_change(2),
    SIM.set_quorum_change(3, domain_pb2.CHANGE_TYPE_REMOVE_HOST),
    SIM.set_settings_change(),
    SIM.rotate_domain_key_change(),
    changes.set_recovery_key(
        SIM.operators[0].signer,
        domain_id=SIM.domain_id,
        algorithm=RecoveryAlgorithm.X25519,
        public_key=b"\x09" * 32,
    ),
    changes.recover(
        [new_host("test", "hsa-8").enrollment],
        session_host_id="hsa-8",
        session_public_key=b"\x05" * 32,
    ),
]
BASE_PROPOSAL = SIM.propose(BASE_CHANGES, reason="all change types")


def _proposal_message() -> domain_pb2.Proposal:
    message = domain_pb2.Proposal()
    message.CopyFrom(BASE_PROPOSAL.message)
    return message


def _manifest_message() -> domain_pb2.Manifest:
    message = domain_pb2.Manifest()
    message.CopyFrom(SIM.head.manifest.message)
    return message


def _ser(message: object) -> bytes:
    return message.SerializeToString(deterministic=True)  # type: ignore[attr-defined]


# --- Proposal ------------------------------------------------------------------------------


def test_base_proposal_is_valid() -> None:
    parsed = Proposal.from_bytes(BASE_PROPOSAL.raw)
    assert parsed.id == BASE_PROPOSAL.id == hashlib.sha256(BASE_PROPOSAL.raw).digest()
    assert parsed.change_types == frozenset(model.CHANGE_TYPE_NAMES)


def _set_nested(path: str, value: object) -> Callable[[domain_pb2.Proposal], None]:
    def mutate(message: domain_pb2.Proposal) -> None:
        target: object = message
        *parents, last = path.split(".")
        for part in parents:
            target = target.changes[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[attr-defined]
        setattr(target, last, value)

    return mutate


def _host_field(name: str, value: object) -> Callable[[domain_pb2.Proposal], None]:
    """Set a field of the host record inside the add-host change's enrollment."""

    def mutate(message: domain_pb2.Proposal) -> None:
        change = message.changes[I_ADD_HOST].add_host
        enrollment = domain_pb2.HostEnrollment.FromString(change.enrollment)
        host = domain_pb2.Host.FromString(enrollment.host)
        setattr(host, name, value)
        enrollment.host = _ser(host)
        change.enrollment = _ser(enrollment)

    return mutate


def _enrollment_bytes(
    edit: Callable[[bytes], bytes],
) -> Callable[[domain_pb2.Proposal], None]:
    """Replace the add-host change's enrollment bytes by `edit(bytes)`."""

    def mutate(message: domain_pb2.Proposal) -> None:
        change = message.changes[I_ADD_HOST].add_host
        change.enrollment = edit(change.enrollment)

    return mutate


def _enrollment_field(name: str, value: object) -> Callable[[domain_pb2.Proposal], None]:
    def edit(raw: bytes) -> bytes:
        enrollment = domain_pb2.HostEnrollment.FromString(raw)
        setattr(enrollment, name, value)
        return _ser(enrollment)

    return _enrollment_bytes(edit)


def _host_with_unknown_field(raw: bytes) -> bytes:
    enrollment = domain_pb2.HostEnrollment.FromString(raw)
    enrollment.host = enrollment.host + b"\xa0\x06\x01"  # field 100, varint 1
    return _ser(enrollment)


def _clear_changes(m: domain_pb2.Proposal) -> None:
    del m.changes[:]


def _too_many_changes(m: domain_pb2.Proposal) -> None:
    del m.changes[:]
    m.changes.extend(
        [SIM.rotate_domain_key_change()] * (DEFAULT_LIMITS.max_changes_per_proposal + 1)
    )


def _untyped_change(m: domain_pb2.Proposal) -> None:
    m.changes.append(domain_pb2.Change())


def _settings_cleared(m: domain_pb2.Proposal) -> None:
    m.changes[I_SETTINGS].set_settings.ClearField("settings")


def _rename_domain_only(domain_id: str) -> Callable[[domain_pb2.Proposal], None]:
    """A new domain id, with the added host's SPIFFE id made to match it (so only the id's
    own format can refuse it)."""

    def mutate(message: domain_pb2.Proposal) -> None:
        message.domain_id = domain_id
        change = message.changes[I_ADD_HOST].add_host
        enrollment = domain_pb2.HostEnrollment.FromString(change.enrollment)
        host = domain_pb2.Host.FromString(enrollment.host)
        host.spiffe_id = model.host_spiffe_id(domain_id, host.host_id)
        enrollment.host = _ser(host)
        change.enrollment = _ser(enrollment)

    return mutate


def _host_renamed(host_id: str) -> Callable[[domain_pb2.Proposal], None]:
    """The added host under another id, with the SPIFFE id made to match it."""

    def mutate(message: domain_pb2.Proposal) -> None:
        change = message.changes[I_ADD_HOST].add_host
        enrollment = domain_pb2.HostEnrollment.FromString(change.enrollment)
        host = domain_pb2.Host.FromString(enrollment.host)
        host.host_id = host_id
        host.spiffe_id = model.host_spiffe_id(message.domain_id, host_id)
        enrollment.host = _ser(host)
        change.enrollment = _ser(enrollment)

    return mutate


PROPOSAL_MUTATIONS: dict[str, Callable[[domain_pb2.Proposal], None]] = {
    "domain id uppercase": _set_nested("domain_id", "Test"),
    "domain id empty": _set_nested("domain_id", ""),
    "domain id leading dash": _set_nested("domain_id", "-test"),
    "domain id 64 chars": _set_nested("domain_id", "a" * 64),
    "domain id underscore": _set_nested("domain_id", "a_b"),
    "base hash empty": _set_nested("base_state_hash", b""),
    "base hash 31 bytes": _set_nested("base_state_hash", bytes(31)),
    "base hash 33 bytes": _set_nested("base_state_hash", bytes(33)),
    "no changes": _clear_changes,
    "too many changes": _too_many_changes,
    "change with no type": _untyped_change,
    "proposer empty": _set_nested("proposer_id", ""),
    "proposer uppercase hex": _set_nested("proposer_id", "A" * 64),
    "proposer 63 hex": _set_nested("proposer_id", "a" * 63),
    "proposer 65 hex": _set_nested("proposer_id", "a" * 65),
    "proposer not hex": _set_nested("proposer_id", "g" * 64),
    "nonce empty": _set_nested("nonce", b""),
    "nonce 15 bytes": _set_nested("nonce", bytes(15)),
    "nonce 17 bytes": _set_nested("nonce", bytes(17)),
    "expires at creation": _set_nested("expires_at", BASE_PROPOSAL.created_at),
    "expires before creation": _set_nested("expires_at", BASE_PROPOSAL.created_at - 1),
    "reason too long": _set_nested("reason", "x" * (DEFAULT_LIMITS.max_reason_chars + 1)),
    # Issue 21 item 5: text an approver reads must not drive their terminal.
    "reason with a newline": _set_nested("reason", "routine\nproposal  rotate-domain-key"),
    "reason with a carriage return": _set_nested("reason", "routine\rfake"),
    "reason with an ANSI escape": _set_nested("reason", "routine \x1b[30;40mhidden\x1b[0m"),
    "reason with a bidi override": _set_nested("reason", "routine \u202eyek-niamod-etator"),
    "reason with a bidi isolate": _set_nested("reason", "a \u2067b\u2069"),
    "reason with a zero-width joiner": _set_nested("reason", "a\u200db"),
    "reason with a line separator": _set_nested("reason", "a\u2028b"),
    "reason with a C1 control": _set_nested("reason", "a\x9bb"),
    "reason with a tab": _set_nested("reason", "a\tb"),
    "reason with NUL": _set_nested("reason", "a\x00b"),
    "operator name with an ANSI escape": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.name", "dave\x1b[2K"
    ),
    "operator name with a bidi override": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.name", "\u202eevad"
    ),
    # `$` would match before a trailing newline; every id must match in full.
    "domain id with a trailing newline": _rename_domain_only("test\n"),
    "proposer with a trailing newline": _set_nested("proposer_id", "a" * 64 + "\n"),
    "remove-host id with a trailing newline": _set_nested(
        f"{I_REMOVE_HOST}.remove_host.host_id", "hsa-3\n"
    ),
    "remove-operator id with a trailing newline": _set_nested(
        f"{I_REMOVE_OP}.remove_operator.operator_id", SIM.operators[2].operator_id + "\n"
    ),
    "host id with a trailing newline": _host_renamed("hsa-9\n"),
    "host spiffe of another domain": _host_field("spiffe_id", "spiffe://other/hsa/hsa-9"),
    "host spiffe of another host": _host_field("spiffe_id", "spiffe://test/hsa/hsa-1"),
    "host id invalid": _host_field("host_id", "HSA_9"),
    "host signing key is ecdsa": _host_field("signing_public_key", ECDSA_KEY.spki_der),
    "host signing key garbage": _host_field("signing_public_key", b"\x30\x00"),
    "host agreement key 31 bytes": _host_field("agreement_public_key", bytes(31)),
    "host fingerprint 31 bytes": _host_field("tls_certificate_fingerprint", bytes(31)),
    "add-host without enrollment": _enrollment_bytes(lambda raw: b""),
    "enrollment garbage": _enrollment_bytes(lambda raw: b"\xff\xff\xff"),
    "enrollment with an unknown field": _enrollment_bytes(lambda raw: raw + b"\xa0\x06\x01"),
    "enrollment not deterministic": _enrollment_bytes(lambda raw: raw + raw),
    "host record with an unknown field": _enrollment_bytes(_host_with_unknown_field),
    "enrollment address with a newline": _enrollment_field("address", "127.0.0.1:1\nfake"),
    "enrollment address with an escape": _enrollment_field("address", "\x1b[30m"),
    "enrollment address too long": _enrollment_field("address", "a" * 256),
    "operator id not sha256 of its key": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.operator_id", ED_KEY.key_id
    ),
    "operator id uppercase": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.operator_id", NEW_OP.operator_id.upper()
    ),
    "operator name empty": _set_nested(f"{I_ADD_OP}.add_operator.operator.name", ""),
    "operator name not printable": _set_nested(f"{I_ADD_OP}.add_operator.operator.name", "dave\n"),
    "operator name too long": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.name", "d" * (DEFAULT_LIMITS.max_name_chars + 1)
    ),
    "operator algorithm unspecified": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.algorithm", domain_pb2.SIGNATURE_ALGORITHM_UNSPECIFIED
    ),
    "operator algorithm unknown value": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.algorithm", 99
    ),
    "operator algorithm does not match key": _set_nested(
        f"{I_ADD_OP}.add_operator.operator.algorithm", domain_pb2.SIGNATURE_ALGORITHM_ED25519
    ),
    "operator key garbage": _set_nested(f"{I_ADD_OP}.add_operator.operator.public_key", b"junk"),
    "remove-operator id invalid": _set_nested(f"{I_REMOVE_OP}.remove_operator.operator_id", "op2"),
    "remove-host id invalid": _set_nested(f"{I_REMOVE_HOST}.remove_host.host_id", "Bad Host"),
    "remove-host id empty": _set_nested(f"{I_REMOVE_HOST}.remove_host.host_id", ""),
    "set-quorum default threshold 0": _set_nested(f"{I_QUORUM}.set_quorum.threshold", 0),
    "set-quorum unknown change type": _set_nested(f"{I_QUORUM_TYPED}.set_quorum.change_type", 99),
    "set-settings without settings": _settings_cleared,
}


@pytest.mark.parametrize("case", list(PROPOSAL_MUTATIONS))
def test_proposal_from_bytes_rejects(case: str) -> None:
    message = _proposal_message()
    PROPOSAL_MUTATIONS[case](message)
    with pytest.raises(MalformedMessageError):
        Proposal.from_bytes(_ser(message))


def _rename_domain(domain_id: str) -> Callable[[domain_pb2.Proposal], None]:
    def mutate(message: domain_pb2.Proposal) -> None:
        message.domain_id = domain_id
        _host_field("spiffe_id", model.host_spiffe_id(domain_id, NEW_HOST.host_id))(message)
        del message.changes[I_RECOVER]  # its enrollment names the domain too

    return mutate


@pytest.mark.parametrize(
    "mutation",
    [
        _set_nested("reason", "x" * DEFAULT_LIMITS.max_reason_chars),
        _set_nested("reason", "Zoë's rotation: «routine», 日本語, émoji 🔑, a\\nb (a backslash)"),
        _rename_domain("a" * 63),
        _rename_domain("a.b-c.9"),
        _set_nested("expires_at", BASE_PROPOSAL.created_at + 1),
        _set_nested(f"{I_QUORUM_TYPED}.set_quorum.threshold", 0),  # removes a typed threshold
    ],
    ids=[
        "reason at limit",
        "reason in any script",
        "domain id 63",
        "domain id dots",
        "one second",
        "typed threshold 0",
    ],
)
def test_proposal_from_bytes_accepts_boundaries(
    mutation: Callable[[domain_pb2.Proposal], None],
) -> None:
    message = _proposal_message()
    mutation(message)
    raw = _ser(message)
    proposal = Proposal.from_bytes(raw)
    assert proposal.raw == raw
    assert proposal.message == message  # every field as set, the boundary value included
    assert proposal.id == hashlib.sha256(raw).digest()


def test_an_enrollment_above_its_size_limit_is_refused() -> None:
    message = _proposal_message()
    _enrollment_field("address", "")(message)
    padded = message.changes[I_ADD_HOST].add_host.enrollment + b"\xa0\x06\x01" * 3000
    message.changes[I_ADD_HOST].add_host.enrollment = padded
    assert len(padded) > MAX_ENROLLMENT_BYTES
    with pytest.raises(LimitExceededError, match="at most 8192 bytes"):
        Proposal.from_bytes(_ser(message))


@pytest.mark.parametrize("garbage", [b"\xff", b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08"])
def test_proposal_from_bytes_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        Proposal.from_bytes(garbage)


def test_proposal_from_bytes_rejects_oversized() -> None:
    raw = BASE_PROPOSAL.raw
    with pytest.raises(LimitExceededError):
        Proposal.from_bytes(raw, Limits(max_proposal_bytes=len(raw) - 1))
    Proposal.from_bytes(raw, Limits(max_proposal_bytes=len(raw)))
    with pytest.raises(LimitExceededError):
        Proposal.from_bytes(b"\x00" * (DEFAULT_LIMITS.max_message_bytes + 1))


def test_a_proposal_is_at_most_64_kib() -> None:
    # Issue 21 item 6: valid in every other way (each change a well-formed add-operator),
    # but larger than the fixed proposal limit, far below the 4 MiB message limit.
    assert DEFAULT_LIMITS.max_proposal_bytes == 64 * 1024
    message = _proposal_message()
    del message.changes[:]
    while message.ByteSize() <= DEFAULT_LIMITS.max_proposal_bytes:
        index = len(message.changes)
        operator = new_operator(f"op{index}", SignatureAlgorithm.ED25519).record
        operator.name = f"operator {index} " + "x" * 50
        message.changes.append(
            domain_pb2.Change(add_operator=domain_pb2.AddOperator(operator=operator))
        )
    raw = _ser(message)
    big = Limits(max_changes_per_proposal=len(message.changes))
    with pytest.raises(LimitExceededError, match="above the limit of 65536"):
        Proposal.from_bytes(raw, big)
    Proposal.from_bytes(raw, dataclasses.replace(big, max_proposal_bytes=len(raw)))


def test_proposal_change_limit_is_configurable() -> None:
    with pytest.raises(MalformedMessageError, match="1 to 7 changes"):
        Proposal.from_bytes(BASE_PROPOSAL.raw, Limits(max_changes_per_proposal=7))


def test_proposal_from_bytes_needs_bytes() -> None:
    with pytest.raises(TypeError):
        Proposal.from_bytes(BASE_PROPOSAL.raw.decode("latin-1"))


def _concatenated() -> bytes:
    """The base proposal as two concatenated halves: protobuf merges them into the same
    message, from other bytes (another id)."""
    message = BASE_PROPOSAL.message
    head = domain_pb2.Proposal(domain_id=message.domain_id, base_version=message.base_version)
    tail = domain_pb2.Proposal()
    tail.CopyFrom(message)
    tail.ClearField("domain_id")
    tail.ClearField("base_version")
    return _ser(tail) + _ser(head)


def _with_unknown_field(path: str) -> bytes:
    """The base proposal with an unknown field (number 99, a string) inside the message at
    `path` ('' for the top level; '3' for change 3; '0.add_host.host' for the added host)."""
    message = _proposal_message()
    target: object = message
    for part in [p for p in path.split(".") if p]:
        target = target.changes[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[attr-defined]
    extra = domain_pb2.Proposal(domain_id="set-quorum 1").SerializeToString()  # field 1
    unknown = b"\x9a\x06" + extra[1:]  # the same string under field number 99
    target.MergeFromString(unknown)  # type: ignore[attr-defined]
    return _ser(message)


def _default_written_out() -> bytes:
    """The base proposal with base_version = 0 written out explicitly (proto3 omits it)."""
    message = _proposal_message()
    message.ClearField("base_version")
    canonical_raw = _ser(message)
    # field 1 (domain_id) comes first; insert "field 2 = 0" right after it.
    length = canonical_raw[1]
    cut = 2 + length
    return canonical_raw[:cut] + b"\x10\x00" + canonical_raw[cut:]


def _fields_out_of_order() -> bytes:
    """The base proposal with its nonce (field 9) moved to the front."""
    message = _proposal_message()
    nonce = message.nonce
    message.ClearField("nonce")
    rest = _ser(message)
    return _ser(domain_pb2.Proposal(nonce=nonce)) + rest


def _long_varint() -> bytes:
    """The base proposal with base_version encoded in a non-minimal varint."""
    message = _proposal_message()
    version = message.base_version
    assert 0 < version < 128
    canonical_raw = _ser(message)
    field = b"\x10" + bytes([version])
    assert canonical_raw.count(field) >= 1
    return canonical_raw.replace(field, b"\x10" + bytes([version | 0x80, 0x00]), 1)


NON_CANONICAL: dict[str, Callable[[], bytes]] = {
    "unknown field at the top": lambda: _with_unknown_field(""),
    "unknown field in a change": lambda: _with_unknown_field(str(I_QUORUM)),
    "unknown field in a change's body": lambda: _with_unknown_field(f"{I_QUORUM}.set_quorum"),
    "unknown field in an add-host change": lambda: _with_unknown_field(f"{I_ADD_HOST}.add_host"),
    "unknown field in an added operator": lambda: _with_unknown_field(
        f"{I_ADD_OP}.add_operator.operator"
    ),
    "unknown field in the settings": lambda: _with_unknown_field(
        f"{I_SETTINGS}.set_settings.settings"
    ),
    "two concatenated halves": _concatenated,
    "a default value written out": _default_written_out,
    "fields out of order": _fields_out_of_order,
    "a non-minimal varint": _long_varint,
}


@pytest.mark.parametrize("case", list(NON_CANONICAL))
def test_a_proposal_must_be_canonical_bytes(case: str) -> None:
    # Issue 21 item 6: approvers sign the bytes; every byte must be one they are shown, and
    # there is exactly one encoding of each proposal.
    raw = NON_CANONICAL[case]()
    assert raw != BASE_PROPOSAL.raw
    parsed = domain_pb2.Proposal()
    parsed.ParseFromString(raw)  # protobuf itself takes every one of them
    with pytest.raises(MalformedMessageError, match=r"unknown to|canonical form"):
        Proposal.from_bytes(raw)


def test_unknown_fields_and_other_encodings_are_named_in_the_refusal() -> None:
    with pytest.raises(MalformedMessageError, match=r"fields unknown to hsmdomain\.v1\.Proposal"):
        Proposal.from_bytes(_with_unknown_field(f"{I_ADD_OP}.add_operator.operator"))
    with pytest.raises(MalformedMessageError, match="serialize it deterministically"):
        Proposal.from_bytes(_fields_out_of_order())


def test_a_state_carrying_a_non_canonical_proposal_is_refused() -> None:
    message = _state_message()
    message.proposal = _with_unknown_field("")
    with pytest.raises(MalformedMessageError, match="unknown to"):
        SealedState.from_message(message)


# --- hypothesis: Proposal roundtrip ---------------------------------------------------------

OPERATOR_IDS = [o.operator_id for o in SIM.operators]
DOMAIN_CHANGES = [c for i, c in enumerate(BASE_CHANGES) if i not in (I_ADD_HOST, I_RECOVER)]


def _host_change_for(domain_id: str) -> domain_pb2.Change:
    host = domain_pb2.Host()
    host.CopyFrom(NEW_HOST.record)
    host.spiffe_id = model.host_spiffe_id(domain_id, host.host_id)
    return SIM.add_host_change(enrollment=forge_enrollment(host, domain_id=domain_id))


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    domain_id=st.from_regex(model.DOMAIN_ID_PATTERN, fullmatch=True),
    base_version=st.integers(min_value=0, max_value=2**64 - 1),
    base_state_hash=st.binary(min_size=32, max_size=32),
    changes=st.lists(st.sampled_from(DOMAIN_CHANGES), min_size=1, max_size=6),
    with_host=st.booleans(),
    proposer_id=st.sampled_from(OPERATOR_IDS),
    created_at=st.integers(min_value=-(2**62), max_value=2**62),
    lifetime=st.integers(min_value=1, max_value=10**9),
    reason=st.text(max_size=40).filter(str.isprintable),
    nonce=st.binary(min_size=16, max_size=16),
)
def test_proposal_roundtrip(
    domain_id: str,
    base_version: int,
    base_state_hash: bytes,
    changes: list[domain_pb2.Change],
    with_host: bool,
    proposer_id: str,
    created_at: int,
    lifetime: int,
    reason: str,
    nonce: bytes,
) -> None:
    if with_host:
        changes = [*changes, _host_change_for(domain_id)]
    created = Proposal.create(
        domain_id=domain_id,
        base_version=base_version,
        base_state_hash=base_state_hash,
        changes=changes,
        proposer_id=proposer_id,
        created_at=created_at,
        expires_at=created_at + lifetime,
        reason=reason,
        nonce=nonce,
    )
    parsed = Proposal.from_bytes(created.raw)
    assert parsed.raw == created.raw
    assert parsed.id == created.id == hashlib.sha256(created.raw).digest()
    assert parsed.message == created.message
    assert (parsed.domain_id, parsed.base_version, parsed.base_state_hash) == (
        domain_id,
        base_version,
        base_state_hash,
    )
    assert (parsed.proposer_id, parsed.created_at, parsed.expires_at) == (
        proposer_id,
        created_at,
        created_at + lifetime,
    )
    assert parsed.message.reason == reason
    assert parsed.message.nonce == nonce
    assert list(parsed.changes) == changes
    assert parsed.change_types == frozenset(model.change_type_of(c) for c in changes)


# --- Manifest ------------------------------------------------------------------------------


def _m(path: str, value: object) -> Callable[[domain_pb2.Manifest], None]:
    def mutate(message: domain_pb2.Manifest) -> None:
        target: object = message
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
        setattr(target, last, value)

    return mutate


def _generations(*numbers: int) -> Callable[[domain_pb2.Manifest], None]:
    def mutate(message: domain_pb2.Manifest) -> None:
        del message.key_generations[:]
        message.key_generations.extend(
            domain_pb2.KeyGeneration(generation=n, created_at=1) for n in numbers
        )

    return mutate


def _clear(name: str) -> Callable[[domain_pb2.Manifest], None]:
    def mutate(message: domain_pb2.Manifest) -> None:
        message.ClearField(name)

    return mutate


MANIFEST_MUTATIONS: dict[str, Callable[[domain_pb2.Manifest], None]] = {
    "domain id invalid": _m("domain_id", "Not Valid"),
    "version 0": _m("version", 0),
    "previous hash empty": _m("previous_state_hash", b""),
    "previous hash 31 bytes": _m("previous_state_hash", bytes(31)),
    "no key generations": _generations(),
    "generations descending": _generations(2, 1),
    "generations duplicated": _generations(1, 1),
    "generation 0": _generations(0, 1),
    "no quorum policy": _clear("quorum"),
    "no settings": _clear("settings"),
    "host spiffe of another domain": _m("hosts.0.spiffe_id", "spiffe://other/hsa/hsa-1"),
    "host agreement key short": _m("hosts.0.agreement_public_key", bytes(16)),
    "host signing key garbage": _m("hosts.0.signing_public_key", b"nope"),
    "operator id not sha256 of key": _m("operators.0.operator_id", ED_KEY.key_id),
    "operator name empty": _m("operators.0.name", ""),
}


@pytest.mark.parametrize("case", list(MANIFEST_MUTATIONS))
def test_manifest_from_bytes_rejects(case: str) -> None:
    message = _manifest_message()
    MANIFEST_MUTATIONS[case](message)
    with pytest.raises(MalformedMessageError):
        Manifest.from_bytes(_ser(message))


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_hosts=2),
        Limits(max_operators=2),
        Limits(max_message_bytes=100),
    ],
    ids=["hosts", "operators", "bytes"],
)
def test_manifest_from_bytes_enforces_limits(limits: Limits) -> None:
    raw = SIM.head.manifest.raw
    with pytest.raises(LimitExceededError):
        Manifest.from_bytes(raw, limits)


def test_manifest_hash_is_typed_digest_of_raw_bytes() -> None:
    manifest = SIM.head.manifest
    assert manifest.hash == canonical.digest(PayloadType.MANIFEST, manifest.raw)
    assert Manifest.from_bytes(manifest.raw).hash == manifest.hash
    assert manifest.current_generation == 1
    assert set(manifest.hosts_by_id) == {"hsa-1", "hsa-2", "hsa-3"}
    assert manifest.host_signing_key("hsa-1") == SIM.hosts["hsa-1"].signer.public_key
    assert manifest.host_signing_key("nobody") is None
    assert manifest.host_fingerprints == frozenset(
        h.tls_certificate_fingerprint for h in SIM.hosts.values()
    )


@pytest.mark.parametrize("garbage", [b"\xff", b"\x12\x7f", b""])
def test_manifest_from_bytes_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        Manifest.from_bytes(garbage)


# --- SealedState ---------------------------------------------------------------------------


def _state_message() -> domain_pb2.SealedState:
    message = domain_pb2.SealedState()
    message.CopyFrom(SIM.head.message)
    return message


def _secrets_generation(n: int) -> Callable[[domain_pb2.SealedState], None]:
    def mutate(message: domain_pb2.SealedState) -> None:
        secrets = domain_pb2.SealedSecrets()
        secrets.ParseFromString(message.secrets)
        secrets.generation = n
        message.secrets = _ser(secrets)

    return mutate


def _s(name: str, value: object) -> Callable[[domain_pb2.SealedState], None]:
    def mutate(message: domain_pb2.SealedState) -> None:
        setattr(message, name, value)

    return mutate


STATE_MUTATIONS: dict[str, Callable[[domain_pb2.SealedState], None]] = {
    "manifest empty": _s("manifest", b""),
    "manifest garbage": _s("manifest", b"\xff\xff"),
    "secrets garbage": _s("secrets", b"\xff\xff"),
    "secrets under another generation": _secrets_generation(2),
    "secrets empty": _s("secrets", b""),
    "proposal garbage": _s("proposal", b"\xff"),
    "proposal invalid": _s("proposal", _ser(domain_pb2.Proposal(domain_id="test"))),
    "no producer": _s("producer_host_id", ""),
    "producer id with a newline": _s("producer_host_id", "hsa-1\n"),
    "producer id with an ANSI escape": _s("producer_host_id", "hsa-1\x1b[2J"),
    "no signature": _s("producer_signature", b""),
}


@pytest.mark.parametrize("case", list(STATE_MUTATIONS))
def test_sealed_state_rejects(case: str) -> None:
    message = _state_message()
    STATE_MUTATIONS[case](message)
    with pytest.raises(MalformedMessageError):
        SealedState.from_bytes(_ser(message))
    with pytest.raises(MalformedMessageError):
        SealedState.from_message(message)


def test_sealed_state_limits() -> None:
    raw = SIM.head.to_bytes()
    with pytest.raises(LimitExceededError):
        SealedState.from_bytes(raw, Limits(max_message_bytes=len(raw) - 1))
    with pytest.raises(LimitExceededError, match="approvals"):
        SealedState.from_bytes(raw, Limits(max_approvals_per_proposal=2))
    SealedState.from_bytes(raw, Limits(max_approvals_per_proposal=3))


def test_sealed_state_rejects_garbage_and_wrong_types() -> None:
    with pytest.raises(MalformedMessageError):
        SealedState.from_bytes(b"\xff\xff")
    with pytest.raises(TypeError):
        SealedState.from_message(SIM.head.manifest.message)


def test_sealed_state_roundtrip_keeps_bytes_and_hash() -> None:
    state = SIM.head
    again = SealedState.from_bytes(state.to_bytes())
    assert again.to_bytes() == state.to_bytes()
    assert (
        again.hash == state.hash == model.state_hash(state.message.manifest, state.message.secrets)
    )
    assert again.proposal is not None
    assert state.proposal is not None
    assert again.proposal.id == state.proposal.id
    assert list(again.approvals) == list(state.approvals)


def test_state_hash_covers_both_parts_with_boundaries() -> None:
    a = model.state_hash(b"ab", b"c")
    assert a != model.state_hash(b"a", b"bc")
    assert a != canonical.digest(PayloadType.MANIFEST, b"ab", b"c")


# --- hypothesis: parsing arbitrary or damaged bytes only ever raises InvalidInputError --------


def _only_input_errors(parse: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        parse(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_parsers(data: bytes) -> None:
    _only_input_errors(Proposal.from_bytes, data)
    _only_input_errors(Manifest.from_bytes, data)
    _only_input_errors(SealedState.from_bytes, data)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_damaged_valid_bytes_never_crash_parsers(data: st.DataObject) -> None:
    raw = data.draw(
        st.sampled_from([BASE_PROPOSAL.raw, SIM.head.manifest.raw, SIM.head.to_bytes()])
    )
    position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    mode = data.draw(st.sampled_from(["flip", "truncate", "byte"]))
    if mode == "flip":
        damaged = bytearray(raw)
        damaged[position] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
        damaged_bytes = bytes(damaged)
    elif mode == "truncate":
        damaged_bytes = raw[:position]
    else:
        damaged = bytearray(raw)
        damaged[position] = data.draw(st.integers(min_value=0, max_value=255))
        damaged_bytes = bytes(damaged)
    _only_input_errors(Proposal.from_bytes, damaged_bytes)
    _only_input_errors(Manifest.from_bytes, damaged_bytes)
    _only_input_errors(SealedState.from_bytes, damaged_bytes)


# --- record helpers ------------------------------------------------------------------------


def test_make_operator_id_is_sha256_of_spki() -> None:
    operator = model.make_operator("erin", ECDSA_KEY)
    assert operator.operator_id == hashlib.sha256(ECDSA_KEY.spki_der).hexdigest()
    assert operator.algorithm == domain_pb2.SIGNATURE_ALGORITHM_ECDSA_P256
    assert model.operator_public_key(operator) == ECDSA_KEY


@pytest.mark.parametrize("name", ["", "x" * 65, "tab\there"])
def test_make_operator_rejects_bad_names(name: str) -> None:
    with pytest.raises(MalformedMessageError):
        model.make_operator(name, ECDSA_KEY)


def test_make_host_requires_ed25519_signing_key_and_valid_id() -> None:
    with pytest.raises(MalformedMessageError, match="Ed25519"):
        model.make_host("test", "hsa-7", ECDSA_KEY, bytes(32), bytes(32))
    with pytest.raises(MalformedMessageError):
        model.make_host("test", "hsa_7", ED_KEY, bytes(32), bytes(32))
    host = model.make_host("test", "hsa-7", ED_KEY, bytes(32), bytes(32))
    assert host.spiffe_id == "spiffe://test/hsa/hsa-7"


def test_change_type_helpers() -> None:
    assert model.change_type_name(domain_pb2.CHANGE_TYPE_REMOVE_HOST) == "remove-host"
    assert model.change_type_name(99) == "unknown-99"
    with pytest.raises(MalformedMessageError, match="no type"):
        model.change_type_of(domain_pb2.Change())
    assert model.CHANGE_TYPES_BY_NAME["rotate-domain-key"] == (
        domain_pb2.CHANGE_TYPE_ROTATE_DOMAIN_KEY
    )
