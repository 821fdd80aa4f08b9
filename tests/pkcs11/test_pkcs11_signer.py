"""Pkcs11Signer and generate_pkcs11_key against a real SoftHSM2 token in a temporary directory.

SoftHSM2 reads SOFTHSM2_CONF when the module is initialised; this module points it at its own
token directory and re-initialises the module, so it runs whatever loaded SoftHSM2 before it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Attribute, Mechanism, ObjectClass
from support.simulator import SimulatedDomain

from domain_core import quorum
from domain_core.errors import (
    AlreadyExistsError,
    BadSignatureError,
    InvalidCiphertextError,
    InvalidInputError,
    TokenError,
    TokenNotFoundError,
    WrongPassphraseError,
)
from domain_core.model import Manifest, Proposal, make_operator
from domain_core.recovery import build_package, open_operator_share, open_package
from domain_core.signers import InMemorySigner, PublicKey, SignatureAlgorithm
from domain_edge.pkcs11_signer import (
    Pkcs11RecoveryKey,
    Pkcs11Signer,
    generate_pkcs11_key,
    generate_pkcs11_recovery_key,
    new_cka_id,
)
from domain_edge.tokens import MODULE_ENV, Pkcs11TokenRef, open_token
from domain_proto import domain_pb2

pytestmark = pytest.mark.pkcs11

TOKEN_LABEL = "hsm-test"
OTHER_TOKEN_LABEL = "hsm-test-2"
PIN = "1234"
SO_PIN = "12345678"
ALGORITHMS = [SignatureAlgorithm.ED25519, SignatureAlgorithm.ECDSA_P256]


@dataclass(frozen=True)
class SoftHsm:
    module: str
    conf: Path
    token_label: str = TOKEN_LABEL
    pin: str = PIN

    def pin_callback(self) -> str:
        return self.pin

    def generate(self, algorithm: SignatureAlgorithm | None, label: str) -> tuple[PublicKey, bytes]:
        cka_id = new_cka_id()
        public_key = generate_pkcs11_key(
            self.module, self.token_label, self.pin, label, algorithm, cka_id=cka_id
        )
        return public_key, cka_id

    def open(self, label: str | None, cka_id: bytes | None = None) -> Pkcs11Signer:
        return Pkcs11Signer.open(
            self.module, self.token_label, label, cka_id, pin_callback=self.pin_callback
        )


@pytest.fixture(scope="module")
def _softhsm_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, SoftHsm]]:
    """Holds this module's SoftHSM2 (made on first use); restores SOFTHSM2_CONF afterwards."""
    previous = os.environ.get("SOFTHSM2_CONF")
    state: dict[str, SoftHsm] = {}
    yield state
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def softhsm(
    softhsm2_util_bin: str,
    softhsm2_module: str,
    _softhsm_state: dict[str, SoftHsm],
    tmp_path_factory: pytest.TempPathFactory,
) -> SoftHsm:
    """Two initialised SoftHSM2 tokens in a private token directory, shared by this module."""
    if "hsm" not in _softhsm_state:
        directory = tmp_path_factory.mktemp("softhsm2")
        (directory / "tokens").mkdir()
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {directory / 'tokens'}\n"
            "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
        for label in (TOKEN_LABEL, OTHER_TOKEN_LABEL):
            subprocess.run(
                [softhsm2_util_bin, "--init-token", "--free", "--label", label,
                 "--so-pin", SO_PIN, "--pin", PIN],
                env=env, check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        os.environ["SOFTHSM2_CONF"] = str(conf)
        # SoftHSM2 reads its configuration in C_Initialize: (re)initialise so that it does.
        pkcs11.lib(softhsm2_module).reinitialize()
        _softhsm_state["hsm"] = SoftHsm(module=softhsm2_module, conf=conf)
    return _softhsm_state["hsm"]


def _raw_session(hsm: SoftHsm) -> pkcs11.Session:
    token = pkcs11.lib(hsm.module).get_token(token_label=hsm.token_label)
    return token.open(user_pin=hsm.pin)


def _proposal_and_operator(public_key: PublicKey) -> tuple[Proposal, domain_pb2.Operator]:
    domain = SimulatedDomain.create(operators=1, threshold=1)
    proposal = domain.propose([SimulatedDomain.rotate_domain_key_change()])
    return proposal, make_operator("hardware-op", public_key)


# --- generation and signing ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generated_key_signs_and_verifies(softhsm: SoftHsm, algorithm: SignatureAlgorithm) -> None:
    public_key, cka_id = softhsm.generate(algorithm, f"sign-{algorithm.value}")
    assert public_key.algorithm is algorithm
    with softhsm.open(f"sign-{algorithm.value}", cka_id) as signer:
        assert signer.public_key == public_key
        assert signer.cka_id == cka_id
        message = b"approve proposal 42"
        signature = signer.sign(message)
        public_key.verify(signature, message)
        with pytest.raises(BadSignatureError):
            public_key.verify(signature, message + b"!")

        # The same check as any verifier, with `cryptography` directly.
        loaded = serialization.load_der_public_key(public_key.spki_der)
        if algorithm is SignatureAlgorithm.ED25519:
            assert len(signature) == 64
            assert isinstance(loaded, ed25519.Ed25519PublicKey)
            loaded.verify(signature, message)
        else:
            decode_dss_signature(signature)  # DER, not raw r||s
            assert isinstance(loaded, ec.EllipticCurvePublicKey)
            loaded.verify(signature, message, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_approval_from_token_counts_for_its_operator_record(
    softhsm: SoftHsm, algorithm: SignatureAlgorithm
) -> None:
    public_key, cka_id = softhsm.generate(algorithm, f"approve-{algorithm.value}")
    proposal, operator = _proposal_and_operator(public_key)
    with softhsm.open(None, cka_id) as signer:
        approval = quorum.approve(proposal, signer)
    assert approval.operator_id == operator.operator_id
    quorum.verify_approval_signature(approval, proposal.id, public_key)
    result = quorum.count_approvals(
        [operator], {public_key.key_id: public_key}, proposal.id, [approval], threshold=1
    )
    assert result.met


def test_default_algorithm_is_ed25519_where_the_token_offers_eddsa(softhsm: SoftHsm) -> None:
    with _raw_session(softhsm) as session:
        assert Mechanism.EDDSA in session.token.slot.get_mechanisms()
    public_key, _ = softhsm.generate(None, "default-alg")
    assert public_key.algorithm is SignatureAlgorithm.ED25519


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_private_key_never_leaves_the_token(
    softhsm: SoftHsm, algorithm: SignatureAlgorithm
) -> None:
    _, cka_id = softhsm.generate(algorithm, f"protected-{algorithm.value}")
    with _raw_session(softhsm) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.PRIVATE] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.DECRYPT] is False
        assert key[Attribute.DERIVE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
    with softhsm.open(None, cka_id) as signer:
        assert signer.never_leaves_token


def test_public_key_matches_the_token_ec_point(softhsm: SoftHsm) -> None:
    """The SPKI (hence key id) is built from the token's EC_POINT as a file signer builds it."""
    public_key, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "spki")
    with _raw_session(softhsm) as session:
        point = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=cka_id)[Attribute.EC_POINT]
    assert point[:2] == b"\x04\x20"  # DER OCTET STRING of 32 bytes
    expected = ed25519.Ed25519PublicKey.from_public_bytes(point[2:]).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key.spki_der == expected
    assert public_key.key_id == hashlib.sha256(expected).hexdigest()
    assert public_key.raw_ed25519() == point[2:]


