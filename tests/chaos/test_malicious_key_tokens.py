"""A malicious coordinator lies about key records to real HSAs: every lie is refused and logged.

The coordinator is `support.malicious_coordinator.KeyRecordCoordinatorServer`: the real
coordinator certificate of a domain made by `init_domain`, an honest key-record store, and
scripted lies about single keys. hsa-2 (HONEST) creates and changes keys, so the store holds
records real HSAs sealed; hsa-1 (VICTIM) reads them through the lies. Both are real
`hsa-node` processes, called over mutual TLS by the demo application (and by bob, a second
client the test certifies with the domain CA).

The lies: tokens swapped between two keys; an edited policy or state with the original
tokens; an older record (rolled back) after the HSA saw a newer one, also across a restart,
and another record with the same metadata version (a fork); tokens under a domain key
generation the HSA does not hold; a record naming another key or another domain; a flipped
bit in a token; tampered records mixed into ListKeyRecords; and records sealed with the real
domain key but not signed by a host (unsigned, or signed by a key that is not the named
host's). To reach the checks behind the signature, some lies are written as an insider would:
with the domain keys and a member host's signing key (hsa-2's, from the domain directory).

For each: the client gets the documented status (FAILED_PRECONDITION "the stored record of key
K does not verify; the coordinator may be compromised", or the rollback and generation
messages of `hsa_node.keycache`), the HSA's log (DIR/logs/<host>.log) says why, no plaintext
or key material reaches the logs, the HSA keeps serving (its domain state unchanged, Echo,
an honest key encrypts), and once the coordinator serves the honest record again the key
works.

One domain and one pair of HSAs serve the whole module (each test makes its own keys and
tells the truth again before it ends); expected log lines that are missing are collected and
reported together at the end of a test, after the honest record is back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2
from support.hsa_nodes import Domain, Processes, copy_domain, health_status
from support.malicious_coordinator import (
    KeyRecordCoordinatorServer,
    KeyRecordStore,
    LogWatch,
    backing_keys_of,
    echo,
    flip_token_bit,
    forging_domain,
    relabel_generation,
    reseal,
    swap_tokens,
    with_metadata,
)
from support.simulator import flip_bit

from domain_core import keytokens
from domain_core.identity import HostIdentity
from domain_core.pki import SpiffeId, new_tls_key_pem, tls_public_key
from domain_edge import transport
from domain_edge.ca_files import load_domain_ca
from domain_edge.identity_files import load_host_identity
from domain_edge.transport import TlsMaterial
from domain_proto import keys_pb2, services_pb2, services_pb2_grpc

pytestmark = pytest.mark.chaos

T = TypeVar("T")
VICTIM = "hsa-1"  # reads keys through the lies
HONEST = "hsa-2"  # creates and changes keys: the store holds what it sealed
DEADLINE = 5.0
CACHE_TTL_SECONDS = 2.0  # hsa_node.keycache.DEFAULT_TTL_SECONDS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
COMPROMISED = "does not verify; the coordinator may be compromised"
NOT_OPENING = "does not open with these metadata bytes"
ALL_OPERATIONS = [
    keys_pb2.KEY_OPERATION_ENCRYPT,
    keys_pb2.KEY_OPERATION_DECRYPT,
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_FROM,
    keys_pb2.KEY_OPERATION_RE_ENCRYPT_TO,
    keys_pb2.KEY_OPERATION_GENERATE_DATA_KEY,
    keys_pb2.KEY_OPERATION_DESCRIBE,
    keys_pb2.KEY_OPERATION_ADMIN,
]


# --- clients -------------------------------------------------------------------------------------


class Client:
    """KeyService calls as one client identity; channels follow a restarted node's address."""

    def __init__(self, procs: Processes, tls: TlsMaterial, uri: str) -> None:
        self.procs = procs
        self.tls = tls
        self.uri = uri
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, host: str) -> grpc.Channel:
        address = self.procs.addresses[host]
        if address not in self._channels:
            self._channels[address] = transport.mtls_channel(
                address, self.tls, transport.hsa_host(host)
            )
        return self._channels[address]

    def on(self, host: str) -> Any:
        return services_pb2_grpc.KeyServiceStub(self.channel(host))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def create(self, host: str = HONEST) -> str:
        response = self.on(host).CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE)
        return str(response.metadata.key_id)

    def encrypt(self, host: str, key_id: str, plaintext: bytes) -> bytes:
        response = self.on(host).Encrypt(
            services_pb2.EncryptRequest(key_id=key_id, plaintext=plaintext), timeout=DEADLINE
        )
        return bytes(response.ciphertext_blob)

    def decrypt(self, host: str, blob: bytes) -> bytes:
        response = self.on(host).Decrypt(
            services_pb2.DecryptRequest(ciphertext_blob=blob), timeout=DEADLINE
        )
        return bytes(response.plaintext)

    def describe(self, host: str, key_id: str) -> keys_pb2.KeyMetadata:
        response = self.on(host).DescribeKey(
            services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE
        )
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata

    def admin(self, host: str, method: str, key_id: str) -> keys_pb2.KeyMetadata:
        response = getattr(self.on(host), method)(
            services_pb2.KeyIdRequest(key_id=key_id), timeout=DEADLINE
        )
        metadata: keys_pb2.KeyMetadata = response.metadata
        return metadata

    def list_keys(self, host: str, limit: int = 0) -> list[str]:
        """Every key id ListKeys shows, page by page."""
        ids: list[str] = []
        token = ""
        while True:
            page = self.on(host).ListKeys(
                services_pb2.ListKeysRequest(limit=limit, page_token=token), timeout=DEADLINE
            )
            ids += [k.key_id for k in page.keys]
            token = page.next_page_token
            if not token:
                return ids


