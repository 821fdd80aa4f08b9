"""KeyClient against a real local domain: failover when an HSA dies, envelopes of large files.

Every test starts its own coordinator and HSA processes (`local_cluster`), killed at teardown
whatever the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cluster import LocalCluster

from domain_core.errors import (
    HsmDomainError,
    InvalidCiphertextError,
    NotAppliedError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from domain_edge.kms_client import (
    AsyncKeyClient,
    KeyClient,
    decrypt_envelope,
    encrypt_envelope,
    read_cluster,
)

pytestmark = pytest.mark.cluster

MIB = 1024 * 1024


def _client(cluster: LocalCluster, addresses: list[str]) -> KeyClient:
    tls = cluster.client_tls()
    return KeyClient(
        addresses, ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem, timeout=5
    )


def test_a_ciphertext_made_on_one_hsa_decrypts_after_that_hsa_dies(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = local_cluster(nodes=3)
    addresses = cluster.node_addresses()
    assert sorted(read_cluster(cluster.directory)[0]) == sorted(addresses.values())
    with (
        _client(cluster, [addresses["hsa-1"]]) as on_first,
        KeyClient.from_cluster(cluster.directory) as everywhere,
    ):
        key = on_first.create_key(description="failover")
        context = {"order": "42"}
        blobs = [on_first.encrypt(key.key_id, f"secret {i}".encode(), context) for i in range(3)]
        data_key, data_key_blob = on_first.generate_data_key(key.key_id, context)
        # Warm every channel of the full client, then lose the HSA that made the blobs.
        for _ in range(3):
            assert everywhere.describe_key(key.key_id).description == "failover"
        cluster.kill_node("hsa-1")
        # Round-robin keeps reaching the dead endpoint first for some calls: each fails over.
        for _ in range(3):
            for i, blob in enumerate(blobs):
                assert everywhere.decrypt(blob, context) == f"secret {i}".encode()
        assert everywhere.decrypt(data_key_blob, context) == data_key
        with pytest.raises(InvalidCiphertextError):
            everywhere.decrypt(blobs[0], {"order": "43"})
        # Calls that create or change keys fail over too when the dead HSA is refused at
        # connect time (nothing was sent); they work on the survivors.
        created = [everywhere.create_key(description=f"after {i}") for i in range(3)]
        rotated = everywhere.rotate_key(created[0].key_id)
        assert rotated.current_backing_version == 2
        moved = everywhere.re_encrypt(blobs[1], created[1].key_id, context, {"order": "moved"})
        assert everywhere.decrypt(moved, {"order": "moved"}) == b"secret 1"
        ids = {m.key_id for m in everywhere.list_keys(page_size=2)}
        assert {key.key_id, *(c.key_id for c in created)} <= ids
        with pytest.raises(NotFoundError):
            everywhere.describe_key("1b4e28ba-2fa1-41d2-883f-0016d3cca427")


def test_the_asyncio_client_shares_sessions_fails_over_and_reopens_them(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """AsyncKeyClient (issue 18): many tasks' calls travel over one session per HSA, a bad
    call fails alone, an HSA's death fails its calls over to the other, and once it is back
    a client of it alone reopens its session and is served again."""
    cluster = local_cluster(nodes=2)
    addresses = cluster.node_addresses()
    tls = cluster.client_tls()
    context = {"app": "asyncio"}

    async def scenario() -> None:
        async with (
            AsyncKeyClient.from_cluster(cluster.directory, timeout=5) as everywhere,
            AsyncKeyClient(
                [addresses["hsa-1"]],
                ca_pem=tls.ca_pem,
                cert_pem=tls.cert_pem,
                key_pem=tls.key_pem,
                timeout=2,
                attempts=2,
            ) as on_first,
        ):
            key_id = (await everywhere.create_key(description="asyncio")).key_id
            texts = [f"task {n}".encode() for n in range(200)]
            blobs = await asyncio.gather(*(everywhere.encrypt(key_id, t, context) for t in texts))
            bad, *good = await asyncio.gather(
                everywhere.decrypt(blobs[0], {"app": "other"}),
                *(everywhere.decrypt(b, context) for b in blobs),
                return_exceptions=True,
            )
            assert isinstance(bad, InvalidCiphertextError)
            assert good == texts
            # Both endpoints served the calls, each over its one open session.
            for endpoint in everywhere._endpoints:
                assert endpoint.unary_until == 0
                assert endpoint.session._stream is not None
                assert endpoint.session._stream.ended is None
            assert await on_first.decrypt(blobs[1], context) == texts[1]

            await asyncio.to_thread(cluster.kill_node, "hsa-1")
            again = await asyncio.gather(*(everywhere.decrypt(b, context) for b in blobs[:50]))
            assert again == texts[:50]
            with pytest.raises((UnavailableError, NotAppliedError)):
                await on_first.decrypt(blobs[2], context)

            await asyncio.to_thread(cluster.start_node, "hsa-1")
            deadline = time.monotonic() + 30
            while True:  # the endpoint cools down (at most 5 s), then its session reopens
                try:
                    assert await on_first.decrypt(blobs[3], context) == texts[3]
                    break
                except (UnavailableError, NotAppliedError):
                    assert time.monotonic() < deadline, "hsa-1 never served the client again"
                    await asyncio.sleep(0.2)
            stream = on_first._endpoints[0].session._stream
            assert stream is not None
            assert stream.ended is None

    asyncio.run(scenario())


def test_policies_decide_who_may_do_what(local_cluster: Callable[..., LocalCluster]) -> None:
    cluster = local_cluster(nodes=2)
    with KeyClient.from_cluster(cluster.directory) as client:
        me = f"spiffe://{cluster.domain_id}/client/demo-app"
        key = client.create_key(
            policy={
                "grants": [
                    {"principals": [me], "operations": ["encrypt", "describe", "admin"]},
                ]
            }
        )
        blob = client.encrypt(key.key_id, b"x")
        with pytest.raises(PermissionDeniedError, match="may not decrypt"):
            client.decrypt(blob)
        updated = client.put_key_policy(
            key.key_id, {"grants": [{"principals": [me], "operations": ["decrypt", "admin"]}]}
        )
        assert [g.operations for g in updated.policy] == [("decrypt", "admin")]

        # Another HSA may serve from its cache for up to its TTL (2 s): the change arrives.
        def decrypts_everywhere() -> bool:
            try:
                return all(client.decrypt(blob) == b"x" for _ in range(4))
            except PermissionDeniedError:
                return False

        cluster.wait_for(decrypts_everywhere, timeout=15, what="the new policy on every HSA")
        with pytest.raises(PermissionDeniedError, match="may not encrypt"):
            client.encrypt(key.key_id, b"y")


def _write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, MIB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def test_envelope_of_a_30_mib_file_streams_and_detects_tampering(
    local_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = local_cluster(nodes=2)
    files = tmp_path / "files"
    files.mkdir()
    plain, sealed, back = files / "data.bin", files / "data.hsme", files / "back.bin"
    expected = _write_random_file(plain, 30 * MIB)
    context = {"file": "data.bin"}
    with KeyClient.from_cluster(cluster.directory) as client:
        key_id = client.create_key().key_id
        with plain.open("rb") as source, sealed.open("wb") as out:
            assert encrypt_envelope(client, key_id, source, out, context) == 30 * MIB
        # 64 KiB chunks, 16 bytes of tag each, plus one header.
        assert 30 * MIB + 480 * 16 < sealed.stat().st_size < 30 * MIB + 480 * 16 + 1024
        with sealed.open("rb") as source:
            assert decrypt_envelope(client, source, back, context) == 30 * MIB
        assert _sha256(back) == expected
        back.unlink()

        # One flipped bit in the middle: refused, and no output file appears.
        with sealed.open("r+b") as handle:
            handle.seek(15 * MIB)
            byte = handle.read(1)
            handle.seek(15 * MIB)
            handle.write(bytes([byte[0] ^ 0x01]))
        with sealed.open("rb") as source, pytest.raises(InvalidCiphertextError) as info:
            decrypt_envelope(client, source, back)
        assert str(info.value) == "invalid ciphertext"
        assert sorted(p.name for p in files.iterdir()) == ["data.bin", "data.hsme"]


class _Load:
    """Threads calling a KeyClient as fast as they can; every outcome is counted by name
    ("ok", the domain error's class, or "FOREIGN ..." for anything that is not ours)."""

    def __init__(self, client: KeyClient, key_id: str, blob: bytes, threads: int = 3) -> None:
        self._client, self._key_id, self._blob = client, key_id, blob
        self._threads = threads
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _one(self, turn: int) -> str:
        try:
            if turn % 3 == 0:
                assert self._client.decrypt(self._blob, CONTEXT) == BEFORE
            elif turn % 3 == 1:
                self._client.encrypt(self._key_id, b"during", CONTEXT)
            else:
                self._client.generate_random(16)
        except HsmDomainError as error:
            return type(error).__name__
        except BaseException as error:  # what the issue found: a foreign exception
            return f"FOREIGN {error!r}"
        return "ok"

    def run(self, until: Callable[[Counter[str]], bool], timeout: float) -> Counter[str]:
        """Call until `until(outcomes of this run)` holds, a foreign exception escapes, or
        `timeout` passes; the outcomes of this run."""
        mine: Counter[str] = Counter()
        stop = threading.Event()
        deadline = time.monotonic() + timeout

        def work() -> None:
            turn = 0
            while not stop.is_set() and time.monotonic() < deadline:
                outcome = self._one(turn)
                turn += 1
                with self._lock:
                    mine[outcome] += 1
                    self.outcomes[outcome] += 1
                    if until(mine) or outcome.startswith("FOREIGN"):
                        stop.set()

        threads = [threading.Thread(target=work) for _ in range(self._threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return mine


def _failed(outcomes: Counter[str]) -> int:
    """Calls that failed for want of an HSA (UnavailableError, NotAppliedError among them)."""
    return outcomes["UnavailableError"] + outcomes["NotAppliedError"]


CONTEXT = {"tenant": "outage"}
BEFORE = b"encrypted before the outage"


def test_the_client_recovers_fully_after_a_whole_domain_outage(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 13, item 13: every HSA down long enough under load that each endpoint fails
    thousands of times in a row (the old cool-down overflowed after about 1,000), then back:
    the client raised only its own errors, and every call succeeds again within a bound,
    first with two HSAs back (one endpoint still dead), then with all."""
    cluster = local_cluster(nodes=3)
    endpoints = list(cluster.node_addresses().values())
    tls = cluster.client_tls()
    # Short attempts; three attempts per call, one on each endpoint, so that every failed
    # call is one more consecutive failure of each of the three endpoints.
    with KeyClient(
        endpoints,
        ca_pem=tls.ca_pem,
        cert_pem=tls.cert_pem,
        key_pem=tls.key_pem,
        timeout=1.0,
        attempts=3,
        total_timeout=3.0,
    ) as client:
        key_id = client.create_key(description="outage").key_id
        blob = client.encrypt(key_id, BEFORE, CONTEXT)
        load = _Load(client, key_id, blob)
        for host in cluster.hosts:
            cluster.kill_node(host)
        down = load.run(until=lambda seen: _failed(seen) >= 2500, timeout=240)
        assert _failed(down) >= 2500, down
        assert set(down) <= {"NotAppliedError", "UnavailableError"}, down

        # Two HSAs back (a restarted HSA serves keys once a peer gave it the key floors it
        # missed, so after a whole-domain outage the first two serve together): within a
        # bound, calls succeed; then every call does (the endpoint still dead, which has
        # failed thousands of times in a row, is cooled down and failed over, never a reason
        # for a call to fail).
        for host in ("hsa-1", "hsa-2"):
            cluster.start_node(host, wait_for_health=False)
        first = load.run(until=lambda seen: seen["ok"] >= 1, timeout=60)
        assert first["ok"] >= 1, first
        cluster.wait_converged(hosts=("hsa-1", "hsa-2"))
        some_back = load.run(until=lambda seen: seen.total() >= 600, timeout=120)
        assert some_back == {"ok": some_back.total()}, some_back

        cluster.start_node("hsa-3")
        all_back = load.run(until=lambda seen: seen.total() >= 600, timeout=120)
        assert all_back == {"ok": all_back.total()}, all_back
    assert not [o for o in load.outcomes if o.startswith("FOREIGN")], load.outcomes


def test_create_key_without_the_coordinator_is_a_definite_retryable_failure(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """Issue 13, item 14: with the coordinator stopped, an HSA cannot store a new key and
    creates nothing; the client says so (NotAppliedError), not "may have been applied". A
    paused coordinator is another matter: the write may land when it resumes, so that outcome
    stays unknown."""
    cluster = local_cluster(nodes=2)
    with KeyClient.from_cluster(cluster.directory, timeout=5) as client:
        key = client.create_key(description="before")
        blob = client.encrypt(key.key_id, b"cached", CONTEXT)
        before = {k.key_id for k in client.list_keys()}

        cluster.stop_coordinator()
        with pytest.raises(NotAppliedError) as refused:
            client.create_key(description="while the coordinator is stopped")
        message = str(refused.value)
        assert "CreateKey was not applied" in message
        assert "created nothing" in message
        assert "may have been applied" not in message
        with pytest.raises(NotAppliedError, match="changed nothing"):
            client.disable_key(key.key_id)
        assert client.decrypt(blob, CONTEXT) == b"cached"  # the data plane goes on

        cluster.start_coordinator()
        created = cluster.wait_for(
            lambda: _try_create(client), timeout=30, what="CreateKey with the coordinator back"
        )
        # Nothing was created by the refused calls; the key is still enabled.
        assert {k.key_id for k in client.list_keys()} == before | {created}
        assert client.describe_key(key.key_id).state == "enabled"

        # Paused, the coordinator holds the HSA's write unanswered: the outcome is unknown.
        coordinator = cluster.pid("coordinator")
        idempotency_key = str(uuid.uuid4())
        os.kill(coordinator, signal.SIGSTOP)
        try:
            with pytest.raises(UnavailableError, match="may have been applied") as unknown:
                client.create_key(description="paused", idempotency_key=idempotency_key)
            assert not isinstance(unknown.value, NotAppliedError)
        finally:
            os.kill(coordinator, signal.SIGCONT)
        # Retried with the same idempotency key once it is back: one key, whether the held
        # write landed or not, and a further retry names the same key.
        retried = cluster.wait_for(
            lambda: _try_create(client, "paused", idempotency_key),
            timeout=30,
            what="the retried CreateKey",
        )
        assert client.create_key(description="paused", idempotency_key=idempotency_key).key_id == (
            retried
        )
        paused = [k.key_id for k in client.list_keys() if k.description == "paused"]
        assert paused == [retried]


def test_a_create_key_retried_with_its_idempotency_key_creates_one_key(
    local_cluster: Callable[..., LocalCluster],
) -> None:
    """CreateKey's idempotency key names the key (derived with the caller's identity), so a
    retry on another HSA after a lost answer returns the first attempt's key."""
    cluster = local_cluster(nodes=2)
    addresses = cluster.node_addresses()
    idempotency_key = str(uuid.uuid4())
    with (
        _client(cluster, [addresses["hsa-1"]]) as first,
        _client(cluster, [addresses["hsa-2"]]) as second,
    ):
        made = first.create_key(description="once", idempotency_key=idempotency_key)
        again = second.create_key(description="once", idempotency_key=idempotency_key)
        assert again.key_id == made.key_id
        assert again.created_at == made.created_at
        other = second.create_key(description="once", idempotency_key=str(uuid.uuid4()))
        assert other.key_id != made.key_id
        assert sorted(k.key_id for k in first.list_keys() if k.description == "once") == sorted(
            [made.key_id, other.key_id]
        )
        # A retry never undoes what happened to the key since: it answers with the key as is.
        first.schedule_key_deletion(made.key_id, days=7)
        late = second.create_key(description="once", idempotency_key=idempotency_key)
        assert (late.key_id, late.state) == (made.key_id, "pending-deletion")


def _try_create(
    client: KeyClient, description: str = "after", idempotency_key: str | None = None
) -> str | None:
    try:
        return client.create_key(description=description, idempotency_key=idempotency_key).key_id
    except (NotAppliedError, UnavailableError):
        return None
