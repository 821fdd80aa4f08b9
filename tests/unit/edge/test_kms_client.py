"""KeyClient and hsm-kms without a domain: which calls are sent again, and the CLI's arguments.

The retry rules are the point: a call that changes nothing may go to the next HSA after an
UNAVAILABLE-class failure; CreateKey and the admin calls go again only when gRPC says that no
connection was made (so no server saw them); a refusal or a failed verification never goes
again. The pure rules are tested as a table; the behaviour against scripted key services
(real gRPC servers with mutual TLS in this process, marked `integration`), which also answer
with real ciphertexts so that envelope encryption and the CLI run end to end.
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support.scripted_kms import Domain, Pki, free_port_address, make_pki, scripted_domain

from domain_core import ciphertext, envelope
from domain_core.errors import (
    ConflictError,
    FailedPreconditionError,
    InvalidCiphertextError,
    InvalidInputError,
    LimitExceededError,
    NotAppliedError,
    NotFoundError,
    PermissionDeniedError,
    StaleProposalError,
    ThrottledError,
    UnavailableError,
)
from domain_core.limits import Limits
from domain_edge.client import error_from_rpc
from domain_edge.kms_client import (
    ADMIN_METHODS,
    IDEMPOTENT_METHODS,
    KEYED_METHODS,
    ImportParameters,
    KeyClient,
    backoff_delay,
    checked_context,
    decrypt_envelope,
    encrypt_envelope,
    never_sent,
    policy_from_json,
    policy_to_json,
    retryable,
)
from domain_edge.kms_client._session import SESSION_FIELDS
from domain_proto import keys_pb2, services_pb2
from kms_tool import cli as kms_cli

unit = pytest.mark.unit
integration = pytest.mark.integration

Code = grpc.StatusCode
CONNECT_FAILED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
    "Failed to connect to remote host: Connection refused"
)
ALL_METHODS = sorted(IDEMPOTENT_METHODS | KEYED_METHODS | ADMIN_METHODS)


# --- the rules, as a table -------------------------------------------------------------------


@unit
def test_every_key_service_call_is_classified_once() -> None:
    rpcs = set(services_pb2.DESCRIPTOR.services_by_name["KeyService"].methods_by_name)
    # Session carries calls, it is none itself; every call it carries is idempotent, so a
    # session that ends under calls in flight leaves them safe to send again.
    assert rpcs - {"Session"} == IDEMPOTENT_METHODS | KEYED_METHODS | ADMIN_METHODS
    assert set(SESSION_FIELDS) <= IDEMPOTENT_METHODS
    assert not IDEMPOTENT_METHODS & ADMIN_METHODS
    assert not KEYED_METHODS & (IDEMPOTENT_METHODS | ADMIN_METHODS)
    assert {"CreateKey"} == KEYED_METHODS
    assert {"RotateKey", "PutKeyPolicy", "ScheduleKeyDeletion"} <= ADMIN_METHODS


@unit
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize(
    ("code", "details", "idempotent_retries", "admin_retries"),
    [
        # No connection at all: nothing was sent, anything may go to the next HSA.
        (Code.UNAVAILABLE, CONNECT_FAILED, True, True),
        (Code.UNAVAILABLE, "DNS resolution failed for hsa-9:443", True, True),
        # Lost mid-call, or said by a server: it may have been applied.
        (Code.UNAVAILABLE, "Socket closed", True, False),
        (Code.UNAVAILABLE, "the coordinator is unreachable; retry later", True, False),
        (Code.DEADLINE_EXCEEDED, "Deadline Exceeded", True, False),
        # Refusals, bad input, failed verification: never again.
        (Code.INVALID_ARGUMENT, "invalid ciphertext", False, False),
        (Code.PERMISSION_DENIED, "principal may not decrypt", False, False),
        (Code.NOT_FOUND, "no key", False, False),
        (Code.FAILED_PRECONDITION, "key is disabled", False, False),
        (Code.UNAUTHENTICATED, "no certificate", False, False),
        (Code.ABORTED, "lost a compare-and-swap", False, False),
        (Code.RESOURCE_EXHAUSTED, "message too large", False, False),
        (Code.INTERNAL, "internal error", False, False),
        (Code.UNKNOWN, "failed to connect to all addresses", False, False),
        (None, CONNECT_FAILED, False, False),
    ],
)
def test_retry_rules(
    method: str,
    code: grpc.StatusCode | None,
    details: str,
    idempotent_retries: bool,
    admin_retries: bool,
) -> None:
    safe = method in IDEMPOTENT_METHODS or method in KEYED_METHODS
    expected = idempotent_retries if safe else admin_retries
    assert retryable(method, code, details) is expected
    # The HSA's own word that nothing was applied makes any call safe to send again.
    assert retryable(method, code, details, applied_nothing=True)


@unit
@pytest.mark.parametrize(
    ("first", "maximum", "step", "expected"),
    [
        (0.25, 5.0, 0, 0.25),
        (0.25, 5.0, 1, 0.5),
        (0.25, 5.0, 4, 4.0),
        (0.25, 5.0, 5, 5.0),
        (0.25, 5.0, 1023, 5.0),
        (0.25, 5.0, 1024, 5.0),  # 2 ** 1024 overflowed a float: the OverflowError
        (0.25, 5.0, 10**9, 5.0),
        (0.05, 1.0, 2**70, 1.0),
        (0.05, 1.0, -3, 0.05),
    ],
)
def test_backoff_is_bounded_at_any_number_of_failures(
    first: float, maximum: float, step: int, expected: float
) -> None:
    started = time.perf_counter()
    assert backoff_delay(first, maximum, step) == expected
    # No huge power is ever computed (2 ** 10**9 as an integer takes far longer); the bound is
    # loose so that a busy machine's scheduling cannot fail it.
    assert time.perf_counter() - started < 0.25


@integration
def test_a_dead_endpoint_cools_down_after_thousands_of_failures(pki: Pki) -> None:
    """The issue's failure: after about 1,000 consecutive failures of one endpoint, the
    cool-down computation overflowed and the caller got a foreign OverflowError. A dead
    endpoint refuses connections at once, so thousands of failures take a second here."""
    dead = free_port_address()
    client = KeyClient(
        [dead],
        ca_pem=pki.ca_pem,
        cert_pem=pki.client.cert_pem,
        key_pem=pki.client.key_pem,
        attempts=1,
    )
    outcomes: Counter[str] = Counter()
    with client:
        for _ in range(3000):
            try:
                client.generate_random(8)
            except NotAppliedError:
                outcomes["NotAppliedError"] += 1
            except BaseException as error:  # anything else is what the issue found
                outcomes[repr(error)] += 1
                break
    assert outcomes == {"NotAppliedError": 3000}


@unit
def test_never_sent_needs_gRPCs_own_words_at_the_start() -> None:
    assert never_sent(Code.UNAVAILABLE, CONNECT_FAILED)
    # A server message quoting a connection failure further on is the server speaking.
    assert not never_sent(Code.UNAVAILABLE, f"the coordinator is unreachable ({CONNECT_FAILED})")
    assert not never_sent(Code.DEADLINE_EXCEEDED, CONNECT_FAILED)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@unit
def test_the_shared_error_mapping_speaks_for_the_key_service() -> None:
    overrides = {Code.ABORTED: ConflictError}
    error = error_from_rpc(FakeRpcError(Code.ABORTED, "lost"), "h:1", overrides=overrides)
    assert type(error) is ConflictError
    # The coordinator's meaning is unchanged without overrides.
    assert type(error_from_rpc(FakeRpcError(Code.ABORTED, "x"), "h:1")) is StaleProposalError
    bad = error_from_rpc(FakeRpcError(Code.INVALID_ARGUMENT, "invalid ciphertext"), "h:1")
    assert type(bad) is InvalidCiphertextError
    down = error_from_rpc(FakeRpcError(Code.UNAVAILABLE, "refused"), "h:1", peer="the HSA")
    assert str(down) == "the HSA at h:1 is unreachable (refused); check that it runs"


# --- policy JSON -----------------------------------------------------------------------------


@unit
def test_policy_json_round_trip_and_enum_names() -> None:
    document = {
        "grants": [
            {
                "principals": ["spiffe://local/client/demo-app"],
                "operations": ["encrypt", "DECRYPT", "KEY_OPERATION_ADMIN", "re_encrypt_from"],
            }
        ]
    }
    policy = policy_from_json(document)
    assert list(policy.grants[0].operations) == [
        keys_pb2.KEY_OPERATION_ENCRYPT,
        keys_pb2.KEY_OPERATION_DECRYPT,
        keys_pb2.KEY_OPERATION_ADMIN,
        keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
    ]
    assert policy_to_json(policy) == {
        "grants": [
            {
                "principals": ["spiffe://local/client/demo-app"],
                "operations": ["encrypt", "decrypt", "admin", "re-encrypt-from"],
            }
        ]
    }


@unit
@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "nothing else"),
        ({"grants": [], "extra": 1}, "nothing else"),
        ({"grants": {}}, "must be a list"),
        ({"grants": [{"principals": ["a"]}]}, "grant 1"),
        ({"grants": [{"principals": "a", "operations": []}]}, "principals must be a list"),
        ({"grants": [{"principals": ["a"], "operations": ["encrypt", "fly"]}]}, "'fly'"),
        ({"grants": [{"principals": ["a"], "operations": [7]}]}, "strings"),
    ],
)
def test_policy_json_refuses_anything_unexpected(document: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        policy_from_json(document)


# --- CLI arguments ---------------------------------------------------------------------------


@unit
def test_context_arguments() -> None:
    assert kms_cli.parse_context([]) == {}
    assert kms_cli.parse_context(["app=orders", "tenant=7"]) == {"app": "orders", "tenant": "7"}
    # Split at the first '=': the value keeps the rest.
    assert kms_cli.parse_context(["q=a=b==c"]) == {"q": "a=b==c"}
    assert kms_cli.parse_context(["ключ=значение"]) == {"ключ": "значение"}
    for bad, why in [
        (["=x"], "empty key"),
        (["x="], "empty value"),
        (["novalue"], "not key=value"),
        (["a=1", "a=2"], "given twice"),
    ]:
        with pytest.raises(ValueError, match=why):
            kms_cli.parse_context(bad)


@unit
def test_context_parsing_in_the_parser() -> None:
    parser = kms_cli.build_parser()
    args = parser.parse_args(
        ["encrypt", "--key-id", "k", "--context", "a=1", "b=x=y", "--context", "c=3"]
    )
    assert args.context == [("a", "1"), ("b", "x=y"), ("c", "3")]
    # Options common to every command may come before or after the command name.
    args = parser.parse_args(["--json", "--cluster", "d", "list-keys"])
    assert (args.json, args.cluster) == (True, "d")
    args = parser.parse_args(["list-keys", "--json", "--endpoint", "a:1", "--endpoint", "b:2"])
    assert (args.json, args.endpoint) == (True, ["a:1", "b:2"])
    assert parser.parse_args(["list-keys"]).json is False


COMMANDS = [
    "create-key",
    "describe-key",
    "list-keys",
    "encrypt",
    "decrypt",
    "re-encrypt",
    "generate-data-key",
    "generate-random",
    "sign",
    "verify",
    "get-public-key",
    "generate-mac",
    "verify-mac",
    "generate-data-key-pair",
    "import-key-material",
    "delete-imported-key-material",
    "tag-resource",
    "untag-resource",
    "list-resource-tags",
    "rotate-key",
    "enable-key",
    "disable-key",
    "cancel-key-deletion",
    "put-key-policy",
    "schedule-key-deletion",
    "create-grant",
    "list-grants",
    "retire-grant",
    "revoke-grant",
    "envelope-encrypt",
    "envelope-decrypt",
]


@unit
def test_the_command_list_is_complete() -> None:
    parser = kms_cli.build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(actions[0].choices) == sorted(COMMANDS)


@unit
@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_every_help_has_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert kms_cli.main([*command, "--help"]) == 0
    assert "Example:" in capsys.readouterr().out


@unit
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["no-such-command"], "invalid choice"),
        (["encrypt"], "--key-id"),
        (["encrypt", "--key-id", "k", "--context", "=v"], "empty key"),
        (["encrypt", "--key-id", "k", "--context", "a=1", "a=2", "--cluster", "x"], "twice"),
        (["schedule-key-deletion"], "KEY_ID"),
        (["generate-random", "--bytes", "0"], "at least 1"),
        (["generate-random", "--bytes", str(2**32)], "below 2^32"),
        (["create-key", "--rotation-period-days", "-1"], "at least 0"),
        (["list-keys", "--timeout", "-1"], "more than 0"),
        (["envelope-encrypt", "--key-id", "k", "--chunk-size", "16777217"], "chunk size"),
        (["list-keys"], "--cluster DIR"),
        (["list-keys", "--endpoint", "127.0.0.1:1", "--ca", "ca.crt"], "--ca, --cert and --key"),
    ],
)
def test_bad_usage_exits_2(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(kms_cli.CLUSTER_ENV, raising=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "domain.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert kms_cli.main(argv) == 2
    assert message in capsys.readouterr().err


@unit
def test_a_directory_without_a_domain_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert kms_cli.main(["list-keys", "--cluster", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "holds no local domain" in err


# --- scripted key services (tests/support/scripted_kms.py) ---------------------------------


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(params=["threads", "asyncio"])
def domain(pki: Pki, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Domain]:
    """Scripted HSAs whose `client()` is a `KeyClient`, then an `AsyncKeyClient` (driven from
    this blocking code): both clients keep every rule these tests check."""
    with scripted_domain(pki, tmp_path, use_asyncio=request.param == "asyncio") as found:
        yield found


@pytest.fixture
def cli_domain(pki: Pki, tmp_path: Path) -> Iterator[Domain]:
    """Scripted HSAs for hsm-kms (which uses `KeyClient`)."""
    with scripted_domain(pki, tmp_path) as found:
        yield found


@integration
def test_calls_spread_round_robin(domain: Domain) -> None:
    client = domain.client()
    key_id = client.create_key().key_id
    for _ in range(30):
        assert client.describe_key(key_id).key_id == key_id
    assert [s.calls["DescribeKey"] for s in domain.services] == [10, 10, 10]


@integration
def test_idempotent_calls_fail_over_on_unavailable_and_deadline(domain: Domain) -> None:
    key_id = domain.client(timeout=5).create_key().key_id
    # A fresh client: its calls go round-robin from HSA 0 (the key was made by another one,
    # so that a slow CreateKey on a busy machine cannot move the order).
    client = domain.client(timeout=0.5)
    # HSA 0 says UNAVAILABLE itself (e.g. it is restarting): HSA 1 encrypts.
    domain.services[0].script["Encrypt"] = [("abort", Code.UNAVAILABLE, "restarting")]
    blob = client.encrypt(key_id, b"payload", {"app": "t"})
    assert [s.calls["Encrypt"] for s in domain.services] == [1, 1, 0]
    # HSA 2, next in turn, is too slow to answer in time: another one decrypts.
    domain.services[2].script["Decrypt"] = [("sleep", 3.0)]
    started = time.monotonic()
    assert client.decrypt(blob, {"app": "t"}) == b"payload"
    assert domain.services[2].calls["Decrypt"] == 1
    assert sum(s.calls["Decrypt"] for s in domain.services) == 2
    assert time.monotonic() - started < 2.5  # the slow answer was not waited for
    # Every HSA fails once: after a round over all of them, the next round succeeds.
    for service in domain.services:
        service.script["GenerateRandom"] = [("abort", Code.UNAVAILABLE, "restarting")]
    assert len(client.generate_random(4)) == 4
    assert sum(s.calls["GenerateRandom"] for s in domain.services) == 4


@integration
def test_dead_endpoints_are_skipped_for_every_call(domain: Domain) -> None:
    dead = free_port_address()
    client = domain.client([dead, *domain.addresses])
    # CreateKey too: gRPC reports that no connection was made, so nothing was sent.
    key_ids = [client.create_key().key_id for _ in range(6)]
    assert sum(s.calls["CreateKey"] for s in domain.services) == 6
    assert len(set(key_ids)) == 6
    for key_id in key_ids:
        assert client.decrypt(client.encrypt(key_id, b"x")) == b"x"


@integration
@pytest.mark.parametrize("method", sorted(ADMIN_METHODS))
def test_admin_calls_that_reached_a_server_are_not_sent_again(domain: Domain, method: str) -> None:
    client = domain.client(timeout=0.5)
    key_id = client.create_key().key_id
    for service in domain.services:
        service.calls.clear()
        service.script[method] = [("abort", Code.UNAVAILABLE, "connection reset mid-call")]
    calls: dict[str, Callable[[], Any]] = {
        "RotateKey": lambda: client.rotate_key(key_id),
        "PutKeyPolicy": lambda: client.put_key_policy(
            key_id,
            {"grants": [{"principals": ["spiffe://local/client/x"], "operations": ["admin"]}]},
        ),
        "EnableKey": lambda: client.enable_key(key_id),
        "DisableKey": lambda: client.disable_key(key_id),
        "ScheduleKeyDeletion": lambda: client.schedule_key_deletion(key_id, 7),
        "CancelKeyDeletion": lambda: client.cancel_key_deletion(key_id),
        **_import_calls(client, key_id),
    }
    with pytest.raises(UnavailableError, match="may have been applied"):
        calls[method]()
    assert sum(s.calls[method] for s in domain.services) == 1


@integration
def test_an_admin_call_past_its_deadline_is_not_sent_again(domain: Domain) -> None:
    client = domain.client(timeout=0.3)
    key_id = client.create_key().key_id
    for service in domain.services:
        service.script["DisableKey"] = [("sleep", 1.0)]
    with pytest.raises(UnavailableError, match=r"did not answer in time.*may have been applied"):
        client.disable_key(key_id)
    assert sum(s.calls["DisableKey"] for s in domain.services) == 1


@integration
def test_a_create_key_lost_mid_call_is_sent_again_with_its_idempotency_key(
    domain: Domain,
) -> None:
    """CreateKey carries an idempotency key, so an attempt lost mid-call (or past its
    deadline) goes to the next HSA with the same key; when none answers, the caller is told
    to send it again with that key."""
    client = domain.client(timeout=0.3, attempts=3)
    for service in domain.services:
        service.calls.clear()
        service.idempotency_keys.clear()
    domain.services[0].script["CreateKey"] = [("abort", Code.UNAVAILABLE, "connection reset")]
    domain.services[1].script["CreateKey"] = [("sleep", 1.0)]
    for _ in range(3):
        client.create_key()
    sent = [k for s in domain.services for k in s.idempotency_keys]
    assert all(sent)
    assert len(sent) > 3  # the failed attempts were sent again ...
    assert len(set(sent)) == 3  # ... with their call's key: three creations
    for service in domain.services:
        service.script["CreateKey"] = [("abort", Code.UNAVAILABLE, "connection reset")] * 3
    with pytest.raises(UnavailableError, match="same idempotency key") as lost:
        client.create_key(idempotency_key="mine-1")
    assert "may have been applied" in str(lost.value)
    assert domain.services[0].idempotency_keys[-1] == "mine-1"


@integration
@pytest.mark.parametrize("method", sorted(ADMIN_METHODS | KEYED_METHODS))
def test_an_hsa_that_says_nothing_was_applied_gives_a_definite_retryable_failure(
    domain: Domain, method: str
) -> None:
    """The HSA could not reach the coordinator and changed nothing (NotAppliedError, marked
    on the wire): the call goes to the next HSA, and when every HSA says so the caller gets
    NotAppliedError, not "may have been applied"."""
    client = domain.client(timeout=2, attempts=3)
    key_id = client.create_key().key_id
    calls = _admin_calls(client, key_id)
    for service in domain.services:
        service.calls.clear()
        service.script[method] = [
            ("raise", NotAppliedError(f"the coordinator is unreachable; {method} changed nothing"))
        ]
    with pytest.raises(NotAppliedError) as refused:
        calls[method]()
    message = str(refused.value)
    assert "may have been applied" not in message
    assert f"{method} was not applied" in message
    assert "changed nothing" in message
    assert sum(s.calls[method] for s in domain.services) == 3  # sent to each HSA once
    # Two HSAs without the coordinator, one with it: every call succeeds there.
    for service in domain.services:
        service.calls.clear()
    for service in domain.services[:2]:
        service.script[method] = [("raise", NotAppliedError("the coordinator is unreachable"))] * 9
    for _ in range(3):
        calls[method]()
    assert domain.services[2].calls[method] == 3


@integration
def test_an_unavailable_hsa_without_the_mark_leaves_the_outcome_open(domain: Domain) -> None:
    """The same words from the server, without the "nothing applied" mark (a plain
    UnavailableError: the write may have reached the coordinator), are not sent again."""
    client = domain.client(timeout=2)
    key_id = client.create_key().key_id
    for service in domain.services:
        service.script["DisableKey"] = [
            ("raise", UnavailableError("the coordinator did not confirm the change"))
        ]
    with pytest.raises(UnavailableError, match="may have been applied") as refused:
        client.disable_key(key_id)
    assert not isinstance(refused.value, NotAppliedError)
    assert sum(s.calls["DisableKey"] for s in domain.services) == 1


# Import parameters as GetParametersForImport gives them (the scripted HSAs refuse the
# import itself before anything would open the token).
_WRAPPING_PUBLIC_KEY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
)


def _import_calls(client: KeyClient, key_id: str) -> dict[str, Callable[[], Any]]:
    parameters = ImportParameters(
        key_id=key_id,
        import_token=b"token",
        public_key=_WRAPPING_PUBLIC_KEY,
        wrapping_algorithm="RSAES_OAEP_SHA_256",
        valid_to=0,
    )
    return {
        "ImportKeyMaterial": lambda: client.import_key_material(key_id, parameters, bytes(32)),
        "DeleteImportedKeyMaterial": lambda: client.delete_imported_key_material(key_id),
        "CreateGrant": lambda: client.create_grant(key_id, "spiffe://local/client/x", ["encrypt"]),
        "RetireGrant": lambda: client.retire_grant(key_id, "ab" * 32),
        "RevokeGrant": lambda: client.revoke_grant(key_id, "ab" * 32),
        "TagResource": lambda: client.tag_resource(key_id, {"team": "payments"}),
        "UntagResource": lambda: client.untag_resource(key_id, ["team"]),
    }


def _admin_calls(client: KeyClient, key_id: str) -> dict[str, Callable[[], Any]]:
    return {
        "CreateKey": lambda: client.create_key(),
        "RotateKey": lambda: client.rotate_key(key_id),
        "PutKeyPolicy": lambda: client.put_key_policy(
            key_id,
            {"grants": [{"principals": ["spiffe://local/client/x"], "operations": ["admin"]}]},
        ),
        "EnableKey": lambda: client.enable_key(key_id),
        "DisableKey": lambda: client.disable_key(key_id),
        "ScheduleKeyDeletion": lambda: client.schedule_key_deletion(key_id, 7),
        "CancelKeyDeletion": lambda: client.cancel_key_deletion(key_id),
        **_import_calls(client, key_id),
    }


@integration
def test_a_connection_lost_mid_call_is_not_retried_for_admin_calls(domain: Domain) -> None:
    client = domain.client([domain.addresses[0], domain.addresses[1]], timeout=5)
    key_id = client.create_key().key_id  # connects both channels over two calls
    client.describe_key(key_id)
    target = domain.services[0]
    for service in domain.services:
        service.calls.clear()
        service.script["RotateKey"] = [("sleep", 3.0)]
    target.entered.clear()
    outcome: dict[str, BaseException] = {}

    def rotate() -> None:
        try:
            client.rotate_key(key_id)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=rotate)
    thread.start()
    # Whichever HSA got the call dies while serving it.
    deadline = time.monotonic() + 5
    while not any(s.calls["RotateKey"] for s in domain.services):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    serving = next(i for i, s in enumerate(domain.services) if s.calls["RotateKey"])
    domain.servers[serving].stop(0)
    thread.join(10)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), UnavailableError)
    assert sum(s.calls["RotateKey"] for s in domain.services) == 1


@integration
@pytest.mark.parametrize(
    ("code", "details", "error_class"),
    [
        (Code.INVALID_ARGUMENT, "invalid ciphertext", InvalidCiphertextError),
        (Code.INVALID_ARGUMENT, "plaintext is too long", InvalidInputError),
        (Code.PERMISSION_DENIED, "principal may not encrypt", PermissionDeniedError),
        (Code.NOT_FOUND, "key does not exist", NotFoundError),
        (Code.FAILED_PRECONDITION, "key is disabled", FailedPreconditionError),
        (Code.ABORTED, "changed concurrently", ConflictError),
    ],
)
def test_refusals_come_back_at_once_as_domain_errors(
    domain: Domain, code: grpc.StatusCode, details: str, error_class: type[Exception]
) -> None:
    client = domain.client()
    key_id = client.create_key().key_id
    for service in domain.services:
        service.script["Encrypt"] = [("abort", code, details)]
    with pytest.raises(error_class) as info:
        client.encrypt(key_id, b"x")
    assert type(info.value) is error_class
    assert str(info.value) == details
    assert sum(s.calls["Encrypt"] for s in domain.services) == 1


@integration
def test_attempts_and_total_time_are_bounded(domain: Domain) -> None:
    for service in domain.services:
        service.script["GenerateRandom"] = [("abort", Code.UNAVAILABLE, "busy")] * 50
    client = domain.client(attempts=5)
    with pytest.raises(UnavailableError, match="failed on every attempt") as info:
        client.generate_random(8)
    assert sum(s.calls["GenerateRandom"] for s in domain.services) == 5
    for address in domain.addresses:
        assert address in str(info.value)
    # A time budget ends the attempts even when many more are allowed.
    for service in domain.services:
        service.calls.clear()
        service.script["GenerateRandom"] = [("sleep", 2.0)] * 50
    client = domain.client(timeout=0.2, attempts=50, total_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(UnavailableError):
        client.generate_random(8)
    assert time.monotonic() - started < 5  # 50 attempts of 0.2 s would take 10 s
    assert sum(s.calls["GenerateRandom"] for s in domain.services) <= 6


@integration
def test_an_endpoint_that_failed_cools_down(domain: Domain) -> None:
    client = domain.client()
    key_id = client.create_key().key_id
    domain.services[0].script["DescribeKey"] = [("abort", Code.UNAVAILABLE, "restarting")]
    for _ in range(12):
        client.describe_key(key_id)
    # The failing HSA got its one call; the next ones went elsewhere while it cooled down.
    assert domain.services[0].calls["DescribeKey"] == 1
    assert domain.services[1].calls["DescribeKey"] + domain.services[2].calls["DescribeKey"] == 12


@integration
def test_client_side_checks_fail_before_any_call(domain: Domain) -> None:
    client = domain.client()
    with pytest.raises(LimitExceededError, match="envelope encryption"):
        client.encrypt(str(uuid.uuid4()), b"x" * 4097)
    with pytest.raises(InvalidInputError, match="must not be empty"):
        client.encrypt(str(uuid.uuid4()), b"x", {"": "v"})
    with pytest.raises(LimitExceededError, match="entries"):
        client.decrypt(b"blob", {f"k{i}": "v" for i in range(65)})
    assert sum(sum(s.calls.values()) for s in domain.services) == 0
    with pytest.raises(ValueError, match="at least one endpoint"):
        domain.client([])
    with pytest.raises(TypeError):
        domain.client("127.0.0.1:1")  # type: ignore[arg-type]


@integration
def test_key_operations_through_the_client(domain: Domain) -> None:
    with domain.client() as client:
        first = client.create_key(description="a")
        other = client.create_key()
        assert first.state == "enabled"
        assert first.policy[0].operations == ("admin",)
        blob = client.encrypt(first.key_id, b"secret", {"k": "v"})
        assert client.decrypt(blob, {"k": "v"}, key_id=first.key_id) == b"secret"
        with pytest.raises(InvalidCiphertextError):
            client.decrypt(blob, {"k": "w"})
        with pytest.raises(InvalidInputError, match="another key"):
            client.decrypt(blob, {"k": "v"}, key_id=other.key_id)
        moved = client.re_encrypt(blob, other.key_id, {"k": "v"}, {"k2": "v2"})
        assert ciphertext.parse_header(moved).key_id == other.key_id
        assert client.decrypt(moved, {"k2": "v2"}) == b"secret"
        plaintext, data_blob = client.generate_data_key(first.key_id, number_of_bytes=16)
        assert len(plaintext) == 16
        assert client.decrypt(data_blob) == plaintext
        assert client.generate_data_key_without_plaintext(first.key_id)
        assert len(client.generate_random(1024)) == 1024
        for _ in range(3):
            client.create_key()
        pages = list(client.list_key_pages(page_size=2))
        assert [len(p) for p in pages] == [2, 2, 1]
        assert sorted(m.key_id for m in client.list_keys(2)) == sorted(domain.keys.backing)
        assert client.describe_key(first.key_id).to_json()["policy"]["grants"][0]["operations"] == [
            "admin"
        ]
        with pytest.raises(NotFoundError):
            client.describe_key(str(uuid.uuid4()))
    with pytest.raises(RuntimeError, match="closed"):
        client.describe_key(first.key_id)


# --- envelopes -------------------------------------------------------------------------------


class Reader(io.RawIOBase):
    """A stream of `size` pseudo-random bytes that never exists in memory as a whole."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self.left = size
        self.block = bytes((seed * i + 13) % 256 for i in range(4093))
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            start = self.offset % len(self.block)
            piece = self.block[start : start + n - len(out)]
            out += piece
            self.offset += len(piece)
        self.left -= n
        return bytes(out)


