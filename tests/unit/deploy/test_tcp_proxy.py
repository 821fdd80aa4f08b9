"""The chaos tool's TCP proxy forwards, cuts (refuse, blackhole), delays and restores a link.

Each test runs a tiny threaded echo server on 127.0.0.1 and talks to it through the proxy.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from deploy.chaos.proxy import LinkMode, TcpProxy, parse_address

pytestmark = pytest.mark.unit


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


@pytest.fixture
def echo() -> Iterator[str]:
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"{host}:{port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def proxy(echo: str) -> Iterator[TcpProxy]:
    with TcpProxy(echo, name="test-proxy") as p:
        yield p


def _connect(address: str, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(parse_address(address), timeout=timeout)


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _was_reset(sock: socket.socket) -> bool:
    """Whether the connection is gone: a write or read fails, or the read sees EOF."""
    try:
        for _ in range(3):
            sock.sendall(b"x")
            if sock.recv(10) == b"":
                return True
            time.sleep(0.05)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return True
    return False


def _new_connection_refused(address: str) -> bool:
    """Whether a new connection to `address` is reset (at connect time or right after)."""
    try:
        sock = _connect(address)
    except (ConnectionResetError, ConnectionAbortedError):
        return True
    with sock:
        return _was_reset(sock)


def test_forwards_both_ways(proxy: TcpProxy) -> None:
    assert proxy.address.startswith("127.0.0.1:")
    assert parse_address(proxy.address)[1] != 0
    with _connect(proxy.address) as sock:
        assert _roundtrip(sock, b"hello") == b"hello"
        big = bytes(range(256)) * 4096  # 1 MiB: more than the buffer limit, so back-pressure
        assert _roundtrip(sock, big) == big
    # The proxy counts a chunk after it has sent it on, so the client can hold the echo a
    # moment before the count includes it: wait (bounded) for the count to catch up.
    expected = 2 * (5 + len(big))
    deadline = time.monotonic() + 5
    while proxy.stats().bytes_forwarded < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = proxy.stats()
    assert stats.accepted == 1
    assert stats.bytes_forwarded >= expected


def test_refuse_resets_open_and_new_connections_then_restores(proxy: TcpProxy) -> None:
    with _connect(proxy.address) as open_sock:
        assert _roundtrip(open_sock, b"before") == b"before"
        proxy.cut(LinkMode.REFUSE)
        assert proxy.mode is LinkMode.REFUSE
        # The open connection was reset: nothing comes back any more.
        assert _was_reset(open_sock)
    # A new connection is accepted by the kernel, then reset by the proxy.
    assert _new_connection_refused(proxy.address)
    assert proxy.stats().refused >= 1
    proxy.restore()
    with _connect(proxy.address) as sock:
        assert _roundtrip(sock, b"after") == b"after"


def test_blackhole_stalls_then_delivers_on_restore(proxy: TcpProxy) -> None:
    with _connect(proxy.address, timeout=0.3) as sock:
        assert _roundtrip(sock, b"one") == b"one"
        proxy.cut("blackhole")
        sock.sendall(b"stalled")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        # A connection opened during the cut is held, not refused.
        with _connect(proxy.address, timeout=0.3) as held:
            held.sendall(b"held")
            with pytest.raises(TimeoutError):
                held.recv(10)
            proxy.restore()
            held.settimeout(2.0)
            assert held.recv(10) == b"held"
        sock.settimeout(2.0)
        assert sock.recv(10) == b"stalled"


def test_delay_is_applied_and_removed(proxy: TcpProxy) -> None:
    with _connect(proxy.address) as sock:
        proxy.set_delay(0.3)
        began = time.monotonic()
        assert _roundtrip(sock, b"slow") == b"slow"
        # Both directions are delayed.
        assert time.monotonic() - began >= 0.55
        proxy.set_delay(0)
        assert _roundtrip(sock, b"fast") == b"fast"


def test_target_down_resets_the_client_and_set_target_moves_it(echo: str) -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{spare.getsockname()[1]}"
    spare.close()  # nothing listens there now
    with TcpProxy(dead) as proxy:
        assert _new_connection_refused(proxy.address)
        assert proxy.stats().upstream_failures >= 1
        proxy.set_target(echo)
        assert proxy.target == echo
        with _connect(proxy.address) as sock:
            assert _roundtrip(sock, b"moved") == b"moved"


def test_half_close_is_passed_on(proxy: TcpProxy) -> None:
    with _connect(proxy.address) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(100):
            received += chunk
        assert received == b"last words"


def test_close_resets_connections_and_frees_the_port(echo: str) -> None:
    proxy = TcpProxy(echo, name="closing-proxy").start()
    sock = _connect(proxy.address)
    assert _roundtrip(sock, b"x") == b"x"
    assert "closing-proxy" in {t.name for t in threading.enumerate()}
    proxy.close()
    proxy.close()  # idempotent
    assert "closing-proxy" not in {t.name for t in threading.enumerate()}
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy.address, timeout=0.5)
    sock.settimeout(1.0)
    assert _was_reset(sock)
    sock.close()


def test_bad_arguments_are_refused(echo: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        TcpProxy("nowhere")
    with pytest.raises(ValueError, match="positive"):
        TcpProxy(echo, buffer_limit=0)
    with TcpProxy(echo) as proxy:
        with pytest.raises(ValueError, match="restore"):
            proxy.cut(LinkMode.UP)
        with pytest.raises(ValueError, match="negative"):
            proxy.set_delay(-1)
