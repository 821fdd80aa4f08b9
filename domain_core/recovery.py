"""The recovery package of a domain state: its secrets, recoverable by M operators.

A state whose quorum policy names a recovery threshold M carries, inside its sealed secrets
(so the state hash and the producer's signature cover it, and every backup holds it), the
domain keys of every generation it lists under a fresh key-encryption key (KEK), and that KEK
split M-of-N (`recovery_shares`) with one share sealed to each operator that enrolled a
recovery key. `build_package` makes it (the producing HSA), `check_package` checks its shape
against the manifest (every HSA that accepts the state), `open_package` rebuilds the domain
keys from M shares (the recovering HSAs).

Invariants:
- the recipients are exactly the manifest's operators with a recovery key, in the order of
  their ids, share i (1-based) to the i-th; M is the policy's recovery threshold, at most N;
- every share is bound to (domain id, version, manifest hash, operator id, index), and the
  sealed secrets to the manifest hash: nothing moves to another domain, state or operator;
- `open_package` returns keys only if they are exactly the manifest's generations, each 32
  bytes; fewer than M shares or a damaged one give no key at all (`combine_shares`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from google.protobuf.message import DecodeError

from domain_core import canonical, crypto
from domain_core.contexts import PayloadType
from domain_core.errors import (
    FailedPreconditionError,
    InvalidInputError,
    InvalidKeyTokenError,
    MalformedMessageError,
)
from domain_core.limits import MAX_RECOVERY_CONTRIBUTION_BYTES
from domain_core.model import Manifest, Proposal, SealedState
from domain_core.recovery_shares import (
    KEY_BYTES,
    RecoveryAlgorithm,
    SealedShare,
    ShareDoesNotOpenError,
    algorithm_of,
    combine_shares,
    open_share,
    seal_share,
    split_key,
)
from domain_proto import domain_pb2

__all__ = [
    "build_package",
    "check_contribution",
    "check_package",
    "contribution_context",
    "open_contribution",
    "open_operator_share",
    "open_package",
    "rebuild_keys",
    "recipients",
    "recover_change",
    "seal_contribution",
    "sealed_share",
    "share_context",
    "verify_keys_against_chain",
]


def recipients(manifest: Manifest) -> list[domain_pb2.Operator]:
    """The operators that enrolled a recovery key, in the order of their ids."""
    return sorted(
        (o for o in manifest.message.operators if o.HasField("recovery_key")),
        key=lambda o: o.operator_id,
    )


def share_context(manifest: Manifest, operator_id: str, index: int) -> bytes:
    """What share `index` of this state's package is bound to."""
    message = manifest.message
    return canonical.digest(
        PayloadType.RECOVERY_SHARE,
        message.domain_id.encode(),
        message.version.to_bytes(8, "big"),
        manifest.hash,
        operator_id.encode(),
        index.to_bytes(4, "big"),
    )


def _secrets_context(manifest: Manifest) -> bytes:
    return canonical.digest(PayloadType.RECOVERY_SECRETS, manifest.hash)


def _secrets_plaintext(manifest: Manifest, domain_keys: Mapping[int, bytes]) -> bytes:
    listed = [g.generation for g in manifest.message.key_generations]
    if sorted(domain_keys) != listed or any(len(k) != KEY_BYTES for k in domain_keys.values()):
        raise ValueError("domain keys must match the manifest's key generations exactly")
    return domain_pb2.DomainSecrets(
        keys=[domain_pb2.DomainKey(generation=g, key=domain_keys[g]) for g in listed]
    ).SerializeToString(deterministic=True)


