"""The KeyService of an HSA: customer keys for applications, as DESIGN.md "Keys for applications".

Applications call it over mutual TLS with client certificates; the principal is the caller's
SPIFFE URI (`spiffe://<domain>/client/<name>`). Keys are read through `keycache.KeyCache`
(verified records from the untrusted coordinator) and written with a compare-and-swap at the
coordinator.

Invariants:
- every call is from a `client` identity of this domain, else PERMISSION_DENIED; every use of
  a key is decided by `policy.require` on the key's verified policy before anything else about
  the key is revealed (then its state: a disabled or pending-deletion key is
  FAILED_PRECONDITION);
- every call appends one audit record (principal, operation, key id, encryption context,
  result: "ok" or the status name, and the error message) before it answers, and fails if the
  audit log cannot be written; nothing secret is ever audited, logged or put in an error
  message (plaintexts, data keys and backing keys leave only in response fields);
- any ciphertext that does not open (malformed, truncated, tampered, foreign, wrong context,
  unknown backing version) is INVALID_ARGUMENT "invalid ciphertext", with no more detail;
  a blob that names a key this domain does not hold is NOT_FOUND, as a key id given
  explicitly is (the key id is public: it is in the blob's header);
- a blob that names a newer backing version than the cached key (rotated through another
  HSA within the cache's TTL) makes an authorised caller's call re-read the key first, so a
  valid ciphertext is never reported invalid for being too new;
- ReEncrypt opens and seals inside the HSA: the plaintext never leaves it;
- CreateKey is rate limited per principal on each HSA process (a token bucket,
  `Limits.create_key_per_second` and `create_key_burst`): beyond it, RESOURCE_EXHAUSTED
  before anything is created; the coordinator caps the keys one principal created
  (`Limits.max_keys_per_principal`, RESOURCE_EXHAUSTED too);
- no key call is served before the HSA took the key metadata floors of a peer, and no key
  administration (CreateKey and the metadata changes) while no peer confirmed its head within
  the bound (`PeerGate`, `hsa_node.peering`): both UNAVAILABLE with the reason;
- a metadata change reads the key from the coordinator (not the cache), builds the next
  metadata (`metadata_version` + 1), re-seals every token over the new metadata bytes and
  writes with a compare-and-swap on the revision it read (retried up to 3 times on a
  conflict); it is acknowledged only once the coordinator stored it;
- a write (CreateKey, a metadata change) that fails because the coordinator cannot be reached
  is `NotAppliedError` (UNAVAILABLE, marked "nothing applied" on the wire) only when nothing
  was written: the request to the coordinator never left, or only the read before the write
  failed. When the write may have reached the coordinator (a deadline, a connection lost
  mid-call) it is a plain UNAVAILABLE: the outcome is unknown and the caller must look.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import grpc

from domain_core import ciphertext, crypto, policy
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    HsmDomainError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
    NotAppliedError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    status_for,
)
from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge import transport
from domain_edge.rate_limit import RateLimiter
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc
from hsa_node._logging import ThrottledLog
from hsa_node.keycache import (
    CachedKey,
    CoordinatorNotReachedError,
    CoordinatorUnreachableError,
    KeyCache,
    iso_date,
    parse_metadata,
)
from hsa_node.node import DomainNode

__all__ = [
    "CONFLICT_RETRIES",
    "DEFAULT_DATA_KEY_BYTES",
    "DEFAULT_DELETION_WINDOW_DAYS",
    "DEFAULT_ROTATION_PERIOD_DAYS",
    "MAX_BACKING_VERSIONS",
    "AuditSink",
    "KeyServiceServicer",
    "PeerGate",
    "require_enabled",
    "rotate_backing_key",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DAY_SECONDS: Final = 86_400
DEFAULT_ROTATION_PERIOD_DAYS: Final = 365
MIN_ROTATION_PERIOD_DAYS: Final = 90
MAX_ROTATION_PERIOD_DAYS: Final = 2560
DEFAULT_DELETION_WINDOW_DAYS: Final = 30
MIN_DELETION_WINDOW_DAYS: Final = 7
MAX_DELETION_WINDOW_DAYS: Final = 30
DEFAULT_DATA_KEY_BYTES: Final = 32
DEFAULT_LIST_LIMIT: Final = 100
MAX_LIST_LIMIT: Final = 1000
CONFLICT_RETRIES: Final = 3
# The coordinator stores at most 4096 tokens per key; stay well below.
MAX_BACKING_VERSIONS: Final = 1000


class PeerGate(Protocol):
    """What the key service asks of the HSA's peering (`hsa_node.peering`) before it serves."""

    def require_ready(self) -> None:
        """UnavailableError while this HSA has not taken a peer's key metadata floors."""

    def require_head_confirmed(self, operation: str) -> None:
        """UnavailableError when no peer confirmed this HSA's head within the bound."""


