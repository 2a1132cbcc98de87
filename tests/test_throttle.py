"""ThrottledLog: the log volume a peer can provoke is bounded, and what was left out is told."""

from __future__ import annotations

import logging

from ipyparallel_lite.controller.throttle import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def throttled(burst: int = 3, period: float = 10.0):
    log = logging.getLogger(f"test-throttle-{id(object())}")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log.addHandler(Keep())
    log.propagate = False
    clock = Clock()
    return ThrottledLog(log, burst=burst, period=period, clock=clock), lines, clock


def test_a_peer_gets_a_burst_then_one_notice_then_silence():
    t, lines, _ = throttled(burst=3)
    for i in range(100):
        t.warning(b"p", "garbage", "bad message %d", i)
    assert lines[:3] == ["bad message 0", "bad message 1", "bad message 2"]
    assert "peer b'p': further warnings of this kind are counted, not logged" in lines[3]
    assert "all peers: further warnings" in lines[4]  # 100 is past the shared cap, too
    assert len(lines) == 5


def test_after_the_period_the_count_of_what_was_left_out_is_logged():
    t, lines, clock = throttled(burst=2, period=10)
    for _ in range(12):
        t.warning(b"p", "garbage", "bad")
    clock.now = 11
    t.warning(b"p", "garbage", "bad again")
    assert "10 more warnings (garbage) from peer b'p'" in lines[3]
    assert lines[-1] == "bad again"


def test_kinds_and_peers_are_counted_apart_but_all_peers_share_a_cap():
    t, lines, _ = throttled(burst=2)
    t.warning(b"a", "garbage", "a1")
    t.warning(b"a", "truncated", "a2")
    t.warning(b"b", "garbage", "b1")
    assert lines == ["a1", "a2", "b1"]
    lines.clear()
    for i in range(100):  # a new peer for every message: the shared cap holds
        t.warning(str(i).encode(), "unverified", "x")
    assert lines.count("x") == 20


def test_its_memory_stays_bounded_under_a_flood_of_new_peers():
    t = ThrottledLog(logging.getLogger("test-throttle-bounded"), max_keys=100)
    for i in range(10_000):
        t.warning(str(i).encode(), "garbage", "x")
    assert len(t._windows) <= 101
