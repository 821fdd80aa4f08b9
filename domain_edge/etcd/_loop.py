"""One asyncio event loop in one daemon thread per process, for every etcd client in it.

aetcd is asyncio-only and the coordinator is synchronous and threaded: its threads submit
coroutines here (`run_coroutine_threadsafe`) and wait for them with a timeout.

Invariants: one loop per process (a forked child makes its own, the parent's thread does not
exist there); a call waits at most its timeout, then cancels its coroutine and raises
TimeoutError; a blocking call from the loop's own thread is refused (it would deadlock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoopThread:
    """A lazily started event loop running forever in a daemon thread."""

    def __init__(self, name: str = "etcd-loop") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started on first use, and again in a forked child)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name=self._name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run `coroutine` on the loop and wait for its result, at most `timeout` seconds
        (TimeoutError then, the coroutine cancelled)."""
        if self.in_loop_thread():
            coroutine.close()
            raise RuntimeError("a blocking etcd call from the etcd event loop's own thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:.1f} s") from None

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start `coroutine` on the loop without waiting (background tasks: keep-alives,
        watches); the future says how it ended."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop())


_SHARED = EventLoopThread()


def shared_loop() -> EventLoopThread:
    """The process's one etcd event loop."""
    return _SHARED
