"""Verifying a key record the untrusted coordinator returned, end to end and against the floor.

`RecordVerifier.verify` is the only way a backing key gets out of a stored record on an HSA:
the key cache (`hsa_node.keycache`) verifies every record before it holds it, the key service
verifies each record it lists, and the upkeep verifies every record before it acts on it.

Invariants:
- a record verifies only if it is signed by a host of this node's verified head (the signature
  checked under that host's key from the head, over the record's domain, metadata, signer and
  every token field), its metadata names the expected key and this domain, it has exactly one
  token per backing version and every token opens under a domain key this node holds, bound
  to the record's metadata bytes, and it is not older than the key's floor
  (`hsa_node.keyfloors`);
- a coordinator that edits a policy or a state, or swaps, drops or adds tokens, and a removed
  host that writes a record of its own (it still holds older domain-key generations), are
  refused with FAILED_PRECONDITION, and a WARNING with the reason goes to the log (the caller
  gets no detail: no oracle). Two cases are UNAVAILABLE instead, because this node may only be
  behind: tokens under a domain-key generation newer than it holds, and a signer it has never
  seen as a host (a host added in a state it has not installed yet); a signer its chain
  removed is always refused;
- a key this HSA holds no floor for is accepted only once its peers were asked
  (`FloorSource.learn`, UnavailableError when none answered);
- nothing secret is logged: the log names keys, hosts, generations and versions only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from domain_core import keytokens
from domain_core.errors import (
    BadSignatureError,
    FailedPreconditionError,
    InvalidKeyTokenError,
    UnavailableError,
    UnknownSignerError,
)
from domain_edge.throttled_log import ThrottledLog
from domain_proto import keys_pb2
from hsa_node.keyfloors import FloorSource, MetadataVersionFloor, metadata_digest
from hsa_node.keyrecords import parse_metadata
from hsa_node.node import DomainKeys

__all__ = ["RecordVerifier"]

# These lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.keycache")

_SHOWN: Final = 200


class RecordVerifier:
    """Verifies the key records of one domain for one node (see the module invariants)."""

    def __init__(
        self,
        *,
        domain_id: str,
        domain_keys: Callable[[], DomainKeys],
        floor: MetadataVersionFloor,
        peer_floors: FloorSource | None = None,
    ) -> None:
        """`domain_keys`: the node's domain keys and hosts now; `peer_floors`: where to learn
        the floor of a key this HSA has none for (None only outside an HSA)."""
        self._domain_id = domain_id
        self._domain_keys = domain_keys
        self._floor = floor
        self._peer_floors = peer_floors
        self._throttled = ThrottledLog(log)

    def verify(
        self, record: keys_pb2.KeyRecord, key_id: str, *, remember: bool = True
    ) -> tuple[keys_pb2.KeyMetadata, dict[int, bytes]]:
        """Verify a record of `key_id` end to end and against the version floor.

        First the signature: the signer must be a host of this node's verified head and the
        signature must verify under that host's key from the head; then the tokens, the
        metadata and the floor. With `remember` the record becomes the key's floor when it is
        newer. Raises FailedPreconditionError for a record that does not verify (logged at
        WARNING with the reason), UnavailableError when this node may only be behind: the
        record is sealed under a domain key generation newer than it holds, or signed by a
        host it has never seen (it is catching up).
        """
        keys = self._domain_keys()
        try:
            keytokens.verify_key_record_signature(record, self._domain_id, keys.host_keys)
        except UnknownSignerError:
            raise self._unknown_signer(record, key_id, keys) from None
        except BadSignatureError as error:
            raise self._refusal(record, key_id, keys, signature_error=error.message) from None
        try:
            metadata, backing_keys = keytokens.verify_key_record(record, keys.keys, key_id)
            if metadata.domain_id != self._domain_id:
                raise InvalidKeyTokenError()
        except InvalidKeyTokenError:
            raise self._refusal(record, key_id, keys) from None
        if self._peer_floors is not None and self._floor.highest(key_id) is None:
            self._peer_floors.learn([key_id])  # no floor here yet: what do the peers hold?
        try:
            self._floor.admit(
                key_id, int(metadata.metadata_version), metadata_digest(record), remember=remember
            )
        except FailedPreconditionError as error:
            self._throttled.warning(f"refused the stored record of key {key_id}: {error.message}")
            raise
        return metadata, backing_keys

    def _catching_up(
        self, record: keys_pb2.KeyRecord, key_id: str, keys: DomainKeys
    ) -> UnavailableError | None:
        """The error for a record sealed under a generation newer than this node holds."""
        newest = max((t.domain_key_generation for t in record.tokens), default=0)
        if newest <= keys.generation or newest in keys.keys:
            return None
        self._throttled.warning(
            f"the record of key {key_id} is sealed under domain key generation "
            f"{newest}, newer than this HSA holds ({keys.generation}); if no domain "
            "state brings that generation, the coordinator may be compromised"
        )
        return UnavailableError(
            f"key {key_id} is sealed under domain key generation {newest}, newer than "
            f"this HSA holds ({keys.generation}); it is catching up: retry"
        )

    def _unknown_signer(
        self, record: keys_pb2.KeyRecord, key_id: str, keys: DomainKeys
    ) -> UnavailableError | FailedPreconditionError:
        """The error for a record whose signer is not a host of the verified head: refused
        when the signer is a host this node's chain removed, or when there is no signature;
        UNAVAILABLE (catching up) when the record may come from a state this node lacks."""
        signer = record.signer_host_id
        if signer and record.signature and signer not in keys.former_hosts:
            behind = self._catching_up(record, key_id, keys)
            if behind is not None:
                return behind
            self._throttled.warning(
                f"the record of key {key_id} is signed by {signer[:_SHOWN]!r}, which is not a "
                "host of the domain state this HSA holds; if no domain state adds it, the "
                "coordinator may be compromised"
            )
            return UnavailableError(
                f"key {key_id} was written by host {signer[:_SHOWN]!r}, which this HSA does not "
                "know as a host yet; it is catching up: retry"
            )
        if signer in keys.former_hosts:
            why = (
                f"it is signed by {signer}, which the domain removed: no record a removed host "
                "writes is accepted"
            )
        else:
            why = "it is not signed"
        return self._forged(record, key_id, keys, why)

    def _refusal(
        self,
        record: keys_pb2.KeyRecord,
        key_id: str,
        keys: DomainKeys,
        *,
        signature_error: str = "",
    ) -> UnavailableError | FailedPreconditionError:
        behind = self._catching_up(record, key_id, keys)
        if behind is not None:
            return behind
        generations = {t.domain_key_generation for t in record.tokens}
        missing = sorted(g for g in generations if g not in keys.keys)
        if missing and missing[0] < min(keys.keys):
            self._throttled.warning(
                f"the record of key {key_id} needs domain key generation {missing[0]}, which "
                "this HSA no longer holds (the domain retired it before the record was "
                "re-wrapped)"
            )
            return FailedPreconditionError(
                f"key {key_id} is sealed under domain key generation {missing[0]}, which the "
                "domain has retired; it cannot be opened"
            )
        return self._forged(record, key_id, keys, signature_error)

    def _forged(
        self, record: keys_pb2.KeyRecord, key_id: str, keys: DomainKeys, why: str
    ) -> FailedPreconditionError:
        """The refusal of a record that does not verify: every reason in the log (`why`, and
        what else is wrong with it), none to the caller."""
        reason = _diagnose(record, key_id, self._domain_id, keys, why)
        self._throttled.warning(
            f"the stored record of key {key_id} does not verify ({reason}); the coordinator "
            "may be compromised"
        )
        return FailedPreconditionError(
            f"the stored record of key {key_id} does not verify; the coordinator may be compromised"
        )


def _diagnose(
    record: keys_pb2.KeyRecord,
    key_id: str,
    domain_id: str,
    keys: DomainKeys,
    signature_error: str = "",
) -> str:
    """Why a record does not verify, for the log (the caller gets no detail): the signature
    failure, if any, and what else is wrong with the record."""
    reason = _diagnose_content(record, key_id, domain_id, keys)
    if not signature_error:
        return reason
    if reason == "unknown":
        return signature_error
    return f"{reason}; and {signature_error}"


def _diagnose_content(
    record: keys_pb2.KeyRecord, key_id: str, domain_id: str, keys: DomainKeys
) -> str:
    metadata = parse_metadata(record)
    if metadata is None:
        return "its metadata does not parse"
    if metadata.key_id != key_id:
        return f"its metadata names key {metadata.key_id[:_SHOWN]!r}"
    if metadata.domain_id != domain_id:
        return f"its metadata names domain {metadata.domain_id[:_SHOWN]!r}"
    versions = sorted(t.backing_version for t in record.tokens)
    if versions != list(range(1, metadata.current_backing_version + 1)):
        return (
            f"it holds tokens for backing versions {versions[:20]}, not 1.."
            f"{metadata.current_backing_version}"
        )
    for token in record.tokens:
        if token.key_id != key_id:
            return f"a token names key {token.key_id[:_SHOWN]!r}"
        try:
            keytokens.unwrap_backing_key(token, keys.keys, record.metadata, key_id)
        except InvalidKeyTokenError:
            return (
                f"the token of backing version {token.backing_version} (domain key generation "
                f"{token.domain_key_generation}) does not open with these metadata bytes"
            )
    return "unknown"
