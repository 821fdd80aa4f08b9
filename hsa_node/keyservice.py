"""The KeyService of an HSA: customer keys for applications (docs/runtime.md, "The key service").

Applications call it over mutual TLS with client certificates; the principal is the caller's
SPIFFE URI (`spiffe://<domain>/client/<name>`). Every call runs in one frame
(`keycalls.CallFrame`: the caller, the serving gates, the audit record). Keys are read through
`keycache.KeyCache` (verified records from the untrusted coordinator) and written with a
compare-and-swap at the coordinator (`keywrites.KeyWriter`). What a key's state allows and what
each change does are the rules of `domain_core.keylifecycle`. This module adapts requests to
them and their results to responses.

Invariants:
- every call is from a `client` identity of this domain, else PERMISSION_DENIED; every use of
  a key is decided by `policy.require` on the key's verified policy before anything else about
  the key is revealed (then its state: a disabled or pending-deletion key is
  FAILED_PRECONDITION);
- every call appends one audit record (principal, operation, key id, encryption context,
  result: "ok" or the status name, and the error message) before it answers, and fails if the
  audit log cannot be written (`keycalls`); nothing secret is ever audited, logged or put in
  an error message (plaintexts, data keys and backing keys leave only in response fields);
- any ciphertext that does not open (malformed, truncated, tampered, foreign, wrong context,
  unknown backing version) is INVALID_ARGUMENT "invalid ciphertext", with no more detail;
  a blob that names a key this domain does not hold is NOT_FOUND, as a key id given
  explicitly is (the key id is public: it is in the blob's header);
- a blob that names a newer backing version than the cached key (rotated through another
  HSA within the cache's TTL) makes an authorised caller's call re-read the key first, so a
  valid ciphertext is never reported invalid for being too new;
- ReEncrypt opens and seals inside the HSA: the plaintext never leaves it;
- every call counts against its caller's request-rate quota for its class of operation
  (`hsa_node.quotas`; CreateKey's bucket is per process, `Limits.create_key_per_second`):
  beyond it, RESOURCE_EXHAUSTED with a retry delay before anything is done; the coordinator
  caps the keys one principal created (`Limits.max_keys_per_principal`, RESOURCE_EXHAUSTED
  too);
- no key call is served before the HSA took the key metadata floors of a peer, and no key
  administration (CreateKey and the metadata changes) while no peer confirmed its head within
  the bound (`PeerGate`, `hsa_node.peering`): both UNAVAILABLE with the reason;
- a metadata change reads the key from the coordinator (not the cache), builds the next
  metadata (`metadata_version` + 1), re-seals every token over the new metadata bytes and
  writes with a compare-and-swap on the revision it read (retried up to 3 times on a
  conflict); it is acknowledged only once the coordinator stored it, and a write that fails
  says "nothing applied" only when nothing was (`keywrites`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import grpc

from domain_core import access, ciphertext, crypto, keylifecycle, keytags
from domain_core.errors import (
    FailedPreconditionError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
    UnavailableError,
)
from domain_core.keylifecycle import iso_date, require_enabled
from domain_core.limits import DEFAULT_LIMITS, MAX_LIST_KEYS_LIMIT, MAX_TAGS_PER_KEY, Limits
from domain_edge.throttled_log import ThrottledLog
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node.grant_calls import GrantCalls
from hsa_node.keycache import CachedKey, KeyCache
from hsa_node.keycalls import AuditSink, KeyCall, PeerGate
from hsa_node.keyimport_calls import ImportCalls
from hsa_node.keyrecords import CoordinatorUnreachableError, parse_metadata
from hsa_node.keysession import KeySessions
from hsa_node.keyspec_calls import SYMMETRIC_OR_RSA, SpecCalls
from hsa_node.node import DomainNode
from hsa_node.quotas import Quotas

__all__ = ["DEFAULT_DATA_KEY_BYTES", "KeyServiceServicer"]

log = logging.getLogger(__name__)

DEFAULT_DATA_KEY_BYTES: Final = 32
DEFAULT_LIST_LIMIT: Final = 100
DEFAULT_TAG_PAGE: Final = 50


# --- the servicer --------------------------------------------------------------------------


class KeyServiceServicer(SpecCalls, ImportCalls, GrantCalls, services_pb2_grpc.KeyServiceServicer):
    """Customer-key operations for client principals (see the module invariants)."""

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
        """See `KeyAccess`."""
        super().__init__(
            node=node,
            cache=cache,
            audit=audit,
            limits=limits,
            clock=clock,
            peers=peers,
            quotas=quotas,
        )
        self._throttled = ThrottledLog(log)
        self._sessions = KeySessions(
            self, self._frame.principal, limits, fresh=self._cache.is_fresh
        )

    def close(self) -> None:
        """Stop the sessions' workers (after the server stopped)."""
        self._sessions.close()

    def Session(
        self,
        request_iterator: Iterator[services_pb2.SessionRequests],
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> None:
        """Data-plane calls over one stream, each served as its unary call (`keysession`);
        non-blocking: a reader thread of the session's own serves it."""
        self._sessions.serve(request_iterator, context, send_response_callback)

    Session.experimental_non_blocking = True  # type: ignore[attr-defined]
    Session.experimental_thread_pool = None  # type: ignore[attr-defined]

    # --- helpers of the call bodies ------------------------------------------------------

    def _open(
        self,
        call: KeyCall,
        blob: bytes,
        encoded_context: bytes,
        operation: int,
        header: ciphertext.CiphertextHeader | None = None,
        context: Mapping[str, str] | None = None,
    ) -> tuple[CachedKey, bytes]:
        """Authorise and open a ciphertext blob: (its key, the plaintext). `header`, if given,
        is what `parse_header` returned for `blob`; `context` is the blob's encryption context
        for the key's conditions (default the call's)."""
        if header is None:
            header = ciphertext.parse_header(blob, self._limits)
        call.key_id = header.key_id
        entry = self._usable(header.key_id, call, operation, context=context)
        if header.backing_version > entry.current_version:
            # Rotated through another HSA within the cache's TTL? Only an authorised caller
            # gets this far, so a made-up version cannot turn calls into coordinator calls
            # for anyone else.
            entry = self._cache.get_newer(header.key_id, header.backing_version)
            self._authorize(entry, call, operation, context)
            require_enabled(entry.metadata)
        backing_key = entry.backing_keys.get(header.backing_version)
        if backing_key is None:
            raise InvalidCiphertextError()
        return entry, ciphertext.decrypt_encoded(backing_key, blob, encoded_context, header)

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

    # --- data plane ----------------------------------------------------------------------

    def Encrypt(
        self, request: services_pb2.EncryptRequest, context: grpc.ServicerContext
    ) -> services_pb2.EncryptResponse:
        """Seal up to 4096 bytes under the key's current backing version (or, with an RSA
        algorithm, up to what RSA-OAEP allows under an RSA key: `SpecCalls`)."""

        def body(call: KeyCall) -> services_pb2.EncryptResponse:
            if request.encryption_algorithm != keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT:
                return self._encrypt_rsa(call, request)
            key_id = self._key_id(call, request.key_id)
            encoded_context = self._context(call, request.encryption_context)
            if len(request.plaintext) > self._limits.max_plaintext_bytes:
                raise LimitExceededError(
                    f"plaintext is {len(request.plaintext)} bytes; the limit is "
                    f"{self._limits.max_plaintext_bytes} (use envelope encryption with "
                    "GenerateDataKey for more)"
                )
            entry = self._usable(
                key_id, call, keys_pb2.KEY_OPERATION_ENCRYPT, needs=SYMMETRIC_OR_RSA
            )
            blob = self._seal(entry, request.plaintext, encoded_context)
            call.detail = f"backing version {entry.current_version}"
            return services_pb2.EncryptResponse(
                key_id=key_id, ciphertext_blob=blob, backing_version=entry.current_version
            )

        return self._run("Encrypt", context, request, body)

    def Decrypt(
        self, request: services_pb2.DecryptRequest, context: grpc.ServicerContext
    ) -> services_pb2.DecryptResponse:
        """Open a blob; the key comes from its header (`key_id`, if given, must match). An
        RSA-OAEP blob (an RSA algorithm given) is opened by `SpecCalls`."""

        def body(call: KeyCall) -> services_pb2.DecryptResponse:
            if request.encryption_algorithm != keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT:
                return self._decrypt_rsa(call, request)
            encoded_context = self._context(call, request.encryption_context)
            expected = ""
            if request.key_id:
                expected = ciphertext.validate_key_id(request.key_id)
            header = ciphertext.parse_header(request.ciphertext_blob, self._limits)
            call.key_id = header.key_id
            if expected and expected != header.key_id:
                raise InvalidInputError(
                    f"the ciphertext was made under key {header.key_id}, not under key "
                    f"{expected}; call Decrypt without key_id or with the key it names"
                )
            entry, plaintext = self._open(
                call,
                request.ciphertext_blob,
                encoded_context,
                keys_pb2.KEY_OPERATION_DECRYPT,
                header,
            )
            return services_pb2.DecryptResponse(key_id=entry.key_id, plaintext=plaintext)

        return self._run("Decrypt", context, request, body)

    def ReEncrypt(
        self, request: services_pb2.ReEncryptRequest, context: grpc.ServicerContext
    ) -> services_pb2.ReEncryptResponse:
        """Open a blob and seal its plaintext under another key or context, inside the HSA."""

        def body(call: KeyCall) -> services_pb2.ReEncryptResponse:
            source_context = dict(request.source_encryption_context)
            destination_context = dict(request.destination_encryption_context)
            call.context = {f"source:{k}": v for k, v in source_context.items()} | {
                f"destination:{k}": v for k, v in destination_context.items()
            }
            encoded_source = ciphertext.encode_context(source_context, self._limits)
            encoded_destination = ciphertext.encode_context(destination_context, self._limits)
            destination_id = ciphertext.validate_key_id(request.destination_key_id)
            source, plaintext = self._open(
                call,
                request.ciphertext_blob,
                encoded_source,
                keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
                context=source_context,
            )
            call.key_id = destination_id
            destination = self._usable(
                destination_id,
                call,
                keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
                context=destination_context,
            )
            blob = self._seal(destination, plaintext, encoded_destination)
            call.detail = (
                f"from key {source.key_id} to backing version {destination.current_version}"
            )
            return services_pb2.ReEncryptResponse(
                source_key_id=source.key_id, key_id=destination_id, ciphertext_blob=blob
            )

        return self._run("ReEncrypt", context, request, body)

    def _generate_data_key(
        self,
        request: services_pb2.GenerateDataKeyRequest,
        call: KeyCall,
        *,
        with_plaintext: bool,
    ) -> services_pb2.GenerateDataKeyResponse:
        key_id = self._key_id(call, request.key_id)
        encoded_context = self._context(call, request.encryption_context)
        count = self._byte_count(request.number_of_bytes, DEFAULT_DATA_KEY_BYTES)
        entry = self._usable(key_id, call, keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY)
        data_key = crypto.random_bytes(count)
        blob = self._seal(entry, data_key, encoded_context)
        call.detail = f"{count} bytes, backing version {entry.current_version}"
        return services_pb2.GenerateDataKeyResponse(
            key_id=key_id, plaintext=data_key if with_plaintext else b"", ciphertext_blob=blob
        )

    def GenerateDataKey(
        self, request: services_pb2.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateDataKeyResponse:
        """A fresh data key and its copy encrypted under the key (envelope encryption)."""
        return self._run(
            "GenerateDataKey",
            context,
            request,
            lambda call: self._generate_data_key(request, call, with_plaintext=True),
        )

    def GenerateDataKeyWithoutPlaintext(
        self, request: services_pb2.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateDataKeyResponse:
        """As GenerateDataKey, but only the encrypted copy is returned."""
        return self._run(
            "GenerateDataKeyWithoutPlaintext",
            context,
            request,
            lambda call: self._generate_data_key(request, call, with_plaintext=False),
        )

    def GenerateRandom(
        self, request: services_pb2.GenerateRandomRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateRandomResponse:
        """1 to 1024 bytes from the OS CSPRNG."""

        def body(call: KeyCall) -> services_pb2.GenerateRandomResponse:
            count = self._byte_count(request.number_of_bytes, None)
            call.detail = f"{count} bytes"
            return services_pb2.GenerateRandomResponse(random=crypto.random_bytes(count))

        return self._run("GenerateRandom", context, request, body)

    # --- reading keys --------------------------------------------------------------------

    def DescribeKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """The key's verified metadata (any state)."""

        def body(call: KeyCall) -> services_pb2.KeyMetadataResponse:
            key_id = self._key_id(call, request.key_id)
            entry = self._cache.get(key_id)
            self._authorize(entry, call, keys_pb2.KEY_OPERATION_DESCRIBE)
            return services_pb2.KeyMetadataResponse(metadata=entry.metadata)

        return self._run("DescribeKey", context, request, body)

    def ListKeys(
        self, request: services_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeysResponse:
        """One page of the keys the caller may describe, each verified.

        A page may hold fewer keys than `limit` (even none) while `next_page_token` is set:
        keys the caller may not describe are left out.
        """

        def body(call: KeyCall) -> services_pb2.ListKeysResponse:
            limit = request.limit or DEFAULT_LIST_LIMIT
            if limit > MAX_LIST_KEYS_LIMIT:
                raise InvalidInputError(
                    f"limit {limit} is above the maximum of {MAX_LIST_KEYS_LIMIT}"
                )
            if request.page_token:
                try:
                    ciphertext.validate_key_id(request.page_token)
                except InvalidInputError:
                    raise InvalidInputError(
                        "page_token is not a token ListKeys returned; start without one"
                    ) from None
            try:
                records, next_token = self._records.list(limit, request.page_token)
            except CoordinatorUnreachableError:
                raise UnavailableError(
                    "the coordinator is unreachable; ListKeys needs it: retry"
                ) from None
            response = services_pb2.ListKeysResponse(next_page_token=next_token)
            refused = 0
            for record in records:
                # Unverified: only to skip keys the caller may not see before verifying.
                metadata = parse_metadata(record)
                if metadata is None:
                    refused += 1
                    self._throttled.warning(
                        "the coordinator listed a key record whose metadata does not parse; "
                        "the coordinator may be compromised"
                    )
                    continue
                if not access.access_rules(metadata).allows(
                    call.principal, keys_pb2.KEY_OPERATION_DESCRIBE, {}
                ):
                    continue
                try:
                    verified, _ = self._cache.verify(record, metadata.key_id)
                except (FailedPreconditionError, UnavailableError):
                    refused += 1  # logged by verify
                    continue
                response.keys.append(verified)
            call.detail = f"{len(response.keys)} keys" + (
                f"; {refused} records did not verify" if refused else ""
            )
            return response

        return self._run("ListKeys", context, request, body)

    # --- changing keys -------------------------------------------------------------------

    def CreateKey(
        self, request: services_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """A new key of the asked key spec and usage (default: symmetric, with a fresh 256-bit
        backing key), stored at the coordinator first."""

        def body(call: KeyCall) -> services_pb2.KeyMetadataResponse:
            key = keylifecycle.new_key(
                description=request.description,
                key_policy=request.policy if request.HasField("policy") else None,
                enable_rotation=request.enable_rotation,
                rotation_period_days=request.rotation_period_days,
                key_spec=request.key_spec,
                key_usage=request.key_usage,
                origin=request.origin,
                tags=dict(request.tags),
                creator=call.principal,
                domain_id=self._domain_id,
                limits=self._limits,
            )
            self._frame.require_head_confirmed("CreateKey")
            idempotent = bool(request.idempotency_key)
            key_id = (
                ciphertext.idempotent_key_id(
                    self._domain_id, call.principal, request.idempotency_key
                )
                if idempotent
                else ciphertext.new_key_id()
            )
            call.key_id = key_id
            metadata = key.metadata(key_id, int(self._clock()))
            created = self._writer.create(metadata, call.principal, idempotent=idempotent)
            return services_pb2.KeyMetadataResponse(metadata=created)

        return self._run("CreateKey", context, request, body)

    def RotateKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """A new backing key version; ciphertexts under older versions keep decrypting."""
        return self._change(
            "RotateKey",
            request.key_id,
            context,
            keylifecycle.rotate,
            lambda m: f"backing version {m.current_backing_version}",
        )

    def PutKeyPolicy(
        self, request: services_pb2.PutKeyPolicyRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Replace the key's policy (validated: it must give someone ADMIN)."""
        if not request.policy.grants:
            new_policy: keys_pb2.KeyPolicy | None = None
        else:
            new_policy = request.policy

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            return keylifecycle.put_policy(
                metadata, new_policy, domain_id=self._domain_id, limits=self._limits
            )

        return self._change("PutKeyPolicy", request.key_id, context, change)

    def TagResource(
        self, request: services_pb2.TagResourceRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Add tags to the key (or replace the values of tag keys it has)."""
        tags = dict(request.tags)
        return self._change(
            "TagResource",
            request.key_id,
            context,
            lambda metadata, keys, now: keytags.tag(metadata, tags),
            lambda m: f"{len(tags)} tags given, {len(m.tags)} held",
        )

    def UntagResource(
        self, request: services_pb2.UntagResourceRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Remove tags from the key by their keys."""
        tag_keys = list(request.tag_keys)
        return self._change(
            "UntagResource",
            request.key_id,
            context,
            lambda metadata, keys, now: keytags.untag(metadata, tag_keys),
            lambda m: f"{len(m.tags)} tags held",
        )

    def ListResourceTags(
        self, request: services_pb2.ListResourceTagsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListResourceTagsResponse:
        """One page of the key's tags, by tag key (the caller may describe the key)."""

        def body(call: KeyCall) -> services_pb2.ListResourceTagsResponse:
            key_id = self._key_id(call, request.key_id)
            limit = request.limit or DEFAULT_TAG_PAGE
            if limit > MAX_TAGS_PER_KEY:
                raise InvalidInputError(f"limit {limit} is above the maximum of {MAX_TAGS_PER_KEY}")
            entry = self._cache.get(key_id)
            self._authorize(entry, call, keys_pb2.KEY_OPERATION_DESCRIBE, {})
            names = sorted(entry.metadata.tags)
            start = 0
            if request.page_token:
                if request.page_token not in entry.metadata.tags:
                    raise InvalidInputError(
                        "page_token is not a token ListResourceTags returned; start without one"
                    )
                start = names.index(request.page_token)
            page = names[start : start + limit]
            following = names[start + limit] if start + limit < len(names) else ""
            return services_pb2.ListResourceTagsResponse(
                tags=[services_pb2.Tag(key=n, value=entry.metadata.tags[n]) for n in page],
                next_page_token=following,
            )

        return self._run("ListResourceTags", context, request, body)

    def EnableKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """DISABLED -> ENABLED (an enabled key stays as it is)."""
        return self._set_state("EnableKey", request.key_id, context, keys_pb2.KEY_STATE_ENABLED)

    def DisableKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """ENABLED -> DISABLED: no cryptographic use until enabled again."""
        return self._set_state("DisableKey", request.key_id, context, keys_pb2.KEY_STATE_DISABLED)

    def _set_state(
        self,
        operation: str,
        key_id: str,
        context: grpc.ServicerContext,
        target: keys_pb2.KeyState,
    ) -> services_pb2.KeyMetadataResponse:
        """Flip a key between ENABLED and DISABLED; a key pending deletion must be cancelled."""

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            return keylifecycle.set_state(metadata, target)

        return self._change(operation, key_id, context, change)

    def ScheduleKeyDeletion(
        self, request: services_pb2.ScheduleKeyDeletionRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """PENDING_DELETION for 7 to 30 days (default 30); then the key is deleted for good."""
        days = request.pending_window_days or keylifecycle.DEFAULT_DELETION_WINDOW_DAYS

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            return keylifecycle.schedule_deletion(metadata, days, now)

        return self._change(
            "ScheduleKeyDeletion",
            request.key_id,
            context,
            change,
            lambda m: f"deletion on {iso_date(m.deletion_at)}",
        )

    def CancelKeyDeletion(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """PENDING_DELETION -> DISABLED (as KMS): enable it to use it again."""
        return self._change(
            "CancelKeyDeletion",
            request.key_id,
            context,
            lambda metadata, keys, now: keylifecycle.cancel_deletion(metadata),
        )
