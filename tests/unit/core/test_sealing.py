"""domain_core.sealing: only the state's hosts open its secrets; tampering never opens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.simulator import MaliciousCoordinator, SimulatedDomain, flip_bit, new_host

from domain_core import crypto, sealing
from domain_core.errors import InvalidKeyTokenError, UnknownHostError
from domain_core.model import SealedState, state_hash
from domain_proto import domain_pb2

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sim() -> SimulatedDomain:
    """v1 genesis; v2 add-operator (no rotation); v3 removes hsa-3 (rotation); v4 adds hsa-4."""
    sim = SimulatedDomain.create()
    sim.advance(10)
    sim.transition([sim.add_operator_change("dave")])
    sim.advance(10)
    sim.transition([sim.remove_host_change("hsa-3")])
    sim.advance(10)
    sim.transition([sim.add_host_change("hsa-4")])
    return sim


def _secrets(state: SealedState) -> domain_pb2.SealedSecrets:
    secrets = domain_pb2.SealedSecrets()
    secrets.CopyFrom(state.secrets)
    return secrets


def _with_secrets(state: SealedState, secrets: domain_pb2.SealedSecrets) -> SealedState:
    return MaliciousCoordinator.rebuild(
        state, secrets=secrets.SerializeToString(deterministic=True)
    )


def _unseal(sim: SimulatedDomain, state: SealedState, host_id: str) -> dict[int, bytes]:
    return sealing.unseal_state(state, host_id, sim.hosts[host_id].agreement_private_key)


# --- who can unseal ------------------------------------------------------------------------


def test_every_host_unseals_the_same_keys(sim: SimulatedDomain) -> None:
    for state in sim.states:
        opened = {h: _unseal(sim, state, h) for h in sim.current_host_ids(state)}
        assert len({tuple(sorted(k.items())) for k in opened.values()}) == 1
        keys = next(iter(opened.values()))
        assert sorted(keys) == [g.generation for g in state.manifest.message.key_generations]
        assert all(len(k) == 32 for k in keys.values())


def test_wraps_exist_for_exactly_the_states_hosts(sim: SimulatedDomain) -> None:
    for state in sim.states:
        assert [w.host_id for w in state.secrets.wraps] == sim.current_host_ids(state)


def test_keys_carry_over_and_rotate(sim: SimulatedDomain) -> None:
    v1, v2, v3, v4 = (_unseal(sim, sim.state(v), "hsa-1") for v in (1, 2, 3, 4))
    assert v1 == v2  # add-operator keeps the key
    assert sorted(v3) == [1, 2]
    assert v3[1] == v1[1]
    assert v3[2] != v1[1]
    assert v4 == v3


def test_host_not_in_state_gets_unknown_host(sim: SimulatedDomain) -> None:
    stranger = new_host("test", "hsa-99")
    with pytest.raises(UnknownHostError, match="hsa-99"):
        sealing.unseal_state(sim.head, "hsa-99", stranger.agreement_private_key)


def test_removed_host_reads_before_but_not_after_removal(sim: SimulatedDomain) -> None:
    assert sorted(_unseal(sim, sim.state(2), "hsa-3")) == [1]
    for version in (3, 4):
        with pytest.raises(UnknownHostError, match="not a member"):
            _unseal(sim, sim.state(version), "hsa-3")
        # Nor can it open a remaining host's wrap with its own key.
        with pytest.raises(InvalidKeyTokenError):
            sealing.unseal_state(
                sim.state(version), "hsa-1", sim.hosts["hsa-3"].agreement_private_key
            )


def test_host_added_later_cannot_read_earlier_states(sim: SimulatedDomain) -> None:
    assert sorted(_unseal(sim, sim.state(4), "hsa-4")) == [1, 2]
    with pytest.raises(UnknownHostError):
        _unseal(sim, sim.state(3), "hsa-4")


def test_wrong_private_key_is_invalid_key_token(sim: SimulatedDomain) -> None:
    with pytest.raises(InvalidKeyTokenError) as info:
        sealing.unseal_state(sim.head, "hsa-1", sim.hosts["hsa-2"].agreement_private_key)
    assert str(info.value) == "invalid key token"


def test_private_key_length_is_a_programming_error(sim: SimulatedDomain) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        sealing.unseal_state(sim.head, "hsa-1", b"short")


# --- tampering ------------------------------------------------------------------------------


def _flip_field(field: str, bit: int) -> Callable[[domain_pb2.SealedSecrets], None]:
    def mutate(secrets: domain_pb2.SealedSecrets) -> None:
        value = getattr(secrets, field)
        setattr(secrets, field, flip_bit(value, bit % (len(value) * 8)))

    return mutate


def _flip_wrap(secrets: domain_pb2.SealedSecrets) -> None:
    secrets.wraps[0].wrapped_key = flip_bit(secrets.wraps[0].wrapped_key, 100)


def _truncate(secrets: domain_pb2.SealedSecrets) -> None:
    secrets.ciphertext = secrets.ciphertext[:-1]


def _swap_wraps(secrets: domain_pb2.SealedSecrets) -> None:
    # hsa-1's wrap now carries hsa-2's wrapped key (readable only with hsa-2's key).
    secrets.wraps[0].wrapped_key, secrets.wraps[1].wrapped_key = (
        secrets.wraps[1].wrapped_key,
        secrets.wraps[0].wrapped_key,
    )


def _drop_nonce(secrets: domain_pb2.SealedSecrets) -> None:
    secrets.nonce = b""


TAMPERS: dict[str, Callable[[domain_pb2.SealedSecrets], None]] = {
    "ciphertext first bit": _flip_field("ciphertext", 0),
    "ciphertext tag last bit": _flip_field("ciphertext", -1),
    "nonce bit": _flip_field("nonce", 5),
    "nonce missing": _drop_nonce,
    "wrap bit": _flip_wrap,
    "truncated ciphertext": _truncate,
    "wraps swapped": _swap_wraps,
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_secrets_are_invalid_key_token(sim: SimulatedDomain, case: str) -> None:
    secrets = _secrets(sim.head)
    TAMPERS[case](secrets)
    tampered = _with_secrets(sim.head, secrets)
    with pytest.raises(InvalidKeyTokenError) as info:
        _unseal(sim, tampered, "hsa-1")
    assert str(info.value) == "invalid key token"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_in_sealed_material_fails(
    sim: SimulatedDomain, data: st.DataObject
) -> None:
    secrets = _secrets(sim.head)
    target = data.draw(st.sampled_from(["ciphertext", "nonce", "wrap"]))
    if target == "wrap":
        value = secrets.wraps[0].wrapped_key
        bit = data.draw(st.integers(min_value=0, max_value=len(value) * 8 - 1))
        secrets.wraps[0].wrapped_key = flip_bit(value, bit)
    else:
        value = getattr(secrets, target)
        bit = data.draw(st.integers(min_value=0, max_value=len(value) * 8 - 1))
        setattr(secrets, target, flip_bit(value, bit))
    with pytest.raises(InvalidKeyTokenError):
        _unseal(sim, _with_secrets(sim.head, secrets), "hsa-1")


def test_secrets_moved_onto_another_manifest_do_not_open(sim: SimulatedDomain) -> None:
    v1, v2 = sim.state(1), sim.state(2)
    # Same domain key (v2 only added an operator), same wraps: only the AD binds them.
    assert _unseal(sim, v1, "hsa-1") == _unseal(sim, v2, "hsa-1")
    moved = MaliciousCoordinator.mix(manifest_from=v2, secrets_from=v1)
    with pytest.raises(InvalidKeyTokenError):
        _unseal(sim, moved, "hsa-1")
    moved_back = MaliciousCoordinator.mix(manifest_from=v1, secrets_from=v2)
    with pytest.raises(InvalidKeyTokenError):
        _unseal(sim, moved_back, "hsa-2")


def _reseal(
    state: SealedState, plaintext: bytes, key: bytes, wrap_key: bytes | None = None
) -> SealedState:
    """Secrets built by hand (a malicious producer): `plaintext` under `key`, AD = manifest."""
    secrets = _secrets(state)
    secrets.nonce = crypto.random_bytes(12)
    secrets.ciphertext = crypto.aes_gcm_seal(key, plaintext, state.manifest.hash, secrets.nonce)
    for wrap in secrets.wraps:
        host = state.manifest.hosts_by_id[wrap.host_id]
        wrap.wrapped_key = crypto.seal_to_host(host.agreement_public_key, wrap_key or key)
    return _with_secrets(state, secrets)


def _domain_secrets(keys: dict[int, bytes]) -> bytes:
    return domain_pb2.DomainSecrets(
        keys=[domain_pb2.DomainKey(generation=g, key=k) for g, k in keys.items()]
    ).SerializeToString()


@pytest.mark.parametrize(
    "case",
    ["missing generation", "extra generation", "duplicate generation", "short key", "other key"],
)
def test_decrypted_secrets_must_match_the_manifest(sim: SimulatedDomain, case: str) -> None:
    state = sim.state(3)  # generations [1, 2]
    keys = _unseal(sim, state, "hsa-1")
    current = keys[2]
    if case == "missing generation":
        plaintext = _domain_secrets({2: current})
    elif case == "extra generation":
        plaintext = _domain_secrets({1: keys[1], 2: current, 3: crypto.new_aes_key()})
    elif case == "duplicate generation":
        plaintext = _domain_secrets({1: keys[1], 2: current}) + _domain_secrets({2: current})
    elif case == "short key":
        plaintext = _domain_secrets({1: keys[1][:16], 2: current})
    else:  # the plaintext's current key differs from the wrapped one
        plaintext = _domain_secrets({1: keys[1], 2: crypto.new_aes_key()})
    with pytest.raises(InvalidKeyTokenError):
        _unseal(sim, _reseal(state, plaintext, current), "hsa-1")
    # Control: the honest plaintext, resealed by hand the same way, opens.
    honest = _reseal(state, _domain_secrets(keys), current)
    assert _unseal(sim, honest, "hsa-1") == keys


def test_undecodable_plaintext_is_invalid_key_token(sim: SimulatedDomain) -> None:
    key = _unseal(sim, sim.head, "hsa-1")[2]
    with pytest.raises(InvalidKeyTokenError):
        _unseal(sim, _reseal(sim.head, b"\xff\xff\xff", key), "hsa-1")


# --- sealing preconditions -------------------------------------------------------------------


def _seal(sim: SimulatedDomain, keys: dict[int, bytes], producer: str = "hsa-1") -> SealedState:
    return sealing.seal_state(
        sim.head.manifest.message,
        keys,
        producer_host_id=producer,
        producer=sim.hosts[producer].signer if producer in sim.hosts else sim.hosts["hsa-1"].signer,
        proposal=None,
    )


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({1: bytes(32)}, "match the manifest"),
        ({1: bytes(32), 2: bytes(32), 3: bytes(32)}, "match the manifest"),
        ({2: bytes(32), 1: bytes(32), 7: bytes(32)}, "match the manifest"),
        ({1: bytes(32), 2: bytes(16)}, "32 bytes"),
    ],
)
def test_keys_must_match_manifest_generations(
    sim: SimulatedDomain, keys: dict[int, bytes], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _seal(sim, keys)


def test_producer_must_be_a_host_of_the_new_state(sim: SimulatedDomain) -> None:
    keys = _unseal(sim, sim.head, "hsa-1")
    with pytest.raises(ValueError, match="producing host"):
        _seal(sim, keys, producer="hsa-3")


def test_sealed_state_is_signed_over_its_hash(sim: SimulatedDomain) -> None:
    state = sim.head
    assert state.hash == state_hash(state.message.manifest, state.message.secrets)
    producer = sim.hosts[state.message.producer_host_id]
    producer.signer.public_key.verify(
        state.message.producer_signature, sealing.state_signing_message(state.hash)
    )


def test_sealing_is_randomised(sim: SimulatedDomain) -> None:
    keys = _unseal(sim, sim.head, "hsa-1")
    a, b = _seal(sim, keys), _seal(sim, keys)
    assert a.message.manifest == b.message.manifest
    assert a.message.secrets != b.message.secrets
    assert a.hash != b.hash
    assert _unseal(sim, a, "hsa-2") == _unseal(sim, b, "hsa-4") == keys


def test_next_domain_keys(sim: SimulatedDomain) -> None:
    manifest = domain_pb2.Manifest()
    manifest.key_generations.extend(
        domain_pb2.KeyGeneration(generation=g, created_at=0) for g in (2, 3)
    )
    current = {1: b"a" * 32, 2: b"b" * 32}
    keys = sealing.next_domain_keys(current, manifest)
    assert sorted(keys) == [2, 3]
    assert keys[2] == b"b" * 32
    assert len(keys[3]) == 32
    assert keys[3] not in current.values()
