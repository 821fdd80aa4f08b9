"""Hostile inputs for the servers and parsers: random bytes, hypothesis messages, mutants, atheris.

- `random_bodies(seed, count)`: request bodies of random bytes, with crafted protobuf
  encodings mixed in (deep group nesting, huge length prefixes, bad UTF-8 in a string field,
  truncated fields) so that the server, not the client, has to parse garbage;
- `messages(descriptor)`: a hypothesis strategy for any protobuf message type, structurally
  valid but semantically hostile (boundary integers, unknown enum values, bogus ids, random
  bytes where keys, hashes and signatures belong, long strings, huge repeated fields);
- `mutants(message)`: a hypothesis strategy of variants of a VALID message (one field replaced,
  one bit flipped, a repeated element dropped or duplicated, or a serialized message inside a
  `bytes` field parsed, mutated and serialized again), which gets past the first checks;
- run as a program (`python -m support.fuzz --runs N`, from `tests/`), a bounded atheris
  (libFuzzer) harness of the pure parsers of `domain_core` (`Proposal.from_bytes`,
  `SealedState.from_bytes`, `ciphertext.parse_header`, `envelope.parse_envelope_header`, key
  token records): any exception that is not a `domain_core.errors.HsmDomainError` is a crash.

Invariant: everything here is deterministic for a given seed or hypothesis run; nothing here
talks to a server (the tests do).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

__all__ = [
    "INNER_MESSAGES",
    "messages",
    "mutants",
    "random_bodies",
]

MAX_MESSAGE_BYTES = 3 * 1024 * 1024  # keep generated requests under the 4 MiB limit

HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "hsa-1",
    "hsa-3",
    "hsa-999",
    "local",
    "coordinator",
    "0" * 64,
    "f" * 64,
    "F" * 64,
    "spiffe://local/hsa/hsa-1",
    "spiffe://other/hsa/hsa-1",
    "../../../../etc/passwd",
    "127.0.0.1:1",
    "[::1]:65535",
    "a:0",
    "key/../../x",
    "%s%s%s%n",
    "\x00",
    "\u202etxt.exe",
)

LONG_SIZES: tuple[int, ...] = (256, 5000, 70_000)  # long strings and blobs, made lazily
HOSTILE_BYTES: tuple[bytes, ...] = (
    b"",
    b"\x00",
    b"\x00" * 16,
    b"\x00" * 32,
    b"\xff" * 32,
    b"\x00" * 64,
    b"HSMC\x01",
    b"HSME\x01\xff\xff\xff\xff",
    b"\x0a\xff\xff\xff\xff\x0f",
    b"\x80" * 20,
    bytes(range(256)),
)

_INT_BOUNDS: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# `bytes` fields that carry a serialized message (signed things travel as bytes).
INNER_MESSAGES: dict[tuple[str, str], str] = {
    ("hsmdomain.v1.SealedState", "manifest"): "hsmdomain.v1.Manifest",
    ("hsmdomain.v1.SealedState", "secrets"): "hsmdomain.v1.SealedSecrets",
    ("hsmdomain.v1.SealedState", "proposal"): "hsmdomain.v1.Proposal",
    ("hsmdomain.v1.ApplyProposalRequest", "proposal"): "hsmdomain.v1.Proposal",
    ("hsmdomain.v1.SubmitProposalRequest", "proposal"): "hsmdomain.v1.Proposal",
    ("hsmdomain.v1.ProposalStatus", "proposal"): "hsmdomain.v1.Proposal",
    ("hsmdomain.v1.KeyRecord", "metadata"): "hsmdomain.v1.KeyMetadata",
    ("hsmdomain.v1.HostEnrollment", "host"): "hsmdomain.v1.Host",
    ("hsmdomain.v1.AddHost", "enrollment"): "hsmdomain.v1.HostEnrollment",
}


# --- random bytes ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def crafted_bodies() -> list[bytes]:
    """Protobuf encodings chosen to hurt a parser (each should be refused as bad input)."""
    return [
        b"\x0b" * 5000,  # 5000 nested START_GROUP tags of field 1
        b"\x0b" * 200 + b"\x0c" * 200,  # deep but balanced groups
        b"\x0a" + _varint(2**31),  # field 1, length 2 GiB, no data
        b"\x0a" + _varint(2**63),  # a length that does not fit in 64 bits signed
        b"\x0a\x05\xff\xfe\xfd\xfc\xfb",  # field 1 as a string of invalid UTF-8
        b"\x12\x03\xc3\x28\x41",  # field 2 as invalid UTF-8
        b"\x08",  # a varint tag without a value
        b"\x08" + b"\xff" * 11,  # an overlong varint
        b"\x0f",  # wire type 7 (invalid)
        b"\x0e",  # wire type 6 (invalid)
        b"\x00",  # field number 0
        b"\xf8\xff\xff\xff\x7f\x01",  # the largest field number, unknown
        b"\x0c",  # END_GROUP without START_GROUP
        b"\x0a\x02\x0a",  # field 1 whose content is truncated
        b"\x22" + _varint(3) + b"\x0a\x01\xff",  # nested message with a bad string
    ]


def random_bodies(seed: int, count: int) -> list[bytes]:
    """`count` request bodies: the crafted ones first, then seeded random bytes."""
    rng = random.Random(seed)
    bodies = crafted_bodies()
    while len(bodies) < count:
        kind = rng.random()
        if kind < 0.5:
            size = rng.randint(1, 64)
        elif kind < 0.85:
            size = rng.randint(65, 4096)
        else:
            size = rng.randint(4097, 256 * 1024)
        body = rng.randbytes(size)
        if rng.random() < 0.3:
            # A plausible first tag (field 1-8, length-delimited), garbage after it.
            body = bytes([(rng.randint(1, 8) << 3) | 2]) + _varint(rng.randint(0, size)) + body
        bodies.append(body)
    return bodies[:count]


# --- hypothesis: messages of any type ----------------------------------------------------------


def _message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_BOUNDS[field_type]
    candidates = (low, low + 1, -1, 0, 1, 2, 3, 7, 100, 4096, 65536, 2**32, high - 1, high)
    edges = sorted({v for v in candidates if low <= v <= high})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_BOUNDS:
        return _integers(kind)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.text(max_size=40),
            st.sampled_from(HOSTILE_STRINGS),
            st.tuples(st.sampled_from("aé\u202e/"), st.sampled_from(LONG_SIZES)).map(
                lambda t: t[0] * t[1]
            ),
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=80),
            st.sampled_from(HOSTILE_BYTES),
            st.binary(min_size=32, max_size=32),
            st.sampled_from(LONG_SIZES).map(lambda n: b"A" * n),
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 300))
    raise TypeError(f"no strategy for field type {kind} ({field.full_name})")


def _value(field: FieldDescriptor, depth: int, max_depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth=depth + 1, max_depth=max_depth)
    return _scalar(field)


def _repeated(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """Mostly short lists; sometimes one element repeated many times (huge repeated fields)."""
    huge = st.tuples(element, st.sampled_from([64, 129, 300, 1001])).map(lambda t: [t[0]] * t[1])
    return st.one_of(st.lists(element, max_size=3), huge)


def _field_strategy(field: FieldDescriptor, depth: int, max_depth: int) -> st.SearchStrategy[Any]:
    if field.is_repeated:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            small = st.dictionaries(
                _scalar(entry.fields_by_name["key"]),
                _value(value_field, depth, max_depth),
                max_size=4,
            )
            if value_field.type != FieldDescriptor.TYPE_STRING:
                return small
            many = st.integers(65, 300).map(lambda n: {f"k{i}": "v" for i in range(n)})
            return st.one_of(small, many)
        return _repeated(_value(field, depth, max_depth))
    return _value(field, depth, max_depth)


def _build(cls: type[Message], values: Mapping[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if field.is_repeated:
            assert target is not None
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, Message):
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def messages(
    descriptor: Descriptor, *, depth: int = 0, max_depth: int = 4
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type: any subset of fields set to hostile values."""
    cls = _message_class(descriptor)
    if depth >= max_depth:
        return st.just(cls())
    optional = {field.name: _field_strategy(field, depth, max_depth) for field in descriptor.fields}
    return (
        st.fixed_dictionaries({}, optional=optional)
        .map(lambda values: _build(cls, values))
        .filter(lambda message: message.ByteSize() <= MAX_MESSAGE_BYTES)
    )


