"""The one throttled logger (`domain_edge.throttled_log.ThrottledLog`): what it holds back,
and that its memory stays bounded whatever callers send."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

from domain_edge.throttled_log import ThrottledLog

pytestmark = pytest.mark.unit

LOGGER = "test.throttled"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttled(clock: _Clock, **kwargs: int) -> ThrottledLog:
    return ThrottledLog(logging.getLogger(LOGGER), window=60, clock=clock, **kwargs)


def test_writes_each_distinct_message_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    throttled = _throttled(clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert throttled.warning("peer hsa-2: UNAVAILABLE")
        assert not throttled.warning("peer hsa-2: UNAVAILABLE")
        assert throttled.warning("peer hsa-3: UNAVAILABLE")
        clock.now += 59
        assert not throttled.warning("peer hsa-2: UNAVAILABLE")
        clock.now += 2
        assert throttled.warning("peer hsa-2: UNAVAILABLE")
    assert caplog.text.count("peer hsa-2: UNAVAILABLE") == 2
    assert caplog.text.count("peer hsa-3: UNAVAILABLE") == 1


def test_messages_under_one_key_count_as_one(caplog: pytest.LogCaptureFixture) -> None:
    throttled = _throttled(_Clock())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert throttled.warning("hsa-1 audit.log: record 5 refused", key="hsa-1 audit.log")
        assert not throttled.warning("hsa-1 audit.log: record 9 refused", key="hsa-1 audit.log")
        assert throttled.warning("hsa-1 audit-worker-1.log: refused", key="worker 1")
        # A key never holds back a message logged without one, even with the same text.
        assert throttled.warning("worker 1")
    assert "record 9" not in caplog.text


def test_again_if_changed_writes_a_new_message_under_a_key_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttled = _throttled(_Clock())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert throttled.warning("store behind: 3", key="repair", again_if_changed=True)
        assert not throttled.warning("store behind: 3", key="repair", again_if_changed=True)
        assert throttled.warning("store behind: 4", key="repair", again_if_changed=True)
        assert throttled.warning("store behind: 3", key="repair", again_if_changed=True)
    assert caplog.text.count("store behind: 3") == 2


def test_levels(caplog: pytest.LogCaptureFixture) -> None:
    throttled = _throttled(_Clock())
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert throttled.info("an info")
        assert throttled.log(logging.ERROR, "an error", key="e")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "an info"),
        (logging.ERROR, "an error"),
    ]


def test_memory_stays_bounded_under_many_distinct_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    throttled = _throttled(clock, max_keys=100)
    caplog.set_level(logging.CRITICAL, logger=LOGGER)  # nothing written, only remembered
    for i in range(10_000):
        throttled.warning(f"refused peer 10.0.{i // 256}.{i % 256}")
        throttled.warning("same text", key=f"peer-{i}")
        assert len(throttled) <= 100
    assert len(throttled) == 100

    # The bytes it holds do not grow with the number of distinct keys seen.
    tracemalloc.start()
    try:
        for i in range(5_000):
            throttled.warning(f"a distinct message {i:08d}")
        held_after_5k = tracemalloc.get_traced_memory()[0]
        for i in range(5_000, 50_000):
            throttled.warning(f"a distinct message {i:08d}")
        held_after_50k = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(throttled) == 100
    # 45,000 more remembered messages would hold megabytes; a bounded log holds the same.
    assert held_after_50k < held_after_5k + 16 * 1024


def test_the_key_logged_longest_ago_is_forgotten_first(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    throttled = _throttled(clock, max_keys=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert throttled.warning("a")
        clock.now += 1
        assert throttled.warning("b")
        clock.now += 1
        assert throttled.warning("c")  # forgets "a", the oldest
        assert not throttled.warning("b")
        assert not throttled.warning("c")
        assert throttled.warning("a")  # forgotten, so written again within the window


def test_a_bound_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ThrottledLog(logging.getLogger(LOGGER), max_keys=0)