def issue_client(domain: Domain, name: str) -> tuple[TlsMaterial, str]:
    """A client certificate for `spiffe://<domain>/client/<name>` from the domain CA."""
    layout = domain.layout
    ca = load_domain_ca(layout.root / "ca")
    key_pem = new_tls_key_pem()
    spiffe = SpiffeId(layout.domain_id, "client", name)
    cert_pem = ca.issue(spiffe, tls_public_key(key_pem), now=datetime.now(UTC))
    tls = TlsMaterial(ca_pem=layout.ca_cert.read_bytes(), cert_pem=cert_pem, key_pem=key_pem)
    return tls, f"spiffe://{layout.domain_id}/client/{name}"


# --- the module's domain -------------------------------------------------------------------------


@dataclass
class KeyAttack:
    """Real HSAs whose coordinator lies about key records, and the tools to lie."""

    domain: Domain
    procs: Processes
    server: KeyRecordCoordinatorServer
    domain_keys: dict[int, bytes]  # the real domain keys (genesis): to forge and to look for
    head: tuple[int, bytes]  # the domain state every HSA must stay on
    app: Client
    bob: Client
    honest_key: str  # never lied about
    insider: keytokens.RecordSigner  # hsa-2's signing key: lies that pass the signature check
    plaintexts: list[bytes] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # expected log lines not found

    @property
    def keys(self) -> KeyRecordStore:
        return self.server.keys

    def plaintext(self) -> bytes:
        """A fresh plaintext, remembered so that the logs can be searched for it."""
        value = f"plaintext-{uuid.uuid4().hex}".encode()
        self.plaintexts.append(value)
        return value

    def log(self, host: str = VICTIM) -> LogWatch:
        return LogWatch(self.procs.log_path(host), whole=True)

    def expect_logged(self, *fragments: str, host: str = VICTIM, timeout: float = 2.0) -> None:
        """Note (for the end of the test) unless one line of `host`'s log holds every fragment."""
        watch = self.log(host)
        deadline = time.monotonic() + timeout
        while True:
            if any(all(f in line for f in fragments) for line in watch.text().splitlines()):
                return
            if time.monotonic() > deadline:
                self.missing.append(f"{host}.log has no line with all of {list(fragments)}")
                return
            time.sleep(0.05)

    def finish(self) -> None:
        """The checks every test ends with, once the coordinator tells the truth again."""
        self.keys.tell_truth()
        for host in (VICTIM, HONEST):
            assert_still_serving(self, host)
        assert_no_secrets(self)
        missing, self.missing = self.missing, []
        assert not missing, "refusals not logged with their reason:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def key_attack_module(
    domain_template: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[KeyAttack]:
    """hsa-1 and hsa-2 as real processes, whose coordinator is a key-record liar."""
    failed_before = request.session.testsfailed
    domain = copy_domain(domain_template, tmp_path_factory.mktemp("key-tokens") / "d")
    server = KeyRecordCoordinatorServer(domain.layout)
    procs = Processes(domain)
    clients: list[Client] = []
    try:
        server.start()
        sim = forging_domain(domain.layout)
        server.serve(sim.genesis)
        domain.configure_nodes(
            coordinator=server.address, pull_interval_seconds=0.3, gossip_interval_seconds=0.3
        )
        procs.start(VICTIM, HONEST)
        server.wait_registered((VICTIM, HONEST))
        procs.wait_key_service(VICTIM, HONEST)
        app = Client(
            procs, domain.tls("demo-app"), f"spiffe://{domain.layout.domain_id}/client/demo-app"
        )
        bob = Client(procs, *issue_client(domain, "bob"))
        clients += [app, bob]
        yield KeyAttack(
            domain=domain,
            procs=procs,
            server=server,
            domain_keys=sim.keys_at(sim.genesis, VICTIM),
            head=(sim.genesis.version, sim.genesis.hash),
            app=app,
            bob=bob,
            honest_key=app.create(HONEST),
            insider=keytokens.RecordSigner(
                domain.layout.domain_id,
                HONEST,
                load_host_identity(domain.node_dir(HONEST) / "identity").signer,
            ),
        )
    finally:
        for client in clients:
            client.close()
        procs.kill_all()
        server.stop()
        if request.session.testsfailed > failed_before:
            _dump_logs(request, domain, [VICTIM, HONEST])


