"""The key service's calls for keys other than symmetric encryption keys, as AWS KMS has them:
Sign, Verify and GetPublicKey (RSA and ECC keys), Encrypt and Decrypt with RSA-OAEP, GenerateMac
and VerifyMac (HMAC keys), and GenerateDataKeyPair[WithoutPlaintext] (a key pair for the
application, its private key sealed under a symmetric key). docs/kms-client.md "Key specs".

Invariants (beside those of `keyservice` and `keyaccess`, which hold for these calls too):
- private and secret material stays in this process: a private key leaves only as a public
  key (GetPublicKey) or, for a data key pair made for the caller, in the response fields the
  caller asked for; nothing secret is audited, logged or put in an error message;
- every algorithm is one the key's spec offers for its usage (`keyspecs`), else
  `InvalidKeyUsageError`; the message of Sign and GenerateMac is at most 4096 bytes and a
  DIGEST is exactly its hash's length;
- a signature or MAC that does not verify is an answer (`signature_valid` / `mac_valid`
  false), not an error; a MAC is compared in constant time;
- an RSA-OAEP ciphertext that does not open is "invalid ciphertext" with no more detail, and
  RSA-OAEP calls take no encryption context (they have nowhere to bind it, as in AWS KMS).
"""

from __future__ import annotations

from typing import Final, cast

import grpc

from domain_core import keyspecs
from domain_core.errors import InvalidInputError
from domain_proto import keys_pb2, services_pb2
from hsa_node.keyaccess import KeyAccess
from hsa_node.keycalls import KeyCall

__all__ = ["SYMMETRIC_OR_RSA", "SpecCalls"]

# What Encrypt and Decrypt need of a key, said when the key is of another kind.
SYMMETRIC_OR_RSA: Final = (
    "a symmetric encryption key, or an RSA key of usage ENCRYPT_DECRYPT with "
    "encryption_algorithm RSAES_OAEP_SHA_1 or RSAES_OAEP_SHA_256"
)
_SIGNING_KEY: Final = "an RSA or ECC key of usage SIGN_VERIFY"
_RSA_ENCRYPTION_KEY: Final = "an RSA key of usage ENCRYPT_DECRYPT"
_MAC_KEY: Final = "an HMAC key (usage GENERATE_VERIFY_MAC)"


def _no_context(context: object, what: str) -> None:
    if context:
        raise InvalidInputError(
            f"{what} takes no encryption context with an RSA key (RSA-OAEP binds none); "
            "leave it out, or use a symmetric key"
        )


