"""Key-service sessions against a real HSA process: many calls over one stream, each served
and audited exactly as its unary call, errors in their own answers, the stream going on.
The machinery's corner cases (ordering, the in-flight bound, deadlines) are unit tests
(tests/unit/hsa_node/test_session_stream.py)."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.cluster import LocalCluster

from domain_edge import transport
from domain_edge.kms_client import KeyClient
from domain_edge.transport import TlsMaterial
from domain_proto import services_pb2, services_pb2_grpc
from hsa_node.keysession import SESSION_STREAMS

pytestmark = pytest.mark.cluster

DEADLINE = 10.0
HOST = "hsa-1"


@pytest.fixture
def cluster(local_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return local_cluster(nodes=1, operators=1, quorum=1)


class _Session:
    """One open session: requests go in as the test sends them; answers come back by id."""

    def __init__(self, stub: Any) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = stub.Session(iter(self._requests.get, None), timeout=DEADLINE)
        self.answers: dict[int, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._arrived = threading.Condition()
        self.error: grpc.RpcError | None = None
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._responses:
                with self._arrived:
                    for response in message.answers:
                        self.answers[response.request_id] = response
                    self._arrived.notify_all()
        except grpc.RpcError as error:
            self.error = error
        with self._arrived:
            self._arrived.notify_all()

    def send(self, request_id: int, **call: Any) -> None:
        request = services_pb2.SessionRequest(request_id=request_id, **call)
        self._requests.put(services_pb2.SessionRequests(calls=[request]))

    def send_together(self, requests: list[Any]) -> None:
        """Several calls in one message."""
        self._requests.put(services_pb2.SessionRequests(calls=requests))

    def answer(self, request_id: int) -> Any:
        with self._arrived:
            arrived = self._arrived.wait_for(
                lambda: request_id in self.answers or self.error is not None, DEADLINE
            )
        assert arrived, self.error
        assert request_id in self.answers, self.error
        return self.answers[request_id]

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(DEADLINE)


def _channel(cluster: LocalCluster, tls: TlsMaterial | None = None) -> grpc.Channel:
    return transport.mtls_channel(
        cluster.address(HOST), tls or cluster.client_tls(), transport.hsa_host(HOST)
    )


def _audit_records(cluster: LocalCluster) -> list[dict[str, Any]]:
    log = cluster.layout.node_dir(HOST) / "data" / "audit.log"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if "operation" in r]


def _audit_operations(cluster: LocalCluster) -> list[tuple[str, str]]:
    return [(r["operation"], r["result"]) for r in _audit_records(cluster)]


def test_a_session_serves_every_data_plane_call_as_its_unary_call_would(
    cluster: LocalCluster,
) -> None:
    channel = _channel(cluster)
    stub = services_pb2_grpc.KeyServiceStub(channel)
    key_id = stub.CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE).metadata.key_id
    other = stub.CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE).metadata.key_id
    before = _audit_operations(cluster)
    session = _Session(stub)
    try:
        context = {"purpose": "session test"}
        for start in (0, 20):  # two messages of 20 calls each
            session.send_together([
                services_pb2.SessionRequest(request_id=n, encrypt=services_pb2.EncryptRequest(
                    key_id=key_id, plaintext=f"message {n}".encode(), encryption_context=context))
                for n in range(start, start + 20)
            ])  # fmt: skip
        blobs = {n: session.answer(n).encrypt.ciphertext_blob for n in range(40)}
        for n, blob in blobs.items():
            session.send(100 + n, decrypt=services_pb2.DecryptRequest(
                ciphertext_blob=blob, encryption_context=context))  # fmt: skip
        for n in range(40):
            answer = session.answer(100 + n)
            assert (answer.code, answer.decrypt.plaintext) == (0, f"message {n}".encode())
        session.send(200, generate_data_key=services_pb2.GenerateDataKeyRequest(key_id=key_id))
        session.send(201, generate_data_key_without_plaintext=services_pb2.GenerateDataKeyRequest(
            key_id=key_id, number_of_bytes=16))  # fmt: skip
        session.send(202, re_encrypt=services_pb2.ReEncryptRequest(
            ciphertext_blob=blobs[0], source_encryption_context=context,
            destination_key_id=other))  # fmt: skip
        data_key = session.answer(200).generate_data_key
        assert len(data_key.plaintext) == 32
        assert session.answer(201).generate_data_key_without_plaintext.plaintext == b""
        moved = session.answer(202).re_encrypt
        assert (moved.source_key_id, moved.key_id) == (key_id, other)
        # ReEncrypt moved it under the other key with no context: the unary call opens it.
        unary = stub.Decrypt(
            services_pb2.DecryptRequest(ciphertext_blob=moved.ciphertext_blob), timeout=DEADLINE
        )
        assert unary.plaintext == b"message 0"
    finally:
        session.close()
        channel.close()
    assert session.error is None
    # Every call is audited as the stream's caller (checked once, when the stream opened).
    principals = {r["principal"] for r in _audit_records(cluster)[len(before) :]}
    assert principals == {f"spiffe://{cluster.domain_id}/client/demo-app"}, principals
    added = _audit_operations(cluster)[len(before) :]
    assert sorted(added) == sorted(
        [("Encrypt", "ok")] * 40 + [("Decrypt", "ok")] * 41  # (one of them the unary one)
        + [("GenerateDataKey", "ok"), ("GenerateDataKeyWithoutPlaintext", "ok"),
           ("ReEncrypt", "ok")]
    )  # fmt: skip


def _unary_status(call: Callable[[], Any]) -> tuple[int, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().value[0], error.details()
    raise AssertionError("the unary call succeeded")


def test_bad_calls_get_the_unary_status_in_their_answer_and_the_stream_goes_on(
    cluster: LocalCluster,
) -> None:
    channel = _channel(cluster)
    stub = services_pb2_grpc.KeyServiceStub(channel)
    key_id = stub.CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE).metadata.key_id
    bad = {
        1: {"encrypt": services_pb2.EncryptRequest(key_id=key_id, plaintext=b"x" * 5000)},
        2: {"decrypt": services_pb2.DecryptRequest(ciphertext_blob=b"not a ciphertext")},
        3: {"encrypt": services_pb2.EncryptRequest(key_id="no-such-key", plaintext=b"x")},
        4: {"generate_data_key": services_pb2.GenerateDataKeyRequest(
            key_id=key_id, number_of_bytes=4096)},
    }  # fmt: skip
    unary = {
        1: lambda: stub.Encrypt(bad[1]["encrypt"], timeout=DEADLINE),
        2: lambda: stub.Decrypt(bad[2]["decrypt"], timeout=DEADLINE),
        3: lambda: stub.Encrypt(bad[3]["encrypt"], timeout=DEADLINE),
        4: lambda: stub.GenerateDataKey(bad[4]["generate_data_key"], timeout=DEADLINE),
    }
    session = _Session(stub)
    try:
        for number, call in bad.items():
            session.send(number, **call)
        session.send(9, encrypt=services_pb2.EncryptRequest(key_id=key_id, plaintext=b"fine"))
        for number in bad:
            answer = session.answer(number)
            assert answer.code != 0
            assert answer.WhichOneof("result") is None
            assert (answer.code, answer.message) == _unary_status(unary[number])
        assert session.answer(9).code == 0
    finally:
        session.close()
        channel.close()
    assert session.error is None, "one bad call never ends the stream"


def test_only_applications_of_the_domain_open_a_session(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    identity = cluster.layout.node_dir(HOST) / "identity"
    host_tls = TlsMaterial.from_files(
        cluster.layout.ca_cert, identity / "tls.crt", identity / "tls.key"
    )
    channel = _channel(cluster, host_tls)
    try:
        first = services_pb2.SessionRequests(calls=[services_pb2.SessionRequest(request_id=1)])
        responses = services_pb2_grpc.KeyServiceStub(channel).Session(
            iter([first]), timeout=DEADLINE
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(responses)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


def test_a_request_that_does_not_parse_ends_the_session_with_invalid_argument(
    cluster: LocalCluster,
) -> None:
    channel = _channel(cluster)
    try:
        raw = channel.stream_stream(
            "/hsmdomain.v1.KeyService/Session",
            request_serializer=lambda b: b,
            response_deserializer=services_pb2.SessionResponses.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(raw(iter([b"\xff\xff\xff"]), timeout=DEADLINE))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in refused.value.details()
    finally:
        channel.close()


def test_the_echo_session_answers_every_message(cluster: LocalCluster) -> None:
    channel = _channel(cluster)
    try:
        echo = services_pb2_grpc.DiagnosticsStub(channel)
        payloads = [bytes([n]) * 1024 for n in range(50)]

        def messages() -> Iterator[services_pb2.EchoMessages]:
            for start in range(0, len(payloads), 7):  # batches of 7 and a last of 1
                batch = [services_pb2.EchoMessage(payload=p) for p in payloads[start : start + 7]]
                yield services_pb2.EchoMessages(messages=batch)

        back = [
            m.payload
            for batch in echo.EchoSession(messages(), timeout=DEADLINE)
            for m in batch.messages
        ]
        assert sorted(back) == sorted(payloads)
    finally:
        channel.close()


def test_a_client_refused_a_session_sends_its_calls_unary(cluster: LocalCluster) -> None:
    """An HSA serves at most SESSION_STREAMS.per_peer sessions to one identity: KeyClient,
    refused one, goes on with unary calls on that HSA instead of failing."""
    channel = _channel(cluster)
    stub = services_pb2_grpc.KeyServiceStub(channel)
    key_id = stub.CreateKey(services_pb2.CreateKeyRequest(), timeout=DEADLINE).metadata.key_id
    held = [_Session(stub) for _ in range(SESSION_STREAMS.per_peer)]
    try:
        for number, session in enumerate(held):  # each stream is open: one call answered
            session.send(number, encrypt=services_pb2.EncryptRequest(key_id=key_id, plaintext=b"x"))
            assert session.answer(number).code == 0
        tls = cluster.client_tls()
        with KeyClient(
            [cluster.address(HOST)], ca_pem=tls.ca_pem, cert_pem=tls.cert_pem, key_pem=tls.key_pem
        ) as client:
            blob = client.encrypt(key_id, b"through unary calls")
            assert client.decrypt(blob) == b"through unary calls"
            assert client._endpoints[0].unary_until > 0, "the session was refused"
    finally:
        for session in held:
            session.close()
        channel.close()