def build_package(
    manifest: Manifest, domain_keys: Mapping[int, bytes]
) -> domain_pb2.RecoveryPackage | None:
    """The package for a state with this manifest and these domain keys (None when its
    policy names no recovery threshold)."""
    threshold = manifest.message.quorum.recovery_threshold
    if threshold == 0:
        return None
    to = recipients(manifest)
    if threshold > len(to):
        raise ValueError(
            f"the recovery threshold {threshold} exceeds the {len(to)} enrolled recovery keys"
        )
    kek = crypto.new_aes_key()
    nonce = crypto.random_bytes(crypto.GCM_NONCE_BYTES)
    sealed_secrets = crypto.aes_gcm_seal(
        kek, _secrets_plaintext(manifest, domain_keys), _secrets_context(manifest), nonce
    )
    shares = []
    for index, (operator, words) in enumerate(
        zip(to, split_key(kek, threshold, len(to)), strict=True), start=1
    ):
        key = operator.recovery_key
        sealed = seal_share(
            algorithm_of(key),
            key.public_key,
            words,
            share_context(manifest, operator.operator_id, index),
        )
        shares.append(
            domain_pb2.SealedRecoveryShare(
                operator_id=operator.operator_id,
                index=index,
                ephemeral_public_key=sealed.ephemeral_public_key,
                nonce=sealed.nonce,
                ciphertext=sealed.ciphertext,
            )
        )
    return domain_pb2.RecoveryPackage(
        threshold=threshold, nonce=nonce, sealed_secrets=sealed_secrets, shares=shares
    )


def check_package(manifest: Manifest, secrets: domain_pb2.SealedSecrets) -> None:
    """The state's package has the shape its manifest requires (MalformedMessageError saying
    what is wrong): present exactly when the policy names a recovery threshold, that threshold,
    one share per enrolled recovery key in order, each of a well-formed size."""
    threshold = manifest.message.quorum.recovery_threshold
    version = manifest.message.version
    if threshold == 0:
        if secrets.HasField("recovery"):
            raise MalformedMessageError(
                f"state version {version} carries a recovery package its policy does not ask for"
            )
        return
    if not secrets.HasField("recovery"):
        raise MalformedMessageError(
            f"state version {version} has no recovery package; its policy asks for one "
            f"({threshold} of its operators' recovery keys)"
        )
    package = secrets.recovery
    to = recipients(manifest)
    if package.threshold != threshold:
        raise MalformedMessageError(
            f"the recovery package of version {version} needs {package.threshold} shares; "
            f"the policy says {threshold}"
        )
    if len(package.nonce) != crypto.GCM_NONCE_BYTES or len(package.sealed_secrets) < (
        crypto.GCM_TAG_BYTES + KEY_BYTES
    ):
        raise MalformedMessageError(f"the recovery package of version {version} is malformed")
    if [(s.operator_id, s.index) for s in package.shares] != [
        (o.operator_id, i) for i, o in enumerate(to, start=1)
    ]:
        raise MalformedMessageError(
            f"the recovery package of version {version} does not hold one share for each "
            f"enrolled recovery key ({len(to)}), in order"
        )
    for share, operator in zip(package.shares, to, strict=True):
        algorithm = algorithm_of(operator.recovery_key)
        size = 32 if algorithm is RecoveryAlgorithm.X25519 else 65
        if (
            len(share.ephemeral_public_key) != size
            or len(share.nonce) != crypto.GCM_NONCE_BYTES
            or len(share.ciphertext) <= crypto.GCM_TAG_BYTES
        ):
            raise MalformedMessageError(
                f"share {share.index} of the recovery package of version {version} is malformed"
            )


def sealed_share(package: domain_pb2.RecoveryPackage, operator_id: str) -> tuple[int, SealedShare]:
    """The index and sealed share of `operator_id` (InvalidInputError if it has none)."""
    for share in package.shares:
        if share.operator_id == operator_id:
            return share.index, SealedShare(
                share.ephemeral_public_key, share.nonce, share.ciphertext
            )
    raise InvalidInputError(f"the recovery package holds no share for operator {operator_id}")


