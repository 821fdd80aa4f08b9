"""Grants and encryption-context conditions through real HSA processes (issue 19, item 3).

The key's owner (the demo application) delegates use of its key to bob, with AWS KMS's grant
semantics: constraints on the encryption context, a token that works on every HSA at once,
retiring by the grantee, revoking by the owner, and key policy conditions (a key usable only
with tenant=acme). Carol, a third client, tries what she should not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

import pytest
from support.cluster import LocalCluster

from domain_core.errors import (
    InvalidGrantTokenError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge.ca_files import load_domain_ca
from domain_edge.kms_client import KeyClient

pytestmark = pytest.mark.cluster

T = TypeVar("T")
BOB = "spiffe://local/client/bob"
CAROL = "spiffe://local/client/carol"
APP = "spiffe://local/client/demo-app"
ACME = {"tenant": "acme"}


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("grants") / "domain", nodes=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


def _client(domain: LocalCluster, host: str, name: str = "demo-app") -> KeyClient:
    tls = domain.client_tls()
    cert_pem, key_pem = tls.cert_pem, tls.key_pem
    if name != "demo-app":
        ca = load_domain_ca(domain.layout.root / "ca")
        key_pem = new_tls_key_pem()
        cert_pem = ca.issue(
            SpiffeId("local", "client", name), tls_public_key(key_pem), now=datetime.now(UTC)
        )
    return KeyClient([domain.address(host)], ca_pem=tls.ca_pem, cert_pem=cert_pem, key_pem=key_pem)


@pytest.fixture(scope="module")
def clients(domain: LocalCluster) -> Iterator[dict[str, KeyClient]]:
    made = {
        "app-1": _client(domain, "hsa-1"),
        "app-2": _client(domain, "hsa-2"),
        "bob-1": _client(domain, "hsa-1", "bob"),
        "bob-2": _client(domain, "hsa-2", "bob"),
        "carol-1": _client(domain, "hsa-1", "carol"),
    }
    yield made
    for client in made.values():
        client.close()


def _eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (PermissionDeniedError, AssertionError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def test_a_grant_with_constraints_works_at_once_with_its_token_and_ends_when_retired(
    clients: dict[str, KeyClient],
) -> None:
    app, bob = clients["app-1"], clients["bob-2"]
    key = app.create_key(description="shared with bob")
    blob = app.encrypt(key.key_id, b"for acme", ACME)
    with pytest.raises(PermissionDeniedError, match="may not decrypt"):
        bob.decrypt(blob, ACME)
    created = app.create_grant(
        key.key_id,
        BOB,
        ["encrypt", "decrypt"],
        constraints={"encryption_context_subset": ACME},
        name="bob-reads-acme",
    )
    assert len(created.grant_id) == 64
    bob_now = bob.with_grant_tokens([created.grant_token])
    # Through the other HSA, at once: the token carries the grant until its metadata arrives.
    assert bob_now.decrypt(blob, ACME) == b"for acme"
    mine = bob_now.encrypt(key.key_id, b"bob's", {"tenant": "acme", "user": "b"})
    assert app.decrypt(mine, {"tenant": "acme", "user": "b"}) == b"bob's"
    # The constraint holds with or without the token.
    with pytest.raises(PermissionDeniedError):
        bob_now.encrypt(key.key_id, b"x", {"tenant": "other"})
    with pytest.raises(PermissionDeniedError):
        bob_now.encrypt(key.key_id, b"x")
    with pytest.raises(PermissionDeniedError, match="generate data keys"):
        bob_now.generate_data_key(key.key_id, ACME)
    # Without the token too, once the grant reached the HSA.
    assert _eventually(lambda: bob.decrypt(blob, ACME)) == b"for acme"
    (listed,) = list(app.list_grants(key.key_id))
    assert (listed.grant_id, listed.grantee_principal, listed.name) == (
        created.grant_id,
        BOB,
        "bob-reads-acme",
    )
    assert listed.operations == ("encrypt", "decrypt")
    assert listed.constraints == {"encryption_context_subset": ACME}
    assert listed.issuing_principal == APP
    # Carol may neither retire nor revoke it; bob retires it by its token.
    with pytest.raises(PermissionDeniedError):
        clients["carol-1"].retire_grant(key.key_id, created.grant_id)
    with pytest.raises(PermissionDeniedError):
        clients["carol-1"].revoke_grant(key.key_id, created.grant_id)
    bob.retire_grant(grant_token=created.grant_token)
    assert list(app.list_grants(key.key_id)) == []
    # Retired: refused on both HSAs, the token no help any more.
    for client in (clients["bob-1"].with_grant_tokens([created.grant_token]), bob_now):
        _eventually(lambda c=client: _refused(lambda: c.decrypt(blob, ACME)))  # type: ignore[misc]
    with pytest.raises(NotFoundError):
        app.revoke_grant(key.key_id, created.grant_id)


def _refused(call: Callable[[], object]) -> bool:
    with pytest.raises(PermissionDeniedError):
        call()
    return True


def test_the_owner_revokes_and_tokens_do_not_cross_keys(clients: dict[str, KeyClient]) -> None:
    app, bob = clients["app-1"], clients["bob-1"]
    first, second = app.create_key(), app.create_key()
    grant = app.create_grant(first.key_id, BOB, ["encrypt"], retiring_principal=CAROL)
    with_token = bob.with_grant_tokens([grant.grant_token])
    with_token.encrypt(first.key_id, b"ok")
    with pytest.raises(PermissionDeniedError):
        with_token.encrypt(second.key_id, b"not this key")
    edited = bytearray(grant.grant_token)
    edited[-5] ^= 1
    with pytest.raises(InvalidGrantTokenError, match="invalid grant token"):
        bob.with_grant_tokens([bytes(edited)]).encrypt(first.key_id, b"x")
    app.revoke_grant(first.key_id, grant.grant_id)
    _eventually(lambda: _refused(lambda: with_token.encrypt(first.key_id, b"revoked")))
    # A retiring principal retires (carol was named one in another grant).
    other = app.create_grant(first.key_id, BOB, ["describe"], retiring_principal=CAROL)
    clients["carol-1"].retire_grant(first.key_id, other.grant_id)


def test_what_a_grant_may_not_give(clients: dict[str, KeyClient]) -> None:
    app = clients["app-1"]
    key = app.create_key()
    with pytest.raises(InvalidInputError, match="cannot give administer"):
        app.create_grant(key.key_id, BOB, ["admin"])
    with pytest.raises(InvalidInputError, match="only with operations that take a context"):
        app.create_grant(
            key.key_id, BOB, ["describe"], constraints={"encryption_context_equals": ACME}
        )
    with pytest.raises(InvalidInputError, match="not a client"):
        app.create_grant(key.key_id, "spiffe://local/hsa/hsa-1", ["encrypt"])
    with pytest.raises(PermissionDeniedError, match="create grants"):
        clients["bob-1"].create_grant(key.key_id, CAROL, ["encrypt"])
    # A grantee given create-grant passes on what it holds itself, and nothing more.
    relay = app.create_grant(key.key_id, BOB, ["create-grant", "encrypt"])
    relaying = clients["bob-1"].with_grant_tokens([relay.grant_token])
    relaying.create_grant(key.key_id, CAROL, ["encrypt"])
    with pytest.raises(PermissionDeniedError, match="may not decrypt"):
        relaying.create_grant(key.key_id, CAROL, ["decrypt"])
    assert {g.grantee_principal for g in app.list_grants(key.key_id)} == {BOB, CAROL}


def test_key_policy_conditions_on_the_encryption_context(clients: dict[str, KeyClient]) -> None:
    app, bob = clients["app-1"], clients["bob-2"]
    key = app.create_key()
    app.put_key_policy(
        key.key_id,
        {
            "grants": [
                {"principals": [APP], "operations": ["admin", "encrypt", "decrypt", "describe"]},
                {
                    "principals": [BOB],
                    "operations": ["encrypt", "decrypt"],
                    "conditions": {"encryption_context_equals": ACME},
                },
            ]
        },
    )
    described = app.describe_key(key.key_id)
    assert described.policy[1].conditions == {"encryption_context_equals": ACME}
    blob = _eventually(lambda: bob.encrypt(key.key_id, b"acme only", ACME))
    assert bob.decrypt(blob, ACME) == b"acme only"
    with pytest.raises(PermissionDeniedError):
        bob.encrypt(key.key_id, b"x", {"tenant": "acme", "more": "1"})  # equals, not subset
    with pytest.raises(InvalidInputError, match="only with operations that take a context"):
        app.put_key_policy(
            key.key_id,
            {
                "grants": [
                    {"principals": [APP], "operations": ["admin"]},
                    {
                        "principals": [BOB],
                        "operations": ["describe"],
                        "conditions": {"encryption_context_subset": ACME},
                    },
                ]
            },
        )


def test_tags_through_both_hsas(clients: dict[str, KeyClient]) -> None:
    """Tags at creation, added, replaced and removed (as AWS KMS's TagResource and
    UntagResource), listed through the other HSA; reserved and oversized tags are refused,
    and bob, who may not administer the key, may not tag it."""
    app, other = clients["app-1"], clients["app-2"]
    key = app.create_key(tags={"team": "payments", "env": "prod"})
    assert key.tags == {"team": "payments", "env": "prod"}
    app.tag_resource(key.key_id, {"env": "staging", "owner": "ops"})
    assert _eventually(
        lambda: _same(
            other.list_resource_tags(key.key_id),
            {"team": "payments", "env": "staging", "owner": "ops"},
        )
    )
    untagged = app.untag_resource(key.key_id, ["owner", "not-there"])
    assert untagged.tags == {"team": "payments", "env": "staging"}
    unchanged = app.untag_resource(key.key_id, ["not-there"])
    assert unchanged.metadata_version == untagged.metadata_version  # nothing changed
    with pytest.raises(InvalidInputError, match="reserved"):
        app.tag_resource(key.key_id, {"aws:owner": "x"})
    with pytest.raises(InvalidInputError, match="128"):
        app.tag_resource(key.key_id, {"k" * 129: "x"})
    with pytest.raises(InvalidInputError, match="at most 50"):
        app.tag_resource(key.key_id, {f"t{n}": "v" for n in range(49)})
    with pytest.raises(PermissionDeniedError):
        clients["bob-1"].tag_resource(key.key_id, {"by": "bob"})
    many = app.create_key(tags={f"t{n:02d}": str(n) for n in range(50)})
    assert app.list_resource_tags(many.key_id) == {f"t{n:02d}": str(n) for n in range(50)}


def _same(found: dict[str, str], expected: dict[str, str]) -> bool:
    assert found == expected
    return True
