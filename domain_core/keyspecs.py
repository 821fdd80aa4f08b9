"""Key specs of the key service as AWS KMS has them: which specs, usages and algorithms exist,
how key material is made, and the operations of asymmetric and HMAC keys. Pure: no I/O, no gRPC.

Functions take and return the enum numbers of `domain_proto.keys_pb2`; names are AWS's, derived
from the enum descriptors. An algorithm or operation a key's spec or usage does not allow is
`InvalidKeyUsageError`, a bad argument `InvalidInputError`, a ciphertext that does not open
`InvalidCiphertextError` (no detail), material that does not fit its spec `ValueError` (an
internal inconsistency); messages name specs, algorithms and lengths, never bytes. Asymmetric
material is unencrypted PKCS#8 DER, public keys DER SubjectPublicKeyInfo, ECDSA signatures DER,
and RSASSA-PSS salts as long as the digest, as AWS KMS makes them.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final, NamedTuple, cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from domain_core.errors import InvalidCiphertextError, InvalidInputError, InvalidKeyUsageError
from domain_core.limits import MAX_KMS_MESSAGE_BYTES, MIN_KMS_MESSAGE_BYTES
from domain_proto import keys_pb2

__all__ = [
    "DATA_KEY_PAIR_SPECS",
    "AsymmetricKey",
    "check_material",
    "check_spec_usage",
    "encryption_algorithm_from_name",
    "encryption_algorithm_name",
    "encryption_algorithms",
    "generate_mac",
    "is_asymmetric",
    "is_hmac",
    "is_symmetric",
    "mac_algorithm_from_name",
    "mac_algorithm_name",
    "mac_algorithms",
    "max_oaep_plaintext",
    "message_type_from_name",
    "message_type_name",
    "new_data_key_pair",
    "new_material",
    "signing_algorithm_from_name",
    "signing_algorithm_name",
    "signing_algorithms",
    "spec_from_name",
    "spec_name",
    "usage_from_name",
    "usage_name",
    "verify_mac",
]


_SYMMETRIC_KEY_BYTES: Final = 32


# --- names -----------------------------------------------------------------------------------


class _Names:
    """The AWS names of one proto enum's values (its prefix stripped), both ways."""

    __slots__ = ("_by_name", "_by_value", "_valid", "_what")

    def __init__(self, enum: EnumTypeWrapper, prefix: str, what: str) -> None:
        self._what = what
        self._by_value = {
            int(value): name.removeprefix(prefix)
            for name, value in enum.items()
            if name != prefix + "UNSPECIFIED"
        }
        self._by_name = {name: value for value, name in self._by_value.items()}
        self._valid = ", ".join(self._by_value.values())

    def name(self, value: int) -> str:
        """The name of `value`; InvalidInputError for a number the enum does not have."""
        try:
            return self._by_value[value]
        except (KeyError, TypeError):
            raise InvalidInputError(
                f"unknown {self._what} {value!r}; use one of {self._valid}"
            ) from None

    def value(self, name: str) -> int:
        """The number of `name`; InvalidInputError naming the valid names otherwise."""
        found = self._by_name.get(name)
        if found is None:
            raise InvalidInputError(
                f"unknown {self._what} {str(name)[:64]!r}; use one of {self._valid}"
            )
        return found


_SPECS: Final = _Names(keys_pb2.KeySpec, "KEY_SPEC_", "key spec")
_USAGES: Final = _Names(keys_pb2.KeyUsage, "KEY_USAGE_", "key usage")
_SIGNING: Final = _Names(keys_pb2.SigningAlgorithm, "SIGNING_ALGORITHM_", "signing algorithm")
_ENCRYPTION: Final = _Names(
    keys_pb2.EncryptionAlgorithm, "ENCRYPTION_ALGORITHM_", "encryption algorithm"
)
_MACS: Final = _Names(keys_pb2.MacAlgorithm, "MAC_ALGORITHM_", "MAC algorithm")
_MESSAGE_TYPES: Final = _Names(keys_pb2.MessageType, "MESSAGE_TYPE_", "message type")


def spec_name(spec: int) -> str:
    """The AWS name of a key spec ("RSA_2048"); InvalidInputError for an unknown number."""
    return _SPECS.name(spec)


def spec_from_name(name: str) -> int:
    """The key spec of an AWS name; InvalidInputError listing the valid names otherwise."""
    return _SPECS.value(name)