def test_key_id_is_stable_across_reopen(softhsm: SoftHsm) -> None:
    public_key, cka_id = softhsm.generate(SignatureAlgorithm.ECDSA_P256, "stable")
    with softhsm.open("stable", cka_id) as first:
        first_id = first.key_id
    with softhsm.open("stable", cka_id) as second:
        assert second.key_id == first_id == public_key.key_id
    ref = Pkcs11TokenRef(softhsm.module, softhsm.token_label, "stable", cka_id)
    signer = open_token(ref.uri, lambda: softhsm.pin.encode())
    try:
        assert signer.key_id == first_id
    finally:
        assert isinstance(signer, Pkcs11Signer)
        signer.close()


def test_open_token_takes_the_module_from_the_environment(softhsm: SoftHsm) -> None:
    public_key, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "env-module")
    uri = Pkcs11TokenRef("/unused.so", softhsm.token_label, None, cka_id).uri.split("?")[0]
    signer = open_token(uri, lambda: softhsm.pin.encode(), environ={MODULE_ENV: softhsm.module})
    assert isinstance(signer, Pkcs11Signer)
    with signer:
        assert signer.public_key == public_key


def test_pin_may_be_bytes_or_str(softhsm: SoftHsm) -> None:
    public_key, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "pin-types")
    pins: list[bytes | str] = [PIN, PIN.encode()]
    for pin in pins:

        def callback(value: bytes | str = pin) -> bytes | str:
            return value

        with Pkcs11Signer.open(
            softhsm.module, softhsm.token_label, None, cka_id, pin_callback=callback
        ) as signer:
            assert signer.public_key == public_key
            message = f"signed after logging in with a {type(pin).__name__} PIN".encode()
            signature = signer.sign(message)
            public_key.verify(signature, message)  # the token's key signed it
            with pytest.raises(BadSignatureError):
                public_key.verify(signature, message + b"!")


