"""Writing customer keys at the coordinator: a new key, and a change by compare-and-swap.

The key service (`hsa_node.keyservice`) decides what to write with the rules of
`domain_core.keylifecycle`; a `KeyWriter` writes it through the key cache, which seals and
signs the record (`KeyCache.store`), and says what a failed write means.

Invariants:
- a change reads the key from the coordinator (not the cache), checks ADMIN for the caller on
  the policy it read, builds the next metadata (`keylifecycle.apply_change`: `metadata_version`
  + 1, nothing written when nothing changes), re-seals every token over the new metadata bytes
  and writes with a compare-and-swap on the revision it read; a lost compare-and-swap reads
  again, at most `CONFLICT_RETRIES` times, then CONFLICT;
- a write is acknowledged only once the coordinator stored it;
- a failure is `NotAppliedError` (UNAVAILABLE, "nothing applied" on the wire) only when nothing
  was written: the request to the coordinator never left, or only the read before the write
  failed. When the write may have reached the coordinator (a deadline, a connection lost
  mid-call) it is a plain UNAVAILABLE: the outcome is unknown and the caller must look.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from domain_core import keylifecycle, keyspecs
from domain_core.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    NotAppliedError,
    NotFoundError,
    UnavailableError,
)
from domain_core.keylifecycle import KeyChange
from domain_proto import keys_pb2
from hsa_node.keycache import CachedKey, KeyCache
from hsa_node.keyrecords import CoordinatorNotReachedError, CoordinatorUnreachableError

__all__ = ["CONFLICT_RETRIES", "KeyWriter"]

# The key service's lines keep the logger name they have always had.
log = logging.getLogger("hsa_node.keyservice")

CONFLICT_RETRIES: Final = 3


class KeyWriter:
    """Creates and changes keys at the coordinator (see the module invariants)."""

    def __init__(self, cache: KeyCache, clock: Callable[[], float] = time.time) -> None:
        """`clock`: the time a change is made at (unix seconds), for dates it sets."""
        self._cache = cache
        self._clock = clock

    def create(
        self, metadata: keys_pb2.KeyMetadata, principal: str, *, idempotent: bool = False
    ) -> keys_pb2.KeyMetadata:
        """Store a new key (its first metadata) with fresh material of its key spec (a 256-bit
        backing key for a symmetric key; none for a key of origin EXTERNAL, whose material
        is imported later); its metadata.

        With `idempotent` (the key id was derived from the caller's idempotency key), a key
        that exists already under that id is the one an earlier attempt of this very creation
        made: its metadata now is the answer, and nothing new is stored.
        """
        try:
            material = (
                {}
                if metadata.origin == keys_pb2.KEY_ORIGIN_EXTERNAL
                else {1: keyspecs.new_material(metadata.key_spec)}
            )
            entry = self._cache.store(metadata, material, 0)
        except AlreadyExistsError:
            if not idempotent:
                raise
            return self._created_before(metadata.key_id, principal)
        except CoordinatorNotReachedError:
            raise NotAppliedError(
                "the coordinator is unreachable; CreateKey needs it and created nothing: retry"
            ) from None
        except CoordinatorUnreachableError:
            raise UnavailableError(
                "the coordinator did not confirm that it stored the new key (it may have): "
                "look for it (ListKeys) before creating another"
            ) from None
        log.info("key %s created by %s", entry.key_id, principal)
        return entry.metadata

    def _created_before(self, key_id: str, principal: str) -> keys_pb2.KeyMetadata:
        """The key an earlier attempt of an idempotent CreateKey made, as it is now (read
        fresh and verified); FailedPreconditionError if it was deleted since."""
        try:
            entry = self._cache.get(key_id, fresh=True)
        except NotFoundError:
            raise FailedPreconditionError(
                f"this idempotency key created key {key_id} before, which was deleted since: "
                "use a new idempotency key to create another"
            ) from None
        except CoordinatorUnreachableError:
            raise UnavailableError(
                "the coordinator is unreachable; the key this idempotency key names exists, "
                "but cannot be read now: retry with the same idempotency key"
            ) from None
        if entry.metadata.creator != principal:  # the id binds the principal: a faulty HSA's
            raise FailedPreconditionError(
                f"key {key_id} was not created by you; use another idempotency key"
            )
        log.info("key %s: a retried CreateKey by %s, created before", key_id, principal)
        return entry.metadata

    def change(
        self,
        operation: str,
        key_id: str,
        change: KeyChange,
        principal: str,
        authorize: Callable[[CachedKey], None] | None = None,
    ) -> tuple[keys_pb2.KeyMetadata, bool]:
        """Read the key fresh, check that `principal` may administer it (or what `authorize`
        checks instead), apply `change` and write it back with a compare-and-swap (re-read and
        retry on a conflict).

        The key's metadata afterwards, and whether it changed (False: `change` had nothing
        to do, and nothing was written).
        """
        for _ in range(1 + CONFLICT_RETRIES):
            try:
                entry = self._cache.get(key_id, fresh=True)
            except CoordinatorUnreachableError:
                # Only a read failed (any earlier write of this call lost its
                # compare-and-swap): nothing changed.
                raise NotAppliedError(
                    f"the coordinator is unreachable; {operation} needs it and changed "
                    "nothing: retry"
                ) from None
            if authorize is None:
                entry.access.require(principal, keys_pb2.KEY_OPERATION_ADMIN, entry.key_id, {})
            else:
                authorize(entry)
            changed = keylifecycle.apply_change(
                entry.metadata, entry.backing_keys, change, int(self._clock())
            )
            if changed is None:
                return entry.metadata, False
            metadata, backing_keys = changed
            try:
                stored = self._cache.store(metadata, backing_keys, entry.revision)
            except ConflictError:
                log.info("%s of key %s lost a compare-and-swap; re-reading", operation, key_id)
                continue
            except NotFoundError:
                raise NotFoundError(f"key {key_id} does not exist") from None
            except CoordinatorNotReachedError:
                raise NotAppliedError(
                    f"the coordinator is unreachable; {operation} needs it and changed "
                    "nothing: retry"
                ) from None
            except CoordinatorUnreachableError:
                raise UnavailableError(
                    f"the coordinator did not confirm that it stored {operation} of key "
                    f"{key_id} (it may have): describe the key before trying again"
                ) from None
            log.info("%s of key %s by %s", operation, key_id, principal)
            return stored.metadata, True
        raise ConflictError(
            f"key {key_id} changed {1 + CONFLICT_RETRIES} times while {operation} ran; retry"
        )