class AuditSink(Protocol):
    """Where audit records go (`domain_edge.audit.AuditLog`)."""

    def append(
        self,
        *,
        principal: str,
        operation: str,
        key_id: str = "",
        encryption_context: Mapping[str, str] | None = None,
        result: str = "ok",
        detail: str = "",
    ) -> int: ...


@dataclass
class _Call:
    """What one call's audit record says; filled in as the call learns it."""

    operation: str
    principal: str = ""
    key_id: str = ""
    context: dict[str, str] = field(default_factory=dict)
    detail: str = ""


# --- key state and metadata changes (shared with the background maintenance) --------------


def require_enabled(metadata: keys_pb2.KeyMetadata) -> None:
    """FailedPreconditionError unless the key may be used (ENABLED)."""
    key_id = metadata.key_id
    if metadata.state == keys_pb2.KEY_STATE_ENABLED:
        return
    if metadata.state == keys_pb2.KEY_STATE_DISABLED:
        raise FailedPreconditionError(f"key {key_id} is disabled; enable it with EnableKey")
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(
            f"key {key_id} is pending deletion (deletion on {iso_date(metadata.deletion_at)}); "
            "cancel the deletion with CancelKeyDeletion to use it again"
        )
    raise FailedPreconditionError(f"key {key_id} is in an unknown state ({int(metadata.state)})")


def rotate_backing_key(
    metadata: keys_pb2.KeyMetadata,
    backing_keys: dict[int, bytes],
    now: int,
    *,
    automatic: bool = False,
) -> None:
    """Add a fresh backing key version (it becomes current); old versions keep decrypting.

    An automatic rotation also moves the next rotation date one period on; an on-demand one
    leaves the schedule alone (as KMS).
    """
    require_enabled(metadata)
    current = int(metadata.current_backing_version)
    if current >= MAX_BACKING_VERSIONS:
        raise FailedPreconditionError(
            f"key {metadata.key_id} has {current} backing key versions, the most a key may "
            "hold; create a new key and re-encrypt to it"
        )
    backing_keys[current + 1] = crypto.new_aes_key()
    metadata.current_backing_version = current + 1
    if automatic and metadata.rotation.enabled:
        metadata.rotation.next_rotation_at = now + metadata.rotation.period_days * DAY_SECONDS


def _pending_deletion_message(metadata: keys_pb2.KeyMetadata, what: str) -> str:
    return (
        f"key {metadata.key_id} is pending deletion (deletion on "
        f"{iso_date(metadata.deletion_at)}); {what}"
    )


# --- the servicer --------------------------------------------------------------------------


