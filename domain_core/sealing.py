"""Sealing and unsealing the secret part of a domain state.

Invariants:
- the domain keys (every generation the manifest lists) are encrypted with AES-256-GCM under
  the current generation's key, with the manifest hash as associated data: secrets cannot be
  moved to another manifest;
- the current domain key is wrapped to each trusted host's X25519 key (sealed box), and to no
  one else: a removed host gets no wrap and cannot read what is sealed afterwards;
- the producing host signs the state hash (manifest + secrets bytes) with its Ed25519 key;
- a state whose policy names a recovery threshold carries a fresh recovery package inside its
  sealed secrets (`domain_core.recovery`): the domain keys under a new key-encryption key split
  among the operators' recovery keys, so every backup of it can be recovered by a quorum;
- every failure to open collapses into InvalidKeyTokenError (no oracle), except "this host
  has no wrap", which is not secret and tells a removed host why it cannot follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf.message import DecodeError

from domain_core import crypto, recovery
from domain_core.canonical import signing_input
from domain_core.contexts import PayloadType
from domain_core.errors import InvalidKeyTokenError, UnknownHostError
from domain_core.model import Manifest, Proposal, SealedState, state_hash
from domain_core.signers import Signer
from domain_proto import domain_pb2

DomainKeys = Mapping[int, bytes]


def state_signing_message(hash_of_state: bytes) -> bytes:
    """The bytes a producing host signs for a state with this hash."""
    return signing_input(PayloadType.SEALED_STATE, hash_of_state)


def next_domain_keys(current_keys: DomainKeys, manifest: domain_pb2.Manifest) -> dict[int, bytes]:
    """Domain keys for a manifest: keep listed generations, create new ones, drop the rest."""
    keys: dict[int, bytes] = {}
    for generation in manifest.key_generations:
        existing = current_keys.get(generation.generation)
        keys[generation.generation] = existing if existing is not None else crypto.new_aes_key()
    return keys


def seal_state(
    manifest_message: domain_pb2.Manifest,
    domain_keys: DomainKeys,
    *,
    producer_host_id: str,
    producer: Signer,
    proposal: Proposal | None,
    approvals: Sequence[domain_pb2.Approval] = (),
) -> SealedState:
    """Serialize the manifest once, seal the domain keys under it, wrap, add the recovery
    package its policy asks for, and sign."""
    manifest = Manifest.from_message(manifest_message)
    listed = [g.generation for g in manifest.message.key_generations]
    if sorted(domain_keys) != listed:
        raise ValueError("domain keys must match the manifest's key generations exactly")
    if any(len(k) != crypto.AES_KEY_BYTES for k in domain_keys.values()):
        raise ValueError("domain keys are 32 bytes")
    if producer_host_id not in manifest.hosts_by_id:
        # The chain verifier checks the producer is trusted in the previous state; a host
        # that the new state removes must not produce it either.
        raise ValueError("the producing host is not a host of the new state")
    current = manifest.current_generation
    current_key = domain_keys[current]
    plaintext = domain_pb2.DomainSecrets(
        keys=[domain_pb2.DomainKey(generation=g, key=domain_keys[g]) for g in listed]
    ).SerializeToString(deterministic=True)
    nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    ciphertext = crypto.aes_gcm_seal(current_key, plaintext, manifest.hash, nonce)
    wraps = [
        domain_pb2.KeyWrap(
            host_id=host.host_id,
            wrapped_key=crypto.seal_to_host(host.agreement_public_key, current_key),
        )
        for host in manifest.message.hosts
    ]
    secrets = domain_pb2.SealedSecrets(
        generation=current, nonce=nonce, ciphertext=ciphertext, wraps=wraps
    )
    package = recovery.build_package(manifest, domain_keys)
    if package is not None:
        secrets.recovery.CopyFrom(package)
    secrets_raw = secrets.SerializeToString(deterministic=True)
    signature = producer.sign(state_signing_message(state_hash(manifest.raw, secrets_raw)))
    message = domain_pb2.SealedState(
        manifest=manifest.raw,
        secrets=secrets_raw,
        proposal=proposal.raw if proposal is not None else b"",
        approvals=list(approvals),
        producer_host_id=producer_host_id,
        producer_signature=signature,
    )
    return SealedState.from_message(message)


def unseal_state(
    state: SealedState, host_id: str, agreement_private_key: bytes
) -> dict[int, bytes]:
    """Open a state's secrets as `host_id`: unwrap the current key, decrypt every generation."""
    wrap = next((w for w in state.secrets.wraps if w.host_id == host_id), None)
    if wrap is None:
        raise UnknownHostError(
            f"state version {state.version} holds no domain key for host {host_id}: "
            "this host is not a member of the domain at that version"
        )
    current_key = crypto.open_sealed_box(agreement_private_key, wrap.wrapped_key)
    plaintext = crypto.aes_gcm_open(
        current_key, state.secrets.ciphertext, state.manifest.hash, state.secrets.nonce
    )
    secrets = domain_pb2.DomainSecrets()
    try:
        secrets.ParseFromString(plaintext)
    except DecodeError:
        raise InvalidKeyTokenError() from None
    keys = {k.generation: k.key for k in secrets.keys}
    listed = [g.generation for g in state.manifest.message.key_generations]
    if (
        sorted(keys) != listed
        or len(keys) != len(secrets.keys)
        or not crypto.constant_time_equal(
            keys.get(state.manifest.current_generation, b""), current_key
        )
        or any(len(k) != crypto.AES_KEY_BYTES for k in keys.values())
    ):
        raise InvalidKeyTokenError()
    return keys