@pytest.fixture
def key_attack(key_attack_module: KeyAttack) -> KeyAttack:
    """The module's HSAs, both running, with an honest coordinator and nothing noted yet
    (whatever an earlier test left behind when it failed)."""
    attack = key_attack_module
    attack.keys.tell_truth()
    attack.missing.clear()
    for host in (VICTIM, HONEST):
        if host not in attack.procs.procs:
            attack.procs.start(host)
    attack.procs.wait_key_service(VICTIM, HONEST)
    return attack


def _dump_logs(request: pytest.FixtureRequest, domain: Domain, names: list[str]) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    for name in names:
        path = domain.layout.log_file(name)
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-60:]
            reporter.write(f"\n----- {name}: last {len(lines)} lines of {path}\n")
            reporter.write("\n".join(lines) + "\n")


# --- checks --------------------------------------------------------------------------------------


def refused(call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    """`call` fails with `code`, and its details hold every fragment."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()
    return error


def eventually(check: Callable[[], T], what: str, timeout: float = 3 * CACHE_TTL_SECONDS) -> T:
    """Retry `check` (a failed assertion counts as "not yet") until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}") from None
        time.sleep(0.1)


def compromised(key_id: str) -> str:
    """What a client is told about a record that does not verify."""
    return f"the stored record of key {key_id} {COMPROMISED}"


def assert_still_serving(attack: KeyAttack, host: str) -> None:
    """On the same domain state, SERVING, answering Echo, and an honest key works."""
    status = attack.server.status(attack.procs.addresses[host])
    assert status.healthy, status.detail
    assert status.member, status.detail
    assert (status.version, status.state_hash) == attack.head
    channel = attack.app.channel(host)
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    echo(channel)
    plaintext = attack.plaintext()
    blob = attack.app.encrypt(host, attack.honest_key, plaintext)
    assert attack.app.decrypt(host, blob) == plaintext


def _forms(secret: bytes) -> set[str]:
    """Ways a secret could be written into a text log."""
    forms = {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret)[2:-1],
    }
    with contextlib.suppress(UnicodeDecodeError):
        forms.add(secret.decode())
    return {f for f in forms if len(f) >= 12}


def assert_no_secrets(attack: KeyAttack) -> None:
    """Neither the plaintexts used nor any domain or backing key is in a log or audit log."""
    secrets = list(attack.domain_keys.values()) + list(attack.plaintexts)
    for record in attack.keys.honest_records():
        secrets += backing_keys_of(record, attack.domain_keys).values()
    files = [attack.procs.log_path(h) for h in (VICTIM, HONEST)]
    files += [attack.domain.data_dir(h) / "audit.log" for h in (VICTIM, HONEST)]
    for path in files:
        text = path.read_text(errors="replace")
        for secret in secrets:
            for form in _forms(secret):
                assert form not in text, f"{path.name} holds a secret ({len(secret)} bytes)"


