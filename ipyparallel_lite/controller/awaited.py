"""Work held until the controller has seen the requests it names: bookkeeping, no I/O.

A client's requests reach the controller on several connections: direct ones as the
mux device's copies, load-balanced ones on the task socket, Hub queries on the
registration socket. So a message that names requests its client sent just before it
may arrive first: a task that depends on a direct request, or a query about tasks
(``in_flight``, docs/hub.md). The server holds such work here, with the ids it still
misses and a deadline, and tells this object of each request it records
(:meth:`Awaited.arrived`) and of the time (:meth:`Awaited.due`). Each returns the work
to do now; the server does it. Work whose deadline passed goes with what is known (a
request lost on its way, or one its client's window still holds back).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable


class _Held:
    __slots__ = ("missing", "go")

    def __init__(self, missing: set[str], go: Callable[[], None]):
        self.missing = missing  # emptied when the work is released
        self.go = go


class Awaited:
    """Callbacks held until every msg_id each names has arrived, or its deadline."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[_Held]] = {}
        self._deadlines: list[tuple[float, int, _Held]] = []  # a heap
        self._count = 0  # ties in the heap go in the order held

    def hold(self, missing: Iterable[str], deadline: float, go: Callable[[], None]) -> None:
        """Hold ``go`` until each of ``missing`` (not empty) arrived, or ``deadline``."""
        held = _Held(set(missing), go)
        for msg_id in held.missing:
            self._by_id.setdefault(msg_id, []).append(held)
        self._count += 1
        heapq.heappush(self._deadlines, (deadline, self._count, held))

    def arrived(self, msg_id: str) -> list[Callable[[], None]]:
        """Request ``msg_id`` is recorded now: the work that waited only for it."""
        released = []
        for held in self._by_id.pop(msg_id, ()):
            missing = held.missing
            if missing:  # (empty: released already)
                missing.discard(msg_id)
                if not missing:
                    released.append(held.go)
        return released

    def due(self, now: float) -> list[Callable[[], None]]:
        """The work whose deadline is ``now`` or past, in the order of the deadlines."""
        released = []
        deadlines, by_id = self._deadlines, self._by_id
        while deadlines and deadlines[0][0] <= now:
            held = heapq.heappop(deadlines)[2]
            if not held.missing:
                continue  # released when its last request arrived
            for msg_id in held.missing:
                waiting = by_id.get(msg_id)
                if waiting is not None:
                    waiting.remove(held)
                    if not waiting:
                        del by_id[msg_id]
            held.missing = set()
            released.append(held.go)
        return released

    def next_deadline(self) -> float | None:
        """The earliest deadline of work still held (None: none is)."""
        deadlines = self._deadlines
        while deadlines and not deadlines[0][2].missing:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def waiting(self) -> bool:
        """Whether any work is held (arrivals matter)."""
        return bool(self._by_id)
