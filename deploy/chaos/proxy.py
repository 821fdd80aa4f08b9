"""A TCP forwarder that the chaos tool places between two processes to cut or slow a link.

`TcpProxy` listens on 127.0.0.1 (port chosen by the OS) and forwards every connection to its
target, byte for byte (TLS passes through untouched: the proxy sees only ciphertext). On
command it cuts the link, in one of two ways, and restores it:
- `refuse`: every open connection is reset, and new ones are reset as soon as accepted, as
  when the far process is gone (callers see UNAVAILABLE at once);
- `blackhole`: nothing is forwarded any more and new connections are held without reaching
  the target, as when packets are dropped (callers wait until their deadlines); on restore
  the stalled bytes flow again and held connections are connected;
and it can add a fixed delay to every chunk it forwards.

Invariants: one thread runs every socket of a proxy (a selector loop), so state changes are
applied between events, never during one; commands from other threads are queued and
`cut`, `restore` and `set_delay` return only after the loop applied them; each direction of
a connection buffers at most `buffer_limit` bytes (reading stops while it is full), so a slow
reader cannot make the proxy grow without bound; at most `max_connections` connections are
open at once; `close` resets every connection, closes every socket and joins the thread.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

__all__ = ["LinkMode", "ProxyStats", "TcpProxy", "parse_address"]

DEFAULT_BUFFER_LIMIT: Final = 256 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 256
_CHUNK: Final = 64 * 1024
_COMMAND_TIMEOUT: Final = 5.0
_IDLE_WAKE: Final = 0.5


class LinkMode(enum.Enum):
    """How a proxy treats its link: forwarding, or cut in one of two ways."""

    UP = "up"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" (ValueError if it is not one)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


@dataclass
class ProxyStats:
    """Counters of one proxy (read them with `TcpProxy.stats`)."""

    accepted: int = 0
    refused: int = 0
    reset: int = 0
    upstream_failures: int = 0
    bytes_forwarded: int = 0
    open_connections: int = 0


@dataclass
class _Direction:
    """Bytes read from one side and waiting to be written to the other, with due times."""

    chunks: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    buffered: int = 0
    eof: bool = False  # the reading side closed its end
    shut: bool = False  # EOF passed on to the writing side

    def push(self, due: float, data: bytes) -> None:
        self.chunks.append((due, data))
        self.buffered += len(data)

    def due(self, now: float) -> bool:
        return bool(self.chunks) and self.chunks[0][0] <= now

    def next_due(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def drained(self) -> bool:
        return not self.chunks


class _Connection:
    """One accepted client and its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.up = _Direction()  # client -> upstream
        self.down = _Direction()  # upstream -> client
        self.closed = False

    @property
    def connected(self) -> bool:
        return self.upstream is not None and not self.connecting

    def finished(self) -> bool:
        """Both directions ended and everything was passed on."""
        return self.up.shut and self.down.shut