def open_operator_share(
    manifest: Manifest,
    package: domain_pb2.RecoveryPackage,
    operator_id: str,
    agree: Callable[[bytes], bytes],
) -> str:
    """Operator `operator_id`'s share of this state's package, in SLIP-39 words, given the ECDH
    with their recovery key (`agree`, computed on their token). InvalidInputError when the
    manifest enrolled no recovery key for them; InvalidCiphertextError when the share does not
    open (another domain, state or operator, tampered bytes, or not their key)."""
    operator = next((o for o in recipients(manifest) if o.operator_id == operator_id), None)
    if operator is None:
        raise InvalidInputError(
            f"operator {operator_id} has no recovery key in state version "
            f"{manifest.message.version}, so holds no share of its package"
        )
    index, sealed = sealed_share(package, operator_id)
    key = operator.recovery_key
    return open_share(
        algorithm_of(key),
        key.public_key,
        sealed,
        share_context(manifest, operator_id, index),
        agree,
    )


def open_package(
    manifest: Manifest, package: domain_pb2.RecoveryPackage, shares: Sequence[str]
) -> dict[int, bytes]:
    """The domain keys of the state, rebuilt from `shares` (SLIP-39 words, at least M)."""
    kek = combine_shares(shares)
    plaintext = crypto.aes_gcm_open(
        kek, package.sealed_secrets, _secrets_context(manifest), package.nonce
    )
    secrets = domain_pb2.DomainSecrets()
    try:
        secrets.ParseFromString(plaintext)
    except DecodeError:
        raise InvalidKeyTokenError() from None
    keys = {k.generation: k.key for k in secrets.keys}
    listed = [g.generation for g in manifest.message.key_generations]
    if (
        sorted(keys) != listed
        or len(keys) != len(secrets.keys)
        or any(len(k) != KEY_BYTES for k in keys.values())
    ):
        raise InvalidKeyTokenError()
    return keys


# --- the recovery ceremony: shares sealed to a session key, keys checked against the chain ---


def recover_change(proposal: Proposal) -> domain_pb2.Recover | None:
    """The recover change of a proposal, if it is a recovery (one is alone in its proposal)."""
    for change in proposal.changes:
        if change.HasField("recover"):
            return change.recover
    return None


def check_contribution(proposal: Proposal, approval: domain_pb2.Approval) -> None:
    """An approval carries a recovery share only for a recover proposal, and one of a
    well-formed size (InvalidInputError saying which)."""
    if not approval.HasField("recovery_contribution"):
        return
    if recover_change(proposal) is None:
        raise InvalidInputError(
            "this approval carries a recovery share, but the proposal recovers nothing: "
            "approve it without one"
        )
    contribution = approval.recovery_contribution
    if (
        len(contribution.ephemeral_public_key) != 32
        or len(contribution.nonce) != crypto.GCM_NONCE_BYTES
        or not crypto.GCM_TAG_BYTES
        < len(contribution.ciphertext)
        <= MAX_RECOVERY_CONTRIBUTION_BYTES
    ):
        raise InvalidInputError(
            "the recovery share in this approval is malformed (an X25519 ephemeral key, a "
            f"12-byte nonce and at most {MAX_RECOVERY_CONTRIBUTION_BYTES} bytes of ciphertext)"
        )


def contribution_context(domain_id: str, proposal_id: bytes, operator_id: str) -> bytes:
    """What one operator's contribution to a recover proposal is bound to."""
    return canonical.digest(
        PayloadType.RECOVERY_CONTRIBUTION,
        domain_id.encode(),
        proposal_id,
        operator_id.encode(),
    )


def seal_contribution(
    session_public_key: bytes, share: str, *, domain_id: str, proposal_id: bytes, operator_id: str
) -> domain_pb2.RecoveryContribution:
    """`share` (SLIP-39 words) sealed to a recovery session's X25519 key for this proposal and
    operator: only the session host opens it, and only for them."""
    sealed = seal_share(
        RecoveryAlgorithm.X25519,
        session_public_key,
        share,
        contribution_context(domain_id, proposal_id, operator_id),
    )
    return domain_pb2.RecoveryContribution(
        ephemeral_public_key=sealed.ephemeral_public_key,
        nonce=sealed.nonce,
        ciphertext=sealed.ciphertext,
    )


