"""What every KeyService call body uses to reach a key: the caller's right to the operation,
the key's state, and whether its kind (key spec and usage) allows the operation at all.

Invariants: the policy decides first, before anything about the key is revealed; then its
state; then its kind, so that key material only ever serves the operations of its spec
(`keyspecs`): a symmetric key's 32 bytes are an AES key and nothing else, an HMAC key only
MACs, an asymmetric key only signs or only encrypts as its usage says. A call that asks a key
for what its kind does not do is `InvalidKeyUsageError` (INVALID_ARGUMENT, AWS KMS's
InvalidKeyUsageException) naming what the key is and what the call needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc

from domain_core import ciphertext, granttokens, keyspecs
from domain_core.errors import (
    InvalidGrantTokenError,
    InvalidInputError,
    InvalidKeyTokenError,
    InvalidKeyUsageError,
)
from domain_core.keylifecycle import KeyChange, require_enabled
from domain_core.limits import DEFAULT_LIMITS, MAX_GRANT_TOKEN_BYTES, MAX_GRANT_TOKENS, Limits
from domain_proto import keys_pb2, services_pb2
from hsa_node.keycache import CachedKey, KeyCache
from hsa_node.keycalls import AuditSink, CallFrame, KeyCall, PeerGate
from hsa_node.keywrites import KeyWriter
from hsa_node.node import DomainNode
from hsa_node.quotas import Quotas

__all__ = ["KeyAccess", "describe_kind"]

T = TypeVar("T")


def describe_kind(metadata: keys_pb2.KeyMetadata) -> str:
    """What a key is, in AWS KMS's words: "HMAC_256 (GENERATE_VERIFY_MAC)"."""
    return f"{keyspecs.spec_name(metadata.key_spec)} ({keyspecs.usage_name(metadata.key_usage)})"


