"""Timing helpers: per-call latency sampling and a SIGALRM-based deadline."""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class BenchmarkTimeout(TimeoutError):
    """Raised in the main thread when a workload overruns its deadline."""


def latency_ms(call: Callable[[], object], calls: int, warmup: int) -> float:
    """Return the median wall time in ms of ``calls`` invocations of ``call``.

    ``warmup`` untimed calls come first.
    """
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def timed(call: Callable[[], T]) -> tuple[float, T]:
    """Run ``call`` once; return its wall time in seconds and its result."""
    t0 = time.perf_counter()
    result = call()
    return time.perf_counter() - t0, result


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`BenchmarkTimeout` in the main thread after ``seconds``.

    Nests: an enclosing deadline keeps counting and is never extended.  A no-op
    on platforms without SIGALRM.
    """
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    outer_left = signal.alarm(0)
    start = time.monotonic()
    wanted = max(1, math.ceil(seconds))

    def on_alarm(signum: int, frame: object) -> None:
        raise BenchmarkTimeout(f"timed out after {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(min(wanted, outer_left) if outer_left else wanted)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            spent = math.ceil(time.monotonic() - start)
            signal.alarm(max(1, outer_left - spent))