@integration
def test_envelope_round_trip_streamed(domain: Domain, tmp_path: Path) -> None:
    client = domain.client()
    key_id = client.create_key().key_id
    size = 3 * envelope.DEFAULT_CHUNK_SIZE + 5
    sealed_path = tmp_path / "data.hsme"
    with sealed_path.open("wb") as out:
        assert encrypt_envelope(client, key_id, Reader(size), out, {"f": "data"}) == size
    with sealed_path.open("rb") as source:
        assert decrypt_envelope(client, source, tmp_path / "data.out") == size
    assert (tmp_path / "data.out").read_bytes() == Reader(size).read()
    assert os.stat(tmp_path / "data.out").st_mode & 0o777 == 0o600
    # In memory, with the context required explicitly.
    sealed = encrypt_envelope(client, key_id, b"small", context={"f": "x"})
    assert decrypt_envelope(client, sealed, context={"f": "x"}) == b"small"
    with pytest.raises(InvalidCiphertextError):
        decrypt_envelope(client, sealed, context={"f": "y"})
    with pytest.raises(InvalidInputError, match="another key"):
        decrypt_envelope(client, sealed, key_id=client.create_key().key_id)


@integration
def test_a_tampered_envelope_leaves_no_output(domain: Domain, tmp_path: Path) -> None:
    client = domain.client()
    key_id = client.create_key().key_id
    sealed = bytearray(encrypt_envelope(client, key_id, Reader(200_000).read()))
    sealed[-100] ^= 1
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InvalidCiphertextError) as info:
        decrypt_envelope(client, bytes(sealed), out_dir / "out.bin")
    assert str(info.value) == "invalid ciphertext"
    assert list(out_dir.iterdir()) == []
    # A header that names another data key blob fails at the service.
    header = envelope.parse_envelope_header(bytes(sealed))
    forged = bytearray(sealed)
    forged[len(header.raw) - 30] ^= 1  # inside the encrypted data key's body
    with pytest.raises(InvalidCiphertextError):
        decrypt_envelope(client, bytes(forged))


