"""Warnings that peers can provoke, logged at a bounded rate.

Anyone who can reach a port can send garbage, and every dropped message deserves a
log line, but not a million of them: 60 s of fuzzing used to write 55 MB of logs.
:class:`ThrottledLog` logs the first ``burst`` warnings of each kind from each peer in
a ``period``, and at most ``10 * burst`` of a kind from all peers together (an attacker
can open many connections), then says once how many it left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledLog:
    def __init__(self, log: logging.Logger, *, burst: int = 5, period: float = 60.0,
                 max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        #: (peer or None for all peers, kind) -> [window start, warnings in the window]
        self._windows: dict[tuple[bytes | None, str], list] = {}

    def warning(self, peer: bytes, kind: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` unless ``peer`` (or everyone) said ``kind`` too often lately."""
        now = self.clock()
        mine = self._count((peer, kind), self.burst, now)
        everyone = self._count((None, kind), 10 * self.burst, now)
        if mine and everyone:
            self.log.warning(msg, *args)

    def _count(self, key: tuple[bytes | None, str], limit: int, now: float) -> bool:
        """Count one warning in ``key``'s window; True while the window is under ``limit``."""
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period:
            if window is not None and window[1] > limit:
                self.log.warning("%d more warnings (%s) from %s were not logged in the last %gs",
                                 window[1] - limit, key[1], _who(key[0]), self.period)
            if window is None and len(self._windows) >= self.max_keys:
                self._expire(now)
            window = self._windows[key] = [now, 0]
        window[1] += 1
        if window[1] == limit + 1:
            self.log.warning("%s from %s: further warnings of this kind are counted, not logged, "
                             "for %gs", key[1], _who(key[0]), self.period)
        return window[1] <= limit

    def _expire(self, now: float) -> None:
        stale = [k for k, (start, _) in self._windows.items() if now - start >= self.period]
        for key in stale:
            del self._windows[key]
        if len(self._windows) >= self.max_keys:  # all fresh: a flood of new peers
            self._windows = {k: w for k, w in self._windows.items() if k[0] is None}


def _who(peer: bytes | None) -> str:
    return "all peers" if peer is None else f"peer {peer!r}"