# --- hypothesis: mutants of a valid message -----------------------------------------------------


def _paths(message: Message, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every (field, [index]) path of the fields set in `message`, nested ones included."""
    paths: list[tuple[Any, ...]] = []
    for field, value in message.ListFields():
        here = (*prefix, field.name)
        paths.append(here)
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            if field.message_type.GetOptions().map_entry:
                continue
            for index, item in enumerate(value):
                paths.extend(_paths(item, (*here, index)))
        else:
            paths.extend(_paths(value, here))
    return paths


def _resolve(message: Message, path: tuple[Any, ...]) -> tuple[Message, str]:
    """The message holding the last field of `path`, and that field's name."""
    holder: Any = message
    for step in path[:-1]:
        holder = holder[step] if isinstance(step, int) else getattr(holder, step)
    return holder, path[-1]


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


@st.composite
def _mutant(
    draw: st.DrawFn,
    base: Message,
    resign: Callable[[Message], None] | None,
) -> Message:
    message = type(base)()
    message.CopyFrom(base)
    paths = [p for p in _paths(message) if not isinstance(p[-1], int)]
    if not paths:
        return message
    path = draw(st.sampled_from(paths))
    holder, name = _resolve(message, path)
    field = holder.DESCRIPTOR.fields_by_name[name]
    inner = INNER_MESSAGES.get((holder.DESCRIPTOR.full_name, name))
    repeated = field.is_repeated
    choice = draw(st.integers(0, 3))
    if inner is not None and choice <= 1:
        # Parse the serialized message inside, mutate it, serialize it again.
        from google.protobuf import descriptor_pool

        inner_cls = _message_class(descriptor_pool.Default().FindMessageTypeByName(inner))
        parsed = inner_cls()
        try:
            parsed.ParseFromString(getattr(holder, name))
        except DecodeError:
            pass
        else:
            setattr(holder, name, draw(_mutant(parsed, None)).SerializeToString())
    elif field.type == FieldDescriptor.TYPE_BYTES and not repeated and choice == 2:
        value = getattr(holder, name)
        if value:
            setattr(holder, name, _flip(value, draw(st.integers(0, len(value) * 8 - 1))))
    elif repeated and choice == 3:
        items = getattr(holder, name)
        if len(items) and not (
            field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
        ):
            index = draw(st.integers(0, len(items) - 1))
            if draw(st.booleans()):
                del items[index]
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                items.add().CopyFrom(items[index])
            else:
                items.append(items[index])
    else:
        holder.ClearField(name)
        replacement = draw(_field_strategy(field, depth=1, max_depth=3))
        for key, value in _build(type(holder), {name: replacement}).ListFields():
            if key.is_repeated:
                getattr(holder, key.name).MergeFrom(value)
            elif key.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(holder, key.name).CopyFrom(value)
            else:
                setattr(holder, key.name, value)
    if resign is not None and draw(st.booleans()):
        resign(message)
    return message


def mutants(
    base: Message, resign: Callable[[Message], None] | None = None
) -> st.SearchStrategy[Message]:
    """Variants of the valid `base` with one change each; `resign` (half of the time)
    re-signs what a mutant carries, so signatures verify and deeper checks must catch it."""
    return _mutant(base, resign)


# --- atheris: the parsers of domain_core --------------------------------------------------------


PARSER_NAMES: tuple[str, ...] = (
    "proposal",
    "sealed-state",
    "manifest",
    "ciphertext-header",
    "envelope-header",
    "ciphertext",
    "key-record",
)


FUZZ_KEY_ID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
_BACKING_KEY = b"\x02" * 32
_DOMAIN_KEY = b"\x01" * 32
_HOST_SEED = b"\x02" * 32  # the Ed25519 key that signs the seed key record


def _record_signer() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from domain_core import keytokens
    from domain_core.signers import InMemorySigner

    host = InMemorySigner(ed25519.Ed25519PrivateKey.from_private_bytes(_HOST_SEED))
    return keytokens.RecordSigner("fuzz", "hsa-1", host)


def write_seed_corpus(directory: Path, genesis_state: bytes) -> int:
    """Valid inputs for every parser (first byte: which parser), to start the fuzzer deep."""
    from domain_core import ciphertext, envelope, keytokens
    from domain_core.model import SealedState
    from domain_proto import keys_pb2

    state = SealedState.from_bytes(genesis_state)
    blob = ciphertext.encrypt(_BACKING_KEY, FUZZ_KEY_ID, 1, b"seed", {"purpose": "fuzz"})
    metadata = keys_pb2.KeyMetadata(key_id=FUZZ_KEY_ID, current_backing_version=1)
    record = keytokens.seal_record(
        metadata, {1: _BACKING_KEY}, _DOMAIN_KEY, 1, signer=_record_signer()
    )
    seeds = {
        "proposal": state.message.proposal,
        "sealed-state": genesis_state,
        "manifest": state.message.manifest,
        "ciphertext-header": blob,
        "envelope-header": envelope.seal_envelope(_DOMAIN_KEY, blob, {"a": "b"}, b"x" * 100),
        "ciphertext": blob,
        "key-record": record.SerializeToString(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (directory / name).write_bytes(bytes([PARSER_NAMES.index(name)]) + data)
    return len(seeds)


def _parsers() -> list[Callable[[bytes], object]]:
    from domain_core import ciphertext, envelope, keytokens
    from domain_core.model import Manifest, Proposal, SealedState
    from domain_proto import keys_pb2

    signer = _record_signer()
    host_keys = {signer.host_id: signer.signer.public_key}

    def key_record(data: bytes) -> object:
        record = keys_pb2.KeyRecord()
        try:
            record.ParseFromString(data)
        except DecodeError:
            return None
        from domain_core.errors import HsmDomainError

        with contextlib.suppress(HsmDomainError):  # both checks run on every input
            keytokens.verify_key_record_signature(record, signer.domain_id, host_keys)
        return keytokens.verify_key_record(record, {1: _DOMAIN_KEY}, FUZZ_KEY_ID)

    return [
        Proposal.from_bytes,
        SealedState.from_bytes,
        Manifest.from_bytes,
        ciphertext.parse_header,
        envelope.parse_envelope_header,
        lambda data: ciphertext.decrypt(_BACKING_KEY, data, {"purpose": "fuzz"}),
        key_record,
    ]


def _harness(plant_bug: bool = False) -> Callable[[bytes], None]:
    from domain_core.errors import HsmDomainError

    parsers = _parsers()

    def test_one_input(data: bytes) -> None:
        if not data:
            return
        if plant_bug and data[1:5] == b"BUG!":
            raise RuntimeError("planted bug")  # proves that the harness reports crashes
        parser = parsers[data[0] % len(parsers)]
        with contextlib.suppress(HsmDomainError):  # refused as bad input: what it must do
            parser(data[1:])

    return test_one_input


def main(argv: list[str] | None = None) -> int:
    """Run the atheris harness for `--runs` inputs; exit 0 if no parser raised anything else."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--plant-bug", action="store_true", help="crash on inputs with BUG!")
    parser.add_argument("--artifacts", default=".", help="where a crashing input is written")
    parser.add_argument("corpus", nargs="*", help="directories of seed inputs (first byte: parser)")
    args = parser.parse_args(argv)
    import atheris

    with atheris.instrument_imports(include=["domain_core"]):
        harness = _harness(args.plant_bug)
    options = [
        f"-runs={args.runs}",
        f"-seed={args.seed}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={args.artifacts.rstrip('/')}/",
    ]
    atheris.Setup([sys.argv[0], *options, "-len_control=0", *args.corpus], harness)
    atheris.Fuzz()  # exits the process when the runs are done
    return 0


if __name__ == "__main__":
    sys.exit(main())
