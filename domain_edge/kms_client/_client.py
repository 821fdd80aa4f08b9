"""The key service client on threads (`KeyClient`): one method per RPC, each a blocking call
with the retry and fail-over rules of `_core` and `_retry`.

Invariants: see the package docstring (one mutual-TLS channel per endpoint, expecting an HSA
of the domain; round-robin over endpoints not cooling down; every failure one
`domain_core.errors` class).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import tenacity

from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge.kms_client import _calls as calls
from domain_edge.kms_client._calls import (
    DEFAULT_PAGE_SIZE,
    Call,
    CreatedGrant,
    DataKeyPair,
    ImportParameters,
    PublicKey,
    wrap_key_material,
)
from domain_edge.kms_client._core import (
    DEFAULT_TIMEOUT,
    ClientCore,
    ClientSettings,
    Endpoint,
    Failover,
)
from domain_edge.kms_client._policies import Grant, KeyMetadata
from domain_edge.kms_client._retry import DEFAULT_ATTEMPTS
from domain_edge.kms_client._session import SESSION_FIELDS, KeySession, SessionCallError
from domain_edge.transport import ANY_HSA, secure_channel
from domain_proto import keys_pb2

T = TypeVar("T")


class KeyClient(ClientCore):
    """A client of the key service of one domain, over every given HSA endpoint.

    Thread-safe: one client can serve many threads (its channels multiplex calls). Use it as a
    context manager or call `close`. For asyncio applications, `AsyncKeyClient`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        timeout: float = DEFAULT_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
        attempts: int = DEFAULT_ATTEMPTS,
        total_timeout: float | None = None,
        sessions: bool = True,
    ) -> None:
        """`timeout` bounds each attempt; `attempts` and `total_timeout` (default three times
        `timeout`) bound a call with its retries. With `sessions` (the default) the data-plane
        calls (Encrypt, Decrypt, ReEncrypt, GenerateDataKey[WithoutPlaintext]) of every thread
        travel over one key-service session per endpoint (`KeyService.Session`), with the same
        retry and fail-over rules; an HSA that refuses a session gets unary calls for a while."""
        settings = ClientSettings.of(endpoints, ca_pem, timeout, limits, attempts, total_timeout)
        super().__init__(
            settings,
            lambda address: secure_channel(
                address, ca_pem, ANY_HSA, cert_pem=cert_pem, key_pem=key_pem, limits=limits
            ),
            KeySession if sessions else None,
        )

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel (calls in flight fail)."""
        if self._closed:
            return
        self._closed = True
        for endpoint in self._endpoints:
            if endpoint.session is not None:
                endpoint.session.close()
            endpoint.channel.close()

    # --- calling -----------------------------------------------------------------------------

    def _run(self, call: Call[T]) -> T:
        return call.shape(self._invoke(call.method, self._prepared(call.request)))

    def _invoke(self, method: str, request: Any) -> Any:
        """One logical call: attempts on the endpoints under the retry rules, with deadlines."""
        self._check_open()
        tried: list[Endpoint] = []
        # Whether each failed attempt surely changed nothing (never sent, or marked so).
        definite: list[bool] = []
        deadline = time.monotonic() + self._total_timeout

        def attempt() -> Any:
            endpoint = self._pick(tried)
            tried.append(endpoint)
            try:
                response = self._send(endpoint, method, request, self._attempt_timeout(deadline))
            except grpc.RpcError as error:
                raise self._failed(method, error, endpoint, definite) from None
            except ValueError:
                self._check_open()  # closed by another thread meanwhile
                raise
            self._mark_up(endpoint)
            return response

        try:
            return attempt()  # the common case, without the retry machinery
        except Failover as failover:
            if self._attempts == 1 or time.monotonic() >= deadline:
                raise self._unavailable(method, failover, tried, definite) from None

        def wait(*_: object) -> float:  # never past the call's deadline (a retry delay may be)
            return min(self._backoff(tried), max(0.0, deadline - time.monotonic()))

        time.sleep(wait())
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Failover),
            stop=tenacity.stop_after_attempt(self._attempts - 1)
            | tenacity.stop_after_delay(max(0.0, deadline - time.monotonic())),
            wait=wait,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except Failover as failover:
            raise self._unavailable(method, failover, tried, definite) from None

    def _send(self, endpoint: Endpoint, method: str, request: Any, timeout: float) -> Any:
        """One attempt on `endpoint`: over its session when the call travels in one and the
        HSA takes sessions, else unary."""
        if method in SESSION_FIELDS and endpoint.session_usable():
            try:
                return endpoint.session.call(method, request, timeout)
            except SessionCallError:
                raise  # the call's own answer, or its session ended: as a unary call's
            except grpc.RpcError as error:  # the stream was refused
                if not endpoint.refused_session(error):
                    raise
        return getattr(endpoint.stub, method)(request, timeout=timeout)

    # --- keys --------------------------------------------------------------------------------

    def create_key(
        self,
        description: str = "",
        policy: keys_pb2.KeyPolicy | Mapping[str, Any] | None = None,
        enable_rotation: bool = False,
        rotation_period_days: int = 0,
        *,
        idempotency_key: str | None = None,
        key_spec: str = "SYMMETRIC_DEFAULT",
        key_usage: str = "ENCRYPT_DECRYPT",
        origin: str = "DOMAIN",
        tags: Mapping[str, str] | None = None,
    ) -> KeyMetadata:
        """Create a customer key. Without a policy the caller gets every operation on it.

        Every call carries an idempotency key (`idempotency_key`, or a fresh random UUID), so
        it is retried on another HSA when no answer came, and the retry returns the key the
        first attempt created. Pass the same `idempotency_key` again to retry a call that
        failed with UnavailableError: one key comes of it, never two.
        """
        return self._run(
            calls.create_key(
                description,
                policy,
                enable_rotation,
                rotation_period_days,
                idempotency_key,
                key_spec,
                key_usage,
                origin,
                tags,
            )
        )

    def describe_key(self, key_id: str) -> KeyMetadata:
        """A key's metadata."""
        return self._run(calls.describe_key(key_id))

    def list_key_pages(self, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[KeyMetadata]]:
        """The keys, one page (at most `page_size`) at a time; pages are fetched lazily."""
        token = ""
        while True:
            page, token = self._run(calls.list_keys_page(page_size, token))
            yield page
            if not token:
                return

    def list_keys(self, page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[KeyMetadata]:
        """Every key the caller may see, following the pages lazily."""
        for page in self.list_key_pages(page_size):
            yield from page

    def rotate_key(self, key_id: str) -> KeyMetadata:
        """Add a backing key version (old versions keep decrypting). Not retried once sent."""
        return self._run(calls.rotate_key(key_id))

    def put_key_policy(
        self, key_id: str, policy: keys_pb2.KeyPolicy | Mapping[str, Any]
    ) -> KeyMetadata:
        """Replace a key's policy (which must keep an admin). Not retried once sent."""
        return self._run(calls.put_key_policy(key_id, policy))

    def enable_key(self, key_id: str) -> KeyMetadata:
        """Enable a key. Not retried once sent."""
        return self._run(calls.enable_key(key_id))

    def disable_key(self, key_id: str) -> KeyMetadata:
        """Disable a key: it refuses every cryptographic operation until enabled. Not retried
        once sent."""
        return self._run(calls.disable_key(key_id))

    def schedule_key_deletion(self, key_id: str, days: int = 30) -> KeyMetadata:
        """Schedule a key's deletion after `days` (7 to 30). Not retried once sent."""
        return self._run(calls.schedule_key_deletion(key_id, days))

    def cancel_key_deletion(self, key_id: str) -> KeyMetadata:
        """Cancel a scheduled deletion (the key comes back disabled). Not retried once sent."""
        return self._run(calls.cancel_key_deletion(key_id))

    # --- cryptographic operations ------------------------------------------------------------

    def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        context: Mapping[str, str] | None = None,
        *,
        encryption_algorithm: str | None = None,
    ) -> bytes:
        """Encrypt at most `limits.max_plaintext_bytes` (4 KiB) under a key; returns the blob.

        For larger data use `encrypt_envelope`. The same context must be given to decrypt.
        With an RSA key of usage ENCRYPT_DECRYPT, give `encryption_algorithm`
        ("RSAES_OAEP_SHA_1" or "RSAES_OAEP_SHA_256"): the blob is the bare RSA ciphertext,
        and no context is taken.
        """
        return self._run(
            calls.encrypt(self._limits, key_id, plaintext, context, encryption_algorithm)
        )

    def decrypt(
        self,
        blob: bytes,
        context: Mapping[str, str] | None = None,
        key_id: str | None = None,
        *,
        encryption_algorithm: str | None = None,
    ) -> bytes:
        """The plaintext of a blob (the blob names its key). With `key_id`, the service refuses
        a blob of another key. Any failure about the blob is "invalid ciphertext". An RSA
        ciphertext needs its `encryption_algorithm` and `key_id`."""
        return self._run(calls.decrypt(self._limits, blob, context, key_id, encryption_algorithm))

    def re_encrypt(
        self,
        blob: bytes,
        destination_key_id: str,
        source_context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Decrypt a blob and encrypt its plaintext under another key (or another context),
        inside an HSA: the plaintext never leaves it. Returns the new blob."""
        return self._run(
            calls.re_encrypt(
                self._limits, blob, destination_key_id, source_context, destination_context
            )
        )

    def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> tuple[bytes, bytes]:
        """A fresh data key: (plaintext key, its blob under `key_id`). Use the key once, drop
        it, keep the blob (e.g. in an envelope header) to get the key back with `decrypt`."""
        return self._run(calls.generate_data_key(self._limits, key_id, context, number_of_bytes))

    def generate_data_key_without_plaintext(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> bytes:
        """Only the blob of a fresh data key (for a party that will encrypt later)."""
        return self._run(
            calls.generate_data_key_without_plaintext(
                self._limits, key_id, context, number_of_bytes
            )
        )

    def generate_random(self, number_of_bytes: int) -> bytes:
        """`number_of_bytes` (1 to 1024) random bytes from an HSA's CSPRNG."""
        return self._run(calls.generate_random(number_of_bytes))

    # --- key specs other than symmetric encryption (docs/kms-client.md "Key specs") -----

    def sign(
        self, key_id: str, message: bytes, signing_algorithm: str, *, digest: bool = False
    ) -> bytes:
        """Sign `message` (1 to 4096 bytes; hashed by the HSA) or, with `digest`, its digest
        under a key of usage SIGN_VERIFY; `signing_algorithm` as AWS KMS names it
        ("ECDSA_SHA_256", "RSASSA_PSS_SHA_256", ...). ECDSA signatures are DER."""
        return self._run(calls.sign(self._limits, key_id, message, signing_algorithm, digest))

    def verify(
        self,
        key_id: str,
        message: bytes,
        signature: bytes,
        signing_algorithm: str,
        *,
        digest: bool = False,
    ) -> bool:
        """Whether `signature` of `message` (or its digest) verifies under the key."""
        return self._run(
            calls.verify(self._limits, key_id, message, signature, signing_algorithm, digest)
        )

    def get_public_key(self, key_id: str) -> PublicKey:
        """An RSA or ECC key's public key (DER SubjectPublicKeyInfo) and its algorithms."""
        return self._run(calls.get_public_key(key_id))

    def generate_mac(self, key_id: str, message: bytes, mac_algorithm: str) -> bytes:
        """The HMAC of `message` (1 to 4096 bytes) under an HMAC key; `mac_algorithm` is the
        key's ("HMAC_SHA_256" for an HMAC_256 key)."""
        return self._run(calls.generate_mac(self._limits, key_id, message, mac_algorithm))

    def verify_mac(self, key_id: str, message: bytes, mac: bytes, mac_algorithm: str) -> bool:
        """Whether `mac` is the HMAC of `message` under the key (compared in the HSA in
        constant time)."""
        return self._run(calls.verify_mac(self._limits, key_id, message, mac, mac_algorithm))

    def generate_data_key_pair(
        self, key_id: str, key_pair_spec: str, context: Mapping[str, str] | None = None
    ) -> DataKeyPair:
        """A fresh RSA or ECC key pair ("RSA_2048", "ECC_NIST_P256", ...): private key
        (PKCS#8 DER), its blob under the symmetric key `key_id` (`decrypt` gives it back with
        the same context) and public key."""
        return self._run(
            calls.generate_data_key_pair(
                self._limits, key_id, key_pair_spec, context, with_plaintext=True
            )
        )

    def generate_data_key_pair_without_plaintext(
        self, key_id: str, key_pair_spec: str, context: Mapping[str, str] | None = None
    ) -> DataKeyPair:
        """As `generate_data_key_pair`, with `private_key` empty (only its blob)."""
        return self._run(
            calls.generate_data_key_pair(
                self._limits, key_id, key_pair_spec, context, with_plaintext=False
            )
        )

    # --- imported key material (docs/kms-client.md "Importing key material") -----------

    def get_parameters_for_import(
        self,
        key_id: str,
        wrapping_algorithm: str = "RSAES_OAEP_SHA_256",
        wrapping_key_spec: str = "RSA_2048",
    ) -> ImportParameters:
        """A wrapping public key and import token (valid 24 hours) for a key created with
        origin "EXTERNAL"."""
        return self._run(
            calls.get_parameters_for_import(key_id, wrapping_algorithm, wrapping_key_spec)
        )

    def import_key_material(
        self, key_id: str, parameters: ImportParameters, material: bytes, valid_to: int = 0
    ) -> KeyMetadata:
        """Wrap `material` here under `parameters` and import it into the key, which becomes
        ENABLED; `valid_to` (unix seconds, 0: never) is when the domain deletes it again.
        Only the key's earlier material is taken again once it had some. Not retried once
        sent."""
        wrapped = wrap_key_material(parameters, material)
        return self._run(
            calls.import_key_material(key_id, parameters.import_token, wrapped, valid_to)
        )

    def delete_imported_key_material(self, key_id: str) -> KeyMetadata:
        """Delete a key's imported material (PENDING_IMPORT until it is imported again). Not
        retried once sent."""
        return self._run(calls.delete_imported_key_material(key_id))

    # --- grants (docs/kms-client.md "Grants") ----------------------------------------------

    def create_grant(
        self,
        key_id: str,
        grantee_principal: str,
        operations: Sequence[str],
        *,
        retiring_principal: str = "",
        constraints: Mapping[str, Mapping[str, str]] | None = None,
        name: str = "",
    ) -> CreatedGrant:
        """Give `grantee_principal` `operations` (policy names: "encrypt", "decrypt", ...) on
        the key, optionally only for calls whose encryption context meets `constraints`
        ({"encryption_context_equals": {...}} or {"encryption_context_subset": {...}}).
        The grantee may use the grant at once on any HSA with the returned token
        (`with_grant_tokens`). Not retried once sent."""
        return self._run(
            calls.create_grant(
                key_id,
                grantee_principal,
                operations,
                retiring_principal=retiring_principal,
                constraints=constraints,
                name=name,
                grant_tokens=self._grant_tokens,
            )
        )

    def list_grants(
        self, key_id: str, *, grant_id: str = "", grantee_principal: str = "", page_size: int = 50
    ) -> Iterator[Grant]:
        """The key's grants (optionally one grant, or one grantee's), following the pages."""
        token = ""
        while True:
            page, token = self._run(
                calls.list_grants_page(key_id, page_size, token, grant_id, grantee_principal)
            )
            yield from page
            if not token:
                return

    def retire_grant(
        self, key_id: str = "", grant_id: str = "", *, grant_token: bytes = b""
    ) -> KeyMetadata:
        """Remove a grant as its grantee or retiring principal: by key id and grant id, or by
        its token. Not retried once sent."""
        return self._run(calls.retire_grant(key_id, grant_id, grant_token))

    def revoke_grant(self, key_id: str, grant_id: str) -> KeyMetadata:
        """Remove a grant as a principal that may revoke the key's grants. Not retried once
        sent."""
        return self._run(calls.revoke_grant(key_id, grant_id))

    # --- tags ----------------------------------------------------------------------------

    def tag_resource(self, key_id: str, tags: Mapping[str, str]) -> KeyMetadata:
        """Add tags to a key (replacing values of tag keys it has). Not retried once sent."""
        return self._run(calls.tag_resource(key_id, tags))

    def untag_resource(self, key_id: str, tag_keys: Sequence[str]) -> KeyMetadata:
        """Remove a key's tags by their keys. Not retried once sent."""
        return self._run(calls.untag_resource(key_id, tag_keys))

    def list_resource_tags(self, key_id: str) -> dict[str, str]:
        """Every tag of a key, following the pages."""
        tags: dict[str, str] = {}
        token = ""
        while True:
            page, token = self._run(calls.list_resource_tags_page(key_id, token))
            tags.update(page)
            if not token:
                return tags