def open_contribution(
    contribution: domain_pb2.RecoveryContribution,
    session_public_key: bytes,
    agree: Callable[[bytes], bytes],
    *,
    domain_id: str,
    proposal_id: bytes,
    operator_id: str,
) -> str:
    """The share in a contribution, given the ECDH with the session's private key;
    ShareDoesNotOpenError when it was sealed for another session, proposal or operator, or
    changed."""
    return open_share(
        RecoveryAlgorithm.X25519,
        session_public_key,
        SealedShare(contribution.ephemeral_public_key, contribution.nonce, contribution.ciphertext),
        contribution_context(domain_id, proposal_id, operator_id),
        agree,
    )


def verify_keys_against_chain(states: Sequence[SealedState], keys: Mapping[int, bytes]) -> None:
    """Rebuilt domain keys are the chain's own: for each generation, the newest state whose
    current generation it is must open under it (AES-GCM over the manifest hash) to exactly
    these keys of the generations it lists. InvalidKeyTokenError (no detail: no oracle about
    which key) when one does not; FailedPreconditionError when a generation has no state."""
    newest: dict[int, SealedState] = {}
    for state in states:
        newest[state.manifest.current_generation] = state
    for generation, key in keys.items():
        sealed_under = newest.get(generation)
        if sealed_under is None:
            raise FailedPreconditionError(
                f"no state of the chain is sealed under domain key generation {generation}"
            )
        plaintext = crypto.aes_gcm_open(
            key,
            sealed_under.secrets.ciphertext,
            sealed_under.manifest.hash,
            sealed_under.secrets.nonce,
        )
        secrets = domain_pb2.DomainSecrets()
        try:
            secrets.ParseFromString(plaintext)
        except DecodeError:
            raise InvalidKeyTokenError() from None
        for sealed in secrets.keys:
            expected = keys.get(sealed.generation)
            if expected is not None and not crypto.constant_time_equal(expected, sealed.key):
                raise InvalidKeyTokenError()


def rebuild_keys(
    states: Sequence[SealedState],
    proposal_id: bytes,
    approvals: Sequence[domain_pb2.Approval],
    *,
    session_public_key: bytes,
    agree: Callable[[bytes], bytes],
) -> dict[int, bytes]:
    """The domain keys of the newest of `states` (the verified chain, oldest first), rebuilt
    from the shares the approvals of recover proposal `proposal_id` carry, and checked against
    every state of the chain (`verify_keys_against_chain`).

    ShareDoesNotOpenError names the operator whose contribution does not open (sealed for
    another session, proposal or operator, or changed); FailedPreconditionError when fewer
    than the threshold carry one; InvalidInputError when the shares do not combine.
    """
    head = states[-1]
    manifest = head.manifest
    if not head.secrets.HasField("recovery"):
        raise FailedPreconditionError(
            f"state version {head.version} carries no recovery package: it cannot be recovered"
        )
    package = head.secrets.recovery
    shares = []
    for approval in approvals:
        if not approval.HasField("recovery_contribution"):
            continue
        try:
            shares.append(
                open_contribution(
                    approval.recovery_contribution,
                    session_public_key,
                    agree,
                    domain_id=manifest.domain_id,
                    proposal_id=proposal_id,
                    operator_id=approval.operator_id,
                )
            )
        except ShareDoesNotOpenError:
            raise ShareDoesNotOpenError(
                f"the recovery share of operator {approval.operator_id[:16]} does not open with "
                "this session's key: it was sealed for another session, proposal or operator, "
                "or changed on its way; they contribute again"
            ) from None
    if len(shares) < package.threshold:
        raise FailedPreconditionError(
            f"{len(shares)} recovery shares were contributed and {package.threshold} are needed; "
            "nothing is learned from fewer"
        )
    keys = open_package(manifest, package, shares)
    verify_keys_against_chain(states, keys)
    return keys
