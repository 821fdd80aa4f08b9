"""The lifecycle of imported key material (keys of origin EXTERNAL), as AWS KMS has it: pure
rules over `KeyMetadata` and a key's backing keys, applied by the key service as key changes
(`keylifecycle.KeyChange`) and by the upkeep when material expires.

    PENDING_IMPORT -> ENABLED            ImportKeyMaterial (`import_material`)
    ENABLED, DISABLED -> PENDING_IMPORT  DeleteImportedKeyMaterial (`delete_material`), or
                                         the upkeep once the material expired
                                         (`material_expired`)

Invariants:
- only a key of origin EXTERNAL takes or loses material this way, and material is imported
  only into a key without any (PENDING_IMPORT): a key's material never changes under it;
- imported material fits the key spec (`keyspecs.check_material`) and, once a key has held
  material, only the same material is taken again (`importtokens.check_commitment`);
- a key in PENDING_IMPORT holds no backing key at all (backing version 0, no token), so
  nothing can use it; its metadata keeps the material's commitment, never the material;
- expiry (`valid_to`) is in the future when set; the upkeep deletes the material once it
  passed, as DeleteImportedKeyMaterial does.
"""

from __future__ import annotations

from domain_core import importtokens, keyspecs
from domain_core.errors import FailedPreconditionError, InvalidInputError, UnsupportedOperationError
from domain_proto import keys_pb2

__all__ = ["delete_material", "import_material", "material_expired", "require_external"]


def require_external(metadata: keys_pb2.KeyMetadata, operation: str) -> None:
    """UnsupportedOperationError unless the key's material is imported (origin EXTERNAL)."""
    if metadata.origin != keys_pb2.KEY_ORIGIN_EXTERNAL:
        raise UnsupportedOperationError(
            f"key {metadata.key_id} was made with its material in the domain: {operation} is "
            "for keys created with origin EXTERNAL"
        )


def import_material(
    metadata: keys_pb2.KeyMetadata,
    backing_keys: dict[int, bytes],
    material: bytes,
    valid_to: int,
    now: int,
) -> bool:
    """ImportKeyMaterial's change: the key gets `material` as backing version 1 and becomes
    ENABLED (see the module invariants); `valid_to` 0: the material does not expire."""
    require_external(metadata, "ImportKeyMaterial")
    if metadata.state != keys_pb2.KEY_STATE_PENDING_IMPORT:
        raise FailedPreconditionError(
            f"key {metadata.key_id} holds key material already (it is not pending import); "
            "to import again, DeleteImportedKeyMaterial first"
        )
    try:
        keyspecs.check_material(metadata.key_spec, material)
    except ValueError:
        raise InvalidInputError(
            f"the imported material is not a {keyspecs.spec_name(metadata.key_spec)} key "
            f"({_expected(metadata.key_spec)})"
        ) from None
    if valid_to and valid_to <= now:
        raise InvalidInputError("valid_to must be in the future (or 0: the material never expires)")
    importtokens.check_commitment(metadata, material)
    backing_keys.clear()
    backing_keys[1] = material
    metadata.current_backing_version = 1
    metadata.state = keys_pb2.KEY_STATE_ENABLED
    metadata.material_expires_at = valid_to
    metadata.material_commitment = importtokens.material_commitment(material, metadata.key_id)
    return True


def _expected(spec: int) -> str:
    if keyspecs.is_symmetric(spec):
        return "32 bytes"
    if keyspecs.is_hmac(spec):
        return "an HMAC key of the spec's length range"
    return "its PKCS#8 DER private key"


def delete_material(
    metadata: keys_pb2.KeyMetadata, backing_keys: dict[int, bytes], now: int
) -> bool:
    """DeleteImportedKeyMaterial's change: the key drops its material and goes back to
    PENDING_IMPORT (False when it holds none)."""
    require_external(metadata, "DeleteImportedKeyMaterial")
    if metadata.state == keys_pb2.KEY_STATE_PENDING_IMPORT:
        return False
    if metadata.state == keys_pb2.KEY_STATE_PENDING_DELETION:
        raise FailedPreconditionError(
            f"key {metadata.key_id} is pending deletion: cancel the deletion first"
        )
    backing_keys.clear()
    metadata.current_backing_version = 0
    metadata.state = keys_pb2.KEY_STATE_PENDING_IMPORT
    metadata.material_expires_at = 0
    return True


def material_expired(metadata: keys_pb2.KeyMetadata, now: int) -> bool:
    """Whether the upkeep must delete a key's imported material (its expiry passed)."""
    return (
        metadata.origin == keys_pb2.KEY_ORIGIN_EXTERNAL
        and metadata.state in (keys_pb2.KEY_STATE_ENABLED, keys_pb2.KEY_STATE_DISABLED)
        and 0 < metadata.material_expires_at <= now
    )