def audit_records(attack: KeyAttack, host: str) -> list[dict[str, Any]]:
    path = attack.domain.data_dir(host) / "audit.log"
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in records if "type" not in r]


def grant_to(principal: str) -> Callable[[keys_pb2.KeyMetadata], None]:
    def mutate(metadata: keys_pb2.KeyMetadata) -> None:
        metadata.policy.grants.add(principals=[principal], operations=ALL_OPERATIONS)

    return mutate


# --- the attacks ---------------------------------------------------------------------------------


def test_tokens_swapped_between_two_keys_are_refused(key_attack: KeyAttack) -> None:
    attack, app = key_attack, key_attack.app
    first, second = app.create(), app.create()
    texts = {first: attack.plaintext(), second: attack.plaintext()}
    blobs = {k: app.encrypt(HONEST, k, texts[k]) for k in (first, second)}
    one, two = attack.keys.honest(first), attack.keys.honest(second)
    try:
        # Each record carries the other key's tokens, relabelled to name its own key.
        attack.keys.lie(first, swap_tokens(one, two))
        attack.keys.lie(second, swap_tokens(two, one))
        for key_id, blob in blobs.items():
            refused(partial(app.decrypt, VICTIM, blob), FAILED_PRECONDITION, compromised(key_id))
            refused(
                partial(app.encrypt, VICTIM, key_id, b"x"), FAILED_PRECONDITION, compromised(key_id)
            )
            attack.expect_logged(f"the stored record of key {key_id} does not verify", NOT_OPENING)
        # The same swap, the tokens still naming the other key.
        attack.keys.lie(first, swap_tokens(one, two, relabel=False))
        refused(lambda: app.describe(VICTIM, first), FAILED_PRECONDITION, compromised(first))
        attack.expect_logged(
            f"the stored record of key {first} does not verify", f"a token names key '{second}'"
        )
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    for key_id in (first, second):
        assert app.decrypt(VICTIM, blobs[key_id]) == texts[key_id]
        assert app.decrypt(VICTIM, app.encrypt(VICTIM, key_id, b"again")) == b"again"
    attack.finish()


def test_a_changed_policy_or_state_with_the_original_tokens_is_refused(
    key_attack: KeyAttack,
) -> None:
    attack, app, bob = key_attack, key_attack.app, key_attack.bob
    key = app.create()
    text = attack.plaintext()
    blob = app.encrypt(HONEST, key, text)  # HONEST has the key cached now; VICTIM has not
    refused(lambda: bob.decrypt(HONEST, blob), PERMISSION_DENIED)
    disabled = app.create()
    app.admin(HONEST, "DisableKey", disabled)
    record = attack.keys.honest(key)
    try:
        # Widened to let bob in: bob is not let in.
        attack.keys.lie(key, with_metadata(record, grant_to(bob.uri)))
        refused(lambda: bob.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))
        refused(lambda: app.describe(VICTIM, key), FAILED_PRECONDITION, compromised(key))
        attack.expect_logged(f"the stored record of key {key} does not verify", NOT_OPENING)
        # An HSA that has the key cached refuses once its entry is due for a refresh.
        eventually(
            lambda: refused(
                lambda: app.encrypt(HONEST, key, b"x"), FAILED_PRECONDITION, compromised(key)
            ),
            f"{HONEST} to re-read the edited record",
        )
        attack.expect_logged(
            f"the stored record of key {key} does not verify", NOT_OPENING, host=HONEST
        )

        # Narrowed to shut the owner out: refused as tampering, not as a denial.
        def only_bob(metadata: keys_pb2.KeyMetadata) -> None:
            del metadata.policy.grants[:]
            grant_to(bob.uri)(metadata)

        attack.keys.lie(key, with_metadata(record, only_bob))
        refused(lambda: app.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))
        refused(lambda: bob.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))

        # A disabled key shown as enabled.
        enabled = with_metadata(
            attack.keys.honest(disabled), lambda m: setattr(m, "state", keys_pb2.KEY_STATE_ENABLED)
        )
        attack.keys.lie(disabled, enabled)
        refused(
            lambda: app.encrypt(VICTIM, disabled, b"x"), FAILED_PRECONDITION, compromised(disabled)
        )
        attack.expect_logged(f"the stored record of key {disabled} does not verify", NOT_OPENING)
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    assert app.decrypt(VICTIM, blob) == text
    refused(lambda: bob.decrypt(VICTIM, blob), PERMISSION_DENIED)
    eventually(lambda: app.decrypt(HONEST, blob) == text or None, f"{HONEST} to accept it again")
    refused(lambda: app.encrypt(VICTIM, disabled, b"x"), FAILED_PRECONDITION, "is disabled")
    denied = [
        r
        for r in audit_records(attack, VICTIM)
        if r["key_id"] == key and r["principal"] == bob.uri and r["result"] == "FAILED_PRECONDITION"
    ]
    assert denied, "bob's refused Decrypt is not audited"
    attack.finish()