# --- the CLI against scripted services -------------------------------------------------------


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


@integration
def test_cli_round_trip(
    cli_domain: Domain,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    args = cli_domain.cli_args()
    assert kms_cli.main([*args, "create-key", "--description", "cli"]) == 0
    key_id = capsysbinary.readouterr().out.decode().strip()
    assert key_id in cli_domain.keys.backing
    _stdin(monkeypatch, b"hello\x00world")
    blob = tmp_path / "blob"
    assert (
        kms_cli.main(
            [*args, "encrypt", "--key-id", key_id, "--context", "a=b=c", "--out", str(blob)]
        )
        == 0
    )
    assert kms_cli.main([*args, "decrypt", "--in", str(blob), "--context", "a=b=c"]) == 0
    assert capsysbinary.readouterr().out == b"hello\x00world"
    assert kms_cli.main([*args, "decrypt", "--in", str(blob), "--context", "a=b"]) == 1
    err = capsysbinary.readouterr().err.decode()
    assert err == "hsm-kms: error: invalid ciphertext [INVALID_ARGUMENT]\n"
    # Data keys: to files (the plaintext one 0600, never overwritten), never to a terminal.
    dk, dk_blob = tmp_path / "dk", tmp_path / "dk.bin"
    gen = [*args, "generate-data-key", "--key-id", key_id]
    assert kms_cli.main([*gen, "--out-plaintext", str(dk), "--out-ciphertext", str(dk_blob)]) == 0
    assert os.stat(dk).st_mode & 0o777 == 0o600
    assert kms_cli.main([*args, "decrypt", "--in", str(dk_blob)]) == 0
    assert capsysbinary.readouterr().out == dk.read_bytes()
    assert kms_cli.main([*gen, "--out-plaintext", str(dk), "--out-ciphertext", str(dk_blob)]) == 1
    assert "File exists" in capsysbinary.readouterr().err.decode()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert kms_cli.main([*gen, "--out-plaintext", "-", "--out-ciphertext", str(dk_blob)]) == 2
    assert "terminal" in capsysbinary.readouterr().err.decode()
    assert kms_cli.main([*gen]) == 2
    assert "--out-plaintext" in capsysbinary.readouterr().err.decode()


@integration
def test_cli_envelope_and_json(
    cli_domain: Domain,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    import json

    args = cli_domain.cli_args()
    assert kms_cli.main([*args, "--json", "create-key"]) == 0
    key_id = json.loads(capsysbinary.readouterr().out)["key_id"]
    source = tmp_path / "in.bin"
    source.write_bytes(Reader(300_000).read())
    sealed, back = tmp_path / "in.hsme", tmp_path / "back.bin"
    common = ["--context", "x=y", "--json"]
    out = ["--out", str(sealed), "--chunk-size", "4096"]
    assert (
        kms_cli.main(
            [*args, "envelope-encrypt", "--key-id", key_id, "--in", str(source), *out, *common]
        )
        == 0
    )
    assert json.loads(capsysbinary.readouterr().out)["plaintext_bytes"] == 300_000
    assert (
        kms_cli.main([*args, "envelope-decrypt", "--in", str(sealed), "--out", str(back), *common])
        == 0
    )
    assert back.read_bytes() == source.read_bytes()
    tampered = bytearray(sealed.read_bytes())
    tampered[-1] ^= 1
    sealed.write_bytes(bytes(tampered))
    back.unlink()
    capsysbinary.readouterr()
    assert kms_cli.main([*args, "envelope-decrypt", "--in", str(sealed), "--out", str(back)]) == 1
    assert capsysbinary.readouterr().err.decode().count("\n") == 1
    assert not back.exists()
    # A refused data key: no envelope file either.
    unknown = str(uuid.uuid4())
    refused = [*args, "envelope-encrypt", "--key-id", unknown, "--in", str(source)]
    assert kms_cli.main([*refused, "--out", str(tmp_path / "never.hsme")]) == 1
    assert "does not exist [NOT_FOUND]" in capsysbinary.readouterr().err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin", "in.hsme", "pem"]


@unit
def test_a_context_checked_once_is_still_refused_when_it_changes() -> None:
    """`checked_context` remembers contexts that passed (the check per call costs more than
    the lookup); a context is only ever remembered whole, with the limits it passed."""
    good = {"tenant": "a", "purpose": "checked-context-test"}
    assert checked_context(good) == good
    assert checked_context(dict(good)) == good  # remembered: the same answer
    with pytest.raises(InvalidInputError):
        checked_context({**good, "": "empty key"})
    tight = Limits(max_encryption_context_entries=1)
    with pytest.raises(LimitExceededError):
        checked_context(good, tight)  # passed under the defaults, not under these
    with pytest.raises(TypeError):
        checked_context({"k": 5})  # type: ignore[dict-item]


@integration
def test_a_throttled_call_waits_for_the_retry_delay_then_is_served(domain: Domain) -> None:
    """Issue 19: an HSA that refuses a caller over its quota says when to come back; the
    client tries the other HSAs (each holds a share of the quota) and, when every one said
    so, waits for the first delay to end before sending the call again."""
    client = domain.client(timeout=2)
    key_id = client.create_key().key_id
    for service in domain.services:
        service.calls.clear()
        service.script["Encrypt"] = [("raise", ThrottledError("over its quota", 0.4))]
    started = time.monotonic()
    assert client.encrypt(key_id, b"x")
    assert time.monotonic() - started >= 0.35  # it waited for the delay, not less
    assert sum(s.calls["Encrypt"] for s in domain.services) == 4  # 3 refusals, then served


@integration
def test_a_caller_throttled_everywhere_gets_the_delay_within_its_deadline(domain: Domain) -> None:
    key_id = domain.client().create_key().key_id
    client = domain.client(timeout=0.5, total_timeout=1.0)
    for service in domain.services:
        service.calls.clear()
        service.script["DescribeKey"] = [("raise", ThrottledError("over its quota", 30.0))] * 9
        service.script["RotateKey"] = [("raise", ThrottledError("over its quota", 0.05))]
    started = time.monotonic()
    with pytest.raises(ThrottledError, match="send it again after 30 s") as got:
        client.describe_key(key_id)
    assert got.value.retry_after == 30.0
    assert time.monotonic() - started < 1.6  # its own deadline, not the server's delay
    # An administration call refused so changed nothing: it is sent again, as a read is.
    assert client.rotate_key(key_id).key_id == key_id
    assert sum(s.calls["RotateKey"] for s in domain.services) == 4  # 3 refused, 1 served