def usage_name(usage: int) -> str:
    """The AWS name of a key usage ("SIGN_VERIFY"); InvalidInputError for an unknown number."""
    return _USAGES.name(usage)


def usage_from_name(name: str) -> int:
    """The key usage of an AWS name; InvalidInputError listing the valid names otherwise."""
    return _USAGES.value(name)


def signing_algorithm_name(algorithm: int) -> str:
    """The AWS name of a signing algorithm; InvalidInputError for UNSPECIFIED or unknown."""
    return _SIGNING.name(algorithm)


def signing_algorithm_from_name(name: str) -> int:
    """The signing algorithm of an AWS name; InvalidInputError listing the valid names."""
    return _SIGNING.value(name)


def encryption_algorithm_name(algorithm: int) -> str:
    """The AWS name of an encryption algorithm; InvalidInputError for an unknown number."""
    return _ENCRYPTION.name(algorithm)


def encryption_algorithm_from_name(name: str) -> int:
    """The encryption algorithm of an AWS name; InvalidInputError listing the valid names."""
    return _ENCRYPTION.value(name)


def mac_algorithm_name(algorithm: int) -> str:
    """The AWS name of a MAC algorithm; InvalidInputError for UNSPECIFIED or unknown."""
    return _MACS.name(algorithm)


def mac_algorithm_from_name(name: str) -> int:
    """The MAC algorithm of an AWS name; InvalidInputError listing the valid names otherwise."""
    return _MACS.value(name)


def message_type_name(message_type: int) -> str:
    """The AWS name of a message type ("RAW", "DIGEST"); InvalidInputError if unknown."""
    return _MESSAGE_TYPES.name(message_type)


def message_type_from_name(name: str) -> int:
    """The message type of an AWS name; InvalidInputError listing the valid names otherwise."""
    return _MESSAGE_TYPES.value(name)


# --- specs, usages and their algorithms ------------------------------------------------------


class _Hmac(NamedTuple):
    algorithm: int  # the one MacAlgorithm of the spec
    hash_name: str  # hashlib's name of its hash
    key_bytes: int  # AWS's key length for the spec (what a new key of the spec has)
    max_bytes: int  # the longest imported key AWS takes for the spec (the shortest: key_bytes)


class _Signing(NamedTuple):
    kind: str  # "PSS", "PKCS1" or "ECDSA"
    hash: hashes.HashAlgorithm


_RSA_BITS: Final[dict[int, int]] = {
    keys_pb2.KEY_SPEC_RSA_2048: 2048,
    keys_pb2.KEY_SPEC_RSA_3072: 3072,
    keys_pb2.KEY_SPEC_RSA_4096: 4096,
}
# Each ECC spec's curve, and its one signing algorithm (AWS: P-521 signs with SHA-512).
_ECC: Final[dict[int, tuple[ec.EllipticCurve, int]]] = {
    keys_pb2.KEY_SPEC_ECC_NIST_P256: (ec.SECP256R1(), keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_256),
    keys_pb2.KEY_SPEC_ECC_NIST_P384: (ec.SECP384R1(), keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_384),
    keys_pb2.KEY_SPEC_ECC_NIST_P521: (ec.SECP521R1(), keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_512),
}
_HMACS: Final[dict[int, _Hmac]] = {
    keys_pb2.KEY_SPEC_HMAC_224: _Hmac(keys_pb2.MAC_ALGORITHM_HMAC_SHA_224, "sha224", 28, 64),
    keys_pb2.KEY_SPEC_HMAC_256: _Hmac(keys_pb2.MAC_ALGORITHM_HMAC_SHA_256, "sha256", 32, 64),
    keys_pb2.KEY_SPEC_HMAC_384: _Hmac(keys_pb2.MAC_ALGORITHM_HMAC_SHA_384, "sha384", 48, 128),
    keys_pb2.KEY_SPEC_HMAC_512: _Hmac(keys_pb2.MAC_ALGORITHM_HMAC_SHA_512, "sha512", 64, 128),
}
_SIGNING_SCHEMES: Final[dict[int, _Signing]] = {
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PSS_SHA_256: _Signing("PSS", hashes.SHA256()),
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PSS_SHA_384: _Signing("PSS", hashes.SHA384()),
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PSS_SHA_512: _Signing("PSS", hashes.SHA512()),
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_256: _Signing("PKCS1", hashes.SHA256()),
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_384: _Signing("PKCS1", hashes.SHA384()),
    keys_pb2.SIGNING_ALGORITHM_RSASSA_PKCS1_V1_5_SHA_512: _Signing("PKCS1", hashes.SHA512()),
    keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_256: _Signing("ECDSA", hashes.SHA256()),
    keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_384: _Signing("ECDSA", hashes.SHA384()),
    keys_pb2.SIGNING_ALGORITHM_ECDSA_SHA_512: _Signing("ECDSA", hashes.SHA512()),
}
_RSA_SIGNING: Final = tuple(a for a, s in _SIGNING_SCHEMES.items() if s.kind != "ECDSA")
# OAEP with SHA-1 (AWS's RSAES_OAEP_SHA_1) does not rest on SHA-1's collision resistance.
_OAEP_HASHES: Final[dict[int, hashes.HashAlgorithm]] = {
    keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_1: hashes.SHA1(),  # noqa: S303 (see above)
    keys_pb2.ENCRYPTION_ALGORITHM_RSAES_OAEP_SHA_256: hashes.SHA256(),
}