def test_a_rolled_back_record_is_refused_also_after_a_restart(key_attack: KeyAttack) -> None:
    attack, app = key_attack, key_attack.app
    key = app.create()
    version_one = attack.keys.honest(key)
    text = attack.plaintext()
    blob = app.encrypt(VICTIM, key, text)
    app.admin(VICTIM, "DisableKey", key)  # VICTIM wrote (and so saw) metadata version 2
    version_two = attack.keys.honest(key)
    older = (
        f"the coordinator returned an older record of key {key} (metadata version 1) than "
        "this HSA accepted before (version 2)"
    )
    try:
        # An older, complete and valid record: enabled again, its own tokens.
        attack.keys.lie(key, version_one)
        eventually(
            lambda: refused(lambda: app.decrypt(VICTIM, blob), FAILED_PRECONDITION, older),
            f"{VICTIM} to re-read the key and refuse the rolled-back record",
        )
        refused(lambda: app.encrypt(VICTIM, key, b"x"), FAILED_PRECONDITION, older)
        attack.expect_logged(f"older record of key {key}", "metadata version 1")

        # Another valid record with the same metadata version 2 (a concurrent write the
        # coordinator should have refused with its compare-and-swap): a fork.
        fork = reseal(
            version_two,
            attack.domain_keys,
            lambda m: setattr(m, "state", keys_pb2.KEY_STATE_ENABLED),
            signer=attack.insider,
        )
        attack.keys.lie(key, fork)
        same = f"another record of key {key} with the same metadata version 2"
        refused(lambda: app.encrypt(VICTIM, key, b"x"), FAILED_PRECONDITION, same)
        attack.expect_logged(same)

        # The floor is on disk: a restarted HSA (empty cache) still refuses version 1.
        attack.keys.lie(key, version_one)
        assert attack.procs.stop(VICTIM) == 0
        attack.procs.start(VICTIM)
        attack.procs.wait_key_service(VICTIM)
        refused(lambda: app.decrypt(VICTIM, blob), FAILED_PRECONDITION, older)
        attack.expect_logged(f"older record of key {key}", "metadata version 1")
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    refused(lambda: app.decrypt(VICTIM, blob), FAILED_PRECONDITION, f"key {key} is disabled")
    app.admin(VICTIM, "EnableKey", key)
    assert app.decrypt(VICTIM, blob) == text
    attack.finish()


def test_tokens_under_a_domain_key_generation_the_hsa_does_not_hold_are_refused(
    key_attack: KeyAttack,
) -> None:
    attack, app = key_attack, key_attack.app
    key = app.create()
    text = attack.plaintext()
    blob = app.encrypt(HONEST, key, text)
    record = attack.keys.honest(key)
    assert {t.domain_key_generation for t in record.tokens} == {1}
    try:
        # A generation no domain state has introduced: the HSA cannot tell it from one it
        # has not synced yet, so it answers UNAVAILABLE (documented), and must say why.
        attack.keys.lie(key, relabel_generation(record, 2))
        refused(
            lambda: app.decrypt(VICTIM, blob),
            UNAVAILABLE,
            f"key {key} is sealed under domain key generation 2, newer than this HSA holds (1)",
        )
        attack.expect_logged(f"key {key}", "domain key generation 2")
        # A generation older than any the domain holds.
        attack.keys.lie(key, relabel_generation(record, 0))
        refused(lambda: app.encrypt(VICTIM, key, b"x"), FAILED_PRECONDITION, f"key {key}")
        attack.expect_logged(f"key {key}", "domain key generation 0")
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    assert app.decrypt(VICTIM, blob) == text
    attack.finish()


