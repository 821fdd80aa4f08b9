"""The key service's calls that import a key's material, as AWS KMS has them:
GetParametersForImport, ImportKeyMaterial and DeleteImportedKeyMaterial (keys created with
origin EXTERNAL; docs/kms-client.md "Importing key material").

Invariants (beside those of `keyservice`, which hold for these calls too):
- every call needs the ADMIN operation on the key, and the key's origin EXTERNAL;
- the wrapping private key exists in the clear only inside an HSA: it leaves only sealed in
  the import token (`domain_core.importtokens`), which only this domain's HSAs can open, only
  for this key and until it expires;
- imported material is checked against the key spec and the key's earlier material before it
  is stored (`domain_core.keyimport`), then stored as every key's material is: in a key token,
  through a compare-and-swap at the coordinator; neither it nor the wrapped bytes are ever
  audited, logged or put in an error message.
"""

from __future__ import annotations

import grpc

from domain_core import importtokens, keyimport, keyspecs
from domain_core.errors import InvalidInputError
from domain_core.keylifecycle import iso_date
from domain_core.limits import MAX_IMPORT_BYTES
from domain_proto import keys_pb2, services_pb2
from hsa_node.keyaccess import KeyAccess
from hsa_node.keycalls import KeyCall

__all__ = ["ImportCalls"]


def _bounded(value: bytes, what: str) -> bytes:
    if not value:
        raise InvalidInputError(f"{what} is empty")
    if len(value) > MAX_IMPORT_BYTES:
        raise InvalidInputError(f"{what} is above the limit of {MAX_IMPORT_BYTES} bytes")
    return value


class ImportCalls(KeyAccess):
    """The gRPC methods of the calls of this module (see its invariants)."""

    def GetParametersForImport(
        self, request: services_pb2.GetParametersForImportRequest, context: grpc.ServicerContext
    ) -> services_pb2.GetParametersForImportResponse:
        """A fresh RSA wrapping key's public half and its import token (24 hours)."""

        def body(call: KeyCall) -> services_pb2.GetParametersForImportResponse:
            key_id = self._key_id(call, request.key_id)
            spec = request.wrapping_key_spec or keys_pb2.KEY_SPEC_RSA_2048
            algorithm = request.wrapping_algorithm
            call.detail = f"{importtokens.algorithm_name(algorithm)}, {keyspecs.spec_name(spec)}"
            entry = self._cache.get(key_id)
            self._authorize(entry, call, keys_pb2.KEY_OPERATION_ADMIN)
            keyimport.require_external(entry.metadata, "GetParametersForImport")
            keys = self._cache.domain_keys()
            parameters = importtokens.new_import_parameters(
                domain_id=self._domain_id,
                key_id=key_id,
                domain_key=keys.keys[keys.generation],
                generation=keys.generation,
                algorithm=algorithm,
                wrapping_key_spec=spec,
                now=int(self._clock()),
            )
            return services_pb2.GetParametersForImportResponse(
                key_id=key_id,
                import_token=parameters.import_token,
                public_key=parameters.public_key,
                parameters_valid_to=parameters.expires_at,
            )

        return self._frame.run("GetParametersForImport", context, body)

    def ImportKeyMaterial(
        self, request: services_pb2.ImportKeyMaterialRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Unwrap material with the import token's key and make it the key's material."""

        def change(metadata: keys_pb2.KeyMetadata, keys: dict[int, bytes], now: int) -> bool:
            # Checked here, within the call's frame (so audited), after the ADMIN check.
            token = _bounded(request.import_token, "import_token")
            wrapped = _bounded(request.encrypted_key_material, "encrypted_key_material")
            keyimport.require_external(metadata, "ImportKeyMaterial")
            wrapping = importtokens.open_import_token(
                token,
                domain_id=self._domain_id,
                key_id=metadata.key_id,
                domain_keys=self._cache.domain_keys().keys,
                now=now,
            )
            material = wrapping.unwrap(wrapped)
            return keyimport.import_material(metadata, keys, material, request.valid_to, now)

        def detail(metadata: keys_pb2.KeyMetadata) -> str:
            expiry = metadata.material_expires_at
            return "material expires " + (iso_date(expiry) if expiry else "never")

        return self._change("ImportKeyMaterial", request.key_id, context, change, detail)

    def DeleteImportedKeyMaterial(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.KeyMetadataResponse:
        """Drop a key's imported material: PENDING_IMPORT until the same material comes back
        (the upkeep does the same once the material expired: `hsa_node.rewrap`)."""
        return self._change(
            "DeleteImportedKeyMaterial",
            request.key_id,
            context,
            keyimport.delete_material,
        )
