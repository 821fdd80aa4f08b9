"""The key service's grant calls, as AWS KMS has them: CreateGrant, ListGrants, RetireGrant and
RevokeGrant (docs/kms-client.md "Grants").

Grants live in the key's signed metadata (`domain_core.access`): creating, retiring and
revoking one is a metadata change like PutKeyPolicy (read fresh, compare-and-swap, the floors
announced to peers before the answer), and a grant is in force on an HSA once it holds that
metadata, or earlier for a call that brings the grant's token (`domain_core.granttokens`).

Invariants (beside those of `keyservice`):
- CreateGrant needs the create-grant operation (from the policy, a grant, or a grant token),
  and an issuer that does not administer the key gives only operations it holds itself
  outright (no escalation through create-grant); a grant gives only grant operations to a
  client of this domain, within `Limits.max_grants_per_key`; its id is fresh and random;
- ListGrants needs list-grants; RevokeGrant needs revoke-grant; RetireGrant is for the
  grant's retiring principal or its grantee (or whoever may revoke it), as in AWS KMS;
- a grant that is not on the key is NOT_FOUND, and a retired or revoked grant stops working
  on an HSA as soon as it holds the metadata without it, token or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import grpc

from domain_core import access, granttokens
from domain_core.errors import InvalidInputError, NotFoundError, PermissionDeniedError
from domain_core.limits import MAX_GRANT_PAGE, MAX_GRANT_TOKEN_BYTES
from domain_proto import keys_pb2, services_pb2
from hsa_node.keyaccess import KeyAccess
from hsa_node.keycache import CachedKey
from hsa_node.keycalls import KeyCall

__all__ = ["GrantCalls"]

_DEFAULT_GRANT_PAGE: Final = 50


class GrantCalls(KeyAccess):
    """The gRPC methods of the calls of this module (see its invariants)."""

    def CreateGrant(
        self, request: services_pb2.CreateGrantRequest, context: grpc.ServicerContext
    ) -> services_pb2.CreateGrantResponse:
        """Add a grant to the key; its id and a token that works before it propagated."""
        grant_id = access.new_grant_id()

        def body(call: KeyCall) -> services_pb2.CreateGrantResponse:
            key_id = self._key_id(call, request.key_id)
            self._frame.require_head_confirmed("CreateGrant")
            grant = keys_pb2.KeyGrant(
                grant_id=grant_id,
                name=request.name,
                grantee_principal=request.grantee_principal,
                retiring_principal=request.retiring_principal,
                operations=request.operations,
                constraints=request.constraints,
                issuing_principal=call.principal,
            )

            def authorize(entry: CachedKey) -> None:
                self._authorize(entry, call, keys_pb2.KEY_OPERATION_CREATE_GRANT, {})
                # No escalation: an issuer gives only what it holds itself, outright (or it
                # administers the key), as AWS KMS's grants pass on at most their own rights.
                if entry.access.allows(call.principal, keys_pb2.KEY_OPERATION_ADMIN, {}):
                    return
                for operation in request.operations:
                    self._authorize(entry, call, operation, {})

            def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
                access.validate_grant(
                    grant, metadata, domain_id=self._domain_id, limits=self._limits
                )
                grant.created_at = now
                metadata.grants.append(grant)
                return True

            metadata, _ = self._writer.change(
                "CreateGrant", key_id, change, call.principal, authorize
            )
            call.detail = f"grant {grant_id[:16]} to {grant.grantee_principal}"
            keys = self._cache.domain_keys()
            token = granttokens.seal_grant_token(
                domain_id=self._domain_id,
                key_id=key_id,
                metadata_version=int(metadata.metadata_version),
                grant=grant,
                domain_key=keys.keys[keys.generation],
                generation=keys.generation,
            )
            return services_pb2.CreateGrantResponse(grant_id=grant_id, grant_token=token)

        return self._run("CreateGrant", context, request, body)

    def ListGrants(
        self, request: services_pb2.ListGrantsRequest, context: grpc.ServicerContext
    ) -> services_pb2.ListGrantsResponse:
        """One page of the key's grants (optionally one grant id, or one grantee's)."""

        def body(call: KeyCall) -> services_pb2.ListGrantsResponse:
            key_id = self._key_id(call, request.key_id)
            limit = request.limit or _DEFAULT_GRANT_PAGE
            if limit > MAX_GRANT_PAGE:
                raise InvalidInputError(f"limit {limit} is above the maximum of {MAX_GRANT_PAGE}")
            start = 0
            if request.page_token:
                if not request.page_token.isdigit() or len(request.page_token) > 6:
                    raise InvalidInputError(
                        "page_token is not a token ListGrants returned; start without one"
                    )
                start = int(request.page_token)
            entry = self._cache.get(key_id)
            self._authorize(entry, call, keys_pb2.KEY_OPERATION_LIST_GRANTS, {})
            grants = [
                g
                for g in entry.metadata.grants
                if (not request.grant_id or g.grant_id == request.grant_id)
                and (
                    not request.grantee_principal
                    or g.grantee_principal == request.grantee_principal
                )
            ]
            page = grants[start : start + limit]
            after = start + len(page)
            call.detail = f"{len(page)} grants"
            return services_pb2.ListGrantsResponse(
                grants=page, next_page_token=str(after) if after < len(grants) else ""
            )

        return self._run("ListGrants", context, request, body)

    def RetireGrant(
        self, request: services_pb2.RetireGrantRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Remove a grant: by its retiring principal or grantee (or one who may revoke it)."""

        def body(call: KeyCall) -> services_pb2.KeyMetadataResponse:
            key_id_value, grant_id = request.key_id, request.grant_id
            if request.grant_token:
                if len(request.grant_token) > MAX_GRANT_TOKEN_BYTES:
                    raise InvalidInputError("grant_token is not a token CreateGrant returned")
                opened = granttokens.open_grant_token(
                    bytes(request.grant_token),
                    domain_id=self._domain_id,
                    domain_keys=self._cache.domain_keys().keys,
                )
                if (key_id_value and key_id_value != opened.key_id) or (
                    grant_id and grant_id != opened.grant.grant_id
                ):
                    raise InvalidInputError("grant_token is of another key or grant")
                key_id_value, grant_id = opened.key_id, opened.grant.grant_id
            if not grant_id:
                raise InvalidInputError("give grant_token, or key_id and grant_id")
            key_id = self._key_id(call, key_id_value)

            def authorize(entry: CachedKey) -> None:
                grant = _grant(entry.metadata, grant_id)
                if call.principal in (grant.grantee_principal, grant.retiring_principal):
                    return
                if not entry.access.allows(call.principal, keys_pb2.KEY_OPERATION_REVOKE_GRANT, {}):
                    raise PermissionDeniedError(
                        f"principal {call.principal} may not retire grant {grant_id[:16]} of "
                        f"key {key_id}: only its grantee, its retiring principal, or a principal "
                        "that may revoke grants"
                    )

            return self._remove_grant(call, "RetireGrant", key_id, grant_id, authorize)

        return self._run("RetireGrant", context, request, body)

    def RevokeGrant(
        self, request: services_pb2.RevokeGrantRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Remove a grant, by a principal that may revoke the key's grants."""

        def body(call: KeyCall) -> services_pb2.KeyMetadataResponse:
            key_id = self._key_id(call, request.key_id)

            def authorize(entry: CachedKey) -> None:
                self._authorize(entry, call, keys_pb2.KEY_OPERATION_REVOKE_GRANT, {})

            return self._remove_grant(call, "RevokeGrant", key_id, request.grant_id, authorize)

        return self._run("RevokeGrant", context, request, body)

    def _remove_grant(
        self,
        call: KeyCall,
        operation: str,
        key_id: str,
        grant_id: str,
        authorize: Callable[[CachedKey], None],
    ) -> services_pb2.KeyMetadataResponse:
        self._frame.require_head_confirmed(operation)

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            kept = [g for g in metadata.grants if g.grant_id != grant_id]
            if len(kept) == len(metadata.grants):
                raise NotFoundError(f"key {key_id} has no grant {grant_id[:64]}")
            del metadata.grants[:]
            metadata.grants.extend(kept)
            return True

        metadata, _ = self._writer.change(operation, key_id, change, call.principal, authorize)
        call.detail = f"grant {grant_id[:16]}, metadata version {metadata.metadata_version}"
        return services_pb2.KeyMetadataResponse(metadata=metadata)


def _grant(metadata: keys_pb2.KeyMetadata, grant_id: str) -> keys_pb2.KeyGrant:
    for grant in metadata.grants:
        if grant.grant_id == grant_id:
            return grant
    raise NotFoundError(f"key {metadata.key_id} has no grant {grant_id[:64]}")