def test_a_record_naming_another_key_or_another_domain_is_refused(key_attack: KeyAttack) -> None:
    attack, app = key_attack, key_attack.app
    key, other = app.create(), app.create()
    text = attack.plaintext()
    blob = app.encrypt(HONEST, key, text)
    try:
        # The other key's honest, valid record in this key's place.
        attack.keys.lie(key, attack.keys.honest(other))
        refused(lambda: app.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))
        attack.expect_logged(
            f"the stored record of key {key} does not verify", f"its metadata names key '{other}'"
        )
        # A record of this key for another domain, its tokens valid over that metadata.
        foreign = reseal(
            attack.keys.honest(key),
            attack.domain_keys,
            lambda m: setattr(m, "domain_id", "elsewhere"),
            signer=attack.insider,
        )
        attack.keys.lie(key, foreign)
        refused(lambda: app.encrypt(VICTIM, key, b"x"), FAILED_PRECONDITION, compromised(key))
        attack.expect_logged(
            f"the stored record of key {key} does not verify",
            "its metadata names domain 'elsewhere'",
        )
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    assert app.decrypt(VICTIM, blob) == text
    assert app.decrypt(VICTIM, app.encrypt(VICTIM, other, b"other")) == b"other"
    attack.finish()


def test_a_flipped_bit_in_a_token_or_in_the_metadata_is_refused(key_attack: KeyAttack) -> None:
    attack, app = key_attack, key_attack.app
    key = app.create()
    old_text, new_text = attack.plaintext(), attack.plaintext()
    old_blob = app.encrypt(HONEST, key, old_text)
    app.admin(HONEST, "RotateKey", key)
    new_blob = app.encrypt(HONEST, key, new_text)
    record = attack.keys.honest(key)
    assert len(record.tokens) == 2
    rng = random.Random(6)
    flips: list[tuple[int, str, int]] = []
    for index in range(2):
        token = record.tokens[index]
        flips += [(index, "ciphertext", b) for b in rng.sample(range(len(token.ciphertext) * 8), 6)]
        flips += [(index, "nonce", b) for b in rng.sample(range(len(token.nonce) * 8), 3)]
        # Within the ASCII bits of the key id, so that it stays text.
        flips += [(index, "key_id", 8 * c + rng.randrange(7)) for c in rng.sample(range(36), 2)]
        flips += [(index, "backing_version", b) for b in (0, 1)]
    flips += [(-1, "metadata", b) for b in rng.sample(range(len(record.metadata) * 8), 10)]
    calls: list[Callable[[], object]] = [
        lambda: app.decrypt(VICTIM, old_blob),
        lambda: app.decrypt(VICTIM, new_blob),
        lambda: app.encrypt(VICTIM, key, b"x"),
        lambda: app.describe(VICTIM, key),
    ]
    try:
        for number, (index, part, bit) in enumerate(flips):
            if part == "metadata":
                forged = keys_pb2.KeyRecord()
                forged.CopyFrom(record)
                forged.metadata = flip_bit(record.metadata, bit)
            else:
                forged = flip_token_bit(record, index, part, bit)
            attack.keys.lie(key, forged)
            with pytest.raises(grpc.RpcError) as info:
                calls[number % len(calls)]()
            error = info.value
            assert (error.code(), error.details()) == (FAILED_PRECONDITION, compromised(key)), (
                f"{part} (token {index}) bit {bit}: {error.code()} {error.details()}"
            )
        stored = f"the stored record of key {key} does not verify"
        attack.expect_logged(stored, NOT_OPENING)
        attack.expect_logged(stored, "a token names key")
        attack.expect_logged(stored, "it holds tokens for backing versions")
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    assert app.decrypt(VICTIM, old_blob) == old_text
    assert app.decrypt(VICTIM, new_blob) == new_text
    attack.finish()


