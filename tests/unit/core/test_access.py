"""A key's access rules (`domain_core.access`): policy grants and key grants, with and without
conditions on the encryption context, and grant tokens (`domain_core.granttokens`)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from support.repository import VECTORS

from domain_core import access, granttokens
from domain_core.errors import (
    InvalidGrantTokenError,
    InvalidInputError,
    LimitExceededError,
    PermissionDeniedError,
)
from domain_core.limits import DEFAULT_LIMITS
from domain_core.policy import default_policy
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit

KEY_ID = "0f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
APP = "spiffe://test/client/app"
BOB = "spiffe://test/client/bob"
ENCRYPT, DECRYPT = keys_pb2.KEY_OPERATION_ENCRYPT, keys_pb2.KEY_OPERATION_DECRYPT
DESCRIBE = keys_pb2.KEY_OPERATION_DESCRIBE
DOMAIN_KEYS = {1: bytes(range(32)), 2: bytes(range(1, 33))}


def _conditions(
    equals: dict[str, str] | None = None, subset: dict[str, str] | None = None
) -> keys_pb2.ContextConditions:
    return keys_pb2.ContextConditions(
        encryption_context_equals=equals or {}, encryption_context_subset=subset or {}
    )


def _metadata(*grants: keys_pb2.KeyGrant, version: int = 3) -> keys_pb2.KeyMetadata:
    policy = default_policy(APP)
    policy.grants.append(
        keys_pb2.PolicyGrant(
            principals=[BOB], operations=[DECRYPT], conditions=_conditions(equals={"t": "a"})
        )
    )
    return keys_pb2.KeyMetadata(
        key_id=KEY_ID, policy=policy, grants=list(grants), metadata_version=version
    )


def _grant(**fields: object) -> keys_pb2.KeyGrant:
    values: dict[str, object] = {
        "grant_id": "ab" * 32,
        "grantee_principal": BOB,
        "operations": [ENCRYPT],
    }
    values.update(fields)
    return keys_pb2.KeyGrant(**values)  # type: ignore[arg-type]


def test_outright_and_conditional_rules() -> None:
    rules = access.access_rules(_metadata(_grant(constraints=_conditions(subset={"t": "a"}))))
    assert rules.allows(APP, ENCRYPT, {})
    assert rules.allows(APP, DESCRIBE, {"x": "y"})
    # bob: decrypt only with exactly {t: a} (policy), encrypt with t=a among others (grant).
    assert rules.allows(BOB, DECRYPT, {"t": "a"})
    assert not rules.allows(BOB, DECRYPT, {"t": "a", "u": "b"})
    assert not rules.allows(BOB, DECRYPT, {})
    assert rules.allows(BOB, ENCRYPT, {"t": "a", "u": "b"})
    assert not rules.allows(BOB, ENCRYPT, {"t": "b"})
    assert not rules.allows(BOB, DESCRIBE, {"t": "a"})
    assert not rules.allows("spiffe://test/client/carol", ENCRYPT, {})
    with pytest.raises(PermissionDeniedError, match=f"{BOB} may not encrypt with key {KEY_ID}"):
        rules.require(BOB, ENCRYPT, KEY_ID, {"t": "b"})


def test_grants_from_tokens_add_to_the_rules_for_one_call() -> None:
    rules = access.access_rules(_metadata())
    assert not rules.allows(BOB, ENCRYPT, {})
    widened = rules.with_grants([_grant()])
    assert widened.allows(BOB, ENCRYPT, {})
    assert not rules.allows(BOB, ENCRYPT, {})


def test_a_token_gives_its_grant_only_before_the_metadata_that_holds_it() -> None:
    grant = _grant(operations=[ENCRYPT, DECRYPT])
    token = granttokens.seal_grant_token(
        domain_id="test",
        key_id=KEY_ID,
        metadata_version=4,
        grant=grant,
        domain_key=DOMAIN_KEYS[2],
        generation=2,
    )
    opened = granttokens.open_grant_token(token, domain_id="test", domain_keys=DOMAIN_KEYS)
    assert (opened.key_id, opened.metadata_version, opened.grant) == (KEY_ID, 4, grant)
    assert granttokens.pending_grant(opened, _metadata(version=3)) == grant
    assert granttokens.pending_grant(opened, _metadata(version=4)) is None  # metadata decides
    assert granttokens.pending_grant(opened, _metadata(version=5)) is None  # e.g. retired
    other_key = _metadata(version=1)
    other_key.key_id = "1f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"
    assert granttokens.pending_grant(opened, other_key) is None


def test_a_token_opens_only_in_its_domain_and_unedited() -> None:
    token = granttokens.seal_grant_token(
        domain_id="test",
        key_id=KEY_ID,
        metadata_version=4,
        grant=_grant(),
        domain_key=DOMAIN_KEYS[1],
        generation=1,
    )
    for domain_id, keys in (("other", DOMAIN_KEYS), ("test", {2: DOMAIN_KEYS[2]})):
        with pytest.raises(InvalidGrantTokenError, match="invalid grant token"):
            granttokens.open_grant_token(token, domain_id=domain_id, domain_keys=keys)
    parsed = keys_pb2.GrantToken.FromString(token)
    for field, value in (
        ("key_id", "1f5a3c9e-1b2d-4e6f-8a7b-9c0d1e2f3a4b"),
        ("metadata_version", 5),
        ("domain_key_generation", 2),
        ("salt", bytes(32)),
        ("ciphertext", parsed.ciphertext[:-1] + bytes([parsed.ciphertext[-1] ^ 1])),
    ):
        edited = keys_pb2.GrantToken()
        edited.CopyFrom(parsed)
        setattr(edited, field, value)
        with pytest.raises(InvalidGrantTokenError):
            granttokens.open_grant_token(
                edited.SerializeToString(), domain_id="test", domain_keys=DOMAIN_KEYS
            )
    for junk in (b"", b"\xff\xff", token[:-2]):
        with pytest.raises(InvalidGrantTokenError):
            granttokens.open_grant_token(junk, domain_id="test", domain_keys=DOMAIN_KEYS)


def test_grant_validation() -> None:
    metadata = _metadata()
    access.validate_grant(_grant(), metadata, domain_id="test")
    refused = {
        "not a client": _grant(grantee_principal="spiffe://test/hsa/hsa-1"),
        "not a client of this domain": _grant(grantee_principal="spiffe://other/client/bob"),
        "cannot give administer": _grant(operations=[keys_pb2.KEY_OPERATION_ADMIN]),
        "cannot give revoke grants": _grant(operations=[keys_pb2.KEY_OPERATION_REVOKE_GRANT]),
        "at least one operation": _grant(operations=[]),
        "only with operations that take a context": _grant(
            operations=[DESCRIBE], constraints=_conditions(subset={"t": "a"})
        ),
        "printable": _grant(name="bad\nname"),
    }
    for message, grant in refused.items():
        with pytest.raises(InvalidInputError, match=message):
            access.validate_grant(grant, metadata, domain_id="test")
    full = _metadata(
        *[_grant(grant_id=f"{n:064x}") for n in range(DEFAULT_LIMITS.max_grants_per_key)]
    )
    with pytest.raises(LimitExceededError, match="most a key may hold"):
        access.validate_grant(_grant(), full, domain_id="test")
    policy = default_policy(APP)
    policy.grants.append(
        keys_pb2.PolicyGrant(
            principals=[BOB], operations=[ENCRYPT], conditions=_conditions(equals={"": "x"})
        )
    )
    with pytest.raises(InvalidInputError, match="a condition's context"):
        access.validate_policy_conditions(policy, DEFAULT_LIMITS)


def test_committed_grant_token_vector() -> None:
    """The grant token vector regenerates byte for byte and opens to its grant."""
    committed = json.loads((VECTORS / "ciphertext_vectors.json").read_text("utf-8"))
    keys, vector = committed["keys"], committed["grant_token"]
    spec = importlib.util.spec_from_file_location(
        "ciphertext_vector_generator_gt", VECTORS / "generate_ciphertext.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ciphertext_vector_generator_gt"] = module
    spec.loader.exec_module(module)
    assert vector == module.grant_token()
    opened = granttokens.open_grant_token(
        bytes.fromhex(vector["token"]),
        domain_id=vector["domain_id"],
        domain_keys={keys["domain_key_generation"]: bytes.fromhex(keys["domain_key"])},
    )
    assert (opened.key_id, opened.metadata_version) == (keys["key_id"], 7)
    assert opened.grant.SerializeToString(deterministic=True).hex() == vector["grant"]