# Which usages each spec may have: AWS KMS's pairs.
_RSA_USAGES: Final = (keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT, keys_pb2.KEY_USAGE_SIGN_VERIFY)
_USAGES_OF: Final[dict[int, tuple[int, ...]]] = {
    keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT: (keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT,),
    **dict.fromkeys(_RSA_BITS, _RSA_USAGES),
    **dict.fromkeys(_ECC, (keys_pb2.KEY_USAGE_SIGN_VERIFY,)),
    **dict.fromkeys(_HMACS, (keys_pb2.KEY_USAGE_GENERATE_VERIFY_MAC,)),
}

DATA_KEY_PAIR_SPECS: Final[tuple[int, ...]] = (*_RSA_BITS, *_ECC)


def _names(names: _Names, values: tuple[int, ...]) -> str:
    return ", ".join(names.name(v) for v in values)


def check_spec_usage(spec: int, usage: int) -> None:
    """Refuse a key spec and key usage that AWS KMS does not pair (InvalidInputError)."""
    spec_label, usage_label = spec_name(spec), usage_name(usage)
    allowed = _USAGES_OF[spec]
    if usage not in allowed:
        raise InvalidInputError(
            f"key spec {spec_label} takes key usage {_names(_USAGES, allowed)}; not {usage_label}"
        )


def is_symmetric(spec: int) -> bool:
    """True for the symmetric encryption spec, SYMMETRIC_DEFAULT (HMAC specs: `is_hmac`)."""
    spec_name(spec)
    return spec == keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT


def is_asymmetric(spec: int) -> bool:
    """True for the RSA and ECC specs, whose material is a private key with a public half."""
    spec_name(spec)
    return spec in _RSA_BITS or spec in _ECC


def is_hmac(spec: int) -> bool:
    """True for the HMAC specs (HMAC_224 to HMAC_512)."""
    spec_name(spec)
    return spec in _HMACS


def signing_algorithms(spec: int, usage: int) -> tuple[int, ...]:
    """The signing algorithms of a key, as DescribeKey lists them; empty if it does not sign."""
    spec_name(spec)
    if usage_name(usage) != "SIGN_VERIFY":
        return ()
    if spec in _RSA_BITS:
        return _RSA_SIGNING
    if spec in _ECC:
        return (_ECC[spec][1],)
    return ()


def encryption_algorithms(spec: int, usage: int) -> tuple[int, ...]:
    """The encryption algorithms of a key, as DescribeKey lists them; empty if none."""
    spec_name(spec)
    if usage_name(usage) != "ENCRYPT_DECRYPT":
        return ()
    if spec == keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT:
        return (keys_pb2.ENCRYPTION_ALGORITHM_SYMMETRIC_DEFAULT,)
    if spec in _RSA_BITS:
        return tuple(_OAEP_HASHES)
    return ()


def mac_algorithms(spec: int, usage: int) -> tuple[int, ...]:
    """The MAC algorithm of a key, as DescribeKey lists it; empty if it makes no MACs."""
    spec_name(spec)
    if usage_name(usage) != "GENERATE_VERIFY_MAC" or spec not in _HMACS:
        return ()
    return (_HMACS[spec].algorithm,)


# --- key material ----------------------------------------------------------------------------

_PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _pkcs8(key: _PrivateKey) -> bytes:
    der, pkcs8 = serialization.Encoding.DER, serialization.PrivateFormat.PKCS8
    return key.private_bytes(der, pkcs8, serialization.NoEncryption())