def _reset(sock: socket.socket | None) -> None:
    """Close a socket with a TCP reset (SO_LINGER 0) so the peer notices at once."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forward connections from `address` (127.0.0.1, OS-chosen port) to `target`.

    Use as a context manager, or call `start` and `close`.
    """

    def __init__(
        self,
        target: str,
        *,
        name: str = "",
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        parse_address(target)
        if buffer_limit < 1 or max_connections < 1:
            raise ValueError("buffer_limit and max_connections must be positive")
        self.name = name or f"proxy-to-{target}"
        self._target = target
        self._buffer_limit = buffer_limit
        self._max_connections = max_connections
        self._mode = LinkMode.UP
        self._delay = 0.0
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._commands: collections.deque[tuple[Callable[[], None], threading.Event]] = (
            collections.deque()
        )
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._connections: list[_Connection] = []
        self._registered: dict[socket.socket, int] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        host, port = self._listener.getsockname()[:2]
        self.address = f"{host}:{port}"

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Start forwarding (idempotent)."""
        if self._thread is None:
            self._selector.register(self._listener, selectors.EVENT_READ, "listen")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Reset every connection, close every socket and stop the thread (idempotent)."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        if self._thread is not None:
            self._wake()
            self._thread.join(timeout=_COMMAND_TIMEOUT)
        else:
            self._shutdown()
        # Commands queued after the loop ended are released, not left waiting.
        with self._lock:
            while self._commands:
                self._commands.popleft()[1].set()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- commands ---------------------------------------------------------------------------

    @property
    def mode(self) -> LinkMode:
        """The link's current mode."""
        return self._mode

    @property
    def target(self) -> str:
        """Where new connections go."""
        return self._target

    @property
    def delay(self) -> float:
        """Seconds added to every forwarded chunk."""
        return self._delay

    def stats(self) -> ProxyStats:
        """A copy of the counters."""
        with self._lock:
            return ProxyStats(**vars(self._stats))

    def set_target(self, target: str) -> None:
        """Send new connections to `target` (open ones keep theirs)."""
        parse_address(target)
        self._run_command(lambda: setattr(self, "_target", target))

    def cut(self, mode: LinkMode | str = LinkMode.REFUSE) -> None:
        """Cut the link: `refuse` resets connections, `blackhole` stalls them."""
        mode = LinkMode(mode)
        if mode is LinkMode.UP:
            raise ValueError("cut needs refuse or blackhole; use restore() to restore")
        self._run_command(lambda: self._apply_mode(mode))

    def restore(self) -> None:
        """Forward again; stalled bytes flow and held connections are connected."""
        self._run_command(lambda: self._apply_mode(LinkMode.UP))

    def set_delay(self, seconds: float) -> None:
        """Delay every chunk read from now on by `seconds` (0 for none)."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self._run_command(lambda: setattr(self, "_delay", float(seconds)))

    def _run_command(self, command: Callable[[], None]) -> None:
        """Run `command` on the loop thread and wait until it ran."""
        if self._thread is None or not self._thread.is_alive():
            command()
            return
        done = threading.Event()
        with self._lock:
            if self._stopping.is_set():
                return
            self._commands.append((command, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            raise RuntimeError(f"{self.name} did not apply a command in {_COMMAND_TIMEOUT} s")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _apply_mode(self, mode: LinkMode) -> None:
        self._mode = mode
        if mode is LinkMode.REFUSE:
            for connection in list(self._connections):
                self._count("reset")
                self._close(connection, reset=True)
        elif mode is LinkMode.UP:
            for connection in list(self._connections):
                if connection.upstream is None:
                    self._connect_upstream(connection)

    # --- the loop ---------------------------------------------------------------------------

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self._stats, counter, getattr(self._stats, counter) + amount)
            self._stats.open_connections = len(self._connections)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._run_commands()
                self._update_interest()
                timeout = self._timeout()
                for key, events in self._selector.select(timeout):
                    self._dispatch(key, events)
                    if self._stopping.is_set():
                        break
                self._flush_due()
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command, done = self._commands.popleft()
            try:
                command()
            finally:
                done.set()

    def _timeout(self) -> float:
        now = time.monotonic()
        soonest: float | None = None
        if self._mode is not LinkMode.BLACKHOLE:
            for connection in self._connections:
                for direction in (connection.up, connection.down):
                    due = direction.next_due()
                    if due is not None and (soonest is None or due < soonest):
                        soonest = due
        if soonest is None:
            return _IDLE_WAKE
        return max(0.0, min(_IDLE_WAKE, soonest - now))

    def _interest(self, connection: _Connection) -> dict[socket.socket, int]:
        """The events each socket of a connection should wait for now."""
        wanted: dict[socket.socket, int] = {connection.client: 0}
        if connection.upstream is not None:
            wanted[connection.upstream] = 0
        if connection.closed or self._mode is LinkMode.BLACKHOLE:
            return wanted
        if connection.connecting:
            assert connection.upstream is not None
            wanted[connection.upstream] = selectors.EVENT_WRITE
            return wanted
        if connection.upstream is None:
            return wanted
        now = time.monotonic()
        for source, sink, direction in (
            (connection.client, connection.upstream, connection.up),
            (connection.upstream, connection.client, connection.down),
        ):
            if not direction.eof and direction.buffered < self._buffer_limit:
                wanted[source] |= selectors.EVENT_READ
            if direction.due(now):
                wanted[sink] |= selectors.EVENT_WRITE
        return wanted

    def _update_interest(self) -> None:
        for connection in self._connections:
            for sock, events in self._interest(connection).items():
                self._register(sock, events, connection)

    def _register(self, sock: socket.socket, events: int, connection: _Connection) -> None:
        current = self._registered.get(sock, 0)
        if events == current:
            return
        if events == 0:
            self._selector.unregister(sock)
            del self._registered[sock]
        elif current == 0:
            self._selector.register(sock, events, connection)
            self._registered[sock] = events
        else:
            self._selector.modify(sock, events, connection)
            self._registered[sock] = events

    def _unregister(self, sock: socket.socket | None) -> None:
        if sock is not None and sock in self._registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)
            del self._registered[sock]

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "wake":
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
            return
        if key.data == "listen":
            self._accept()
            return
        connection: _Connection = key.data
        if connection.closed:
            return
        sock = key.fileobj
        if connection.connecting and sock is connection.upstream:
            self._finish_connect(connection)
            return
        if events & selectors.EVENT_READ:
            self._read(connection, sock is connection.client)
        if not connection.closed and events & selectors.EVENT_WRITE:
            self._write(connection, toward_upstream=sock is connection.upstream)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._mode is LinkMode.REFUSE or len(self._connections) >= self._max_connections:
                self._count("refused")
                _reset(client)
                continue
            connection = _Connection(client)
            self._connections.append(connection)
            self._count("accepted")
            if self._mode is LinkMode.UP:
                self._connect_upstream(connection)

    def _connect_upstream(self, connection: _Connection) -> None:
        host, port = parse_address(self._target)
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.upstream = upstream
        code = upstream.connect_ex((host, port))
        if code in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            connection.connecting = code != 0
            return
        self._count("upstream_failures")
        self._close(connection, reset=True)

    def _finish_connect(self, connection: _Connection) -> None:
        assert connection.upstream is not None
        code = connection.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            self._count("upstream_failures")
            self._close(connection, reset=True)
            return
        connection.connecting = False

    def _read(self, connection: _Connection, from_client: bool) -> None:
        sock = connection.client if from_client else connection.upstream
        direction = connection.up if from_client else connection.down
        assert sock is not None
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection, reset=True)
            return
        if not data:
            direction.eof = True
            self._pass_eof(connection)
            return
        direction.push(time.monotonic() + self._delay, data)
        if self._delay == 0:
            self._write(connection, toward_upstream=from_client)

    def _write(self, connection: _Connection, *, toward_upstream: bool) -> None:
        sock = connection.upstream if toward_upstream else connection.client
        direction = connection.up if toward_upstream else connection.down
        if sock is None or connection.connecting or self._mode is LinkMode.BLACKHOLE:
            return
        now = time.monotonic()
        while direction.due(now):
            due, data = direction.chunks[0]
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(connection, reset=True)
                return
            direction.buffered -= sent
            self._count("bytes_forwarded", sent)
            if sent < len(data):
                direction.chunks[0] = (due, data[sent:])
                return
            direction.chunks.popleft()
        self._pass_eof(connection)

    def _pass_eof(self, connection: _Connection) -> None:
        """Half-close toward a side whose peer finished sending, once its bytes are out."""
        for direction, sink in (
            (connection.up, connection.upstream),
            (connection.down, connection.client),
        ):
            if direction.eof and direction.drained and not direction.shut and sink is not None:
                direction.shut = True
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
        if connection.finished():
            self._close(connection, reset=False)

    def _flush_due(self) -> None:
        """Write delayed chunks whose time has come (their sockets may be writable already)."""
        if self._mode is LinkMode.BLACKHOLE:
            return
        now = time.monotonic()
        for connection in list(self._connections):
            if connection.closed or not connection.connected:
                continue
            if connection.up.due(now):
                self._write(connection, toward_upstream=True)
            if not connection.closed and connection.down.due(now):
                self._write(connection, toward_upstream=False)

    def _close(self, connection: _Connection, *, reset: bool) -> None:
        if connection.closed:
            return
        connection.closed = True
        for sock in (connection.client, connection.upstream):
            self._unregister(sock)
            if sock is None:
                continue
            if reset:
                _reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()
        with contextlib.suppress(ValueError):
            self._connections.remove(connection)
        with self._lock:
            self._stats.open_connections = len(self._connections)

    def _shutdown(self) -> None:
        for connection in list(self._connections):
            self._close(connection, reset=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            self._unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError, ValueError):
            self._selector.close()
