"""`stop_and_wait` (what pausing an etcd member or a domain process does): it returns only
once every thread of the process is stopped, so a paused process answers nothing after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy._runfiles import stop_and_wait

pytestmark = pytest.mark.integration

# A process whose four threads keep running (so a stop has to reach each of them).
_BUSY = """
import threading
def spin():
    while True:
        sum(range(1000))
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
spin()
"""


def _states(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]


def test_every_thread_is_stopped_when_it_returns_and_runs_again_after_a_resume() -> None:
    process = subprocess.Popen([sys.executable, "-c", _BUSY], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{process.pid}/task")) < 4:
            assert process.poll() is None
            assert time.monotonic() < deadline, "the busy process never started its threads"
            time.sleep(0.01)
        stop_and_wait(process.pid, group=True)
        states = _states(process.pid)
        assert len(states) >= 4
        assert set(states) <= {"T", "t"}, states
        os.killpg(process.pid, signal.SIGCONT)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait(10)