def test_sign_is_thread_safe(softhsm: SoftHsm) -> None:
    public_key, cka_id = softhsm.generate(SignatureAlgorithm.ECDSA_P256, "threads")
    failures: list[BaseException] = []
    with softhsm.open(None, cka_id) as signer:

        def work(n: int) -> None:
            try:
                for i in range(25):
                    message = f"{n}-{i}".encode()
                    public_key.verify(signer.sign(message), message)
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []


def test_closed_signer_refuses_to_sign(softhsm: SoftHsm) -> None:
    _, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "closing")
    signer = softhsm.open(None, cka_id)
    signer.close()
    signer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        signer.sign(b"x")


# --- refusals ------------------------------------------------------------------------------


def test_wrong_pin(softhsm: SoftHsm) -> None:
    _, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "wrong-pin")
    with pytest.raises(WrongPassphraseError, match=f"^wrong PIN for token {TOKEN_LABEL}$") as e:
        Pkcs11Signer.open(
            softhsm.module, softhsm.token_label, None, cka_id, pin_callback=lambda: "98765"
        )
    assert "98765" not in str(e.value)


def test_wrong_pin_while_this_process_is_logged_in(softhsm: SoftHsm) -> None:
    """PKCS#11 login is per process and token: a second session must still check its PIN."""
    _, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "second-session")
    with softhsm.open(None, cka_id):
        with pytest.raises(WrongPassphraseError):
            Pkcs11Signer.open(
                softhsm.module, softhsm.token_label, None, cka_id, pin_callback=lambda: "0000"
            )
        with softhsm.open(None, cka_id) as second:
            second.sign(b"the right PIN still opens it")


def test_unknown_token_label(softhsm: SoftHsm) -> None:
    asked: list[int] = []

    def pin() -> str:
        asked.append(1)
        return PIN

    with pytest.raises(TokenNotFoundError, match="no token labelled 'no-such-token'") as e:
        Pkcs11Signer.open(softhsm.module, "no-such-token", "k", pin_callback=pin)
    assert TOKEN_LABEL in str(e.value)  # lists the tokens present
    assert asked == []  # the PIN is asked only once the token is found


def test_unknown_key_label(softhsm: SoftHsm) -> None:
    with pytest.raises(TokenNotFoundError, match="label 'no-such-key'"):
        softhsm.open("no-such-key")
    with pytest.raises(TokenNotFoundError, match="id %de%ad"):
        softhsm.open(None, b"\xde\xad")


def test_key_on_another_token_is_not_found(softhsm: SoftHsm) -> None:
    _, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "only-on-first")
    with pytest.raises(TokenNotFoundError):
        Pkcs11Signer.open(
            softhsm.module, OTHER_TOKEN_LABEL, None, cka_id, pin_callback=softhsm.pin_callback
        )


def test_module_that_does_not_load(softhsm: SoftHsm, tmp_path: Path) -> None:
    missing = tmp_path / "missing.so"
    with pytest.raises(TokenNotFoundError, match=f"no PKCS#11 module at {missing}"):
        Pkcs11Signer.open(str(missing), TOKEN_LABEL, "k", pin_callback=softhsm.pin_callback)
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_bytes(b"not an ELF file")
    with pytest.raises(TokenNotFoundError, match=f"cannot load PKCS#11 module {not_a_module}"):
        Pkcs11Signer.open(str(not_a_module), TOKEN_LABEL, "k", pin_callback=softhsm.pin_callback)


def test_two_keys_with_one_label_need_an_id(softhsm: SoftHsm) -> None:
    first, first_id = softhsm.generate(SignatureAlgorithm.ED25519, "twice")
    second, second_id = softhsm.generate(SignatureAlgorithm.ED25519, "twice")
    assert first != second
    with pytest.raises(TokenError, match=r"2 private keys .* match label 'twice'.*id=") as e:
        softhsm.open("twice")
    assert not isinstance(e.value, TokenNotFoundError)
    assert first_id.hex() in str(e.value).replace("%", "")
    with softhsm.open("twice", first_id) as signer:
        assert signer.public_key == first
    with softhsm.open("twice", second_id) as signer:
        assert signer.public_key == second


def test_generation_refuses_an_id_in_use(softhsm: SoftHsm) -> None:
    _, cka_id = softhsm.generate(SignatureAlgorithm.ED25519, "id-in-use")
    with pytest.raises(AlreadyExistsError, match="already holds an object with id"):
        generate_pkcs11_key(
            softhsm.module, TOKEN_LABEL, PIN, "other", SignatureAlgorithm.ED25519, cka_id=cka_id
        )