class KeyServiceServicer(services_pb2_grpc.KeyServiceServicer):
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
    ) -> None:
        """`peers` gates serving on the HSA's peers (floors taken, head confirmed); every HSA
        process has one (None only outside an HSA: benchmarks, in-process tests)."""
        self._node = node
        self._domain_id = node.domain_id
        self._cache = cache
        self._records = cache.records
        self._audit = audit
        self._peers = peers
        self._limits = limits
        self._clock = clock
        self._throttled = ThrottledLog(log)
        self._create_limiter = RateLimiter(limits.create_key_per_second, limits.create_key_burst)

    # --- the frame of every call ---------------------------------------------------------

    def _principal(self, context: grpc.ServicerContext) -> str:
        spiffe = transport.require_caller_spiffe(context, "client")
        if spiffe.domain != self._domain_id:
            raise PermissionDeniedError(
                f"{spiffe.uri} belongs to another trust domain than {self._domain_id}"
            )
        return spiffe.uri

    def _run(self, operation: str, context: grpc.ServicerContext, body: Callable[[_Call], T]) -> T:
        """Authenticate, run `body`, audit the outcome; errors propagate (mapped by the
        transport's interceptor)."""
        call = _Call(operation)
        try:
            call.principal = self._principal(context)
            if not self._node.serving:
                raise UnavailableError(
                    f"{self._node.host_id} is not serving keys (not a member of the domain, or "
                    "its domain keys are not unsealed): use another HSA"
                )
            if self._peers is not None:
                self._peers.require_ready()
            response = body(call)
        except Exception as error:
            self._record_failure(call, context, error)
            raise
        self._record(call, "ok", call.detail)
        return response

    def _record(self, call: _Call, result: str, detail: str) -> None:
        if self._audit is not None:
            self._audit.append(
                principal=call.principal,
                operation=call.operation,
                key_id=call.key_id,
                encryption_context=call.context,
                result=result,
                detail=detail,
            )

    def _record_failure(self, call: _Call, context: grpc.ServicerContext, error: Exception) -> None:
        if not call.principal:
            try:
                call.principal = transport.caller_spiffe(context).uri
            except HsmDomainError:
                call.principal = "unauthenticated"
        if isinstance(error, HsmDomainError):
            detail = f"{type(error).__name__}: {error.message}"
        else:
            detail = f"internal error ({type(error).__name__})"
        try:
            self._record(call, status_for(error).name, detail)
        except HsmDomainError as audit_error:
            log.error("could not audit a failed %s: %s", call.operation, audit_error)

    def _require_head_confirmed(self, operation: str) -> None:
        """Key administration only on a head a peer confirmed recently (docs/runtime.md)."""
        if self._peers is not None:
            self._peers.require_head_confirmed(operation)

    def _authorize(self, entry: CachedKey, call: _Call, operation: int) -> None:
        policy.require_granted(entry.grants, call.principal, operation, entry.key_id)

    def _usable(self, key_id: str, call: _Call, operation: int) -> CachedKey:
        """The key, if the caller may do `operation` with it and it is enabled."""
        entry = self._cache.get(key_id)
        self._authorize(entry, call, operation)
        require_enabled(entry.metadata)
        return entry

    def _context(self, call: _Call, values: Mapping[str, str]) -> bytes:
        """The request's encryption context, recorded for the audit; its canonical encoding
        (which checks it), encoded once per call."""
        context = dict(values)
        call.context = context
        return ciphertext.encode_context(context, self._limits)

    def _key_id(self, call: _Call, value: str, what: str = "key_id") -> str:
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

    def _open(
        self,
        call: _Call,
        blob: bytes,
        encoded_context: bytes,
        operation: int,
        header: ciphertext.CiphertextHeader | None = None,
    ) -> tuple[CachedKey, bytes]:
        """Authorise and open a ciphertext blob: (its key, the plaintext). `header`, if given,
        is what `parse_header` returned for `blob`."""
        if header is None:
            header = ciphertext.parse_header(blob, self._limits)
        call.key_id = header.key_id
        entry = self._usable(header.key_id, call, operation)
        if header.backing_version > entry.current_version:
            # Rotated through another HSA within the cache's TTL? Only an authorised caller
            # gets this far, so a made-up version cannot turn calls into coordinator calls
            # for anyone else.
            entry = self._cache.get_newer(header.key_id, header.backing_version)
            self._authorize(entry, call, operation)
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
        """Seal up to 4096 bytes under the key's current backing version."""

        def body(call: _Call) -> services_pb2.EncryptResponse:
            key_id = self._key_id(call, request.key_id)
            encoded_context = self._context(call, request.encryption_context)
            if len(request.plaintext) > self._limits.max_plaintext_bytes:
                raise LimitExceededError(
                    f"plaintext is {len(request.plaintext)} bytes; the limit is "
                    f"{self._limits.max_plaintext_bytes} (use envelope encryption with "
                    "GenerateDataKey for more)"
                )
            entry = self._usable(key_id, call, keys_pb2.KEY_OPERATION_ENCRYPT)
            blob = self._seal(entry, request.plaintext, encoded_context)
            call.detail = f"backing version {entry.current_version}"
            return services_pb2.EncryptResponse(
                key_id=key_id, ciphertext_blob=blob, backing_version=entry.current_version
            )

        return self._run("Encrypt", context, body)

    def Decrypt(
        self, request: services_pb2.DecryptRequest, context: grpc.ServicerContext
    ) -> services_pb2.DecryptResponse:
        """Open a blob; the key comes from its header (`key_id`, if given, must match)."""

        def body(call: _Call) -> services_pb2.DecryptResponse:
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

        return self._run("Decrypt", context, body)

    def ReEncrypt(
        self, request: services_pb2.ReEncryptRequest, context: grpc.ServicerContext
    ) -> services_pb2.ReEncryptResponse:
        """Open a blob and seal its plaintext under another key or context, inside the HSA."""

        def body(call: _Call) -> services_pb2.ReEncryptResponse:
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
            )
            call.key_id = destination_id
            destination = self._usable(destination_id, call, keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO)
            blob = self._seal(destination, plaintext, encoded_destination)
            call.detail = (
                f"from key {source.key_id} to backing version {destination.current_version}"
            )
            return services_pb2.ReEncryptResponse(
                source_key_id=source.key_id, key_id=destination_id, ciphertext_blob=blob
            )

        return self._run("ReEncrypt", context, body)

    def _generate_data_key(
        self,
        request: services_pb2.GenerateDataKeyRequest,
        call: _Call,
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
            lambda call: self._generate_data_key(request, call, with_plaintext=True),
        )

    def GenerateDataKeyWithoutPlaintext(
        self, request: services_pb2.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateDataKeyResponse:
        """As GenerateDataKey, but only the encrypted copy is returned."""
        return self._run(
            "GenerateDataKeyWithoutPlaintext",
            context,
            lambda call: self._generate_data_key(request, call, with_plaintext=False),
        )

    def GenerateRandom(
        self, request: services_pb2.GenerateRandomRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateRandomResponse:
        """1 to 1024 bytes from the OS CSPRNG."""

        def body(call: _Call) -> services_pb2.GenerateRandomResponse:
            count = self._byte_count(request.number_of_bytes, None)
            call.detail = f"{count} bytes"
            return services_pb2.GenerateRandomResponse(random=crypto.random_bytes(count))

        return self._run("GenerateRandom", context, body)

    # --- reading keys --------------------------------------------------------------------

    def DescribeKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """The key's verified metadata (any state)."""

        def body(call: _Call) -> services_pb2.KeyMetadataResponse:
            key_id = self._key_id(call, request.key_id)
            entry = self._cache.get(key_id)
            self._authorize(entry, call, keys_pb2.KEY_OPERATION_DESCRIBE)
            return services_pb2.KeyMetadataResponse(metadata=entry.metadata)

        return self._run("DescribeKey", context, body)

    def ListKeys(
        self, request: services_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListKeysResponse:
        """One page of the keys the caller may describe, each verified.

        A page may hold fewer keys than `limit` (even none) while `next_page_token` is set:
        keys the caller may not describe are left out.
        """

        def body(call: _Call) -> services_pb2.ListKeysResponse:
            limit = request.limit or DEFAULT_LIST_LIMIT
            if limit > MAX_LIST_LIMIT:
                raise InvalidInputError(f"limit {limit} is above the maximum of {MAX_LIST_LIMIT}")
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
                if not policy.allowed(
                    metadata.policy, call.principal, keys_pb2.KEY_OPERATION_DESCRIBE
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

        return self._run("ListKeys", context, body)

    # --- changing keys -------------------------------------------------------------------

    def CreateKey(
        self, request: services_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """A new key with a fresh 256-bit backing key, stored at the coordinator first."""

        def body(call: _Call) -> services_pb2.KeyMetadataResponse:
            wait = self._create_limiter.acquire(call.principal)
            if wait:
                limiter = self._create_limiter
                raise ResourceExhaustedError(
                    f"{call.principal} may create at most {limiter.rate:g} keys per second on "
                    f"this HSA (bursts of {limiter.burst}): retry in {wait:.1f} s"
                )
            limit = self._limits.max_key_description_chars
            if len(request.description) > limit:
                raise LimitExceededError(
                    f"description is {len(request.description)} characters; the limit is {limit}"
                )
            if request.HasField("policy") and request.policy.grants:
                policy.validate_policy(
                    request.policy, domain_id=self._domain_id, limits=self._limits
                )
                key_policy = request.policy
            else:
                key_policy = policy.default_policy(call.principal)
            period = request.rotation_period_days or DEFAULT_ROTATION_PERIOD_DAYS
            if not MIN_ROTATION_PERIOD_DAYS <= period <= MAX_ROTATION_PERIOD_DAYS:
                raise InvalidInputError(
                    f"rotation_period_days must be between {MIN_ROTATION_PERIOD_DAYS} and "
                    f"{MAX_ROTATION_PERIOD_DAYS}, not {period}"
                )
            self._require_head_confirmed("CreateKey")
            now = int(self._clock())
            metadata = keys_pb2.KeyMetadata(
                key_id=ciphertext.new_key_id(),
                description=request.description,
                state=keys_pb2.KEY_STATE_ENABLED,
                created_at=now,
                policy=key_policy,
                rotation=keys_pb2.RotationSettings(
                    enabled=request.enable_rotation,
                    period_days=period,
                    next_rotation_at=now + period * DAY_SECONDS if request.enable_rotation else 0,
                ),
                current_backing_version=1,
                creator=call.principal,
                metadata_version=1,
                domain_id=self._domain_id,
            )
            call.key_id = metadata.key_id
            try:
                entry = self._cache.store(metadata, {1: crypto.new_aes_key()}, 0)
            except CoordinatorNotReachedError:
                raise NotAppliedError(
                    "the coordinator is unreachable; CreateKey needs it and created nothing: retry"
                ) from None
            except CoordinatorUnreachableError:
                raise UnavailableError(
                    "the coordinator did not confirm that it stored the new key (it may have): "
                    "look for it (ListKeys) before creating another"
                ) from None
            log.info("key %s created by %s", entry.key_id, call.principal)
            return services_pb2.KeyMetadataResponse(metadata=entry.metadata)

        return self._run("CreateKey", context, body)

    def _change(
        self,
        operation: str,
        key_id_value: str,
        context: grpc.ServicerContext,
        change: Callable[[keys_pb2.KeyMetadata, dict[int, bytes], int], bool],
        detail: Callable[[keys_pb2.KeyMetadata], str] = lambda _: "",
    ) -> services_pb2.KeyMetadataResponse:
        """Read the key fresh, check ADMIN, apply `change` (False: nothing to do), write it
        back with a compare-and-swap; re-read and retry on a conflict."""

        def body(call: _Call) -> services_pb2.KeyMetadataResponse:
            key_id = self._key_id(call, key_id_value)
            self._require_head_confirmed(operation)
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
                self._authorize(entry, call, keys_pb2.KEY_OPERATION_ADMIN)
                metadata = keys_pb2.KeyMetadata()
                metadata.CopyFrom(entry.metadata)
                backing_keys = dict(entry.backing_keys)
                if not change(metadata, backing_keys, int(self._clock())):
                    call.detail = "no change"
                    return services_pb2.KeyMetadataResponse(metadata=entry.metadata)
                metadata.metadata_version = entry.metadata.metadata_version + 1
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
                call.detail = f"metadata version {stored.metadata.metadata_version}" + (
                    f", {extra}" if (extra := detail(stored.metadata)) else ""
                )
                log.info("%s of key %s by %s", operation, key_id, call.principal)
                return services_pb2.KeyMetadataResponse(metadata=stored.metadata)
            raise ConflictError(
                f"key {key_id} changed {1 + CONFLICT_RETRIES} times while {operation} ran; retry"
            )

        return self._run(operation, context, body)

    def RotateKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """A new backing key version; ciphertexts under older versions keep decrypting."""

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            rotate_backing_key(metadata, keys, now)
            return True

        return self._change(
            "RotateKey",
            request.key_id,
            context,
            change,
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
            if new_policy is None:
                raise InvalidInputError(
                    "policy is empty: give at least one grant, and KEY_OPERATION_ADMIN to "
                    "at least one principal"
                )
            policy.validate_policy(new_policy, domain_id=self._domain_id, limits=self._limits)
            if metadata.policy == new_policy:
                return False
            metadata.policy.CopyFrom(new_policy)
            return True

        return self._change("PutKeyPolicy", request.key_id, context, change)

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
            if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
                raise FailedPreconditionError(
                    _pending_deletion_message(metadata, "cancel the deletion first")
                )
            if metadata.state == target:
                return False
            metadata.state = target
            return True

        return self._change(operation, key_id, context, change)

    def ScheduleKeyDeletion(
        self, request: services_pb2.ScheduleKeyDeletionRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """PENDING_DELETION for 7 to 30 days (default 30); then the key is deleted for good."""
        days = request.pending_window_days or DEFAULT_DELETION_WINDOW_DAYS

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            if not MIN_DELETION_WINDOW_DAYS <= days <= MAX_DELETION_WINDOW_DAYS:
                raise InvalidInputError(
                    f"pending_window_days must be between {MIN_DELETION_WINDOW_DAYS} and "
                    f"{MAX_DELETION_WINDOW_DAYS}, not {days}"
                )
            if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
                raise FailedPreconditionError(
                    _pending_deletion_message(metadata, "its deletion is scheduled already")
                )
            metadata.state = keys_pb2.KEY_STATE_PENDING_DELETION
            metadata.deletion_at = now + days * DAY_SECONDS
            return True

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

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            if metadata.state != keys_pb2.KEY_STATE_PENDING_DELETION:
                raise FailedPreconditionError(f"key {metadata.key_id} is not pending deletion")
            metadata.state = keys_pb2.KEY_STATE_DISABLED
            metadata.deletion_at = 0
            return True

        return self._change("CancelKeyDeletion", request.key_id, context, change)
