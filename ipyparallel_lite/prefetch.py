"""How many tasks an engine may hold at once: the adaptive prefetch rule.

One rule for the controller's scheduler (tasks it places) and for the client (tasks it
claims, connection.CLAIM). Each reply says how long its task ran (``run_time``); an
:class:`Estimate` keeps an EWMA of that and of the round trip around it, measured on
tasks that found the engine idle. While the engine's tasks take under
:data:`FAST_SHARE` of a round trip, it may hold ``ceil(round trip / run time)`` tasks
beyond ``hwm`` (at most :data:`PREFETCH_MAX`), so it never waits a round trip for its
next one; otherwise, or unmeasured, ``hwm``. Pure: times come in as arguments.
"""

from __future__ import annotations

import math

#: most tasks placed on an engine beyond ``hwm`` while its tasks are fast. With no-op
#: tasks on a busy 2-core machine the estimate (round trip / run time) asks for more than
#: this: a cap of 16 left engines waiting part of each round trip and cost a quarter of
#: the load-balanced throughput; 256 measured no better than 64. The cap bounds what a
#: bad estimate, or an engine dying, costs.
PREFETCH_MAX = 64
#: an engine's tasks count as fast while their EWMA run time is under this share of a round trip
FAST_SHARE = 0.25
#: weight of the newest sample in the run-time and round-trip EWMAs
EWMA_WEIGHT = 0.25


class Estimate:
    """What replies showed of one engine: EWMAs of its tasks' run time and of the round
    trip around a task (reply time minus send time minus run time)."""

    __slots__ = ("round_trip", "run_time")

    def __init__(self) -> None:
        self.run_time: float | None = None
        self.round_trip: float | None = None

    def measure(self, run_time: object, elapsed: float | None) -> None:
        """Fold in a reply's ``run_time`` (seconds; anything else is ignored) and, for a
        task that found the engine idle, ``elapsed``: the seconds from its send to its
        reply (None for a task sent behind others, which waited too)."""
        if not (isinstance(run_time, (int, float)) and not isinstance(run_time, bool)
                and 0 <= run_time < math.inf):
            return
        run = self.run_time
        self.run_time = run_time if run is None else run + EWMA_WEIGHT * (run_time - run)
        if elapsed is not None:
            trip = elapsed - run_time
            if trip > 0:
                known = self.round_trip
                self.round_trip = trip if known is None else known + EWMA_WEIGHT * (trip - known)

    def limit(self, hwm: int) -> int:
        """``hwm``, plus enough tasks to cover a round trip while the engine's tasks are fast."""
        run, trip = self.run_time, self.round_trip
        if run is None or not trip or run >= FAST_SHARE * trip:
            return hwm
        return hwm + (PREFETCH_MAX if run <= 0 else min(PREFETCH_MAX, math.ceil(trip / run)))