def _spki(key: _PrivateKey) -> bytes:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(serialization.Encoding.DER, spki)


def _generate_private(spec: int) -> _PrivateKey:
    if spec in _RSA_BITS:
        return rsa.generate_private_key(65537, _RSA_BITS[spec])
    return ec.generate_private_key(_ECC[spec][0])


def new_material(spec: int) -> bytes:
    """Fresh key material for `spec`: random bytes of AWS's length for SYMMETRIC_DEFAULT and
    HMAC specs, an unencrypted PKCS#8 DER private key for RSA and ECC specs."""
    spec_name(spec)
    if spec == keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT:
        return secrets.token_bytes(_SYMMETRIC_KEY_BYTES)
    if spec in _HMACS:
        return secrets.token_bytes(_HMACS[spec].key_bytes)
    return _pkcs8(_generate_private(spec))


def _is_pkcs8(der: bytes) -> bool:
    """True when `der` is shaped as PKCS#8 (SEQUENCE { INTEGER 0|1, SEQUENCE ... }), unlike
    PKCS#1 RSAPrivateKey (INTEGER, INTEGER) or SEC1 ECPrivateKey (INTEGER 1, OCTET STRING)."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    length = der[1]
    start = 2 + (length & 0x7F if length & 0x80 else 0)
    return der[start : start + 3] in (b"\x02\x01\x00", b"\x02\x01\x01") and (
        der[start + 3 : start + 4] == b"\x30"
    )


def _load_private(spec: int, material: bytes) -> _PrivateKey:
    """The private key in `material`; ValueError unless it is PKCS#8 DER of `spec`'s type,
    RSA size or curve (the message names the spec, never the bytes)."""
    label = spec_name(spec)
    try:
        key = serialization.load_der_private_key(material, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if key is None or not _is_pkcs8(material):
        raise ValueError(f"material of key spec {label} is not an unencrypted PKCS#8 DER key")
    if spec in _RSA_BITS:
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != _RSA_BITS[spec]:
            raise ValueError(f"material of key spec {label} is not an RSA-{_RSA_BITS[spec]} key")
        return key
    if spec in _ECC:
        curve = _ECC[spec][0]
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != curve.name:
            raise ValueError(f"material of key spec {label} is not a key on {curve.name}")
        return key
    raise ValueError(f"key spec {label} has no private key")


def check_material(spec: int, material: bytes) -> None:
    """Raise ValueError when `material` does not fit `spec` (its length, or its key type, size
    and curve): stored material that does not is an internal inconsistency."""
    label = spec_name(spec)
    if spec in _HMACS:  # imported HMAC keys may be longer, as AWS KMS allows
        low, high = _HMACS[spec].key_bytes, _HMACS[spec].max_bytes
        if not low <= len(material) <= high:
            raise ValueError(
                f"material of key spec {label} must be {low} to {high} bytes, not {len(material)}"
            )
        return
    if spec == keys_pb2.KEY_SPEC_SYMMETRIC_DEFAULT:
        if len(material) != _SYMMETRIC_KEY_BYTES:
            raise ValueError(
                f"material of key spec {label} must be {_SYMMETRIC_KEY_BYTES} bytes, "
                f"not {len(material)}"
            )
        return
    _load_private(spec, material)


def new_data_key_pair(spec: int) -> tuple[bytes, bytes]:
    """A fresh key pair for GenerateDataKeyPair: (PKCS#8 DER private key, DER SPKI public key)."""
    label = spec_name(spec)
    if spec not in DATA_KEY_PAIR_SPECS:
        raise InvalidInputError(
            f"a data key pair has key pair spec {_names(_SPECS, DATA_KEY_PAIR_SPECS)}; not {label}"
        )
    key = _generate_private(spec)
    return _pkcs8(key), _spki(key)


# --- messages --------------------------------------------------------------------------------


def _check_message(message: bytes, operations: str, hint: str = "") -> None:
    if not MIN_KMS_MESSAGE_BYTES <= len(message) <= MAX_KMS_MESSAGE_BYTES:
        raise InvalidInputError(
            f"the message is {len(message)} bytes; {operations} take "
            f"{MIN_KMS_MESSAGE_BYTES} to {MAX_KMS_MESSAGE_BYTES} bytes{hint}"
        )


def _signing_input(
    algorithm: int, scheme: _Signing, message: bytes, message_type: int
) -> hashes.HashAlgorithm | utils.Prehashed:
    """What the message is signed with: its hash for RAW, the hash prehashed for DIGEST, whose
    message must be exactly one digest long."""
    if message_type_name(message_type) == "RAW":
        hint = " (for a longer message, send its digest with message type DIGEST)"
        _check_message(message, "Sign and Verify", hint)
        return scheme.hash
    size = scheme.hash.digest_size
    if len(message) != size:
        raise InvalidInputError(
            f"a DIGEST message for {signing_algorithm_name(algorithm)} is a "
            f"SHA-{size * 8} digest of {size} bytes, not {len(message)}; "
            "send the digest, or the message itself as RAW"
        )
    return utils.Prehashed(scheme.hash)


def _rsa_signature_padding(scheme: _Signing) -> padding.AsymmetricPadding:
    if scheme.kind == "PSS":
        return padding.PSS(mgf=padding.MGF1(scheme.hash), salt_length=scheme.hash.digest_size)
    return padding.PKCS1v15()


def _oaep(hash_: hashes.HashAlgorithm) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hash_), algorithm=hash_, label=None)