def test_generation_with_a_wrong_pin(softhsm: SoftHsm) -> None:
    with pytest.raises(WrongPassphraseError):
        generate_pkcs11_key(softhsm.module, TOKEN_LABEL, "0000", "k", SignatureAlgorithm.ED25519)


# --- recovery keys (issue 16): P-256 ECDH on the token ---------------------------------------


def _recovery_key(hsm: SoftHsm, label: str) -> tuple[bytes, bytes]:
    cka_id = new_cka_id()
    spki = generate_pkcs11_recovery_key(hsm.module, hsm.token_label, hsm.pin, label, cka_id=cka_id)
    return spki, cka_id


def test_a_recovery_key_agrees_on_the_token_and_never_leaves_it(softhsm: SoftHsm) -> None:
    spki, cka_id = _recovery_key(softhsm, "recovery-1")
    public = serialization.load_der_public_key(spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    session = _raw_session(softhsm)
    try:
        (private,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
        )
        assert private[Attribute.SENSITIVE]
        assert not private[Attribute.EXTRACTABLE]
        assert private[Attribute.DERIVE]
        assert not private[Attribute.SIGN]
    finally:
        session.close()
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    with Pkcs11RecoveryKey.open(
        softhsm.module, softhsm.token_label, cka_id=cka_id, pin_callback=softhsm.pin_callback
    ) as key:
        assert key.public_key == spki
        assert key.agree(point) == ephemeral.exchange(ec.ECDH(), public)
        with pytest.raises(InvalidInputError, match="65-byte uncompressed point"):
            key.agree(point[:33])
        with pytest.raises(InvalidInputError, match="not a point on P-256"):
            key.agree(b"\x04" + b"\x01" * 64)
    session = _raw_session(softhsm)
    try:  # the derived secrets were session objects, destroyed after reading
        assert not list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
    finally:
        session.close()


def test_a_share_sealed_to_a_token_key_opens_only_on_that_token(softhsm: SoftHsm) -> None:
    spki, cka_id = _recovery_key(softhsm, "recovery-2")
    others = []
    operators = []
    for name in ("tok", "a", "b"):
        operator = make_operator(
            name, InMemorySigner.generate(SignatureAlgorithm.ED25519).public_key
        )
        if name == "tok":
            key = domain_pb2.RecoveryKey(
                algorithm=domain_pb2.RECOVERY_ALGORITHM_P256, public_key=spki
            )
        else:
            private = ec.generate_private_key(ec.SECP256R1())
            others.append(private)
            key = domain_pb2.RecoveryKey(
                algorithm=domain_pb2.RECOVERY_ALGORITHM_P256,
                public_key=private.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        operator.recovery_key.CopyFrom(key)
        operators.append(operator)
    manifest = Manifest.from_message(
        domain_pb2.Manifest(
            domain_id="local",
            version=4,
            previous_state_hash=b"\x07" * 32,
            operators=operators,
            quorum=domain_pb2.QuorumPolicy(threshold=2, recovery_threshold=2),
            settings=domain_pb2.DomainSettings(key_generations_retained=7),
            key_generations=[domain_pb2.KeyGeneration(generation=1)],
            created_at=1_800_000_000,
        )
    )
    keys = {1: os.urandom(32)}
    package = build_package(manifest, keys)
    assert package is not None
    tok_id, other_id = operators[0].operator_id, operators[1].operator_id
    with Pkcs11RecoveryKey.open(
        softhsm.module, softhsm.token_label, cka_id=cka_id, pin_callback=softhsm.pin_callback
    ) as key:
        mine = open_operator_share(manifest, package, tok_id, key.agree)
        with pytest.raises(InvalidCiphertextError):  # another operator's share, this token
            open_operator_share(manifest, package, other_id, key.agree)

    def other_agree(ephemeral: bytes) -> bytes:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ephemeral)
        return others[0].exchange(ec.ECDH(), peer)

    theirs = open_operator_share(manifest, package, other_id, other_agree)
    assert open_package(manifest, package, [mine, theirs]) == keys


def test_signing_and_recovery_keys_do_not_stand_in_for_each_other(softhsm: SoftHsm) -> None:
    _, signing_id = softhsm.generate(SignatureAlgorithm.ECDSA_P256, "sign-not-recovery")
    _, recovery_id = _recovery_key(softhsm, "recovery-not-sign")
    with pytest.raises(TokenError, match="not allowed to derive"):
        Pkcs11RecoveryKey.open(
            softhsm.module,
            softhsm.token_label,
            cka_id=signing_id,
            pin_callback=softhsm.pin_callback,
        )
    with pytest.raises(TokenError, match="not allowed to sign"):
        softhsm.open(None, recovery_id)