def test_tampered_records_in_a_listing_are_left_out_and_logged(key_attack: KeyAttack) -> None:
    attack, app, bob = key_attack, key_attack.app, key_attack.bob
    good = [app.create() for _ in range(3)]
    widened, swapped, rolled_back, garbled = (app.create() for _ in range(4))
    rolled_back_v1 = attack.keys.honest(rolled_back)
    app.admin(VICTIM, "DisableKey", rolled_back)  # VICTIM saw metadata version 2
    bad = {widened, swapped, rolled_back, garbled}
    log = LogWatch(attack.procs.log_path(VICTIM))
    try:
        unparsable = attack.keys.honest(garbled)
        unparsable.metadata = b"\x0f" + unparsable.metadata  # wire type 7: does not parse
        attack.keys.lie(garbled, unparsable)
        attack.keys.lie(widened, with_metadata(attack.keys.honest(widened), grant_to(bob.uri)))
        attack.keys.lie(
            swapped, swap_tokens(attack.keys.honest(swapped), attack.keys.honest(good[0]))
        )
        attack.keys.lie(rolled_back, rolled_back_v1)
        for limit in (0, 2):  # one page, and small pages
            listed = app.list_keys(VICTIM, limit)
            assert set(good) <= set(listed), "an honest key is missing from ListKeys"
            assert not bad & set(listed), f"ListKeys shows tampered keys {bad & set(listed)}"
            assert len(listed) == len(set(listed))
        assert bob.list_keys(VICTIM) == [], "the widened policy let bob see a key"
        for key_id in (widened, swapped):
            attack.expect_logged(f"the stored record of key {key_id} does not verify", NOT_OPENING)
        attack.expect_logged(f"older record of key {rolled_back}", "metadata version 1")
        if not log.contains("does not parse", timeout=1.0):
            attack.missing.append(f"{VICTIM}.log: a listed record that does not parse")
        listings = [
            r
            for r in audit_records(attack, VICTIM)
            if r["operation"] == "ListKeys" and r["principal"] == app.uri
        ]
        refusals = [re.search(r"; (\d+) records did not verify$", r["detail"]) for r in listings]
        assert max(int(m.group(1)) if m else 0 for m in refusals) >= 3, [
            r["detail"] for r in listings
        ]
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    listed = app.list_keys(VICTIM)
    assert set(good) | bad <= set(listed)
    attack.finish()


def test_records_sealed_with_the_domain_key_but_not_signed_by_a_host_are_refused(
    key_attack: KeyAttack,
) -> None:
    """Whoever holds a domain key generation (a stolen one, a removed host's) can seal valid
    tokens over any metadata; without a member host's signing key the record is refused."""
    attack, app, bob = key_attack, key_attack.app, key_attack.bob
    key = app.create()
    text = attack.plaintext()
    blob = app.encrypt(HONEST, key, text)
    record = attack.keys.honest(key)
    stranger = keytokens.RecordSigner(
        attack.domain.layout.domain_id, HONEST, HostIdentity.generate(HONEST).signer
    )
    widened = reseal(record, attack.domain_keys, grant_to(bob.uri), signer=stranger)
    try:
        # Signed by a key that is not hsa-2's, in hsa-2's name.
        attack.keys.lie(key, widened)
        refused(lambda: bob.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))
        attack.expect_logged(
            f"the stored record of key {key} does not verify",
            f"signature by host {HONEST} does not verify",
        )
        # Not signed at all.
        unsigned = keys_pb2.KeyRecord()
        unsigned.CopyFrom(widened)
        unsigned.signer_host_id, unsigned.signature = "", b""
        attack.keys.lie(key, unsigned)
        refused(lambda: app.encrypt(VICTIM, key, b"x"), FAILED_PRECONDITION, compromised(key))
        attack.expect_logged(f"the stored record of key {key} does not verify", "not signed")
        # The honest signature on the widened record: the signature covers the metadata.
        relabelled = keys_pb2.KeyRecord()
        relabelled.CopyFrom(widened)
        relabelled.signer_host_id, relabelled.signature = record.signer_host_id, record.signature
        attack.keys.lie(key, relabelled)
        refused(lambda: bob.decrypt(VICTIM, blob), FAILED_PRECONDITION, compromised(key))
        assert_still_serving(attack, VICTIM)
    finally:
        attack.keys.tell_truth()
    assert app.decrypt(VICTIM, blob) == text
    refused(lambda: bob.decrypt(VICTIM, blob), PERMISSION_DENIED)
    attack.finish()