class SpecCalls(KeyAccess):
    """The gRPC methods of the calls of this module (see its invariants)."""

    # --- RSA-OAEP: Encrypt and Decrypt with an encryption algorithm ----------------------

    def _encrypt_rsa(
        self, call: KeyCall, request: services_pb2.EncryptRequest
    ) -> services_pb2.EncryptResponse:
        """Encrypt with an RSA key: the bare RSA-OAEP ciphertext."""
        key_id = self._key_id(call, request.key_id)
        algorithm = request.encryption_algorithm
        name = keyspecs.encryption_algorithm_name(algorithm)
        _no_context(request.encryption_context, "Encrypt")
        entry = self._usable(
            key_id, call, keys_pb2.KEY_OPERATION_ENCRYPT, symmetric=False, needs=_RSA_ENCRYPTION_KEY
        )
        blob = self._asymmetric(entry).encrypt(algorithm, request.plaintext)
        call.detail = name
        return services_pb2.EncryptResponse(
            key_id=key_id,
            ciphertext_blob=blob,
            backing_version=entry.current_version,
            encryption_algorithm=request.encryption_algorithm,
        )

    def _decrypt_rsa(
        self, call: KeyCall, request: services_pb2.DecryptRequest
    ) -> services_pb2.DecryptResponse:
        """Decrypt an RSA-OAEP ciphertext: it names no key, so `key_id` must."""
        algorithm = request.encryption_algorithm
        name = keyspecs.encryption_algorithm_name(algorithm)
        if not request.key_id:
            raise InvalidInputError(
                f"Decrypt with {name} needs key_id: an RSA ciphertext does not name its key"
            )
        key_id = self._key_id(call, request.key_id)
        _no_context(request.encryption_context, "Decrypt")
        limit = self._limits.max_asymmetric_blob_bytes
        if len(request.ciphertext_blob) > limit:
            raise InvalidInputError(f"ciphertext_blob is above the limit of {limit} bytes")
        entry = self._usable(
            key_id, call, keys_pb2.KEY_OPERATION_DECRYPT, symmetric=False, needs=_RSA_ENCRYPTION_KEY
        )
        plaintext = self._asymmetric(entry).decrypt(algorithm, request.ciphertext_blob)
        call.detail = name
        return services_pb2.DecryptResponse(
            key_id=key_id, plaintext=plaintext, encryption_algorithm=request.encryption_algorithm
        )

    # --- signatures ----------------------------------------------------------------------

    def Sign(
        self, request: services_pb2.SignRequest, context: grpc.ServicerContext
    ) -> services_pb2.SignResponse:
        """Sign a message (RAW, hashed here) or its digest (DIGEST) with a signing key."""

        def body(call: KeyCall) -> services_pb2.SignResponse:
            key_id = self._key_id(call, request.key_id)
            algorithm = request.signing_algorithm
            call.detail = f"{keyspecs.signing_algorithm_name(algorithm)}, " + (
                keyspecs.message_type_name(request.message_type)
            )
            entry = self._usable(
                key_id,
                call,
                keys_pb2.KEY_OPERATION_SIGN,
                usage=keys_pb2.KEY_USAGE_SIGN_VERIFY,
                symmetric=False,
                needs=_SIGNING_KEY,
            )
            signature = self._asymmetric(entry).sign(
                algorithm, request.message, request.message_type
            )
            return services_pb2.SignResponse(
                key_id=key_id, signature=signature, signing_algorithm=algorithm
            )

        return self._run("Sign", context, request, body)

    def Verify(
        self, request: services_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> services_pb2.VerifyResponse:
        """Whether a signature of a message (or digest) verifies under a signing key."""

        def body(call: KeyCall) -> services_pb2.VerifyResponse:
            key_id = self._key_id(call, request.key_id)
            algorithm = request.signing_algorithm
            name = keyspecs.signing_algorithm_name(algorithm)
            message_type = keyspecs.message_type_name(request.message_type)
            entry = self._usable(
                key_id,
                call,
                keys_pb2.KEY_OPERATION_VERIFY,
                usage=keys_pb2.KEY_USAGE_SIGN_VERIFY,
                symmetric=False,
                needs=_SIGNING_KEY,
            )
            limit = self._limits.max_asymmetric_blob_bytes
            if len(request.signature) > limit:
                raise InvalidInputError(f"signature is above the limit of {limit} bytes")
            valid = self._asymmetric(entry).verify(
                algorithm, request.message, request.message_type, request.signature
            )
            call.detail = f"{name}, {message_type}: " + ("valid" if valid else "not valid")
            return services_pb2.VerifyResponse(
                key_id=key_id, signature_valid=valid, signing_algorithm=algorithm
            )

        return self._run("Verify", context, request, body)

    def GetPublicKey(
        self, request: services_pb2.KeyIdRequest, context: grpc.ServicerContext
    ) -> services_pb2.GetPublicKeyResponse:
        """An asymmetric key's public key (DER SubjectPublicKeyInfo) and what it is for."""

        def body(call: KeyCall) -> services_pb2.GetPublicKeyResponse:
            key_id = self._key_id(call, request.key_id)
            entry = self._usable(
                key_id,
                call,
                keys_pb2.KEY_OPERATION_GET_PUBLIC_KEY,
                usage=None,
                symmetric=False,
                needs="an RSA or ECC key",
            )
            metadata = entry.metadata
            spec, usage = metadata.key_spec, metadata.key_usage
            return services_pb2.GetPublicKeyResponse(
                key_id=key_id,
                public_key=self._asymmetric(entry).public_key_der(),
                key_spec=spec,
                key_usage=usage,
                signing_algorithms=cast(
                    "list[keys_pb2.SigningAlgorithm]",
                    list(keyspecs.signing_algorithms(spec, usage)),
                ),
                encryption_algorithms=cast(
                    "list[keys_pb2.EncryptionAlgorithm]",
                    list(keyspecs.encryption_algorithms(spec, usage)),
                ),
            )

        return self._run("GetPublicKey", context, request, body)

    # --- MACs ----------------------------------------------------------------------------

    def _mac_key(self, call: KeyCall, key_id_value: str, operation: int) -> tuple[int, bytes]:
        """(key spec, HMAC key) of an HMAC key the caller may use for `operation`."""
        key_id = self._key_id(call, key_id_value)
        entry = self._usable(
            key_id,
            call,
            operation,
            usage=keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC,
            symmetric=None,
            needs=_MAC_KEY,
        )
        return entry.metadata.key_spec, entry.backing_keys[entry.current_version]

    def GenerateMac(
        self, request: services_pb2.GenerateMacRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateMacResponse:
        """The HMAC of a message (1 to 4096 bytes) under an HMAC key."""

        def body(call: KeyCall) -> services_pb2.GenerateMacResponse:
            algorithm = request.mac_algorithm
            call.detail = keyspecs.mac_algorithm_name(algorithm)
            spec, key = self._mac_key(call, request.key_id, keys_pb2.KEY_OPERATION_GENERATE_MAC)
            mac = keyspecs.generate_mac(spec, key, algorithm, request.message)
            return services_pb2.GenerateMacResponse(
                key_id=call.key_id, mac=mac, mac_algorithm=algorithm
            )

        return self._run("GenerateMac", context, request, body)

    def VerifyMac(
        self, request: services_pb2.VerifyMacRequest, context: grpc.ServicerContext
    ) -> services_pb2.VerifyMacResponse:
        """Whether a MAC is the HMAC of a message under an HMAC key (compared in constant
        time)."""

        def body(call: KeyCall) -> services_pb2.VerifyMacResponse:
            algorithm = request.mac_algorithm
            name = keyspecs.mac_algorithm_name(algorithm)
            spec, key = self._mac_key(call, request.key_id, keys_pb2.KEY_OPERATION_VERIFY_MAC)
            limit = self._limits.max_asymmetric_blob_bytes
            if len(request.mac) > limit:
                raise InvalidInputError(f"mac is above the limit of {limit} bytes")
            valid = keyspecs.verify_mac(spec, key, algorithm, request.message, request.mac)
            call.detail = f"{name}: " + ("valid" if valid else "not valid")
            return services_pb2.VerifyMacResponse(
                key_id=call.key_id, mac_valid=valid, mac_algorithm=algorithm
            )

        return self._run("VerifyMac", context, request, body)

    # --- data key pairs ------------------------------------------------------------------

    def _data_key_pair(
        self,
        call: KeyCall,
        request: services_pb2.GenerateDataKeyPairRequest,
        *,
        with_plaintext: bool,
    ) -> services_pb2.GenerateDataKeyPairResponse:
        key_id = self._key_id(call, request.key_id)
        encoded_context = self._context(call, request.encryption_context)
        spec = request.key_pair_spec
        if spec not in keyspecs.DATA_KEY_PAIR_SPECS:
            names = ", ".join(keyspecs.spec_name(s) for s in keyspecs.DATA_KEY_PAIR_SPECS)
            raise InvalidInputError(f"key_pair_spec must be one of {names}")
        entry = self._usable(key_id, call, keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY_PAIR)
        private_der, public_der = keyspecs.new_data_key_pair(spec)
        blob = self._seal(entry, private_der, encoded_context)
        call.detail = f"{keyspecs.spec_name(spec)}, backing version {entry.current_version}"
        return services_pb2.GenerateDataKeyPairResponse(
            key_id=key_id,
            private_key_plaintext=private_der if with_plaintext else b"",
            private_key_ciphertext_blob=blob,
            public_key=public_der,
            key_pair_spec=spec,
        )

    def GenerateDataKeyPair(
        self, request: services_pb2.GenerateDataKeyPairRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateDataKeyPairResponse:
        """A fresh key pair: its public key, its private key, and the private key sealed under
        a symmetric key (Decrypt opens it)."""
        return self._run(
            "GenerateDataKeyPair",
            context,
            request,
            lambda call: self._data_key_pair(call, request, with_plaintext=True),
        )

    def GenerateDataKeyPairWithoutPlaintext(
        self, request: services_pb2.GenerateDataKeyPairRequest, context: grpc.ServicerContext
    ) -> services_pb2.GenerateDataKeyPairResponse:
        """As GenerateDataKeyPair, without the private key in the clear."""
        return self._run(
            "GenerateDataKeyPairWithoutPlaintext",
            context,
            request,
            lambda call: self._data_key_pair(call, request, with_plaintext=False),
        )
