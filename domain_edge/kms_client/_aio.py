"""The key service client for asyncio (`AsyncKeyClient`): `KeyClient`'s methods as
coroutines, over `grpc.aio` channels and one key-service session per endpoint.

An asyncio application gets here what the servers give: no thread per waiting call, and the
calls of every task batched into each endpoint's session. The rules are `KeyClient`'s, from
the same code: the calls and their checks (`_calls`), the endpoint choice, cool-downs and
error shaping (`_core`), and what may be sent again (`_retry`); only the waiting is awaited.

Invariants: see the package docstring; in addition, a client belongs to the event loop it is
first used in (as its `grpc.aio` channels do), and `close` (or `async with`) ends its sessions
and channels.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from domain_core.limits import DEFAULT_LIMITS, Limits
from domain_edge.kms_client import _calls as calls
from domain_edge.kms_client._aio_session import AsyncKeySession
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
)
from domain_edge.kms_client._policies import Grant, KeyMetadata
from domain_edge.kms_client._retry import DEFAULT_ATTEMPTS
from domain_edge.kms_client._session import SESSION_FIELDS, SessionCallError, StreamBrokenError
from domain_edge.transport import ANY_HSA, secure_aio_channel
from domain_proto import keys_pb2

T = TypeVar("T")


class AsyncKeyClient(ClientCore):
    """`KeyClient` for asyncio: the same methods, awaited, with the same retry and fail-over
    rules. Use it as an async context manager or await `close`."""

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
        """The arguments are `KeyClient`'s. Channels connect lazily, in the event loop of the
        first call."""
        settings = ClientSettings.of(endpoints, ca_pem, timeout, limits, attempts, total_timeout)
        super().__init__(
            settings,
            lambda address: secure_aio_channel(
                address, ca_pem, ANY_HSA, cert_pem=cert_pem, key_pem=key_pem, limits=limits
            ),
            AsyncKeySession if sessions else None,
        )

    async def __aenter__(self) -> AsyncKeyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End every session and close every channel (calls in flight fail)."""
        if self._closed:
            return
        self._closed = True
        for endpoint in self._endpoints:
            if endpoint.session is not None:
                await endpoint.session.close()
            await endpoint.channel.close(None)

    # --- calling -----------------------------------------------------------------------------

    async def _run(self, call: Call[T]) -> T:
        return call.shape(await self._invoke(call.method, self._prepared(call.request)))

    async def _invoke(self, method: str, request: Any) -> Any:
        """One logical call: attempts on the endpoints under the retry rules (`KeyClient`'s:
        at most `attempts`, within `total_timeout`, backing off once every endpoint failed)."""
        self._check_open()
        tried: list[Endpoint] = []
        definite: list[bool] = []  # whether each failed attempt surely changed nothing
        deadline = time.monotonic() + self._total_timeout
        while True:
            endpoint = self._pick(tried)
            tried.append(endpoint)
            try:
                response = await self._send(
                    endpoint, method, request, self._attempt_timeout(deadline)
                )
            except grpc.RpcError as error:
                failover = self._failed(method, error, endpoint, definite)
            except ValueError:
                self._check_open()  # closed meanwhile
                raise
            else:
                self._mark_up(endpoint)
                return response
            left = deadline - time.monotonic()
            if len(tried) >= self._attempts or left <= 0:
                raise self._unavailable(method, failover, tried, definite)
            await asyncio.sleep(min(self._backoff(tried), left))

    async def _send(self, endpoint: Endpoint, method: str, request: Any, timeout: float) -> Any:
        """One attempt on `endpoint`: over its session when the call travels in one and the
        HSA takes sessions, else unary."""
        if method in SESSION_FIELDS and endpoint.session_usable():
            try:
                return await endpoint.session.call(method, request, timeout)
            except StreamBrokenError:
                pass  # broken in this client before an answer: sent again unary, below
            except SessionCallError:
                raise  # the call's own answer, or its session ended: as a unary call's
            except grpc.RpcError as error:  # the stream was refused
                if not endpoint.refused_session(error):
                    raise
        return await getattr(endpoint.stub, method)(request, timeout=timeout)

    # --- keys (see KeyClient for what each does) ---------------------------------------------

    async def create_key(
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
        """Create a customer key, always with an idempotency key (`KeyClient.create_key`)."""
        return await self._run(
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

    async def describe_key(self, key_id: str) -> KeyMetadata:
        """A key's metadata."""
        return await self._run(calls.describe_key(key_id))

    async def list_key_pages(
        self, page_size: int = DEFAULT_PAGE_SIZE
    ) -> AsyncIterator[list[KeyMetadata]]:
        """The keys, one page (at most `page_size`) at a time; pages are fetched lazily."""
        token = ""
        while True:
            page, token = await self._run(calls.list_keys_page(page_size, token))
            yield page
            if not token:
                return

    async def list_keys(self, page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[KeyMetadata]:
        """Every key the caller may see, following the pages lazily."""
        async for page in self.list_key_pages(page_size):
            for key in page:
                yield key

    async def rotate_key(self, key_id: str) -> KeyMetadata:
        """Add a backing key version. Not retried once sent."""
        return await self._run(calls.rotate_key(key_id))

    async def put_key_policy(
        self, key_id: str, policy: keys_pb2.KeyPolicy | Mapping[str, Any]
    ) -> KeyMetadata:
        """Replace a key's policy (which must keep an admin). Not retried once sent."""
        return await self._run(calls.put_key_policy(key_id, policy))

    async def enable_key(self, key_id: str) -> KeyMetadata:
        """Enable a key. Not retried once sent."""
        return await self._run(calls.enable_key(key_id))

    async def disable_key(self, key_id: str) -> KeyMetadata:
        """Disable a key. Not retried once sent."""
        return await self._run(calls.disable_key(key_id))

    async def schedule_key_deletion(self, key_id: str, days: int = 30) -> KeyMetadata:
        """Schedule a key's deletion after `days` (7 to 30). Not retried once sent."""
        return await self._run(calls.schedule_key_deletion(key_id, days))

    async def cancel_key_deletion(self, key_id: str) -> KeyMetadata:
        """Cancel a scheduled deletion (the key comes back disabled). Not retried once sent."""
        return await self._run(calls.cancel_key_deletion(key_id))

    # --- cryptographic operations (see KeyClient) --------------------------------------------

    async def encrypt(
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
        return await self._run(
            calls.encrypt(self._limits, key_id, plaintext, context, encryption_algorithm)
        )

    async def decrypt(
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
        return await self._run(
            calls.decrypt(self._limits, blob, context, key_id, encryption_algorithm)
        )

    async def re_encrypt(
        self,
        blob: bytes,
        destination_key_id: str,
        source_context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """A blob's plaintext encrypted under another key or context, inside an HSA."""
        return await self._run(
            calls.re_encrypt(
                self._limits, blob, destination_key_id, source_context, destination_context
            )
        )

    async def generate_data_key(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> tuple[bytes, bytes]:
        """A fresh data key: (plaintext key, its blob under `key_id`)."""
        return await self._run(
            calls.generate_data_key(self._limits, key_id, context, number_of_bytes)
        )

    async def generate_data_key_without_plaintext(
        self, key_id: str, context: Mapping[str, str] | None = None, number_of_bytes: int = 32
    ) -> bytes:
        """Only the blob of a fresh data key."""
        return await self._run(
            calls.generate_data_key_without_plaintext(
                self._limits, key_id, context, number_of_bytes
            )
        )

    async def generate_random(self, number_of_bytes: int) -> bytes:
        """`number_of_bytes` (1 to 1024) random bytes from an HSA's CSPRNG."""
        return await self._run(calls.generate_random(number_of_bytes))

    # --- key specs other than symmetric encryption (docs/kms-client.md "Key specs") -----

    async def sign(
        self, key_id: str, message: bytes, signing_algorithm: str, *, digest: bool = False
    ) -> bytes:
        """Sign `message` (1 to 4096 bytes; hashed by the HSA) or, with `digest`, its digest
        under a key of usage SIGN_VERIFY; `signing_algorithm` as AWS KMS names it
        ("ECDSA_SHA_256", "RSASSA_PSS_SHA_256", ...). ECDSA signatures are DER."""
        return await self._run(calls.sign(self._limits, key_id, message, signing_algorithm, digest))

    async def verify(
        self,
        key_id: str,
        message: bytes,
        signature: bytes,
        signing_algorithm: str,
        *,
        digest: bool = False,
    ) -> bool:
        """Whether `signature` of `message` (or its digest) verifies under the key."""
        return await self._run(
            calls.verify(self._limits, key_id, message, signature, signing_algorithm, digest)
        )

    async def get_public_key(self, key_id: str) -> PublicKey:
        """An RSA or ECC key's public key (DER SubjectPublicKeyInfo) and its algorithms."""
        return await self._run(calls.get_public_key(key_id))

    async def generate_mac(self, key_id: str, message: bytes, mac_algorithm: str) -> bytes:
        """The HMAC of `message` (1 to 4096 bytes) under an HMAC key; `mac_algorithm` is the
        key's ("HMAC_SHA_256" for an HMAC_256 key)."""
        return await self._run(calls.generate_mac(self._limits, key_id, message, mac_algorithm))

    async def verify_mac(self, key_id: str, message: bytes, mac: bytes, mac_algorithm: str) -> bool:
        """Whether `mac` is the HMAC of `message` under the key (compared in the HSA in
        constant time)."""
        return await self._run(calls.verify_mac(self._limits, key_id, message, mac, mac_algorithm))

    async def generate_data_key_pair(
        self, key_id: str, key_pair_spec: str, context: Mapping[str, str] | None = None
    ) -> DataKeyPair:
        """A fresh RSA or ECC key pair ("RSA_2048", "ECC_NIST_P256", ...): private key
        (PKCS#8 DER), its blob under the symmetric key `key_id` (`decrypt` gives it back with
        the same context) and public key."""
        return await self._run(
            calls.generate_data_key_pair(
                self._limits, key_id, key_pair_spec, context, with_plaintext=True
            )
        )

    async def generate_data_key_pair_without_plaintext(
        self, key_id: str, key_pair_spec: str, context: Mapping[str, str] | None = None
    ) -> DataKeyPair:
        """As `generate_data_key_pair`, with `private_key` empty (only its blob)."""
        return await self._run(
            calls.generate_data_key_pair(
                self._limits, key_id, key_pair_spec, context, with_plaintext=False
            )
        )

    # --- imported key material (docs/kms-client.md "Importing key material") -----------

    async def get_parameters_for_import(
        self,
        key_id: str,
        wrapping_algorithm: str = "RSAES_OAEP_SHA_256",
        wrapping_key_spec: str = "RSA_2048",
    ) -> ImportParameters:
        """A wrapping public key and import token (valid 24 hours) for a key created with
        origin "EXTERNAL"."""
        return await self._run(
            calls.get_parameters_for_import(key_id, wrapping_algorithm, wrapping_key_spec)
        )

    async def import_key_material(
        self, key_id: str, parameters: ImportParameters, material: bytes, valid_to: int = 0
    ) -> KeyMetadata:
        """Wrap `material` here under `parameters` and import it into the key, which becomes
        ENABLED; `valid_to` (unix seconds, 0: never) is when the domain deletes it again.
        Only the key's earlier material is taken again once it had some. Not retried once
        sent."""
        wrapped = wrap_key_material(parameters, material)
        return await self._run(
            calls.import_key_material(key_id, parameters.import_token, wrapped, valid_to)
        )

    async def delete_imported_key_material(self, key_id: str) -> KeyMetadata:
        """Delete a key's imported material (PENDING_IMPORT until it is imported again). Not
        retried once sent."""
        return await self._run(calls.delete_imported_key_material(key_id))

    # --- grants (docs/kms-client.md "Grants") ----------------------------------------------

    async def create_grant(
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
        return await self._run(
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

    async def list_grants(
        self, key_id: str, *, grant_id: str = "", grantee_principal: str = "", page_size: int = 50
    ) -> AsyncIterator[Grant]:
        """The key's grants (optionally one grant, or one grantee's), following the pages."""
        token = ""
        while True:
            page, token = await self._run(
                calls.list_grants_page(key_id, page_size, token, grant_id, grantee_principal)
            )
            for grant in page:
                yield grant
            if not token:
                return

    async def retire_grant(
        self, key_id: str = "", grant_id: str = "", *, grant_token: bytes = b""
    ) -> KeyMetadata:
        """Remove a grant as its grantee or retiring principal: by key id and grant id, or by
        its token. Not retried once sent."""
        return await self._run(calls.retire_grant(key_id, grant_id, grant_token))

    async def revoke_grant(self, key_id: str, grant_id: str) -> KeyMetadata:
        """Remove a grant as a principal that may revoke the key's grants. Not retried once
        sent."""
        return await self._run(calls.revoke_grant(key_id, grant_id))

    # --- tags ----------------------------------------------------------------------------

    async def tag_resource(self, key_id: str, tags: Mapping[str, str]) -> KeyMetadata:
        """Add tags to a key (replacing values of tag keys it has). Not retried once sent."""
        return await self._run(calls.tag_resource(key_id, tags))

    async def untag_resource(self, key_id: str, tag_keys: Sequence[str]) -> KeyMetadata:
        """Remove a key's tags by their keys. Not retried once sent."""
        return await self._run(calls.untag_resource(key_id, tag_keys))

    async def list_resource_tags(self, key_id: str) -> dict[str, str]:
        """Every tag of a key, following the pages."""
        tags: dict[str, str] = {}
        token = ""
        while True:
            page, token = await self._run(calls.list_resource_tags_page(key_id, token))
            tags.update(page)
            if not token:
                return tags