class KeyAccess:
    """The state and the helpers the key service's call bodies share (see the module
    invariants); `KeyServiceServicer` is built on it."""

    def __init__(
        self,
        *,
        node: DomainNode,
        cache: KeyCache,
        audit: AuditSink | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        peers: PeerGate | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        """`peers` gates serving on the HSA's peers (floors taken, head confirmed); every HSA
        process has one (None only outside an HSA: benchmarks, in-process tests). `quotas`
        are this process's request-rate buckets (default: the whole quota of `limits`, as
        for a domain of one process)."""
        self._frame = CallFrame(
            node=node, audit=audit, peers=peers, quotas=quotas or Quotas(limits)
        )
        self._domain_id = node.domain_id
        self._cache = cache
        self._records = cache.records
        self._limits = limits
        self._clock = clock
        self._writer = KeyWriter(cache, clock)

    def _run(
        self,
        operation: str,
        context: grpc.ServicerContext,
        request: Any,
        body: Callable[[KeyCall], T],
    ) -> T:
        """Run `body` in the call's frame (`CallFrame.run`), with the request's grant tokens
        (if it has any) on the call for `_authorize`."""
        tokens = getattr(request, "grant_tokens", ())
        if not tokens:
            return self._frame.run(operation, context, body)

        def with_tokens(call: KeyCall) -> T:
            if len(tokens) > MAX_GRANT_TOKENS:
                raise InvalidInputError(
                    f"grant_tokens holds {len(tokens)} tokens; a call takes at most "
                    f"{MAX_GRANT_TOKENS}"
                )
            if any(len(token) > MAX_GRANT_TOKEN_BYTES for token in tokens):
                raise InvalidGrantTokenError()
            call.grant_tokens = tuple(bytes(token) for token in tokens)
            return body(call)

        return self._frame.run(operation, context, with_tokens)

    def _authorize(
        self,
        entry: CachedKey,
        call: KeyCall,
        operation: int,
        context: Mapping[str, str] | None = None,
    ) -> None:
        """The caller may do `operation` with the key in this call's encryption context
        (`context`, default the call's), by the key's policy and grants, and by the grants of
        the call's grant tokens that this HSA has not seen in the key's metadata yet."""
        rules = entry.access
        if call.grant_tokens:
            domain_keys = self._cache.domain_keys().keys
            pending = []
            for token in call.grant_tokens:
                opened = granttokens.open_grant_token(
                    token, domain_id=self._domain_id, domain_keys=domain_keys
                )
                grant = granttokens.pending_grant(opened, entry.metadata)
                if grant is not None:
                    pending.append(grant)
            rules = rules.with_grants(pending)
        rules.require(
            call.principal, operation, entry.key_id, call.context if context is None else context
        )

    def _usable(
        self,
        key_id: str,
        call: KeyCall,
        operation: int,
        *,
        usage: int | None = keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT,
        symmetric: bool | None = True,
        needs: str = "",
        context: Mapping[str, str] | None = None,
    ) -> CachedKey:
        """The key, if the caller may do `operation` with it, it is enabled, and it is of
        `usage` (None: any) and symmetric, or asymmetric, as `symmetric` says (None: either).
        `needs` says what the call needs when the kind is wrong ("an HMAC key"); `context`
        is the encryption context the key's conditions are checked on (default the call's)."""
        entry = self._cache.get(key_id)
        self._authorize(entry, call, operation, context)
        require_enabled(entry.metadata)
        metadata = entry.metadata
        if (
            (usage is not None and metadata.key_usage != usage)
            or (symmetric is True and not keyspecs.is_symmetric(metadata.key_spec))
            or (symmetric is False and not keyspecs.is_asymmetric(metadata.key_spec))
        ):
            raise InvalidKeyUsageError(
                f"key {key_id} is {describe_kind(metadata)}: {call.operation} "
                f"needs {needs or 'a symmetric encryption key (SYMMETRIC_DEFAULT)'}"
            )
        return entry

    def _asymmetric(self, entry: CachedKey) -> keyspecs.AsymmetricKey:
        """The loaded private key of an asymmetric key's current version (parsed once per
        cache entry)."""
        loaded = entry.loaded.get(entry.current_version)
        if loaded is None:
            try:
                loaded = keyspecs.AsymmetricKey.load(
                    entry.metadata.key_spec,
                    entry.metadata.key_usage,
                    entry.backing_keys[entry.current_version],
                )
            except ValueError:
                # Sealed and signed by a member host, yet not a key of its spec: a faulty
                # host wrote it. Nothing here can use it.
                raise InvalidKeyTokenError(
                    f"the record of key {entry.key_id} holds no usable "
                    f"{describe_kind(entry.metadata)} key; the host that wrote it is faulty"
                ) from None
            entry.loaded[entry.current_version] = loaded
        return loaded

    def _context(self, call: KeyCall, values: Mapping[str, str]) -> bytes:
        """The request's encryption context, recorded for the audit; its canonical encoding
        (which checks it), encoded once per call."""
        context = dict(values)
        call.context = context
        return ciphertext.encode_context(context, self._limits)

    def _key_id(self, call: KeyCall, value: str, what: str = "key_id") -> str:
        try:
            key_id = ciphertext.validate_key_id(value)
        except InvalidInputError as error:
            raise InvalidInputError(f"{what}: {error.message}") from None
        call.key_id = key_id
        return key_id

    def _byte_count(self, value: int, default: int | None) -> int:
        maximum = self._limits.max_random_bytes
        count = value or (default or 0)
        if not 1 <= count <= maximum:
            raise InvalidInputError(f"number_of_bytes must be between 1 and {maximum}, not {value}")
        return count

    def _seal(self, entry: CachedKey, plaintext: bytes, encoded_context: bytes) -> bytes:
        version = entry.current_version
        return ciphertext.encrypt_encoded(
            entry.backing_keys[version],
            entry.key_id,
            version,
            plaintext,
            encoded_context,
            limits=self._limits,
        )

    def _change(
        self,
        operation: str,
        key_id_value: str,
        context: grpc.ServicerContext,
        change: KeyChange,
        detail: Callable[[keys_pb2.KeyMetadata], str] = lambda _: "",
    ) -> services_pb2.KeyMetadataResponse:
        """Read the key fresh, check ADMIN, apply `change` and write it back
        (`KeyWriter.change`); `detail` adds to the audit record of a change."""

        def body(call: KeyCall) -> services_pb2.KeyMetadataResponse:
            key_id = self._key_id(call, key_id_value)
            self._frame.require_head_confirmed(operation)
            metadata, changed = self._writer.change(operation, key_id, change, call.principal)
            if not changed:
                call.detail = "no change"
            else:
                call.detail = f"metadata version {metadata.metadata_version}" + (
                    f", {extra}" if (extra := detail(metadata)) else ""
                )
            return services_pb2.KeyMetadataResponse(metadata=metadata)

        return self._frame.run(operation, context, body)