def _oaep_hash(spec: int, algorithm: int) -> hashes.HashAlgorithm:
    """The OAEP hash of `algorithm` for an RSA key of `spec`; InvalidKeyUsageError otherwise."""
    label, name = spec_name(spec), encryption_algorithm_name(algorithm)
    if spec not in _RSA_BITS:
        raise InvalidKeyUsageError(
            f"key spec {label} does not encrypt with {name}; only RSA key specs use RSAES_OAEP"
        )
    if algorithm not in _OAEP_HASHES:
        raise InvalidKeyUsageError(
            f"key spec {label} encrypts with {_names(_ENCRYPTION, tuple(_OAEP_HASHES))}; not {name}"
        )
    return _OAEP_HASHES[algorithm]


def max_oaep_plaintext(spec: int, algorithm: int) -> int:
    """The longest plaintext an RSA key of `spec` encrypts with RSAES_OAEP `algorithm`: the
    modulus bytes less twice the hash length less 2 (RSA_2048 with SHA-256: 190)."""
    hash_ = _oaep_hash(spec, algorithm)
    return _RSA_BITS[spec] // 8 - 2 * hash_.digest_size - 2


# --- asymmetric keys -------------------------------------------------------------------------


class AsymmetricKey:
    """An RSA or ECC private key loaded once from its material, with the key's spec and usage,
    for Sign, Verify, Encrypt, Decrypt and GetPublicKey with AWS KMS's semantics."""

    __slots__ = ("_key", "_public_der", "_spec", "_usage")

    def __init__(self, spec: int, usage: int, key: _PrivateKey) -> None:
        check_spec_usage(spec, usage)
        if not is_asymmetric(spec):
            raise ValueError(f"key spec {spec_name(spec)} is not asymmetric")
        self._spec = spec
        self._usage = usage
        self._key = key
        self._public_der: bytes | None = None

    @classmethod
    def load(cls, spec: int, usage: int, material: bytes) -> AsymmetricKey:
        """Parse PKCS#8 DER `material` of `spec` (ValueError if it does not fit) for `usage`;
        parsing costs, so callers keep the result."""
        return cls(spec, usage, _load_private(spec, material))

    def __repr__(self) -> str:
        return f"AsymmetricKey(spec={spec_name(self._spec)}, usage={usage_name(self._usage)})"

    @property
    def spec(self) -> int:
        """The key spec (`KeySpec`)."""
        return self._spec

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo, as GetPublicKey returns it."""
        if self._public_der is None:
            self._public_der = _spki(self._key)
        return self._public_der

    def _scheme(self, algorithm: int) -> _Signing:
        """The signing scheme of `algorithm`, if this key signs with it."""
        if self._usage != keys_pb2.KEY_USAGE_SIGN_VERIFY:
            raise InvalidKeyUsageError(
                f"a key of key usage {usage_name(self._usage)} does not sign or verify; "
                "use a key of key usage SIGN_VERIFY"
            )
        name = signing_algorithm_name(algorithm)
        allowed = signing_algorithms(self._spec, self._usage)
        if algorithm not in allowed:
            raise InvalidKeyUsageError(
                f"key spec {spec_name(self._spec)} signs with {_names(_SIGNING, allowed)}; "
                f"not {name}"
            )
        return _SIGNING_SCHEMES[algorithm]

    def sign(self, algorithm: int, message: bytes, message_type: int) -> bytes:
        """Sign as AWS KMS Sign: a RAW message (1 to 4096 bytes) is hashed with the algorithm's
        hash, a DIGEST message is that hash's digest and is signed as it is."""
        scheme = self._scheme(algorithm)
        chosen = _signing_input(algorithm, scheme, message, message_type)
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(message, _rsa_signature_padding(scheme), chosen)
        return self._key.sign(message, ec.ECDSA(chosen))

    def verify(self, algorithm: int, message: bytes, message_type: int, signature: bytes) -> bool:
        """Whether `signature` is this key's signature of `message` (False for any wrong or
        malformed signature); bad arguments raise as in `sign`."""
        scheme = self._scheme(algorithm)
        chosen = _signing_input(algorithm, scheme, message, message_type)
        public = self._key.public_key()
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, message, _rsa_signature_padding(scheme), chosen)
            else:
                public.verify(signature, message, ec.ECDSA(chosen))
        except (InvalidSignature, ValueError):
            return False
        return True

    def _rsa_oaep(self, algorithm: int) -> tuple[rsa.RSAPrivateKey, padding.OAEP]:
        """The RSA key and OAEP padding of `algorithm`, if this key encrypts with it."""
        if self._usage != keys_pb2.KEY_USAGE_ENCRYPT_DECRYPT:
            raise InvalidKeyUsageError(
                f"a key of key usage {usage_name(self._usage)} does not encrypt or decrypt; "
                "use a key of key usage ENCRYPT_DECRYPT"
            )
        hash_ = _oaep_hash(self._spec, algorithm)  # only RSA keys get past it
        return cast(rsa.RSAPrivateKey, self._key), _oaep(hash_)

    def encrypt(self, algorithm: int, plaintext: bytes) -> bytes:
        """Encrypt with RSAES_OAEP under this key's public half; InvalidInputError for a
        plaintext longer than `max_oaep_plaintext`."""
        key, oaep = self._rsa_oaep(algorithm)
        limit = max_oaep_plaintext(self._spec, algorithm)
        if len(plaintext) > limit:
            raise InvalidInputError(
                f"the plaintext is {len(plaintext)} bytes; key spec {spec_name(self._spec)} "
                f"with {encryption_algorithm_name(algorithm)} encrypts at most {limit} bytes "
                "(use a data key for more)"
            )
        return key.public_key().encrypt(plaintext, oaep)

    def decrypt(self, algorithm: int, ciphertext: bytes) -> bytes:
        """Decrypt an RSAES_OAEP ciphertext of this key; InvalidCiphertextError (no detail) for
        anything that does not decrypt, including a length other than the modulus's."""
        key, oaep = self._rsa_oaep(algorithm)
        if len(ciphertext) != key.key_size // 8:
            raise InvalidCiphertextError()
        try:
            return key.decrypt(ciphertext, oaep)
        except ValueError:
            raise InvalidCiphertextError() from None


