"""The step stream run ahead in a thread of its own (ldm_scene.ui.prefetch): order, errors, early close."""
from __future__ import annotations

import threading

import pytest

from ldm_scene.ui.prefetch import prefetched


def _counting(n: int, log: dict, fail_at: int | None = None):
    log["thread"] = threading.current_thread().name
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad step {i}")
            log.setdefault("made", []).append(i)
            yield i
    finally:
        log["closed"] = True


def test_items_arrive_in_order_from_another_thread():
    log: dict = {}
    assert list(prefetched(lambda: _counting(7, log))) == list(range(7))
    assert log["thread"] == "ldm-scene-stream" != threading.current_thread().name
    assert log["closed"]


def test_an_error_is_raised_in_the_consumer_after_the_items_before_it():
    log: dict = {}
    got = []
    with pytest.raises(ValueError, match="bad step 3"):
        for item in prefetched(lambda: _counting(7, log, fail_at=3)):
            got.append(item)
    assert got == [0, 1, 2] and log["closed"]


def test_closing_early_stops_the_producer_and_closes_the_stream():
    log: dict = {}
    stream = prefetched(lambda: _counting(1000, log), depth=2)
    assert next(stream) == 0
    stream.close()
    # closed and joined before close() returned: the producer ran at most depth (+1 in hand) ahead
    assert log["closed"]
    assert len(log["made"]) <= 4
    assert not any(t.name == "ldm-scene-stream" for t in threading.enumerate())


def test_depth_is_checked():
    with pytest.raises(ValueError, match="depth"):
        next(prefetched(lambda: iter([1]), depth=0))