# --- HMAC ------------------------------------------------------------------------------------


def _hmac_of(spec: int, key: bytes, algorithm: int, message: bytes, operation: str) -> bytes:
    """The HMAC of `message` under `key` of `spec`, once the algorithm and message are checked."""
    label, name = spec_name(spec), mac_algorithm_name(algorithm)
    if spec not in _HMACS:
        raise InvalidKeyUsageError(
            f"key spec {label} does not {operation} MACs; use a key of key spec "
            f"{_names(_SPECS, tuple(_HMACS))}"
        )
    hmac_spec = _HMACS[spec]
    if algorithm != hmac_spec.algorithm:
        raise InvalidKeyUsageError(
            f"key spec {label} uses {mac_algorithm_name(hmac_spec.algorithm)}; not {name}"
        )
    check_material(spec, key)
    _check_message(message, "GenerateMac and VerifyMac")
    return hmac.new(key, message, hmac_spec.hash_name).digest()


def generate_mac(spec: int, key: bytes, algorithm: int, message: bytes) -> bytes:
    """GenerateMac: the HMAC of a 1 to 4096-byte message with the one algorithm of the key's
    HMAC spec (HMAC_256 with HMAC_SHA_256)."""
    return _hmac_of(spec, key, algorithm, message, "generate")


def verify_mac(spec: int, key: bytes, algorithm: int, message: bytes, mac: bytes) -> bool:
    """VerifyMac: whether `mac` is the HMAC of `message`, compared in constant time; bad
    arguments raise as in `generate_mac`."""
    return hmac.compare_digest(_hmac_of(spec, key, algorithm, message, "verify"), mac)
